//! The kill loop: a cluster of real processes under load and relation churn, with nodes killed
//! (`kill -9`, leaders preferred) and restarted over and over, judged at the end.
//!
//! 1. A seeded world is imported into a fresh [`ProcessCluster`]; the driver connects every
//!    online user (the SDK, real QUIC) and runs one long step with churn
//!    ([`crate::churn`]).
//! 2. Once the step starts, the loop kills the node leading the most groups (never a second
//!    node while one is down, so a majority always lives), waits, restarts it, waits for it to
//!    serve, and goes on until it has killed `kills` times.
//! 3. The oracle judges every event: a **leak** is an event about `P` reaching `V` after a
//!    change forbidding it was acknowledged to `P`.
//! 4. **Served again**: for each session that lost its node, the time from the kill to the
//!    session's resumption (the SDK reconnected and re-sent its location).
//! 5. **Every replica**: once the cluster is quiet, every replica of every group is asked for
//!    the records of the users whose relations churned; each must hold what the acknowledged
//!    changes left (the pair friends again, nobody hidden, sharing on, no request pending,
//!    every one-way grant as the world has it, on the giver's and the follower's records) —
//!    checked on all replicas, not only the leaders.
//! 6. **Crashes**: no node process may have exited unless it was killed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nearby_index::geo::UserId;
use nearby_node::route::peer::{GrantsView, PeerResponse, RecordView};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cluster::{ClusterError, ClusterOptions, ProcessCluster};
use crate::driver::{self, DriverConfig, Step};
use crate::oracle::Micros;
use crate::report::Report;
use crate::world::{World, WorldConfig};

/// A cluster of real processes under load and churn: what the kill loop and the operations
/// run (`nearby-loadsim operate`) share.
#[derive(Clone, Debug)]
pub struct LoadSetup {
    /// Where the nodes' files go.
    pub dir: PathBuf,
    /// Nodes.
    pub nodes: u8,
    /// Shard groups.
    pub groups: u64,
    /// The world.
    pub world: WorldConfig,
    /// Updates per second, over all participants.
    pub rate: f64,
    /// Relation and privacy changes per second.
    pub churn: f64,
    /// Seeds the churn (and the kills).
    pub seed: u64,
    /// Print progress to stderr.
    pub progress: bool,
    /// The `nearby-node` binary; the one next to this executable if `None`.
    pub node_bin: Option<PathBuf>,
    /// The clients' request timeout, QUIC keep-alive and idle timeout: how fast a client
    /// notices its node is gone (with or without traffic).
    pub liveness: Liveness,
    /// Every node in its own network namespace, with the first three bytes of the nodes'
    /// addresses there (the fault harness; loopback addresses if `None`).
    pub netns: Option<(crate::cluster::Netns, [u8; 3])>,
    /// One node's data on a small disk: `(node, bytes)` (the fault harness's full disk).
    pub small_disk: Option<(u8, u64)>,
    /// The nodes follow delay files (the fault harness's node-to-node delay).
    pub delay_files: bool,
}

/// What a kill loop runs with.
#[derive(Clone, Debug)]
pub struct ChaosConfig {
    /// The cluster and its load.
    pub load: LoadSetup,
    /// Kills to make.
    pub kills: u32,
    /// How long a killed node stays down.
    pub down: Duration,
    /// Pause between a node's return and the next kill.
    pub between: Duration,
}

/// One kill.
#[derive(Clone, Debug, Serialize)]
pub struct Kill {
    /// When, µs since the run started.
    pub at_us: Micros,
    /// The node.
    pub node: u8,
    /// How many groups it led.
    pub leading: usize,
    /// How long its restart took to serve, ms.
    pub restart_ms: u64,
}

