//! The fault harness's loop (`nearby-loadsim faults`; `tests/faults/run.sh` makes the network
//! namespaces and runs it inside one of them): a cluster of real processes, each node in its own
//! network namespace, under load and relation churn, with faults drawn from a seed and applied
//! one after another; the whole history judged at the end.
//!
//! 1. The schedule is drawn before anything runs ([`schedule`]): for each fault its kind, the
//!    node(s) it hits and how long it holds. The seed alone reproduces it; a failed run prints
//!    both.
//! 2. Each fault is applied, held, healed; then the loop waits until every node answers
//!    `GET /readyz` (caught up and serving) — how long that took is the fault's *recovery* —
//!    and pauses before the next one. A node not ready within the bound is a finding.
//! 3. The judge is the kill loop's ([`crate::chaos`]): the oracle's leaks over every event,
//!    every acknowledged relation and privacy change checked on every replica, sessions served
//!    again after each fault (from its start, and after its heal), node processes that exited or
//!    logged a panic, and each node's peak memory.
//!
//! Faults: `kill -9` and restart; `SIGSTOP` / `SIGCONT`; a node's link down (isolated); a
//! minority cut from the majority (both ways); a node that hears no other node but is heard
//! (one way); random loss of a share of every node's incoming packets; a full disk on one node
//! (its data on a small tmpfs, filled for real); every node-to-node request held up to 250 ms
//! and reordered (the nodes' test-only delay, `NEARBY_FAULT_DELAY_FILE`: this kernel has no
//! netem); one node's clock stepped a second to a minute forward or back, then back (the same
//! file moves the node's injected clock). The network faults are nftables rules and link
//! states inside the nodes' namespaces; the clients (this process) reach every node throughout.

use std::collections::BTreeMap;
use std::fmt;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::time::Instant;

use crate::chaos::{self, say, ChaosError, LoadSetup, ReplicaCheck, ServedAgain};
use crate::cluster::{NodeFaults, ProcessCluster};
use crate::oracle::Micros;
use crate::report::Report;

/// A kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// `kill -9`, then started again on its data.
    Kill,
    /// `SIGSTOP`, then `SIGCONT`.
    Pause,
    /// The node's link down, then up.
    Isolate,
    /// A minority of the nodes cut from the rest, both ways.
    Partition,
    /// The node hears no other node; they still hear it.
    OneWay,
    /// Every node drops a share of the packets it receives.
    Loss,
    /// Every node's requests to other nodes held for a while (and reordered).
    Delay,
    /// The node's data disk filled, then freed.
    DiskFull,
    /// The node's clock stepped forward or back, then back to the true time.
    ClockJump,
}

impl FaultKind {
    /// Every kind, in order.
    pub const ALL: [FaultKind; 9] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Isolate,
        FaultKind::Partition,
        FaultKind::OneWay,
        FaultKind::Loss,
        FaultKind::Delay,
        FaultKind::DiskFull,
        FaultKind::ClockJump,
    ];

    /// Whether it needs the nodes in their own network namespaces.
    pub fn needs_netns(self) -> bool {
        matches!(
            self,
            FaultKind::Isolate | FaultKind::Partition | FaultKind::OneWay | FaultKind::Loss
        )
    }

    fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Isolate => "isolate",
            FaultKind::Partition => "partition",
            FaultKind::OneWay => "one-way",
            FaultKind::Loss => "loss",
            FaultKind::Delay => "delay",
            FaultKind::DiskFull => "disk-full",
            FaultKind::ClockJump => "clock",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<_> = FaultKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown fault {s:?} (one of {})", names.join(", "))
        })
    }
}

/// One fault of the schedule.
#[derive(Clone, Debug, Serialize)]
pub struct Fault {
    /// What.
    pub kind: FaultKind,
    /// The node(s) it hits: the minority of a partition, every node for loss.
    pub nodes: Vec<u8>,
    /// How long it holds.
    pub hold_ms: u64,
    /// For loss: the share of packets dropped, percent.
    pub loss_percent: u8,
    /// For delay: the most a request is held, ms.
    pub delay_ms: u64,
    /// For a clock jump: how far, ms (negative: back).
    pub skew_ms: i64,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?} for {} ms", self.kind, self.nodes, self.hold_ms)?;
        match self.kind {
            FaultKind::Loss => write!(f, " ({} % loss)", self.loss_percent)?,
            FaultKind::Delay => write!(f, " (up to {} ms)", self.delay_ms)?,
            FaultKind::ClockJump => write!(f, " ({:+} ms)", self.skew_ms)?,
            _ => {}
        }
        Ok(())
    }
}

