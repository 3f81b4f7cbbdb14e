//! Gradients of every path (w.r.t. inputs and adapter parameters) against central finite
//! differences of the f64 reference, and heterogeneous batches against per-adapter batches.

mod common;

use candle_core::{Device, Tensor, Var};
use common::*;
use flora_adapters::{adapted_linear, AdapterBatch, AdapterWeights, BaseWeight, ExecOptions, FloraPolicy};

/// loss = sum(y o R) for a fixed random R.
fn ref_loss(fx: &Fixture, x: &[f64], params: &[f64], batch: &AdapterBatch, r: &[f64]) -> f64 {
    let w0: Vec<f64> = fx.w0.iter().map(|&v| v as f64).collect();
    let y = flora_adapters::reference::forward(x, &w0, params, fx.layer.slots(), batch.row_slots(), fx.d_in, fx.d_out);
    y.iter().zip(r).map(|(a, b)| a * b).sum()
}

fn central_diff(f: impl Fn(&[f64]) -> f64, at: &[f64]) -> Vec<f64> {
    let eps = 1e-6;
    (0..at.len())
        .map(|i| {
            let (mut p, mut m) = (at.to_vec(), at.to_vec());
            p[i] += eps;
            m[i] -= eps;
            (f(&p) - f(&m)) / (2.0 * eps)
        })
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= 1e-4 * scale, "{what}[{i}]: analytic {g} vs finite-difference {w}");
    }
}

#[test]
fn every_path_matches_finite_differences() {
    let (d_in, d_out) = (7, 5);
    let kinds = [Kind::Lora(1), Kind::Lora(3), Kind::Flora(1), Kind::Flora(3), Kind::Ia3Out, Kind::Ia3In];
    let fx = Fixture::new(d_in, d_out, &kinds, 21);
    // Every kind, a base row, a multi-row segment and repeats of the same adapter.
    let rows = vec![Some(0), Some(1), Some(1), None, Some(2), Some(3), Some(3), Some(3), Some(4), Some(5)];
    let n = rows.len();
    let batch = AdapterBatch::from_row_slots(rows);
    let x = random_input(n, d_in, 22);
    let r: Vec<f32> = random_input(n, d_out, 23);
    let r64: Vec<f64> = r.iter().map(|&v| v as f64).collect();
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let p64 = fx.params_f64();
    let want_dx = central_diff(|xv| ref_loss(&fx, xv, &p64, &batch, &r64), &x64);
    let want_dp = central_diff(|pv| ref_loss(&fx, &x64, pv, &batch, &r64), &p64);
    let dev = Device::Cpu;
    let base = BaseWeight::from_out_in(&fx.w0_tensor()).unwrap();
    for policy in [FloraPolicy::Vectorized, FloraPolicy::Merged, FloraPolicy::Auto] {
        let xv = Var::from_tensor(&Tensor::from_vec(x.clone(), (n, d_in), &dev).unwrap()).unwrap();
        let pv = Var::from_tensor(fx.layer.params()).unwrap();
        let layer = fx.layer.with_params(pv.as_tensor().clone()).unwrap();
        let opts = ExecOptions { flora: policy, ..Default::default() };
        let y = adapted_linear(xv.as_tensor(), &base, &batch, Some(&layer), &opts).unwrap();
        let rt = Tensor::from_vec(r.clone(), (n, d_out), &dev).unwrap();
        let loss = (y * rt).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let dx: Vec<f32> = grads.get(&xv).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let dp: Vec<f32> = grads.get(&pv).unwrap().to_vec1().unwrap();
        assert_close(&format!("{policy:?} dx"), &dx, &want_dx);
        assert_close(&format!("{policy:?} dparams"), &dp, &want_dp);
    }
}

/// Adapters held as separate variables (as training holds them), packed by `Tensor::cat`.
fn var_weights(fx: &Fixture) -> (Vec<AdapterWeights>, Vec<Var>) {
    let mut vars = Vec::new();
    let mut v = |t: &Tensor| {
        let var = Var::from_tensor(t).unwrap();
        vars.push(var.clone());
        var.as_tensor().clone()
    };
    let weights = fx
        .weights
        .iter()
        .map(|w| match w {
            AdapterWeights::Lora { a, b, scale } => AdapterWeights::Lora { a: v(a), b: v(b), scale: *scale },
            AdapterWeights::Flora { a, b } => AdapterWeights::Flora { a: v(a), b: v(b) },
            AdapterWeights::Ia3 { l, on_input } => AdapterWeights::Ia3 { l: v(l), on_input: *on_input },
        })
        .collect();
    (weights, vars)
}