/// Time from a kill to a session's resumption.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServedAgain {
    /// Sessions that lost their node.
    pub sessions: usize,
    /// Median, ms.
    pub p50_ms: u64,
    /// 99th percentile, ms.
    pub p99_ms: u64,
    /// Longest, ms.
    pub max_ms: u64,
    /// Sessions served again after more than 5 s.
    pub over_5s: usize,
    /// Sessions never served again before the run ended.
    pub never: usize,
    /// Of the time from the kill: from the client noticing its node was gone to being served
    /// again (the reconnection: the cluster's part), median and 99th percentile, ms. The rest is
    /// detection, bounded by the client's request timeout after its next request, or its idle
    /// timeout when it sends nothing.
    pub reconnect_p50_ms: u64,
    /// See `reconnect_p50_ms`.
    pub reconnect_p99_ms: u64,
}

/// What the check of every replica found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicaCheck {
    /// Groups checked.
    pub groups: usize,
    /// Replicas asked.
    pub replicas: usize,
    /// Users checked on each replica.
    pub users: usize,
    /// Acknowledged writes missing or wrong on some replica (one line each; empty is good).
    pub lost: Vec<String>,
}

/// How fast the clients notice a dead node.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Liveness {
    /// A request unanswered this long drops the connection.
    pub request_timeout: Duration,
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
}

impl Default for Liveness {
    /// An app in the foreground: 2 s request timeout, a keep-alive every second, 3 s idle.
    fn default() -> Self {
        Liveness {
            request_timeout: Duration::from_secs(2),
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(3),
        }
    }
}

impl Liveness {
    /// What an app gets from the SDK unless it asks otherwise (`ClientConfig::new`): a 5 s
    /// request timeout, QUIC keep-alive and idle timeout from `nearby_client::tls`. Runs with
    /// no failure in them (planned operations) use these: a client that takes a busy node's
    /// two-second pause for its death is an error of the test's making, not the product's.
    pub fn app_defaults() -> Self {
        let c = nearby_client::ClientConfig::new("", "", 1, "");
        Liveness {
            request_timeout: c.request_timeout,
            keep_alive: c.keep_alive,
            idle_timeout: c.idle_timeout,
        }
    }
}

/// A kill loop's result.
#[derive(Clone, Debug, Serialize)]
pub struct ChaosReport {
    /// The load's report (the oracle's verdict included).
    pub load: Report,
    /// The kills.
    pub kills: Vec<Kill>,
    /// Relation/privacy cycles made, and of those completed with every request acknowledged.
    pub cycles: (usize, usize),
    /// Cycles by kind.
    pub cycle_kinds: Vec<(crate::churn::Kind, usize)>,
    /// Sessions served again after losing their node.
    pub served_again: ServedAgain,
    /// Every replica checked.
    pub replicas: ReplicaCheck,
    /// Node processes that exited without being killed (with the end of their log).
    pub crashes: Vec<String>,
}

impl ChaosReport {
    /// Whether the run kept every promise: no leak, nothing acknowledged lost, no crash.
    pub fn passed(&self) -> bool {
        self.load.total.leaks == 0 && self.replicas.lost.is_empty() && self.crashes.is_empty()
    }

    /// A short table for people.
    pub fn table(&self) -> String {
        let s = &self.served_again;
        format!(
            "{load}\n\nkills: {kills} (each the node leading the most groups)\n\
             relation/privacy cycles: {cycles}\n\
             served again after losing their node: {n} sessions, p50 {p50} ms, p99 {p99} ms, max {max} ms, \
             {over} over 5 s, {never} never (from noticing: p50 {rp50} ms, p99 {rp99} ms)\n\
             every replica: {g} groups, {r} replicas, {u} users each, {lost} acknowledged writes lost\n\
             crashes: {crashes}",
            load = self.load.table(),
            kills = self.kills.len(),
            cycles = crate::churn::summary(self.cycles, &self.cycle_kinds),
            n = s.sessions,
            p50 = s.p50_ms,
            p99 = s.p99_ms,
            max = s.max_ms,
            over = s.over_5s,
            rp50 = s.reconnect_p50_ms,
            rp99 = s.reconnect_p99_ms,
            never = s.never,
            g = self.replicas.groups,
            r = self.replicas.replicas,
            u = self.replicas.users,
            lost = self.replicas.lost.len(),
            crashes = self.crashes.len(),
        )
    }
}