/// Draws `count` faults of `kinds` (in turn, shuffled) on a cluster of `nodes` nodes; the disk
/// fault always hits `disk_node`.
pub fn schedule(
    seed: u64,
    nodes: u8,
    count: u32,
    kinds: &[FaultKind],
    hold: (Duration, Duration),
    disk_node: u8,
) -> Vec<Fault> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xfa17_5eed);
    let mut out = Vec::new();
    let mut bag: Vec<FaultKind> = Vec::new();
    let (lo, hi) = (
        hold.0.as_millis() as u64,
        hold.1.as_millis().max(hold.0.as_millis()) as u64,
    );
    for _ in 0..count {
        if bag.is_empty() {
            bag = kinds.to_vec();
            // Every kind once per round, in a seeded order.
            for i in (1..bag.len()).rev() {
                bag.swap(i, rng.random_range(0..=i));
            }
        }
        let Some(kind) = bag.pop() else { break };
        let one = rng.random_range(1..=nodes);
        let nodes_hit = match kind {
            FaultKind::Partition => {
                // A minority: as many as can be cut with a majority left.
                let size = usize::from((nodes - 1) / 2).max(1);
                let mut all: Vec<u8> = (1..=nodes).collect();
                for i in (1..all.len()).rev() {
                    all.swap(i, rng.random_range(0..=i));
                }
                let mut m = all[..size].to_vec();
                m.sort_unstable();
                m
            }
            FaultKind::Loss | FaultKind::Delay => (1..=nodes).collect(),
            FaultKind::DiskFull => vec![disk_node],
            _ => vec![one],
        };
        out.push(Fault {
            kind,
            nodes: nodes_hit,
            hold_ms: rng.random_range(lo..=hi),
            loss_percent: rng.random_range(5..=25),
            delay_ms: rng.random_range(20..=250),
            // NTP steps, a VM resumed, a bad time source: a second to a minute, either way.
            skew_ms: rng.random_range(1_000..=60_000) * if rng.random_bool(0.5) { 1 } else { -1 },
        });
    }
    out
}

/// What a fault run runs with.
#[derive(Clone, Debug)]
pub struct FaultsConfig {
    /// The cluster and its load (`load.netns` for the network faults, `load.small_disk` for
    /// the disk fault, `load.delay_files` for the delay).
    pub load: LoadSetup,
    /// Faults to apply.
    pub faults: u32,
    /// Of these kinds.
    pub kinds: Vec<FaultKind>,
    /// How long a fault holds: drawn between these.
    pub hold: (Duration, Duration),
    /// Pause after every node is ready again, before the next fault.
    pub between: Duration,
    /// Every node must be ready again within this after a fault heals.
    pub recovery_bound: Duration,
    /// No node's resident memory may pass this, MiB.
    pub memory_bound_mib: u64,
}

/// One fault as it went.
#[derive(Clone, Debug, Serialize)]
pub struct Applied {
    /// The fault.
    pub fault: Fault,
    /// When it began, µs since the run started.
    pub at_us: Micros,
    /// When it healed, µs since the run started.
    pub healed_us: Micros,
    /// From its heal until every node answered ready, ms (`None`: not within the bound).
    pub recovered_ms: Option<u64>,
}

