//! The adapter registry: which adapter names exist and where their files are. Nothing here
//! holds weights (that is the pool's job).
//!
//! Two sources:
//! - the adapters directory: every subdirectory `DIR/NAME/` with an `adapter_config.json` is
//!   adapter `NAME`. It is read on demand, so adapters copied in while the server runs are found
//!   without a restart, and thousands cost nothing until used;
//! - adapters loaded at run time from any path (`POST /v1/load_lora_adapter`).
//!
//! An adapter's *version* changes when its files change (directory adapters: modification time
//! and size of the weights file) or when it is loaded again under the same name, so the pool can
//! tell a stale copy from the current one.

use flora_adapters::AdapterKind;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::UNIX_EPOCH;

/// What the registry knows of one adapter without loading it.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterInfo {
    pub name: String,
    pub path: PathBuf,
    pub kind: AdapterKind,
    pub rank: usize,
    pub version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid adapter name {0:?}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")]
    BadName(String),
    #[error("adapter {0:?} is not registered")]
    NotFound(String),
    #[error("adapter {name:?}: {msg}")]
    BadAdapter { name: String, msg: String },
}

/// Adapter names are directory names: no separators, no `..`, nothing hidden.
pub fn validate_name(name: &str) -> Result<(), RegistryError> {
    let ok = (1..=128).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadName(name.to_string()))
    }
}

#[derive(Debug)]
pub struct Registry {
    root: Option<PathBuf>,
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Loaded at run time (these shadow directory adapters of the same name).
    runtime: HashMap<String, AdapterInfo>,
    /// Directory adapters unloaded at run time (hidden until loaded again).
    hidden: HashSet<String>,
    next_version: u64,
}

impl Registry {
    /// A registry over `root` (None: only run-time adapters). A missing root is created.
    pub fn new(root: Option<PathBuf>) -> std::io::Result<Self> {
        if let Some(r) = &root {
            std::fs::create_dir_all(r)?;
        }
        Ok(Self { root, inner: RwLock::new(Inner { next_version: 1, ..Default::default() }) })
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The current entry of `name`.
    pub fn get(&self, name: &str) -> Result<AdapterInfo, RegistryError> {
        validate_name(name)?;
        let inner = self.inner.read().expect("registry lock");
        if let Some(info) = inner.runtime.get(name) {
            return Ok(info.clone());
        }
        if inner.hidden.contains(name) {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        drop(inner);
        match &self.root {
            Some(root) if root.join(name).join("adapter_config.json").is_file() => read_info(name, &root.join(name)),
            _ => Err(RegistryError::NotFound(name.to_string())),
        }
    }

    /// Every registered adapter, by name. Directory entries that cannot be read are skipped
    /// (and reported when requested by name).
    pub fn list(&self) -> Vec<AdapterInfo> {
        let mut out = BTreeMap::new();
        if let Some(root) = &self.root {
            let hidden = self.inner.read().expect("registry lock").hidden.clone();
            for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
                let Some(name) = entry.file_name().to_str().map(String::from) else { continue };
                if validate_name(&name).is_err() || hidden.contains(&name) || !entry.path().join("adapter_config.json").is_file() {
                    continue;
                }
                if let Ok(info) = read_info(&name, &entry.path()) {
                    out.insert(name, info);
                }
            }
        }
        for (name, info) in &self.inner.read().expect("registry lock").runtime {
            out.insert(name.clone(), info.clone());
        }
        out.into_values().collect()
    }

    /// Registers (or replaces) `name` as the adapter at `path`, with a new version.
    pub fn register(&self, name: &str, path: &Path) -> Result<AdapterInfo, RegistryError> {
        validate_name(name)?;
        let mut info = read_info(name, path)?;
        let mut inner = self.inner.write().expect("registry lock");
        info.version ^= inner.next_version << 32;
        inner.next_version += 1;
        inner.hidden.remove(name);
        inner.runtime.insert(name.to_string(), info.clone());
        Ok(info)
    }

    /// Unregisters `name` (a directory adapter stays on disk, hidden until loaded again).
    pub fn unregister(&self, name: &str) -> Result<(), RegistryError> {
        self.get(name)?;
        let mut inner = self.inner.write().expect("registry lock");
        inner.runtime.remove(name);
        if self.root.as_ref().is_some_and(|r| r.join(name).is_dir()) {
            inner.hidden.insert(name.to_string());
        }
        Ok(())
    }
}

/// Kind, rank and version from `adapter_config.json` and the weights file's metadata.
fn read_info(name: &str, dir: &Path) -> Result<AdapterInfo, RegistryError> {
    let bad = |msg: String| RegistryError::BadAdapter { name: name.to_string(), msg };
    let (ac, kind) = flora_model::peft::read_adapter_config(dir, name).map_err(|e| match e {
        flora_model::ModelError::Adapter { msg, .. } => bad(msg),
        other => bad(other.to_string()),
    })?;
    let rank = if kind == AdapterKind::Ia3 { 1 } else { ac.r.unwrap_or(0) };
    let weights = dir.join("adapter_model.safetensors");
    let meta = std::fs::metadata(&weights).map_err(|e| bad(format!("{}: {e}", weights.display())))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as u64);
    // Same files, same version; any rewrite (temp + rename gives a new mtime) a new one.
    let version = (mtime ^ meta.len().rotate_left(40)) & 0xffff_ffff;
    Ok(AdapterInfo { name: name.to_string(), path: dir.to_path_buf(), kind, rank, version })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_the_directory_are_refused() {
        for bad in ["", "..", ".hidden", "a/b", "../x", "a\\b", "with space", "é", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "lora-r8_v1.2", "0abc", &"x".repeat(128)] {
            assert!(validate_name(good).is_ok(), "{good:?} refused");
        }
    }
}
