//! The seam: every adapted projection goes through [`adapted_linear`].
//!
//! It is one candle custom op over `(x, packed params)`, with the frozen base weight held by the
//! op (so no gradient is ever formed for it) and the plan as plain data. Its backward returns
//! the gradient of `x` and one flat gradient for all adapters, which candle routes back to each
//! adapter's variables.

use crate::batch::AdapterBatch;
use crate::cpu;
use crate::cpu::bf16::PackedBf16;
use crate::cpu::forward::BaseRef;
use crate::error::{AdapterError, Result};
use crate::params::{Bf16Tables, LayerAdapters};
use crate::plan::{plan_layer, ExecOptions, LayerPlan};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use std::sync::Arc;

/// The number format the shared base GEMM of inference runs in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// f32 weights and inputs: exact to the f32 reference (the default; training always uses it).
    #[default]
    F32,
    /// bf16 weights (packed once) and inputs, f32 sums: half the bytes per decode step and, with
    /// AVX512-BF16, twice the multiply rate. Logits move by bf16 rounding (docs/model.md).
    Bf16,
}

impl WeightFormat {
    /// bf16 where the CPU has AVX512-BF16 (the fast kernel), else f32 (bf16 would run a
    /// portable loop there, slower than f32).
    pub fn fastest_here() -> Self {
        if cpu::bf16::has_native_bf16() {
            WeightFormat::Bf16
        } else {
            WeightFormat::F32
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(WeightFormat::F32),
            "bf16" => Ok(WeightFormat::Bf16),
            other => Err(format!("unknown weight format {other:?} (expected f32 or bf16)")),
        }
    }
}

/// A frozen base weight `W0 [d_out, d_in]`, stored transposed `[d_in, d_out]` row-major: the
/// layout in which both the GEMM library and the skinny decode kernel stream it contiguously.
/// In [`WeightFormat::Bf16`] it also holds a bf16 copy packed for the shared GEMM of the
/// forward pass (the f32 copy still serves merged fLoRA tiles and backward).
#[derive(Clone, Debug)]
pub struct BaseWeight {
    wt: Tensor,
    bf16: Option<Arc<PackedBf16>>,
    d_in: usize,
    d_out: usize,
}

impl BaseWeight {
    /// From a checkpoint-layout weight `[d_out, d_in]` (as in PyTorch / GGUF tensors).
    pub fn from_out_in(w: &Tensor) -> Result<Self> {
        let (d_out, d_in) = w.dims2()?;
        let wt = w.to_dtype(DType::F32)?.t()?.contiguous()?.detach();
        Ok(Self { wt, bf16: None, d_in, d_out })
    }

    /// Switches the format of the forward pass's shared GEMM (packs or drops the bf16 copy).
    pub fn set_format(&mut self, format: WeightFormat) -> Result<()> {
        self.bf16 = match format {
            WeightFormat::F32 => None,
            WeightFormat::Bf16 if self.bf16.is_some() => self.bf16.take(),
            WeightFormat::Bf16 => {
                let packed = with_cpu_tensor(&self.wt, "base weight", |wt| Ok(PackedBf16::pack(wt, self.d_in, self.d_out)))?;
                Some(Arc::new(packed))
            }
        };
        Ok(())
    }

    /// Lays the bf16 copies of `weights` (in the order an inference step reads them) out in
    /// one arena for decode steps on the current thread pool (`cpu::bf16::arrange_for_decode`:
    /// each thread's share of every weight, end to end). Weights in f32 are left out; values
    /// and results do not change.
    pub fn arrange_bf16_for_decode(weights: &mut [&mut BaseWeight]) {
        let mut packed: Vec<&mut PackedBf16> = weights.iter_mut().filter_map(|w| w.bf16.as_mut().map(Arc::make_mut)).collect();
        cpu::bf16::arrange_for_decode(&mut packed, cpu::matmul::n_threads());
    }

    pub fn format(&self) -> WeightFormat {
        if self.bf16.is_some() {
            WeightFormat::Bf16
        } else {
            WeightFormat::F32
        }
    }

    pub fn d_in(&self) -> usize {
        self.d_in
    }
    pub fn d_out(&self) -> usize {
        self.d_out
    }
    /// `W0^T` `[d_in, d_out]`.
    pub fn transposed(&self) -> &Tensor {
        &self.wt
    }
}

