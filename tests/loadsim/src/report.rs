//! The run's report: built from the driver's records and the oracle's verdict, printed as a table
//! for people and serialised as JSON for the benchmark harness (and read back from it by
//! [`crate::compare`] and [`crate::plot`]). Pure: formatting only.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::driver::RunOutput;
use crate::metrics::{self, LatencySummary, ProcUsage};
use crate::oracle::{self, Leak, Miss, OracleConfig, Verdict};
use crate::world::{World, WorldSummary};

/// The oracle's counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OracleCounts {
    /// Events that showed a location to someone who must not see it (must be 0).
    pub leaks: u64,
    /// Deliveries the oracle expected.
    pub expected: u64,
    /// Of which missed.
    pub missed: u64,
    /// missed / expected.
    pub miss_rate: f64,
}

impl OracleCounts {
    fn of(t: &oracle::Tally) -> Self {
        OracleCounts {
            leaks: t.leaks,
            expected: t.expected,
            missed: t.missed,
            miss_rate: t.miss_rate(),
        }
    }
}

/// One load step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// 1-based.
    pub step: usize,
    /// Updates/s asked for.
    pub target_rate: f64,
    /// Wall seconds.
    pub duration_s: f64,
    /// Updates sent.
    pub updates: u64,
    /// Updates sent per second.
    pub updates_per_s: f64,
    /// Friend events received.
    pub pushes: u64,
    /// Friend events received per second.
    pub pushes_per_s: f64,
    /// Update → push latency of updates sent in the step.
    pub latency: LatencySummary,
    /// The oracle's counts for the step.
    pub oracle: OracleCounts,
    /// Errors by code.
    pub errors: BTreeMap<String, u64>,
    /// The server process (`--server-pid`).
    pub server: Option<ProcUsage>,
    /// The extra process (`--extra-pid`, e.g. Redis).
    pub extra: Option<ProcUsage>,
    /// The load generator itself.
    pub loadsim: Option<ProcUsage>,
}

impl StepReport {
    /// The load generator's CPU use over the step as a share of the `cpus` it could use (`None`
    /// if it was not read).
    pub fn generator_busy(&self, cpus: usize) -> Option<f64> {
        let cpus = cpus.max(1) as f64;
        self.loadsim.map(|u| u.cores / cpus)
    }

    /// CPU seconds the system under test used in the step: the server process and the extra
    /// process (the baseline's Redis) together, since both serve the load.
    pub fn system_cpu_s(&self) -> f64 {
        system_cpu_s(self.server.map(|u| u.cpu_s), self.extra.map(|u| u.cpu_s))
    }

    /// [`Self::system_cpu_s`] per million delivered pushes (`None` without pushes or without a
    /// watched server process).
    pub fn cpu_s_per_m_pushes(&self) -> Option<f64> {
        self.server?;
        cpu_s_per_m_pushes(self.system_cpu_s(), self.pushes as f64)
    }

    /// Share of the step's updates that got an error (refused by load shedding or the rate
    /// limit, or lost to a timeout) — updates the oracle expects nothing from.
    pub fn refused_share(&self) -> f64 {
        if self.updates == 0 {
            return 0.0;
        }
        self.errors.values().sum::<u64>() as f64 / self.updates as f64
    }

    /// Peak RSS of the system under test (server and extra process), KiB.
    pub fn peak_rss_kb(&self) -> u64 {
        self.server.map_or(0, |u| u.peak_rss_kb) + self.extra.map_or(0, |u| u.peak_rss_kb)
    }
}

/// CPU seconds of the system under test from its processes' CPU seconds: the server's plus the
/// extra process's (the baseline's Redis), a missing reading counting as 0.
pub fn system_cpu_s(server_cpu_s: Option<f64>, extra_cpu_s: Option<f64>) -> f64 {
    server_cpu_s.unwrap_or(0.0) + extra_cpu_s.unwrap_or(0.0)
}

/// CPU seconds per million delivered pushes (`None` without pushes).
pub fn cpu_s_per_m_pushes(cpu_s: f64, pushes: f64) -> Option<f64> {
    (pushes > 0.0).then(|| cpu_s / pushes * 1e6)
}

