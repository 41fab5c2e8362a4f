//! Plots of runs against each other, as SVG: what the comparison table in `docs/benchmarks.md`
//! sums up in one number per system, drawn over every load step so the knee and what happens
//! past it are visible.
//!
//! - [`LATENCY_SVG`]: update → push latency against delivered pushes/s, p99 solid and p50 dashed,
//!   one colour per system, on a log scale (latency spans 1 ms to seconds past the knee), with
//!   the 100 ms p99 bound drawn across.
//! - [`CPU_SVG`]: the system's CPU seconds per million delivered pushes against delivered
//!   pushes/s — the server plus, for the baseline, Redis (see [`StepReport::system_cpu_s`]).
//!
//! A step that broke correctness (any leak, or misses at or above [`MISS_BOUND`]) is drawn as a
//! cross instead of a dot, so a point that looks fast but lost or leaked events cannot pass for a
//! good one.
//!
//! This module reads the reports and writes the files; the drawing itself goes to a string, so
//! tests need no file system beyond a temporary directory. Text is left to the SVG viewer's
//! fonts (no font files, no system font library).

use std::error::Error as StdError;
use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::ceiling::CeilingReport;
use crate::compare::{MISS_BOUND, P99_BOUND_MS, REFUSED_BOUND};
use crate::report::{Report, StepReport};

/// File name of the latency plot in the output directory.
pub const LATENCY_SVG: &str = "latency.svg";
/// File name of the CPU plot in the output directory.
pub const CPU_SVG: &str = "cpu.svg";

/// Size of each plot, pixels.
const SIZE: (u32, u32) = (900, 560);
const FONT: &str = "sans-serif";
/// One colour per system, in the order given (colour-blind-safe blue, orange, green, purple).
const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(230, 120, 0),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];
const BOUND_COLOR: RGBColor = RGBColor(200, 30, 30);

/// Why plotting failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    /// A report file could not be read.
    #[error("cannot read report {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A report file is not a `nearby-loadsim run --json-out` report.
    #[error("{} is not a loadsim report", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// Nothing to plot.
    #[error("no report to plot")]
    NoReports,
    /// The plotting library failed to draw.
    #[error("cannot draw {plot}")]
    Draw {
        /// Which plot.
        plot: &'static str,
        /// Why.
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The output directory or a plot file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Reads a report written by `nearby-loadsim run --json-out`.
pub fn read_report(path: &Path) -> Result<Report, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| PlotError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Draws both plots of `reports` (each with the name its lines are labelled with) into
/// `out_dir`, created if missing, and returns the files written: [`LATENCY_SVG`], [`CPU_SVG`].
/// With `ceiling`, the CPU plot also draws the bare quinn push path's CPU per push
/// ([`crate::ceiling`]) as the reference the systems' lines are read against.
pub fn write_plots(
    reports: &[(String, Report)],
    ceiling: Option<&CeilingReport>,
    out_dir: &Path,
) -> Result<Vec<PathBuf>, PlotError> {
    if reports.is_empty() {
        return Err(PlotError::NoReports);
    }
    std::fs::create_dir_all(out_dir).map_err(|source| PlotError::Write {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let plots = [
        (LATENCY_SVG, latency_svg(reports)?),
        (CPU_SVG, cpu_svg(reports, ceiling)?),
    ];
    let mut written = Vec::with_capacity(plots.len());
    for (name, svg) in plots {
        let path = out_dir.join(name);
        std::fs::write(&path, svg).map_err(|source| PlotError::Write {
            path: path.clone(),
            source,
        })?;
        tracing::info!(path = %path.display(), "wrote plot");
        written.push(path);
    }
    Ok(written)
}

/// The latency plot ([`LATENCY_SVG`]) as an SVG document.
pub fn latency_svg(reports: &[(String, Report)]) -> Result<String, PlotError> {
    render(LATENCY_SVG, |root| draw_latency(root, reports))
}

/// The CPU plot ([`CPU_SVG`]) as an SVG document.
pub fn cpu_svg(reports: &[(String, Report)], ceiling: Option<&CeilingReport>) -> Result<String, PlotError> {
    render(CPU_SVG, |root| draw_cpu(root, reports, ceiling))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// Runs `draw` on a white SVG canvas and returns the document.
fn render(plot: &'static str, draw: impl FnOnce(&Area<'_>) -> DrawResult) -> Result<String, PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present())
            .map_err(|e| PlotError::Draw {
                plot,
                source: Box::new(e),
            })?;
    }
    Ok(svg)
}

