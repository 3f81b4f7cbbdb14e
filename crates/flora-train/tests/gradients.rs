//! Whole-model adapter gradients (through every adapted projection, attention, norms and the
//! masked cross-entropy) against central finite differences, for each adapter kind; and a
//! heterogeneous minibatch against separate minibatches of each adapter's examples.

#![allow(clippy::needless_range_loop)]

mod common;

use candle_core::Tensor;
use common::*;
use flora_adapters::AdapterKind;
use flora_model::{Llama, ModelAdapters, Proj};
use flora_train::data::Example;
use flora_train::loss::{masked_cross_entropy, Minibatch};
use flora_train::trainer::{adapter_grads, microbatch_grads};
use flora_train::TrainAdapter;

/// The loss value (no backward) at the adapters' current values.
fn loss_value(model: &Llama, adapters: &[TrainAdapter], ex: &[&Example], scale: &[f32]) -> f64 {
    let mb = Minibatch::new(ex, scale, 0);
    let ads: Vec<_> = mb.present.iter().map(|&a| adapters[a].detached()).collect();
    let packed = ModelAdapters::pack(model.config(), &ads.iter().collect::<Vec<_>>()).unwrap();
    let logits = model.forward_train(&mb.tokens, &mb.slots, Some(&packed)).unwrap();
    masked_cross_entropy(&logits, &mb).unwrap().loss.to_scalar::<f32>().unwrap() as f64
}

fn get(ad: &TrainAdapter) -> Vec<Vec<f32>> {
    ad.vars.iter().map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap()).collect()
}

fn set(ad: &TrainAdapter, vals: &[Vec<f32>]) {
    for ((_, v), x) in ad.vars.iter().zip(vals) {
        v.set(&Tensor::from_vec(x.clone(), v.shape(), v.device()).unwrap()).unwrap();
    }
}

/// Central difference of the loss along direction `d` (same layout as the vars).
fn fd_along(model: &Llama, ads: &[TrainAdapter], which: usize, ex: &[&Example], scale: &[f32], d: &[Vec<f32>], eps: f32) -> f64 {
    let p0 = get(&ads[which]);
    let shift = |s: f32| -> Vec<Vec<f32>> { p0.iter().zip(d).map(|(p, d)| p.iter().zip(d).map(|(p, d)| p + s * d).collect()).collect() };
    set(&ads[which], &shift(eps));
    let lp = loss_value(model, ads, ex, scale);
    set(&ads[which], &shift(-eps));
    let lm = loss_value(model, ads, ex, scale);
    set(&ads[which], &p0);
    (lp - lm) / (2.0 * eps as f64)
}

fn dot(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| *x as f64 * *y as f64).sum()
}

#[test]
fn whole_model_gradients_match_finite_differences_for_each_kind() {
    let model = tiny_model();
    let cfg = model.config().clone();
    let cases = [
        (spec("lora", AdapterKind::Lora, 3, &Proj::ALL, 1e-3), 11),
        (spec("flora", AdapterKind::Flora, 2, &Proj::ALL, 1e-3), 12),
        (spec("ia3", AdapterKind::Ia3, 1, &Proj::ALL, 1e-3), 13),
    ];
    for (s, seed) in cases {
        let ads = vec![random_adapter(&cfg, &s, seed)];
        // Two sequences of different lengths (padding), one with a prompt part.
        let exs = [random_example(0, 9, 1, seed * 10), random_example(0, 6, 3, seed * 10 + 1)];
        let ex: Vec<&Example> = exs.iter().collect();
        let n: usize = exs.iter().map(|e| e.n_targets()).sum();
        let scale = [1.0 / n as f32];
        let (_, _, grads) = microbatch_grads(&model, &ads, &ex, &scale, 0).unwrap();
        let g = adapter_grads(&ads[0], &grads).unwrap().expect("the adapter has gradients");
        let gnorm = dot(&g, &g).sqrt();
        assert!(gnorm > 1e-4, "{}: gradient norm {gnorm} too small to test", s.name);

        // 1. Along the gradient: the directional derivative is |g|.
        let unit: Vec<Vec<f32>> = g.iter().map(|v| v.iter().map(|x| (*x as f64 / gnorm) as f32).collect()).collect();
        let fd = fd_along(&model, &ads, 0, &ex, &scale, &unit, 1e-2);
        assert!((fd - gnorm).abs() <= 0.02 * gnorm, "{}: along g, finite difference {fd} vs |g| {gnorm}", s.name);

        // 2. Along random unit directions.
        for k in 0..3u64 {
            let r: Vec<Vec<f32>> = g.iter().enumerate().map(|(i, v)| lcg_tokens(seed * 100 + k * 7 + i as u64, v.len(), 2001).into_iter().map(|x| x as f32 / 1000.0 - 1.0).collect()).collect();
            let rn = dot(&r, &r).sqrt() as f32;
            let r: Vec<Vec<f32>> = r.iter().map(|v| v.iter().map(|x| x / rn).collect()).collect();
            let fd = fd_along(&model, &ads, 0, &ex, &scale, &r, 1e-2);
            let an = dot(&g, &r);
            assert!((fd - an).abs() <= 0.02 * gnorm, "{}: random direction {k}: finite difference {fd} vs analytic {an} (|g| {gnorm})", s.name);
        }

        // 3. The largest coordinates of each tensor, one at a time.
        for (vi, (vname, _)) in ads[0].vars.iter().enumerate() {
            let (i_max, _) = g[vi].iter().enumerate().fold((0, 0f32), |(bi, bv), (i, v)| if v.abs() > bv { (i, v.abs()) } else { (bi, bv) });
            let mut e: Vec<Vec<f32>> = g.iter().map(|v| vec![0.0; v.len()]).collect();
            e[vi][i_max] = 1.0;
            let fd = fd_along(&model, &ads, 0, &ex, &scale, &e, 1e-2);
            let an = g[vi][i_max] as f64;
            assert!((fd - an).abs() <= 0.03 * an.abs() + 2e-3 * gnorm, "{} {vname}[{i_max}]: finite difference {fd} vs analytic {an}", s.name);
        }
    }
}

