//! Prometheus metrics. Recorded with the `metrics` facade wherever things happen; rendered by
//! `GET /metrics`. Per-request series are labelled by adapter ("base" for the base model).
//!
//! `vllm:lora_requests_info` follows vLLM's convention so adapter-aware routers can read it: a
//! gauge whose labels list the running and waiting adapters and the slot limit, valued at the
//! time of the last update.

use crate::pool::PoolStats;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let latency = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
            let tokens = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .expect("latency buckets")
                .set_buckets_for_metric(Matcher::Suffix("_tokens".into()), &tokens)
                .expect("token buckets")
                .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(30)))
                .install_recorder()
                .expect("install the Prometheus recorder (once per process)")
        })
        .clone()
}

pub fn request_started(adapter: &str, prompt_tokens: usize) {
    let labels = [("adapter", adapter.to_string())];
    counter!("flora_requests_total", &labels).increment(1);
    counter!("flora_prompt_tokens_total", &labels).increment(prompt_tokens as u64);
}

pub fn request_finished(adapter: &str, generated: usize, finish_reason: &'static str) {
    counter!("flora_requests_finished_total", "adapter" => adapter.to_string(), "finish_reason" => finish_reason).increment(1);
    histogram!("flora_request_generation_tokens", "adapter" => adapter.to_string()).record(generated as f64);
}

pub fn request_cancelled(adapter: &str) {
    counter!("flora_requests_cancelled_total", "adapter" => adapter.to_string()).increment(1);
}

/// An error answered to a client (or a sequence dropped), by kind.
pub fn error(adapter: &str, kind: &'static str) {
    counter!("flora_errors_total", "adapter" => adapter.to_string(), "kind" => kind).increment(1);
}

pub fn first_token(adapter: &str, since_arrival: Duration) {
    let labels = [("adapter", adapter.to_string())];
    histogram!("flora_time_to_first_token_seconds", &labels).record(since_arrival.as_secs_f64());
    counter!("flora_generation_tokens_total", &labels).increment(1);
}

pub fn next_token(adapter: &str, since_previous: Duration) {
    let labels = [("adapter", adapter.to_string())];
    histogram!("flora_time_per_output_token_seconds", &labels).record(since_previous.as_secs_f64());
    counter!("flora_generation_tokens_total", &labels).increment(1);
}

/// Time to rebuild the adapter tables after a slot change (the engine waits for it).
pub fn repacked(took: Duration) {
    histogram!("flora_adapter_repack_seconds").record(took.as_secs_f64());
}

pub fn step_done(sequences: usize, tokens: usize) {
    counter!("flora_steps_total").increment(1);
    histogram!("flora_step_tokens").record(tokens as f64);
    histogram!("flora_step_sequences").record(sequences as f64);
}

/// Engine gauges: totals, per-adapter `[running, waiting]` sequences (`gone`: adapters whose
/// series drop to zero), and vLLM's adapter-info gauge.
pub fn engine_gauges(running: usize, waiting: usize, per_adapter: &BTreeMap<String, [usize; 2]>, gone: &[String], max_loras: usize, repacks: u64) {
    gauge!("flora_running_sequences").set(running as f64);
    gauge!("flora_queue_depth").set(waiting as f64);
    counter!("flora_adapter_repacks_total").absolute(repacks);
    for (adapter, [r, w]) in per_adapter {
        gauge!("flora_adapter_sequences", "adapter" => adapter.clone(), "state" => "running").set(*r as f64);
        gauge!("flora_adapter_sequences", "adapter" => adapter.clone(), "state" => "waiting").set(*w as f64);
    }
    for adapter in gone {
        for state in ["running", "waiting"] {
            gauge!("flora_adapter_sequences", "adapter" => adapter.clone(), "state" => state).set(0.0);
        }
    }
    let names = |i: usize| -> String {
        let v: Vec<&str> = per_adapter.iter().filter(|(a, c)| c[i] > 0 && a.as_str() != "base").map(|(a, _)| a.as_str()).collect();
        v.join(",")
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    gauge!(
        "vllm:lora_requests_info",
        "running_lora_adapters" => names(0),
        "waiting_lora_adapters" => names(1),
        "max_lora" => max_loras.to_string()
    )
    .set(now);
}

pub fn pool(stats: &PoolStats, max_bytes: usize) {
    counter!("flora_adapter_pool_hits_total").absolute(stats.hits);
    counter!("flora_adapter_pool_misses_total").absolute(stats.misses);
    counter!("flora_adapter_pool_loads_total").absolute(stats.loads);
    counter!("flora_adapter_pool_evictions_total").absolute(stats.evictions);
    gauge!("flora_adapter_pool_bytes").set(stats.bytes as f64);
    gauge!("flora_adapter_pool_max_bytes").set(max_bytes as f64);
    gauge!("flora_adapter_pool_adapters").set(stats.adapters as f64);
}
