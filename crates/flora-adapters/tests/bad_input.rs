//! Bad inputs get clear errors naming the layer and adapter, never a panic in a kernel.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use flora_adapters::{adapted_linear, AdapterBatch, AdapterWeights, BaseWeight, ExecOptions, LayerAdapters};

fn try_pack(w: AdapterWeights, d_in: usize, d_out: usize) -> String {
    match LayerAdapters::pack("layers.3.q_proj", d_in, d_out, &[Some(("my-adapter", &w))], &Device::Cpu) {
        Ok(_) => panic!("packing should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn shape_mismatch_rank_zero_and_non_finite_are_refused() {
    let dev = Device::Cpu;
    let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s, &dev).unwrap();
    let msg = try_pack(AdapterWeights::Lora { a: t(vec![0.0; 2 * 7], &[2, 7]), b: t(vec![0.0; 5 * 2], &[5, 2]), scale: 1.0 }, 8, 5);
    assert!(msg.contains("layers.3.q_proj") && msg.contains("my-adapter") && msg.contains("lora A"), "{msg}");
    let msg = try_pack(AdapterWeights::Lora { a: t(vec![], &[0, 8]), b: t(vec![], &[5, 0]), scale: 1.0 }, 8, 5);
    assert!(msg.contains("rank"), "{msg}");
    let msg = try_pack(AdapterWeights::Flora { a: t(vec![1.0; 5], &[1, 5]), b: t(vec![1.0, f32::NAN, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], &[1, 8]) }, 8, 5);
    assert!(msg.contains("non-finite") && msg.contains("my-adapter"), "{msg}");
    let msg = try_pack(AdapterWeights::Ia3 { l: t(vec![1.0, f32::INFINITY, 1.0, 1.0, 1.0], &[5]), on_input: false }, 8, 5);
    assert!(msg.contains("non-finite"), "{msg}");
    let msg = try_pack(AdapterWeights::Ia3 { l: t(vec![1.0; 5], &[5]), on_input: true }, 8, 5);
    assert!(msg.contains("expected [8]"), "{msg}");
}

#[test]
fn bad_batches_and_inputs_are_refused() {
    let fx = Fixture::new(8, 5, &[Kind::Lora(2)], 1);
    let base = BaseWeight::from_out_in(&fx.w0_tensor()).unwrap();
    let x = Tensor::from_vec(random_input(3, 8, 2), (3, 8), &Device::Cpu).unwrap();
    let opts = ExecOptions::default();
    let err = adapted_linear(&x, &base, &AdapterBatch::from_row_slots(vec![Some(0), Some(7), None]), Some(&fx.layer), &opts).unwrap_err().to_string();
    assert!(err.contains("test.proj") && err.contains("slot 7") && err.contains("only 1 slots exist"), "{err}");
    let err = adapted_linear(&x, &base, &AdapterBatch::base_only(4), Some(&fx.layer), &opts).unwrap_err().to_string();
    assert!(err.contains("4 rows") && err.contains("3"), "{err}");
    let x_bad = Tensor::zeros((3, 9), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = adapted_linear(&x_bad, &base, &AdapterBatch::base_only(3), Some(&fx.layer), &opts).unwrap_err().to_string();
    assert!(err.contains("[3, 9]") && err.contains("8"), "{err}");
    // An empty slot means "this adapter does not adapt this projection": base output.
    let w = &fx.weights[0];
    let holes = LayerAdapters::pack("p", 8, 5, &[None, Some(("a", w))], &Device::Cpu).unwrap();
    let y = adapted_linear(&x, &base, &AdapterBatch::uniform(3, 0), Some(&holes), &opts).unwrap();
    let y_base = adapted_linear(&x, &base, &AdapterBatch::base_only(3), None, &opts).unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap(), y_base.to_vec2::<f32>().unwrap());
}

#[test]
fn backward_through_tables_packed_for_bf16_inference_is_refused() {
    // Those tables keep LoRA's values only in their bf16 copy: a gradient through them would
    // silently miss the adapter, so it is an error.
    let dev = Device::Cpu;
    let (d_in, d_out) = (8, 5);
    let w = AdapterWeights::Lora { a: Tensor::ones((2, d_in), candle_core::DType::F32, &dev).unwrap(), b: Tensor::ones((d_out, 2), candle_core::DType::F32, &dev).unwrap(), scale: 1.0 };
    let layer = LayerAdapters::pack("layers.3.q_proj", d_in, d_out, &[Some(("my-adapter", &w))], &dev).unwrap();
    let base = BaseWeight::from_out_in(&Tensor::ones((d_out, d_in), candle_core::DType::F32, &dev).unwrap()).unwrap();
    let x = candle_core::Var::from_tensor(&Tensor::ones((3, d_in), candle_core::DType::F32, &dev).unwrap()).unwrap();
    let batch = AdapterBatch::uniform(3, 0);
    let f32_tables = adapted_linear(x.as_tensor(), &base, &batch, Some(&layer), &ExecOptions::default()).unwrap();
    assert!(f32_tables.sum_all().unwrap().backward().is_ok());
    let bf16_tables = layer.with_bf16_tables(flora_adapters::LoraTables::Bf16).unwrap();
    let y = adapted_linear(x.as_tensor(), &base, &batch, Some(&bf16_tables), &ExecOptions::default()).unwrap();
    let msg = y.sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(msg.contains("layers.3.q_proj") && msg.contains("bf16 inference"), "{msg}");
}