/// Why the kill loop could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChaosError {
    /// The cluster could not be run.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The world could not be made.
    #[error("world: {0}")]
    World(String),
    /// The load could not be driven.
    #[error("driver: {0}")]
    Driver(String),
    /// The run was asked for something it cannot do, or a fault could not be applied.
    #[error("{0}")]
    Setup(String),
}

#[allow(clippy::print_stderr)] // progress is this tool's interface
pub(crate) fn say(on: bool, line: impl AsRef<str>) {
    if on {
        eprintln!("chaos: {}", line.as_ref());
    }
}

/// A cluster started with the world imported, and its load running (see [`start_under_load`]).
pub struct UnderLoad {
    /// The cluster.
    pub cluster: ProcessCluster,
    /// The world it serves.
    pub world: Arc<World>,
    /// The load, until it ends by itself.
    pub load: tokio::task::JoinHandle<Result<driver::RunOutput, driver::DriverError>>,
}

/// Starts the cluster of `setup` with its world imported and drives one step of load and churn
/// lasting `total`; returns once every client is connected and the step has begun.
pub async fn start_under_load(setup: &LoadSetup, total: Duration) -> Result<UnderLoad, ChaosError> {
    let world = World::generate(setup.world.clone()).map_err(|e| ChaosError::World(e.to_string()))?;
    std::fs::create_dir_all(&setup.dir).map_err(|e| ChaosError::World(e.to_string()))?;
    let seed_file = setup.dir.join("world.seed");
    world
        .seed()
        .write(&seed_file)
        .map_err(|e| ChaosError::World(e.to_string()))?;
    let mut opts = match &setup.node_bin {
        Some(bin) => {
            ClusterOptions::with_binary(bin.clone(), setup.dir.join("cluster"), setup.nodes, setup.groups)
        }
        None => ClusterOptions::new(setup.dir.join("cluster"), setup.nodes, setup.groups)?,
    };
    opts.import = Some(seed_file);
    if let Some((ns, host)) = &setup.netns {
        opts.netns = Some(ns.clone());
        opts.host = *host;
    }
    opts.small_disk = setup.small_disk;
    opts.delay_files = setup.delay_files;
    say(
        setup.progress,
        format!("starting {} nodes, {} groups", setup.nodes, setup.groups),
    );
    let cluster = ProcessCluster::start(opts).await?;
    let (started_tx, mut started) = watch::channel(false);
    let mut dc = DriverConfig::new(
        cluster.endpoints().join(","),
        cluster.client_ca(),
        vec![Step {
            rate: setup.rate,
            duration: total,
        }],
    );
    dc.churn = setup.churn;
    dc.churn_seed = setup.seed;
    dc.pseudonym_key = Some(cluster.pseudonym_key()?);
    dc.progress = setup.progress;
    dc.connect_timeout = Duration::from_secs(2);
    dc.request_timeout = setup.liveness.request_timeout;
    dc.keep_alive = setup.liveness.keep_alive;
    dc.idle_timeout = setup.liveness.idle_timeout;
    dc.started = Some(Arc::new(started_tx));
    let world = Arc::new(world);
    let load = {
        let world = Arc::clone(&world);
        tokio::spawn(async move { driver::run(&world, dc).await })
    };
    while !*started.borrow_and_update() {
        if started.changed().await.is_err() {
            break;
        }
    }
    Ok(UnderLoad { cluster, world, load })
}

