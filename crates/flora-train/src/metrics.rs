//! The metrics log (`metrics.jsonl`: one JSON object per train step and per evaluation) and the
//! loss-curve chart (`loss.svg`) drawn from it.
//!
//! ```text
//! {"type":"train","step":3,"loss":2.71,"lr_scale":0.6,"tokens":512,"targets":300,"tok_per_s":812.5,
//!  "elapsed_s":1.9,"adapters":{"sql":2.5,"poems":2.9},"grad_norm":{"sql":0.8,"poems":1.3}}
//! {"type":"eval","step":3,"adapters":{"sql":{"loss":2.6,"ppl":13.5,"targets":120}}}
//! ```

use crate::error::{io_err, Result};
use crate::trainer::{EvalStats, StepStats};
use plotters::prelude::*;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path` for appending, first dropping every record after `keep_through_step` (a resumed
    /// run rewrites the steps after its checkpoint). `keep_through_step = 0` starts a new log.
    pub fn open(path: &Path, keep_through_step: usize) -> Result<Self> {
        let kept: String = match std::fs::read_to_string(path) {
            Ok(text) if keep_through_step > 0 => text
                .lines()
                .filter(|l| serde_json::from_str::<Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s as usize <= keep_through_step))
                .map(|l| format!("{l}\n"))
                .collect(),
            _ => String::new(),
        };
        crate::checkpoint::write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path).map_err(|e| io_err(path, e))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    fn write(&mut self, v: Value) -> Result<()> {
        writeln!(self.file, "{v}").and_then(|_| self.file.flush()).map_err(|e| io_err(&self.path, e))
    }

    pub fn train(&mut self, s: &StepStats, names: &[String], tok_per_s: f64, elapsed_s: f64) -> Result<()> {
        let per = |v: &[Option<f64>]| -> Map<String, Value> { names.iter().zip(v).filter_map(|(n, x)| x.map(|x| (n.clone(), json!(x)))).collect() };
        self.write(json!({
            "type": "train", "step": s.step, "loss": s.loss, "lr_scale": s.lr_scale, "tokens": s.n_tokens,
            "targets": s.n_targets, "tok_per_s": tok_per_s, "elapsed_s": elapsed_s,
            "adapters": per(&s.adapter_loss), "grad_norm": per(&s.grad_norm),
        }))
    }

    pub fn eval(&mut self, step: usize, stats: &[EvalStats]) -> Result<()> {
        let m: Map<String, Value> = stats.iter().map(|e| (e.adapter.clone(), json!({"loss": e.loss, "ppl": e.ppl, "targets": e.n_targets}))).collect();
        self.write(json!({"type": "eval", "step": step, "adapters": m}))
    }
}

const COLORS: [RGBColor; 8] = [
    RGBColor(230, 97, 0),
    RGBColor(93, 58, 155),
    RGBColor(26, 133, 255),
    RGBColor(0, 158, 115),
    RGBColor(212, 17, 89),
    RGBColor(120, 120, 120),
    RGBColor(180, 180, 60),
    RGBColor(0, 90, 50),
];

/// Draws `svg`: the step loss (black), each adapter's train loss (thin, colored) and held-out
/// loss (colored points), from the records of `metrics.jsonl`.
pub fn loss_chart(metrics: &Path, svg: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| io_err(metrics, e))?;
    let recs: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mut total: Vec<(f64, f64)> = Vec::new();
    let mut train: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    let mut eval: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for r in &recs {
        let step = r["step"].as_f64().unwrap_or(0.0);
        let adapters = r["adapters"].as_object().cloned().unwrap_or_default();
        if r["type"] == "train" {
            if let Some(l) = r["loss"].as_f64() {
                total.push((step, l));
            }
            for (n, v) in adapters {
                if let Some(l) = v.as_f64() {
                    train.entry(n).or_default().push((step, l));
                }
            }
        } else {
            for (n, v) in adapters {
                if let Some(l) = v["loss"].as_f64() {
                    eval.entry(n).or_default().push((step, l));
                }
            }
        }
    }
    let all = total.iter().chain(train.values().flatten()).chain(eval.values().flatten());
    let (max_x, lo, hi) = all.fold((1f64, f64::MAX, f64::MIN), |(mx, lo, hi), &(x, y)| (mx.max(x), lo.min(y), hi.max(y)));
    let (lo, hi) = if lo > hi { (0.0, 1.0) } else { (lo, hi) };
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(svg, (900, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("flora train: loss per target token", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..max_x, (lo - 0.05 * (hi - lo)).max(0.0)..hi + 0.05 * (hi - lo) + 1e-6)?;
        chart.configure_mesh().x_desc("step").y_desc("loss (nats)").draw()?;
        chart.draw_series(LineSeries::new(total.clone(), BLACK.stroke_width(2)))?.label("train (all adapters)").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLACK));
        let names: Vec<&String> = train.keys().chain(eval.keys()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        for (i, n) in names.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            if let Some(pts) = train.get(*n) {
                chart.draw_series(LineSeries::new(pts.clone(), c.mix(0.5).stroke_width(1)))?.label(format!("{n} train")).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], c));
            }
            if let Some(pts) = eval.get(*n) {
                chart.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?;
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))?
                    .label(format!("{n} held-out"))
                    .legend(move |(x, y)| Circle::new((x + 7, y), 4, c.filled()));
            }
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| io_err(svg, e))
}
