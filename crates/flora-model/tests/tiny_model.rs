//! On a tiny random model: ragged inference steps equal the full-sequence forward (batch
//! invariance across lengths, positions, chunking and adapters of every kind), identity adapters
//! give the base logits, and adapter directories round-trip bit-identically.

mod common;

use candle_core::Tensor;
use common::random_adapter;
use flora_adapters::init::{self, WeightRng};
use flora_adapters::{AdapterKind, AdapterWeights, WeightFormat};
use flora_model::adapters::{Adapter, ModelAdapters};
use flora_model::{Llama, LlamaConfig, Logits, Proj, SeqStep};
use std::collections::BTreeMap;

fn logits_rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

#[test]
fn ragged_steps_equal_full_forward_for_every_adapter_kind() {
    let cfg = LlamaConfig::tiny();
    let model = Llama::random(cfg.clone(), 1).unwrap();
    let all = Proj::ALL;
    let adapters = [
        random_adapter(&cfg, AdapterKind::Lora, 4, &all, 2),
        random_adapter(&cfg, AdapterKind::Flora, 2, &all, 3),
        random_adapter(&cfg, AdapterKind::Ia3, 1, &[Proj::K, Proj::V, Proj::Down], 4),
        random_adapter(&cfg, AdapterKind::Lora, 1, &[Proj::Q, Proj::V], 5),
    ];
    let packed = ModelAdapters::pack(&cfg, &adapters.iter().collect::<Vec<_>>()).unwrap();
    // (tokens, slot, first chunk length)
    let seqs: Vec<(Vec<u32>, Option<u32>, usize)> = vec![
        ((0..9).map(|i| (i * 7 + 3) % 97).collect(), Some(0), 4),
        ((0..5).map(|i| (i * 11 + 1) % 97).collect(), Some(1), 5),
        ((0..7).map(|i| (i * 5 + 2) % 97).collect(), None, 1),
        ((0..6).map(|i| (i * 13 + 4) % 97).collect(), Some(2), 3),
        ((0..8).map(|i| (i * 3 + 9) % 97).collect(), Some(3), 2),
        ((0..4).map(|i| (i * 17 + 5) % 97).collect(), Some(1), 1),
    ];
    let want: Vec<Vec<Vec<f32>>> = seqs
        .iter()
        .map(|(toks, slot, _)| {
            let l = model.forward_train(&[toks.clone()], &[*slot], Some(&packed)).unwrap();
            logits_rows(&l.squeeze(0).unwrap())
        })
        .collect();
    let mut caches: Vec<_> = seqs.iter().map(|_| model.new_cache()).collect();
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); seqs.len()];
    // Step 1: each sequence's first chunk; then one token per step (decode), all mixed.
    let mut done: Vec<usize> = vec![0; seqs.len()];
    loop {
        let active: Vec<usize> = (0..seqs.len()).filter(|&i| done[i] < seqs[i].0.len()).collect();
        if active.is_empty() {
            break;
        }
        let mut steps = Vec::new();
        let mut take = Vec::new();
        for (i, cache) in caches.iter_mut().enumerate() {
            if !active.contains(&i) {
                continue;
            }
            let n = if done[i] == 0 { seqs[i].2 } else { 1 };
            take.push((i, n));
            steps.push(SeqStep { tokens: &seqs[i].0[done[i]..done[i] + n], cache, slot: seqs[i].1, logits: Logits::All });
        }
        let logits = logits_rows(&model.step(&mut steps, Some(&packed)).unwrap());
        let mut row = 0;
        for (i, n) in take {
            got[i].extend_from_slice(&logits[row..row + n]);
            row += n;
            done[i] += n;
        }
    }
    for i in 0..seqs.len() {
        let d = max_diff(&got[i], &want[i]);
        assert!(d < 1e-4, "sequence {i}: ragged steps differ from the full forward by {d}");
    }
}

