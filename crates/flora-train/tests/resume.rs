//! Kill-and-resume reproduces the uninterrupted run bit for bit: in-process through the Trainer,
//! and end to end through `run::run` (checkpoint file, metrics log, adapter directories).
//! Also: a checkpoint of another run is refused, and an existing checkpoint is never overwritten
//! without --resume.

mod common;

use common::*;
use flora_adapters::AdapterKind;
use flora_model::Proj;
use flora_train::config::PartialSpec;
use flora_train::optim::AdamWConfig;
use flora_train::run::{self, Quiet, RunArgs};
use flora_train::{TrainAdapter, TrainOptions, Trainer};
use std::path::Path;

fn opts() -> TrainOptions {
    TrainOptions { steps: 8, batch_size: 3, grad_accum: 2, warmup: 2, min_lr_ratio: 0.0, seed: 9, adamw: AdamWConfig { weight_decay: 0.01, ..Default::default() }, pad_id: 0 }
}

fn make<'m>(model: &'m flora_model::Llama) -> Trainer<'m> {
    let cfg = model.config();
    let specs = [
        spec("l", AdapterKind::Lora, 2, &[Proj::Q, Proj::V], 5e-3),
        spec("f", AdapterKind::Flora, 2, &[Proj::Q, Proj::K], 8e-3),
        spec("i", AdapterKind::Ia3, 1, &[Proj::K, Proj::V, Proj::Down], 5e-3),
    ];
    let ads = specs.iter().map(|s| TrainAdapter::init(s, cfg, 1).unwrap()).collect();
    // 10 examples: the 8 steps x 6 examples cross epochs.
    let train = (0..10).map(|i| random_example(i % 3, 5 + i % 4, 1 + i % 2, 70 + i as u64)).collect();
    Trainer::new(model, ads, train, opts()).unwrap()
}

fn state(tr: &Trainer) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    for (ad, st) in tr.adapters.iter().zip(&tr.states) {
        for (i, (_, v)) in ad.vars.iter().enumerate() {
            out.push(v.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect());
            out.push(st.m[i].iter().map(|x| x.to_bits()).collect());
            out.push(st.v[i].iter().map(|x| x.to_bits()).collect());
        }
        out.push(vec![st.t as u32]);
    }
    out
}

#[test]
fn trainer_resume_is_bit_identical() {
    let model = tiny_model();
    let tmp = tempdir("trainer");
    let dir = tmp.path();
    let fp = serde_json::json!({"run": "test"});
    let mut full = make(&model);
    let mut losses = Vec::new();
    while !full.done() {
        losses.push(full.train_step().unwrap().loss);
    }
    let mut first = make(&model);
    for _ in 0..3 {
        first.train_step().unwrap();
    }
    first.save_checkpoint(&dir.join("ck.safetensors"), &fp).unwrap();
    drop(first); // "killed"
    let mut resumed = make(&model);
    resumed.restore_checkpoint(&dir.join("ck.safetensors"), &fp).unwrap();
    assert_eq!(resumed.step, 3);
    let mut rest = Vec::new();
    while !resumed.done() {
        rest.push(resumed.train_step().unwrap().loss);
    }
    assert_eq!(rest, losses[3..].to_vec(), "losses after resume");
    assert!(state(&resumed) == state(&full), "parameters and optimizer state after resume differ from the uninterrupted run");
    // Sanity: the run did change the weights (not trivially equal).
    assert!(state(&full) != state(&make(&model)), "training changed nothing");

    // A checkpoint from another run is refused.
    let mut other = make(&model);
    let err = other.restore_checkpoint(&dir.join("ck.safetensors"), &serde_json::json!({"run": "other"})).unwrap_err().to_string();
    assert!(err.contains("different run"), "{err}");
}

/// A fresh directory, removed when the returned guard drops (at the end of the test, passed
/// or failed).
fn tempdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("flora-train-test-{tag}-")).tempdir().unwrap()
}

