//! The continuous-batching scheduler. Plain data in, a step plan out: it owns no tensors and
//! knows no model, so it is tested on its own.
//!
//! Every step it fills a token budget in this order:
//! 1. one token for every running sequence that is decoding (decodes keep flowing);
//! 2. the next prefill chunk of running sequences whose prompt is not yet all in the cache;
//! 3. new sequences from the waiting queue (first come, first served), each starting with a
//!    prefill chunk, as long as the running set has room and their adapter can get a slot.
//!
//! Adapter slots: a step runs with at most `max_loras` distinct adapters, each in a numbered slot
//! of the packed adapter table. A slot keeps its adapter after its sequences finish (so a popular
//! adapter is not repacked every request) and is reassigned, least recently used first, only when
//! no running sequence uses it. A waiting sequence whose adapter cannot get a slot waits; the
//! ones behind it with other adapters may go ahead.

use std::collections::{HashMap, VecDeque};

/// Identifies one sequence (one choice of one request).
pub type SeqId = u64;
/// Identifies one loaded adapter version (a new version of a name gets a new key).
pub type AdapterKey = u64;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most tokens (prefill + decode rows) in one step.
    pub max_batch_tokens: usize,
    /// Most sequences running (holding a KV cache) at once.
    pub max_running: usize,
    /// Most distinct adapters in one step (slots of the packed adapter table).
    pub max_loras: usize,
    /// KV-cache tokens the running sequences may reserve together. A sequence reserves its
    /// prompt plus its `max_tokens` when admitted, so the caches never outgrow this (no
    /// preemption needed).
    pub max_kv_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { max_batch_tokens: 512, max_running: 64, max_loras: 32, max_kv_tokens: 1 << 17 }
    }
}

/// One sequence's share of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanItem {
    pub seq: SeqId,
    /// Tokens to run: `known[cached .. cached + n_tokens]`.
    pub n_tokens: usize,
    /// Start position of those tokens (the sequence's cache length before the step).
    pub start: usize,
    /// Adapter slot (None: base model).
    pub slot: Option<usize>,
    /// True when the step reaches the end of the known tokens: sample the next token.
    pub sample: bool,
}

/// What one step runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub items: Vec<PlanItem>,
    /// Slots whose adapter changes before this step: `(slot, adapter)`.
    pub slot_changes: Vec<(usize, AdapterKey)>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn n_tokens(&self) -> usize {
        self.items.iter().map(|i| i.n_tokens).sum()
    }
}

#[derive(Clone, Debug)]
struct Seq {
    adapter: Option<AdapterKey>,
    /// Tokens known (prompt + sampled so far).
    known: usize,
    /// Tokens already in the KV cache.
    cached: usize,
    slot: Option<usize>,
    /// KV tokens reserved for it (prompt + most new tokens).
    reserve: usize,
}

#[derive(Clone, Debug, Default)]
struct Slot {
    adapter: Option<AdapterKey>,
    /// Running sequences using it.
    users: usize,
    /// Step number of its last use (for least-recently-used reassignment).
    last_used: u64,
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    seqs: HashMap<SeqId, Seq>,
    slots: Vec<Slot>,
    step_no: u64,
    /// KV tokens reserved by running sequences.
    reserved: usize,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        assert!(cfg.max_batch_tokens > 0 && cfg.max_running > 0 && cfg.max_loras > 0, "scheduler limits must be positive");
        let slots = vec![Slot::default(); cfg.max_loras];
        Self { cfg, waiting: VecDeque::new(), running: Vec::new(), seqs: HashMap::new(), slots, step_no: 0, reserved: 0 }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a sequence whose `prompt_len` tokens are known and that may generate up to
    /// `max_new` more. Ids must be unique; `prompt_len + max_new` must fit `max_kv_tokens`.
    pub fn add(&mut self, id: SeqId, prompt_len: usize, max_new: usize, adapter: Option<AdapterKey>) {
        assert!(prompt_len > 0, "a sequence needs at least one prompt token");
        let reserve = prompt_len + max_new;
        assert!(reserve <= self.cfg.max_kv_tokens, "sequence {id} needs {reserve} KV tokens, over the limit");
        let prev = self.seqs.insert(id, Seq { adapter, known: prompt_len, cached: 0, slot: None, reserve });
        assert!(prev.is_none(), "sequence id {id} added twice");
        self.waiting.push_back(id);
    }

