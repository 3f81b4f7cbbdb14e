//! The engine: one thread owns the model, the scheduler and every running sequence; the rest
//! of the server reaches it only through messages ([`EngineHandle`]) and hears back through
//! each request's event channel.
//!
//! A request is one sequence here (the HTTP layer submits `n` of them for `n` choices). It
//! carries its adapter as an `Arc` of the version it started with, so replacing or unloading the
//! adapter meanwhile does not touch it. Dropping the event receiver (the client went away)
//! cancels the sequence at the next step.

mod runner;
mod slots;

use crate::pool::LoadedAdapter;
use crate::scheduler::{SchedulerConfig, SeqId};
use flora_model::sampling::SamplingParams;
use flora_model::Llama;
use flora_tokenizer::Tokenizer;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc as tmpsc;

/// One sequence to generate.
pub struct GenRequest {
    /// Prompt token ids (BOS included when the model wants it); the engine moves them into
    /// the sequence's token list.
    pub prompt: Vec<u32>,
    /// None: the base model.
    pub adapter: Option<Arc<LoadedAdapter>>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Generate past the end-of-sequence token (benchmarks: fixed output lengths).
    pub ignore_eos: bool,
    /// Where text and the end are reported.
    pub events: tmpsc::UnboundedSender<Event>,
}

impl GenRequest {
    /// The metrics label: the adapter's name, or "base".
    pub fn label(&self) -> &str {
        self.adapter.as_ref().map_or("base", |a| a.info.name.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End of sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// New text (never empty).
    Text(String),
    Finished { reason: FinishReason, prompt_tokens: usize, completion_tokens: usize },
    /// The sequence was dropped (server shutting down, or a model error).
    Failed(String),
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Most sequences queued (not yet running) before new ones are refused.
    pub max_waiting: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { scheduler: SchedulerConfig::default(), max_waiting: 256 }
    }
}

/// Counters the engine publishes for admission control and gauges.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Submitted and not yet running.
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub steps: AtomicU64,
    /// The engine thread has ended.
    pub stopped: AtomicBool,
}

pub(crate) enum Msg {
    Add(SeqId, GenRequest),
    /// Finish in-flight sequences within `grace`, then drop the rest; refuse new ones.
    Shutdown { grace: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
}

/// The server's side of the engine (cheap to clone).
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Msg>,
    stats: Arc<EngineStats>,
    next_id: Arc<AtomicU64>,
    max_waiting: usize,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl EngineHandle {
    /// Starts the engine thread.
    pub fn start(model: Llama, tokenizer: Arc<Tokenizer>, cfg: EngineConfig) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let max_waiting = cfg.max_waiting;
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("flora-engine".into())
            .spawn(move || {
                // A panic would be a bug; still, it must not leave requests hanging or /health
                // green: the receivers see their senders dropped, and `stopped` is set.
                let run = std::panic::AssertUnwindSafe(|| runner::Runner::new(model, tokenizer, cfg.scheduler, st.clone()).run(rx));
                if std::panic::catch_unwind(run).is_err() {
                    tracing::error!("the engine thread panicked; the server can no longer generate");
                }
                st.stopped.store(true, Ordering::SeqCst);
            })
            .expect("spawn engine thread");
        Self { tx, stats, next_id: Arc::new(AtomicU64::new(1)), max_waiting, thread: Arc::new(std::sync::Mutex::new(Some(thread))) }
    }

    /// Queues one sequence. Refused when `max_waiting` sequences are already queued.
    pub fn submit(&self, req: GenRequest) -> Result<SeqId, SubmitError> {
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(waiting));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Msg::Add(id, req)).map_err(|_| {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })?;
        Ok(id)
    }

    /// Room left in the queue for `n` more sequences?
    pub fn has_room(&self, n: usize) -> bool {
        self.stats.waiting.load(Ordering::SeqCst) + n <= self.max_waiting
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Asks the engine to drain within `grace` and waits for its thread to end.
    pub fn shutdown(&self, grace: Duration) {
        self.begin_shutdown(grace);
        let thread = self.thread.lock().expect("engine thread lock").take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// Asks the engine to drain within `grace` without waiting.
    pub fn begin_shutdown(&self, grace: Duration) {
        let _ = self.tx.send(Msg::Shutdown { grace });
    }
}