/// A fault run's result.
#[derive(Clone, Debug, Serialize)]
pub struct FaultsReport {
    /// The seed (it reproduces the schedule).
    pub seed: u64,
    /// Nodes.
    pub nodes: u8,
    /// Faults drawn.
    pub planned: usize,
    /// The faults, as applied (all that were drawn, unless the load ended first).
    pub faults: Vec<Applied>,
    /// The load's report (the oracle's verdict included).
    pub load: Report,
    /// Relation/privacy cycles made, and of those completed with every request acknowledged.
    pub cycles: (usize, usize),
    /// Cycles by kind.
    pub cycle_kinds: Vec<(crate::churn::Kind, usize)>,
    /// Sessions served again, from the start of the fault that cost them their node.
    pub served_again: ServedAgain,
    /// Of those, how long after the fault healed, and how much of it in the clients' backoff.
    pub after_heal: AfterHeal,
    /// Every replica checked.
    pub replicas: ReplicaCheck,
    /// Node processes that exited without being killed, and panics in any node's logs.
    pub crashes: Vec<String>,
    /// Each node's peak resident memory, MiB.
    pub peak_rss_mib: BTreeMap<u8, u64>,
    /// Delivery fences passed, and client connections closed at one, over the whole run: lower
    /// bounds (see [`Counters`]).
    pub fences: (u64, u64),
    /// Client connections closed because their node's delivery lease ended with data
    /// unacknowledged: a lower bound.
    pub lease_closes: u64,
    /// The memory bound, MiB.
    pub memory_bound_mib: u64,
}

impl FaultsReport {
    /// Faults after which some node was not ready again within the bound.
    pub fn unrecovered(&self) -> Vec<&Applied> {
        self.faults.iter().filter(|a| a.recovered_ms.is_none()).collect()
    }

    /// Whether the run kept every promise: every fault applied under load, no leak, nothing
    /// acknowledged lost, no crash or panic, every node ready again after every fault, every
    /// session that lost its node served again before the run ended, memory within its bound.
    pub fn passed(&self) -> bool {
        self.load.total.leaks == 0
            && self.faults.len() == self.planned
            && self.served_again.never == 0
            && self.replicas.lost.is_empty()
            && self.crashes.is_empty()
            && self.unrecovered().is_empty()
            && self.peak_rss_mib.values().all(|m| *m <= self.memory_bound_mib)
    }

