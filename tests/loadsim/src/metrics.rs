//! Summary numbers from a run's records: rates, latency percentiles, start-up latency, errors by
//! code, and the watched processes' CPU and memory. Pure arithmetic over what the driver recorded
//! and what the oracle judged; no I/O.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::driver::{ProcReadings, Startup};
use crate::oracle::{latency_histogram, Micros, Seen, Truth};
use crate::procstat::ProcSample;

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarises a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1000.0,
        }
    }
}

/// CPU and memory of one process over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcUsage {
    /// CPU seconds used in the window.
    pub cpu_s: f64,
    /// CPU use as a share of one core (cpu_s / wall seconds).
    pub cores: f64,
    /// CPU microseconds per delivered push (`None` without pushes).
    pub cpu_us_per_push: Option<f64>,
    /// Resident memory at the end of the window, KiB.
    pub rss_kb: u64,
    /// Peak resident memory of the process so far, KiB.
    pub peak_rss_kb: u64,
}

impl ProcUsage {
    /// Usage between two readings of one process.
    pub fn between(a: &ProcSample, b: &ProcSample, wall_s: f64, pushes: u64) -> Self {
        let cpu_s = (b.cpu_s - a.cpu_s).max(0.0);
        ProcUsage {
            cpu_s,
            cores: if wall_s > 0.0 { cpu_s / wall_s } else { 0.0 },
            cpu_us_per_push: (pushes > 0).then(|| cpu_s * 1e6 / pushes as f64),
            rss_kb: b.rss_kb,
            peak_rss_kb: b.peak_rss_kb,
        }
    }
}

/// What happened in one window of the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WindowCounts {
    /// Updates sent in the window.
    pub updates: u64,
    /// Friend events (entered, moved, left, gone) received in the window.
    pub pushes: u64,
    /// Errors in the window, by code.
    pub errors: BTreeMap<String, u64>,
}

/// Counts updates, pushes and errors in `[from, to)`.
pub fn count_window(truth: &Truth, errors: &[(Micros, String)], from: Micros, to: Micros) -> WindowCounts {
    let inside = |t: Micros| from <= t && t < to;
    let updates = truth.sent.iter().flatten().filter(|u| inside(u.sent)).count() as u64;
    let pushes = truth
        .received
        .iter()
        .flatten()
        .filter(|r| inside(r.at) && !matches!(r.seen, Seen::PageEntry { .. }))
        .count() as u64;
    WindowCounts {
        updates,
        pushes,
        errors: by_code(errors.iter().filter(|(t, _)| inside(*t))),
    }
}

/// Errors counted by code name.
pub fn by_code<'a>(errors: impl IntoIterator<Item = &'a (Micros, String)>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for (_, code) in errors {
        *m.entry(code.clone()).or_insert(0) += 1;
    }
    m
}

/// Start-up latency of the sessions whose user has between `min_degree` and `max_degree` friends
/// (all sessions with `None`), counting only sessions that got a first page.
pub fn startup_latency(startups: &[Startup], band: Option<(usize, usize)>) -> LatencySummary {
    let mut h = latency_histogram();
    for s in startups.iter().filter(|s| s.started) {
        if band.is_none_or(|(lo, hi)| (lo..=hi).contains(&s.degree)) {
            h.saturating_record(s.latency_us.max(1));
        }
    }
    LatencySummary::of(&h)
}

/// Usage of the process picked by `pick` between two readings.
pub fn usage(
    a: &ProcReadings,
    b: &ProcReadings,
    pick: impl Fn(&ProcReadings) -> Option<ProcSample>,
    pushes: u64,
) -> Option<ProcUsage> {
    let wall_s = b.at.saturating_sub(a.at) as f64 / 1e6;
    Some(ProcUsage::between(&pick(a)?, &pick(b)?, wall_s, pushes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_in_milliseconds() {
        let mut h = latency_histogram();
        for us in 1..=1000u64 {
            h.record(us * 1000).expect("in bounds");
        }
        let s = LatencySummary::of(&h);
        assert_eq!(s.count, 1000);
        assert!(
            (s.p50_ms - 500.0).abs() < 1.0 && (s.p99_ms - 990.0).abs() < 1.0,
            "{s:?}"
        );
        assert!((s.max_ms - 1000.0).abs() < 1.0);
        assert_eq!(
            LatencySummary::of(&latency_histogram()),
            LatencySummary::default()
        );
    }

    #[test]
    fn usage_is_per_push_and_per_core() {
        let a = ProcSample {
            cpu_s: 1.0,
            rss_kb: 10,
            peak_rss_kb: 10,
        };
        let b = ProcSample {
            cpu_s: 3.0,
            rss_kb: 20,
            peak_rss_kb: 30,
        };
        let u = ProcUsage::between(&a, &b, 4.0, 1_000_000);
        assert_eq!((u.cpu_s, u.cores, u.cpu_us_per_push), (2.0, 0.5, Some(2.0)));
        assert_eq!((u.rss_kb, u.peak_rss_kb), (20, 30));
    }
}
