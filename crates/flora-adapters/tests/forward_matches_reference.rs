//! Every fast forward path equals the dense per-row reference, across shapes, mixed kinds and
//! ranks, popularity patterns, base rows, 1 row and 1000 rows.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use flora_adapters::{adapted_linear, adapted_linear_rows, AdapterBatch, BaseWeight, ExecOptions, FloraPolicy, LoraTables, WeightFormat};

const POLICIES: [FloraPolicy; 3] = [FloraPolicy::Vectorized, FloraPolicy::Merged, FloraPolicy::Auto];

/// One adapter of every kind at ranks 1..64, so every batch mixes kinds and ranks.
fn mixed_kinds() -> Vec<Kind> {
    let mut kinds = Vec::new();
    for r in [1, 2, 3, 4, 8, 16, 33, 64] {
        kinds.push(Kind::Lora(r));
        kinds.push(Kind::Flora(r));
    }
    kinds.push(Kind::Ia3Out);
    kinds.push(Kind::Ia3In);
    kinds
}

/// Both LoRA table formats of bf16 inference.
const LORA_TABLES: [LoraTables; 2] = [LoraTables::Bf16, LoraTables::Int8];

/// The seam's output in f32, or in bf16 (base weight and adapter tables, LoRA's stored as
/// `bf16` says); the tensor entry point and the plain-rows one (`adapted_linear_rows`, the
/// inference step's) must agree bit for bit.
fn run_in(fx: &Fixture, x: &[f32], batch: &AdapterBatch, policy: FloraPolicy, bf16: Option<LoraTables>) -> Vec<f32> {
    let format = if bf16.is_some() { WeightFormat::Bf16 } else { WeightFormat::F32 };
    let n = batch.n_rows();
    let xt = Tensor::from_vec(x.to_vec(), (n, fx.d_in), &Device::Cpu).unwrap();
    let mut base = BaseWeight::from_out_in(&fx.w0_tensor()).unwrap();
    base.set_format(format).unwrap();
    let opts = ExecOptions { flora: policy, ..Default::default() };
    // bf16 inference also gives the adapter tables a bf16 copy that decode rows stream.
    let layer = match bf16 {
        Some(lora) => fx.layer.with_bf16_tables(lora).unwrap(),
        None => fx.layer.clone(),
    };
    let y = adapted_linear(&xt, &base, batch, Some(&layer), &opts).unwrap();
    assert_eq!(y.dims(), &[n, fx.d_out]);
    let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let rows = adapted_linear_rows(x, &base, batch, Some(&layer), &opts).unwrap();
    assert!(rows == y, "adapted_linear_rows differs from adapted_linear ({format}, LoRA tables {bf16:?})");
    y
}

fn run(fx: &Fixture, x: &[f32], batch: &AdapterBatch, policy: FloraPolicy) -> Vec<f32> {
    run_in(fx, x, batch, policy, None)
}

fn check(d_in: usize, d_out: usize, n_rows: usize, seed: u64) {
    let fx = Fixture::new(d_in, d_out, &mixed_kinds(), seed);
    let n_adapters = fx.weights.len();
    for (pi, pattern) in PATTERNS.iter().enumerate() {
        let batch = AdapterBatch::from_row_slots(rows_for(*pattern, n_rows, n_adapters, seed + pi as u64));
        let x = random_input(n_rows, d_in, seed + 100 + pi as u64);
        let want = fx.reference(&x, &batch);
        for policy in POLICIES {
            let got = run(&fx, &x, &batch, policy);
            let err = max_rel_err(&got, &want);
            assert!(err < 2e-4, "{d_in}x{d_out}, {n_rows} rows, {pattern:?}, {policy:?}: max rel err {err}");
        }
        // bf16 base weights: the shared GEMM's inputs and weights rounded to 8 significant bits
        // (LoRA tables in bf16 or in 8 bits).
        let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
        for lora in LORA_TABLES {
            let got = run_in(&fx, &x, &batch, FloraPolicy::Auto, Some(lora));
            let err = got.iter().zip(&want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max) / scale;
            assert!(err < 2e-2, "{d_in}x{d_out}, {n_rows} rows, {pattern:?}, bf16 ({lora} LoRA): max err {err} of the largest output");
        }
    }
}

#[test]
fn odd_dims_one_row() {
    check(577, 129, 1, 1);
}

#[test]
fn odd_dims_few_rows() {
    check(577, 129, 37, 2);
}

#[test]
fn square_decode_batch() {
    check(64, 64, 32, 3);
}