    /// The schedule, one fault a line (what a failed run prints to be reproduced).
    pub fn schedule_lines(&self) -> String {
        self.faults
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let rec = a.recovered_ms.map_or_else(
                    || "NOT recovered".to_string(),
                    |ms| format!("ready again in {ms} ms"),
                );
                format!(
                    "  {:>3}. at {:>7} ms: {} — {rec}",
                    i + 1,
                    a.at_us / 1_000,
                    a.fault
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A short table for people.
    pub fn table(&self) -> String {
        let mut by_kind: BTreeMap<FaultKind, (usize, Vec<u64>)> = BTreeMap::new();
        for a in &self.faults {
            let e = by_kind.entry(a.fault.kind).or_default();
            e.0 += 1;
            e.1.extend(a.recovered_ms);
        }
        let kinds: Vec<String> = by_kind
            .iter()
            .map(|(k, (n, rec))| {
                let max = rec.iter().max().copied().unwrap_or(0);
                format!("{k} {n} (ready again ≤ {max} ms)")
            })
            .collect();
        let s = &self.served_again;
        let rss: Vec<String> = self
            .peak_rss_mib
            .iter()
            .map(|(n, m)| format!("n{n} {m}"))
            .collect();
        format!(
            "{load}\n\nseed {seed}, {nodes} nodes, {f} of {planned} faults: {kinds}\n\
             relation/privacy cycles: {cycles}\n\
             served again after losing their node: {n} sessions, from the fault p50 {p50} ms, p99 {p99} ms, \
             max {max} ms, {never} never; after the heal p50 {h50} ms, p99 {h99} ms, max {hmax} ms \
             (of it in the clients' reconnection backoff, at most: p50 {b50} ms, p99 {b99} ms, max {bmax} ms; \
             the slowest {smax} ms, {sb} ms of it in backoff)\n\
             every replica: {g} groups, {r} replicas, {u} users each, {lost} acknowledged writes lost\n\
             crashes and panics: {crashes}; faults not recovered from: {unrec}\n\
             peak memory, MiB (bound {bound}): {rss}\n\
             delivery fences: {fences} passed, {fence_closes} client connections closed at one, \
             {lease_closes} at the end of a lease (at least)",
            load = self.load.table(),
            seed = self.seed,
            nodes = self.nodes,
            f = self.faults.len(),
            planned = self.planned,
            kinds = kinds.join(", "),
            cycles = crate::churn::summary(self.cycles, &self.cycle_kinds),
            n = s.sessions,
            p50 = s.p50_ms,
            p99 = s.p99_ms,
            max = s.max_ms,
            never = s.never,
            h50 = self.after_heal.ms.0,
            h99 = self.after_heal.ms.1,
            hmax = self.after_heal.ms.2,
            b50 = self.after_heal.backoff_ms.0,
            b99 = self.after_heal.backoff_ms.1,
            bmax = self.after_heal.backoff_ms.2,
            smax = self.after_heal.slowest_ms.0,
            sb = self.after_heal.slowest_ms.1,
            g = self.replicas.groups,
            r = self.replicas.replicas,
            u = self.replicas.users,
            lost = self.replicas.lost.len(),
            crashes = self.crashes.len(),
            unrec = self.unrecovered().len(),
            bound = self.memory_bound_mib,
            rss = rss.join(", "),
            fences = self.fences.0,
            fence_closes = self.fences.1,
            lease_closes = self.lease_closes,
        )
    }
}

/// Runs the fault loop (see the module doc). MUST be called inside a multi-threaded runtime.
pub async fn run(config: FaultsConfig) -> Result<FaultsReport, ChaosError> {
    let setup = &config.load;
    if setup.netns.is_none() {
        if let Some(k) = config.kinds.iter().find(|k| k.needs_netns()) {
            return Err(ChaosError::Setup(format!(
                "the {k} fault needs the nodes in network namespaces (run tests/faults/run.sh)"
            )));
        }
    }
    let disk_node = match setup.small_disk {
        Some((n, _)) => n,
        None if config.kinds.contains(&FaultKind::DiskFull) => {
            return Err(ChaosError::Setup(
                "the disk-full fault needs a node on a small disk".into(),
            ))
        }
        None => 1,
    };
    for k in [FaultKind::Delay, FaultKind::ClockJump] {
        if config.kinds.contains(&k) && !setup.delay_files {
            return Err(ChaosError::Setup(format!(
                "the {k} fault needs the nodes' fault files"
            )));
        }
    }
    let plan = schedule(
        setup.seed,
        setup.nodes,
        config.faults,
        &config.kinds,
        config.hold,
        disk_node,
    );
    say(
        setup.progress,
        format!("seed {}: {} faults drawn", setup.seed, plan.len()),
    );
    // One step long enough for every fault (its mean hold), its recovery and the pause after
    // it; faults the load does not outlast are not applied, and fail the run.
    let per = (config.hold.0 + config.hold.1) / 2 + config.between + Duration::from_secs(3);
    let total = per * config.faults + Duration::from_secs(10);
    let mut run = chaos::start_under_load(setup, total).await?;
    let t0 = Instant::now();
    let stamp = |t: Instant| u64::try_from(t.duration_since(t0).as_micros()).unwrap_or(u64::MAX);
    let mut applied = Vec::new();
    let mut peak: BTreeMap<u8, u64> = BTreeMap::new();
    let mut counters = Counters::new(&run.cluster);
    let mut failure = None;
    for (k, fault) in plan.into_iter().enumerate() {
        if run.load.is_finished() {
            say(setup.progress, format!("the load ended before fault {}", k + 1));
            break;
        }
        say(
            setup.progress,
            format!("fault {}/{}: {fault}", k + 1, config.faults),
        );
        let at = Instant::now();
        if let Err(e) = apply(&mut run.cluster, &fault, at).await {
            failure = Some(e);
            break;
        }
        let healed = Instant::now();
        let recovered = ready_within(&run.cluster, config.recovery_bound).await;
        if recovered.is_none() {
            say(
                setup.progress,
                format!(
                    "  not every node ready {:?} after the heal",
                    config.recovery_bound
                ),
            );
        }
        sample_memory(&run.cluster, &mut peak);
        counters.sample(&run.cluster).await;
        applied.push(Applied {
            fault,
            at_us: stamp(at),
            healed_us: stamp(healed),
            recovered_ms: recovered.map(|d| d.as_millis() as u64),
        });
        tokio::time::sleep(config.between).await;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    say(setup.progress, "faults done; waiting for the load to finish");
    counters.sample(&run.cluster).await;
    let done = run.finish(setup.progress).await?;
    sample_memory(&run.cluster, &mut peak);
    let offset = done.out.windows.first().map_or(0, |w| w.0);
    let end = done.out.windows.last().map_or(Micros::MAX, |w| w.1);
    let starts: Vec<Micros> = applied.iter().map(|a| a.at_us).collect();
    let served_again = chaos::served_again(&done.out.truth.outages, &starts, offset, end);
    let after_heal = after_heal(
        &done.out.truth.outages,
        &done.out.truth.backoffs,
        &applied,
        offset,
        end,
    );
    let restored = done.out.cycles.iter().filter(|c| c.restored).count();
    let mut crashes = done.crashes;
    crashes.extend(run.cluster.panics());
    let report = FaultsReport {
        planned: config.faults as usize,
        seed: setup.seed,
        nodes: setup.nodes,
        faults: applied,
        load: done.report,
        cycles: (done.out.cycles.len(), restored),
        cycle_kinds: crate::churn::by_kind(&done.out.cycles),
        served_again,
        after_heal,
        replicas: done.replicas,
        crashes,
        peak_rss_mib: peak,
        fences: (counters.total(FENCES), counters.total(FENCE_CLOSES)),
        lease_closes: counters.total(LEASE_CLOSES),
        memory_bound_mib: config.memory_bound_mib,
    };
    run.cluster.stop().await;
    Ok(report)
}

/// Applies `fault`, holds it from `at`, heals it.
async fn apply(cluster: &mut ProcessCluster, fault: &Fault, at: Instant) -> Result<(), ChaosError> {
    let until = at + Duration::from_millis(fault.hold_ms);
    let node = fault.nodes.first().copied().unwrap_or(1);
    match fault.kind {
        FaultKind::Kill => {
            cluster.kill(node);
            tokio::time::sleep_until(until).await;
            cluster.restart(node).await?;
        }
        FaultKind::Pause => {
            cluster.signal(node, libc::SIGSTOP);
            tokio::time::sleep_until(until).await;
            cluster.signal(node, libc::SIGCONT);
        }
        FaultKind::Isolate => {
            let ns = namespace(cluster, node)?;
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "down"])?;
            tokio::time::sleep_until(until).await;
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        }
        FaultKind::Partition | FaultKind::OneWay | FaultKind::Loss => {
            let all: Vec<u8> = (1..=cluster.size()).collect();
            let rules = rules(cluster, fault, &all);
            for (n, text) in &rules {
                nft(&namespace(cluster, *n)?, text)?;
            }
            tokio::time::sleep_until(until).await;
            for (n, _) in &rules {
                // Deleting the table heals; it exists, since adding it succeeded.
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &namespace(cluster, *n)?,
                    "nft",
                    "delete",
                    "table",
                    "inet",
                    TABLE,
                ])?;
            }
        }
        FaultKind::Delay => {
            let delayed = NodeFaults {
                delay_ms: fault.delay_ms,
                ..NodeFaults::default()
            };
            for n in &fault.nodes {
                cluster.set_faults(*n, &delayed)?;
            }
            tokio::time::sleep_until(until).await;
            for n in &fault.nodes {
                cluster.set_faults(*n, &NodeFaults::default())?;
            }
        }
        FaultKind::ClockJump => {
            let jumped = NodeFaults {
                skew_ms: fault.skew_ms,
                ..NodeFaults::default()
            };
            cluster.set_faults(node, &jumped)?;
            tokio::time::sleep_until(until).await;
            cluster.set_faults(node, &NodeFaults::default())?;
        }
        FaultKind::DiskFull => {
            let fill = cluster.data(node).join("fault-fill");
            let filled = tokio::task::spawn_blocking({
                let fill = fill.clone();
                move || nearby_raft::test_support::fill(&fill)
            })
            .await
            .map_err(|e| ChaosError::Setup(format!("filling the disk: {e}")))?;
            filled.map_err(|e| ChaosError::Setup(format!("filling {}: {e}", fill.display())))?;
            tokio::time::sleep_until(until).await;
            std::fs::remove_file(&fill)
                .map_err(|e| ChaosError::Setup(format!("freeing {}: {e}", fill.display())))?;
        }
    }
    Ok(())
}

