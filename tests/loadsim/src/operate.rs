//! Operating a cluster under load: `nodectl split`, `move`, `merge`, `drain`, `undrain` and
//! `rebalance` on a cluster of real processes while the load simulator drives its clients with
//! relation and privacy churn, judged at the end.
//!
//! 1. As the kill loop ([`crate::chaos`]): a seeded world imported into a fresh
//!    [`crate::cluster::ProcessCluster`], every online user connected, one long step of load.
//! 2. Once the step starts, the script runs the operator's tool, `nodectl`, against the nodes'
//!    admin APIs, one command after another, each to its end: split the group with the most
//!    users, move one of the new group's replicas to a node without one, merge the two back
//!    (which first moves the replicas home), drain the last node, undrain it, rebalance.
//! 3. Meanwhile every node's `nearby_redirects_total` is sampled every 250 ms: the redirects per
//!    second the clients saw, during the drain in particular.
//! 4. The verdict: the oracle's leaks (0) and misses (< 0.5 %), no client error from the first
//!    command on (a redirect is not an error: the SDK follows it, carrying the app's calls over;
//!    errors while the clients first connect are reported apart), every command done, every
//!    replica holding what the acknowledged changes left, no node crashed.
//!
//! The other script, [`Script::Upgrade`], is the operations guide's rolling upgrade, one node at
//! a time: `nodectl drain N --leaders-only` (cordoned: it leads nothing and keeps its replicas),
//! SIGTERM and a wait for the process to exit, the node started again on its data, `nodectl
//! undrain N`, `nodectl health --wait 120` — judged the same way. [`Script::Transfers`] moves
//! group leaderships round their replicas, one `nodectl transfer-leader` after another.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::chaos::{say, ChaosError, LoadSetup, ReplicaCheck};
use crate::cluster::ProcessCluster;
use crate::report::Report;

/// The miss rate a run may not reach.
pub const MAX_MISS_RATE: f64 = 0.005;

/// How often the nodes' redirect counters are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Which operations a run makes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Script {
    /// Split, move, merge, drain, undrain, rebalance.
    #[default]
    Operations,
    /// The rolling upgrade: every node cordoned, restarted and let back, one at a time.
    Upgrade,
    /// Every node restarted in turn with nothing but SIGTERM (the node hands its leaderships
    /// over by itself and takes them back when it returns: `cluster::leave`).
    Restarts,
    /// `nodectl transfer-leader` again and again: the leadership of four groups moved round
    /// their replicas while their users' writes go on.
    Transfers,
}

/// One step of a script.
#[derive(Clone, Debug)]
enum Step {
    /// `nodectl ARGS` through node `via`'s admin API.
    Nodectl { args: Vec<String>, via: u8 },
    /// The node stopped with SIGTERM (waiting for it to exit) and started again on its data.
    Restart(u8),
}

/// What an operations run runs with.
#[derive(Clone, Debug)]
pub struct OperateConfig {
    /// The cluster and its load (5 nodes for the run).
    pub load: LoadSetup,
    /// The operations.
    pub script: Script,
    /// How long the load runs; the commands must be done `settle` before its end.
    pub duration: Duration,
    /// Load before the first command, and at least after the last.
    pub settle: Duration,
}

/// One `nodectl` command of the script.
#[derive(Clone, Debug, Serialize)]
pub struct Command {
    /// What it was, as typed.
    pub command: String,
    /// When it started, seconds since the load's step began.
    pub at_s: f64,
    /// How long it took, seconds.
    pub secs: f64,
    /// Whether it finished as asked (exit status 0).
    pub ok: bool,
    /// Its output's last line (or its error).
    pub said: String,
}

/// Redirects the clients saw (every node's `nearby_redirects_total`, summed).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Redirects {
    /// Over the whole run.
    pub total: u64,
    /// During the drain.
    pub during_drain: u64,
    /// The drain's length, seconds.
    pub drain_s: f64,
    /// The most in one second during the drain.
    pub drain_max_per_s: f64,
    /// Per second of the run (for plotting), from the step's start.
    pub per_s: Vec<f64>,
}