#[test]
fn thousand_rows() {
    check(40, 24, 1000, 4);
}

#[test]
fn wide_output_skinny_path() {
    // d_out large enough for the AVX-512 skinny kernel's column panels, with ragged tails.
    check(96, 200, 64, 5);
}

#[test]
fn base_only_and_no_adapters() {
    let fx = Fixture::new(33, 17, &[Kind::Lora(2)], 7);
    let batch = AdapterBatch::base_only(5);
    let x = random_input(5, 33, 8);
    let want = fx.reference(&x, &batch);
    let got = run(&fx, &x, &batch, FloraPolicy::Auto);
    assert!(max_rel_err(&got, &want) < 1e-5);
    // `None` adapters: plain base projection.
    let xt = Tensor::from_vec(x.clone(), (5, 33), &Device::Cpu).unwrap();
    let base = BaseWeight::from_out_in(&fx.w0_tensor()).unwrap();
    let y = adapted_linear(&xt, &base, &batch, None, &ExecOptions::default()).unwrap();
    assert!(max_rel_err(&y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &want) < 1e-5);
}

#[test]
fn leading_dims_are_rows() {
    let fx = Fixture::new(16, 8, &[Kind::Flora(2), Kind::Lora(3)], 9);
    let rows = vec![Some(0), Some(0), Some(1), None, Some(1), Some(0)];
    let batch = AdapterBatch::from_row_slots(rows);
    let x = random_input(6, 16, 10);
    let xt = Tensor::from_vec(x.clone(), (2, 3, 16), &Device::Cpu).unwrap();
    let base = BaseWeight::from_out_in(&fx.w0_tensor()).unwrap();
    let y = adapted_linear(&xt, &base, &batch, Some(&fx.layer), &ExecOptions::default()).unwrap();
    assert_eq!(y.dims(), &[2, 3, 8]);
    assert!(max_rel_err(&y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &fx.reference(&x, &batch)) < 1e-5);
}

#[test]
fn lora_gather_bmm_baseline_matches_reference() {
    let (d_in, d_out, r, n_ad, n) = (48, 40, 4, 5, 23);
    let fx = Fixture::new(d_in, d_out, &vec![Kind::Lora(r); n_ad], 11);
    let rows = rows_for(Pattern::Zipf, n, n_ad, 12);
    let batch = AdapterBatch::from_row_slots(rows.clone());
    let x = random_input(n, d_in, 13);
    let dev = Device::Cpu;
    let (mut a_all, mut b_all) = (Vec::new(), Vec::new());
    let mut scale = 0.0;
    for w in &fx.weights {
        if let flora_adapters::AdapterWeights::Lora { a, b, scale: s } = w {
            a_all.push(a.clone());
            b_all.push(b.clone());
            scale = *s;
        }
    }
    let idx = Tensor::from_vec(rows.iter().map(|s| s.unwrap()).collect::<Vec<u32>>(), n, &dev).unwrap();
    let xt = Tensor::from_vec(x.clone(), (n, d_in), &dev).unwrap();
    let w0t = fx.w0_tensor().t().unwrap().contiguous().unwrap();
    let y = flora_adapters::baseline::lora_gather_bmm(&xt, &w0t, &Tensor::stack(&a_all, 0).unwrap(), &Tensor::stack(&b_all, 0).unwrap(), &idx, scale as f64).unwrap();
    assert!(max_rel_err(&y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &fx.reference(&x, &batch)) < 1e-5);
}

#[test]
fn identity_initializations_give_the_base_output() {
    use flora_adapters::init;
    let (d_in, d_out) = (31, 23);
    let dev = Device::Cpu;
    let mut rng = init::WeightRng::new(5);
    let weights = vec![
        init::flora_identity(1, d_in, d_out, 0.1, &mut rng, &dev).unwrap(),
        init::flora_identity(4, d_in, d_out, 0.1, &mut rng, &dev).unwrap(),
        init::lora_identity(8, d_in, d_out, 16.0, &mut rng, &dev).unwrap(),
        init::ia3_identity(d_out, false, &dev).unwrap(),
        init::ia3_identity(d_in, true, &dev).unwrap(),
    ];
    let layer = pack("id.proj", d_in, d_out, &weights);
    // The fLoRA start breaks symmetry: rank components differ.
    if let flora_adapters::AdapterWeights::Flora { b, .. } = &weights[1] {
        let b: Vec<Vec<f32>> = b.to_vec2().unwrap();
        assert!(b[0] != b[1], "rank components must differ at init");
    }
    let w0 = init::WeightRng::new(77).uniform(d_out * d_in, 0.3);
    let w0t = Tensor::from_vec(w0, (d_out, d_in), &dev).unwrap();
    let base = BaseWeight::from_out_in(&w0t).unwrap();
    let n = 10;
    let x = Tensor::from_vec(random_input(n, d_in, 3), (n, d_in), &dev).unwrap();
    let y_base: Vec<f32> = x.matmul(&w0t.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for slot in 0..weights.len() as u32 {
        for policy in POLICIES {
            let opts = ExecOptions { flora: policy, ..Default::default() };
            let y = adapted_linear(&x, &base, &AdapterBatch::uniform(n, slot), Some(&layer), &opts).unwrap();
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            let err = y.iter().zip(&y_base).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-5, "slot {slot} {policy:?}: identity init differs from base by {err}");
        }
    }
}

