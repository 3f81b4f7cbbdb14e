//! The engine thread's loop: take messages, plan a step, run it through the model, sample, and
//! report text to each request.

use super::slots::Slots;
use super::{EngineStats, Event, FinishReason, GenRequest, Msg};
use crate::metrics as m;
use crate::scheduler::{PlanItem, Scheduler, SchedulerConfig, SeqId};
use flora_model::sampling::Sampler;
use flora_model::{KvCache, Llama, Logits, SeqStep};
use flora_tokenizer::{StopFilter, Tokenizer, Utf8Stream};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often an idle engine wakes to refresh gauges and check for shutdown.
const IDLE_TICK: Duration = Duration::from_millis(500);

/// One running (or queued) sequence's state.
struct Active {
    req: GenRequest,
    cache: KvCache,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    sampler: Sampler,
    utf8: Utf8Stream,
    stop: StopFilter,
    admitted: bool,
    submitted: Instant,
    last_token: Option<Instant>,
}

impl Active {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

pub struct Runner {
    model: Llama,
    tok: Arc<Tokenizer>,
    sched: Scheduler,
    slots: Slots,
    active: HashMap<SeqId, Active>,
    stats: Arc<EngineStats>,
    /// Set by a shutdown message: the time after which remaining sequences are dropped.
    drain_deadline: Option<Instant>,
    /// Adapters with a per-adapter gauge series last time (to zero them when they empty).
    gauge_labels: BTreeSet<String>,
}

impl Runner {
    pub fn new(model: Llama, tok: Arc<Tokenizer>, cfg: SchedulerConfig, stats: Arc<EngineStats>) -> Self {
        let slots = Slots::new(cfg.max_loras);
        Self { model, tok, sched: Scheduler::new(cfg), slots, active: HashMap::new(), stats, drain_deadline: None, gauge_labels: BTreeSet::new() }
    }

    pub fn run(mut self, rx: Receiver<Msg>) {
        loop {
            if !self.intake(&rx) {
                // Every handle is gone: nobody can hear the rest.
                self.fail_all("the server stopped");
                return;
            }
            self.drop_cancelled();
            if let Some(deadline) = self.drain_deadline {
                if self.active.is_empty() {
                    return;
                }
                if Instant::now() >= deadline {
                    self.fail_all("the server is shutting down");
                    return;
                }
            }
            let plan = self.sched.schedule();
            if !plan.is_empty() {
                self.execute(plan);
            }
            self.publish_gauges();
        }
    }

    /// Takes pending messages; blocks (up to a tick) when there is nothing to run.
    /// False when the channel is closed.
    fn intake(&mut self, rx: &Receiver<Msg>) -> bool {
        let mut first = if self.sched.is_idle() {
            match rx.recv_timeout(IDLE_TICK) {
                Ok(msg) => Some(msg),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        } else {
            None
        };
        loop {
            let msg = match first.take() {
                Some(msg) => msg,
                None => match rx.try_recv() {
                    Ok(msg) => msg,
                    Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
                },
            };
            match msg {
                Msg::Add(id, req) => self.add(id, req),
                Msg::Shutdown { grace } => {
                    let deadline = Instant::now() + grace;
                    self.drain_deadline = Some(self.drain_deadline.map_or(deadline, |d| d.min(deadline)));
                }
            }
        }
    }

    fn add(&mut self, id: SeqId, mut req: GenRequest) {
        if self.drain_deadline.is_some() {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            let _ = req.events.send(Event::Failed("the server is shutting down".into()));
            return;
        }
        m::request_started(req.label(), req.prompt.len());
        // The sequence's tokens start as the prompt (moved, not copied).
        let tokens = std::mem::take(&mut req.prompt);
        let a = Active {
            cache: self.model.new_cache(),
            prompt_len: tokens.len(),
            tokens,
            sampler: Sampler::new(req.sampling.clone()),
            utf8: Utf8Stream::default(),
            stop: StopFilter::new(req.stop.clone()),
            admitted: false,
            submitted: Instant::now(),
            last_token: None,
            req,
        };
        self.sched.add(id, a.prompt_len, a.req.max_tokens, a.req.adapter.as_ref().map(|x| x.key));
        self.active.insert(id, a);
    }

    /// Removes sequences whose client has gone away.
    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self.active.iter().filter(|(_, a)| a.req.events.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            if let Some(a) = self.remove(id) {
                m::request_cancelled(a.req.label());
            }
        }
    }