/// `y [.., d_out]` = the adapted projection of `x [.., d_in]` (rows = all leading dims
/// flattened), each row using the adapter its slot in `batch` names (see `crate::params` for
/// the math of each kind). `adapters = None` (no adapter targets this projection) runs the
/// base weight for every row, whatever slots the batch names.
pub fn adapted_linear(
    x: &Tensor,
    base: &BaseWeight,
    batch: &AdapterBatch,
    adapters: Option<&LayerAdapters>,
    opts: &ExecOptions,
) -> Result<Tensor> {
    let (empty, base_rows);
    let (adapters, batch) = match adapters {
        Some(a) => (a, batch),
        None => {
            empty = LayerAdapters::empty("base", base.d_in, base.d_out, x.device())?;
            base_rows = AdapterBatch::base_only(batch.n_rows());
            (&empty, &base_rows)
        }
    };
    let dims = x.dims().to_vec();
    let n_rows = check_input(adapters.name(), &dims, dims.last() == Some(&base.d_in), x.elem_count(), base, Some(adapters), batch)?;
    let plan = plan_layer(batch, adapters, opts)?;
    let x2 = x.to_dtype(DType::F32)?.reshape((n_rows, base.d_in))?.contiguous()?;
    let op = AdaptedLinearOp {
        wt: base.wt.clone(),
        bf16: base.bf16.clone(),
        params16: adapters.bf16_params().cloned(),
        plan: Arc::new(plan),
        name: adapters.name_arc(),
    };
    let y = x2.apply_op2(adapters.params(), op)?;
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = base.d_out;
    Ok(y.reshape(out_dims)?)
}

/// The inference twin of [`adapted_linear`] on plain buffers: `x [rows, d_in]` row-major in,
/// `y [rows, d_out]` out, the same kernels and plan, no tensors and no autograd. The model's
/// inference step calls it for every projection (a decode step at batch 1 is otherwise a
/// tenth candle bookkeeping).
pub fn adapted_linear_rows(
    x: &[f32],
    base: &BaseWeight,
    batch: &AdapterBatch,
    adapters: Option<&LayerAdapters>,
    opts: &ExecOptions,
) -> Result<Vec<f32>> {
    let name = adapters.map_or("base", |a| a.name());
    let n_rows = check_input(name, &[x.len()], x.len() % base.d_in == 0, x.len(), base, adapters, batch)?;
    // A plan error reaches the caller as a kernel error, as it always has from this entry point.
    let planned = adapters.map(|a| plan_layer(batch, a, opts).map(|plan| (a, plan)).map_err(|e| candle_core::Error::Msg(e.to_string()))).transpose()?;
    rows_planned(x, n_rows, base, planned.as_ref().map(|(a, plan)| (*a, plan)))
}

/// [`adapted_linear_rows`] after its checks, with the adapters' plan made.
fn rows_planned(x: &[f32], n_rows: usize, base: &BaseWeight, adapters: Option<(&LayerAdapters, &LayerPlan)>) -> Result<Vec<f32>> {
    let bf16 = base.bf16.as_deref();
    Ok(with_cpu_tensor(&base.wt, "base weight", |wt| {
        let base_ref = BaseRef { wt, bf16 };
        match adapters {
            None => Ok(base_ref.gemm_new(x, n_rows, base.d_in, base.d_out)),
            Some((a, plan)) => {
                with_cpu_tensor(a.params(), "adapter params", |params| Ok(cpu::forward::forward(x, base_ref, params, a.bf16_params(), plan)))
            }
        }
    })?)
}

/// Several projections of the same input rows (a block's q, k and v; gate and up) through the
/// seam: the same outputs as one [`adapted_linear_rows`] call each. Where every projection runs
/// its base GEMM in bf16 and its adapters only add to its output (LoRA, IA3 on the output:
/// [`LayerPlan::all_direct`]), their work is one pool the threads claim from
/// (`cpu::forward::forward_pooled`), so the threads meet once instead of once per
/// projection; otherwise the projections run one by one.
pub fn adapted_linear_rows_many(
    x: &[f32],
    projections: &[(&BaseWeight, Option<&LayerAdapters>)],
    batch: &AdapterBatch,
    opts: &ExecOptions,
) -> Result<Vec<Vec<f32>>> {
    let mut plans: Vec<Option<LayerPlan>> = Vec::with_capacity(projections.len());
    let mut n_rows = 0;
    for &(base, adapters) in projections {
        let name = adapters.map_or("base", |a| a.name());
        n_rows = check_input(name, &[x.len()], x.len() % base.d_in == 0, x.len(), base, adapters, batch)?;
        plans.push(adapters.map(|a| plan_layer(batch, a, opts)).transpose()?);
    }
    let poolable = projections.len() > 1
        && projections.iter().zip(&plans).all(|(&(base, adapters), plan)| {
            base.bf16.is_some()
                && match (adapters, plan) {
                    (Some(a), Some(p)) => p.all_direct() && a.bf16_params().is_some(),
                    _ => true,
                }
        });
    if !poolable {
        return projections
            .iter()
            .zip(&plans)
            .map(|(&(base, adapters), plan)| rows_planned(x, n_rows, base, adapters.zip(plan.as_ref())))
            .collect();
    }
    // Every adapter table's storage stays locked for reading while the kernels run.
    let guards: Vec<_> = projections.iter().map(|(_, a)| a.map(|a| a.params().storage_and_layout())).collect();
    let params = guards
        .iter()
        .map(|g| g.as_ref().map(|(storage, layout)| cpu_f32(storage, layout, "adapter params")).transpose())
        .collect::<candle_core::Result<Vec<Option<&[f32]>>>>()?;
    let pooled: Vec<cpu::forward::Pooled> = projections
        .iter()
        .zip(&plans)
        .zip(&params)
        .map(|((&(base, adapters), plan), params)| cpu::forward::Pooled {
            packed: base.bf16.as_deref().expect("checked: bf16"),
            adapters: match (adapters, plan, params) {
                (Some(a), Some(plan), Some(params)) => Some(cpu::forward::PooledAdapters {
                    params,
                    params16: a.bf16_params().expect("checked: bf16 tables"),
                    plan,
                }),
                _ => None,
            },
        })
        .collect();
    Ok(cpu::forward::forward_pooled(x, n_rows, projections[0].0.d_in, &pooled))
}

