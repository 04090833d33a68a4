//! Loss curves as SVG: training loss and the validation metric per epoch.

use std::path::Path;

use plotters::prelude::*;

use crate::train::Curve;
use crate::TrainError;

fn series_range(xs: &[f64]) -> (f64, f64) {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

/// One SVG with a row per curve: loss on the left, validation metric on the right.
pub fn write_curves(path: &Path, curves: &[Curve]) -> Result<(), TrainError> {
    let err = |e: String| TrainError::Invalid(format!("plot {}: {e}", path.display()));
    let root = SVGBackend::new(path, (960, 300 * curves.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let rows = root.split_evenly((curves.len().max(1), 2));
    for (r, c) in curves.iter().enumerate() {
        for (col, (ys, label)) in [
            (&c.train_loss, "train loss".to_string()),
            (&c.valid_metric, c.valid_metric_name.clone()),
        ]
        .into_iter()
        .enumerate()
        {
            let area = &rows[r * 2 + col];
            let (lo, hi) = series_range(ys);
            let mut chart = ChartBuilder::on(area)
                .caption(format!("{}: {label}", c.model), ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d(0f64..(ys.len().max(2) - 1) as f64, lo..hi)
                .map_err(|e| err(e.to_string()))?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .draw()
                .map_err(|e| err(e.to_string()))?;
            chart
                .draw_series(LineSeries::new(
                    ys.iter().enumerate().map(|(i, y)| (i as f64, *y)),
                    &BLUE,
                ))
                .map_err(|e| err(e.to_string()))?;
        }
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
