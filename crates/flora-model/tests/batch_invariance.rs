//! A sequence's logits must not depend on what else runs in its step: a seeded sampled request
//! then draws the same tokens however busy the server is. The real default model, in f32 and
//! bf16, with a context long enough for batch-1 attention to split its positions between the
//! threads, decoded alone and beside 2, 5 and 9 other sequences (3 rows: f32 products split
//! over k; 6 and 10 rows: split over columns, in full and partial register blocks), and beside
//! 4 others plus a 24-token prefill chunk (29 rows: the prefill blocking). The subject runs the
//! base model, then LoRA, IA3 and fLoRA adapters; the companions mix the base model, LoRA,
//! input-side IA3 and fLoRA, so their steps leave the path where every row enters the shared
//! GEMM unchanged.

mod common;

use common::random_adapter;
use flora_adapters::{AdapterKind, LoraTables, WeightFormat};
use flora_model::adapters::ModelAdapters;
use flora_model::{KvCache, Llama, Logits, Proj, SeqStep};

/// Slots of the packed adapters.
const LORA: u32 = 0;
const IA3: u32 = 1;
const FLORA: u32 = 2;

/// The subject's logits at each of its decode steps, beside `companions` other decoding
/// sequences and, with `chunk`, one more sequence prefilling `chunk` prompt tokens in every
/// step (through fLoRA).
fn subject_logits(model: &Llama, adapters: &ModelAdapters, subject: Option<u32>, companions: usize, chunk: Option<usize>) -> Vec<Vec<f32>> {
    let prompt: Vec<u32> = (0..140).map(|i| 100 + (i * 37) % 5000).collect();
    let mut cache = model.new_cache();
    model.step(&mut [SeqStep { tokens: &prompt, cache: &mut cache, slot: subject, logits: Logits::None }], Some(adapters)).unwrap();
    let slot_of = |i: usize| [None, Some(FLORA), Some(IA3), Some(LORA)][i % 4];
    let mut others: Vec<KvCache> = (0..companions).map(|_| model.new_cache()).collect();
    for (i, c) in others.iter_mut().enumerate() {
        let p: Vec<u32> = (0..5 + 7 * i as u32).map(|t| 200 + t * 13 + i as u32).collect();
        model.step(&mut [SeqStep { tokens: &p, cache: c, slot: slot_of(i), logits: Logits::None }], Some(adapters)).unwrap();
    }
    let vocab = model.config().vocab;
    let mut prefilling = model.new_cache();
    let long_prompt: Vec<u32> = (0..3 * chunk.unwrap_or(0)).map(|t| 400 + (t * 29) as u32 % 3000).collect();
    let mut out = Vec::new();
    for (s, token) in [17u32, 4242, 901].into_iter().enumerate() {
        let other_tokens: Vec<[u32; 1]> = (0..companions).map(|i| [(300 + 11 * i + s) as u32]).collect();
        let mut steps = vec![SeqStep { tokens: std::slice::from_ref(&token), cache: &mut cache, slot: subject, logits: Logits::Last }];
        for (i, (c, t)) in others.iter_mut().zip(&other_tokens).enumerate() {
            steps.push(SeqStep { tokens: t, cache: c, slot: slot_of(i), logits: Logits::Last });
        }
        if let Some(n) = chunk {
            steps.push(SeqStep { tokens: &long_prompt[s * n..(s + 1) * n], cache: &mut prefilling, slot: Some(FLORA), logits: Logits::Last });
        }
        // The subject in the middle of the step, not always its first row.
        let at = companions / 2;
        steps.swap(0, at);
        let rows = model.step_rows(&mut steps, Some(adapters)).unwrap();
        out.push(rows[at * vocab..(at + 1) * vocab].to_vec());
    }
    out
}

#[test]
fn a_sequences_logits_do_not_depend_on_its_step_companions() {
    let path = flora_model::default_model::resolve_model(None).expect("default model");
    let mut model = Llama::from_checkpoint(flora_model::weights::load(&path).unwrap()).unwrap();
    let cfg = model.config().clone();
    let adapters = [
        random_adapter(&cfg, AdapterKind::Lora, 8, &Proj::ALL, 1),
        random_adapter(&cfg, AdapterKind::Ia3, 1, &[Proj::K, Proj::V, Proj::Down], 2),
        random_adapter(&cfg, AdapterKind::Flora, 2, &[Proj::Q, Proj::V, Proj::Up], 3),
    ];
    // Two threads, as the CI machine has: f32 products of up to 4 rows split k in two parts,
    // and a lone decode row's attention splits its 140+ positions in two.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for (format, lora_tables) in [(WeightFormat::F32, LoraTables::Bf16), (WeightFormat::Bf16, LoraTables::Bf16), (WeightFormat::Bf16, LoraTables::Int8)] {
        if format == WeightFormat::F32 && !flora_adapters::cpu::has_avx512() {
            // f32 products then run on the general GEMM library, whose blocking follows the
            // row count (docs/model.md).
            continue;
        }
        model.set_weight_format(format).unwrap();
        model.set_lora_tables(lora_tables);
        let packed = model.pack_adapters(&adapters.iter().collect::<Vec<_>>()).unwrap();
        pool.install(|| {
            for subject in [None, Some(LORA), Some(IA3), Some(FLORA)] {
                let alone = subject_logits(&model, &packed, subject, 0, None);
                for (companions, chunk) in [(2, None), (5, None), (9, None), (4, Some(24))] {
                    let beside = subject_logits(&model, &packed, subject, companions, chunk);
                    for (s, (a, b)) in alone.iter().zip(&beside).enumerate() {
                        let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
                        assert_eq!(differ, 0, "{format} ({lora_tables} LoRA tables), subject slot {subject:?}: decode step {s} beside {companions} others and a prefill chunk of {chunk:?}: {differ} logits differ from the sequence alone");
                    }
                }
            }
        });
    }
}
