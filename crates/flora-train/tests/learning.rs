//! Each adapter kind learns a synthetic per-adapter task on the tiny random model, with the kinds
//! trained together in mixed minibatches: adapter `a` must predict "the token `a + 1` steps further
//! along a 16-token cycle", which no single model (and so not the base) can do for all adapters.
//!
//! The tiny model's tied, random 32-wide embedding caps how peaked its logits can get (a loss
//! near 1.5 is about the floor), so the bars are: held-out loss well under ln 16 = 2.77 (the best
//! a model can do knowing only the 16-token set, not the mapping) and argmax accuracy.

#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use flora_adapters::AdapterKind;
use flora_model::{Adapter, Llama, ModelAdapters, Proj};
use flora_train::data::Example;
use flora_train::optim::AdamWConfig;
use flora_train::{TrainAdapter, TrainOptions, Trainer};

/// Fraction of targets whose argmax prediction is right, running `ex` with `adapter`.
fn accuracy(model: &Llama, adapter: &Adapter, ex: &[Example]) -> f64 {
    let packed = ModelAdapters::pack(model.config(), &[adapter]).unwrap();
    let (mut right, mut n) = (0, 0);
    for e in ex {
        let logits = model.forward_train(std::slice::from_ref(&e.tokens), &[Some(0)], Some(&packed)).unwrap();
        let rows: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
        for p in 0..e.tokens.len() - 1 {
            if e.targets[p + 1] {
                n += 1;
                right += (flora_model::sampling::argmax(&rows[p]) == e.tokens[p + 1]) as usize;
            }
        }
    }
    right as f64 / n as f64
}

#[test]
fn every_kind_learns_its_own_token_mapping_in_one_mixed_run() {
    let model = tiny_model();
    let cfg = model.config().clone();
    // (spec, held-out loss bar, accuracy bar). IA3 only rescales activations: looser bars.
    let cases = [
        (spec("lora", AdapterKind::Lora, 4, &Proj::ALL, 3e-2), 2.0, 0.9),
        (spec("flora", AdapterKind::Flora, 4, &Proj::ALL, 5e-2), 2.0, 0.9),
        (spec("ia3", AdapterKind::Ia3, 1, &Proj::ALL, 1e-1), 2.7, 0.8),
    ];
    let adapters: Vec<TrainAdapter> = cases.iter().map(|(s, _, _)| TrainAdapter::init(s, &cfg, 3).unwrap()).collect();
    let train: Vec<_> = (0..96).map(|i| task_example(i % 3, 12, 1000 + i as u64)).collect();
    let eval: Vec<_> = (0..24).map(|i| task_example(i % 3, 12, 9000 + i as u64)).collect();
    let opts = TrainOptions { steps: 300, batch_size: 12, grad_accum: 1, warmup: 10, min_lr_ratio: 0.1, seed: 5, adamw: AdamWConfig::default(), pad_id: 0 };
    let mut tr = Trainer::new(&model, adapters, train, opts).unwrap();
    let before = tr.evaluate(&eval).unwrap();
    while !tr.done() {
        tr.train_step().unwrap();
    }
    let after = tr.evaluate(&eval).unwrap();
    let trained: Vec<Adapter> = tr.adapters.iter().map(|a| a.detached()).collect();
    for (a, ((s, loss_bar, acc_bar), (b, e))) in cases.iter().zip(before.iter().zip(&after)).enumerate() {
        let own: Vec<Example> = eval.iter().filter(|e| e.adapter == a).cloned().collect();
        let acc = accuracy(&model, &trained[a], &own);
        // The same examples through another adapter: its mapping is wrong for them.
        let other = accuracy(&model, &trained[(a + 1) % 3], &own);
        eprintln!("{}: held-out loss {:.3} -> {:.3}, accuracy {acc:.2} (with another adapter {other:.2})", s.name, b.loss, e.loss);
        assert!(e.loss < *loss_bar, "{}: held-out loss {:.3} did not reach {loss_bar} (started at {:.3})", s.name, e.loss, b.loss);
        assert!(acc >= *acc_bar, "{}: accuracy {acc:.2} < {acc_bar}", s.name);
        assert!(other < 0.3, "{}: another adapter also predicts this adapter's mapping ({other:.2})", s.name);
    }
}