/// Both entry points' input checks: `x` (shape `dims`, `elems` values, `fits`: its rows are
/// `d_in` wide) against the base weight, the adapter table and the batch. Returns the rows.
fn check_input(
    layer: &str,
    dims: &[usize],
    fits: bool,
    elems: usize,
    base: &BaseWeight,
    adapters: Option<&LayerAdapters>,
    batch: &AdapterBatch,
) -> Result<usize> {
    if !fits || adapters.is_some_and(|a| a.d_in() != base.d_in || a.d_out() != base.d_out) {
        return Err(AdapterError::BadInput { layer: layer.to_string(), got: dims.to_vec(), d_in: base.d_in });
    }
    let n_rows = elems / base.d_in;
    if batch.n_rows() != n_rows {
        return Err(AdapterError::BadBatch {
            layer: layer.to_string(),
            msg: format!("the batch describes {} rows, the input has {n_rows}", batch.n_rows()),
        });
    }
    Ok(n_rows)
}

struct AdaptedLinearOp {
    wt: Tensor,
    bf16: Option<Arc<PackedBf16>>,
    params16: Option<Bf16Tables>,
    plan: Arc<LayerPlan>,
    name: Arc<str>,
}

/// The f32 contents of a contiguous CPU tensor storage.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("adapted_linear: {what} must be contiguous"),
    }
}

pub(crate) fn with_cpu_tensor<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    f(cpu_f32(&storage, layout, what)?)
}

/// The f32 contents of a contiguous tensor's storage, which must be on the CPU.
fn cpu_f32<'a>(storage: &'a candle_core::Storage, layout: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(s) => f32_slice(s, layout, what),
        _ => candle_core::bail!("adapted_linear: {what} must be on the CPU (no GPU kernel yet)"),
    }
}

impl CustomOp2 for AdaptedLinearOp {
    fn name(&self) -> &'static str {
        "adapted-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "x")?;
        let params = f32_slice(s2, l2, "adapter params")?;
        let plan = &*self.plan;
        let y = with_cpu_tensor(&self.wt, "base weight", |wt| Ok(cpu::forward::forward(x, BaseRef { wt, bf16: self.bf16.as_deref() }, params, self.params16.as_ref(), plan)))?;
        Ok((CpuStorage::F32(y), Shape::from((plan.n_rows, plan.d_out))))
    }

    fn bwd(&self, x: &Tensor, params: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.params16.is_some() {
            // Tables packed for bf16 inference keep LoRA's values only in their bf16 copy.
            candle_core::bail!("layer {}: backward through adapter tables packed for bf16 inference (pack f32 tables to train)", self.name);
        }
        let plan = &*self.plan;
        let grad = grad.contiguous()?;
        let x = x.contiguous()?;
        let params = params.contiguous()?;
        let grads = with_cpu_tensor(&self.wt, "base weight", |wt| {
            with_cpu_tensor(&x, "x", |x| {
                with_cpu_tensor(&params, "adapter params", |p| {
                    with_cpu_tensor(&grad, "gradient", |g| Ok(cpu::backward::backward(x, wt, p, plan, g)))
                })
            })
        })
        .map_err(|e| candle_core::Error::Msg(format!("layer {}: backward: {e}", self.name)))?;
        let dev = x.device();
        let dx = Tensor::from_vec(grads.dx, (plan.n_rows, plan.d_in), dev)?;
        let n_params = grads.dparams.len();
        let dp = Tensor::from_vec(grads.dparams, n_params, dev)?;
        Ok((Some(dx), Some(dp)))
    }
}

