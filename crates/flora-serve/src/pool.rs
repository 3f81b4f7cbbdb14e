//! The adapter pool: loaded adapters in memory, bounded in bytes.
//!
//! A request holds an `Arc` of the adapter version it started with for as long as it runs; that
//! is what pins it. Making room evicts the least recently used adapters that nothing else holds
//! (`Arc::strong_count == 1`). Replacing an adapter drops the pool's copy of the old version;
//! requests already running on it keep theirs until they end.
//!
//! Adapters are held as the engine's tables use them (`PreparedAdapter`: checked, laid out, in
//! bf16 inference rounded with a bf16 copy), and the budget counts those bytes exactly.

use crate::registry::AdapterInfo;
use crate::scheduler::AdapterKey;
use flora_model::PreparedAdapter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One adapter version in memory.
#[derive(Debug)]
pub struct LoadedAdapter {
    /// Unique per load (the scheduler's slot key).
    pub key: AdapterKey,
    pub info: AdapterInfo,
    /// Laid out for the engine's tables (a slot change copies it).
    pub adapter: PreparedAdapter,
    pub bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("adapter {name:?} needs {need} bytes but the pool holds at most {max} (raise --max-pool-bytes)")]
    TooLarge { name: String, need: usize, max: usize },
    #[error("the adapter pool is full of adapters in use ({used} of {max} bytes); retry when requests finish")]
    Full { used: usize, max: usize },
}

/// Counters for metrics and reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Requests that found their adapter's version pooled.
    pub hits: u64,
    /// Requests that did not: the one that loads it and any that wait for that load.
    pub misses: u64,
    /// Adapters read (from disk or a load request) and offered to the pool: one per version
    /// however many requests waited for it, as the store loads each version once at a time.
    pub loads: u64,
    pub evictions: u64,
    pub bytes: usize,
    pub adapters: usize,
}

#[derive(Debug)]
pub struct AdapterPool {
    max_bytes: usize,
    inner: Mutex<Inner>,
    next_key: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    bytes: usize,
    tick: u64,
    stats: PoolStats,
}

#[derive(Debug)]
struct Entry {
    adapter: Arc<LoadedAdapter>,
    last_used: u64,
}

