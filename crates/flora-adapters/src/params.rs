//! Adapter parameters of one projection, packed for the batched kernels.
//!
//! Every slot's parameters live in ONE flat f32 tensor (`params`), so a single custom op sees all
//! adapters of a batch at once and its backward returns one flat gradient that candle routes back
//! to each adapter's own variables (through `Tensor::cat`). Per slot, at `offset`:
//!
//! | kind    | "in" part (first)         | "out" part (after it)      | math per row x [d_in]            |
//! |---------|---------------------------|----------------------------|----------------------------------|
//! | LoRA    | A   [r, d_in]  (lora_A)   | B^T [r, d_out] (lora_B^T)  | y = x W0^T + s (x A^T) B^T, s = alpha/r |
//! | fLoRA   | b   [r, d_in]             | a   [r, d_out]             | y = (1/r) sum_j a_j o ((b_j o x) W0^T) |
//! | IA3 out | (none)                    | l   [d_out]                | y = l o (x W0^T)                 |
//! | IA3 in  | l   [d_in]                | (none)                     | y = (l o x) W0^T                 |

use crate::error::{AdapterError, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// The adapter families flora runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AdapterKind {
    Lora,
    Flora,
    Ia3,
}

impl std::fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AdapterKind::Lora => "lora",
            AdapterKind::Flora => "flora",
            AdapterKind::Ia3 => "ia3",
        })
    }
}

/// One adapter's weights for one projection `W0 [d_out, d_in]`, in the checkpoint's own layout.
#[derive(Clone, Debug)]
pub enum AdapterWeights {
    /// PEFT LoRA: `a` = lora_A.weight `[r, d_in]`, `b` = lora_B.weight `[d_out, r]`,
    /// `scale` = lora_alpha / r (or / sqrt(r) for rsLoRA).
    Lora { a: Tensor, b: Tensor, scale: f32 },
    /// fLoRA: `a` `[r, d_out]` (output side), `b` `[r, d_in]` (input side); mean over rank.
    Flora { a: Tensor, b: Tensor },
    /// IA3: `l` `[d_out]` scales the outputs, or `[d_in]` scales the inputs when `on_input`
    /// (PEFT's "feedforward" modules).
    Ia3 { l: Tensor, on_input: bool },
}

impl AdapterWeights {
    pub fn kind(&self) -> AdapterKind {
        match self {
            AdapterWeights::Lora { .. } => AdapterKind::Lora,
            AdapterWeights::Flora { .. } => AdapterKind::Flora,
            AdapterWeights::Ia3 { .. } => AdapterKind::Ia3,
        }
    }

    /// Rank (IA3 counts as 1).
    pub fn rank(&self) -> usize {
        match self {
            AdapterWeights::Lora { a, .. } | AdapterWeights::Flora { b: a, .. } => a.dims().first().copied().unwrap_or(0),
            AdapterWeights::Ia3 { .. } => 1,
        }
    }
}

/// Kernel-level kind of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    Lora,
    Flora,
    Ia3Out,
    Ia3In,
}

/// Where a slot's parameters live in the packed tensor and how to apply them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlotSpec {
    pub kind: SlotKind,
    pub rank: usize,
    /// LoRA: alpha/r; fLoRA: 1/r; IA3: 1.
    pub scale: f32,
    /// Offset of the "in" part in the packed params; the "out" part follows it.
    pub offset: usize,
}

impl SlotSpec {
    pub fn in_len(&self, d_in: usize) -> usize {
        match self.kind {
            SlotKind::Lora | SlotKind::Flora => self.rank * d_in,
            SlotKind::Ia3In => d_in,
            SlotKind::Ia3Out => 0,
        }
    }

    pub fn out_len(&self, d_out: usize) -> usize {
        match self.kind {
            SlotKind::Lora | SlotKind::Flora => self.rank * d_out,
            SlotKind::Ia3Out => d_out,
            SlotKind::Ia3In => 0,
        }
    }

