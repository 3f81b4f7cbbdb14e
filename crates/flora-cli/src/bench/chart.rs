//! SVG chart of `flora bench layers`: ratio to base vs rank, one panel per (d, shape).

use super::layers::{Method, Row};
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

const COLORS: [RGBColor; 8] = [
    RGBColor(0, 0, 0),
    RGBColor(230, 97, 0),
    RGBColor(93, 58, 155),
    RGBColor(26, 133, 255),
    RGBColor(0, 158, 115),
    RGBColor(212, 17, 89),
    RGBColor(120, 120, 120),
    RGBColor(180, 180, 60),
];

/// Writes an SVG with one panel per (d, b, l): ratio_to_base (log scale) vs rank, a line per method,
/// for adapters assigned with `pattern`.
pub fn ratio_vs_rank(path: &Path, rows: &[Row], pattern: &str) -> Result<()> {
    let mut shapes: Vec<(usize, usize, usize)> = rows.iter().map(|r| (r.d, r.b, r.l)).collect();
    shapes.dedup();
    let cols = 2;
    let n_rows = shapes.len().div_ceil(cols);
    let root = SVGBackend::new(path, (1000, 360 * n_rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((n_rows, cols));
    for (panel, &(d, b, l)) in panels.iter().zip(&shapes) {
        let sel: Vec<&Row> = rows.iter().filter(|r| r.d == d && r.b == b && r.l == l && r.pattern.name() == pattern).collect();
        let max_r = sel.iter().map(|r| r.r).max().unwrap_or(1).max(2) as f64;
        let (lo, hi) = sel.iter().fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(r.ratio_to_base), hi.max(r.ratio_to_base)));
        let title = format!("d={d}, {} (b={b}, l={l}), {pattern} adapters", if l == 1 { "decode" } else { "prefill" });
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d((1f64..max_r).log_scale(), ((lo * 0.8).max(0.05)..hi * 1.25).log_scale())
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("rank")
            .y_desc("time / base")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.2}"))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, m) in Method::ALL.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let mut pts: Vec<(f64, f64)> = sel.iter().filter(|r| r.method == *m).map(|r| (r.r.max(1) as f64, r.ratio_to_base)).collect();
            if pts.len() == 1 {
                // rank-independent methods: draw flat across the ranks
                pts.push((max_r, pts[0].1));
            }
            if pts.is_empty() {
                continue;
            }
            pts.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label(m.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