/// Logits of `seqs` (tokens, slot) each run alone in one step, and all of them in one ragged
/// step with prefill chunks and decode tokens mixed (first chunk of length `chunk`, then one
/// token per step).
fn alone_and_batched(
    model: &Llama,
    packed: &ModelAdapters,
    seqs: &[(Vec<u32>, Option<u32>)],
    chunk: usize,
) -> (Vec<Vec<Vec<f32>>>, Vec<Vec<Vec<f32>>>) {
    let alone = seqs
        .iter()
        .map(|(toks, slot)| {
            let mut cache = model.new_cache();
            let mut step = [SeqStep {
                tokens: toks,
                cache: &mut cache,
                slot: *slot,
                logits: Logits::All,
            }];
            logits_rows(&model.step(&mut step, Some(packed)).unwrap())
        })
        .collect();
    let mut caches: Vec<_> = seqs.iter().map(|_| model.new_cache()).collect();
    let mut batched: Vec<Vec<Vec<f32>>> = vec![Vec::new(); seqs.len()];
    let mut done = vec![0usize; seqs.len()];
    while (0..seqs.len()).any(|i| done[i] < seqs[i].0.len()) {
        let mut steps = Vec::new();
        let mut take = Vec::new();
        for (i, cache) in caches.iter_mut().enumerate() {
            if done[i] < seqs[i].0.len() {
                let n = if done[i] == 0 {
                    chunk.min(seqs[i].0.len())
                } else {
                    1
                };
                take.push((i, n));
                steps.push(SeqStep {
                    tokens: &seqs[i].0[done[i]..done[i] + n],
                    cache,
                    slot: seqs[i].1,
                    logits: Logits::All,
                });
            }
        }
        let logits = logits_rows(&model.step(&mut steps, Some(packed)).unwrap());
        let mut row = 0;
        for (i, n) in take {
            batched[i].extend_from_slice(&logits[row..row + n]);
            row += n;
            done[i] += n;
        }
    }
    (alone, batched)
}

#[test]
fn bf16_weights_are_batch_invariant_and_close_to_f32() {
    let cfg = LlamaConfig::tiny();
    let mut model = Llama::random(cfg.clone(), 11).unwrap();
    let adapters = [
        random_adapter(&cfg, AdapterKind::Lora, 4, &Proj::ALL, 12),
        random_adapter(&cfg, AdapterKind::Flora, 2, &Proj::ALL, 13),
        random_adapter(
            &cfg,
            AdapterKind::Ia3,
            1,
            &[Proj::K, Proj::V, Proj::Down],
            14,
        ),
    ];
    let packed = ModelAdapters::pack(&cfg, &adapters.iter().collect::<Vec<_>>()).unwrap();
    let seqs: Vec<(Vec<u32>, Option<u32>)> = vec![
        ((0..9).map(|i| (i * 7 + 3) % 97).collect(), Some(0)),
        ((0..6).map(|i| (i * 11 + 1) % 97).collect(), Some(1)),
        ((0..7).map(|i| (i * 5 + 2) % 97).collect(), None),
        ((0..5).map(|i| (i * 13 + 4) % 97).collect(), Some(2)),
    ];
    let (f32_alone, f32_batched) = alone_and_batched(&model, &packed, &seqs, 3);
    // Rows of the base model and of IA3 get the same bits alone and batched (the f32 kernel's
    // arithmetic does not follow the row count where AVX-512 runs it); f32 LoRA switches from
    // row loops to GEMMs past 4 rows of a slot, and fLoRA's execution is chosen per batch.
    for i in [2, 3] {
        if flora_adapters::cpu::has_avx512() {
            assert_eq!(f32_batched[i], f32_alone[i], "f32 sequence {i}: batched vs alone");
        }
    }
    model
        .set_weight_format(flora_adapters::WeightFormat::Bf16)
        .unwrap();
    assert_eq!(model.weight_format(), flora_adapters::WeightFormat::Bf16);
    // Packed for bf16 inference: decode rows read the adapter tables' bf16 copy.
    let packed16 = model
        .pack_adapters(&adapters.iter().collect::<Vec<_>>())
        .unwrap();
    let (alone, batched) = alone_and_batched(&model, &packed16, &seqs, 3);
    for i in 0..seqs.len() {
        let scale = f32_alone[i]
            .iter()
            .flatten()
            .fold(1f32, |a, v| a.max(v.abs()));
        // bf16 base GEMM, LoRA and IA3 rows: the same bits alone and batched; fLoRA's
        // execution (merged or vectorized) is chosen per batch: f32 sums in another order.
        let d = max_diff(&batched[i], &alone[i]);
        if seqs[i].1 == Some(1) {
            assert!(d < 1e-4 * scale, "sequence {i}: bf16 batched vs alone differ by {d}");
        } else {
            assert_eq!(batched[i], alone[i], "sequence {i}: bf16 batched vs alone");
        }
        // bf16 rounding of weights and inputs (2^-9 relative each) over the tiny model's layers.
        let d = max_diff(&alone[i], &f32_alone[i]);
        assert!(
            d < 3e-2 * scale && d > 0.0,
            "sequence {i}: bf16 vs f32 logits differ by {d} (scale {scale})"
        );
    }
    // Back to f32: exactly the f32 results again.
    model
        .set_weight_format(flora_adapters::WeightFormat::F32)
        .unwrap();
    let (again, _) = alone_and_batched(&model, &packed, &seqs, 3);
    assert_eq!(again, f32_alone);
}