/// The connect phase.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectReport {
    /// Online users the run tried to connect.
    pub participants: usize,
    /// Sessions that sent their first location.
    pub sessions: usize,
    /// Wall seconds to connect everyone.
    pub seconds: f64,
    /// Connect → first page, every session.
    pub startup: LatencySummary,
    /// Friend counts of the band below.
    pub band: (usize, usize),
    /// Connect → first page for users with about the mean friend count (±25 %).
    pub startup_band: LatencySummary,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// What was simulated.
    pub world: WorldSummary,
    /// Against which node.
    pub endpoint: String,
    /// The oracle's parameters.
    pub radius_m: f64,
    /// Tolerance band, share of the radius.
    pub tolerance: f64,
    /// Delivery deadline, ms.
    pub deadline_ms: u64,
    /// The connect phase.
    pub connect: ConnectReport,
    /// Each load step.
    pub steps: Vec<StepReport>,
    /// The whole run (connect phase and drain included).
    pub total: OracleCounts,
    /// Update → push latency over the whole run.
    pub latency: LatencySummary,
    /// Errors over the whole run, by code.
    pub errors: BTreeMap<String, u64>,
    /// Schedule slots skipped because an update was still unanswered.
    pub late_slots: u64,
    /// The first leaks.
    pub leak_samples: Vec<Leak>,
    /// The first misses.
    pub miss_samples: Vec<Miss>,
    /// Events that arrived after a forbidding change was acknowledged but carry a position the
    /// server processed before it (already on their way; not leaks), and the latest of them
    /// after the acknowledgement, ms.
    #[serde(default)]
    pub in_flight_after_ack: (u64, f64),
    /// Stranger events and page entries judged, and of them friends or followed users shown as
    /// strangers (not leaks; the product promises not to repeat them).
    #[serde(default)]
    pub strangers: (u64, u64),
    /// The world's hub, if it has one: its id, its friends, and the oracle's counts of the
    /// deliveries to and from it.
    #[serde(default)]
    pub hub: Option<HubReport>,
    /// The CPUs the load generator could use (its affinity); `None` in reports older than it.
    #[serde(default)]
    pub generator_cpus: Option<usize>,
}

/// The hub's deliveries ([`crate::world::WorldConfig::hub_friends`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HubReport {
    /// Its id.
    pub user: u64,
    /// Its friends.
    pub friends: usize,
    /// Its updates the node acknowledged.
    pub updates: usize,
    /// Events it received.
    pub received: usize,
    /// Deliveries to and from it.
    pub oracle: OracleCounts,
}

impl Report {
    /// Judges a run with the oracle and summarises it. The radius and TTL are the ones the node
    /// announced.
    pub fn build(world: &World, endpoint: &str, out: &RunOutput) -> (Report, Verdict) {
        let config = OracleConfig {
            radius_m: out.radius_m,
            ttl_us: u64::from(out.ttl_s) * 1_000_000,
            focus: world.hub().map(|h| world.id(h)),
            ..OracleConfig::default()
        };
        let verdict = oracle::judge(&out.truth, &config, &out.windows);
        (
            Self::with_verdict(world, endpoint, out, &verdict, &config),
            verdict,
        )
    }

    /// Summarises a run already judged.
    pub fn with_verdict(
        world: &World,
        endpoint: &str,
        out: &RunOutput,
        verdict: &Verdict,
        config: &OracleConfig,
    ) -> Report {
        let mean = world.config().effective_mean_degree();
        let band = ((mean * 0.75).floor() as usize, (mean * 1.25).ceil() as usize);
        let steps = out
            .windows
            .iter()
            .enumerate()
            .map(|(i, &(from, to))| {
                let c = metrics::count_window(&out.truth, &out.errors, from, to);
                let secs = to.saturating_sub(from) as f64 / 1e6;
                let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
                let (a, b) = (out.readings.get(i), out.readings.get(i + 1));
                let usage =
                    |pick: fn(&crate::driver::ProcReadings) -> Option<crate::procstat::ProcSample>| {
                        a.zip(b).and_then(|(a, b)| metrics::usage(a, b, pick, c.pushes))
                    };
                let tally = &verdict.windows[i];
                StepReport {
                    step: i + 1,
                    target_rate: out.steps.get(i).map_or(0.0, |s| s.rate),
                    duration_s: secs,
                    updates: c.updates,
                    updates_per_s: per_s(c.updates),
                    pushes: c.pushes,
                    pushes_per_s: per_s(c.pushes),
                    latency: LatencySummary::of(&tally.latency_us),
                    oracle: OracleCounts::of(tally),
                    errors: c.errors,
                    server: usage(|r| r.server),
                    extra: usage(|r| r.extra),
                    loadsim: usage(|r| r.loadsim),
                }
            })
            .collect();
        Report {
            world: world.summary(),
            endpoint: endpoint.to_string(),
            radius_m: config.radius_m,
            tolerance: config.tolerance,
            deadline_ms: config.deadline_us / 1000,
            connect: ConnectReport {
                participants: out.truth.ids.len(),
                sessions: out.startups.len(),
                seconds: out.connect_phase.as_secs_f64(),
                startup: metrics::startup_latency(&out.startups, None),
                band,
                startup_band: metrics::startup_latency(&out.startups, Some(band)),
            },
            steps,
            generator_cpus: Some(out.generator_cpus),
            total: OracleCounts::of(&verdict.total),
            latency: LatencySummary::of(&verdict.total.latency_us),
            errors: metrics::by_code(&out.errors),
            late_slots: out.late_slots,
            leak_samples: verdict.leak_samples.clone(),
            miss_samples: verdict.miss_samples.clone(),
            in_flight_after_ack: (
                verdict.in_flight_after_ack.0,
                verdict.in_flight_after_ack.1 as f64 / 1_000.0,
            ),
            strangers: (verdict.strangers_seen, verdict.friends_as_strangers),
            hub: world.hub().map(|h| {
                let p = out.truth.ids.iter().position(|&id| id == world.id(h));
                HubReport {
                    user: world.id(h),
                    friends: world.friends(h).len(),
                    updates: p.map_or(0, |p| {
                        out.truth.sent[p]
                            .iter()
                            .filter(|u| matches!(u.outcome, oracle::Outcome::Acked(_)))
                            .count()
                    }),
                    received: p.map_or(0, |p| out.truth.received[p].len()),
                    oracle: OracleCounts::of(&verdict.focus),
                }
            }),
        }
    }

