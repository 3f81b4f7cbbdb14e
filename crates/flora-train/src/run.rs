//! A whole training run, as `flora train` does it: read and fit the data, resolve each adapter's
//! configuration, initialize (or resume), loop with evaluation, metrics and checkpoints, and
//! write one adapter directory per adapter under `out` (PEFT layout for LoRA and IA3, flora's for
//! fLoRA: what `flora generate --adapter` and the server load).
//!
//! `out/` after a run:
//! ```text
//! NAME/adapter_config.json, NAME/adapter_model.safetensors   one per adapter
//! checkpoint.safetensors    full trainer state (resume with --resume)
//! metrics.jsonl, loss.svg   the log and its chart
//! run.json                  resolved adapter settings, options, final held-out losses
//! ```

use crate::config::{self, AdapterSpec, ConfigFile, PartialSpec};
use crate::data::{self, Dataset, Example, TextEncoder};
use crate::error::{io_err, Result, TrainError};
use crate::metrics::{self, MetricsLog};
use crate::params::TrainAdapter;
use crate::trainer::{EvalStats, StepStats, TrainOptions, Trainer};
use flora_model::Llama;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a run needs besides the model and the tokenizer.
#[derive(Clone, Debug)]
pub struct RunArgs {
    pub data: PathBuf,
    pub eval: Option<PathBuf>,
    /// Held out per adapter when `eval` is None.
    pub eval_fraction: f64,
    pub out: PathBuf,
    pub config: Option<PathBuf>,
    /// CLI flags (`--kind --rank ...`).
    pub cli_spec: PartialSpec,
    /// Maximum tokens per example.
    pub seq_len: usize,
    /// Pack each adapter's examples into `seq_len` chunks instead of truncating each.
    pub pack: bool,
    pub opts: TrainOptions,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0: only at the end).
    pub save_every: usize,
    pub resume: bool,
    /// Stop (as if killed) after this many steps of this process, without the final outputs.
    /// For tests of kill-and-resume.
    pub stop_after: Option<usize>,
}

/// What a run reports as it goes (the CLI draws a progress bar).
pub trait Progress {
    fn start(&mut self, _total_steps: usize, _done: usize) {}
    fn step(&mut self, _stats: &StepStats, _tok_per_s: f64) {}
    fn eval(&mut self, _step: usize, _stats: &[EvalStats]) {}
    fn message(&mut self, _msg: &str) {}
    fn finish(&mut self) {}
}

/// A progress sink that prints nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// The prepared inputs of a run.
pub struct Prepared {
    pub names: Vec<String>,
    pub specs: Vec<AdapterSpec>,
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub warnings: Vec<String>,
}

/// Reads, fits and splits the data and resolves the adapter settings.
pub fn prepare(args: &RunArgs, enc: &dyn TextEncoder) -> Result<Prepared> {
    if args.seq_len < 2 {
        return Err(TrainError::Config("--seq-len must be at least 2".into()));
    }
    let mut warnings = Vec::new();
    let ds = data::read_jsonl(&args.data, enc)?;
    let (train, rep) = data::fit(ds.examples, args.seq_len, args.pack);
    note_fit(&mut warnings, &args.data, &rep);
    let (train, eval) = match &args.eval {
        Some(path) => {
            let ev = data::read_jsonl(path, enc)?;
            let remapped = remap(ev, &ds.names, path)?;
            let (eval, rep) = data::fit(remapped, args.seq_len, false);
            note_fit(&mut warnings, path, &rep);
            (train, eval)
        }
        None => data::split_eval(train, args.eval_fraction, args.opts.seed),
    };
    if train.is_empty() {
        return Err(TrainError::Config(format!("{}: no training examples left (after fitting to --seq-len {})", args.data.display(), args.seq_len)));
    }
    for (a, n) in ds.names.iter().enumerate() {
        if !train.iter().any(|e| e.adapter == a) {
            warnings.push(format!("adapter {n:?} has no training examples left; it stays at its initialization"));
        }
    }
    let file = args.config.as_deref().map(ConfigFile::read).transpose()?;
    let (specs, w) = config::resolve(&ds.names, file.as_ref(), &args.cli_spec)?;
    warnings.extend(w);
    Ok(Prepared { names: ds.names, specs, train, eval, warnings })
}

fn note_fit(w: &mut Vec<String>, path: &Path, rep: &data::FitReport) {
    if rep.n_truncated > 0 {
        w.push(format!("{}: {} examples truncated to --seq-len", path.display(), rep.n_truncated));
    }
    if rep.n_dropped > 0 {
        w.push(format!("{}: {} examples dropped (no target token within --seq-len)", path.display(), rep.n_dropped));
    }
}

/// Eval examples re-indexed to the training adapters; an unknown adapter is an error at its line.
fn remap(ev: Dataset, names: &[String], path: &Path) -> Result<Vec<Example>> {
    ev.examples
        .into_iter()
        .map(|mut e| {
            let name = &ev.names[e.adapter];
            e.adapter = names.iter().position(|n| n == name).ok_or_else(|| TrainError::Data {
                file: path.display().to_string(),
                line: e.line,
                msg: format!("adapter {name:?} has no training data"),
            })?;
            Ok(e)
        })
        .collect()
}