    /// This slot's values in `params` (in part, then out part).
    pub fn range(&self, d_in: usize, d_out: usize) -> std::ops::Range<usize> {
        self.offset..self.offset + self.in_len(d_in) + self.out_len(d_out)
    }

    /// `(in part, out part)` of this slot in `params`.
    pub fn parts<'a, T>(&self, params: &'a [T], d_in: usize, d_out: usize) -> (&'a [T], &'a [T]) {
        let (i, o) = (self.in_len(d_in), self.out_len(d_out));
        (&params[self.offset..self.offset + i], &params[self.offset + i..self.offset + i + o])
    }
}

/// How bf16 inference stores LoRA slots in a table's bf16 copy (the tables a decode step
/// streams, one per distinct adapter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LoraTables {
    /// bf16 values: the f32 table rounded to bf16 ([`crate::cpu::lora_bf16`]).
    #[default]
    Bf16,
    /// 8-bit integers with one scale per rank row of A and of B^T ([`crate::cpu::lora_int8`]):
    /// half the bytes per step. Projections under 4 wide keep bf16.
    Int8,
}

impl LoraTables {
    /// Whether a LoRA slot of a `d_in -> d_out` projection is stored in 8 bits.
    pub fn int8_at(self, d_in: usize, d_out: usize) -> bool {
        self == Self::Int8 && crate::cpu::lora_int8::fits(d_in, d_out)
    }

    /// Whether slot `spec` of a `d_in -> d_out` projection is stored in 8 bits.
    pub fn int8_slot(self, spec: &SlotSpec, d_in: usize, d_out: usize) -> bool {
        spec.kind == SlotKind::Lora && self.int8_at(d_in, d_out)
    }
}

impl std::fmt::Display for LoraTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        })
    }
}

impl std::str::FromStr for LoraTables {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bf16" => Ok(Self::Bf16),
            "int8" => Ok(Self::Int8),
            _ => Err(format!("unknown LoRA table format '{s}' (expected bf16 or int8)")),
        }
    }
}

/// A table's copy for bf16 inference: its values as bf16 at the f32 table's slot offsets (a
/// slot's values in the layout its kernel reads), LoRA slots stored as `lora` says.
#[derive(Clone, Debug)]
pub struct Bf16Tables {
    pub values: Arc<[u16]>,
    pub lora: LoraTables,
    /// With 8-bit LoRA: the integers, one byte per value at the same offsets (bytes of other
    /// slots unused); LoRA slots' regions of `values` then hold only their scales. Else empty.
    pub ints: Arc<[u8]>,
}

impl Bf16Tables {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.values.len() * 2 + self.ints.len()
    }
}

/// All adapters of one projection (one layer's q, k, ..., down), packed for the kernels.
#[derive(Clone, Debug)]
pub struct LayerAdapters {
    name: Arc<str>,
    d_in: usize,
    d_out: usize,
    slots: Arc<[Option<SlotSpec>]>,
    /// Flat f32 `[total]`; may be a graph node over trainable variables.
    params: Tensor,
    /// The copy bf16 inference reads: see [`Self::with_bf16_tables`].
    bf16: Option<Bf16Tables>,
}

impl LayerAdapters {
    /// Pack `slots` (index = slot id; `None` = empty slot) for projection `name` `[d_out, d_in]`.
    /// Checks shapes, ranks and that every value is finite.
    pub fn pack(name: &str, d_in: usize, d_out: usize, slots: &[Option<(&str, &AdapterWeights)>], device: &Device) -> Result<Self> {
        let mut specs = Vec::with_capacity(slots.len());
        let mut parts: Vec<Tensor> = Vec::new();
        let mut offset = 0usize;
        for slot in slots {
            let Some((adapter, w)) = slot else {
                specs.push(None);
                continue;
            };
            let (mut spec, slot_parts) = slot_layout(name, adapter, d_in, d_out, w)?;
            spec.offset = offset;
            for part in slot_parts {
                let part = part.to_device(device)?;
                offset += part.elem_count();
                parts.push(part);
            }
            specs.push(Some(spec));
        }
        let params = if parts.is_empty() { Tensor::zeros(0, DType::F32, device)? } else { Tensor::cat(&parts, 0)? };
        Ok(Self { name: name.into(), d_in, d_out, slots: specs.into(), params, bf16: None })
    }

