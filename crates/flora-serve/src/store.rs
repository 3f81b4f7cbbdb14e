//! The adapter store: registry (names → files) + pool (bytes in memory), and loading between
//! them. `acquire` is what a request calls to get the adapter it will run with; it blocks on
//! disk reads, so the HTTP layer calls it off the async threads.

use crate::metrics as m;
use crate::pool::{AdapterPool, LoadedAdapter, PoolError};
use crate::registry::{AdapterInfo, Registry, RegistryError};
use flora_adapters::LoraTables;
use flora_model::{LlamaConfig, PreparedAdapter};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("adapter {name:?} cannot be loaded: {msg}")]
    Load { name: String, msg: String },
}

pub struct AdapterStore {
    registry: Registry,
    pool: AdapterPool,
    model: LlamaConfig,
    /// The engine model's adapter table format: adapters are prepared in it when loaded.
    tables: Option<LoraTables>,
    /// One lock per adapter name being loaded, so concurrent first requests load it once.
    loading: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl AdapterStore {
    /// `model` and `tables` are the engine model's configuration and adapter table format
    /// (`Llama::config`, `Llama::adapter_tables`).
    pub fn new(registry: Registry, pool: AdapterPool, model: LlamaConfig, tables: Option<LoraTables>) -> Self {
        Self { registry, pool, model, tables, loading: Mutex::new(HashMap::new()) }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn pool(&self) -> &AdapterPool {
        &self.pool
    }

    /// The current version of `name`, from the pool or loaded from disk into it.
    pub fn acquire(&self, name: &str) -> Result<Arc<LoadedAdapter>, StoreError> {
        let info = self.registry.get(name)?;
        if let Some(hit) = self.pool.lookup(&info) {
            return Ok(hit);
        }
        let gate = self.loading.lock().expect("loading lock").entry(name.to_string()).or_default().clone();
        let _guard = gate.lock().expect("adapter load lock");
        // Someone may have loaded it while we waited (not counted as a second miss).
        let result = match self.pool.lookup_quiet(&info) {
            Some(hit) => Ok(hit),
            None => self.load(info),
        };
        m::pool(&self.pool.stats(), self.pool.max_bytes());
        result
    }

    /// Reads, validates (shapes against the model, finite values) and pools one adapter.
    fn load(&self, info: AdapterInfo) -> Result<Arc<LoadedAdapter>, StoreError> {
        let adapter = self.read(&info.path, &info.name)?;
        Ok(self.pool.insert(info, adapter)?)
    }

    /// Reads and validates an adapter directory and lays it out for the engine's tables (off
    /// the engine thread: a slot change then only copies it).
    fn read(&self, path: &Path, name: &str) -> Result<PreparedAdapter, StoreError> {
        let fail = |e: flora_model::ModelError| StoreError::Load { name: name.to_string(), msg: e.to_string() };
        let adapter = flora_model::peft::load_adapter_dir(path, name, &self.model).map_err(fail)?;
        let prepared = PreparedAdapter::new(&self.model, &adapter, self.tables).map_err(fail)?;
        tracing::info!(adapter = %name, kind = %adapter.kind, rank = adapter.rank, bytes = prepared.bytes(), "adapter loaded");
        Ok(prepared)
    }

    /// `POST /v1/load_lora_adapter`: validates the files by loading them, then registers the
    /// name (a new version if it existed). Running requests keep the version they started with.
    pub fn load_named(&self, name: &str, path: &Path) -> Result<Arc<LoadedAdapter>, StoreError> {
        crate::registry::validate_name(name)?;
        if !path.join("adapter_config.json").is_file() {
            return Err(StoreError::Load { name: name.to_string(), msg: format!("{} has no adapter_config.json", path.display()) });
        }
        // Validate before registering, so a bad file never replaces a good adapter.
        let adapter = self.read(path, name)?;
        let info = self.registry.register(name, path)?;
        let loaded = self.pool.insert(info, adapter)?;
        m::pool(&self.pool.stats(), self.pool.max_bytes());
        Ok(loaded)
    }

    /// `POST /v1/unload_lora_adapter`.
    pub fn unload(&self, name: &str) -> Result<(), StoreError> {
        self.registry.unregister(name)?;
        self.pool.remove(name);
        m::pool(&self.pool.stats(), self.pool.max_bytes());
        Ok(())
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        self.registry.list()
    }
}