/// The nftables table every network fault lives in (one per node namespace).
const TABLE: &str = "nearby_fault";

/// The rules of a network fault: `(node, ruleset)` for each node that gets some.
fn rules(cluster: &ProcessCluster, fault: &Fault, all: &[u8]) -> Vec<(u8, String)> {
    let ips = |nodes: &mut dyn Iterator<Item = &u8>| -> String {
        let list: Vec<String> = nodes
            .map(|n| {
                let ip = cluster.ip(*n);
                format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3])
            })
            .collect();
        format!("{{ {} }}", list.join(", "))
    };
    let table = |input: &str, output: &str| {
        format!(
            "table inet {TABLE} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    {input}\n  }}\n  \
             chain output {{\n    type filter hook output priority 0; policy accept;\n    {output}\n  }}\n}}\n"
        )
    };
    match fault.kind {
        FaultKind::Partition => {
            let others = ips(&mut all.iter().filter(|n| !fault.nodes.contains(n)));
            fault
                .nodes
                .iter()
                .map(|n| {
                    (
                        *n,
                        table(
                            &format!("ip saddr {others} drop"),
                            &format!("ip daddr {others} drop"),
                        ),
                    )
                })
                .collect()
        }
        FaultKind::OneWay => {
            let n = fault.nodes.first().copied().unwrap_or(1);
            let others = ips(&mut all.iter().filter(|m| **m != n));
            vec![(n, table(&format!("ip saddr {others} drop"), ""))]
        }
        FaultKind::Loss => all
            .iter()
            .map(|n| {
                (
                    *n,
                    table(
                        &format!("numgen random mod 100 < {} drop", fault.loss_percent),
                        "",
                    ),
                )
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn namespace(cluster: &ProcessCluster, node: u8) -> Result<String, ChaosError> {
    cluster
        .netns()
        .map(|ns| ns.name(node))
        .ok_or_else(|| ChaosError::Setup("network faults need the nodes in namespaces".into()))
}

/// Runs `args` (the program first) to its end; a failure says what ran and what it printed.
fn sh(args: &[&str]) -> Result<(), ChaosError> {
    sh_with_input(args, None)
}

/// [`sh`], with `input` on the program's standard input.
fn sh_with_input(args: &[&str], input: Option<&str>) -> Result<(), ChaosError> {
    use std::io::Write;
    use std::process::Stdio;
    let what = |e: &dyn fmt::Display| ChaosError::Setup(format!("{}: {e}", args.join(" ")));
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| what(&e))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(|e| what(&e))?;
    }
    let out = child.wait_with_output().map_err(|e| what(&e))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        let with = input.map_or_else(String::new, |t| format!("\n{t}"));
        return Err(what(&format!("{}{with}", said.trim())));
    }
    Ok(())
}

