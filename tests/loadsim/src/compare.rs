//! Comparing two runs of the same load (nearby and the baseline) from their reports: each
//! system's highest step that stays within the latency and correctness bounds, and the ratios.
//!
//! Pure: takes the reports, returns the summary and its markdown. The bounds are the issue's —
//! p99 update→push latency under 100 ms, miss rate under 0.1 %, no leak — plus one the issue
//! leaves implicit: under 0.1 % of updates refused (load shedding or timeouts), so that a system
//! cannot look fast by declining its load.

use crate::report::{Report, StepReport};

/// p99 bound for a step to count, milliseconds.
pub const P99_BOUND_MS: f64 = 100.0;
/// Miss-rate bound for a step to count.
pub const MISS_BOUND: f64 = 0.001;
/// Bound on the share of refused updates for a step to count.
pub const REFUSED_BOUND: f64 = 0.001;
/// At this share of its CPUs or more at the first step past the bounds, the load generator may
/// have been the limit itself: a process that busy queues its own work (at 80 % a single queue
/// waits ~4× its service time), the clients' queues then count in the latency, and the system's
/// max is only a lower bound.
pub const GENERATOR_BUSY_BOUND: f64 = 0.8;

/// The first step past a system's max that broke the bounds: where the ramp found its knee.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Knee {
    /// The step, 1-based.
    pub step: usize,
    /// Updates/s asked for in it.
    pub target_rate: f64,
    /// The load generator's CPU use in it, as a share of the CPUs it could use (`None` when the
    /// report does not say).
    pub generator_busy: Option<f64>,
}

/// One system's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// The system's name.
    pub name: String,
    /// Highest delivered pushes/s of a step within the bounds (0 if none).
    pub max_pushes_per_s: f64,
    /// The step (1-based) that reached it.
    pub max_step: Option<usize>,
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
    /// Where the ramp broke the bounds (`None`: no step past the max did, so the ramp ended
    /// before the knee).
    pub knee: Option<Knee>,
}

/// Whether a step held every bound.
pub fn within_bounds(s: &StepReport) -> bool {
    s.latency.p99_ms < P99_BOUND_MS
        && s.oracle.miss_rate < MISS_BOUND
        && s.oracle.leaks == 0
        && s.refused_share() < REFUSED_BOUND
}

/// Summarises one report.
pub fn summarize(name: &str, report: &Report) -> Summary {
    let best = report
        .steps
        .iter()
        .filter(|s| within_bounds(s))
        .max_by(|a, b| a.pushes_per_s.total_cmp(&b.pushes_per_s));
    let max = best.map_or(0.0, |s| s.pushes_per_s);
    // Among the steps within the bounds: past its knee a system may collapse to a few pushes/s
    // with a p99 of seconds, which is not "80 % of its max".
    let at80 = best.and_then(|_| {
        report
            .steps
            .iter()
            .filter(|s| within_bounds(s) && s.pushes_per_s <= max)
            .min_by(|a, b| {
                (a.pushes_per_s - 0.8 * max)
                    .abs()
                    .total_cmp(&(b.pushes_per_s - 0.8 * max).abs())
            })
    });
    let sessions = report.connect.sessions as f64;
    let knee = report
        .steps
        .iter()
        .skip_while(|s| best.is_some_and(|b| s.step <= b.step))
        .find(|s| !within_bounds(s))
        .map(|s| Knee {
            step: s.step,
            target_rate: s.target_rate,
            generator_busy: report.generator_cpus.and_then(|cpus| s.generator_busy(cpus)),
        });
    Summary {
        name: name.to_string(),
        max_pushes_per_s: max,
        max_step: best.map(|s| s.step),
        p99_at_80_ms: at80.map(|s| s.latency.p99_ms),
        cpu_s_per_m_pushes: best.and_then(StepReport::cpu_s_per_m_pushes),
        rss_kib_per_session: best
            .filter(|_| sessions > 0.0)
            .map(|s| s.peak_rss_kb() as f64 / sessions),
        leaks: report.total.leaks,
        miss_rate: report.total.miss_rate,
        knee,
    }
}

