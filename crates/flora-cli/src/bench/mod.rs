//! `flora bench ...`: benchmarks that print ratios measured in one run.

mod chart;
mod layers;
mod model;
mod random_adapter;
mod serve;
mod train;

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// One adapted projection: base vs LoRA (bmm baseline and ours) vs fLoRA (vectorized, merged,
    /// cost-model) vs IA3, across widths, decode/prefill shapes, ranks and adapter popularity.
    /// Writes DIR/layers.csv, DIR/layers.svg and DIR/layers.md, and prints inflection ranks.
    Layers {
        /// A small sweep (a minute or two) instead of the full one.
        #[arg(long)]
        quick: bool,
        /// Output directory.
        #[arg(long, default_value = "bench-out")]
        out: PathBuf,
        /// Seconds of timing per measurement (the median over the runs that fit, at least 3).
        #[arg(long, default_value_t = 0.25)]
        budget: f64,
        /// Override the widths d (comma-separated), e.g. `--dims 576,4096`.
        #[arg(long, value_delimiter = ',')]
        dims: Option<Vec<usize>>,
        /// Override the ranks (comma-separated), e.g. `--ranks 1,8,64`.
        #[arg(long, value_delimiter = ',')]
        ranks: Option<Vec<usize>>,
    },
    /// The real model: prefill and decode tokens/s at batch 1, 8, 32, base-only and with a
    /// distinct adapter per sequence (LoRA r=8 with bf16 and with 8-bit tables, fLoRA r=1, 2,
    /// 4), and peak memory.
    /// Writes DIR/model.csv and DIR/model.md.
    Model {
        #[arg(long, help = crate::load::MODEL_HELP)]
        model: Option<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "bench-out")]
        out: PathBuf,
        /// Batches 1 and 8, fewer adapter settings.
        #[arg(long)]
        quick: bool,
        /// Prompt tokens per sequence.
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        /// Decode steps timed after the prefill.
        #[arg(long, default_value_t = 16)]
        decode_steps: usize,
        /// Batch sizes to measure (comma-separated); default 1,8,32 (1,8 with --quick).
        #[arg(long, value_delimiter = ',')]
        batches: Option<Vec<usize>>,
        /// Weight formats to measure, in order (comma-separated): f32, bf16.
        #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
        weights: Vec<flora_adapters::WeightFormat>,
        /// Rank of the LoRA adapters (the model issue's targets are for rank 8).
        #[arg(long, default_value_t = 8)]
        lora_rank: usize,
        /// Adapter settings to measure (comma-separated): lora-rR, lora-rR-int8 (R = --lora-rank),
        /// flora-r1, flora-r2, flora-r4. Default: all (with --quick: lora-rR, lora-rR-int8,
        /// flora-r1). The base-only setting always runs: every ratio is to it.
        #[arg(long, value_delimiter = ',')]
        settings: Option<Vec<String>>,
    },
    /// The HTTP server under load: base vs LoRA vs fLoRA at each rank (the paper's serving
    /// analysis), the adapter pool under Zipf traffic over many adapters, or a soak with clients
    /// that disconnect. Writes CSV, chart and report to --out.
    Serve(serve::ServeBenchArgs),
    /// Training tokens/s on the real model (forward + backward + AdamW) for LoRA and fLoRA at
    /// ranks 1, 4, 8 and IA3; a minibatch mixing 8 adapters vs one adapter; peak memory.
    /// Writes DIR/train.csv and DIR/train.md.
    Train {
        #[arg(long, help = crate::load::MODEL_HELP)]
        model: Option<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "bench-out")]
        out: PathBuf,
        /// Ranks 1 and 8 only.
        #[arg(long)]
        quick: bool,
        /// Tokens per sequence (batch 8).
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Timed steps per setting (after one warm-up step).
        #[arg(long, default_value_t = 2)]
        steps: usize,
    },
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Layers { quick, out, budget, dims, ranks } => layers::run(quick, &out, budget, dims, ranks),
        BenchCommand::Model { model, out, quick, prompt_len, decode_steps, batches, weights, lora_rank, settings } => {
            if prompt_len == 0 || decode_steps == 0 || lora_rank == 0 {
                anyhow::bail!("--prompt-len, --decode-steps and --lora-rank must be positive");
            }
            if batches.as_ref().is_some_and(|b| b.is_empty() || b.contains(&0)) {
                anyhow::bail!("--batches must list positive batch sizes");
            }
            let batches = batches.unwrap_or_else(|| if quick { vec![1, 8] } else { vec![1, 8, 32] });
            let sweep = model::Sweep { quick, prompt_len, decode_steps, batches: &batches, formats: &weights, lora_rank, settings: settings.as_deref() };
            model::run(model.as_deref(), &out, &sweep)
        }
        BenchCommand::Serve(args) => serve::run(args),
        BenchCommand::Train { model, out, quick, seq_len, steps } => {
            if seq_len < 2 || steps == 0 {
                anyhow::bail!("--seq-len must be at least 2 and --steps positive");
            }
            train::run(model.as_deref(), &out, quick, seq_len, steps)
        }
    }
}

/// A line describing this machine, for reports.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let avx512 = std::fs::read_to_string("/proc/cpuinfo").map(|s| s.contains("avx512f")).unwrap_or(false);
    format!(
        "{cpu}, {} cores available, {} rayon threads{}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        rayon::current_num_threads(),
        if avx512 { ", AVX-512" } else { "" }
    )
}