/// Loads an nftables `ruleset` in namespace `ns`.
fn nft(ns: &str, ruleset: &str) -> Result<(), ChaosError> {
    sh_with_input(&["ip", "netns", "exec", ns, "nft", "-f", "-"], Some(ruleset))
}

/// Waits until every node answers `GET /readyz` with 200; how long that took, or `None` if not
/// within `bound`.
async fn ready_within(cluster: &ProcessCluster, bound: Duration) -> Option<Duration> {
    let start = Instant::now();
    let deadline = start + bound;
    let mut waiting: Vec<u8> = (1..=cluster.size()).collect();
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for n in waiting {
            if !ready(cluster.admin_addr(n)).await {
                still.push(n);
            }
        }
        waiting = still;
        if waiting.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Some(start.elapsed())
}

/// Whether the node's admin API answers `GET /readyz` with 200 within a second.
async fn ready(addr: std::net::SocketAddr) -> bool {
    let answer = crate::cluster::admin_get(&addr.to_string(), "/readyz", None).await;
    matches!(answer, Some((200, _)))
}

const FENCES: &str = "nearby_delivery_fences_total";
const FENCE_CLOSES: &str = "nearby_delivery_fence_closes_total";
const LEASE_CLOSES: &str = "nearby_delivery_lease_closes_total";

