//! Comparing two runs of the same load (nearby and the baseline) from their JSON reports: each
//! system's highest step that stays within the latency and correctness bounds, and the ratios.
//!
//! Pure: takes the reports as parsed JSON, returns the summary and its markdown. The bounds are
//! the issue's: p99 update→push latency under 100 ms, miss rate under 0.1 %, no leak.

use serde_json::Value;

use crate::report::{cpu_s_per_m_pushes, system_cpu_s};

/// p99 bound for a step to count, milliseconds.
pub const P99_BOUND_MS: f64 = 100.0;
/// Miss-rate bound for a step to count.
pub const MISS_BOUND: f64 = 0.001;

/// One system's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// The system's name.
    pub name: String,
    /// Highest delivered pushes/s of a step within the bounds (0 if none).
    pub max_pushes_per_s: f64,
    /// The step (1-based) that reached it.
    pub max_step: Option<u64>,
    /// p99 of the step nearest to 80 % of that load, ms.
    pub p99_at_80_ms: Option<f64>,
    /// Server CPU seconds (all its processes) per million pushes, at the max step.
    pub cpu_s_per_m_pushes: Option<f64>,
    /// Peak RSS of the server's processes per online session, KiB.
    pub rss_kib_per_session: Option<f64>,
    /// Leaks over the whole run (must be 0).
    pub leaks: u64,
    /// Miss rate over the whole run.
    pub miss_rate: f64,
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn cpu_and_rss(step: &Value) -> (f64, f64) {
    let cpu = system_cpu_s(f(step, &["server", "cpu_s"]), f(step, &["extra", "cpu_s"]));
    let rss = f(step, &["server", "peak_rss_kb"]).unwrap_or(0.0)
        + f(step, &["extra", "peak_rss_kb"]).unwrap_or(0.0);
    (cpu, rss)
}

/// Summarises one report.
pub fn summarize(name: &str, report: &Value) -> Summary {
    let steps: Vec<&Value> = report
        .get("steps")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let within = |s: &&&Value| {
        f(s, &["latency", "p99_ms"]).is_some_and(|p| p < P99_BOUND_MS)
            && f(s, &["oracle", "miss_rate"]).is_some_and(|m| m < MISS_BOUND)
            && f(s, &["oracle", "leaks"]) == Some(0.0)
    };
    let pushes = |s: &Value| f(s, &["pushes_per_s"]).unwrap_or(0.0);
    let best = steps
        .iter()
        .filter(within)
        .max_by(|a, b| pushes(a).total_cmp(&pushes(b)))
        .copied();
    let max = best.map_or(0.0, pushes);
    let at80 = best.and_then(|_| {
        steps.iter().filter(|s| pushes(s) <= max).min_by(|a, b| {
            (pushes(a) - 0.8 * max)
                .abs()
                .total_cmp(&(pushes(b) - 0.8 * max).abs())
        })
    });
    let sessions = f(report, &["connect", "sessions"]).unwrap_or(0.0);
    let (cpu_per_m, rss_per) = match best {
        Some(s) => {
            let (cpu, rss) = cpu_and_rss(s);
            let n = f(s, &["pushes"]).unwrap_or(0.0);
            (
                cpu_s_per_m_pushes(cpu, n),
                (sessions > 0.0).then(|| rss / sessions),
            )
        }
        None => (None, None),
    };
    Summary {
        name: name.to_string(),
        max_pushes_per_s: max,
        max_step: best.and_then(|s| s.get("step")).and_then(Value::as_u64),
        p99_at_80_ms: at80.and_then(|s| f(s, &["latency", "p99_ms"])),
        cpu_s_per_m_pushes: cpu_per_m,
        rss_kib_per_session: rss_per,
        leaks: f(report, &["total", "leaks"]).unwrap_or(0.0) as u64,
        miss_rate: f(report, &["total", "miss_rate"]).unwrap_or(0.0),
    }
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".to_string(), |x| format!("{x:.digits$}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".to_string(),
    }
}

/// The comparison as a markdown table: one row per system and the ratio nearby / baseline.
pub fn markdown(nearby: &Summary, baseline: &Summary) -> String {
    let mut out = String::new();
    out.push_str(
        "| system | max pushes/s (p99 < 100 ms, miss < 0.1 %) | p99 at ~80 % of it (ms) | server CPU s per M pushes | peak RSS per online user (KiB) | leaks | miss rate |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for s in [nearby, baseline] {
        out.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} | {} | {:.4} % |\n",
            s.name,
            s.max_pushes_per_s,
            cell(s.p99_at_80_ms, 1),
            cell(s.cpu_s_per_m_pushes, 1),
            cell(s.rss_kib_per_session, 1),
            s.leaks,
            s.miss_rate * 100.0
        ));
    }
    out.push_str(&format!(
        "| **nearby / baseline** | {} | {} | {} | {} | | |\n",
        ratio(Some(nearby.max_pushes_per_s), Some(baseline.max_pushes_per_s)),
        ratio(nearby.p99_at_80_ms, baseline.p99_at_80_ms),
        ratio(nearby.cpu_s_per_m_pushes, baseline.cpu_s_per_m_pushes),
        ratio(nearby.rss_kib_per_session, baseline.rss_kib_per_session),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step(n: u64, pushes_per_s: f64, p99: f64, miss: f64, cpu: f64) -> Value {
        json!({"step": n, "pushes_per_s": pushes_per_s, "pushes": pushes_per_s * 10.0,
               "latency": {"p99_ms": p99}, "oracle": {"leaks": 0, "miss_rate": miss},
               "server": {"cpu_s": cpu, "peak_rss_kb": 1000.0}, "extra": null})
    }

    #[test]
    fn the_max_is_the_highest_step_within_the_bounds() {
        let report = json!({
            "connect": {"sessions": 10},
            "total": {"leaks": 0, "miss_rate": 0.0},
            "steps": [step(1, 1000.0, 5.0, 0.0, 1.0), step(2, 2000.0, 40.0, 0.0, 2.0),
                      step(3, 3000.0, 150.0, 0.0, 3.0), step(4, 2500.0, 60.0, 0.01, 3.0)]
        });
        let s = summarize("x", &report);
        assert_eq!(s.max_step, Some(2));
        assert_eq!(s.max_pushes_per_s, 2000.0);
        // 80 % of 2000 is 1600: step 1 (1000) and step 2 (2000) are 600 and 400 away.
        assert_eq!(s.p99_at_80_ms, Some(40.0));
        assert_eq!(s.cpu_s_per_m_pushes, Some(2.0 / 20_000.0 * 1e6));
        assert_eq!(s.rss_kib_per_session, Some(100.0));
        let md = markdown(&s, &s);
        assert!(md.contains("| **nearby / baseline** | 1.00 |"), "{md}");
    }
}
