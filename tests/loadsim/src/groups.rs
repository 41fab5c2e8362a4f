//! Many groups, cheap: the idle cost of a node hosting many shard groups, and how long a dead
//! node's groups take to elect new leaders (`nearby-loadsim groups`).
//!
//! 1. A [`ProcessCluster`] of `nodes` nodes and `groups` shard groups starts and settles
//!    (every group fully replicated, leaders spread).
//! 2. With no client at all, it waits until every group has had time to hibernate, then reads
//!    each node's CPU time (`/proc`) over `window`: the **idle CPU** per node, as a share of one
//!    core.
//! 3. It kills the node leading the most groups and measures, from the kill, how long until every
//!    group it led has a new leader in the map (the **election time** of a dead node's groups),
//!    and the CPU of the survivors meanwhile and once settled again with the node still dead (no
//!    heartbeat storm: only the dead node's groups wake, and they sleep again).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nearby_raft::META_GROUP;
use serde::Serialize;
use tokio::time::Instant;

use crate::cluster::{ClusterError, ClusterOptions, ProcessCluster};
use crate::procstat;

/// What `groups` runs with.
#[derive(Clone, Debug)]
pub struct GroupsConfig {
    /// Where the nodes' files go.
    pub dir: PathBuf,
    /// The `nearby-node` binary (next to this executable if `None`).
    pub node_bin: Option<PathBuf>,
    /// Nodes.
    pub nodes: u8,
    /// Shard groups.
    pub groups: u64,
    /// How long to wait for groups to hibernate before measuring.
    pub settle: Duration,
    /// How long each CPU measurement lasts.
    pub window: Duration,
    /// Print progress to stderr.
    pub progress: bool,
}

/// The measurements.
#[derive(Clone, Debug, Serialize)]
pub struct GroupsReport {
    /// Nodes.
    pub nodes: u8,
    /// Shard groups.
    pub groups: u64,
    /// Idle CPU per node, % of one core, with every group settled.
    pub idle_cpu_percent: BTreeMap<u8, f64>,
    /// The node killed, and how many groups it led.
    pub killed: (u8, usize),
    /// From the kill until every group it led had a new leader in the map, ms.
    pub election_ms: u64,
    /// CPU per surviving node, % of one core, over the window after the kill.
    pub after_kill_cpu_percent: BTreeMap<u8, f64>,
    /// CPU per surviving node, % of one core, once the groups settled again with the node still
    /// dead.
    pub dead_node_idle_cpu_percent: BTreeMap<u8, f64>,
}

impl GroupsReport {
    /// For people.
    pub fn table(&self) -> String {
        let fmt = |m: &BTreeMap<u8, f64>| {
            m.iter()
                .map(|(n, c)| format!("node {n}: {c:.2} %"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{} nodes, {} shard groups\nidle CPU (% of one core): {}\nkilled node {} (leading {} groups): \
             new leaders for all of them in {} ms\nCPU after the kill: {}\nidle CPU with the node dead: {}",
            self.nodes,
            self.groups,
            fmt(&self.idle_cpu_percent),
            self.killed.0,
            self.killed.1,
            self.election_ms,
            fmt(&self.after_kill_cpu_percent),
            fmt(&self.dead_node_idle_cpu_percent),
        )
    }
}

#[allow(clippy::print_stderr)] // progress is this tool's interface
fn say(on: bool, line: impl AsRef<str>) {
    if on {
        eprintln!("groups: {}", line.as_ref());
    }
}

/// CPU seconds of every running node now.
fn cpu(cluster: &ProcessCluster) -> BTreeMap<u8, f64> {
    (1..=cluster.size())
        .filter_map(|i| {
            let pid = cluster.node(i)?.pid();
            let s = procstat::sample(pid).ok()?;
            Some((i, s.cpu_s))
        })
        .collect()
}

/// CPU use over `window`, % of one core, per node.
async fn cpu_over(cluster: &ProcessCluster, window: Duration) -> BTreeMap<u8, f64> {
    let before = cpu(cluster);
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let after = cpu(cluster);
    let secs = t.elapsed().as_secs_f64();
    after
        .iter()
        .filter_map(|(n, a)| Some((*n, (a - before.get(n)?) / secs * 100.0)))
        .collect()
}

/// Runs the measurement (see the module doc).
pub async fn run(config: GroupsConfig) -> Result<GroupsReport, ClusterError> {
    let opts = match &config.node_bin {
        Some(bin) => {
            ClusterOptions::with_binary(bin.clone(), config.dir.clone(), config.nodes, config.groups)
        }
        None => ClusterOptions::new(config.dir.clone(), config.nodes, config.groups)?,
    };
    say(
        config.progress,
        format!("starting {} nodes with {} groups", config.nodes, config.groups),
    );
    let mut cluster = ProcessCluster::start(opts).await?;
    say(
        config.progress,
        format!(
            "settled; waiting {:?} for idle groups to hibernate",
            config.settle
        ),
    );
    tokio::time::sleep(config.settle).await;
    let idle = cpu_over(&cluster, config.window).await;
    say(config.progress, format!("idle CPU: {idle:?}"));

    let map = cluster.map();
    let mut leading: BTreeMap<u8, Vec<u64>> = BTreeMap::new();
    for (g, e) in &map.groups {
        if *g == META_GROUP {
            continue;
        }
        if let Some(l) = e.leader.and_then(|l| u8::try_from(l).ok()) {
            leading.entry(l).or_default().push(*g);
        }
    }
    let (victim, led) = leading
        .iter()
        .max_by_key(|(_, gs)| gs.len())
        .map(|(n, gs)| (*n, gs.clone()))
        .unwrap_or((1, Vec::new()));
    say(
        config.progress,
        format!("killing node {victim}, which leads {} groups", led.len()),
    );
    let killed = Instant::now();
    cluster.kill(victim);
    let elected = crate::cluster::wait_until(
        "new leaders for the dead node's groups",
        Duration::from_secs(120),
        || {
            let m = cluster.map();
            led.iter()
                .all(|g| m.leader(*g).is_some_and(|l| l != u64::from(victim)))
        },
    )
    .await;
    let election_ms = killed.elapsed().as_millis() as u64;
    elected?;
    let after = cpu_over(&cluster, config.window).await;
    say(
        config.progress,
        format!(
            "after the kill: {after:?}; waiting {:?} to settle again",
            config.settle
        ),
    );
    tokio::time::sleep(config.settle).await;
    let dead_idle = cpu_over(&cluster, config.window).await;
    cluster.stop().await;
    Ok(GroupsReport {
        nodes: config.nodes,
        groups: config.groups,
        idle_cpu_percent: idle,
        killed: (victim, led.len()),
        election_ms,
        after_kill_cpu_percent: after,
        dead_node_idle_cpu_percent: dead_idle,
    })
}