/// An operations run's result.
#[derive(Clone, Debug, Serialize)]
pub struct OperateReport {
    /// The load's report (the oracle's verdict included).
    pub load: Report,
    /// The commands, in order.
    pub commands: Vec<Command>,
    /// Redirects.
    pub redirects: Redirects,
    /// Every replica checked.
    pub replicas: ReplicaCheck,
    /// Node processes that exited.
    pub crashes: Vec<String>,
    /// Client errors by second of the run (from the step's start) and code: when they came,
    /// against the commands' times.
    pub errors_by_second: Vec<(u64, String, u64)>,
    /// The first client errors' messages, by second of the run as `errors_by_second`.
    pub error_messages: Vec<(u64, String)>,
    /// Stops at which a node had handed all its leaderships over by itself (its log's "leads
    /// nothing now: stopping").
    pub handovers: usize,
}

impl OperateReport {
    /// Client errors from the first command on (those before are the load's start-up, not the
    /// operations': reported apart).
    pub fn errors_during_commands(&self) -> u64 {
        let from = self.first_command_s();
        self.errors_by_second
            .iter()
            .filter(|(s, _, _)| *s >= from)
            .map(|(_, _, n)| n)
            .sum()
    }

    /// The second of the run the first command started in (none: never).
    fn first_command_s(&self) -> u64 {
        self.commands.first().map_or(u64::MAX, |c| c.at_s.floor() as u64)
    }

    /// Whether the run kept every promise (see the module doc).
    pub fn passed(&self) -> bool {
        self.load.total.leaks == 0
            && self.load.total.miss_rate < MAX_MISS_RATE
            && self.errors_during_commands() == 0
            && self.commands.iter().all(|c| c.ok)
            && self.replicas.lost.is_empty()
            && self.crashes.is_empty()
    }

    /// A short table for people.
    pub fn table(&self) -> String {
        let mut s = format!("{}\n\ncommands:\n", self.load.table());
        for c in &self.commands {
            s.push_str(&format!(
                "  [{:6.1}s] {:<44} {:>6.1} s  {}  {}\n",
                c.at_s,
                c.command,
                c.secs,
                if c.ok { "done" } else { "FAILED" },
                c.said
            ));
        }
        let during = self.errors_during_commands();
        let all: u64 = self.load.errors.values().sum();
        s.push_str(&format!(
            "client errors from the first command on: {during} (at start-up: {})\n",
            all.saturating_sub(during)
        ));
        let from = self.first_command_s();
        for (at, message) in self.error_messages.iter().filter(|(at, _)| *at >= from).take(10) {
            s.push_str(&format!("  [{at:4}s] {message}\n"));
        }
        let r = &self.redirects;
        s.push_str(&format!(
            "redirects: {} in all; during the drain {} in {:.1} s ({:.1}/s on average, at most {:.0} in one second)\n\
             every replica: {} groups, {} replicas, {} users each, {} acknowledged writes lost\n\
             stops with every leadership handed over first: {}\n\
             crashes: {}",
            r.total,
            r.during_drain,
            r.drain_s,
            if r.drain_s > 0.0 {
                r.during_drain as f64 / r.drain_s
            } else {
                0.0
            },
            r.drain_max_per_s,
            self.replicas.groups,
            self.replicas.replicas,
            self.replicas.users,
            self.replicas.lost.len(),
            self.handovers,
            self.crashes.len(),
        ));
        s
    }
}

/// Runs `nodectl ARGS` against the cluster's admin APIs (node `via`'s), to its end.
async fn nodectl(cluster: &ProcessCluster, via: u8, args: &[String], timeout: Duration) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(cluster.nodectl());
    cmd.arg("--admin")
        .arg(cluster.admin_addr(via).to_string())
        .arg("--token-file")
        .arg(cluster.admin_token_file())
        .args(args)
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => (false, format!("did not finish in {timeout:?}")),
        Ok(Err(e)) => (false, format!("cannot run {}: {e}", cluster.nodectl().display())),
        Ok(Ok(out)) => {
            let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
            let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
            let last = if out.status.success() { &stdout } else { &stderr };
            let said = last.lines().last().unwrap_or("").to_string();
            (out.status.success(), if said.is_empty() { stderr } else { said })
        }
    }
}