    /// Packs slots prepared ahead with [`SlotParts::new`] (inference: a copy of each slot's
    /// values, no checks or conversions). Either every prepared slot carries a bf16 copy or
    /// none does.
    pub fn from_parts(name: &str, d_in: usize, d_out: usize, slots: &[Option<&SlotParts>], device: &Device) -> Result<Self> {
        let present = || slots.iter().flatten();
        let format = present().next().map(|p| p.halves.as_ref().map(|h| h.lora));
        let lora = format.flatten();
        if present().any(|p| Some(p.halves.as_ref().map(|h| h.lora)) != format || p.d_in != d_in || p.d_out != d_out) {
            return Err(AdapterError::BadBatch { layer: name.to_string(), msg: "prepared slots differ in number format or projection shape".into() });
        }
        let slot_len = |p: &SlotParts| p.spec.range(d_in, d_out).len();
        let total: usize = present().map(|p| slot_len(p)).sum();
        let mut values = Vec::with_capacity(total);
        // Written in place (an `Arc<[u16]>` made from a Vec would copy it once more).
        let mut halves = Arc::<[u16]>::new_uninit_slice(if lora.is_some() { total } else { 0 });
        let halves_out = Arc::get_mut(&mut halves).expect("a new Arc is unique");
        // The byte table only where some slot has 8-bit integers.
        let int8 = present().any(|p| p.halves.as_ref().is_some_and(|h| !h.ints.is_empty()));
        let mut ints = if int8 { vec![0u8; total] } else { Vec::new() };
        let mut specs = Vec::with_capacity(slots.len());
        for slot in slots {
            specs.push(slot.map(|p| {
                let (at, len) = (values.len(), slot_len(p));
                let spec = SlotSpec { offset: at, ..p.spec };
                // What a prepared slot does not keep (see `SlotParts::new`) is zero.
                if let Some(h) = &p.halves {
                    let kept = h.values.iter().copied().chain(std::iter::repeat(0));
                    for (o, v) in halves_out[at..at + len].iter_mut().zip(kept) {
                        o.write(v);
                    }
                    if int8 {
                        ints[at..at + h.ints.len()].copy_from_slice(&h.ints);
                    }
                }
                values.extend_from_slice(&p.values);
                values.resize(at + len, 0.0);
                spec
            }));
        }
        assert_eq!(values.len(), total);
        // SAFETY: with bf16, every slot wrote its halves over its whole range, and the slots
        // cover 0..total; without, the slice is empty.
        let halves = unsafe { halves.assume_init() };
        let params = Tensor::from_vec(values, total, device)?;
        Ok(Self { name: name.into(), d_in, d_out, slots: specs.into(), params, bf16: lora.map(|lora| Bf16Tables { values: halves, lora, ints: ints.into() }) })
    }

    /// The same slot table over other parameter values of the same layout (e.g. a trainable
    /// flat variable, or an optimizer's updated copy).
    pub fn with_params(&self, params: Tensor) -> Result<Self> {
        if params.dims() != self.params.dims() {
            return Err(AdapterError::BadBatch {
                layer: self.name.to_string(),
                msg: format!("packed params have shape {:?}, expected {:?}", params.dims(), self.params.dims()),
            });
        }
        Ok(Self { params, bf16: None, ..self.clone() })
    }

