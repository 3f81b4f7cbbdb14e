//! Trained adapters written by flora (PEFT layout for LoRA and IA3, flora's for fLoRA) load back
//! bit-identically and give the trained model's logits. (PEFT-made adapters loading with PEFT's
//! logits: crates/flora-model/tests/smollm2_peft.rs against testdata/peft.)

mod common;

use common::*;
use flora_adapters::{AdapterKind, AdapterWeights};
use flora_model::{peft, ModelAdapters, Proj};
use flora_train::optim::AdamWConfig;
use flora_train::{TrainAdapter, TrainOptions, Trainer};

fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

#[test]
fn trained_adapters_save_and_load_bit_identically_for_each_kind() {
    let model = tiny_model();
    let cfg = model.config().clone();
    let specs = [
        spec("lora", AdapterKind::Lora, 3, &[Proj::Q, Proj::K, Proj::O], 1e-2),
        spec("flora", AdapterKind::Flora, 2, &[Proj::Q, Proj::K, Proj::Up], 1e-2),
        spec("ia3", AdapterKind::Ia3, 1, &[Proj::K, Proj::V, Proj::Down], 1e-2),
    ];
    let ads = specs.iter().map(|s| TrainAdapter::init(s, &cfg, 2).unwrap()).collect();
    let train = (0..9).map(|i| random_example(i % 3, 8, 1, 300 + i as u64)).collect();
    let opts = TrainOptions { steps: 4, batch_size: 3, grad_accum: 1, warmup: 0, min_lr_ratio: 0.0, seed: 1, adamw: AdamWConfig::default(), pad_id: 0 };
    let mut tr = Trainer::new(&model, ads, train, opts).unwrap();
    while !tr.done() {
        tr.train_step().unwrap();
    }
    let dir = std::env::temp_dir().join(format!("flora-train-roundtrip-{}", std::process::id()));
    let tokens = vec![(0..10).map(|i| (i * 7 + 1) % 97).collect::<Vec<u32>>()];
    for (ad, snap) in tr.adapters.iter().zip(tr.snapshots().unwrap()) {
        let path = dir.join(&ad.spec.name);
        peft::save_adapter_dir(&snap, &path, ad.spec.alpha).unwrap();
        let back = peft::load_adapter_dir(&path, &ad.spec.name, &cfg).unwrap();
        assert_eq!(back.kind, snap.kind);
        assert_eq!(back.rank, snap.rank);
        assert_eq!(back.weights.keys().collect::<Vec<_>>(), snap.weights.keys().collect::<Vec<_>>());
        let mut moved = false;
        for (k, w) in &snap.weights {
            let (x, y) = match (w, &back.weights[k]) {
                (AdapterWeights::Lora { a, b, scale }, AdapterWeights::Lora { a: a2, b: b2, scale: s2 }) => {
                    assert_eq!(scale.to_bits(), s2.to_bits(), "{k:?}: LoRA scale");
                    (vec![bits(a), bits(b)], vec![bits(a2), bits(b2)])
                }
                (AdapterWeights::Flora { a, b }, AdapterWeights::Flora { a: a2, b: b2 }) => (vec![bits(a), bits(b)], vec![bits(a2), bits(b2)]),
                (AdapterWeights::Ia3 { l, on_input }, AdapterWeights::Ia3 { l: l2, on_input: o2 }) => {
                    assert_eq!(on_input, o2, "{k:?}: IA3 side");
                    (vec![bits(l)], vec![bits(l2)])
                }
                _ => panic!("{k:?}: kind changed"),
            };
            assert_eq!(x, y, "{} {k:?}: weights differ after save/load", ad.spec.name);
            moved |= x.iter().flatten().any(|&b| b != 1f32.to_bits() && b != 0);
        }
        assert!(moved, "{}: weights look untrained", ad.spec.name);
        // Same logits from the loaded directory as from the trained weights.
        let l1 = model.forward_train(&tokens, &[Some(0)], Some(&ModelAdapters::pack(&cfg, &[&snap]).unwrap())).unwrap();
        let l2 = model.forward_train(&tokens, &[Some(0)], Some(&ModelAdapters::pack(&cfg, &[&back]).unwrap())).unwrap();
        assert_eq!(bits(&l1), bits(&l2), "{}: logits differ", ad.spec.name);
    }
    let _ = std::fs::remove_dir_all(dir);
}