    /// Records that a step ran `item` (its tokens are now cached).
    pub fn advance(&mut self, item: &PlanItem) {
        if let Some(s) = self.seqs.get_mut(&item.seq) {
            s.cached += item.n_tokens;
            debug_assert!(s.cached <= s.known);
        }
    }

    /// Records a sampled token (the sequence now needs one more decode step).
    pub fn append_token(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.known += 1;
        }
    }

    /// Removes a sequence (finished, cancelled or failed), waiting or running.
    pub fn remove(&mut self, id: SeqId) {
        let Some(s) = self.seqs.remove(&id) else { return };
        if let Some(slot) = s.slot {
            self.slots[slot].users -= 1;
        }
        if self.running.contains(&id) {
            self.reserved -= s.reserve;
        }
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
    }

    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn n_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// The adapter in each slot (None: empty).
    pub fn slot_adapters(&self) -> Vec<Option<AdapterKey>> {
        self.slots.iter().map(|s| s.adapter).collect()
    }

    /// Plans the next step. Sequences admitted by it move from waiting to running.
    pub fn schedule(&mut self) -> StepPlan {
        self.step_no += 1;
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_batch_tokens;

        // 1. Decodes, then 2. prefill chunks of running sequences, in arrival order.
        for pass_decodes in [true, false] {
            for &id in &self.running {
                if budget == 0 {
                    break;
                }
                let s = &self.seqs[&id];
                let todo = s.known - s.cached;
                if todo == 0 || (todo == 1) != pass_decodes {
                    continue;
                }
                let n = todo.min(budget);
                budget -= n;
                plan.items.push(PlanItem { seq: id, n_tokens: n, start: s.cached, slot: s.slot, sample: n == todo });
            }
        }
        for item in &plan.items {
            if let Some(slot) = item.slot {
                self.slots[slot].last_used = self.step_no;
            }
        }

        // 3. Admit waiting sequences.
        let mut i = 0;
        while i < self.waiting.len() && budget > 0 && self.running.len() < self.cfg.max_running {
            let id = self.waiting[i];
            if self.reserved + self.seqs[&id].reserve > self.cfg.max_kv_tokens {
                break; // first come, first served: wait for caches to free up
            }
            let adapter = self.seqs[&id].adapter;
            let slot = match adapter {
                None => None,
                Some(key) => match self.slot_for(key, &mut plan) {
                    Some(slot) => Some(slot),
                    None => {
                        i += 1; // no slot free for this adapter now: let others pass
                        continue;
                    }
                },
            };
            self.waiting.remove(i);
            self.running.push(id);
            let s = self.seqs.get_mut(&id).expect("waiting sequence is known");
            self.reserved += s.reserve;
            s.slot = slot;
            if let Some(slot) = slot {
                self.slots[slot].users += 1;
                self.slots[slot].last_used = self.step_no;
            }
            let n = (s.known - s.cached).min(budget);
            budget -= n;
            plan.items.push(PlanItem { seq: id, n_tokens: n, start: s.cached, slot, sample: n == s.known - s.cached });
        }
        plan
    }

    /// The slot holding `key`, or a slot reassigned to it (free first, then the least recently
    /// used one that no running sequence uses); None when every slot is busy.
    fn slot_for(&mut self, key: AdapterKey, plan: &mut StepPlan) -> Option<usize> {
        if let Some(i) = self.slots.iter().position(|s| s.adapter == Some(key)) {
            return Some(i);
        }
        let i = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.users == 0)
            .min_by_key(|(_, s)| (s.adapter.is_some(), s.last_used))
            .map(|(i, _)| i)?;
        self.slots[i].adapter = Some(key);
        plan.slot_changes.push((i, key));
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(tokens: usize, running: usize, loras: usize) -> SchedulerConfig {
        SchedulerConfig { max_batch_tokens: tokens, max_running: running, max_loras: loras, max_kv_tokens: 1000 }
    }

    /// Runs a plan as the engine would: advance every item, sample where asked.
    fn run(s: &mut Scheduler, plan: &StepPlan) {
        for item in &plan.items {
            s.advance(item);
            if item.sample {
                s.append_token(item.seq);
            }
        }
    }

    #[test]
    fn prefill_is_chunked_under_the_budget_and_decodes_go_first() {
        let mut s = Scheduler::new(cfg(8, 8, 4));
        s.add(1, 3, 10, None);
        let p = s.schedule();
        assert_eq!(p.items, vec![PlanItem { seq: 1, n_tokens: 3, start: 0, slot: None, sample: true }]);
        run(&mut s, &p);
        s.add(2, 20, 10, None); // a long prompt arrives while 1 decodes
        let p = s.schedule();
        assert_eq!(p.items[0], PlanItem { seq: 1, n_tokens: 1, start: 3, slot: None, sample: true });
        assert_eq!(p.items[1], PlanItem { seq: 2, n_tokens: 7, start: 0, slot: None, sample: false });
        run(&mut s, &p);
        let p = s.schedule();
        assert_eq!(p.items[0].seq, 1, "the decode keeps flowing during the prefill");
        assert_eq!(p.items[1], PlanItem { seq: 2, n_tokens: 7, start: 7, slot: None, sample: false });
        run(&mut s, &p);
        let p = s.schedule();
        assert_eq!(p.items[1], PlanItem { seq: 2, n_tokens: 6, start: 14, slot: None, sample: true });
        assert!(p.n_tokens() <= 8);
    }

    #[test]
    fn distinct_adapters_get_distinct_slots_and_a_shared_adapter_shares_one() {
        let mut s = Scheduler::new(cfg(64, 8, 4));
        s.add(1, 2, 10, Some(10));
        s.add(2, 2, 10, Some(11));
        s.add(3, 2, 10, Some(10));
        s.add(4, 2, 10, None);
        let p = s.schedule();
        let slot = |id| p.items.iter().find(|i| i.seq == id).unwrap().slot;
        assert_eq!(slot(1), slot(3));
        assert_ne!(slot(1), slot(2));
        assert_eq!(slot(4), None);
        assert_eq!(p.slot_changes.len(), 2);
    }

    #[test]
    fn adapters_beyond_the_slots_wait_and_others_pass() {
        let mut s = Scheduler::new(cfg(64, 8, 2));
        s.add(1, 2, 10, Some(1));
        s.add(2, 2, 10, Some(2));
        s.add(3, 2, 10, Some(3)); // no slot left
        s.add(4, 2, 10, Some(1)); // shares slot of 1
        s.add(5, 2, 10, None);
        let p = s.schedule();
        let ids: Vec<_> = p.items.iter().map(|i| i.seq).collect();
        assert_eq!(ids, vec![1, 2, 4, 5]);
        assert_eq!(s.n_waiting(), 1);
        run(&mut s, &p);
        s.remove(2); // frees adapter 2's slot
        let p = s.schedule();
        let item3 = p.items.iter().find(|i| i.seq == 3).expect("3 admitted once a slot is free");
        assert_eq!(p.slot_changes, vec![(item3.slot.unwrap(), 3)]);
    }

    #[test]
    fn a_finished_adapter_keeps_its_slot_until_needed_and_lru_goes_first() {
        let mut s = Scheduler::new(cfg(64, 8, 2));
        s.add(1, 1, 10, Some(1));
        let p = s.schedule();
        run(&mut s, &p);
        s.add(2, 1, 10, Some(2));
        let p = s.schedule();
        run(&mut s, &p);
        s.remove(1);
        s.remove(2);
        // Adapter 1 comes back: no repack.
        s.add(3, 1, 10, Some(1));
        let p = s.schedule();
        assert!(p.slot_changes.is_empty());
        run(&mut s, &p);
        s.remove(3);
        // A new adapter replaces the least recently used one (2).
        s.add(4, 1, 10, Some(9));
        let p = s.schedule();
        assert_eq!(s.slot_adapters().iter().filter(|a| **a == Some(1)).count(), 1);
        assert_eq!(p.slot_changes.len(), 1);
        assert!(!s.slot_adapters().contains(&Some(2)));
    }

    #[test]
    fn running_limit_and_removal_of_waiting_and_running() {
        let mut s = Scheduler::new(cfg(64, 2, 2));
        for id in 0..4 {
            s.add(id, 3, 10, None);
        }
        let p = s.schedule();
        assert_eq!(p.items.len(), 2);
        assert_eq!((s.n_running(), s.n_waiting()), (2, 2));
        s.remove(3); // cancelled while waiting
        s.remove(0); // cancelled while running
        run(&mut s, &p); // advancing a removed sequence is harmless
        let p = s.schedule();
        let ids: Vec<_> = p.items.iter().map(|i| i.seq).collect();
        assert_eq!(ids, vec![1, 2]);
        assert!(!s.is_idle());
        s.remove(1);
        s.remove(2);
        assert!(s.is_idle());
        assert!(s.schedule().is_empty());
    }

    #[test]
    fn admission_stops_at_the_kv_reservation_limit() {
        let mut s = Scheduler::new(SchedulerConfig { max_kv_tokens: 100, ..cfg(64, 8, 2) });
        s.add(1, 30, 30, None); // reserves 60
        s.add(2, 20, 30, None); // 50 more would be 110 > 100: waits
        s.add(3, 5, 5, None); // fits, but first come first served: waits behind 2
        let p = s.schedule();
        assert_eq!(p.items.iter().map(|i| i.seq).collect::<Vec<_>>(), vec![1]);
        s.remove(1);
        let p = s.schedule();
        assert_eq!(p.items.iter().map(|i| i.seq).collect::<Vec<_>>(), vec![2, 3]);
    }

    /// Random traffic: every sequence finishes, budgets and slot limits always hold, and every
    /// item continues exactly where the cache ends.
    #[test]
    fn random_traffic_respects_every_limit_and_finishes_everything() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let c = SchedulerConfig { max_kv_tokens: 100, ..cfg(16, 5, 3) };
        let mut s = Scheduler::new(c.clone());
        let mut remaining: HashMap<SeqId, usize> = HashMap::new(); // tokens still to generate
        let mut cached: HashMap<SeqId, usize> = HashMap::new();
        let mut next_id = 0;
        for step in 0..2000 {
            if step < 1500 && rng.random_bool(0.3) {
                let adapter = if rng.random_bool(0.2) { None } else { Some(rng.random_range(0..6)) };
                s.add(next_id, rng.random_range(1..40), 10, adapter);
                remaining.insert(next_id, rng.random_range(1..10));
                cached.insert(next_id, 0);
                next_id += 1;
            }
            let p = s.schedule();
            assert!(p.n_tokens() <= c.max_batch_tokens);
            assert!(s.n_running() <= c.max_running);
            assert!(s.reserved <= c.max_kv_tokens);
            for item in &p.items {
                assert_eq!(item.start, cached[&item.seq]);
                assert!(item.n_tokens > 0);
                assert!(item.slot.is_none_or(|slot| slot < c.max_loras));
            }
            s.seqs.values().filter(|q| q.slot.is_some()).for_each(|q| assert_eq!(s.slots[q.slot.unwrap()].adapter, q.adapter));
            for item in &p.items {
                s.advance(item);
                *cached.get_mut(&item.seq).unwrap() += item.n_tokens;
                if item.sample {
                    let r = remaining.get_mut(&item.seq).unwrap();
                    *r -= 1;
                    if *r == 0 {
                        s.remove(item.seq);
                    } else {
                        s.append_token(item.seq);
                    }
                }
            }
        }
        assert!(s.is_idle(), "{} waiting, {} running at the end", s.n_waiting(), s.n_running());
    }
}