    /// A table with no adapters (every row runs the base weight).
    pub fn empty(name: &str, d_in: usize, d_out: usize, device: &Device) -> Result<Self> {
        Self::pack(name, d_in, d_out, &[], device)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn d_in(&self) -> usize {
        self.d_in
    }
    pub fn d_out(&self) -> usize {
        self.d_out
    }
    pub fn slots(&self) -> &[Option<SlotSpec>] {
        &self.slots
    }
    pub fn params(&self) -> &Tensor {
        &self.params
    }

    /// For bf16 inference (no backward): the parameters rounded to bf16, kept as f32 values
    /// and as a bf16 copy (same slot offsets; a LoRA slot's values in the order its kernel
    /// reads them, see [`crate::cpu::lora_bf16`]) that the per-row LoRA loops stream: half
    /// the bytes, and at 32 distinct adapters a decode step reads more adapter bytes than base
    /// weights. With `lora` = [`LoraTables::Int8`], LoRA slots are quantized to 8 bits into a
    /// byte table instead (a quarter of the f32 bytes), their region of the copy holding only
    /// their scales. LoRA slots' f32 values are not kept (zeros): no inference path reads them.
    /// Every path computes with the same values, so a row's result does not depend on how its
    /// sequence was batched or chunked (up to f32 summation order).
    pub fn with_bf16_tables(&self, lora: LoraTables) -> Result<Self> {
        let (halves, ints, rounded) = crate::op::with_cpu_tensor(&self.params, "adapter params", |values| {
            let mut rounded = values.to_vec();
            let mut halves = crate::cpu::bf16::round_in_place(&mut rounded);
            let int8 = self.slots.iter().flatten().any(|s| lora.int8_slot(s, self.d_in, self.d_out));
            let mut ints = if int8 { vec![0u8; rounded.len()] } else { Vec::new() };
            for spec in self.slots.iter().flatten() {
                let range = spec.range(self.d_in, self.d_out);
                let slot_ints = if ints.is_empty() { &mut [][..] } else { &mut ints[range.clone()] };
                arrange_for_kernel(spec, &mut halves[range.clone()], slot_ints, &mut rounded[range], self.d_in, self.d_out, lora);
            }
            Ok((halves, ints, rounded))
        })?;
        let params = Tensor::from_vec(rounded, self.params.elem_count(), self.params.device())?;
        Ok(Self { params, bf16: Some(Bf16Tables { values: halves.into(), lora, ints: ints.into() }), ..self.clone() })
    }

    /// The bf16 copy of the parameters, when packed with [`Self::with_bf16_tables`].
    pub fn bf16_params(&self) -> Option<&Bf16Tables> {
        self.bf16.as_ref()
    }
    pub(crate) fn name_arc(&self) -> Arc<str> {
        self.name.clone()
    }
}

/// One adapter's slot at projection `layer` `[d_out, d_in]`: its spec (offset 0) and its parts
/// in table order (f32, contiguous), after checking shapes, rank and finiteness. Keeps the
/// autograd graph (training packs variables through this).
fn slot_layout(layer: &str, adapter: &str, d_in: usize, d_out: usize, w: &AdapterWeights) -> Result<(SlotSpec, Vec<Tensor>)> {
    let bad = |msg: String| AdapterError::BadAdapter { layer: layer.to_string(), adapter: adapter.to_string(), msg };
    let (spec, ins, outs) = match w {
        AdapterWeights::Lora { a, b, scale } => {
            let r = check_2d(a, "lora A", None, Some(d_in)).map_err(&bad)?;
            check_2d(b, "lora B", Some(d_out), Some(r)).map_err(&bad)?;
            if !scale.is_finite() {
                return Err(bad(format!("scale {scale} is not finite")));
            }
            let spec = SlotSpec { kind: SlotKind::Lora, rank: r, scale: *scale, offset: 0 };
            (spec, Some(a.flatten_all()?), Some(b.t()?.contiguous()?.flatten_all()?))
        }
        AdapterWeights::Flora { a, b } => {
            let r = check_2d(b, "flora b", None, Some(d_in)).map_err(&bad)?;
            check_2d(a, "flora a", Some(r), Some(d_out)).map_err(&bad)?;
            let spec = SlotSpec { kind: SlotKind::Flora, rank: r, scale: 1.0 / r as f32, offset: 0 };
            (spec, Some(b.flatten_all()?), Some(a.flatten_all()?))
        }
        AdapterWeights::Ia3 { l, on_input } => {
            let want = if *on_input { d_in } else { d_out };
            if l.dims() != [want] {
                return Err(bad(format!("ia3 vector has shape {:?}, expected [{want}]", l.dims())));
            }
            let kind = if *on_input { SlotKind::Ia3In } else { SlotKind::Ia3Out };
            let spec = SlotSpec { kind, rank: 1, scale: 1.0, offset: 0 };
            let flat = l.flatten_all()?;
            if *on_input { (spec, Some(flat), None) } else { (spec, None, Some(flat)) }
        }
    };
    let mut parts = Vec::with_capacity(2);
    for part in [ins, outs].into_iter().flatten() {
        let part = part.to_dtype(DType::F32)?;
        check_finite(&part).map_err(&bad)?;
        parts.push(part);
    }
    Ok((spec, parts))
}

/// One adapter's values at one projection, checked and laid out as a packed table holds them
/// ([`LayerAdapters::from_parts`] copies them in): the serving store prepares each adapter
/// once when it loads it, so changing the engine's slots later is a memory copy.
#[derive(Clone, Debug)]
pub struct SlotParts {
    spec: SlotSpec,
    d_in: usize,
    d_out: usize,
    /// In-part then out-part (see the module table); bf16-rounded values when `halves` is set.
    values: Arc<[f32]>,
    /// The copy bf16 inference reads (see [`LayerAdapters::with_bf16_tables`]).
    halves: Option<Bf16Tables>,
}

impl SlotParts {
    /// Checks and lays out `w` for projection `layer` `[d_out, d_in]`; with `bf16` (LoRA's
    /// format in it), rounds the values to bf16 and keeps their bf16 copy, as
    /// [`LayerAdapters::with_bf16_tables`] does.
    pub fn new(layer: &str, adapter: &str, d_in: usize, d_out: usize, w: &AdapterWeights, bf16: Option<LoraTables>) -> Result<Self> {
        let (spec, parts) = slot_layout(layer, adapter, d_in, d_out, w)?;
        let mut values: Vec<f32> = Vec::new();
        for part in &parts {
            values.extend(part.flatten_all()?.to_vec1::<f32>()?);
        }
        let halves = bf16.map(|lora| {
            let mut halves = crate::cpu::bf16::round_in_place(&mut values);
            let int8 = lora.int8_slot(&spec, d_in, d_out);
            let mut ints = if int8 { vec![0u8; values.len()] } else { Vec::new() };
            arrange_for_kernel(&spec, &mut halves, &mut ints, &mut values, d_in, d_out, lora);
            // Only what inference reads is kept (the pool's bytes): a LoRA slot's copy, not its
            // f32 values; with 8 bits, its integers and scales.
            if spec.kind == SlotKind::Lora {
                values.clear();
            }
            if int8 {
                halves.truncate(crate::cpu::lora_int8::scale_values(spec.rank));
            }
            Bf16Tables { values: halves.into(), lora, ints: ints.into() }
        });
        Ok(Self { spec, d_in, d_out, values: values.into(), halves })
    }

