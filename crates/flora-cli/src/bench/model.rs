//! `flora bench model`: prefill and decode tokens/s of the real model at several batch sizes,
//! base-only and with distinct adapters per sequence, and peak memory.

use anyhow::Result;
use flora_adapters::{AdapterKind, WeightFormat};
use flora_model::adapters::{Adapter, ModelAdapters};
use flora_model::{Llama, Logits, SeqStep};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

/// An adapter setting of the sweep: kind and rank (None: base model only).
#[derive(Clone, Copy)]
struct Setting {
    kind: Option<AdapterKind>,
    rank: usize,
}

impl Setting {
    fn label(&self) -> String {
        match self.kind {
            None => "base".into(),
            Some(k) => format!("{k}-r{}", self.rank),
        }
    }
}

struct Measured {
    format: WeightFormat,
    batch: usize,
    setting: String,
    prefill_tok_s: f64,
    decode_tok_s: f64,
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Main-memory read bandwidth with the rayon pool (GB/s): the best of 5 passes summing a
/// 512 MiB buffer, far larger than any cache.
pub fn read_bandwidth_gb_s() -> f64 {
    use rayon::prelude::*;
    let words = vec![1u64; 64 << 20];
    let mut best = f64::INFINITY;
    let mut sink = 0u64;
    for _ in 0..5 {
        let t = Instant::now();
        let sum = words.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x))).reduce(|| 0, u64::wrapping_add);
        best = best.min(t.elapsed().as_secs_f64());
        sink = sink.wrapping_add(sum);
    }
    std::hint::black_box(sink);
    (words.len() * 8) as f64 / best / 1e9
}

/// Weight bytes one decode token streams: every projection of every layer plus the LM head.
fn weight_bytes_per_token(cfg: &flora_model::LlamaConfig, format: WeightFormat) -> f64 {
    let per_layer: usize = flora_model::Proj::ALL.iter().map(|p| p.dims(cfg).0 * p.dims(cfg).1).sum();
    let params = per_layer * cfg.n_layers + cfg.vocab * cfg.hidden;
    params as f64 * if format == WeightFormat::Bf16 { 2.0 } else { 4.0 }
}