/// What a run under load ended with (see [`UnderLoad::finish`]).
pub struct Finished {
    /// The load's report, the oracle's verdict included.
    pub report: Report,
    /// Everything the driver recorded.
    pub out: driver::RunOutput,
    /// Every replica checked for the churned users.
    pub replicas: ReplicaCheck,
    /// Node processes that exited without being killed.
    pub crashes: Vec<String>,
}

impl UnderLoad {
    /// Waits for the load to end, then judges it and checks every replica; the cluster is
    /// left running (stop it with [`ProcessCluster::stop`]).
    pub async fn finish(&mut self, progress: bool) -> Result<Finished, ChaosError> {
        let out = (&mut self.load)
            .await
            .map_err(|e| ChaosError::Driver(e.to_string()))?
            .map_err(|e| ChaosError::Driver(e.to_string()))?;
        let crashes: Vec<String> = self
            .cluster
            .crashed()
            .into_iter()
            .map(|(n, how)| format!("node {n}: {how}"))
            .collect();
        let (report, _) = Report::build(&self.world, &self.cluster.endpoints().join(","), &out);
        let replicas = check_replicas(&self.cluster, &self.world, &out.cycles, progress).await?;
        Ok(Finished {
            report,
            out,
            replicas,
            crashes,
        })
    }
}

/// Runs the kill loop (see the module doc). MUST be called inside a multi-threaded runtime.
pub async fn run(config: ChaosConfig) -> Result<ChaosReport, ChaosError> {
    let setup = &config.load;
    // One step long enough for every kill, its downtime and the pause after it.
    let per_kill = config.down + config.between + Duration::from_secs(4);
    let total = per_kill * config.kills + Duration::from_secs(5);
    let mut run = start_under_load(setup, total).await?;
    let t0 = Instant::now();
    let mut kills = Vec::new();
    for k in 0..config.kills {
        let map = run.cluster.map();
        let mut leading: BTreeMap<u8, usize> = (1..=setup.nodes).map(|n| (n, 0)).collect();
        for (g, e) in &map.groups {
            if let Some(l) = e.leader.and_then(|l| u8::try_from(l).ok()) {
                if *g != nearby_raft::META_GROUP {
                    *leading.entry(l).or_default() += 1;
                }
            }
        }
        // Leaders preferred: the node leading the most groups (ties by a seeded rotation).
        let victim = leading
            .iter()
            .max_by_key(|(n, c)| {
                (
                    **c,
                    (u64::from(**n) + setup.seed + u64::from(k)) % u64::from(setup.nodes),
                )
            })
            .map_or(1, |(n, _)| *n);
        let at_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        say(
            setup.progress,
            format!(
                "kill {}/{}: node {victim} (leads {} groups)",
                k + 1,
                config.kills,
                leading[&victim]
            ),
        );
        run.cluster.kill(victim);
        tokio::time::sleep(config.down).await;
        let back = Instant::now();
        run.cluster.restart(victim).await?;
        kills.push(Kill {
            at_us,
            node: victim,
            leading: leading[&victim],
            restart_ms: back.elapsed().as_millis() as u64,
        });
        tokio::time::sleep(config.between).await;
    }
    say(setup.progress, "kills done; waiting for the load to finish");
    let done = run.finish(setup.progress).await?;
    // The driver's clock started before the steps; kills are stamped from the steps' start.
    let offset = done.out.windows.first().map_or(0, |w| w.0);
    let end = done.out.windows.last().map_or(Micros::MAX, |w| w.1);
    let kill_times: Vec<Micros> = kills.iter().map(|k| k.at_us).collect();
    let served_again = served_again(&done.out.truth.outages, &kill_times, offset, end);
    let restored = done.out.cycles.iter().filter(|c| c.restored).count();
    let report = ChaosReport {
        load: done.report,
        kills,
        cycles: (done.out.cycles.len(), restored),
        cycle_kinds: crate::churn::by_kind(&done.out.cycles),
        served_again,
        replicas: done.replicas,
        crashes: done.crashes,
    };
    run.cluster.stop().await;
    Ok(report)
}

