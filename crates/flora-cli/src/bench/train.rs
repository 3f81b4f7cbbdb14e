//! `flora bench train`: training tokens/s of the real model (forward, backward through the
//! adapter seam, AdamW) per adapter kind and rank, a minibatch mixing 8 adapters vs a minibatch
//! of one adapter (same shapes, measured back to back in one run), and peak memory.

use anyhow::Result;
use flora_adapters::AdapterKind;
use flora_model::Llama;
use flora_train::config::AdapterSpec;
use flora_train::data::Example;
use flora_train::optim::AdamWConfig;
use flora_train::{TrainAdapter, TrainOptions, Trainer};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

struct Row {
    kind: String,
    rank: usize,
    n_adapters: usize,
    tok_s: f64,
    step_s: f64,
}

fn spec(name: String, kind: AdapterKind, rank: usize) -> AdapterSpec {
    AdapterSpec {
        name,
        kind,
        rank,
        alpha: (kind == AdapterKind::Lora).then_some(2.0 * rank as f32),
        targets: vec![flora_model::Proj::Q, flora_model::Proj::K],
        feedforward: vec![],
        lr: flora_train::config::default_lr(kind),
    }
}

/// A trainer over `batch` synthetic examples spread over `n_adapters` adapters.
fn trainer<'m>(model: &'m Llama, kind: AdapterKind, rank: usize, n_adapters: usize, batch: usize, seq_len: usize, steps: usize) -> Result<Trainer<'m>> {
    let adapters = (0..n_adapters).map(|i| TrainAdapter::init(&spec(format!("a{i}"), kind, rank), model.config(), 1)).collect::<flora_train::Result<Vec<_>>>()?;
    let vocab = model.config().vocab as u64;
    let examples: Vec<Example> = (0..batch)
        .map(|i| Example {
            adapter: i % n_adapters,
            tokens: (0..seq_len).map(|t| ((i as u64 * 7919 + t as u64 * 104729 + 13) % vocab) as u32).collect(),
            targets: (0..seq_len).map(|t| t > 0).collect(),
            line: i + 1,
        })
        .collect();
    let opts = TrainOptions { steps: steps + 1, batch_size: batch, grad_accum: 1, warmup: 0, min_lr_ratio: 1.0, seed: 0, adamw: AdamWConfig::default(), pad_id: 0 };
    Ok(Trainer::new(model, adapters, examples, opts)?)
}

/// Seconds per optimizer step for a minibatch mixing 8 adapters and for one adapter: one
/// untimed warm-up step each, then `steps` steps of each, alternating (so drift on a shared
/// machine hits both alike); medians.
fn time_pair(model: &Llama, kind: AdapterKind, rank: usize, batch: usize, seq_len: usize, steps: usize) -> Result<(f64, f64)> {
    let mut mixed = trainer(model, kind, rank, 8, batch, seq_len, steps)?;
    let mut single = trainer(model, kind, rank, 1, batch, seq_len, steps)?;
    mixed.train_step()?;
    single.train_step()?;
    let (mut tm, mut ts) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
    for _ in 0..steps {
        for (tr, times) in [(&mut mixed, &mut tm), (&mut single, &mut ts)] {
            let t = Instant::now();
            tr.train_step()?;
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    Ok((median(tm), median(ts)))
}

pub fn run(model_path: Option<&Path>, out: &Path, quick: bool, seq_len: usize, steps: usize) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let path = flora_model::default_model::resolve_model(model_path)?;
    let model = Llama::from_checkpoint(flora_model::weights::load(&path)?)?;
    let rss_loaded = super::model::peak_rss_mib();
    let batch = 8;
    let ranks: Vec<usize> = if quick { vec![1, 8] } else { vec![1, 4, 8] };
    let mut settings: Vec<(AdapterKind, usize)> = Vec::new();
    for k in [AdapterKind::Lora, AdapterKind::Flora] {
        settings.extend(ranks.iter().map(|&r| (k, r)));
    }
    settings.push((AdapterKind::Ia3, 1));
    // Base forward only (no adapters, no backward): the floor a training step builds on.
    let tokens: Vec<Vec<u32>> = (0..batch).map(|i| (0..seq_len).map(|t| ((i * 7919 + t * 104729 + 13) % model.config().vocab) as u32).collect()).collect();
    let t = Instant::now();
    model.forward_train(&tokens, &vec![None; batch], None)?;
    let base_fwd_s = t.elapsed().as_secs_f64();
    let progress = indicatif::ProgressBar::new((settings.len() * 2) as u64)
        .with_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}").expect("template"));
    let mut rows = Vec::new();
    for &(kind, rank) in &settings {
        progress.set_message(format!("{kind} r{rank}: 8 adapters mixed vs 1, interleaved"));
        let (mixed_s, single_s) = time_pair(&model, kind, rank, batch, seq_len, steps)?;
        for (n_adapters, step_s) in [(8, mixed_s), (1, single_s)] {
            rows.push(Row { kind: kind.to_string(), rank, n_adapters, tok_s: (batch * seq_len) as f64 / step_s, step_s });
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    let peak = super::model::peak_rss_mib();
    let mut csv = String::from("kind,rank,n_adapters,batch,seq_len,step_s,train_tok_s,mixed_vs_single\n");
    let mut md = String::new();
    let _ = writeln!(md, "# flora bench train{}\n", if quick { " (--quick)" } else { "" });
    let _ = writeln!(md, "Model: {}. Machine: {}.", path.display(), super::machine_description());
    let _ = writeln!(
        md,
        "f32, batch {batch} x seq-len {seq_len} = {} tokens per step; adapters on q_proj and k_proj of every layer (the paper's targets); \
         a step = forward + masked cross-entropy + backward + AdamW; median of {steps} step(s) of each, mixed and single alternating, after one warm-up step each.\n",
        batch * seq_len
    );
    let _ = writeln!(md, "Base model forward only (no adapters, no backward): {:.0} tok/s.\n", (batch * seq_len) as f64 / base_fwd_s);
    let _ = writeln!(md, "| kind | rank | train tok/s, 8 adapters mixed | train tok/s, 1 adapter | mixed / single |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    for pair in rows.chunks(2) {
        let (m, s) = (&pair[0], &pair[1]);
        let ratio = m.tok_s / s.tok_s;
        for r in pair {
            let _ = writeln!(csv, "{},{},{},{batch},{seq_len},{:.3},{:.1},{:.3}", r.kind, r.rank, r.n_adapters, r.step_s, r.tok_s, ratio);
        }
        let rank = if m.kind == "ia3" { "-".to_string() } else { m.rank.to_string() };
        let _ = writeln!(md, "| {} | {rank} | {:.0} | {:.0} | {:.2} |", m.kind, m.tok_s, s.tok_s, ratio);
    }
    let _ = writeln!(md, "\nPeak resident memory: {peak:.0} MiB ({rss_loaded:.0} MiB after loading the model).");
    let tmp = out.join("train.csv.tmp");
    std::fs::write(&tmp, csv)?;
    std::fs::rename(&tmp, out.join("train.csv"))?;
    let tmp = out.join("train.md.tmp");
    std::fs::write(&tmp, &md)?;
    std::fs::rename(&tmp, out.join("train.md"))?;
    println!("{md}");
    Ok(())
}