/// Counters of the nodes' `/metrics`, summed over the run: a node restarted counts from zero
/// again, so each node's last value before a restart is carried. Sampled after each fault (once
/// the nodes are ready) and before the end, so what a node counted between its last sample and a
/// kill is not seen: the totals are lower bounds.
struct Counters {
    token: Option<String>,
    /// `(node, counter)` → (its last value, what earlier runs of the node counted).
    seen: BTreeMap<(u8, &'static str), (u64, u64)>,
}

impl Counters {
    fn new(cluster: &ProcessCluster) -> Self {
        let token = std::fs::read_to_string(cluster.admin_token_file())
            .ok()
            .map(|t| t.trim().to_string());
        Counters {
            token,
            seen: BTreeMap::new(),
        }
    }

    async fn sample(&mut self, cluster: &ProcessCluster) {
        let Some(token) = &self.token else {
            return;
        };
        for n in 1..=cluster.size() {
            if !cluster.is_running(n) {
                continue;
            }
            let addr = cluster.admin_addr(n).to_string();
            for name in [FENCES, FENCE_CLOSES, LEASE_CLOSES] {
                if let Some(v) = crate::cluster::scrape(&addr, token, name).await {
                    let (last, carried) = self.seen.entry((n, name)).or_default();
                    if v < *last {
                        *carried += *last;
                    }
                    *last = v;
                }
            }
        }
    }

    fn total(&self, name: &str) -> u64 {
        self.seen
            .iter()
            .filter(|((_, n), _)| *n == name)
            .map(|(_, (last, carried))| last + carried)
            .sum()
    }
}

fn sample_memory(cluster: &ProcessCluster, peak: &mut BTreeMap<u8, u64>) {
    for n in 1..=cluster.size() {
        if let Some(p) = cluster.node(n) {
            if let Ok(s) = crate::procstat::sample(p.pid()) {
                let mib = s.peak_rss_kb.max(s.rss_kb) / 1024;
                let e = peak.entry(n).or_default();
                *e = (*e).max(mib);
            }
        }
    }
}

/// How long sessions that lost their node during a fault took to be served again after it
/// healed, and how much of that the clients spent in their own reconnection backoff (the SDK's
/// wait between attempts grows to 30 s: a session whose attempts failed through a long fault
/// may sleep well past the heal).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AfterHeal {
    /// After the heal: median, 99th percentile, longest, ms.
    pub ms: (u64, u64, u64),
    /// Of that, spent waiting in the backoff: median, 99th percentile, longest, ms.
    pub backoff_ms: (u64, u64, u64),
    /// The slowest session: its time after the heal and its backoff wait in it, ms.
    pub slowest_ms: (u64, u64),
}

