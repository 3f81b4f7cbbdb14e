//! The benchmark's client: streams completions from the server and times them.

use super::workload::poisson_gap;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request to send.
#[derive(Clone, Debug)]
pub struct Planned {
    pub model: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f32,
    /// Close the connection after this many streamed chunks (a client that goes away).
    pub disconnect_after: Option<usize>,
}

/// What happened to one request.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub model: String,
    pub ok: bool,
    pub disconnected: bool,
    /// HTTP status, or 0 when no response came.
    pub status: u16,
    pub error: Option<String>,
    /// Seconds from sending to the first text.
    pub ttft: Option<f64>,
    /// Seconds per output token after the first.
    pub tpot: Option<f64>,
    pub e2e: f64,
    pub tokens: usize,
}

/// How requests arrive.
#[derive(Clone, Copy, Debug)]
pub enum Arrivals {
    /// Closed loop: this many requests in flight at all times.
    Concurrency(usize),
    /// Open loop: Poisson arrivals at this many requests per second.
    Rate(f64),
}

/// Sends one streaming completion and times it. Never panics: every failure is an outcome.
pub async fn send(client: &reqwest::Client, base_url: &str, p: &Planned, timeout: Duration) -> Outcome {
    let t0 = Instant::now();
    let mut out = Outcome {
        model: p.model.clone(),
        ok: false,
        disconnected: false,
        status: 0,
        error: None,
        ttft: None,
        tpot: None,
        e2e: 0.0,
        tokens: 0,
    };
    let body = json!({
        "model": p.model, "prompt": p.prompt, "max_tokens": p.max_tokens, "temperature": p.temperature,
        "stream": true, "stream_options": { "include_usage": true }, "ignore_eos": true,
    });
    let result = tokio::time::timeout(timeout, async {
        let mut r = client.post(format!("{base_url}/v1/completions")).json(&body).send().await.map_err(|e| (0, format!("send: {e}")))?;
        let status = r.status().as_u16();
        if status != 200 {
            let text = r.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&text).ok().and_then(|v| v["error"]["message"].as_str().map(String::from)).unwrap_or(text);
            return Err((status, msg));
        }
        let (mut buf, mut chunks, mut first, mut done) = (String::new(), 0usize, None::<Instant>, false);
        while let Some(bytes) = r.chunk().await.map_err(|e| (status, format!("stream: {e}")))? {
            buf.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let Some(data) = event.trim().strip_prefix("data: ") else { continue };
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(data).map_err(|e| (status, format!("bad chunk {data:?}: {e}")))?;
                if let Some(msg) = v["error"]["message"].as_str() {
                    return Err((status, msg.to_string()));
                }
                if v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) && first.is_none() {
                    first = Some(Instant::now());
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    out.tokens = n as usize;
                }
                chunks += 1;
            }
            if p.disconnect_after.is_some_and(|k| chunks >= k) {
                out.disconnected = true;
                return Ok((status, first));
            }
        }
        if !done {
            return Err((status, "stream ended without [DONE]".into()));
        }
        Ok((status, first))
    })
    .await;
    out.e2e = t0.elapsed().as_secs_f64();
    match result {
        Err(_) => out.error = Some(format!("no answer within {}s (hung)", timeout.as_secs())),
        Ok(Err((status, msg))) => {
            out.status = status;
            out.error = Some(msg);
        }
        Ok(Ok((status, first))) => {
            out.status = status;
            out.ttft = first.map(|f| (f - t0).as_secs_f64());
            if !out.disconnected {
                out.ok = out.tokens == p.max_tokens;
                if !out.ok {
                    out.error = Some(format!("{} tokens of {}", out.tokens, p.max_tokens));
                }
                if let (Some(f), true) = (first, out.tokens > 1) {
                    out.tpot = Some((t0.elapsed() - (f - t0)).as_secs_f64() / (out.tokens - 1) as f64);
                }
            }
        }
    }
    out
}

/// Where requests come from: a fixed list, or a generator until a deadline.
pub enum Source {
    List(VecDeque<Planned>),
    Until { deadline: Instant, make: Box<dyn FnMut() -> Planned + Send> },
}

impl Source {
    fn next(&mut self) -> Option<Planned> {
        match self {
            Source::List(q) => q.pop_front(),
            Source::Until { deadline, make } => (Instant::now() < *deadline).then(make),
        }
    }
}

/// Runs the load; returns every outcome and the wall time.
pub async fn run(base_url: &str, source: Source, arrivals: Arrivals, timeout: Duration, seed: u64) -> (Vec<Outcome>, f64) {
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build().expect("http client");
    let source = Arc::new(Mutex::new(source));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    match arrivals {
        Arrivals::Concurrency(c) => {
            for _ in 0..c {
                let (client, source, outcomes, url) = (client.clone(), source.clone(), outcomes.clone(), base_url.to_string());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let next = source.lock().unwrap().next();
                        let Some(p) = next else { break };
                        let o = send(&client, &url, &p, timeout).await;
                        outcomes.lock().unwrap().push(o);
                    }
                }));
            }
        }
        Arrivals::Rate(rate) => {
            let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
            loop {
                let next = source.lock().unwrap().next();
                let Some(p) = next else { break };
                let (client, outcomes, url) = (client.clone(), outcomes.clone(), base_url.to_string());
                tasks.push(tokio::spawn(async move {
                    let o = send(&client, &url, &p, timeout).await;
                    outcomes.lock().unwrap().push(o);
                }));
                tokio::time::sleep(Duration::from_secs_f64(poisson_gap(&mut rng, rate))).await;
            }
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    (outcomes, wall)
}