/// For every outage that began after a fault (a kill; times from the steps' start) and before
/// the next, the time from that fault to the session's return.
pub(crate) fn served_again(
    outages: &[Vec<(Micros, Micros)>],
    faults: &[Micros],
    offset: Micros,
    end: Micros,
) -> ServedAgain {
    let kill_times: Vec<Micros> = faults.iter().map(|k| k + offset).collect();
    let mut times = Vec::new();
    let mut reconnects = Vec::new();
    let mut never = 0;
    for list in outages {
        // The clients' own close at the end is not an outage.
        for &(from, to) in list.iter().filter(|(from, _)| *from < end) {
            // The driver stamps an outage a second before the client noticed it.
            let noticed = from + 1_000_000;
            let Some(&kill) = kill_times.iter().rev().find(|&&k| k <= noticed) else {
                continue;
            };
            if to == Micros::MAX {
                never += 1;
                continue;
            }
            times.push((to.saturating_sub(kill)) / 1_000);
            reconnects.push(to.saturating_sub(noticed) / 1_000);
        }
    }
    times.sort_unstable();
    reconnects.sort_unstable();
    let q = quantile;
    ServedAgain {
        sessions: times.len(),
        p50_ms: q(&times, 0.5),
        p99_ms: q(&times, 0.99),
        max_ms: times.last().copied().unwrap_or(0),
        over_5s: times.iter().filter(|&&t| t > 5_000).count(),
        never,
        reconnect_p50_ms: q(&reconnects, 0.5),
        reconnect_p99_ms: q(&reconnects, 0.99),
    }
}

/// The `p` quantile of `sorted` (0 when empty).
pub(crate) fn quantile(sorted: &[u64], p: f64) -> u64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

/// What `have` lacks and has beyond `want`, if they differ.
fn difference(have: &[UserId], want: &[UserId]) -> Option<String> {
    (have != want).then(|| {
        let missing: Vec<_> = want.iter().filter(|f| !have.contains(f)).collect();
        let extra: Vec<_> = have.iter().filter(|f| !want.contains(f)).collect();
        format!("missing {missing:?}, extra {extra:?}")
    })
}