    /// Bytes held (values and their bf16 copy, as far as the slot keeps them).
    pub fn bytes(&self) -> usize {
        self.values.len() * 4 + self.halves.as_ref().map_or(0, Bf16Tables::bytes)
    }
}

/// Lays a slot's bf16 copy (`halves`, of the slot's bf16-rounded `values`) out for its kernel:
/// LoRA slots in [`crate::cpu::lora_bf16`]'s order, or quantized by [`crate::cpu::lora_int8`]
/// into `ints` (the slot's bytes of the byte table; its region of `halves` then holds its
/// scales, the rest zero), their f32 `values` zeroed (no inference path reads them); the other
/// kinds keep the table's own.
fn arrange_for_kernel(spec: &SlotSpec, halves: &mut [u16], ints: &mut [u8], values: &mut [f32], d_in: usize, d_out: usize, lora: LoraTables) {
    if spec.kind == SlotKind::Lora {
        if lora.int8_slot(spec, d_in, d_out) {
            crate::cpu::lora_int8::quantize(halves, ints, values, spec.rank, d_in, d_out);
            halves[crate::cpu::lora_int8::scale_values(spec.rank)..].fill(0);
        } else {
            crate::cpu::lora_bf16::arrange(halves, spec.rank, d_in, d_out);
        }
        values.fill(0.0);
    }
}

/// Checks a 2-D tensor's dims against the expected ones; returns dim 0. Rank 0 is refused.
fn check_2d(t: &Tensor, what: &str, rows: Option<usize>, cols: Option<usize>) -> std::result::Result<usize, String> {
    let dims = t.dims();
    if dims.len() != 2 {
        return Err(format!("{what} has shape {dims:?}, expected 2 dims"));
    }
    if rows.is_some_and(|r| r != dims[0]) || cols.is_some_and(|c| c != dims[1]) {
        let show = |d: Option<usize>| d.map_or("_".to_string(), |v| v.to_string());
        return Err(format!("{what} has shape {dims:?}, expected [{}, {}]", show(rows), show(cols)));
    }
    if dims[0] == 0 || dims[1] == 0 {
        return Err(format!("{what} has shape {dims:?}: rank and dims must be positive"));
    }
    Ok(dims[0])
}

/// Scans a contiguous f32 CPU tensor in place (no copy: packing runs on every slot change of
/// the serving engine); other tensors are copied out first.
fn check_finite(t: &Tensor) -> std::result::Result<(), String> {
    let scan = |v: &[f32]| match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(format!("holds a non-finite value ({}) at element {i}", v[i])),
    };
    if t.is_contiguous() && t.device().is_cpu() {
        if let Ok(result) = crate::op::with_cpu_tensor(t, "adapter weights", |v| Ok(scan(v))) {
            return result;
        }
    }
    let v: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).map_err(|e| e.to_string())?;
    scan(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dims: &[usize], seed: u64) -> Tensor {
        let n: usize = dims.iter().product();
        let v = crate::init::WeightRng::new(seed).uniform(n, 0.5);
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    /// Prepared slots pack into the same table as `pack` (f32) and `pack` + `with_bf16_tables`.
    #[test]
    fn prepared_parts_pack_like_pack() {
        let (d_in, d_out) = (12, 7);
        let weights = [
            AdapterWeights::Lora { a: t(&[3, d_in], 1), b: t(&[d_out, 3], 2), scale: 0.5 },
            AdapterWeights::Flora { a: t(&[2, d_out], 3), b: t(&[2, d_in], 4) },
            AdapterWeights::Ia3 { l: t(&[d_out], 5), on_input: false },
            AdapterWeights::Ia3 { l: t(&[d_in], 6), on_input: true },
        ];
        let slots: Vec<Option<(&str, &AdapterWeights)>> =
            vec![Some(("a", &weights[0])), None, Some(("b", &weights[1])), Some(("c", &weights[2])), Some(("d", &weights[3]))];
        let reference = LayerAdapters::pack("p", d_in, d_out, &slots, &Device::Cpu).unwrap();
        for bf16 in [None, Some(LoraTables::Bf16), Some(LoraTables::Int8)] {
            let parts: Vec<Option<SlotParts>> =
                slots.iter().map(|s| s.map(|(name, w)| SlotParts::new("p", name, d_in, d_out, w, bf16).unwrap())).collect();
            let refs: Vec<Option<&SlotParts>> = parts.iter().map(Option::as_ref).collect();
            let got = LayerAdapters::from_parts("p", d_in, d_out, &refs, &Device::Cpu).unwrap();
            let want = match bf16 {
                Some(lora) => reference.with_bf16_tables(lora).unwrap(),
                None => reference.clone(),
            };
            assert_eq!(got.slots(), want.slots());
            assert_eq!(got.params().to_vec1::<f32>().unwrap(), want.params().to_vec1::<f32>().unwrap());
            assert_eq!(got.bf16_params().map(|h| (h.values.to_vec(), h.lora, h.ints.to_vec())), want.bf16_params().map(|h| (h.values.to_vec(), h.lora, h.ints.to_vec())));
        }
        // A prepared LoRA slot keeps what inference reads: f32 values, or its bf16 copy alone,
        // or its integers and scales; other kinds keep f32 values and a bf16 copy.
        let len = 3 * (d_in + d_out);
        for (bf16, lora_bytes) in [(None, 4 * len), (Some(LoraTables::Bf16), 2 * len), (Some(LoraTables::Int8), len + 2 * 4 * 3)] {
            assert_eq!(SlotParts::new("p", "a", d_in, d_out, &weights[0], bf16).unwrap().bytes(), lora_bytes, "{bf16:?}");
            let flora = SlotParts::new("p", "b", d_in, d_out, &weights[1], bf16).unwrap();
            assert_eq!(flora.bytes(), 2 * (d_in + d_out) * if bf16.is_some() { 6 } else { 4 }, "{bf16:?}");
        }
        // In bf16 tables LoRA's f32 values are zero (no inference path reads them; the forward
        // tests against the reference pass over such tables), the other kinds' are kept.
        for lora in [LoraTables::Bf16, LoraTables::Int8] {
            let packed = reference.with_bf16_tables(lora).unwrap();
            let (values, original) = (packed.params().to_vec1::<f32>().unwrap(), reference.params().to_vec1::<f32>().unwrap());
            for spec in packed.slots().iter().flatten() {
                let range = spec.range(d_in, d_out);
                let zero = values[range.clone()].iter().all(|&v| v == 0.0);
                assert_eq!(zero, spec.kind == SlotKind::Lora, "{lora}: {:?} slot", spec.kind);
                assert!(spec.kind == SlotKind::Lora || values[range.clone()].iter().zip(&original[range]).all(|(v, o)| (v - o).abs() <= o.abs() / 128.0));
            }
        }
        // Projections too small for 8-bit scales keep bf16 LoRA tables.
        let tiny = LayerAdapters::pack("p", 1, 2, &[Some(("a", &AdapterWeights::Lora { a: t(&[3, 1], 1), b: t(&[2, 3], 2), scale: 0.5 }))], &Device::Cpu).unwrap();
        let (as_bf16, as_int8) = (tiny.with_bf16_tables(LoraTables::Bf16).unwrap(), tiny.with_bf16_tables(LoraTables::Int8).unwrap());
        assert_eq!(as_bf16.bf16_params().unwrap().values, as_int8.bf16_params().unwrap().values);
        assert!(!LoraTables::Int8.int8_at(1, 2) && LoraTables::Int8.int8_at(2, 2));
        // Formats do not mix, and parts belong to one projection shape.
        let f32_part = SlotParts::new("p", "a", d_in, d_out, &weights[0], None).unwrap();
        let bf16_part = SlotParts::new("p", "b", d_in, d_out, &weights[1], Some(LoraTables::Bf16)).unwrap();
        let int8_part = SlotParts::new("p", "b", d_in, d_out, &weights[1], Some(LoraTables::Int8)).unwrap();
        assert!(LayerAdapters::from_parts("p", d_in, d_out, &[Some(&f32_part), Some(&bf16_part)], &Device::Cpu).is_err());
        assert!(LayerAdapters::from_parts("p", d_in, d_out, &[Some(&int8_part), Some(&bf16_part)], &Device::Cpu).is_err());
        assert!(LayerAdapters::from_parts("p", d_in + 1, d_out, &[Some(&f32_part)], &Device::Cpu).is_err());
        // Preparing checks like packing does.
        let bad = AdapterWeights::Lora { a: t(&[3, d_in + 1], 1), b: t(&[d_out, 3], 2), scale: 0.5 };
        assert!(SlotParts::new("p", "bad", d_in, d_out, &bad, Some(LoraTables::Bf16)).is_err());
    }
}