#[test]
fn identity_adapters_give_base_logits() {
    let cfg = LlamaConfig::tiny();
    let model = Llama::random(cfg.clone(), 7).unwrap();
    let dev = candle_core::Device::Cpu;
    let mut rng = WeightRng::new(8);
    let mut mk = |kind: AdapterKind| {
        let mut weights = BTreeMap::new();
        for layer in 0..cfg.n_layers {
            for p in Proj::ALL {
                let (di, dout) = p.dims(&cfg);
                let w: AdapterWeights = match kind {
                    AdapterKind::Lora => init::lora_identity(4, di, dout, 8.0, &mut rng, &dev),
                    AdapterKind::Flora => init::flora_identity(4, di, dout, 0.1, &mut rng, &dev),
                    AdapterKind::Ia3 => init::ia3_identity(dout, false, &dev),
                }
                .unwrap();
                weights.insert((layer, p), w);
            }
        }
        Adapter { name: kind.to_string(), kind, rank: 4, weights }
    };
    let adapters = [mk(AdapterKind::Lora), mk(AdapterKind::Flora), mk(AdapterKind::Ia3)];
    let packed = ModelAdapters::pack(&cfg, &adapters.iter().collect::<Vec<_>>()).unwrap();
    let toks: Vec<u32> = (0..10).map(|i| (i * 7 + 1) % 97).collect();
    let base = logits_rows(&model.forward_train(&[toks.clone()], &[None], None).unwrap().squeeze(0).unwrap());
    for slot in 0..3u32 {
        let l = logits_rows(&model.forward_train(&[toks.clone()], &[Some(slot)], Some(&packed)).unwrap().squeeze(0).unwrap());
        let d = max_diff(&l, &base);
        assert!(d < 1e-4, "identity {} adapter changes logits by {d}", adapters[slot as usize].kind);
    }
    // The inference step, in both weight formats: LoRA's zero B adds exact zeros and IA3's
    // ones scale exactly, so their logits are the base's bits; fLoRA's mean of r components
    // equals the base up to rounding (in bf16, of the inputs the components multiply; measured
    // 7e-7 in f32 and 1.7e-2 in bf16).
    let mut model = model;
    for (format, flora_tol) in [(WeightFormat::F32, 1e-4), (WeightFormat::Bf16, 5e-2)] {
        model.set_weight_format(format).unwrap();
        let packed = model.pack_adapters(&adapters.iter().collect::<Vec<_>>()).unwrap();
        let step = |slot: Option<u32>| {
            let mut cache = model.new_cache();
            let l = model.step(&mut [SeqStep { tokens: &toks, cache: &mut cache, slot, logits: Logits::All }], Some(&packed)).unwrap();
            logits_rows(&l)
        };
        let base = step(None);
        for slot in 0..3u32 {
            let kind = adapters[slot as usize].kind;
            let l = step(Some(slot));
            if kind == AdapterKind::Flora {
                let d = max_diff(&l, &base);
                assert!(d < flora_tol, "{format}: identity fLoRA adapter changes step logits by {d}");
            } else {
                assert_eq!(l, base, "{format}: identity {kind} adapter must give the base's step logits exactly");
            }
        }
    }
}

