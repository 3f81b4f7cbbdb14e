//! `flora serve`: the OpenAI-compatible server over the base model and an adapters directory.

use anyhow::{Context, Result};
use flora_serve::engine::EngineConfig;
use flora_serve::scheduler::SchedulerConfig;
use flora_serve::{RunningServer, ServeOptions};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
#[command(after_help = "Requests name an adapter in `model` (a subdirectory of --adapters, or one loaded with \
POST /v1/load_lora_adapter); the base model's name is listed first by GET /v1/models.\n\n\
Example:\n  flora serve --adapters ./adapters --port 8000\n  curl localhost:8000/v1/completions -H 'content-type: application/json' \\\n    -d '{\"model\": \"my-lora\", \"prompt\": \"Hello\", \"max_tokens\": 16}'")]
pub struct ServeArgs {
    #[arg(long, help = crate::load::MODEL_HELP)]
    pub model: Option<PathBuf>,
    #[arg(long, env = "FLORA_WEIGHTS", help = crate::load::WEIGHTS_HELP)]
    pub weights: Option<flora_adapters::WeightFormat>,
    #[arg(long, env = "FLORA_LORA_TABLES", default_value = "bf16", help = crate::load::LORA_TABLES_HELP)]
    pub lora_tables: flora_adapters::LoraTables,
    /// Adapters directory, one subdirectory per adapter (PEFT LoRA / IA3, flora fLoRA).
    /// Default: $FLORA_ADAPTERS_DIR, else `adapters` in flora's cache directory.
    #[arg(long)]
    pub adapters: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Bytes of adapter weights kept in memory (suffixes K, M, G allowed); least recently used
    /// adapters that no request is using are evicted beyond it. Counts adapters as inference
    /// holds them: f32 weights; with bf16 weights, LoRA's bf16 copy alone (0.5x; 0.25x with
    /// --lora-tables int8), fLoRA's and IA3's f32 weights plus a bf16 copy (1.5x).
    #[arg(long, default_value = "1G", value_parser = parse_bytes)]
    pub max_pool_bytes: usize,
    /// Most tokens (prefill chunks + decodes) in one model step.
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Most sequences generating at once.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Most distinct adapters in one step.
    #[arg(long, default_value_t = 32)]
    pub max_loras: usize,
    /// Memory for KV caches (suffixes K, M, G): each running sequence reserves room for its
    /// prompt plus max_tokens; sequences wait when it is taken.
    #[arg(long, default_value = "4G", value_parser = parse_bytes)]
    pub max_kv_bytes: usize,
    /// Most queued sequences before requests are refused with 429.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Require `Authorization: Bearer KEY` on every /v1 route.
    #[arg(long, env = "FLORA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Key for the adapter load/unload routes (default: --api-key).
    #[arg(long, env = "FLORA_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,
    /// Largest request body accepted (suffixes K, M, G); larger ones get 413.
    #[arg(long, default_value = "4M", value_parser = parse_bytes)]
    pub max_body_bytes: usize,
    /// The base model's name in requests (default: the model file's name without extension).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Seconds in-flight requests get to finish on shutdown (Ctrl-C / SIGTERM).
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
}

/// "512", "64K", "256M", "2G" (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1usize << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<f64>().ok().filter(|v| *v > 0.0).map(|v| (v * mult as f64) as usize).ok_or_else(|| format!("{s:?} is not a byte count (e.g. 512M, 2G)"))
}

pub fn run(args: ServeArgs) -> Result<()> {
    crate::load::init_logging();
    let path = flora_model::default_model::resolve_model(args.model.as_deref())?;
    let (mut model, tok) = crate::load::model_and_tokenizer(Some(&path), args.weights)?;
    model.set_lora_tables(args.lora_tables);
    let adapters = args.adapters.or_else(|| std::env::var_os("FLORA_ADAPTERS_DIR").map(PathBuf::from)).unwrap_or_else(|| flora_model::default_model::cache_dir().join("adapters"));
    let max_kv_tokens = (args.max_kv_bytes / model.kv_bytes_per_token()).max(1);
    let name = args.served_model_name.unwrap_or_else(|| path.file_stem().and_then(|s| s.to_str()).unwrap_or("base").to_string());
    let opts = ServeOptions {
        model_name: name.clone(),
        adapters_dir: Some(adapters.clone()),
        max_pool_bytes: args.max_pool_bytes,
        engine: EngineConfig {
            scheduler: SchedulerConfig { max_batch_tokens: args.max_batch_tokens, max_running: args.max_running, max_loras: args.max_loras, max_kv_tokens },
            max_waiting: args.max_waiting,
        },
        api_key: args.api_key,
        admin_key: args.admin_api_key,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        max_body_bytes: args.max_body_bytes,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await.with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let mut server = RunningServer::start(model, tok, opts, listener)?;
        tracing::info!("serving {name} on http://{} (adapters from {})", server.addr, adapters.display());
        let stop = server.take_stop();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: draining");
            if let Some(s) = stop {
                let _ = s.send(());
            }
        });
        server.wait().await?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Ctrl-C, or SIGTERM on Unix.
async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