    fn remove(&mut self, id: SeqId) -> Option<Active> {
        self.sched.remove(id);
        let a = self.active.remove(&id)?;
        if !a.admitted {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        Some(a)
    }

    fn fail_all(&mut self, why: &str) {
        let ids: Vec<SeqId> = self.active.keys().copied().collect();
        for id in ids {
            if let Some(a) = self.remove(id) {
                m::error(a.req.label(), "shutdown");
                let _ = a.req.events.send(Event::Failed(why.to_string()));
            }
        }
    }

    fn execute(&mut self, plan: crate::scheduler::StepPlan) {
        for &(slot, key) in &plan.slot_changes {
            let adapter = self.active.values().filter_map(|a| a.req.adapter.as_ref()).find(|x| x.key == key).cloned();
            match adapter {
                Some(x) => self.slots.assign(slot, &x),
                // The scheduler only assigns slots to admitted sequences, which hold their adapter.
                None => tracing::error!("slot {slot} assigned to adapter {key} that no sequence holds"),
            }
        }
        // Take the step's sequences out of the map so each lends its cache mutably.
        let mut batch: Vec<(PlanItem, Active)> = Vec::with_capacity(plan.items.len());
        for item in plan.items {
            let mut a = self.active.remove(&item.seq).expect("planned sequence is active");
            if !a.admitted {
                a.admitted = true;
                // Its KV budget, allocated once: no growth, copy or page faults per token.
                a.cache.reserve(a.prompt_len + a.req.max_tokens);
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            }
            debug_assert!(item.slot.is_none() || self.slots.key(item.slot.unwrap()) == a.req.adapter.as_ref().map(|x| x.key));
            batch.push((item, a));
        }
        let result = match self.slots.tables(&self.model) {
            Ok(tables) => {
                let mut steps: Vec<SeqStep> = batch
                    .iter_mut()
                    .map(|(item, a)| SeqStep {
                        tokens: &a.tokens[item.start..item.start + item.n_tokens],
                        cache: &mut a.cache,
                        slot: item.slot.map(|s| s as flora_adapters::SlotId),
                        logits: if item.sample { Logits::Last } else { Logits::None },
                    })
                    .collect();
                self.model.step_rows(&mut steps, tables)
            }
            Err(e) => Err(e),
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        m::step_done(batch.len(), batch.iter().map(|(i, _)| i.n_tokens).sum());
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // A model error fails the step's sequences, not the server.
                tracing::error!("step failed: {e}");
                for (item, a) in batch {
                    self.sched.remove(item.seq);
                    m::error(a.req.label(), "model");
                    let _ = a.req.events.send(Event::Failed(format!("model error: {e}")));
                }
                return;
            }
        };
        let mut rows = logits.chunks_exact(self.model.config().vocab);
        for (item, mut a) in batch {
            self.sched.advance(&item);
            if !item.sample {
                self.active.insert(item.seq, a);
                continue;
            }
            let row = rows.next().expect("one logits row per sampling sequence");
            let next = a.sampler.sample(row, &a.tokens);
            let now = Instant::now();
            match a.last_token {
                None => m::first_token(a.req.label(), now - a.submitted),
                Some(t) => m::next_token(a.req.label(), now - t),
            }
            a.last_token = Some(now);
            a.tokens.push(next);
            let mut hit_stop_string = false;
            let finished = if !a.req.ignore_eos && Some(next) == self.tok.eos_id() {
                Some(FinishReason::Stop)
            } else {
                let piece = self.tok.id_bytes(next, true).map(|b| a.utf8.push(b)).unwrap_or_default();
                let (emit, stopped) = a.stop.push(&piece);
                if !emit.is_empty() {
                    let _ = a.req.events.send(Event::Text(emit));
                }
                if stopped {
                    hit_stop_string = true;
                    Some(FinishReason::Stop)
                } else if a.generated() >= a.req.max_tokens {
                    Some(FinishReason::Length)
                } else {
                    None
                }
            };
            match finished {
                None => {
                    self.sched.append_token(item.seq);
                    self.active.insert(item.seq, a);
                }
                Some(reason) => {
                    self.sched.remove(item.seq);
                    if !hit_stop_string {
                        // Release text held back for a possible stop string or a split character.
                        let (rest, _) = a.stop.push(&a.utf8.finish());
                        let rest = rest + &a.stop.finish();
                        if !rest.is_empty() {
                            let _ = a.req.events.send(Event::Text(rest));
                        }
                    }
                    m::request_finished(a.req.label(), a.generated(), reason.as_str());
                    let _ = a.req.events.send(Event::Finished { reason, prompt_tokens: a.prompt_len, completion_tokens: a.generated() });
                }
            }
        }
    }

    /// Running and waiting sequences, in total and per adapter ("base" for the base model).
    fn publish_gauges(&mut self) {
        self.stats.running.store(self.sched.n_running(), Ordering::SeqCst);
        let mut per: BTreeMap<String, [usize; 2]> = BTreeMap::new();
        for a in self.active.values() {
            per.entry(a.req.label().to_string()).or_default()[usize::from(!a.admitted)] += 1;
        }
        // Series of adapters that had sequences and have none now go to zero.
        let gone: Vec<String> = self.gauge_labels.iter().filter(|l| !per.contains_key(*l)).cloned().collect();
        self.gauge_labels = per.keys().cloned().collect();
        m::engine_gauges(
            self.sched.n_running(),
            self.stats.waiting.load(Ordering::SeqCst),
            &per,
            &gone,
            self.sched.config().max_loras,
            self.slots.repacks,
        );
    }
}