#[test]
fn heterogeneous_minibatch_gives_each_adapter_its_separate_gradients() {
    let model = tiny_model();
    let cfg = model.config().clone();
    let specs = [
        spec("lora-a", AdapterKind::Lora, 4, &[Proj::Q, Proj::K, Proj::V], 1e-3),
        spec("flora-b", AdapterKind::Flora, 2, &Proj::ALL, 1e-3),
        spec("ia3-c", AdapterKind::Ia3, 1, &[Proj::K, Proj::V, Proj::Down], 1e-3),
        spec("lora-d", AdapterKind::Lora, 1, &[Proj::Q, Proj::K], 1e-3),
        spec("unused", AdapterKind::Flora, 1, &[Proj::Q, Proj::K], 1e-3),
    ];
    let ads: Vec<TrainAdapter> = specs.iter().enumerate().map(|(i, s)| random_adapter(&cfg, s, 40 + i as u64)).collect();
    // Interleaved adapters, different lengths, repeated adapters.
    let exs: Vec<Example> = [(0, 7, 1), (1, 10, 4), (2, 5, 1), (0, 9, 2), (3, 8, 1), (1, 6, 1), (2, 11, 5)]
        .iter()
        .enumerate()
        .map(|(i, &(a, len, prompt))| random_example(a, len, prompt, 500 + i as u64))
        .collect();
    let mut n = vec![0usize; ads.len()];
    exs.iter().for_each(|e| n[e.adapter] += e.n_targets());
    let scale: Vec<f32> = n.iter().map(|&n| if n > 0 { 1.0 / n as f32 } else { 0.0 }).collect();
    let (_, _, mixed) = microbatch_grads(&model, &ads, &exs.iter().collect::<Vec<_>>(), &scale, 0).unwrap();
    assert!(adapter_grads(&ads[4], &mixed).unwrap().is_none(), "an adapter without examples must get no gradient");
    for a in 0..4 {
        let own: Vec<&Example> = exs.iter().filter(|e| e.adapter == a).collect();
        let (_, _, alone) = microbatch_grads(&model, &ads, &own, &scale, 0).unwrap();
        let gm = adapter_grads(&ads[a], &mixed).unwrap().unwrap();
        let ga = adapter_grads(&ads[a], &alone).unwrap().unwrap();
        for b in 0..ads.len() {
            if b != a {
                assert!(adapter_grads(&ads[b], &alone).unwrap().is_none(), "adapter {b} got a gradient from adapter {a}'s batch");
            }
        }
        let max = ga.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max > 1e-6, "{}: zero gradient", specs[a].name);
        for ((vname, _), (x, y)) in ads[a].vars.iter().zip(gm.iter().zip(&ga)) {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                assert!((p - q).abs() <= 1e-5 * max + 1e-9, "{} {vname}[{i}]: mixed batch {p} vs alone {q}", specs[a].name);
            }
        }
    }
}