/// Whether a step broke a bound other than latency: any leak, misses or refused updates at or
/// above their bounds.
fn broke_correctness(step: &StepReport) -> bool {
    step.oracle.leaks > 0 || step.oracle.miss_rate >= MISS_BOUND || step.refused_share() >= REFUSED_BOUND
}

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// `(pushes/s, y, broke correctness)` of each step where `y` has a value.
fn points(report: &Report, y: impl Fn(&StepReport) -> Option<f64>) -> Vec<(f64, f64, bool)> {
    report
        .steps
        .iter()
        .filter_map(|s| Some((s.pushes_per_s, y(s)?, broke_correctness(s))))
        .collect()
}

/// 0 to a little past the highest delivered load of any report.
fn x_range(reports: &[(String, Report)]) -> Range<f64> {
    let max = reports
        .iter()
        .flat_map(|(_, r)| r.steps.iter().map(|s| s.pushes_per_s))
        .fold(0.0, f64::max);
    0.0..if max > 0.0 { max * 1.05 } else { 1.0 }
}

/// `12000` → `12k`, `2500` → `2.5k`.
fn thousands(x: &f64) -> String {
    let k = x / 1000.0;
    if x.abs() < 1000.0 {
        format!("{x:.0}")
    } else if (k - k.round()).abs() < 1e-6 {
        format!("{k:.0}k")
    } else {
        format!("{k:.1}k")
    }
}

fn ms(y: &f64) -> String {
    if *y >= 1.0 {
        format!("{y:.0}")
    } else {
        format!("{y:.1}")
    }
}

/// Dots for the steps that kept correctness, crosses (in the same colour) for those that broke it.
fn draw_markers<DB: DrawingBackend, X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<X, Y>>,
    pts: &[(f64, f64, bool)],
    c: RGBColor,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart.draw_series(
        pts.iter()
            .filter(|p| !p.2)
            .map(|&(x, y, _)| Circle::new((x, y), 3, c.filled())),
    )?;
    chart.draw_series(
        pts.iter()
            .filter(|p| p.2)
            .map(|&(x, y, _)| Cross::new((x, y), 6, c.stroke_width(2))),
    )?;
    Ok(())
}

/// Adds the legend entry for the crosses, if any step broke correctness.
fn label_crosses<DB: DrawingBackend, X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<X, Y>>,
    reports: &[(String, Report)],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    if reports.iter().any(|(_, r)| r.steps.iter().any(broke_correctness)) {
        let label = format!(
            "step with leaks, ≥ {:.1} % misses or ≥ {:.1} % refused updates",
            MISS_BOUND * 100.0,
            REFUSED_BOUND * 100.0
        );
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
            .label(label)
            .legend(|(x, y)| Cross::new((x + 10, y), 5, BLACK.stroke_width(2)));
    }
    Ok(())
}