fn write_data(dir: &Path) -> std::path::PathBuf {
    let mut s = String::new();
    for i in 0..12 {
        match i % 3 {
            0 => s.push_str(&format!("{{\"adapter\": \"alpha\", \"text\": \"alpha line {i} abc abc abc\"}}\n")),
            1 => s.push_str(&format!("{{\"adapter\": \"beta\", \"prompt\": \"q{i}: \", \"completion\": \"beta answer {i}\"}}\n")),
            _ => s.push_str(&format!(
                "{{\"adapter\": \"gamma\", \"messages\": [{{\"role\": \"user\", \"content\": \"hi {i}\"}}, {{\"role\": \"assistant\", \"content\": \"gamma {i}\"}}]}}\n"
            )),
        }
    }
    let p = dir.join("data.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

fn args(data: &Path, out: &Path) -> RunArgs {
    RunArgs {
        data: data.to_path_buf(),
        eval: None,
        eval_fraction: 0.25,
        out: out.to_path_buf(),
        config: None,
        cli_spec: PartialSpec { kind: Some("flora".into()), rank: Some(2), lr: Some(1e-2), ..Default::default() },
        seq_len: 24,
        pack: false,
        opts: TrainOptions { steps: 6, batch_size: 4, grad_accum: 1, warmup: 1, min_lr_ratio: 0.0, seed: 3, adamw: AdamWConfig::default(), pad_id: 0 },
        eval_every: 2,
        save_every: 2,
        resume: false,
        stop_after: None,
    }
}

fn read_dir_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

fn losses(metrics: &Path) -> Vec<String> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("tok_per_s");
            o.remove("elapsed_s");
            v.to_string()
        })
        .collect()
}

#[test]
fn run_killed_and_resumed_equals_uninterrupted_run() {
    let model = tiny_model();
    let tmp = tempdir("run");
    let dir = tmp.path();
    let data = write_data(&dir);
    let (a, b) = (dir.join("a"), dir.join("b"));
    let full = run::run(&args(&data, &a), &model, &ToyEncoder, &mut Quiet).unwrap();
    assert!(full.finished && full.steps == 6 && full.adapter_dirs.len() == 3);
    // Killed after 3 steps: the last checkpoint is step 2, and step 3 is in the log already.
    let killed = run::run(&RunArgs { stop_after: Some(3), ..args(&data, &b) }, &model, &ToyEncoder, &mut Quiet).unwrap();
    assert!(!killed.finished);
    // Without --resume an existing checkpoint is not overwritten.
    let err = run::run(&args(&data, &b), &model, &ToyEncoder, &mut Quiet).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    // Different settings: refused.
    let mut changed = RunArgs { resume: true, ..args(&data, &b) };
    changed.opts.batch_size = 5;
    let err = run::run(&changed, &model, &ToyEncoder, &mut Quiet).unwrap_err().to_string();
    assert!(err.contains("different run"), "{err}");
    let resumed = run::run(&RunArgs { resume: true, ..args(&data, &b) }, &model, &ToyEncoder, &mut Quiet).unwrap();
    assert!(resumed.finished && resumed.steps == 6);
    for name in ["alpha", "beta", "gamma"] {
        assert_eq!(read_dir_bytes(&a.join(name)), read_dir_bytes(&b.join(name)), "adapter {name} differs after kill and resume");
    }
    assert_eq!(losses(&a.join("metrics.jsonl")), losses(&b.join("metrics.jsonl")), "metrics log differs");
    assert_eq!(std::fs::read(a.join("checkpoint.safetensors")).unwrap(), std::fs::read(b.join("checkpoint.safetensors")).unwrap());
    assert!(a.join("loss.svg").exists() && a.join("run.json").exists());
    // The trained adapters differ from their initialization (something was learned).
    let init = run::run(&RunArgs { opts: TrainOptions { steps: 0, ..args(&data, &a).opts }, ..args(&data, &dir.join("c")) }, &model, &ToyEncoder, &mut Quiet).unwrap();
    assert_ne!(read_dir_bytes(&init.adapter_dirs[0]), read_dir_bytes(&a.join("alpha")));
}