/// What bounded a system's ramp, for the reader of its max: the system, the load generator, or
/// the ramp's end.
pub fn knee_line(s: &Summary) -> String {
    match s.knee {
        None => format!(
            "{}: no step past its max broke the bounds: the ramp ended before the knee, and the max is a lower bound",
            s.name
        ),
        Some(Knee {
            target_rate,
            generator_busy: Some(busy),
            ..
        }) => format!(
            "{}: at the first step past the bounds ({target_rate:.0} updates/s) the load generator used {:.0} % of its CPUs: {}",
            s.name,
            busy * 100.0,
            if busy >= GENERATOR_BUSY_BOUND {
                "the knee may be the generator's, and the max is a lower bound"
            } else {
                "the knee is the system's"
            }
        ),
        Some(Knee { target_rate, .. }) => format!(
            "{}: first step past the bounds at {target_rate:.0} updates/s (the load generator's CPU was not recorded)",
            s.name
        ),
    }
}

/// `v` with `digits` decimals, or "–" when there is none.
pub(crate) fn cell(v: Option<f64>, digits: usize) -> String {
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
        "| system | max pushes/s (p99 < 100 ms, miss < 0.1 %, refused < 0.1 %) | p99 at ~80 % of it (ms) | server CPU s per M pushes | peak RSS per online user (KiB) | leaks | miss rate |\n",
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
    out.push('\n');
    for s in [nearby, baseline] {
        out.push_str(&format!("- {}.\n", knee_line(s)));
    }
    out
}

/// One step both systems ran at the same rate and both held within the bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EqualLoad {
    /// Updates/s asked of both.
    pub rate: f64,
    /// nearby's server CPU µs per push.
    pub nearby_us: f64,
    /// The baseline's, Redis counted.
    pub baseline_us: f64,
    /// nearby / baseline.
    pub ratio: f64,
    /// The same ratio with each system's CPU per push divided by its load generator's in the
    /// same step (`None` when a report has no generator reading). The systems run one after the
    /// other, and this shared machine's speed drifts between them by more than most changes
    /// (±15 %); the generator does the same work per push for either system, so its own cost
    /// per push is the machine's speed as that step saw it. A cross-check of `ratio`, not a
    /// replacement: the generator's cost also moves a little with how the server batches its
    /// packets.
    pub per_generator: Option<f64>,
}

/// The median of `values` (`None` when empty).
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let k = values.len();
    match k {
        0 => None,
        k if k % 2 == 1 => Some(values[k / 2]),
        k => Some((values[k / 2 - 1] + values[k / 2]) / 2.0),
    }
}

/// The load generator's CPU µs per delivered push in `s`.
fn generator_us(s: &StepReport) -> Option<f64> {
    s.loadsim.and_then(|u| u.cpu_us_per_push).filter(|us| *us > 0.0)
}

/// Server CPU per delivered push of `nearby` over `baseline`'s (Redis counted) at equal load:
/// the steps both ran at the same target rate and both held within the bounds, one ratio each,
/// and their median (`None` when no step qualifies). The medians of both ratios are in
/// [`EqualLoadMedians`].
pub fn equal_load_ratios(nearby: &Report, baseline: &Report) -> (Vec<EqualLoad>, EqualLoadMedians) {
    let mut rows = Vec::new();
    for n in nearby.steps.iter().filter(|s| within_bounds(s)) {
        let b = baseline
            .steps
            .iter()
            .find(|b| (b.target_rate - n.target_rate).abs() < 1e-9 && within_bounds(b));
        let (Some(nc), Some(bc)) = (n.cpu_s_per_m_pushes(), b.and_then(StepReport::cpu_s_per_m_pushes))
        else {
            continue;
        };
        if bc > 0.0 {
            let per_generator = match (generator_us(n), b.and_then(generator_us)) {
                (Some(ng), Some(bg)) => Some((nc / ng) / (bc / bg)),
                _ => None,
            };
            rows.push(EqualLoad {
                rate: n.target_rate,
                nearby_us: nc,
                baseline_us: bc,
                ratio: nc / bc,
                per_generator,
            });
        }
    }
    let medians = EqualLoadMedians {
        ratio: median(rows.iter().map(|r| r.ratio).collect()),
        per_generator: median(rows.iter().filter_map(|r| r.per_generator).collect()),
    };
    (rows, medians)
}

