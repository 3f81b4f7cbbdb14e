//! `flora bench model`: prefill and decode tokens/s of the real model at several batch sizes,
//! base-only and with distinct adapters per sequence, and peak memory.

use anyhow::Result;
use flora_adapters::AdapterKind;
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

pub fn run(model_path: Option<&Path>, out: &Path, quick: bool, prompt_len: usize, decode_steps: usize) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let path = flora_model::default_model::resolve_model(model_path)?;
    let model = Llama::from_checkpoint(flora_model::weights::load(&path)?)?;
    let rss_loaded = peak_rss_mib();
    let batches: Vec<usize> = if quick { vec![1, 8] } else { vec![1, 8, 32] };
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
    let progress = indicatif::ProgressBar::new((batches.len() * settings.len()) as u64)
        .with_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}").expect("template"));
    for &b in &batches {
        for s in &settings {
            progress.set_message(format!("batch {b}, {}", s.label()));
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
            // Decode: one token per sequence per step.
            let t = Instant::now();
            for _ in 0..decode_steps {
                let toks: Vec<[u32; 1]> = next.iter().map(|&x| [x]).collect();
                next = step_all(&toks.iter().map(|t| t.as_slice()).collect::<Vec<_>>())?;
            }
            let decode_s = t.elapsed().as_secs_f64();
            rows.push(Measured {
                batch: b,
                setting: s.label(),
                prefill_tok_s: (b * prompt_len) as f64 / prefill_s,
                decode_tok_s: (b * decode_steps) as f64 / decode_s,
            });
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    let peak = peak_rss_mib();
    let mut csv = String::from("batch,setting,prefill_tok_s,decode_tok_s,decode_ratio_to_base\n");
    let mut md = String::new();
    let _ = writeln!(md, "# flora bench model{}\n", if quick { " (--quick)" } else { "" });
    let _ = writeln!(md, "Model: {}. Machine: {}. f32 weights (dequantized at load), prompt {prompt_len} tokens, {decode_steps} decode steps.", path.display(), super::machine_description());
    let _ = writeln!(md, "Adapters: one distinct adapter per sequence (up to 32) on all 7 projections of every layer.\n");
    let _ = writeln!(md, "| batch | adapters | prefill tok/s | decode tok/s | decode vs base |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    for r in &rows {
        let base = rows.iter().find(|x| x.batch == r.batch && x.setting == "base").map_or(f64::NAN, |x| x.decode_tok_s);
        let ratio = r.decode_tok_s / base;
        let _ = writeln!(csv, "{},{},{:.1},{:.1},{:.3}", r.batch, r.setting, r.prefill_tok_s, r.decode_tok_s, ratio);
        let _ = writeln!(md, "| {} | {} | {:.0} | {:.1} | {:.2} |", r.batch, r.setting, r.prefill_tok_s, r.decode_tok_s, ratio);
    }
    let _ = writeln!(md, "\nPeak resident memory: {peak:.0} MiB ({rss_loaded:.0} MiB after loading the model).");
    let tmp = out.join("model.csv.tmp");
    std::fs::write(&tmp, csv)?;
    std::fs::rename(&tmp, out.join("model.csv"))?;
    std::fs::write(out.join("model.md"), &md)?;
    println!("{md}");
    Ok(())
}