pub fn run(model_path: Option<&Path>, out: &Path, quick: bool, prompt_len: usize, decode_steps: usize, batches: &[usize], formats: &[WeightFormat]) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let path = flora_model::default_model::resolve_model(model_path)?;
    let mut model = Llama::from_checkpoint(flora_model::weights::load(&path)?)?;
    let rss_loaded = peak_rss_mib();
    let bandwidth = read_bandwidth_gb_s();
    let settings: Vec<Setting> = if quick {
        vec![Setting { kind: None, rank: 0 }, Setting { kind: Some(AdapterKind::Lora), rank: 8 }, Setting { kind: Some(AdapterKind::Flora), rank: 1 }]
    } else {
        vec![
            Setting { kind: None, rank: 0 },
            Setting { kind: Some(AdapterKind::Lora), rank: 8 },
            Setting { kind: Some(AdapterKind::Flora), rank: 1 },
            Setting { kind: Some(AdapterKind::Flora), rank: 2 },
            Setting { kind: Some(AdapterKind::Flora), rank: 4 },
        ]
    };
    let vocab = model.config().vocab as u32;
    let mut rows = Vec::new();
    let progress = indicatif::ProgressBar::new((formats.len() * batches.len() * settings.len()) as u64)
        .with_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}").expect("template"));
    let mut runs: Vec<(WeightFormat, usize, Setting)> = Vec::new();
    for &f in formats {
        for &b in batches {
            runs.extend(settings.iter().map(|&s| (f, b, s)));
        }
    }
    for (format, b, s) in runs {
        if model.weight_format() != format {
            model.set_weight_format(format)?;
        }
        progress.set_message(format!("{format}, batch {b}, {}", s.label()));
        let adapters: Vec<Adapter> = match s.kind {
            None => vec![],
            Some(k) => (0..b.min(32)).map(|i| super::random_adapter::random_adapter(model.config(), &flora_model::Proj::ALL, k, s.rank, 100 + i as u64)).collect::<Result<_>>()?,
        };
        let packed = if adapters.is_empty() { None } else { Some(ModelAdapters::pack(model.config(), &adapters.iter().collect::<Vec<_>>())?) };
        let prompts: Vec<Vec<u32>> = (0..b).map(|i| (0..prompt_len).map(|t| ((i * 7919 + t * 104729) as u32) % vocab).collect()).collect();
        let slot = |i: usize| if adapters.is_empty() { None } else { Some((i % adapters.len()) as u32) };
        let mut caches: Vec<_> = (0..b).map(|_| model.new_cache()).collect();
        // One step over all sequences (tokens[i] for sequence i); the greedy next tokens.
        let mut step_all = |tokens: &[&[u32]]| -> Result<Vec<u32>> {
            let mut steps: Vec<SeqStep> = caches
                .iter_mut()
                .enumerate()
                .map(|(i, c)| SeqStep { tokens: tokens[i], cache: c, slot: slot(i), logits: Logits::Last })
                .collect();
            let logits = model.step(&mut steps, packed.as_ref())?;
            Ok(logits.to_vec2::<f32>()?.iter().map(|r| flora_model::sampling::argmax(r)).collect())
        };
        // Prefill: every sequence's prompt in one step.
        let t = Instant::now();
        let mut next = step_all(&prompts.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
        let prefill_s = t.elapsed().as_secs_f64();
        // Decode: one token per sequence per step, each step timed; the median step is the
        // figure (the machine is shared: a mean takes in every neighbour's burst).
        let mut step_s = Vec::with_capacity(decode_steps);
        for _ in 0..decode_steps {
            let toks: Vec<[u32; 1]> = next.iter().map(|&x| [x]).collect();
            let t = Instant::now();
            next = step_all(&toks.iter().map(|t| t.as_slice()).collect::<Vec<_>>())?;
            step_s.push(t.elapsed().as_secs_f64());
        }
        step_s.sort_by(f64::total_cmp);
        let decode_s = step_s[step_s.len() / 2] * decode_steps as f64;
        rows.push(Measured {
            format,
            batch: b,
            setting: s.label(),
            prefill_tok_s: (b * prompt_len) as f64 / prefill_s,
            decode_tok_s: (b * decode_steps) as f64 / decode_s,
        });
        progress.inc(1);
    }
    progress.finish_and_clear();
    let peak = peak_rss_mib();
    let md = report(&rows, &ReportContext { path: &path, quick, prompt_len, decode_steps, bandwidth, cfg: model.config(), peak, rss_loaded });
    let mut csv = String::from("format,batch,setting,prefill_tok_s,decode_tok_s,decode_ratio_to_base\n");
    for r in &rows {
        let _ = writeln!(csv, "{},{},{},{:.1},{:.1},{:.3}", r.format, r.batch, r.setting, r.prefill_tok_s, r.decode_tok_s, r.decode_tok_s / base_decode(&rows, r));
    }
    let tmp = out.join("model.csv.tmp");
    std::fs::write(&tmp, csv)?;
    std::fs::rename(&tmp, out.join("model.csv"))?;
    std::fs::write(out.join("model.md"), &md)?;
    println!("{md}");
    Ok(())
}

fn base_decode(rows: &[Measured], r: &Measured) -> f64 {
    rows.iter()
        .find(|x| x.format == r.format && x.batch == r.batch && x.setting == "base")
        .map_or(f64::NAN, |x| x.decode_tok_s)
}

struct ReportContext<'a> {
    path: &'a Path,
    quick: bool,
    prompt_len: usize,
    decode_steps: usize,
    bandwidth: f64,
    cfg: &'a flora_model::LlamaConfig,
    peak: f64,
    rss_loaded: f64,
}

/// Transformers' prefill on the reference machine (the model issue's figure, f32, 2 threads).
const TRANSFORMERS_PREFILL_TOK_S: f64 = 680.0;

