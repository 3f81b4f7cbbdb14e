//! Summaries of a serving run: percentiles, CSV, Markdown and an SVG chart.

use super::client::Outcome;
use super::ServeBenchArgs;
use anyhow::{anyhow, Result};
use flora_adapters::AdapterKind;
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::Path;

/// p in [0, 100] of `v` (nearest rank); NaN when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// One configuration's results.
pub struct Row {
    pub kind: Option<AdapterKind>,
    pub rank: usize,
    pub adapters: usize,
    pub popularity: String,
    pub load: String,
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    pub wall_s: f64,
    pub req_per_s: f64,
    pub out_tok_per_s: f64,
    pub ttft: [f64; 3],
    pub tpot: [f64; 3],
    pub first_error: Option<String>,
}

impl Row {
    pub fn new(kind: Option<AdapterKind>, rank: usize, adapters: usize, popularity: &str, args: &ServeBenchArgs, outs: &[Outcome], wall: f64) -> Self {
        let ok: Vec<&Outcome> = outs.iter().filter(|o| o.ok).collect();
        let ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft).collect();
        let tpot: Vec<f64> = ok.iter().filter_map(|o| o.tpot).collect();
        let tokens: usize = ok.iter().map(|o| o.tokens).sum();
        let p3 = |v: &[f64]| [percentile(v, 50.0), percentile(v, 90.0), percentile(v, 99.0)];
        Self {
            kind,
            rank,
            adapters,
            popularity: if kind.is_none() { "one".into() } else { popularity.into() },
            load: args.rate.map_or(format!("concurrency {}", args.concurrency), |r| format!("poisson {r}/s")),
            requests: outs.len(),
            ok: ok.len(),
            errors: outs.iter().filter(|o| !o.ok && !o.disconnected).count(),
            wall_s: wall,
            req_per_s: ok.len() as f64 / wall,
            out_tok_per_s: tokens as f64 / wall,
            ttft: p3(&ttft),
            tpot: p3(&tpot),
            first_error: outs.iter().find_map(|o| o.error.clone()),
        }
    }

    pub fn setting(&self) -> String {
        match self.kind {
            None => "base".into(),
            Some(k) => format!("{k}-r{}", self.rank),
        }
    }

    pub fn line(&self) -> String {
        format!(
            "{:>10}: {:>6.1} out tok/s, {:.2} req/s, TTFT p50/p99 {:.2}/{:.2}s, TPOT p50/p99 {:.0}/{:.0}ms, {} errors{}",
            self.setting(),
            self.out_tok_per_s,
            self.req_per_s,
            self.ttft[0],
            self.ttft[2],
            self.tpot[0] * 1e3,
            self.tpot[2] * 1e3,
            self.errors,
            self.first_error.as_ref().map_or(String::new(), |e| format!(" (first: {e})"))
        )
    }
}

fn header(args: &ServeBenchArgs) -> String {
    let weights = match (&args.url, args.weights) {
        (Some(_), _) => "the target server's".to_string(),
        (None, w) => w.unwrap_or_else(flora_adapters::WeightFormat::fastest_here).to_string(),
    };
    let sampling = if args.temperature == 0.0 { "greedy".to_string() } else { format!("sampled at temperature {}", args.temperature) };
    format!(
        "Machine: {}. Base weights: {weights}. Prompt {} tokens, output {} tokens (end-of-sequence ignored), {sampling}. Adapters on: {}.\n",
        crate::bench::machine_description(),
        args.prompt_len,
        args.output_len,
        args.targets.join(",")
    )
}

