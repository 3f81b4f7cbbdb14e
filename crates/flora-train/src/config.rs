//! Per-adapter training configuration: kind, rank, alpha, target projections, learning rate.
//!
//! Sources, most specific first: `[adapters.NAME]` of the TOML file, then the CLI flags
//! (`--kind --rank --alpha --targets --lr`), then the file's `[defaults]`, then the paper's
//! defaults: targets q and k, rank 1, learning rate fLoRA 8e-3, IA3 5e-3, LoRA 1e-4
//! (Wen & Chaudhuri, MultiPL-E runs). LoRA alpha defaults to 2 x rank (scale 2).
//!
//! ```toml
//! [defaults]
//! kind = "flora"
//! rank = 2
//!
//! [adapters.sql]
//! kind = "lora"
//! rank = 8
//! alpha = 16
//! targets = ["q_proj", "k_proj", "v_proj"]
//! lr = 2e-4
//! ```

use crate::error::{Result, TrainError};
use flora_adapters::AdapterKind;
use flora_model::Proj;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One source's settings; every field optional (unset = ask the next source).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartialSpec {
    pub kind: Option<String>,
    pub rank: Option<usize>,
    pub alpha: Option<f32>,
    /// Module names: `q_proj` (or `q`), `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
    /// `down_proj`, or `all`.
    pub targets: Option<Vec<String>>,
    pub lr: Option<f64>,
    /// IA3 only: modules whose input (not output) is scaled (PEFT's `feedforward_modules`).
    /// Default: `down_proj` when targeted.
    pub feedforward: Option<Vec<String>>,
}

/// The TOML config file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub defaults: PartialSpec,
    #[serde(default)]
    pub adapters: BTreeMap<String, PartialSpec>,
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))
    }
}

/// One adapter's resolved configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterSpec {
    pub name: String,
    #[serde(with = "kind_serde")]
    pub kind: AdapterKind,
    /// LoRA / fLoRA rank (1 for IA3).
    pub rank: usize,
    /// LoRA alpha (scale = alpha / rank); None for other kinds.
    pub alpha: Option<f32>,
    /// Targeted projections, in `Proj::ALL` order.
    #[serde(with = "projs_serde")]
    pub targets: Vec<Proj>,
    /// IA3: targeted projections whose input is scaled.
    #[serde(with = "projs_serde")]
    pub feedforward: Vec<Proj>,
    /// Peak learning rate.
    pub lr: f64,
}

/// The paper's learning rate for a kind.
pub fn default_lr(kind: AdapterKind) -> f64 {
    match kind {
        AdapterKind::Flora => 8e-3,
        AdapterKind::Ia3 => 5e-3,
        AdapterKind::Lora => 1e-4,
    }
}

pub fn parse_kind(s: &str) -> Result<AdapterKind> {
    match s.to_ascii_lowercase().as_str() {
        "flora" => Ok(AdapterKind::Flora),
        "lora" => Ok(AdapterKind::Lora),
        "ia3" => Ok(AdapterKind::Ia3),
        other => Err(TrainError::Config(format!("unknown adapter kind {other:?} (flora, lora, ia3)"))),
    }
}

/// `q`, `q_proj`, `self_attn.q_proj`, ... or `all`.
pub fn parse_targets(names: &[String]) -> Result<Vec<Proj>> {
    let mut out = Vec::new();
    for n in names {
        let n = n.trim();
        if n == "all" || n == "all-linear" {
            out.extend(Proj::ALL);
            continue;
        }
        let module = n.rsplit('.').next().unwrap_or(n);
        let p = Proj::from_module(module)
            .or_else(|| Proj::from_module(&format!("{module}_proj")))
            .ok_or_else(|| TrainError::Config(format!("unknown target module {n:?} (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, all)")))?;
        out.push(p);
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(TrainError::Config("targets is empty".into()));
    }
    Ok(out)
}

/// Resolves one spec per adapter name (see the module docs for precedence). Returns the specs
/// and warnings (e.g. config entries no data refers to).
pub fn resolve(names: &[String], file: Option<&ConfigFile>, cli: &PartialSpec) -> Result<(Vec<AdapterSpec>, Vec<String>)> {
    let empty = ConfigFile::default();
    let file = file.unwrap_or(&empty);
    let mut warnings = Vec::new();
    for n in file.adapters.keys() {
        if !names.contains(n) {
            warnings.push(format!("config has [adapters.{n}] but no example names adapter {n:?}; ignored"));
        }
    }
    let specs = names
        .iter()
        .map(|name| {
            let own = file.adapters.get(name).cloned().unwrap_or_default();
            let chain = [&own, cli, &file.defaults];
            macro_rules! pick {
                ($f:ident) => {
                    chain.iter().find_map(|s| s.$f.clone())
                };
            }
            let ctx = |e: TrainError| match e {
                TrainError::Config(m) => TrainError::Config(format!("adapter {name:?}: {m}")),
                other => other,
            };
            let kind = parse_kind(&pick!(kind).unwrap_or_else(|| "flora".into())).map_err(ctx)?;
            let rank = if kind == AdapterKind::Ia3 { 1 } else { pick!(rank).unwrap_or(1) };
            if rank == 0 || rank > 256 {
                return Err(TrainError::Config(format!("adapter {name:?}: rank {rank} must be in 1..=256")));
            }
            let targets = parse_targets(&pick!(targets).unwrap_or_else(|| vec!["q_proj".into(), "k_proj".into()])).map_err(ctx)?;
            let feedforward = match kind {
                AdapterKind::Ia3 => match pick!(feedforward) {
                    Some(f) if f.is_empty() => vec![],
                    Some(f) => parse_targets(&f).map_err(ctx)?.into_iter().filter(|p| targets.contains(p)).collect(),
                    None => targets.iter().copied().filter(|&p| p == Proj::Down).collect(),
                },
                _ => vec![],
            };
            let alpha = match kind {
                AdapterKind::Lora => Some(pick!(alpha).unwrap_or(2.0 * rank as f32)),
                _ => None,
            };
            if alpha.is_some_and(|a| !a.is_finite() || a <= 0.0) {
                return Err(TrainError::Config(format!("adapter {name:?}: alpha must be positive")));
            }
            let lr = pick!(lr).unwrap_or_else(|| default_lr(kind));
            if !lr.is_finite() || lr <= 0.0 {
                return Err(TrainError::Config(format!("adapter {name:?}: lr {lr} must be positive")));
            }
            Ok(AdapterSpec { name: name.clone(), kind, rank, alpha, targets, feedforward, lr })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((specs, warnings))
}

mod kind_serde {
    use flora_adapters::AdapterKind;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(k: &AdapterKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&k.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<AdapterKind, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_kind(&s).map_err(serde::de::Error::custom)
    }
}

mod projs_serde {
    use flora_model::Proj;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(ps: &[Proj], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(ps.iter().map(|p| p.module()))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Proj>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter().map(|n| Proj::from_module(n).ok_or_else(|| serde::de::Error::custom(format!("unknown module {n}")))).collect()
    }
}
