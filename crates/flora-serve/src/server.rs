//! Putting the server together: model + tokenizer + adapter store + engine + router, bound to a
//! listener, with graceful shutdown.

use crate::api::{self, Shared};
use crate::engine::{EngineConfig, EngineHandle};
use crate::pool::AdapterPool;
use crate::registry::Registry;
use crate::store::AdapterStore;
use flora_model::Llama;
use flora_tokenizer::Tokenizer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The base model's name in `model` fields and `/v1/models`.
    pub model_name: String,
    /// Directory of adapters (one subdirectory each); None: only adapters loaded at run time.
    pub adapters_dir: Option<PathBuf>,
    /// Byte budget of adapters held in memory.
    pub max_pool_bytes: usize,
    pub engine: EngineConfig,
    pub api_key: Option<String>,
    pub admin_key: Option<String>,
    pub max_body_bytes: usize,
    /// On shutdown, in-flight requests get this long to finish before they are cancelled.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            model_name: "base".into(),
            adapters_dir: None,
            max_pool_bytes: 1 << 30,
            engine: EngineConfig::default(),
            api_key: None,
            admin_key: None,
            max_body_bytes: 4 << 20,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// A server running on a tokio runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: api::AppState,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Starts serving on `listener` (call from inside a tokio runtime).
    pub fn start(model: Llama, tokenizer: Tokenizer, opts: ServeOptions, listener: tokio::net::TcpListener) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let cfg = model.config().clone();
        let registry = Registry::new(opts.adapters_dir.clone())?;
        let store = Arc::new(AdapterStore::new(registry, AdapterPool::new(opts.max_pool_bytes), cfg.clone(), model.adapter_tables()));
        let tokenizer = Arc::new(tokenizer);
        let chat_template = tokenizer.chat_template().ok();
        let engine = EngineHandle::start(model, tokenizer.clone(), opts.engine.clone());
        let state = Arc::new(Shared {
            engine: engine.clone(),
            store,
            tokenizer,
            chat_template,
            model_name: opts.model_name.clone(),
            context: cfg.context,
            vocab: cfg.vocab,
            max_kv_tokens: opts.engine.scheduler.max_kv_tokens,
            api_key: opts.api_key.clone(),
            admin_key: opts.admin_key.clone(),
            prometheus: crate::metrics::install(),
            shutting_down: AtomicBool::new(false),
        });
        let app = api::router(state.clone(), opts.max_body_bytes);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let st = state.clone();
        let grace = opts.shutdown_grace;
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_rx.await;
                // Refuse new work, let the engine finish what runs (or cancel it after the grace
                // period), and let axum close connections as their responses end.
                st.shutting_down.store(true, Ordering::SeqCst);
                st.engine.begin_shutdown(grace);
                tracing::info!("shutting down: {} running, {} waiting", st.engine.stats().running.load(Ordering::SeqCst), st.engine.stats().waiting.load(Ordering::SeqCst));
            };
            let result = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
            let engine = engine.clone();
            tokio::task::spawn_blocking(move || engine.shutdown(grace)).await.ok();
            result
        });
        Ok(Self { addr, state, stop: Some(stop_tx), task })
    }

    /// Begins a graceful shutdown and waits for it to end.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.wait().await
    }

    /// A sender that begins the graceful shutdown (for signal handlers).
    pub fn take_stop(&mut self) -> Option<oneshot::Sender<()>> {
        self.stop.take()
    }

    /// Waits for the server to end.
    pub async fn wait(self) -> std::io::Result<()> {
        self.task.await.map_err(std::io::Error::other)?
    }
}
