//! The engine without HTTP: sequences submitted straight to the engine thread over the real
//! model. Mixed adapters and chunked prefill give the reference outputs; cancellation and
//! shutdown end sequences cleanly.

mod common;

use common::{reference_greedy, testdata};
use flora_model::sampling::SamplingParams;
use flora_model::Llama;
use flora_serve::engine::{EngineConfig, EngineHandle, Event, FinishReason, GenRequest};
use flora_serve::pool::{AdapterPool, LoadedAdapter};
use flora_serve::registry::Registry;
use flora_serve::scheduler::SchedulerConfig;
use flora_serve::store::AdapterStore;
use flora_tokenizer::Tokenizer;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

fn engine(sched: SchedulerConfig) -> (EngineHandle, Arc<Tokenizer>, AdapterStore) {
    let path = flora_model::default_model::resolve_model(None).unwrap();
    let ck = flora_model::weights::load(&path).unwrap();
    let tok = Arc::new(Tokenizer::from_gguf_content(ck.gguf.as_ref().unwrap()).unwrap());
    let model = Llama::from_checkpoint(ck).unwrap();
    let store = AdapterStore::new(Registry::new(Some(testdata().join("peft"))).unwrap(), AdapterPool::new(1 << 30), model.config().clone(), model.adapter_tables());
    (EngineHandle::start(model, tok.clone(), EngineConfig { scheduler: sched, max_waiting: 64 }), tok, store)
}

fn request(prompt: Vec<u32>, adapter: Option<Arc<LoadedAdapter>>, max_tokens: usize) -> (GenRequest, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let req = GenRequest { prompt, adapter, sampling: SamplingParams::default(), max_tokens, stop: vec![], ignore_eos: false, events: tx };
    (req, rx)
}

/// Text until the end, and how it ended.
fn drain(rx: &mut mpsc::UnboundedReceiver<Event>) -> (String, Event) {
    let mut text = String::new();
    loop {
        match rx.blocking_recv().expect("engine ended the stream without a final event") {
            Event::Text(t) => text.push_str(&t),
            end => return (text, end),
        }
    }
}

fn expected(tok: &Tokenizer, ids: &[u32]) -> String {
    let eos = tok.eos_id().unwrap();
    let end = ids.iter().position(|&t| t == eos).unwrap_or(ids.len());
    tok.decode_with(&ids[..end], true).unwrap()
}

/// Base and three adapters in the same steps, prompts chunked by a 7-token budget (so chunks of
/// one prompt interleave with other sequences' decodes) and only 2 adapter slots for 3 adapters
/// (one waits for a slot): every output equals its reference's greedy continuation.
#[test]
fn mixed_adapters_and_chunked_prefill_give_the_reference_outputs() {
    let (engine, tok, store) = engine(SchedulerConfig { max_batch_tokens: 7, max_loras: 2, ..SchedulerConfig::default() });
    let mut streams = Vec::new();
    for case in ["base", "lora_r4_all", "lora_r2_qv", "ia3_kv_down"] {
        let (prompt, greedy) = reference_greedy(case);
        let adapter = (case != "base").then(|| store.acquire(case).unwrap());
        let (req, rx) = request(prompt, adapter, greedy.len());
        engine.submit(req).unwrap();
        streams.push((case, greedy, rx));
    }
    for (case, greedy, mut rx) in streams {
        let (text, end) = drain(&mut rx);
        assert_eq!(text, expected(&tok, &greedy), "{case}");
        match end {
            Event::Finished { prompt_tokens, completion_tokens, reason } => {
                assert_eq!(prompt_tokens, reference_greedy(case).0.len());
                assert!(completion_tokens <= greedy.len());
                assert_eq!(reason == FinishReason::Length, completion_tokens == greedy.len(), "{case}");
            }
            other => panic!("{case}: {other:?}"),
        }
    }
    assert!(engine.stats().steps.load(Ordering::SeqCst) > 16);
    engine.shutdown(Duration::from_secs(1));
}

/// Dropping the receiver cancels the sequence: the engine goes idle long before max_tokens.
#[test]
fn a_dropped_receiver_cancels_the_sequence() {
    let (engine, tok, _) = engine(SchedulerConfig::default());
    let prompt = tok.encode("Once upon a time").unwrap();
    let (req, mut rx) = request(prompt, None, 4000);
    engine.submit(req).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(Event::Text(_))));
    drop(rx);
    let t = Instant::now();
    while engine.stats().running.load(Ordering::SeqCst) != 0 || engine.stats().waiting.load(Ordering::SeqCst) != 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "sequence not cancelled");
        std::thread::sleep(Duration::from_millis(20));
    }
    engine.shutdown(Duration::from_secs(1));
}

/// Shutdown: a sequence that cannot finish within the grace period gets a Failed event; new
/// submissions after that are refused.
#[test]
fn shutdown_fails_what_cannot_finish_and_refuses_new_work() {
    let (engine, tok, _) = engine(SchedulerConfig::default());
    let prompt = tok.encode("Write a long story").unwrap();
    let (mut req, mut rx) = request(prompt.clone(), None, 4000);
    req.ignore_eos = true; // still running when the grace period ends
    engine.submit(req).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(Event::Text(_))));
    engine.shutdown(Duration::from_millis(200));
    let (_, end) = drain(&mut rx);
    assert!(matches!(end, Event::Failed(ref m) if m.contains("shutting down")), "{end:?}");
    assert!(engine.stats().stopped.load(Ordering::SeqCst));
    let (req, _rx) = request(prompt, None, 4);
    assert!(engine.submit(req).is_err());
}

/// Requests for one absent adapter arriving together: one of them loads it, the others wait
/// for that load and share the pooled copy (one load, every request a miss).
#[test]
fn concurrent_requests_for_an_absent_adapter_load_it_once() {
    let path = flora_model::default_model::resolve_model(None).unwrap();
    let model = Llama::from_checkpoint(flora_model::weights::load(&path).unwrap()).unwrap();
    let store = AdapterStore::new(Registry::new(Some(testdata().join("peft"))).unwrap(), AdapterPool::new(1 << 30), model.config().clone(), model.adapter_tables());
    let barrier = std::sync::Barrier::new(6);
    let got: Vec<Arc<LoadedAdapter>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    store.acquire("lora_r4_all").unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(got.iter().all(|a| Arc::ptr_eq(a, &got[0])), "every request shares the one pooled copy");
    let stats = store.pool().stats();
    assert_eq!(stats.loads, 1, "{stats:?}");
    assert_eq!(stats.hits + stats.misses, 6, "{stats:?}");
    assert!(stats.misses >= 1, "{stats:?}");
    // Pooled now: a later request is a hit and loads nothing.
    store.acquire("lora_r4_all").unwrap();
    let after = store.pool().stats();
    assert_eq!((after.loads, after.hits), (1, stats.hits + 1), "{after:?}");
}