/// The medians of [`EqualLoad`]'s two ratios over the steps compared.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EqualLoadMedians {
    /// nearby / baseline.
    pub ratio: Option<f64>,
    /// The same, each system's CPU per push divided by its load generator's.
    pub per_generator: Option<f64>,
}

/// [`equal_load_ratios`] as a markdown table.
pub fn equal_load_markdown(nearby: &Report, baseline: &Report) -> String {
    let (rows, medians) = equal_load_ratios(nearby, baseline);
    let mut out = String::from(
        "| updates/s (both within bounds) | nearby µs/push | baseline µs/push (Redis counted) | nearby / baseline | the same, each over its load generator's µs/push |\n|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        out.push_str(&format!(
            "| {:.0} | {:.1} | {:.1} | {:.2} | {} |\n",
            r.rate,
            r.nearby_us,
            r.baseline_us,
            r.ratio,
            cell(r.per_generator, 2)
        ));
    }
    out.push_str(&format!(
        "| **median** | | | **{}** | {} |\n",
        cell(medians.ratio, 2),
        cell(medians.per_generator, 2)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ProcUsage;
    use crate::report::fixtures::{report, step};
    use crate::report::StepReport;

    #[test]
    fn the_max_is_the_highest_step_within_the_bounds() {
        let mut steps = vec![
            step(1, 1000.0, 1.0, 5.0, 0.0, 1.0),
            step(2, 2000.0, 1.0, 40.0, 0.0, 2.0),
            step(3, 3000.0, 1.0, 150.0, 0.0, 3.0),
            step(4, 2500.0, 1.0, 60.0, 0.01, 3.0),
            step(5, 2600.0, 1.0, 20.0, 0.0, 3.0),
        ];
        // Step 5 looks fast only because it refused 10 % of its updates.
        let refused = steps[4].updates / 10;
        steps[4].errors.insert("rate_limited".into(), refused);
        let s = summarize("x", &report(steps));
        assert_eq!(s.max_step, Some(2));
        assert_eq!(s.max_pushes_per_s, 2000.0);
        // 80 % of 2000 is 1600: step 1 (1000) and step 2 (2000) are 600 and 400 away.
        assert_eq!(s.p99_at_80_ms, Some(40.0));
        assert_eq!(s.cpu_s_per_m_pushes, Some(2.0 / 20_000.0 * 1e6));
        // The fixture's server peaks at 1000 KiB over 10 sessions.
        assert_eq!(s.rss_kib_per_session, Some(100.0));
        let md = markdown(&s, &s);
        assert!(md.contains("| **nearby / baseline** | 1.00 |"), "{md}");
    }

    /// `s` with the load generator at `busy` of its one CPU.
    fn generator_at(mut s: StepReport, busy: f64) -> StepReport {
        s.loadsim = s.server.map(|u| ProcUsage { cores: busy, ..u });
        s
    }

    #[test]
    fn the_knee_says_whether_the_load_generator_was_the_limit() {
        let ramp = |busy_at_knee| {
            report(vec![
                generator_at(step(1, 1000.0, 1.0, 5.0, 0.0, 1.0), 0.3),
                generator_at(step(2, 2000.0, 1.0, 40.0, 0.0, 2.0), 0.6),
                generator_at(step(3, 3000.0, 1.0, 150.0, 0.0, 3.0), busy_at_knee),
                generator_at(step(4, 3100.0, 1.0, 900.0, 0.0, 3.0), 0.99),
            ])
        };
        // The generator had room at the first step past the bounds: the knee is the server's.
        let s = summarize("x", &ramp(0.5));
        assert_eq!(s.knee.map(|k| k.step), Some(3));
        // A step past the knee that collapsed to 80 % of the max is not the max's 80 %.
        let mut collapsed = ramp(0.5);
        collapsed.steps.push(step(5, 1600.0, 1.0, 30_000.0, 0.3, 3.0));
        assert_eq!(summarize("x", &collapsed).p99_at_80_ms, Some(40.0));
        assert!(
            knee_line(&s).contains("the knee is the system's"),
            "{}",
            knee_line(&s)
        );
        // It was saturated there: the max is only a lower bound.
        let s = summarize("x", &ramp(0.95));
        assert!(
            knee_line(&s).contains("may be the generator's"),
            "{}",
            knee_line(&s)
        );
        assert!(markdown(&s, &s).contains("- x: at the first step past the bounds (120 updates/s)"));
        // With two CPUs the same CPU time is half as busy.
        let mut two = ramp(0.96);
        two.generator_cpus = Some(2);
        assert!(knee_line(&summarize("x", &two)).contains("48 %"));
        // A ramp that never broke the bounds past its max says so (`tests/bench/compare.sh`
        // reads this phrase to run such a system again on a longer ramp).
        let held = report(vec![
            step(1, 1000.0, 1.0, 5.0, 0.0, 1.0),
            step(2, 2000.0, 1.0, 9.0, 0.0, 2.0),
        ]);
        let s = summarize("x", &held);
        assert_eq!(s.knee, None);
        assert!(knee_line(&s).contains("the ramp ended before the knee"));
        // An older report without the generator's CPUs says it was not recorded.
        let mut old = ramp(0.95);
        old.generator_cpus = None;
        assert!(knee_line(&summarize("x", &old)).contains("not recorded"));
    }

    #[test]
    fn equal_load_compares_only_steps_both_held_and_takes_the_median() {
        let nearby = report(vec![
            step(1, 1000.0, 1.0, 5.0, 0.0, 1.0),
            step(2, 2000.0, 1.0, 10.0, 0.0, 1.5),
            step(3, 3000.0, 1.0, 20.0, 0.0, 2.0),
        ]);
        let baseline = report(vec![
            step(1, 1000.0, 1.0, 5.0, 0.0, 2.0),
            step(2, 2000.0, 1.0, 10.0, 0.0, 2.0),
            // Past its knee: not compared.
            step(3, 3000.0, 1.0, 500.0, 0.0, 2.0),
        ]);
        let (rows, medians) = equal_load_ratios(&nearby, &baseline);
        assert_eq!(rows.len(), 2);
        assert!(
            (rows[0].ratio - 0.5).abs() < 1e-9 && (rows[1].ratio - 0.75).abs() < 1e-9,
            "{rows:?}"
        );
        assert!((medians.ratio.expect("median") - 0.625).abs() < 1e-9);
        // No generator readings: no normalised ratio, and the table says so.
        assert_eq!(medians.per_generator, None);
        let table = equal_load_markdown(&nearby, &baseline);
        assert!(
            table.contains("**0.62**") || table.contains("**0.63**"),
            "{table}"
        );
        assert!(table.contains("| – |"), "{table}");
    }

    /// `s` with the load generator's CPU per push at `us`.
    fn generator_cost(mut s: StepReport, us: f64) -> StepReport {
        s.loadsim = Some(ProcUsage {
            cpu_s: 1.0,
            cores: 0.1,
            cpu_us_per_push: Some(us),
            rss_kb: 1,
            peak_rss_kb: 1,
        });
        s
    }

    #[test]
    fn equal_load_divides_each_system_by_its_generator_when_the_machine_drifts() {
        // The same server cost per push relative to the machine, but the machine ran 1.5x
        // slower while nearby's step ran: the raw ratio says 0.75, the normalised one 0.5.
        let nearby = report(vec![generator_cost(step(1, 1000.0, 1.0, 5.0, 0.0, 1.5), 15.0)]);
        let baseline = report(vec![generator_cost(step(1, 1000.0, 1.0, 5.0, 0.0, 2.0), 10.0)]);
        let (rows, medians) = equal_load_ratios(&nearby, &baseline);
        assert_eq!(rows.len(), 1);
        assert!((rows[0].ratio - 0.75).abs() < 1e-9, "{rows:?}");
        let normalised = rows[0].per_generator.expect("both have a generator reading");
        assert!((normalised - 0.5).abs() < 1e-9, "{rows:?}");
        assert_eq!(medians.per_generator, Some(normalised));
        let table = equal_load_markdown(&nearby, &baseline);
        assert!(table.contains("| 0.75 | 0.50 |"), "{table}");
    }
}
