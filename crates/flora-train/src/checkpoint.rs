//! Trainer checkpoints: ONE safetensors file holding every adapter variable (`param/NAME/VAR`),
//! the AdamW moments (`adam_m/...`, `adam_v/...`), and, in its metadata, the step, the data
//! position, each adapter's update count and the run's fingerprint (configuration and data hash).
//! Written to a temp file, synced, then renamed over the old one: a kill leaves either the old
//! or the new checkpoint, never a torn one. Resuming restores every bit, so the continued run is
//! identical to an uninterrupted one.

use crate::data::LoaderPos;
use crate::error::{Result, TrainError};
use crate::trainer::Trainer;
use candle_core::Tensor;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

const FORMAT: u32 = 1;
const META_KEY: &str = "flora_train_state";

/// The scalar state saved next to the tensors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub format: u32,
    pub step: usize,
    pub loader: LoaderPos,
    /// Per adapter: (name, AdamW update count).
    pub adam_t: Vec<(String, u64)>,
    /// The run's configuration; a resume must match it exactly.
    pub fingerprint: serde_json::Value,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let err = |e: std::io::Error| TrainError::Checkpoint { path: path.display().to_string(), msg: e.to_string() };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let name = path.file_name().and_then(|s| s.to_str()).unwrap_or("checkpoint");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}

pub fn save(path: &Path, tr: &Trainer, fingerprint: &serde_json::Value) -> Result<()> {
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (ad, st) in tr.adapters.iter().zip(&tr.states) {
        for (i, (vname, var)) in ad.vars.iter().enumerate() {
            let shape = var.dims().to_vec();
            let p: Vec<f32> = var.flatten_all()?.to_vec1()?;
            named.push((format!("param/{}/{vname}", ad.spec.name), shape.clone(), f32_bytes(&p)));
            named.push((format!("adam_m/{}/{vname}", ad.spec.name), shape.clone(), f32_bytes(&st.m[i])));
            named.push((format!("adam_v/{}/{vname}", ad.spec.name), shape, f32_bytes(&st.v[i])));
        }
    }
    let state = TrainState {
        format: FORMAT,
        step: tr.step,
        loader: tr.loader_pos(),
        adam_t: tr.adapters.iter().zip(&tr.states).map(|(a, s)| (a.spec.name.clone(), s.t)).collect(),
        fingerprint: fingerprint.clone(),
    };
    let views = named
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| bad(path, e))?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([(META_KEY.to_string(), serde_json::to_string(&state).map_err(|e| bad(path, e))?)]);
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| bad(path, e))?;
    write_atomic(path, &bytes)
}

fn bad(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint { path: path.display().to_string(), msg: e.to_string() }
}

/// Reads the checkpoint into `tr`'s variables and optimizer state; returns the scalar state.
/// Refuses a checkpoint of another run (fingerprint), or with missing / misshapen tensors.
pub fn load(path: &Path, tr: &mut Trainer, fingerprint: &serde_json::Value) -> Result<TrainState> {
    let bytes = std::fs::read(path).map_err(|e| bad(path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(path, e))?;
    let text = meta.metadata().as_ref().and_then(|m| m.get(META_KEY)).ok_or_else(|| bad(path, "not a flora training checkpoint (no state metadata)"))?;
    let state: TrainState = serde_json::from_str(text).map_err(|e| bad(path, e))?;
    if state.format != FORMAT {
        return Err(bad(path, format!("checkpoint format {} (this flora reads {FORMAT})", state.format)));
    }
    if &state.fingerprint != fingerprint {
        return Err(bad(
            path,
            format!(
                "it belongs to a different run (data, adapter settings or options differ); resume with the same arguments, or train into a new --out.\n  checkpoint: {}\n  this run:   {}",
                state.fingerprint, fingerprint
            ),
        ));
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, e))?;
    let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let v = st.tensor(name).map_err(|_| bad(path, format!("missing tensor {name}")))?;
        if v.dtype() != Dtype::F32 || v.shape() != shape {
            return Err(bad(path, format!("tensor {name} has {:?} {:?}, expected F32 {shape:?}", v.dtype(), v.shape())));
        }
        Ok(v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    for (a, (ad, opt)) in tr.adapters.iter().zip(tr.states.iter_mut()).enumerate() {
        let name = &ad.spec.name;
        let t = state.adam_t.get(a).filter(|(n, _)| n == name).ok_or_else(|| bad(path, format!("no optimizer state for adapter {name}")))?.1;
        opt.t = t;
        for (i, (vname, var)) in ad.vars.iter().enumerate() {
            let shape = var.dims().to_vec();
            let p = read(&format!("param/{name}/{vname}"), &shape)?;
            var.set(&Tensor::from_vec(p, shape.as_slice(), var.device())?)?;
            opt.m[i] = read(&format!("adam_m/{name}/{vname}"), &shape)?;
            opt.v[i] = read(&format!("adam_v/{name}/{vname}"), &shape)?;
        }
    }
    Ok(state)
}