#[test]
fn adapter_directories_round_trip_bit_identically() {
    let cfg = LlamaConfig::tiny();
    let dir = std::env::temp_dir().join(format!("flora-adapter-rt-{}", std::process::id()));
    for (i, a) in [
        random_adapter(&cfg, AdapterKind::Lora, 3, &Proj::ALL, 11),
        random_adapter(&cfg, AdapterKind::Flora, 2, &[Proj::Q, Proj::K], 12),
        random_adapter(&cfg, AdapterKind::Ia3, 1, &[Proj::K, Proj::V, Proj::Down], 13),
    ]
    .iter()
    .enumerate()
    {
        let path = dir.join(format!("a{i}"));
        flora_model::peft::save_adapter_dir(a, &path, Some(6.0)).unwrap();
        let back = flora_model::peft::load_adapter_dir(&path, &a.name, &cfg).unwrap();
        assert_eq!(back.kind, a.kind);
        assert_eq!(back.rank, a.rank);
        assert_eq!(back.weights.len(), a.weights.len());
        for (k, w) in &a.weights {
            let flat = |w: &AdapterWeights| -> Vec<f32> {
                let ts: Vec<&Tensor> = match w {
                    AdapterWeights::Lora { a, b, .. } | AdapterWeights::Flora { a, b } => vec![a, b],
                    AdapterWeights::Ia3 { l, .. } => vec![l],
                };
                ts.iter().flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
            };
            assert_eq!(flat(w), flat(&back.weights[k]), "{k:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let cfg = LlamaConfig::tiny();
    let model = Llama::random(cfg.clone(), 1).unwrap();
    let err = model.forward_train(&[vec![1, 2, 500]], &[None], None).unwrap_err().to_string();
    assert!(err.contains("500") && err.contains("vocabulary"), "{err}");
    let mut cache = model.new_cache();
    let long: Vec<u32> = vec![1; cfg.context + 1];
    let err = model.step(&mut [SeqStep { tokens: &long, cache: &mut cache, slot: None, logits: Logits::Last }], None).unwrap_err().to_string();
    assert!(err.contains("context"), "{err}");
    let err = match flora_model::weights::load(std::path::Path::new("/nonexistent/model.gguf")) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("loading a missing file must fail"),
    };
    assert!(err.contains("no such file"), "{err}");
}

#[test]
fn long_batch_1_decode_equals_the_full_forward() {
    // A lone decode row with over 128 cached positions has its attention split over positions
    // across threads and merged (flash-decoding); it must give the full forward's logits. Both
    // attention kernels: head size 8 (generic) and 64 (the vectorized one).
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    for head_dim in [8, 64] {
        let cfg = LlamaConfig { context: 320, head_dim, ..LlamaConfig::tiny() };
        let model = Llama::random(cfg.clone(), 21).unwrap();
        let adapter = random_adapter(&cfg, AdapterKind::Lora, 2, &Proj::ALL, 22);
        let packed = model.pack_adapters(&[&adapter]).unwrap();
        let tokens: Vec<u32> = (0..300).map(|i| (i * 31 + 7) % 97).collect();
        let want = logits_rows(&model.forward_train(&[tokens.clone()], &[Some(0)], Some(&packed)).unwrap().squeeze(0).unwrap());
        let (prompt, rest) = tokens.split_at(150);
        let mut cache = model.new_cache();
        let got = pool.install(|| {
            let mut got = logits_rows(&model.step(&mut [SeqStep { tokens: prompt, cache: &mut cache, slot: Some(0), logits: Logits::All }], Some(&packed)).unwrap());
            for t in rest.chunks(1) {
                got.extend(logits_rows(&model.step(&mut [SeqStep { tokens: t, cache: &mut cache, slot: Some(0), logits: Logits::Last }], Some(&packed)).unwrap()));
            }
            got
        });
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "head size {head_dim}: batch-1 decode differs from the full forward by {d}");
    }
}

#[test]
fn bf16_models_keep_a_bf16_kv_cache_and_read_older_f32_caches() {
    let cfg = LlamaConfig::tiny();
    let mut model = Llama::random(cfg.clone(), 21).unwrap();
    let prompt: Vec<u32> = (0..12).map(|i| (i * 7 + 5) % 97).collect();
    let run = |model: &Llama, cache: &mut flora_model::KvCache| -> Vec<f32> {
        let mut l = model.step_rows(&mut [SeqStep { tokens: &prompt, cache: &mut *cache, slot: None, logits: Logits::Last }], None).unwrap();
        l.extend(model.step_rows(&mut [SeqStep { tokens: &[3], cache, slot: None, logits: Logits::Last }], None).unwrap());
        l
    };
    let mut f32_cache = model.new_cache();
    assert!(!f32_cache.is_bf16());
    let f32_logits = run(&model, &mut f32_cache);
    model.set_weight_format(flora_adapters::WeightFormat::Bf16).unwrap();
    let mut cache = model.new_cache();
    assert!(cache.is_bf16());
    let bf16_logits = run(&model, &mut cache);
    // Reserved room is the whole budget up front and is not outgrown by the steps.
    let mut reserved = model.new_cache();
    reserved.reserve(13);
    let held = reserved.bytes();
    assert_eq!(held, 13 * model.kv_bytes_per_token());
    assert_eq!(run(&model, &mut reserved), bf16_logits);
    assert_eq!(reserved.bytes(), held);
    // Half the bytes per token, as the model reports them (the server sizes its budget so).
    assert_eq!(model.kv_bytes_per_token() * 2, cfg.n_layers * cfg.kv_dim() * 2 * 4);
    assert!(cache.bytes() >= 13 * model.kv_bytes_per_token() && cache.bytes() < f32_cache.bytes(), "{} vs {}", cache.bytes(), f32_cache.bytes());
    // A cache made in f32 before the switch is read in its own format by the bf16 model.
    let mut old = Llama::random(cfg.clone(), 21).unwrap().new_cache();
    let mixed = run(&model, &mut old);
    let scale = f32_logits.iter().fold(1f32, |a, v| a.max(v.abs()));
    for (what, got) in [("bf16 cache", &bf16_logits), ("f32 cache, bf16 weights", &mixed)] {
        let d = got.iter().zip(&f32_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d < 3e-2 * scale && d > 0.0, "{what}: logits differ from f32 by {d} (scale {scale})");
    }
    assert_ne!(bf16_logits, mixed, "the two caches hold different values");
}