/// For every outage that began during a fault or soon after its heal: how long after the heal
/// the session was served again (0 if before), and how much of that it waited in its backoff.
fn after_heal(
    outages: &[Vec<(Micros, Micros)>],
    backoffs: &[Vec<(Micros, Micros)>],
    applied: &[Applied],
    offset: Micros,
    end: Micros,
) -> AfterHeal {
    let mut times = Vec::new();
    let mut waits = Vec::new();
    let mut slowest = (0, 0);
    for (p, list) in outages.iter().enumerate() {
        let sleeps = backoffs.get(p).map_or(&[][..], Vec::as_slice);
        for &(from, to) in list.iter().filter(|(from, to)| *from < end && *to != Micros::MAX) {
            // The driver stamps an outage a second before the client noticed it.
            let noticed = from + 1_000_000;
            let Some(a) = applied.iter().rev().find(|a| a.at_us + offset <= noticed) else {
                continue;
            };
            let healed = a.healed_us + offset;
            let after = to.saturating_sub(healed) / 1_000;
            let slept: Micros = sleeps
                .iter()
                .map(|&(a, b)| b.min(to).saturating_sub(a.max(healed)))
                .sum::<Micros>()
                / 1_000;
            times.push(after);
            waits.push(slept);
            if after >= slowest.0 {
                slowest = (after, slept);
            }
        }
    }
    times.sort_unstable();
    waits.sort_unstable();
    let q = |v: &[u64]| {
        (
            chaos::quantile(v, 0.5),
            chaos::quantile(v, 0.99),
            v.last().copied().unwrap_or(0),
        )
    };
    AfterHeal {
        ms: q(&times),
        backoff_ms: q(&waits),
        slowest_ms: slowest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_after_a_heal_counts_the_clients_backoff_apart() {
        let fault = schedule(
            1,
            3,
            1,
            &[FaultKind::Kill],
            (Duration::from_secs(1), Duration::from_secs(1)),
            2,
        )
        .remove(0);
        let s = 1_000_000;
        // The fault from 10 s to 12 s (the steps' clock is the outages' clock: offset 0).
        let applied = [Applied {
            fault,
            at_us: 10 * s,
            healed_us: 12 * s,
            recovered_ms: Some(0),
        }];
        // Session 0 lost its node at 11 s (noticed at 12 s), waited 11–12.5 s and 13–18 s in
        // its backoff and was served at 20 s: 8 s after the heal, 5.5 s of them asleep. Session
        // 1 came back before the heal; session 2 never did (not counted here).
        let outages = vec![
            vec![(11 * s, 20 * s)],
            vec![(11 * s, 12 * s)],
            vec![(11 * s, Micros::MAX)],
        ];
        let backoffs = vec![vec![(11 * s, 12 * s + s / 2), (13 * s, 18 * s)], vec![], vec![]];
        let a = after_heal(&outages, &backoffs, &applied, 0, Micros::MAX);
        assert_eq!(a.ms.2, 8_000);
        assert_eq!(a.backoff_ms.2, 5_500);
        assert_eq!(a.slowest_ms, (8_000, 5_500));
    }

    #[test]
    fn a_seed_draws_the_same_schedule_and_every_kind_in_each_round() {
        let hold = (Duration::from_secs(1), Duration::from_secs(3));
        // Two whole rounds and a part of a third.
        let n = 2 * FaultKind::ALL.len() as u32 + 3;
        let a = schedule(7, 5, n, &FaultKind::ALL, hold, 2);
        let b = schedule(7, 5, n, &FaultKind::ALL, hold, 2);
        let show = |s: &[Fault]| s.iter().map(|f| f.to_string()).collect::<Vec<_>>();
        assert_eq!(a.len(), n as usize);
        assert_eq!(show(&a), show(&b));
        assert_ne!(show(&a), show(&schedule(8, 5, n, &FaultKind::ALL, hold, 2)));
        for round in a.chunks_exact(FaultKind::ALL.len()) {
            let mut kinds: Vec<_> = round.iter().map(|f| f.kind).collect();
            kinds.sort_unstable();
            assert_eq!(kinds, FaultKind::ALL.to_vec());
        }
        for f in &a {
            assert!((1_000..=3_000).contains(&f.hold_ms));
            match f.kind {
                // A minority of five is two; the majority keeps three.
                FaultKind::Partition => assert_eq!(f.nodes.len(), 2),
                FaultKind::Loss | FaultKind::Delay => assert_eq!(f.nodes, vec![1, 2, 3, 4, 5]),
                FaultKind::DiskFull => assert_eq!(f.nodes, vec![2]),
                _ => assert!(f.nodes.len() == 1 && (1..=5).contains(&f.nodes[0])),
            }
            if f.kind == FaultKind::ClockJump {
                assert!((1_000..=60_000).contains(&f.skew_ms.abs()), "{f}");
            }
        }
    }

    #[test]
    fn fault_names_read_back() {
        for k in FaultKind::ALL {
            assert_eq!(k.to_string().parse::<FaultKind>(), Ok(k));
        }
        assert!("flood".parse::<FaultKind>().is_err());
    }
}