/// compare: serve.csv, serve.svg, serve.md, and the inflection rank.
pub fn write_compare(out: &Path, args: &ServeBenchArgs, rows: &[Row]) -> Result<()> {
    let base = rows.iter().find(|r| r.kind.is_none()).map_or(f64::NAN, |r| r.out_tok_per_s);
    let mut csv = String::from("setting,kind,rank,adapters,popularity,load,requests,ok,errors,wall_s,req_per_s,out_tok_per_s,ratio_to_base,ttft_p50_s,ttft_p90_s,ttft_p99_s,tpot_p50_s,tpot_p90_s,tpot_p99_s\n");
    for r in rows {
        writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{:.2},{:.3},{:.2},{:.3},{:.4},{:.4},{:.4},{:.5},{:.5},{:.5}",
            r.setting(),
            r.kind.map_or("base".to_string(), |k| k.to_string()),
            r.rank,
            r.adapters,
            r.popularity,
            r.load,
            r.requests,
            r.ok,
            r.errors,
            r.wall_s,
            r.req_per_s,
            r.out_tok_per_s,
            r.out_tok_per_s / base,
            r.ttft[0],
            r.ttft[1],
            r.ttft[2],
            r.tpot[0],
            r.tpot[1],
            r.tpot[2]
        )?;
    }
    std::fs::write(out.join("serve.csv"), csv)?;
    chart(&out.join("serve.svg"), rows, base)?;
    let mut md = String::from("# flora bench serve (compare)\n\n");
    md.push_str(&header(args));
    writeln!(md, "Load: {}; {} requests per setting; adapters per setting: {}.\n", rows[0].load, args.requests, rows.iter().map(|r| r.adapters).max().unwrap_or(0))?;
    md.push_str("| setting | out tok/s | vs base | req/s | TTFT p50 / p90 / p99 (s) | TPOT p50 / p90 / p99 (ms) | errors |\n|---|---|---|---|---|---|---|\n");
    for r in rows {
        writeln!(
            md,
            "| {} | {:.1} | {:.2} | {:.2} | {:.2} / {:.2} / {:.2} | {:.0} / {:.0} / {:.0} | {} |",
            r.setting(),
            r.out_tok_per_s,
            r.out_tok_per_s / base,
            r.req_per_s,
            r.ttft[0],
            r.ttft[1],
            r.ttft[2],
            r.tpot[0] * 1e3,
            r.tpot[1] * 1e3,
            r.tpot[2] * 1e3,
            r.errors
        )?;
    }
    let infl = inflection(rows);
    writeln!(
        md,
        "\nInflection rank (smallest rank where LoRA serves more tokens/s than fLoRA): {}.",
        infl.map_or("none in the measured ranks".to_string(), |r| r.to_string())
    )?;
    std::fs::write(out.join("serve.md"), &md)?;
    eprintln!("{md}\nwrote {}/serve.{{csv,svg,md}}", out.display());
    Ok(())
}

/// The smallest rank where LoRA's throughput exceeds fLoRA's.
pub fn inflection(rows: &[Row]) -> Option<usize> {
    let tput = |k: AdapterKind, r: usize| rows.iter().find(|x| x.kind == Some(k) && x.rank == r).map(|x| x.out_tok_per_s);
    let mut ranks: Vec<usize> = rows.iter().filter(|r| r.kind == Some(AdapterKind::Flora)).map(|r| r.rank).collect();
    ranks.sort_unstable();
    ranks.into_iter().find(|&r| matches!((tput(AdapterKind::Lora, r), tput(AdapterKind::Flora, r)), (Some(l), Some(f)) if l > f))
}

