//! The engine's adapter slots: which loaded adapter sits in each slot the scheduler assigns, and
//! the packed per-projection tables (`ModelAdapters`) a step runs with.
//!
//! Slots hold weak references: an adapter stays in memory because a running sequence holds it,
//! not because it once had a slot, so the pool can evict idle adapters. Repacking copies every
//! slotted adapter's weights into one table per projection, so it happens only when the
//! scheduler changes a slot, not every step.

use crate::pool::LoadedAdapter;
use crate::scheduler::AdapterKey;
use flora_model::{Adapter, Llama, ModelAdapters};
use std::sync::{Arc, Weak};

pub struct Slots {
    slots: Vec<Option<Weak<LoadedAdapter>>>,
    packed: Option<ModelAdapters>,
    dirty: bool,
    /// An adapter with no weights (an empty or evicted slot: base model at every projection).
    empty: Adapter,
    /// Times the tables were rebuilt (for metrics).
    pub repacks: u64,
}

impl Slots {
    pub fn new(n: usize) -> Self {
        let empty = Adapter { name: String::new(), kind: flora_adapters::AdapterKind::Lora, rank: 0, weights: Default::default() };
        Self { slots: vec![None; n], packed: None, dirty: false, empty, repacks: 0 }
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
            let live: Vec<Option<Arc<LoadedAdapter>>> = self.slots.iter().map(|s| s.as_ref().and_then(Weak::upgrade)).collect();
            let used = live.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
            self.packed = if used == 0 {
                None
            } else {
                let refs: Vec<&Adapter> = live[..used].iter().map(|a| a.as_ref().map_or(&self.empty, |a| &a.adapter)).collect();
                Some(model.pack_adapters(&refs)?)
            };
            self.dirty = false;
            self.repacks += 1;
        }
        Ok(self.packed.as_ref())
    }
}