#[test]
fn bf16_lora_beside_the_gemm_matches_the_reference() {
    // LoRA (every rank) and IA3-out only: every row enters the base GEMM unchanged, so decode
    // rows' LoRA runs beside the bf16 GEMM (bf16 tables, inputs rounded to bf16). The adapters'
    // contribution (output minus the base-only output) must match the reference's within bf16
    // precision of that contribution, not merely of the whole output.
    let mut kinds: Vec<Kind> = [1, 2, 3, 4, 8, 16, 33, 64].into_iter().map(Kind::Lora).collect();
    kinds.push(Kind::Ia3Out);
    for (d_in, d_out, n_rows) in [(577, 129, 1), (64, 64, 32), (576, 1536, 9), (1536, 576, 33)] {
        let fx = Fixture::new(d_in, d_out, &kinds, 40);
        for (pi, pattern) in PATTERNS.iter().enumerate() {
            let batch = AdapterBatch::from_row_slots(rows_for(*pattern, n_rows, kinds.len(), 41 + pi as u64));
            let base_only = AdapterBatch::base_only(n_rows);
            let x = random_input(n_rows, d_in, 42 + pi as u64);
            for lora in LORA_TABLES {
                let got = run_in(&fx, &x, &batch, FloraPolicy::Auto, Some(lora));
                let got_base = run_in(&fx, &x, &base_only, FloraPolicy::Auto, Some(lora));
                let (want, want_base) = (fx.reference(&x, &batch), fx.reference(&x, &base_only));
                let delta = |a: f64, b: f64| a - b;
                let scale = want.iter().zip(&want_base).fold(1e-6f64, |m, (w, b)| m.max(delta(*w, *b).abs()));
                let err = (0..got.len())
                    .map(|i| (delta(got[i] as f64, got_base[i] as f64) - delta(want[i], want_base[i])).abs())
                    .fold(0.0, f64::max)
                    / scale;
                assert!(err < 2e-2, "{d_in}x{d_out}, {n_rows} rows, {pattern:?}, {lora} LoRA: adapter terms off by {err} of the largest");
            }
        }
    }
}

#[test]
fn projections_sharing_an_input_equal_one_call_each() {
    // `adapted_linear_rows_many` (a block's q/k/v or gate/up): pooled where every projection is
    // bf16 with output-side adapters, one by one otherwise; either way bit for bit the outputs
    // of one `adapted_linear_rows` call per projection.
    let lora: Vec<Kind> = [1, 4, 8, 33].into_iter().map(Kind::Lora).chain([Kind::Ia3Out]).collect();
    let with_flora: Vec<Kind> = lora.iter().copied().chain([Kind::Flora(2), Kind::Ia3In]).collect();
    let d_in = 96;
    for (kinds, n_rows) in [(&lora, 1), (&lora, 7), (&lora, 40), (&with_flora, 7)] {
        let fixtures: Vec<Fixture> = [(96, 11), (48, 12), (200, 13)].iter().map(|&(d_out, seed)| Fixture::new(d_in, d_out, kinds, seed)).collect();
        for bf16 in [None, Some(LoraTables::Bf16), Some(LoraTables::Int8)] {
            let format = if bf16.is_some() { WeightFormat::Bf16 } else { WeightFormat::F32 };
            let bases: Vec<BaseWeight> = fixtures
                .iter()
                .map(|fx| {
                    let mut b = BaseWeight::from_out_in(&fx.w0_tensor()).unwrap();
                    b.set_format(format).unwrap();
                    b
                })
                .collect();
            let layers: Vec<_> = fixtures.iter().map(|fx| bf16.map_or_else(|| fx.layer.clone(), |lora| fx.layer.with_bf16_tables(lora).unwrap())).collect();
            for (pi, pattern) in PATTERNS.iter().enumerate() {
                let batch = AdapterBatch::from_row_slots(rows_for(*pattern, n_rows, kinds.len(), 50 + pi as u64));
                let x = random_input(n_rows, d_in, 60 + pi as u64);
                let opts = ExecOptions::default();
                // The middle projection has no adapter (a module the adapters do not target).
                let projections: Vec<(&BaseWeight, Option<&flora_adapters::LayerAdapters>)> =
                    bases.iter().zip(&layers).enumerate().map(|(i, (b, l))| (b, (i != 1).then_some(l))).collect();
                let many = flora_adapters::adapted_linear_rows_many(&x, &projections, &batch, &opts).unwrap();
                assert_eq!(many.len(), projections.len());
                for (i, (&(b, l), got)) in projections.iter().zip(&many).enumerate() {
                    let one = adapted_linear_rows(&x, b, &batch, l, &opts).unwrap();
                    assert!(*got == one, "{format}, {n_rows} rows, {pattern:?}, projection {i}: pooled output differs (LoRA tables {bf16:?})");
                }
            }
        }
    }
}