/// `nodectl --json ARGS` as JSON.
async fn nodectl_json(cluster: &ProcessCluster, args: &[&str]) -> Result<serde_json::Value, ChaosError> {
    let mut cmd = tokio::process::Command::new(cluster.nodectl());
    cmd.arg("--json")
        .arg("--admin")
        .arg(cluster.admin_addr(1).to_string())
        .arg("--token-file")
        .arg(cluster.admin_token_file())
        .args(args);
    let out = cmd
        .output()
        .await
        .map_err(|e| ChaosError::Driver(format!("nodectl: {e}")))?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        ChaosError::Driver(format!(
            "nodectl {args:?}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}

/// The script (see the module doc), given the groups as `nodectl groups --json` shows them.
/// With a `hub` (a user with thousands of friends), its group is split right at it, so the hub's
/// record — every one of its friendships — is what moves.
fn script(groups: &serde_json::Value, nodes: u8, hub: Option<u64>) -> Result<Vec<Step>, ChaosError> {
    let list = groups["groups"].as_array().cloned().unwrap_or_default();
    let range = |g: &serde_json::Value| {
        (
            g["range"][0].as_u64().unwrap_or(0),
            g["range"][1].as_u64().unwrap_or(0),
        )
    };
    let hub_group = hub.and_then(|h| {
        list.iter()
            .find(|g| range(g).0 < h && h < range(g).1)
            .map(|g| (g, h))
    });
    let busiest = match hub_group {
        Some((g, _)) => Some(g),
        None => list.iter().max_by_key(|g| g["users"].as_u64().unwrap_or(0)),
    }
    .ok_or_else(|| ChaosError::Driver(format!("no groups: {groups}")))?;
    let split_at: Vec<String> = hub_group
        .map(|(_, h)| vec!["--at".to_string(), h.to_string()])
        .unwrap_or_default();
    let id = busiest["id"].as_u64().unwrap_or(0);
    let next = list.iter().filter_map(|g| g["id"].as_u64()).max().unwrap_or(0) + 1;
    let replicas: Vec<u64> = busiest["replicas"]
        .as_array()
        .map(|r| r.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default();
    let to = (1..=u64::from(nodes))
        .find(|n| !replicas.contains(n))
        .ok_or_else(|| ChaosError::Driver("every node holds the busiest group: use more nodes".into()))?;
    let from = replicas
        .iter()
        .copied()
        .find(|n| Some(*n) != busiest["leader"].as_u64())
        .unwrap_or(replicas[0]);
    let last = u64::from(nodes).to_string();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_string()).collect::<Vec<String>>();
    let mut split = s(&["split", &id.to_string()]);
    split.extend(split_at);
    let via1 = |args: Vec<String>| Step::Nodectl { args, via: 1 };
    Ok([
        split,
        s(&[
            "move",
            &next.to_string(),
            "--from",
            &from.to_string(),
            "--to",
            &to.to_string(),
        ]),
        s(&["merge", &id.to_string(), &next.to_string()]),
        s(&["drain", &last, "--timeout", "300"]),
        s(&["undrain", &last]),
        s(&["rebalance"]),
    ]
    .into_iter()
    .map(via1)
    .collect())
}

/// Transfers (see [`Script::Transfers`]): each of the first four groups' leadership moved to
/// each of its other replicas and back, the groups in turn, through node 1's admin API.
fn transfer_script(groups: &serde_json::Value) -> Result<Vec<Step>, ChaosError> {
    let list = groups["groups"].as_array().cloned().unwrap_or_default();
    let mut rounds: Vec<Vec<Step>> = Vec::new();
    for g in list.iter().take(4) {
        let id = g["id"].as_u64().unwrap_or(0).to_string();
        let mut replicas: Vec<u64> = g["replicas"]
            .as_array()
            .map(|r| r.iter().filter_map(serde_json::Value::as_u64).collect())
            .unwrap_or_default();
        if replicas.len() < 2 {
            return Err(ChaosError::Driver(format!(
                "group {id} has one replica: {groups}"
            )));
        }
        // From the replica after the leader round to the leader itself.
        let at = replicas
            .iter()
            .position(|r| Some(*r) == g["leader"].as_u64())
            .unwrap_or(0);
        replicas.rotate_left(at + 1);
        for (round, to) in replicas.iter().enumerate() {
            let args = ["transfer-leader", &id, "--to", &to.to_string()];
            let step = Step::Nodectl {
                args: args.iter().map(|x| (*x).to_string()).collect(),
                via: 1,
            };
            match rounds.get_mut(round) {
                Some(r) => r.push(step),
                None => rounds.push(vec![step]),
            }
        }
    }
    Ok(rounds.into_iter().flatten().collect())
}

/// The rolling upgrade (see the module doc) — with `cordon`, as the operations guide does it;
/// without, by SIGTERM alone: for every node, through another node's admin API.
fn upgrade_script(nodes: u8, cordon: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    for n in 1..=nodes {
        let via = if n == 1 { 2 } else { 1 };
        let node = n.to_string();
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_string()).collect::<Vec<String>>();
        if cordon {
            steps.push(Step::Nodectl {
                args: s(&["drain", &node, "--leaders-only", "--timeout", "120"]),
                via,
            });
        }
        steps.push(Step::Restart(n));
        if cordon {
            steps.push(Step::Nodectl {
                args: s(&["undrain", &node]),
                via,
            });
        }
        steps.push(Step::Nodectl {
            args: s(&["health", "--wait", "120"]),
            via,
        });
    }
    steps
}

/// Runs the operations (see the module doc). MUST be called inside a multi-threaded runtime.
pub async fn run(config: OperateConfig) -> Result<OperateReport, ChaosError> {
    let setup = &config.load;
    let mut run = crate::chaos::start_under_load(setup, config.duration).await?;
    let t0 = Instant::now();
    let script_end = t0 + config.duration.saturating_sub(config.settle);
    let token = std::fs::read_to_string(run.cluster.admin_token_file())
        .map_err(|e| ChaosError::Driver(format!("admin token: {e}")))?
        .trim()
        .to_string();
    // Redirects sampled while the script runs.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let sampler = {
        let addrs: Vec<String> = (1..=run.cluster.size())
            .map(|i| run.cluster.admin_addr(i).to_string())
            .collect();
        let token = token.clone();
        tokio::spawn(async move {
            let mut last = vec![0u64; addrs.len()];
            let mut samples: Vec<(f64, u64)> = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => break,
                }
                for (i, a) in addrs.iter().enumerate() {
                    if let Some(v) = crate::cluster::scrape(a, &token, "nearby_redirects_total").await {
                        last[i] = v;
                    }
                }
                samples.push((t0.elapsed().as_secs_f64(), last.iter().sum()));
            }
            samples
        })
    };
    tokio::time::sleep(config.settle).await;
    let steps = match config.script {
        Script::Operations => {
            let groups = nodectl_json(&run.cluster, &["groups"]).await?;
            let hub = run.world.hub().map(|h| run.world.id(h));
            script(&groups, setup.nodes, hub)?
        }
        Script::Upgrade => upgrade_script(setup.nodes, true),
        Script::Restarts => upgrade_script(setup.nodes, false),
        Script::Transfers => transfer_script(&nodectl_json(&run.cluster, &["groups"]).await?)?,
    };
    let mut commands = Vec::new();
    let mut drain_window = None;
    for step in steps {
        let at = t0.elapsed().as_secs_f64();
        let (line, drain) = match &step {
            Step::Nodectl { args, .. } => (format!("nodectl {}", args.join(" ")), args[0] == "drain"),
            Step::Restart(n) => (format!("restart node {n} (SIGTERM, then run)"), false),
        };
        say(setup.progress, format!("{line} …"));
        let (ok, said) = match step {
            Step::Restart(n) => {
                let graceful = run.cluster.terminate(n, Duration::from_secs(30)).await;
                match run.cluster.restart(n).await {
                    Err(e) => (false, e.to_string()),
                    Ok(()) if !graceful => (false, "did not exit within 30 s of SIGTERM (killed)".into()),
                    Ok(()) => (true, "ready".into()),
                }
            }
            // Through the admin API of a node that stays up. A refusal (exit 2) that only asks
            // to wait — a rebalance while placement settles — is tried again.
            Step::Nodectl { args, via } => loop {
                let left = script_end.saturating_duration_since(Instant::now());
                let (ok, said) = nodectl(&run.cluster, via, &args, left).await;
                if ok
                    || !said.contains("once it settles")
                    || Instant::now() + Duration::from_secs(1) > script_end
                {
                    break (ok, said);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            },
        };
        let secs = t0.elapsed().as_secs_f64() - at;
        say(
            setup.progress,
            format!(
                "{line}: {} in {secs:.1} s: {said}",
                if ok { "done" } else { "FAILED" }
            ),
        );
        if drain && config.script == Script::Operations {
            drain_window = Some((at, at + secs));
        }
        commands.push(Command {
            command: line,
            at_s: at,
            secs,
            ok,
            said,
        });
        if !ok {
            break;
        }
    }
    if config.script != Script::Operations {
        // The whole upgrade is the window redirects are counted over.
        if let (Some(first), Some(last)) = (commands.first(), commands.last()) {
            drain_window = Some((first.at_s, last.at_s + last.secs));
        }
    }
    tokio::time::sleep_until(script_end + config.settle).await;
    let _ = stop_tx.send(true);
    let samples = sampler.await.unwrap_or_default();
    say(setup.progress, "commands done; waiting for the load to finish");
    let done = run.finish(setup.progress).await?;
    let handovers = run.cluster.logged_ever("leads nothing now: stopping").len();
    run.cluster.stop().await;
    let start = done.out.windows.first().map_or(0, |w| w.0);
    let mut by_second: std::collections::BTreeMap<(u64, String), u64> = Default::default();
    for (at, code) in &done.out.errors {
        *by_second
            .entry((at.saturating_sub(start) / 1_000_000, code.clone()))
            .or_default() += 1;
    }
    Ok(OperateReport {
        load: done.report,
        commands,
        redirects: redirect_stats(&samples, drain_window),
        replicas: done.replicas,
        crashes: done.crashes,
        errors_by_second: by_second.into_iter().map(|((s, c), n)| (s, c, n)).collect(),
        error_messages: done
            .out
            .error_messages
            .iter()
            .map(|(at, m)| (at.saturating_sub(start) / 1_000_000, m.clone()))
            .collect(),
        handovers,
    })
}

