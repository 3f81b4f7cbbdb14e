//! `flora train`: fine-tune many adapters at once (argument parsing and progress display; the
//! work is in the flora-train crate).

use anyhow::{bail, Result};
use flora_train::config::PartialSpec;
use flora_train::data::ModelEncoder;
use flora_train::optim::AdamWConfig;
use flora_train::run::{Progress, RunArgs};
use flora_train::{EvalStats, StepStats, TrainOptions};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// Train fLoRA / LoRA / IA3 adapters, one per adapter name in the data, in mixed minibatches.
///
/// Data: JSONL, one record per line: {"adapter": NAME, "text": ...} (loss on all tokens), or
/// {"adapter": NAME, "prompt": ..., "completion": ...} (loss on the completion), or
/// {"adapter": NAME, "messages": [{"role": ..., "content": ...}, ...]} (chat template; loss on
/// assistant turns). See docs/training.md.
///
/// Per-adapter settings come from --config FILE ([adapters.NAME] and [defaults] tables), then the
/// flags below; defaults follow the paper: targets q,k, rank 1, lr fLoRA 8e-3, IA3 5e-3, LoRA 1e-4.
///
/// Writes under --out: one adapter directory per name (PEFT layout for LoRA / IA3, flora's for
/// fLoRA; pass it to `flora generate --adapter`), checkpoint.safetensors, metrics.jsonl, loss.svg,
/// run.json.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Training data (JSONL).
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out data (JSONL; adapters must appear in --data). Default: hold out --eval-fraction.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Fraction of each adapter's examples held out for evaluation when --eval is not given.
    #[arg(long, default_value_t = 0.1)]
    pub eval_fraction: f64,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Per-adapter settings (TOML).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Adapter kind for adapters the config does not set: flora, lora or ia3 [default: flora].
    #[arg(long)]
    pub kind: Option<String>,
    /// Rank (fLoRA, LoRA) [default: 1].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha (scale = alpha / rank) [default: 2 x rank].
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Target modules, comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or
    /// all [default: q_proj,k_proj].
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// Peak learning rate [default: by kind, fLoRA 8e-3, IA3 5e-3, LoRA 1e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Examples per micro-batch (mixed adapters).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Maximum tokens per example (longer ones are truncated, or packed with --pack).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Pack each adapter's examples into --seq-len chunks instead of truncating each.
    #[arg(long)]
    pub pack: bool,
    /// Linear warmup steps (then cosine decay).
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// The cosine ends at this fraction of each adapter's lr.
    #[arg(long, default_value_t = 0.0)]
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip each adapter's gradient to this global norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Evaluate every N steps (0 = only at the end).
    #[arg(long, default_value_t = 50)]
    pub eval_every: usize,
    /// Write a checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 50)]
    pub save_every: usize,
    /// Seed (initialization, data order, eval split).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from --out/checkpoint.safetensors (same arguments: the result is identical to an
    /// uninterrupted run).
    #[arg(long)]
    pub resume: bool,
    #[arg(long, help = crate::load::MODEL_HELP)]
    pub model: Option<PathBuf>,
}

/// Progress bar: step, loss, tokens/s, ETA; eval results and warnings above it. When stderr is
/// not a terminal (the bar is hidden), lines go to stderr directly, and a line per step too.
struct Bar {
    bar: ProgressBar,
}

impl Bar {
    fn line(&self, msg: String) {
        if self.bar.is_hidden() {
            eprintln!("{msg}");
        } else {
            self.bar.println(msg);
        }
    }
}

impl Progress for Bar {
    fn start(&mut self, total: usize, done: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
        self.bar.reset_eta();
    }
    fn step(&mut self, s: &StepStats, tok_s: f64) {
        self.bar.set_position(s.step as u64);
        let msg = format!("loss {:.4}  {:.0} tok/s  lr x{:.2}", s.loss, tok_s, s.lr_scale);
        if self.bar.is_hidden() {
            eprintln!("flora: step {}/{}: {msg}", s.step, self.bar.length().unwrap_or(0));
        }
        self.bar.set_message(msg);
    }
    fn eval(&mut self, step: usize, stats: &[EvalStats]) {
        let parts: Vec<String> = stats.iter().map(|e| format!("{} {:.4} (ppl {:.2})", e.adapter, e.loss, e.ppl)).collect();
        self.line(format!("flora: step {step} held-out: {}", parts.join(", ")));
    }
    fn message(&mut self, msg: &str) {
        self.line(format!("flora: {msg}"));
    }
    fn finish(&mut self) {
        self.bar.finish();
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    if args.steps == 0 || args.batch_size == 0 || args.grad_accum == 0 {
        bail!("--steps, --batch-size and --grad-accum must be at least 1");
    }
    if !(0.0..1.0).contains(&args.eval_fraction) {
        bail!("--eval-fraction must be in [0, 1)");
    }
    if !(0.0..=1.0).contains(&args.min_lr_ratio) || args.weight_decay < 0.0 || args.max_grad_norm < 0.0 {
        bail!("--min-lr-ratio must be in [0, 1]; --weight-decay and --max-grad-norm must be >= 0");
    }
    if !args.data.exists() {
        bail!("--data {}: no such file", args.data.display());
    }
    let (model, tok) = crate::load::model_and_tokenizer(args.model.as_deref(), Some(flora_adapters::WeightFormat::F32))?;
    if args.seq_len > model.config().context {
        bail!("--seq-len {} exceeds the model's context ({})", args.seq_len, model.config().context);
    }
    let pad_id = tok.pad_id().or(tok.eos_id()).unwrap_or(0);
    let enc = ModelEncoder::new(tok);
    let run_args = RunArgs {
        data: args.data,
        eval: args.eval,
        eval_fraction: args.eval_fraction,
        out: args.out.clone(),
        config: args.config,
        cli_spec: PartialSpec { kind: args.kind, rank: args.rank, alpha: args.alpha, targets: args.targets, lr: args.lr, feedforward: None },
        seq_len: args.seq_len,
        pack: args.pack,
        opts: TrainOptions {
            steps: args.steps,
            batch_size: args.batch_size,
            grad_accum: args.grad_accum,
            warmup: args.warmup,
            min_lr_ratio: args.min_lr_ratio,
            seed: args.seed,
            adamw: AdamWConfig { weight_decay: args.weight_decay, max_grad_norm: args.max_grad_norm, ..Default::default() },
            pad_id,
        },
        eval_every: args.eval_every,
        save_every: args.save_every,
        resume: args.resume,
        stop_after: None,
    };
    let bar = ProgressBar::new(args.steps as u64).with_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}").expect("template"),
    );
    let mut progress = Bar { bar };
    let summary = flora_train::run::run(&run_args, &model, &enc, &mut progress)?;
    for d in &summary.adapter_dirs {
        println!("{}", d.display());
    }
    crate::load::tracing_free_log(&format!(
        "trained {} adapters for {} steps; metrics in {}/metrics.jsonl, chart in {}/loss.svg",
        summary.adapter_dirs.len(),
        summary.steps,
        args.out.display(),
        args.out.display()
    ));
    Ok(())
}
