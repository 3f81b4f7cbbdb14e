//! The engine's adapter slots: which loaded adapter sits in each slot the scheduler assigns, and
//! the packed per-projection tables (`ModelAdapters`) a step runs with.
//!
//! Slots hold weak references: an adapter stays in memory because a running sequence holds it,
//! not because it once had a slot, so the pool can evict idle adapters. Repacking copies every
//! slotted adapter's weights into one table per projection, so it happens only when the
//! scheduler changes a slot, not every step. The store has checked, transposed and (for bf16
//! inference) rounded each adapter when it loaded it (`PreparedAdapter`); a repack is a copy.

use crate::pool::LoadedAdapter;
use crate::scheduler::AdapterKey;
use flora_model::{Llama, ModelAdapters, PreparedAdapter};
use std::sync::{Arc, Weak};

pub struct Slots {
    slots: Vec<Option<Weak<LoadedAdapter>>>,
    packed: Option<ModelAdapters>,
    dirty: bool,
    /// An adapter with no weights (an empty or evicted slot: base model at every projection).
    empty: PreparedAdapter,
    /// Times the tables were rebuilt (for metrics).
    pub repacks: u64,
}

impl Slots {
    pub fn new(n: usize) -> Self {
        Self { slots: vec![None; n], packed: None, dirty: false, empty: PreparedAdapter::default(), repacks: 0 }
    }

    /// Puts `adapter` into `slot` (the scheduler's `slot_changes`).
    pub fn assign(&mut self, slot: usize, adapter: &Arc<LoadedAdapter>) {
        self.slots[slot] = Some(Arc::downgrade(adapter));
        self.dirty = true;
    }

    /// The key of the adapter in `slot`, if it is still alive.
    pub fn key(&self, slot: usize) -> Option<AdapterKey> {
        self.slots[slot].as_ref().and_then(Weak::upgrade).map(|a| a.key)
    }

    /// The tables for the current slots (rebuilt if a slot changed). None when no slot is used.
    pub fn tables(&mut self, model: &Llama) -> flora_model::Result<Option<&ModelAdapters>> {
        if self.dirty {
            let started = std::time::Instant::now();
            let live: Vec<Option<Arc<LoadedAdapter>>> = self.slots.iter().map(|s| s.as_ref().and_then(Weak::upgrade)).collect();
            let used = live.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
            // Free the old tables first: the new ones then reuse their memory instead of
            // faulting in fresh pages (hundreds of MB at 32 slots).
            self.packed = None;
            self.packed = if used == 0 {
                None
            } else {
                let refs: Vec<&PreparedAdapter> = live[..used].iter().map(|a| a.as_ref().map_or(&self.empty, |a| &a.adapter)).collect();
                Some(model.pack_prepared(&refs)?)
            };
            self.dirty = false;
            self.repacks += 1;
            crate::metrics::repacked(started.elapsed());
            tracing::debug!(slots = used, ms = started.elapsed().as_secs_f64() * 1e3, "adapter tables repacked");
        }
        Ok(self.packed.as_ref())
    }
}