/// Redirect counts from `(seconds, cumulative total)` samples.
fn redirect_stats(samples: &[(f64, u64)], drain: Option<(f64, f64)>) -> Redirects {
    let at = |t: f64| -> u64 {
        samples
            .iter()
            .take_while(|(s, _)| *s <= t)
            .last()
            .map_or(samples.first().map_or(0, |s| s.1), |s| s.1)
    };
    let first = samples.first().map_or(0, |s| s.1);
    let end = samples.last().map_or(0.0, |s| s.0);
    let per_s: Vec<f64> = (0..end.ceil() as usize)
        .map(|s| at(s as f64 + 1.0).saturating_sub(at(s as f64)) as f64)
        .collect();
    let (during, drain_s, max) = match drain {
        Some((a, b)) => {
            let max = (a.floor() as usize..b.ceil() as usize)
                .filter_map(|s| per_s.get(s))
                .fold(0.0_f64, |m, v| m.max(*v));
            (at(b).saturating_sub(at(a)), b - a, max)
        }
        None => (0, 0.0, 0.0),
    };
    Redirects {
        total: samples.last().map_or(0, |s| s.1).saturating_sub(first),
        during_drain: during,
        drain_s,
        drain_max_per_s: max,
        per_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_are_counted_per_second_and_over_the_drain() {
        let samples = [(0.25, 10), (1.0, 10), (2.0, 14), (3.0, 24), (4.0, 25), (5.0, 25)];
        let r = redirect_stats(&samples, Some((1.0, 4.0)));
        assert_eq!(r.total, 15);
        assert_eq!(r.during_drain, 15);
        assert_eq!(r.per_s, vec![0.0, 4.0, 10.0, 1.0, 0.0]);
        assert_eq!(r.drain_max_per_s, 10.0);
        assert!((r.drain_s - 3.0).abs() < 1e-9);
    }
}