/// FNV-1a over the examples (adapter, tokens, targets): part of the run's fingerprint.
pub fn data_hash(examples: &[Example]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for e in examples {
        eat(e.adapter as u64);
        eat(e.tokens.len() as u64);
        e.tokens.iter().for_each(|&t| eat(t as u64));
        e.targets.iter().for_each(|&t| eat(t as u64));
    }
    format!("{h:016x}")
}

/// The run's identity for resume checks.
pub fn fingerprint(p: &Prepared, args: &RunArgs, model: &Llama) -> serde_json::Value {
    let c = model.config();
    json!({
        "adapters": p.specs, "options": args.opts, "seq_len": args.seq_len, "pack": args.pack,
        "train_data": data_hash(&p.train), "eval_data": data_hash(&p.eval),
        "model": {"layers": c.n_layers, "hidden": c.hidden, "vocab": c.vocab},
    })
}

pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// Final results of a run.
#[derive(Clone, Debug)]
pub struct Summary {
    pub steps: usize,
    pub final_eval: Vec<EvalStats>,
    pub adapter_dirs: Vec<PathBuf>,
    /// False when stopped early by `stop_after`.
    pub finished: bool,
}

/// Runs training end to end.
pub fn run(args: &RunArgs, model: &Llama, enc: &dyn TextEncoder, progress: &mut dyn Progress) -> Result<Summary> {
    let prep = prepare(args, enc)?;
    for w in &prep.warnings {
        progress.message(&format!("warning: {w}"));
    }
    std::fs::create_dir_all(&args.out).map_err(|e| io_err(&args.out, e))?;
    let ckpt = args.out.join(CHECKPOINT);
    let fp = fingerprint(&prep, args, model);
    let adapters = prep.specs.iter().map(|s| TrainAdapter::init(s, model.config(), args.opts.seed)).collect::<Result<Vec<_>>>()?;
    let mut tr = Trainer::new(model, adapters, prep.train.clone(), args.opts.clone())?;
    if ckpt.exists() {
        if !args.resume {
            return Err(TrainError::Config(format!(
                "{} already holds a training checkpoint; pass --resume to continue it, or choose another --out",
                args.out.display()
            )));
        }
        tr.restore_checkpoint(&ckpt, &fp)?;
        progress.message(&format!("resumed from {} at step {}", ckpt.display(), tr.step));
    } else if args.resume {
        progress.message(&format!("no checkpoint in {}; starting from step 0", args.out.display()));
    }
    let metrics_path = args.out.join("metrics.jsonl");
    let mut log = MetricsLog::open(&metrics_path, tr.step)?;
    progress.start(args.opts.steps, tr.step);
    let (mut train_secs, mut train_tokens) = (0f64, 0usize);
    let t_run = Instant::now();
    let mut steps_here = 0;
    let mut last_eval_step = None;
    while !tr.done() {
        let t = Instant::now();
        let s = tr.train_step()?;
        train_secs += t.elapsed().as_secs_f64();
        train_tokens += s.n_tokens;
        let tok_s = train_tokens as f64 / train_secs.max(1e-9);
        log.train(&s, &prep.names, tok_s, t_run.elapsed().as_secs_f64())?;
        progress.step(&s, tok_s);
        if args.eval_every > 0 && s.step % args.eval_every == 0 && !prep.eval.is_empty() {
            let ev = tr.evaluate(&prep.eval)?;
            log.eval(s.step, &ev)?;
            progress.eval(s.step, &ev);
            last_eval_step = Some(s.step);
        }
        if args.save_every > 0 && s.step % args.save_every == 0 {
            tr.save_checkpoint(&ckpt, &fp)?;
        }
        steps_here += 1;
        if args.stop_after.is_some_and(|n| steps_here >= n) && !tr.done() {
            progress.finish();
            return Ok(Summary { steps: tr.step, final_eval: vec![], adapter_dirs: vec![], finished: false });
        }
    }
    let final_eval = if prep.eval.is_empty() {
        vec![]
    } else {
        let ev = tr.evaluate(&prep.eval)?;
        if last_eval_step != Some(tr.step) {
            log.eval(tr.step, &ev)?;
            progress.eval(tr.step, &ev);
        }
        ev
    };
    tr.save_checkpoint(&ckpt, &fp)?;
    let mut dirs = Vec::new();
    for (ad, snap) in tr.adapters.iter().zip(tr.snapshots()?) {
        let dir = args.out.join(&ad.spec.name);
        flora_model::peft::save_adapter_dir(&snap, &dir, ad.spec.alpha)?;
        dirs.push(dir);
    }
    metrics::loss_chart(&metrics_path, &args.out.join("loss.svg"))?;
    let report = json!({
        "adapters": prep.specs, "options": args.opts, "seq_len": args.seq_len, "pack": args.pack,
        "n_train_examples": prep.train.len(), "n_eval_examples": prep.eval.len(), "steps": tr.step,
        "final_eval": final_eval,
    });
    crate::checkpoint::write_atomic(&args.out.join("run.json"), serde_json::to_string_pretty(&report).unwrap_or_default().as_bytes())?;
    progress.finish();
    Ok(Summary { steps: tr.step, final_eval, adapter_dirs: dirs, finished: true })
}
