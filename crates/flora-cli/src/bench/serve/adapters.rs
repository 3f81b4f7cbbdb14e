//! Adapter directories for the serving benchmark, generated once and reused.

use crate::bench::random_adapter::random_adapter;
use anyhow::{bail, Context, Result};
use flora_adapters::AdapterKind;
use flora_model::{LlamaConfig, Proj};
use std::path::Path;

pub fn parse_kind(s: &str) -> Result<AdapterKind> {
    Ok(match s {
        "lora" => AdapterKind::Lora,
        "flora" => AdapterKind::Flora,
        "ia3" => AdapterKind::Ia3,
        other => bail!("adapter kind {other:?}: use lora, flora or ia3"),
    })
}

fn parse_targets(targets: &[String]) -> Result<Vec<Proj>> {
    if targets.iter().any(|t| t == "all") {
        return Ok(Proj::ALL.to_vec());
    }
    targets
        .iter()
        .map(|t| Proj::from_module(&format!("{}_proj", t.trim_end_matches("_proj"))).with_context(|| format!("unknown target {t:?} (q,k,v,o,gate,up,down)")))
        .collect()
}

/// The model's configuration, read from the file's metadata only.
pub fn model_config(model: Option<&Path>) -> Result<LlamaConfig> {
    let path = flora_model::default_model::resolve_model(model)?;
    let mut f = std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
    match candle_core::quantized::gguf_file::Content::read(&mut f) {
        Ok(content) => Ok(LlamaConfig::from_gguf(&content)?),
        Err(_) => Ok(flora_model::weights::load(&path)?.config),
    }
}

/// Writes adapters `{kind}-r{rank}-000 ...` under `dir` (skipping ones already there); returns
/// the bytes one of them takes in memory.
pub fn generate(cfg: &LlamaConfig, dir: &Path, kind: AdapterKind, rank: usize, n: usize, targets: &[String], seed: u64) -> Result<usize> {
    let targets = parse_targets(targets)?;
    let bar = (n > 50).then(|| {
        let b = indicatif::ProgressBar::new(n as u64);
        b.set_style(indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} [{eta}]").expect("progress template"));
        b.set_message(format!("writing {kind} r{rank} adapters"));
        b
    });
    let mut bytes = 0;
    for i in 0..n {
        let name = super::adapter_name(Some(kind), rank, i);
        let path = dir.join(&name);
        if i == 0 || !path.join("adapter_config.json").is_file() {
            let mut a = random_adapter(cfg, &targets, kind, rank, seed.wrapping_mul(1_000_003).wrapping_add(i as u64 + rank as u64 * 7919))?;
            a.name = name;
            bytes = a.n_bytes();
            if !path.join("adapter_config.json").is_file() {
                flora_model::peft::save_adapter_dir(&a, &path, Some(1.0))?;
            }
        }
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    Ok(bytes)
}