#[test]
fn pooled_decode_on_an_arena_matches_one_call_each_and_the_reference() {
    // q/k/v-like bf16 projections big enough that decode GEMMs split into per-thread shares,
    // their weights laid out in a decode arena for 1-3 threads and used from pools of 1-3
    // threads inside a step's team: pooled outputs equal one call per projection on weights
    // packed alone, bit for bit, and the f64 reference within bf16 precision.
    let mut kinds: Vec<Kind> = [1, 4, 8, 33].into_iter().map(Kind::Lora).collect();
    kinds.push(Kind::Ia3Out);
    let d_in = 577;
    let fixtures: Vec<Fixture> = [(600, 1), (129, 2), (1000, 3)].iter().map(|&(d_out, seed)| Fixture::new(d_in, d_out, &kinds, seed)).collect();
    let bf16_bases = || -> Vec<BaseWeight> {
        fixtures
            .iter()
            .map(|fx| {
                let mut b = BaseWeight::from_out_in(&fx.w0_tensor()).unwrap();
                b.set_format(WeightFormat::Bf16).unwrap();
                b
            })
            .collect()
    };
    let alone = bf16_bases();
    let opts = ExecOptions::default();
    for (lora, n_rows) in [(LoraTables::Bf16, 1), (LoraTables::Bf16, 5), (LoraTables::Bf16, 9), (LoraTables::Int8, 1), (LoraTables::Int8, 9)] {
        let layers: Vec<_> = fixtures.iter().map(|fx| fx.layer.with_bf16_tables(lora).unwrap()).collect();
        for (pi, pattern) in PATTERNS.iter().enumerate() {
            let batch = AdapterBatch::from_row_slots(rows_for(*pattern, n_rows, kinds.len(), 70 + pi as u64));
            let x = random_input(n_rows, d_in, 80 + pi as u64);
            let want: Vec<Vec<f64>> = fixtures.iter().map(|fx| fx.reference(&x, &batch)).collect();
            for arena_threads in 1..=3 {
                let mut arranged = bf16_bases();
                rayon::ThreadPoolBuilder::new().num_threads(arena_threads).build().unwrap().install(|| {
                    BaseWeight::arrange_bf16_for_decode(&mut arranged.iter_mut().collect::<Vec<_>>());
                });
                for pool_threads in 1..=3 {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(pool_threads).build().unwrap();
                    let projections: Vec<_> = arranged.iter().zip(&layers).map(|(b, l)| (b, Some(l))).collect();
                    let many = pool.install(|| flora_adapters::cpu::team::with_team(|| flora_adapters::adapted_linear_rows_many(&x, &projections, &batch, &opts).unwrap()));
                    for (i, ((base, layer), got)) in alone.iter().zip(&layers).zip(&many).enumerate() {
                        let one = pool.install(|| adapted_linear_rows(&x, base, &batch, Some(layer), &opts).unwrap());
                        let what = format!("{lora} LoRA, {n_rows} rows, {pattern:?}, arena {arena_threads}, pool {pool_threads}, projection {i}");
                        assert!(*got == one, "{what}: pooled output differs from one call");
                        let scale = want[i].iter().fold(1f64, |m, v| m.max(v.abs()));
                        let err = got.iter().zip(&want[i]).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max) / scale;
                        assert!(err < 2e-2, "{what}: {err} of the largest output off the reference");
                    }
                }
            }
        }
    }
}