fn chart(path: &Path, rows: &[Row], base: f64) -> Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let max_r = rows.iter().map(|r| r.rank).max().unwrap_or(1).max(2) as f64;
    let hi = rows.iter().map(|r| r.out_tok_per_s).fold(base, f64::max) * 1.15;
    let mut c = ChartBuilder::on(&root)
        .caption("Serving throughput vs adapter rank (distinct adapters per request)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d((1f64..max_r).log_scale(), 0f64..hi)
        .map_err(|e| anyhow!("{e}"))?;
    c.configure_mesh().x_desc("rank").y_desc("output tokens/s").x_label_formatter(&|v| format!("{v:.0}")).draw().map_err(|e| anyhow!("{e}"))?;
    c.draw_series(LineSeries::new([(1.0, base), (max_r, base)], BLACK.stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?
        .label("base model")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK));
    for (kind, color) in [(AdapterKind::Lora, RGBColor(230, 97, 0)), (AdapterKind::Flora, RGBColor(26, 133, 255)), (AdapterKind::Ia3, RGBColor(0, 158, 115))] {
        let mut pts: Vec<(f64, f64)> = rows.iter().filter(|r| r.kind == Some(kind)).map(|r| (r.rank as f64, r.out_tok_per_s)).collect();
        if pts.is_empty() {
            continue;
        }
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(kind.to_string())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(|e| anyhow!("{e}"))?;
    }
    c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The value of an unlabelled gauge or counter in Prometheus text.
pub fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// (hits, misses, evictions) of the adapter pool.
pub fn pool_counters(metrics: &str) -> [f64; 3] {
    ["flora_adapter_pool_hits_total", "flora_adapter_pool_misses_total", "flora_adapter_pool_evictions_total"].map(|n| gauge(metrics, n).unwrap_or(0.0))
}

#[allow(clippy::too_many_arguments)]
pub fn write_pool(out: &Path, args: &ServeBenchArgs, n: usize, rank: usize, pool_bytes: usize, bytes_each: usize, outs: &[Outcome], wall: f64, before: [f64; 3], after: [f64; 3]) -> Result<()> {
    let row = Row::new(Some(AdapterKind::Lora), rank, n, args.popularity.as_deref().unwrap_or("zipf"), args, outs, wall);
    let (hits, misses, evictions) = (after[0] - before[0], after[1] - before[1], after[2] - before[2]);
    let distinct = outs.iter().map(|o| o.model.as_str()).collect::<std::collections::HashSet<_>>().len();
    let mut md = String::from("# flora bench serve (adapter pool)\n\n");
    md.push_str(&header(args));
    writeln!(
        md,
        "{n} LoRA r{rank} adapters registered ({:.1} MiB each in memory), pool of {:.0} MiB (room for {}), {} popularity, {}; {} requests naming {distinct} distinct adapters.\n",
        bytes_each as f64 / 1048576.0,
        pool_bytes as f64 / 1048576.0,
        args.pool_capacity,
        row.popularity,
        row.load,
        row.requests
    )?;
    writeln!(md, "| measure | value |\n|---|---|")?;
    writeln!(md, "| requests ok / errors | {} / {} |", row.ok, row.errors)?;
    writeln!(md, "| pool hit rate | {:.1}% ({hits:.0} hits, {misses:.0} misses, {evictions:.0} evictions) |", 100.0 * hits / (hits + misses).max(1.0))?;
    writeln!(md, "| output tokens/s | {:.1} |", row.out_tok_per_s)?;
    writeln!(md, "| TTFT p50 / p90 / p99 | {:.2} / {:.2} / {:.2} s |", row.ttft[0], row.ttft[1], row.ttft[2])?;
    writeln!(md, "| TPOT p50 / p90 / p99 | {:.0} / {:.0} / {:.0} ms |", row.tpot[0] * 1e3, row.tpot[1] * 1e3, row.tpot[2] * 1e3)?;
    if let Some(e) = &row.first_error {
        writeln!(md, "\nFirst error: {e}")?;
    }
    std::fs::write(out.join("pool.md"), &md)?;
    eprintln!("{md}\nwrote {}/pool.md", out.display());
    Ok(())
}

pub fn write_soak(out: &Path, args: &ServeBenchArgs, outs: &[Outcome], wall: f64, drained: bool, metrics: &str) -> Result<()> {
    let done = outs.iter().filter(|o| o.ok).count();
    let disconnected = outs.iter().filter(|o| o.disconnected).count();
    let failed: Vec<&Outcome> = outs.iter().filter(|o| !o.ok && !o.disconnected).collect();
    let hung = failed.iter().filter(|o| o.error.as_deref().is_some_and(|e| e.contains("hung"))).count();
    let row = Row::new(None, 0, 0, "", args, outs, wall);
    let cancelled: f64 = metrics.lines().filter(|l| l.starts_with("flora_requests_cancelled_total")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum();
    let mut md = String::from("# flora bench serve (soak)\n\n");
    md.push_str(&header(args));
    writeln!(md, "{:.0} s of {} over the base model and {} adapters (LoRA r8, fLoRA r2, IA3), {} popularity; {:.0}% of clients disconnect mid-stream.\n", wall, row.load, args.adapters.unwrap_or(48), args.popularity.as_deref().unwrap_or("zipf"), args.disconnect_fraction * 100.0)?;
    writeln!(md, "| measure | value |\n|---|---|")?;
    writeln!(md, "| requests sent | {} |", outs.len())?;
    writeln!(md, "| completed with every token | {done} |")?;
    writeln!(md, "| disconnected by the client (on purpose) | {disconnected} |")?;
    writeln!(md, "| sequences the server cancelled after a disconnect | {cancelled:.0} |")?;
    writeln!(md, "| failed | {} (hung: {hung}) |", failed.len())?;
    writeln!(md, "| engine idle afterwards (nothing left running or queued) | {} |", if drained { "yes" } else { "NO" })?;
    writeln!(md, "| output tokens/s | {:.1} |", row.out_tok_per_s)?;
    writeln!(md, "| TTFT p50 / p99 | {:.2} / {:.2} s |", row.ttft[0], row.ttft[2])?;
    for f in failed.iter().take(5) {
        writeln!(md, "\nfailure: {} (status {}): {}", f.model, f.status, f.error.as_deref().unwrap_or(""))?;
    }
    let verdict = if failed.is_empty() && drained { "PASS: no request lost or hung" } else { "FAIL" };
    writeln!(md, "\n{verdict}")?;
    std::fs::write(out.join("soak.md"), &md)?;
    eprintln!("{md}\nwrote {}/soak.md", out.display());
    if !failed.is_empty() || !drained {
        anyhow::bail!("soak failed: {} failed requests, drained = {drained}", failed.len());
    }
    Ok(())
}