/// (output, dx, grads of each var) for `rows` of `x` under `slots` (indices into fx.weights).
fn run_with_vars(fx: &Fixture, which: &[usize], x: &[f32], rows: &[Option<u32>], policy: FloraPolicy) -> (Vec<f32>, Vec<f32>, Vec<Option<Vec<f32>>>) {
    let dev = Device::Cpu;
    let (weights, vars) = var_weights(fx);
    let chosen: Vec<AdapterWeights> = which.iter().map(|&i| weights[i].clone()).collect();
    let layer = pack("het.proj", fx.d_in, fx.d_out, &chosen);
    let n = rows.len();
    let xv = Var::from_tensor(&Tensor::from_vec(x.to_vec(), (n, fx.d_in), &dev).unwrap()).unwrap();
    let base = BaseWeight::from_out_in(&fx.w0_tensor()).unwrap();
    let opts = ExecOptions { flora: policy, ..Default::default() };
    let y = adapted_linear(xv.as_tensor(), &base, &AdapterBatch::from_row_slots(rows.to_vec()), Some(&layer), &opts).unwrap();
    let loss = y.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let out = y.flatten_all().unwrap().to_vec1().unwrap();
    let dx = grads.get(&xv).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let per_var = vars.iter().map(|v| grads.get(v).map(|g| g.flatten_all().unwrap().to_vec1().unwrap())).collect();
    (out, dx, per_var)
}

#[test]
fn heterogeneous_batch_equals_each_adapter_alone() {
    let (d_in, d_out) = (24, 20);
    let kinds = [Kind::Lora(2), Kind::Lora(8), Kind::Flora(1), Kind::Flora(4), Kind::Ia3Out, Kind::Ia3In];
    let fx = Fixture::new(d_in, d_out, &kinds, 31);
    let n_ad = kinds.len();
    for pattern in PATTERNS {
        let rows = rows_for(pattern, 40, n_ad, 32);
        let x = random_input(rows.len(), d_in, 33);
        for policy in [FloraPolicy::Vectorized, FloraPolicy::Merged, FloraPolicy::Auto] {
            let (y_all, dx_all, g_all) = run_with_vars(&fx, &(0..n_ad).collect::<Vec<_>>(), &x, &rows, policy);
            for ad in 0..n_ad {
                let mine: Vec<usize> = (0..rows.len()).filter(|&i| rows[i] == Some(ad as u32)).collect();
                if mine.is_empty() {
                    continue;
                }
                let xs: Vec<f32> = mine.iter().flat_map(|&i| x[i * d_in..(i + 1) * d_in].to_vec()).collect();
                let (y_one, dx_one, g_one) = run_with_vars(&fx, &[ad], &xs, &vec![Some(0); mine.len()], policy);
                for (k, &i) in mine.iter().enumerate() {
                    for o in 0..d_out {
                        let (a, b) = (y_all[i * d_out + o], y_one[k * d_out + o]);
                        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{pattern:?} {policy:?} adapter {ad}: output differs");
                    }
                    for c in 0..d_in {
                        let (a, b) = (dx_all[i * d_in + c], dx_one[k * d_in + c]);
                        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{pattern:?} {policy:?} adapter {ad}: dx differs");
                    }
                }
                // Var indices of adapter `ad` (LoRA/fLoRA own two vars, IA3 one).
                for vi in var_indices(&kinds, ad) {
                    let ga = g_all[vi].as_ref().expect("mixed-batch gradient");
                    let gb = g_one[vi].as_ref().expect("single-adapter gradient");
                    let scale = gb.iter().fold(1f32, |m, v| m.max(v.abs()));
                    for (a, b) in ga.iter().zip(gb) {
                        assert!((a - b).abs() <= 1e-4 * scale, "{pattern:?} {policy:?} adapter {ad}: param grad {a} vs {b}");
                    }
                }
            }
        }
    }
}

fn var_indices(kinds: &[Kind], ad: usize) -> std::ops::Range<usize> {
    let n_vars = |k: &Kind| if matches!(k, Kind::Ia3Out | Kind::Ia3In) { 1 } else { 2 };
    let start: usize = kinds[..ad].iter().map(n_vars).sum();
    start..start + n_vars(&kinds[ad])
}