    /// Whether the run showed no leak.
    pub fn no_leaks(&self) -> bool {
        self.total.leaks == 0
    }

    /// The report as a table for people.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let w = &self.world;
        let _ = writeln!(
            s,
            "world: seed {} | {} users, {} online | {} friendships (mean {:.0}, max {}, {} users > 1000) | {} follows | {:.0} % of friends within 8 km | period {} s",
            w.seed,
            w.users,
            w.online,
            w.friendships,
            w.mean_degree,
            w.max_degree,
            w.users_over_1000_friends,
            w.follows,
            w.friends_within_8km * 100.0,
            w.period_s
        );
        let c = &self.connect;
        let _ = writeln!(
            s,
            "connect: {}/{} sessions in {:.1} s | start-up p50 {:.1} ms p99 {:.1} ms max {:.1} ms | users with {}–{} friends ({}): p50 {:.1} ms p99 {:.1} ms",
            c.sessions,
            c.participants,
            c.seconds,
            c.startup.p50_ms,
            c.startup.p99_ms,
            c.startup.max_ms,
            c.band.0,
            c.band.1,
            c.startup_band.count,
            c.startup_band.p50_ms,
            c.startup_band.p99_ms
        );
        let _ = writeln!(
            s,
            "\n{:>4} {:>9} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>9} {:>9} {:>8} {:>9} {:>9}",
            "step",
            "target/s",
            "updates/s",
            "pushes/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "leaks",
            "miss %",
            "errors",
            "srv cpu",
            "µs/push",
            "srv MiB"
        );
        for st in &self.steps {
            let errors: u64 = st.errors.values().sum();
            let (cpu, per_push, rss) = match &st.server {
                Some(u) => (
                    format!("{:.2}", u.cores),
                    u.cpu_us_per_push.map_or("-".into(), |v| format!("{v:.1}")),
                    format!("{:.1}", u.peak_rss_kb as f64 / 1024.0),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let _ = writeln!(
                s,
                "{:>4} {:>9.0} {:>9.1} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>6} {:>9.4} {:>9} {:>8} {:>9} {:>9}",
                st.step,
                st.target_rate,
                st.updates_per_s,
                st.pushes_per_s,
                st.latency.p50_ms,
                st.latency.p90_ms,
                st.latency.p99_ms,
                st.latency.p999_ms,
                st.latency.max_ms,
                st.oracle.leaks,
                st.oracle.miss_rate * 100.0,
                errors,
                cpu,
                per_push,
                rss
            );
            if let Some(x) = &st.extra {
                let _ = writeln!(
                    s,
                    "     extra process: {:.2} cores, {} µs/push, peak {:.1} MiB",
                    x.cores,
                    x.cpu_us_per_push.map_or("-".into(), |v| format!("{v:.1}")),
                    x.peak_rss_kb as f64 / 1024.0
                );
            }
            if let (Some(g), Some(cpus)) = (&st.loadsim, self.generator_cpus) {
                let _ = writeln!(
                    s,
                    "     load generator: {:.2} cores, {:.0} % of its {cpus} CPU(s), {} µs/push",
                    g.cores,
                    st.generator_busy(cpus).unwrap_or(0.0) * 100.0,
                    g.cpu_us_per_push.map_or("-".into(), |v| format!("{v:.1}")),
                );
            }
        }
        let t = &self.total;
        let _ = writeln!(
            s,
            "\ntotal: leaks {} | misses {}/{} expected ({:.4} %) | latency p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms max {:.2} ms | late slots {}",
            t.leaks,
            t.missed,
            t.expected,
            t.miss_rate * 100.0,
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.latency.p999_ms,
            self.latency.max_ms,
            self.late_slots
        );
        if self.in_flight_after_ack.0 > 0 {
            let _ = writeln!(
                s,
                "in flight at a revocation: {} events arrived after the change was acknowledged, carrying positions processed before it (latest {:.0} ms after)",
                self.in_flight_after_ack.0, self.in_flight_after_ack.1
            );
        }
        if let Some(h) = &self.hub {
            let _ = writeln!(
                s,
                "hub: user {} with {} friends ({} updates acknowledged, {} events received): {} deliveries to and from it judged, {} missed ({:.3} %), {} leaks",
                h.user,
                h.friends,
                h.updates,
                h.received,
                h.oracle.expected,
                h.oracle.missed,
                h.oracle.miss_rate * 100.0,
                h.oracle.leaks
            );
        }
        if self.strangers.0 > 0 {
            let _ = writeln!(
                s,
                "strangers: {} events and page entries judged, {} of them friends shown as strangers",
                self.strangers.0, self.strangers.1
            );
        }
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(s, "errors: {errors}");
        let _ = writeln!(
            s,
            "oracle: radius {:.0} m, tolerance ±{:.1} %, deadline {} ms",
            self.radius_m,
            self.tolerance * 100.0,
            self.deadline_ms
        );
        for l in self.leak_samples.iter().take(5) {
            let _ = writeln!(
                s,
                "  LEAK: user {} saw user {} at {:.3} s: {:?}",
                l.viewer,
                l.sender,
                l.at_us as f64 / 1e6,
                l.reason
            );
        }
        for m in self.miss_samples.iter().take(5) {
            let _ = writeln!(
                s,
                "  miss: user {} did not hear update #{} of user {} sent at {:.3} s",
                m.viewer,
                m.seq,
                m.sender,
                m.sent_us as f64 / 1e6
            );
        }
        s
    }
}

/// Reports built in memory, for the tests of the modules that read reports.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::collections::BTreeMap;