fn draw_latency(root: &Area<'_>, reports: &[(String, Report)]) -> DrawResult {
    let series: Vec<_> = reports
        .iter()
        .map(|(name, r)| {
            // A step without a delivered update has no latency; 0 has no place on a log axis.
            let at = |pick: fn(&StepReport) -> f64| {
                points(r, move |s| {
                    (s.latency.count > 0 && pick(s) > 0.0).then(|| pick(s))
                })
            };
            (name, at(|s| s.latency.p99_ms), at(|s| s.latency.p50_ms))
        })
        .collect();
    let ys = series
        .iter()
        .flat_map(|(_, p99, p50)| p99.iter().chain(p50).map(|p| p.1))
        .chain([P99_BOUND_MS]);
    let (lo, hi) = ys.fold((f64::INFINITY, 0.0_f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let x = x_range(reports);
    let x_max = x.end;

    let mut chart = ChartBuilder::on(root)
        .caption(
            "Update → push latency against load (p99 solid, p50 dashed)",
            (FONT, 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x, (lo / 1.5..hi * 1.5).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("delivered pushes/s")
        .y_desc("update → push latency, ms (log scale)")
        .x_label_formatter(&thousands)
        .y_label_formatter(&ms)
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .light_line_style(BLACK.mix(0.04))
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;

    let bound = BOUND_COLOR.stroke_width(1);
    chart.draw_series(DashedLineSeries::new(
        [(0.0, P99_BOUND_MS), (x_max, P99_BOUND_MS)],
        10,
        5,
        bound,
    ))?;
    // On the left, where every system is still far below the bound and no line crosses it.
    chart.draw_series(std::iter::once(Text::new(
        format!("p99 bound: {P99_BOUND_MS} ms"),
        (x_max * 0.01, P99_BOUND_MS * 1.1),
        (FONT, 14)
            .into_font()
            .color(&BOUND_COLOR)
            .pos(Pos::new(HPos::Left, VPos::Bottom)),
    )))?;

    for (i, (name, p99, p50)) in series.iter().enumerate() {
        let c = color(i);
        let line = |p: &[(f64, f64, bool)]| p.iter().map(|&(x, y, _)| (x, y)).collect::<Vec<_>>();
        chart
            .draw_series(LineSeries::new(line(p99), c.stroke_width(2)))?
            .label(format!("{name} p99"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(DashedLineSeries::new(line(p50), 6, 4, c.stroke_width(2)))?
            .label(format!("{name} p50"))
            .legend(move |(x, y)| DashedPathElement::new([(x, y), (x + 20, y)], 6, 4, c.stroke_width(2)));
        draw_markers(&mut chart, p99, c)?;
        draw_markers(&mut chart, p50, c)?;
    }
    label_crosses(&mut chart, reports)?;
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

fn draw_cpu(root: &Area<'_>, reports: &[(String, Report)], ceiling: Option<&CeilingReport>) -> DrawResult {
    let series: Vec<_> = reports
        .iter()
        .map(|(name, r)| (name, points(r, StepReport::cpu_s_per_m_pushes)))
        .collect();
    // The bare push path: µs per push is CPU seconds per million pushes.
    let bare: Vec<(f64, f64, bool)> = ceiling
        .map(|c| {
            c.steps
                .iter()
                .filter_map(|s| Some((s.pushes_per_s, s.server.cpu_us_per_push?, !s.within_bounds())))
                .collect()
        })
        .unwrap_or_default();
    let hi = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .chain(bare.iter())
        .map(|p| p.1)
        .fold(0.0, f64::max);
    let mut x = x_range(reports);
    x.end = bare.iter().map(|p| p.0 * 1.05).fold(x.end, f64::max);
    let mut chart = ChartBuilder::on(root)
        .caption("System CPU per million delivered pushes against load", (FONT, 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x, 0.0..if hi > 0.0 { hi * 1.25 } else { 1.0 })?;
    chart
        .configure_mesh()
        .x_desc("delivered pushes/s")
        .y_desc("CPU s per million pushes (server + Redis for the baseline)")
        .x_label_formatter(&thousands)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .light_line_style(BLACK.mix(0.04))
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|&(x, y, _)| (x, y)),
                c.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        draw_markers(&mut chart, pts, c)?;
    }
    if !bare.is_empty() {
        let grey = RGBColor(110, 110, 110);
        chart
            .draw_series(DashedLineSeries::new(
                bare.iter().map(|&(x, y, _)| (x, y)),
                6,
                4,
                grey.stroke_width(2),
            ))?
            .label("bare quinn push, no logic (ceiling)")
            .legend(move |(x, y)| DashedPathElement::new([(x, y), (x + 20, y)], 6, 4, grey.stroke_width(2)));
        draw_markers(&mut chart, &bare, grey)?;
    }
    label_crosses(&mut chart, reports)?;
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// The legend box, in the same style on both plots.
fn draw_legend<'a, DB: DrawingBackend + 'a, X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    at: SeriesLabelPosition,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(at)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ProcUsage;
    use crate::report::fixtures::{report, step};

    fn two_systems() -> Vec<(String, Report)> {
        let mut baseline = report(vec![
            step(1, 1000.0, 1.0, 4.0, 0.0, 0.05),
            step(2, 2000.0, 1.5, 30.0, 0.0, 0.1),
            step(3, 2900.0, 40.0, 900.0, 0.02, 0.16),
        ]);
        baseline.steps[0].extra = Some(ProcUsage {
            cpu_s: 0.01,
            ..ProcUsage::default()
        });
        vec![
            (
                "nearby".to_string(),
                report(vec![
                    step(1, 1000.0, 0.9, 3.0, 0.0, 0.04),
                    step(2, 2000.0, 1.1, 12.0, 0.0, 0.08),
                    step(3, 3000.0, 3.0, 150.0, 0.0, 0.12),
                ]),
            ),
            ("baseline (Redis)".to_string(), baseline),
        ]
    }

    /// `<polyline>` elements drawn in `c`.
    fn polylines(svg: &str, c: RGBColor) -> usize {
        let hex = format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2);
        svg.lines()
            .filter(|l| l.contains("<polyline") && l.contains(&hex))
            .count()
    }

    #[test]
    fn both_plots_are_written_with_a_labelled_line_per_system() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("plots");
        let written = write_plots(&two_systems(), None, &out).expect("plots");
        assert_eq!(written, vec![out.join(LATENCY_SVG), out.join(CPU_SVG)]);
        for path in &written {
            let svg = std::fs::read_to_string(path).expect("plot file");
            assert!(svg.contains("<svg"), "{}", path.display());
            assert!(svg.contains("nearby"), "{}", path.display());
            assert!(svg.contains("baseline (Redis)"), "{}", path.display());
            assert!(svg.contains("delivered pushes/s"), "{}", path.display());
            // The third step of the baseline missed 2 %: it is marked, and the legend says so.
            assert!(svg.contains("misses"), "{}", path.display());
            for i in 0..2 {
                assert!(polylines(&svg, color(i)) >= 1, "system {i} in {}", path.display());
            }
        }
        let latency = std::fs::read_to_string(&written[0]).expect("latency plot");
        assert!(latency.contains("nearby p99") && latency.contains("nearby p50"));
        assert!(latency.contains("p99 bound: 100 ms"));
        // p99 solid (one polyline) and p50 dashed (one polyline per dash), plus the legend's.
        for i in 0..2 {
            assert!(polylines(&latency, color(i)) >= 4, "system {i}");
        }
    }

    #[test]
    fn the_cpu_plot_draws_the_bare_push_path_when_given() {
        use crate::ceiling::fixtures::{report, step};
        let ceiling = report(vec![step(1000.0, 3.0), step(4000.0, 2.0)]);
        let without = cpu_svg(&two_systems(), None).expect("plot");
        let with = cpu_svg(&two_systems(), Some(&ceiling)).expect("plot");
        assert!(!without.contains("bare quinn push"));
        assert!(with.contains("bare quinn push"));
        // Its steps reach past the systems' (4,000 against 3,000 pushes/s): the axis follows.
        assert!(with.contains("4k") && !without.contains("4k"), "x axis: {with}");
    }

    #[test]
    fn cpu_per_push_counts_the_extra_process() {
        let systems = two_systems();
        let s = &systems[1].1.steps[0];
        // (0.05 + 0.01) CPU s over 10,000 pushes.
        let per_m = s.cpu_s_per_m_pushes().expect("pushes");
        assert!((per_m - 6.0).abs() < 1e-9, "{per_m}");
    }

    #[test]
    fn a_report_reads_back_from_its_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.json");
        let (_, r) = &two_systems()[1];
        std::fs::write(&path, serde_json::to_string_pretty(r).expect("json")).expect("write");
        assert_eq!(&read_report(&path).expect("report"), r);
        std::fs::write(&path, "{}").expect("write");
        assert!(matches!(read_report(&path), Err(PlotError::Parse { .. })));
        assert!(matches!(
            read_report(&dir.path().join("missing.json")),
            Err(PlotError::Read { .. })
        ));
    }

    #[test]
    fn nothing_to_plot_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            write_plots(&[], None, dir.path()),
            Err(PlotError::NoReports)
        ));
    }
}
