//! End-to-end: the real server on a loopback port, spoken to over HTTP. Covers every route,
//! streaming and not, adapters chosen by `model`, run-time load/unload, and every error kind.

mod common;

use common::{adapters_dir, reference_greedy, sse_data, TestServer};
use flora_serve::engine::EngineConfig;
use flora_serve::scheduler::SchedulerConfig;
use flora_serve::ServeOptions;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const BASE: &str = "base-model";

struct Shared {
    server: TestServer,
}

/// One server for the tests that do not change its configuration.
fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        let dir = adapters_dir("server_e2e-adapters");
        let opts = ServeOptions {
            model_name: BASE.into(),
            adapters_dir: Some(dir),
            max_body_bytes: 64 * 1024,
            ..ServeOptions::default()
        };
        Shared { server: TestServer::start(opts) }
    })
}

fn url(path: &str) -> String {
    shared().server.url(path)
}

async fn post(path: &str, body: Value) -> (StatusCode, Value) {
    let r = reqwest::Client::new().post(url(path)).json(&body).send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

/// The text the reference's greedy ids decode to, up to the first end-of-sequence token, and
/// the number of tokens the server reports for it (EOS included).
fn expected_text(ids: &[u32]) -> (String, usize, &'static str) {
    let tok = &shared().server.state.tokenizer;
    let eos = tok.eos_id().unwrap();
    match ids.iter().position(|&t| t == eos) {
        Some(at) => (tok.decode_with(&ids[..at], true).unwrap(), at + 1, "stop"),
        None => (tok.decode_with(ids, true).unwrap(), ids.len(), "length"),
    }
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, param: Option<&str>) {
    assert_eq!(status, want, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert_eq!(body["error"]["code"], want.as_u16(), "{body}");
    if let Some(p) = param {
        assert_eq!(body["error"]["param"], p, "{body}");
    }
}

/// Base model and three PEFT adapters, all at once (one batch): each greedy completion equals
/// what the reference (transformers / PEFT) generated for it.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_on_different_adapters_match_their_references() {
    let cases = ["base", "lora_r4_all", "lora_r2_qv", "ia3_kv_down"];
    let mut tasks = Vec::new();
    for case in cases {
        let (prompt, greedy) = reference_greedy(case);
        let model = if case == "base" { BASE } else { case };
        let body = json!({ "model": model, "prompt": prompt, "max_tokens": greedy.len(), "temperature": 0 });
        tasks.push(tokio::spawn(async move { (case, greedy, post("/v1/completions", body).await) }));
    }
    for t in tasks {
        let (case, greedy, (status, body)) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{case}: {body}");
        let (text, n, reason) = expected_text(&greedy);
        assert_eq!(body["choices"][0]["text"], text, "{case}");
        assert_eq!(body["choices"][0]["finish_reason"], reason, "{case}");
        assert_eq!(body["usage"]["completion_tokens"], n, "{case}");
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["model"], if case == "base" { BASE } else { case });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_completion_equals_the_plain_one_and_ends_with_done() {
    let body = json!({ "model": "lora_r4_all", "prompt": "The capital of France is", "max_tokens": 10, "temperature": 0 });
    let (_, plain) = post("/v1/completions", body.clone()).await;
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({ "include_usage": true });
    let r = reqwest::Client::new().post(url("/v1/completions")).json(&sbody).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, plain["choices"][0]["text"].as_str().unwrap());
    let finish: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finish, vec![&json!("length")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage, &plain["usage"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_completions_plain_and_streamed() {
    let msgs = json!([{ "role": "system", "content": "You are brief." }, { "role": "user", "content": [{ "type": "text", "text": "Say hi" }] }]);
    let body = json!({ "model": "ia3_kv_down", "messages": msgs, "max_tokens": 6, "temperature": 0 });
    let (status, plain) = post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{plain}");
    assert_eq!(plain["object"], "chat.completion");
    assert_eq!(plain["choices"][0]["message"]["role"], "assistant");
    let content = plain["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!content.is_empty());
    let mut sbody = body;
    sbody["stream"] = json!(true);
    let r = reqwest::Client::new().post(url("/v1/chat/completions")).json(&sbody).send().await.unwrap();
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, content);
}

/// A seed fixes the samples: a request alone, and two copies of it running side by side (their
/// six sequences share steps), draw the same tokens. Its own server: the shared one's other
/// tests could fill a step past the 64 rows up to which f32 products keep a row's bits
/// whatever its companions (docs/model.md); without AVX-512 no f32 step keeps them, and only
/// the sequential repeat is compared.
#[tokio::test(flavor = "multi_thread")]
async fn n_choices_and_seeded_sampling_are_reproducible() {
    let server = TestServer::start(ServeOptions { model_name: BASE.into(), ..ServeOptions::default() });
    let body = json!({ "model": BASE, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 42, "n": 3, "ignore_eos": true });
    let send = |body: Value| {
        let url = server.url("/v1/completions");
        async move {
            let r = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let texts = |v: &Value| v["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let (s1, a) = send(body.clone()).await;
    let (s2, b) = send(body.clone()).await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    assert_eq!(texts(&a), texts(&b), "same seed, same samples");
    if flora_adapters::cpu::has_avx512() {
        let ((s3, c), (s4, d)) = tokio::join!(send(body.clone()), send(body));
        assert_eq!((s3, s4), (StatusCode::OK, StatusCode::OK));
        assert_eq!(texts(&a), texts(&c), "same seed, same samples, beside another request");
        assert_eq!(texts(&a), texts(&d), "same seed, same samples, beside another request");
    }
    assert_eq!(a["usage"]["prompt_tokens"], 4, "the prompt counts once for n choices");
    assert_eq!(a["usage"]["completion_tokens"], 24);
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_strings_cut_the_output() {
    let (prompt, _) = reference_greedy("lora_r4_all"); // continues " Paris.\n\nThe United States..."
    let body = json!({ "model": "lora_r4_all", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stop": ["United"] });
    let (status, v) = post("/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["choices"][0]["text"], " Paris.\n\nThe ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn models_lists_the_base_and_every_adapter_with_kind_and_rank() {
    let v: Value = reqwest::get(url("/v1/models")).await.unwrap().json().await.unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data[0]["id"], BASE);
    let find = |id: &str| data.iter().find(|m| m["id"] == id).unwrap_or_else(|| panic!("{id} missing from {v}"));
    assert_eq!(find("lora_r4_all")["adapter"], json!({ "kind": "lora", "rank": 4 }));
    assert_eq!(find("lora_r2_qv")["adapter"], json!({ "kind": "lora", "rank": 2 }));
    assert_eq!(find("ia3_kv_down")["adapter"], json!({ "kind": "ia3", "rank": 1 }));
    assert_eq!(find("lora_r4_all")["parent"], BASE);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_openai_errors_naming_the_field() {
    let c = reqwest::Client::new();
    // Malformed JSON.
    let r = c.post(url("/v1/completions")).body("{\"model\": ").send().await.unwrap();
    let s = r.status();
    assert_error(s, &r.json().await.unwrap(), StatusCode::BAD_REQUEST, None);
    // Wrong types and ranges name the field.
    for (body, param) in [
        (json!({ "prompt": "x", "max_tokens": "many" }), "max_tokens"),
        (json!({ "prompt": 5 }), "prompt"),
        (json!({ "prompt": "x", "temperature": -1 }), "temperature"),
        (json!({ "prompt": "x", "top_p": 0 }), "top_p"),
        (json!({ "prompt": "x", "n": 0 }), "n"),
        (json!({ "prompt": "x", "max_tokens": 0 }), "max_tokens"),
        (json!({ "prompt": "x", "logprobs": 2 }), "logprobs"),
        (json!({ "prompt": [999999] }), "prompt"),
        (json!({ "prompt": "x", "max_tokens": 9000 }), "max_tokens"),
        // Near usize::MAX: the length checks must not wrap around.
        (json!({ "prompt": "x", "max_tokens": u64::MAX }), "max_tokens"),
        (json!({ "model": "lora_r4_all" }), "prompt"),
    ] {
        let (s, v) = post("/v1/completions", body.clone()).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, Some(param));
    }
    for (body, param) in [
        (json!({ "messages": [] }), "messages"),
        (json!({ "messages": [{ "role": "wizard", "content": "x" }] }), "messages[0].role"),
        (json!({ "messages": [{ "role": "user", "content": "x" }], "max_completion_tokens": 100000 }), "max_tokens"),
    ] {
        let (s, v) = post("/v1/chat/completions", body.clone()).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, Some(param));
    }
    // A prompt longer than the context.
    let long: Vec<u32> = vec![504; 8192];
    let (s, v) = post("/v1/completions", json!({ "prompt": long, "max_tokens": 1 })).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, Some("prompt"));
    // A body over the limit.
    let huge = "a ".repeat(100_000);
    let r = c.post(url("/v1/completions")).json(&json!({ "prompt": huge })).send().await.unwrap();
    let s = r.status();
    assert_error(s, &r.json().await.unwrap(), StatusCode::PAYLOAD_TOO_LARGE, None);
    // Unknown route (a new connection: the server may close the one that sent the oversized body).
    let r = reqwest::Client::new().get(url("/v1/nothing")).send().await.unwrap();
    let s = r.status();
    assert_error(s, &r.json().await.unwrap(), StatusCode::NOT_FOUND, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_adapters_are_404_and_never_the_base_model() {
    for model in ["no-such-adapter", "lora_r4_all_typo"] {
        let (s, v) = post("/v1/completions", json!({ "model": model, "prompt": "x", "max_tokens": 1 })).await;
        assert_error(s, &v, StatusCode::NOT_FOUND, None);
        let (s, v) = post("/v1/chat/completions", json!({ "model": model, "messages": [{ "role": "user", "content": "x" }] })).await;
        assert_error(s, &v, StatusCode::NOT_FOUND, None);
    }
    // Names that could reach outside the adapters directory are refused outright.
    for model in ["../lora_r4_all", "lora_r4_all/../x", "/etc"] {
        let (s, v) = post("/v1/completions", json!({ "model": model, "prompt": "x", "max_tokens": 1 })).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, None);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_adapter_files_are_refused_and_the_server_stays_up() {
    for name in ["truncated", "nan_values", "wrong_shape", "bad_config"] {
        let (s, v) = post("/v1/completions", json!({ "model": name, "prompt": "x", "max_tokens": 1 })).await;
        assert_error(s, &v, StatusCode::UNPROCESSABLE_ENTITY, None);
        assert!(v["error"]["message"].as_str().unwrap().contains(name), "{v}");
    }
    let msg = |v: &Value| v["error"]["message"].as_str().unwrap().to_lowercase();
    let (_, v) = post("/v1/completions", json!({ "model": "nan_values", "prompt": "x" })).await;
    assert!(msg(&v).contains("nan") || msg(&v).contains("finite"), "{v}");
    let (_, v) = post("/v1/completions", json!({ "model": "wrong_shape", "prompt": "x" })).await;
    assert!(msg(&v).contains("shape") || msg(&v).contains("576"), "{v}");
    let r = reqwest::get(url("/health")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (s, _) = post("/v1/completions", json!({ "model": "lora_r2_qv", "prompt": "x", "max_tokens": 2 })).await;
    assert_eq!(s, StatusCode::OK);
}

/// Load at run time: usable at once. Replace while a request runs: the request finishes on the
/// version it started with. Unload while a request runs: it finishes; new ones get 404.
#[tokio::test(flavor = "multi_thread")]
async fn runtime_load_replace_and_unload_do_not_disturb_running_requests() {
    let src = common::testdata().join("peft");
    let (prompt, r4_greedy) = reference_greedy("lora_r4_all");
    let (_, r2_greedy) = reference_greedy("lora_r2_qv");
    // Bad load requests.
    let (s, v) = post("/v1/load_lora_adapter", json!({ "lora_name": "x/../y", "lora_path": src.join("lora_r4_all") })).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, None);
    let (s, v) = post("/v1/load_lora_adapter", json!({ "lora_name": "nowhere", "lora_path": "/no/such/dir" })).await;
    assert_error(s, &v, StatusCode::UNPROCESSABLE_ENTITY, None);
    let (s, v) = post("/v1/load_lora_adapter", json!({ "lora_name": "x" })).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, Some("lora_path"));

    let (s, v) = post("/v1/load_lora_adapter", json!({ "lora_name": "hot", "lora_path": src.join("lora_r4_all") })).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rank"], 4);
    let body = json!({ "model": "hot", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": true });
    // Start a stream on version 1 and read its first chunk.
    let mut r = reqwest::Client::new().post(url("/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut streamed = String::new();
    let first = r.chunk().await.unwrap().unwrap();
    streamed.push_str(std::str::from_utf8(&first).unwrap());
    // Replace it with another adapter under the same name.
    let (s, _) = post("/v1/load_lora_adapter", json!({ "lora_name": "hot", "lora_path": src.join("lora_r2_qv") })).await;
    assert_eq!(s, StatusCode::OK);
    while let Some(c) = r.chunk().await.unwrap() {
        streamed.push_str(std::str::from_utf8(&c).unwrap());
    }
    let text: String = sse_data(&streamed)
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok()?["choices"][0]["text"].as_str().map(String::from))
        .collect();
    assert_eq!(text, expected_text(&r4_greedy).0, "the running request kept version 1");
    // New requests get version 2.
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    let (s, v) = post("/v1/completions", plain.clone()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["choices"][0]["text"], expected_text(&r2_greedy).0, "new requests use version 2");

    // Unload while a request runs (ignore_eos: it runs to max_tokens).
    let mut long = body.clone();
    long["ignore_eos"] = json!(true);
    let mut r = reqwest::Client::new().post(url("/v1/completions")).json(&long).send().await.unwrap();
    let _ = r.chunk().await.unwrap();
    let (s, _) = post("/v1/unload_lora_adapter", json!({ "lora_name": "hot" })).await;
    assert_eq!(s, StatusCode::OK);
    let mut rest = String::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.push_str(std::str::from_utf8(&c).unwrap());
    }
    assert!(rest.contains("[DONE]") && rest.contains("\"finish_reason\":\"length\""), "{rest}");
    let (s, v) = post("/v1/completions", plain).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, None);
    let (s, v) = post("/v1/unload_lora_adapter", json!({ "lora_name": "hot" })).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, None);
    // A directory adapter can be unloaded too, and is gone from /v1/models.
    let (s, _) = post("/v1/unload_lora_adapter", json!({ "lora_name": "lora_unload_me" })).await;
    assert_eq!(s, StatusCode::OK);
    let models: Value = reqwest::get(url("/v1/models")).await.unwrap().json().await.unwrap();
    assert!(!models.to_string().contains("lora_unload_me"));
}

/// A client that goes away mid-stream cancels its sequence (it stops using the engine).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_mid_stream_cancels_its_sequence() {
    let state = &shared().server.state;
    let body = json!({ "model": "lora_r2_qv", "prompt": "Tell me a long story", "max_tokens": 2000, "stream": true, "temperature": 0, "ignore_eos": true });
    let mut r = reqwest::Client::new().post(url("/v1/completions")).json(&body).send().await.unwrap();
    let _ = r.chunk().await.unwrap();
    drop(r);
    let t = Instant::now();
    loop {
        let metrics = reqwest::get(url("/metrics")).await.unwrap().text().await.unwrap();
        if metrics.lines().any(|l| l.starts_with("flora_requests_cancelled_total{adapter=\"lora_r2_qv\"}")) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "not cancelled; running = {:?}", state.engine.stats().running);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_metrics() {
    let r = reqwest::get(url("/health")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (s, _) = post("/v1/completions", json!({ "model": "ia3_kv_down", "prompt": "Hello", "max_tokens": 3 })).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = post("/v1/completions", json!({ "model": "missing-one", "prompt": "Hello" })).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let r = reqwest::get(url("/metrics")).await.unwrap();
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let m = r.text().await.unwrap();
    for needle in [
        "flora_requests_total{adapter=\"ia3_kv_down\"}",
        "flora_generation_tokens_total{adapter=\"ia3_kv_down\"}",
        "flora_prompt_tokens_total{adapter=\"ia3_kv_down\"}",
        "flora_time_to_first_token_seconds_bucket{adapter=\"ia3_kv_down\"",
        "flora_time_per_output_token_seconds_bucket{adapter=\"ia3_kv_down\"",
        "flora_errors_total{adapter=\"missing-one\",kind=\"not_found\"}",
        "flora_queue_depth",
        "flora_running_sequences",
        "flora_adapter_sequences{adapter=\"ia3_kv_down\",state=\"running\"}",
        "flora_adapter_pool_hits_total",
        "flora_adapter_pool_bytes",
        "vllm:lora_requests_info{",
        "max_lora=\"32\"",
    ] {
        assert!(m.contains(needle), "{needle} missing from:\n{m}");
    }
}

/// A server with keys: /v1 routes need the API key, admin routes the admin key; health and
/// metrics stay open. Then, shutting down: 503.
#[tokio::test(flavor = "multi_thread")]
async fn api_keys_protect_the_api_and_the_admin_routes() {
    let server = TestServer::start(ServeOptions {
        model_name: BASE.into(),
        api_key: Some("user-key".into()),
        admin_key: Some("admin-key".into()),
        ..ServeOptions::default()
    });
    let c = reqwest::Client::new();
    let body = json!({ "prompt": "Hi", "max_tokens": 1 });
    let r = c.post(server.url("/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c.post(server.url("/v1/completions")).bearer_auth("wrong").json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c.post(server.url("/v1/completions")).bearer_auth("user-key").json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c.get(server.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let load = json!({ "lora_name": "a", "lora_path": common::testdata().join("peft/lora_r2_qv") });
    let r = c.post(server.url("/v1/load_lora_adapter")).bearer_auth("user-key").json(&load).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c.post(server.url("/v1/load_lora_adapter")).bearer_auth("admin-key").json(&load).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(c.get(server.url("/health")).send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(c.get(server.url("/metrics")).send().await.unwrap().status(), StatusCode::OK);
    // While shutting down (flag set, listener still open): 503 with Retry-After, health too.
    server.state.shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = c.post(server.url("/v1/completions")).bearer_auth("user-key").json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(c.get(server.url("/health")).send().await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    server.join();
}

/// A full queue answers 429 with Retry-After; everything admitted still completes. A request over
/// the KV-cache budget is a 400.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_429_with_retry_after() {
    let server = TestServer::start(ServeOptions {
        model_name: BASE.into(),
        engine: EngineConfig { scheduler: SchedulerConfig { max_running: 1, max_kv_tokens: 256, ..SchedulerConfig::default() }, max_waiting: 2 },
        ..ServeOptions::default()
    });
    // A request that could never fit the KV budget is refused up front.
    let r = reqwest::Client::new().post(server.url("/v1/completions")).json(&json!({ "prompt": "Hi", "max_tokens": 300 })).send().await.unwrap();
    let s = r.status();
    assert_error(s, &r.json().await.unwrap(), StatusCode::BAD_REQUEST, Some("max_tokens"));
    let body = json!({ "prompt": "Count to ten:", "max_tokens": 24 });
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (u, b) = (server.url("/v1/completions"), body.clone());
        tasks.push(tokio::spawn(async move { reqwest::Client::new().post(u).json(&b).send().await.unwrap() }));
    }
    let (mut ok, mut full) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(r.headers().contains_key("retry-after"));
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["type"], "rate_limit_error");
                full += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(full >= 1 && ok >= 2, "ok {ok}, 429 {full}");
    server.join();
}

/// Shutdown: new requests are refused, the running one finishes (within the grace period), and
/// the server ends.
#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_finishes_running_requests_and_refuses_new_ones() {
    let mut server = TestServer::start(ServeOptions { model_name: BASE.into(), shutdown_grace: Duration::from_secs(60), ..ServeOptions::default() });
    let body = json!({ "prompt": "Write a poem", "max_tokens": 12, "stream": true, "temperature": 0, "ignore_eos": true });
    let mut r = reqwest::Client::new().post(server.url("/v1/completions")).json(&body).send().await.unwrap();
    let mut text = String::from_utf8(r.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    server.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New connections are refused, or answered 503 while the listener closes.
    match reqwest::Client::new().post(server.url("/v1/completions")).json(&json!({ "prompt": "x" })).send().await {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE),
        Err(e) => assert!(e.is_connect() || e.is_request(), "{e}"),
    }
    while let Some(c) = r.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&c).unwrap());
    }
    assert!(text.contains("\"finish_reason\":\"length\"") && text.ends_with("data: [DONE]\n\n"), "{text}");
    server.join();
}

/// With a short grace period, a request that cannot finish in time is ended with an error event
/// rather than left hanging.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_cancels_what_does_not_finish_within_the_grace_period() {
    let mut server = TestServer::start(ServeOptions { model_name: BASE.into(), shutdown_grace: Duration::from_millis(300), ..ServeOptions::default() });
    // ignore_eos: the request must still be running when the grace period ends.
    let body = json!({ "prompt": "Write a long poem", "max_tokens": 4000, "stream": true, "ignore_eos": true });
    let mut r = reqwest::Client::new().post(server.url("/v1/completions")).json(&body).send().await.unwrap();
    let mut text = String::from_utf8(r.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    server.begin_shutdown();
    let t = Instant::now();
    while let Ok(Some(c)) = r.chunk().await {
        text.push_str(std::str::from_utf8(&c).unwrap());
    }
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(text.contains("shutting down"), "{text}");
    server.join();
}