impl AdapterPool {
    pub fn new(max_bytes: usize) -> Self {
        Self { max_bytes, inner: Mutex::new(Inner::default()), next_key: AtomicU64::new(1) }
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The pooled copy of `info`'s version (a hit), or None (a miss: load it and `insert`).
    pub fn lookup(&self, info: &AdapterInfo) -> Option<Arc<LoadedAdapter>> {
        self.find(info, true)
    }

    /// `lookup` without counting a hit or miss (a re-check after waiting for another loader).
    pub fn lookup_quiet(&self, info: &AdapterInfo) -> Option<Arc<LoadedAdapter>> {
        self.find(info, false)
    }

    fn find(&self, info: &AdapterInfo, count: bool) -> Option<Arc<LoadedAdapter>> {
        let mut inner = self.inner.lock().expect("pool lock");
        inner.tick += 1;
        let tick = inner.tick;
        let found = match inner.entries.get_mut(&info.name) {
            Some(e) if e.adapter.info.version == info.version && e.adapter.info.path == info.path => {
                e.last_used = tick;
                Some(e.adapter.clone())
            }
            _ => None,
        };
        match (count, found.is_some()) {
            (false, _) => {}
            (true, true) => inner.stats.hits += 1,
            (true, false) => inner.stats.misses += 1,
        }
        found
    }

    /// Adds a freshly loaded adapter, evicting unpinned adapters (least recently used first)
    /// to stay within the byte budget. An older version of the same name is dropped.
    pub fn insert(&self, info: AdapterInfo, adapter: PreparedAdapter) -> Result<Arc<LoadedAdapter>, PoolError> {
        let bytes = adapter.bytes();
        if bytes > self.max_bytes {
            return Err(PoolError::TooLarge { name: info.name, need: bytes, max: self.max_bytes });
        }
        let mut inner = self.inner.lock().expect("pool lock");
        inner.stats.loads += 1;
        // Another loader may have won the race for the same version.
        if let Some(e) = inner.entries.get(&info.name) {
            if e.adapter.info.version == info.version && e.adapter.info.path == info.path {
                return Ok(e.adapter.clone());
            }
        }
        if let Some(old) = inner.entries.remove(&info.name) {
            inner.bytes -= old.adapter.bytes;
        }
        while inner.bytes + bytes > self.max_bytes {
            let victim = inner
                .entries
                .iter()
                .filter(|(_, e)| Arc::strong_count(&e.adapter) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(name, _)| name.clone());
            let Some(victim) = victim else {
                return Err(PoolError::Full { used: inner.bytes, max: self.max_bytes });
            };
            let e = inner.entries.remove(&victim).expect("victim is present");
            inner.bytes -= e.adapter.bytes;
            inner.stats.evictions += 1;
        }
        inner.tick += 1;
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let loaded = Arc::new(LoadedAdapter { key, info: info.clone(), adapter, bytes });
        inner.bytes += bytes;
        let last_used = inner.tick;
        inner.entries.insert(info.name, Entry { adapter: loaded.clone(), last_used });
        Ok(loaded)
    }

    /// Drops the pool's copy of `name` (running requests keep theirs).
    pub fn remove(&self, name: &str) {
        let mut inner = self.inner.lock().expect("pool lock");
        if let Some(e) = inner.entries.remove(name) {
            inner.bytes -= e.adapter.bytes;
        }
    }

    pub fn stats(&self) -> PoolStats {
        let inner = self.inner.lock().expect("pool lock");
        PoolStats { bytes: inner.bytes, adapters: inner.entries.len(), ..inner.stats }
    }

    /// Names currently in memory.
    pub fn resident(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.lock().expect("pool lock").entries.keys().cloned().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use flora_adapters::{AdapterKind, AdapterWeights};
    use flora_model::Proj;
    use std::collections::BTreeMap;

    /// An IA3 adapter of `n` floats (4n bytes, prepared for f32 inference).
    fn adapter(name: &str, n: usize) -> (AdapterInfo, PreparedAdapter) {
        let mut cfg = flora_model::LlamaConfig::tiny();
        cfg.intermediate = n;
        let l = Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
        let weights = BTreeMap::from([((0, Proj::Down), AdapterWeights::Ia3 { l, on_input: true })]);
        let info = AdapterInfo { name: name.into(), path: format!("/x/{name}").into(), kind: AdapterKind::Ia3, rank: 1, version: 1 };
        let adapter = flora_model::Adapter { name: name.into(), kind: AdapterKind::Ia3, rank: 1, weights };
        (info, PreparedAdapter::new(&cfg, &adapter, None).unwrap())
    }

    #[test]
    fn evicts_least_recently_used_unpinned_adapters_within_the_byte_budget() {
        let pool = AdapterPool::new(400); // room for 3 adapters of 100 floats
        for n in ["a", "b", "c"] {
            let (i, a) = adapter(n, 25);
            drop(pool.insert(i, a).unwrap());
        }
        assert_eq!(pool.stats().bytes, 300);
        // Touch a; pin b (a running request holds it).
        assert!(pool.lookup(&adapter("a", 25).0).is_some());
        let pinned_b = pool.lookup(&adapter("b", 25).0).unwrap();
        let (i, a) = adapter("d", 50); // 200 bytes: must evict 100 more than the free 100
        drop(pool.insert(i, a).unwrap());
        assert_eq!(pool.resident(), vec!["a", "b", "d"], "c was least recently used and unpinned");
        let (i, a) = adapter("e", 50);
        drop(pool.insert(i, a).unwrap());
        assert_eq!(pool.resident(), vec!["b", "e"], "a and d go, pinned b stays");
        let s = pool.stats();
        assert_eq!((s.evictions, s.bytes, s.hits, s.loads), (3, 300, 2, 5));
        drop(pinned_b);
    }

    #[test]
    fn a_pool_of_pinned_adapters_refuses_rather_than_overflows() {
        let pool = AdapterPool::new(200);
        let (i, a) = adapter("a", 50);
        let held = pool.insert(i, a).unwrap();
        let (i, a) = adapter("b", 10);
        assert!(matches!(pool.insert(i, a), Err(PoolError::Full { .. })));
        let (i, a) = adapter("huge", 60);
        assert!(matches!(pool.insert(i, a), Err(PoolError::TooLarge { .. })));
        drop(held);
        let (i, a) = adapter("b", 10);
        assert!(pool.insert(i, a).is_ok());
    }

    #[test]
    fn a_new_version_replaces_the_old_and_running_requests_keep_theirs() {
        let pool = AdapterPool::new(1000);
        let (i, a) = adapter("a", 10);
        let v1 = pool.insert(i.clone(), a).unwrap();
        let mut i2 = i.clone();
        i2.version = 2;
        assert!(pool.lookup(&i2).is_none(), "stale version is a miss");
        let (_, a) = adapter("a", 20);
        let v2 = pool.insert(i2.clone(), a).unwrap();
        assert_ne!(v1.key, v2.key);
        assert_eq!(v1.info.version, 1, "the old version is intact for whoever holds it");
        assert_eq!(pool.stats().bytes, 80);
        assert_eq!(pool.lookup(&i2).unwrap().key, v2.key);
    }
}
