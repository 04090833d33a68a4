//! SVG plots of bench results: latency percentiles against offered rate (a
//! sweep, or any set of runs) and latency over time (one run).

use std::path::Path;

use plotters::prelude::*;

use crate::{BenchError, RunReport};

/// A plotted line: its legend, colour and value per point.
type Line<T> = (&'static str, RGBColor, fn(&T) -> f64);

fn err(path: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Config(format!("plot {}: {e}", path.display()))
}

/// p50 / p99 / p99.9 (log scale, ms) against offered rate, with the budget line.
pub fn rate_svg(path: &Path, runs: &[RunReport], budget_ms: f64) -> Result<(), BenchError> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let xmax = runs.iter().map(|r| r.offered_rps).fold(1.0, f64::max) * 1.05;
    let ymax = runs
        .iter()
        .map(|r| r.latency_ms.p999)
        .fold(budget_ms, f64::max)
        * 1.5;
    let ymin = runs
        .iter()
        .map(|r| r.latency_ms.p50)
        .fold(f64::INFINITY, f64::min)
        .clamp(0.01, 1.0)
        * 0.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency (from intended send) vs offered rate",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, (ymin..ymax).log_scale())
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("offered requests/s")
        .y_desc("ms")
        .draw()
        .map_err(|e| err(path, e))?;
    let series: [Line<RunReport>; 3] = [
        ("p50", BLUE, |r| r.latency_ms.p50),
        ("p99", RED, |r| r.latency_ms.p99),
        ("p99.9", MAGENTA, |r| r.latency_ms.p999),
    ];
    for (name, color, f) in series {
        let pts: Vec<(f64, f64)> = runs
            .iter()
            .map(|r| (r.offered_rps, f(r).max(ymin)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(path, e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(path, e))?;
    }
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, budget_ms), (xmax, budget_ms)],
            BLACK.stroke_width(1),
        ))
        .map_err(|e| err(path, e))?
        .label(format!("budget {budget_ms} ms"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// Per-second p50 / p99 / max (ms) over one run.
pub fn timeline_svg(path: &Path, run: &RunReport) -> Result<(), BenchError> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let n = run.timeline.len().max(1) as f64;
    let ymax = run.timeline.iter().map(|s| s.max_ms).fold(1.0, f64::max) * 1.5;
    let ymin = run
        .timeline
        .iter()
        .map(|s| s.p50_ms)
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min)
        .clamp(0.01, 1.0)
        * 0.5;
    let mode = match run.config.concurrency {
        Some(c) => format!("closed loop, {c} callers, {:.0} rps", run.achieved_rps),
        None => format!("{:.0} rps offered", run.offered_rps),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{:?}, {mode}: latency per second", run.config.rpc),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, (ymin..ymax).log_scale())
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("second of the measured run")
        .y_desc("ms")
        .draw()
        .map_err(|e| err(path, e))?;
    let series: [Line<crate::Second>; 3] = [
        ("p50", BLUE, |s| s.p50_ms),
        ("p99", RED, |s| s.p99_ms),
        ("max", MAGENTA, |s| s.max_ms),
    ];
    for (name, color, f) in series {
        chart
            .draw_series(LineSeries::new(
                run.timeline
                    .iter()
                    .map(|s| (s.t as f64 + 0.5, f(s).max(ymin))),
                color.stroke_width(2),
            ))
            .map_err(|e| err(path, e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}