    use super::{ConnectReport, OracleCounts, Report, StepReport};
    use crate::metrics::{LatencySummary, ProcUsage};
    use crate::world::WorldSummary;

    /// Step `n`: delivered pushes/s, p50 and p99 (ms), miss rate, server CPU seconds.
    pub(crate) fn step(
        n: usize,
        pushes_per_s: f64,
        p50: f64,
        p99: f64,
        miss_rate: f64,
        cpu_s: f64,
    ) -> StepReport {
        let usage = |cpu_s| ProcUsage {
            cpu_s,
            cores: cpu_s / 10.0,
            cpu_us_per_push: None,
            rss_kb: 1000,
            peak_rss_kb: 1000,
        };
        StepReport {
            step: n,
            target_rate: pushes_per_s / 25.0,
            duration_s: 10.0,
            updates: (pushes_per_s / 2.5) as u64,
            updates_per_s: pushes_per_s / 25.0,
            pushes: (pushes_per_s * 10.0) as u64,
            pushes_per_s,
            latency: LatencySummary {
                count: 100,
                p50_ms: p50,
                p90_ms: p99 * 0.8,
                p99_ms: p99,
                p999_ms: p99 * 1.5,
                max_ms: p99 * 2.0,
            },
            oracle: OracleCounts {
                leaks: 0,
                expected: 1000,
                missed: (miss_rate * 1000.0) as u64,
                miss_rate,
            },
            errors: BTreeMap::new(),
            server: Some(usage(cpu_s)),
            extra: None,
            loadsim: None,
        }
    }

    pub(crate) fn report(steps: Vec<StepReport>) -> Report {
        let world = WorldSummary {
            seed: 1,
            users: 100,
            online: 10,
            friendships: 400,
            follows: 8,
            mean_degree: 8.0,
            max_degree: 20,
            users_over_1000_friends: 0,
            friends_within_8km: 0.8,
            cities: 1,
            sharing_off: 0,
            discoverable: 0,
            listeners: 0,
            hidden_pairs: 0,
            period_s: 30.0,
        };
        Report {
            world,
            endpoint: "127.0.0.1:1".into(),
            radius_m: 8000.0,
            tolerance: 0.01,
            deadline_ms: 2000,
            connect: ConnectReport {
                participants: 10,
                sessions: 10,
                seconds: 1.0,
                startup: LatencySummary::default(),
                band: (6, 10),
                startup_band: LatencySummary::default(),
            },
            steps,
            total: OracleCounts::default(),
            latency: LatencySummary::default(),
            errors: BTreeMap::new(),
            late_slots: 0,
            leak_samples: vec![],
            miss_samples: vec![],
            in_flight_after_ack: (0, 0.0),
            strangers: (0, 0),
            hub: None,
            generator_cpus: Some(1),
        }
    }
}