/// Checks every replica of every group for the users whose relations churned (see the module
/// doc). Waits (bounded) for the replicas to agree on their applied index first.
async fn check_replicas(
    cluster: &ProcessCluster,
    world: &World,
    cycles: &[crate::churn::Cycle],
    progress: bool,
) -> Result<ReplicaCheck, ChaosError> {
    let users: BTreeSet<UserId> = cycles.iter().flat_map(|c| [c.sender, c.viewer]).collect();
    let unrestored: BTreeSet<(UserId, UserId)> = cycles
        .iter()
        .filter(|c| !c.restored)
        .flat_map(|c| [(c.sender, c.viewer), (c.viewer, c.sender)])
        .collect();
    let mut by_group: BTreeMap<u64, Vec<UserId>> = BTreeMap::new();
    for &u in &users {
        if let Some(g) = cluster.group_of(u) {
            by_group.entry(g).or_default().push(u);
        }
    }
    // One-way grants by the world, both ways: user → its followers, and follower → whom it follows.
    let mut followers: BTreeMap<UserId, Vec<UserId>> = BTreeMap::new();
    let mut following: BTreeMap<UserId, Vec<UserId>> = BTreeMap::new();
    for &(user, follower) in world.follows() {
        let (user, follower) = (world.id(user), world.id(follower));
        followers.entry(user).or_default().push(follower);
        following.entry(follower).or_default().push(user);
    }
    let mut check = ReplicaCheck {
        groups: by_group.len(),
        users: users.len(),
        ..ReplicaCheck::default()
    };
    say(
        progress,
        format!(
            "checking {} users on every replica of {} groups",
            users.len(),
            by_group.len()
        ),
    );
    for (group, members) in by_group {
        // Replicas catch up from the leader within moments of the load ending.
        let deadline = Instant::now() + Duration::from_secs(30);
        let answers = loop {
            let answers = cluster.replica_states(group, &members).await?;
            let applied: BTreeSet<u64> = answers
                .iter()
                .filter_map(|(_, a)| match a {
                    PeerResponse::Replica { applied, .. } => Some(*applied),
                    _ => None,
                })
                .collect();
            let all_answered = answers
                .iter()
                .all(|(_, a)| matches!(a, PeerResponse::Replica { .. }));
            if (all_answered && applied.len() == 1) || Instant::now() > deadline {
                break answers;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for (node, answer) in answers {
            check.replicas += 1;
            let records: BTreeMap<UserId, RecordView> = match answer {
                PeerResponse::Replica { records, .. } => records.into_iter().collect(),
                other => {
                    check
                        .lost
                        .push(format!("group {group} on node {node}: no answer ({other:?})"));
                    continue;
                }
            };
            for &u in &members {
                let Some(r) = records.get(&u) else {
                    check
                        .lost
                        .push(format!("group {group} on node {node}: user {u} has no record"));
                    continue;
                };
                let i = world.index_of(u).unwrap_or(0);
                let mut friends: Vec<UserId> = world.friends(i).iter().map(|f| world.id(*f)).collect();
                friends.sort_unstable();
                let mut have = r.friends.clone();
                // Pairs whose cycle did not finish may be either way.
                have.retain(|f| !unrestored.contains(&(u, *f)));
                friends.retain(|f| !unrestored.contains(&(u, *f)));
                if let Some(diff) = difference(&have, &friends) {
                    check.lost.push(format!(
                        "group {group} on node {node}: user {u} friends differ ({diff})"
                    ));
                }
                let pending: Vec<_> = r
                    .requests_in
                    .iter()
                    .chain(&r.requests_out)
                    .filter(|o| !unrestored.contains(&(u, **o)))
                    .collect();
                if !pending.is_empty() {
                    check.lost.push(format!(
                        "group {group} on node {node}: user {u} has requests pending with {pending:?}"
                    ));
                }
                let hidden: Vec<_> = r
                    .hidden_from
                    .iter()
                    .filter(|o| !unrestored.contains(&(u, **o)))
                    .collect();
                if !hidden.is_empty() {
                    check.lost.push(format!(
                        "group {group} on node {node}: user {u} still hides from {hidden:?}"
                    ));
                }
                let sharing_restored = cycles
                    .iter()
                    .filter(|c| c.sender == u && c.kind == crate::churn::Kind::SharingOff)
                    .all(|c| c.restored);
                if !r.sharing && sharing_restored {
                    check.lost.push(format!(
                        "group {group} on node {node}: user {u} still has sharing off"
                    ));
                }
            }
        }
        for (node, answer) in cluster.replica_grants(group, &members).await? {
            let records: BTreeMap<UserId, GrantsView> = match answer {
                PeerResponse::Grants { records, .. } => records.into_iter().collect(),
                other => {
                    check
                        .lost
                        .push(format!("group {group} on node {node}: no grants ({other:?})"));
                    continue;
                }
            };
            for &u in &members {
                let Some(r) = records.get(&u) else {
                    continue; // reported above: no record
                };
                for (what, have, want) in [
                    ("followers", &r.followers, followers.get(&u)),
                    ("following", &r.following, following.get(&u)),
                ] {
                    let mut want: Vec<UserId> = want.cloned().unwrap_or_default();
                    want.sort_unstable();
                    want.retain(|f| !unrestored.contains(&(u, *f)));
                    let mut have = have.clone();
                    have.retain(|f| !unrestored.contains(&(u, *f)));
                    if let Some(diff) = difference(&have, &want) {
                        check.lost.push(format!(
                            "group {group} on node {node}: user {u} {what} differ ({diff})"
                        ));
                    }
                }
            }
        }
    }
    Ok(check)
}