/// The markdown report: one table per weight format, then each target with its measured figure.
fn report(rows: &[Measured], cx: &ReportContext) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# flora bench model{}\n",
        if cx.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(
        md,
        "Model: {}. Machine: {}. Weights dequantized at load, prompt {} tokens (every sequence's prompt in one step), {} decode steps. Main-memory read bandwidth measured in this run: {:.1} GB/s.",
        cx.path.display(),
        super::machine_description(),
        cx.prompt_len,
        cx.decode_steps,
        cx.bandwidth
    );
    let _ = writeln!(md, "Decode tok/s = batch / the median time of a decode step (each step includes the greedy pick from the logits). Adapters: one distinct adapter per sequence (up to 32) on all 7 projections of every layer.");
    let formats: Vec<WeightFormat> = rows.iter().fold(Vec::new(), |mut v, r| {
        if !v.contains(&r.format) {
            v.push(r.format);
        }
        v
    });
    for &f in &formats {
        let _ = writeln!(md, "\n## {f} weights\n");
        let _ = writeln!(
            md,
            "| batch | adapters | prefill tok/s | decode tok/s | decode vs base |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for r in rows.iter().filter(|r| r.format == f) {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.1} | {:.2} |",
                r.batch,
                r.setting,
                r.prefill_tok_s,
                r.decode_tok_s,
                r.decode_tok_s / base_decode(rows, r)
            );
        }
    }
    let _ = writeln!(md, "\n## Targets\n");
    let _ = writeln!(md, "| target | format | measured | goal | met |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    let find = |f: WeightFormat, b: usize, s: &str| {
        rows.iter()
            .find(|r| r.format == f && r.batch == b && r.setting == s)
    };
    let mut line = |what: String, f: WeightFormat, measured: String, goal: String, met: bool| {
        let _ = writeln!(
            md,
            "| {what} | {f} | {measured} | {goal} | {} |",
            if met { "yes" } else { "**no**" }
        );
    };
    for &f in &formats {
        if let Some(r) = find(f, 1, "base") {
            let limit = cx.bandwidth * 1e9 / weight_bytes_per_token(cx.cfg, f);
            let ratio = r.decode_tok_s / limit;
            line(
                "batch-1 decode vs the bandwidth limit".into(),
                f,
                format!(
                    "{:.1} tok/s = {ratio:.3}x of {limit:.0} tok/s ({:.0} MB/token)",
                    r.decode_tok_s,
                    weight_bytes_per_token(cx.cfg, f) / 1e6
                ),
                ">= 0.75x".into(),
                ratio >= 0.75,
            );
        }
        if let Some(r) = find(f, 32, "base") {
            line(
                "batch-32 decode".into(),
                f,
                format!("{:.0} tok/s", r.decode_tok_s),
                ">= 600 tok/s".into(),
                r.decode_tok_s >= 600.0,
            );
        }
        if let Some(best) = rows
            .iter()
            .filter(|r| r.format == f && r.setting == "base")
            .map(|r| r.prefill_tok_s)
            .reduce(f64::max)
        {
            let ratio = best / TRANSFORMERS_PREFILL_TOK_S;
            line(
                "prefill (best batch) vs transformers' 680 tok/s".into(),
                f,
                format!("{best:.0} tok/s = {ratio:.3}x"),
                ">= 1.5x".into(),
                ratio >= 1.5,
            );
        }
        let b = if find(f, 32, "lora-r8").is_some() {
            32
        } else {
            8
        };
        if let (Some(l), Some(base)) = (find(f, b, "lora-r8"), find(f, b, "base")) {
            let ratio = l.decode_tok_s / base.decode_tok_s;
            line(
                format!("{b} distinct LoRA r=8 decode vs base"),
                f,
                format!("{ratio:.3}x"),
                ">= 0.85x".into(),
                ratio >= 0.85,
            );
        }
    }
    let _ = writeln!(md, "\nPeak resident memory: {:.0} MiB ({:.0} MiB after loading the model in f32; bf16 adds a packed copy of every projection and the LM head, half the f32 size).", cx.peak, cx.rss_loaded);
    md
}
