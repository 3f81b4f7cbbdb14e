//! A real server (the default model, fetched if missing) on a free loopback port, running on its
//! own runtime thread so that tests with their own runtimes can share it.

#![allow(dead_code)]

use flora_model::Llama;
use flora_serve::api::AppState;
use flora_serve::{RunningServer, ServeOptions};
use flora_tokenizer::Tokenizer;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::sync::oneshot;

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(opts: ServeOptions) -> Self {
        let path = flora_model::default_model::resolve_model(None).expect("default model");
        let ck = flora_model::weights::load(&path).expect("load model");
        let tok = Tokenizer::from_gguf_content(ck.gguf.as_ref().expect("gguf")).expect("tokenizer");
        let model = Llama::from_checkpoint(ck).expect("model");
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let mut server = RunningServer::start(model, tok, opts, listener).unwrap();
                tx.send((server.addr, server.state.clone(), server.take_stop().unwrap())).unwrap();
                server.wait().await.unwrap();
            });
        });
        let (addr, state, stop) = rx.recv().expect("server started");
        Self { addr, state, stop: Some(stop), thread: Some(thread) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Begins the graceful shutdown.
    pub fn begin_shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Waits for the server thread to end.
    pub fn join(mut self) {
        self.begin_shutdown();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// An adapters directory with the three PEFT-made fixtures and a few broken adapters, at
/// `name` under cargo's temporary directory for integration tests (emptied first). A fixed
/// place rather than a `TempDir`: the server that uses it lives in a `static`, which is never
/// dropped, so a `TempDir` would be left behind in the system's temporary directory on
/// every run.
pub fn adapters_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("cannot empty {}: {e}", dir.display()),
        _ => {}
    }
    for name in ["lora_r4_all", "lora_r2_qv", "ia3_kv_down"] {
        copy_dir(&testdata().join("peft").join(name), &dir.join(name));
    }
    copy_dir(&testdata().join("peft/lora_r4_all"), &dir.join("lora_unload_me"));
    broken_adapters(&dir);
    dir
}

/// `truncated` (weights file cut short), `nan_values` (a NaN in lora_B), `wrong_shape` (lora_A
/// for a 100-wide input), `bad_config` (adapter_config.json is not JSON).
pub fn broken_adapters(root: &Path) {
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;
    let src = testdata().join("peft/lora_r2_qv");
    copy_dir(&src, &root.join("truncated"));
    let w = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    std::fs::write(root.join("truncated/adapter_model.safetensors"), &w[..w.len() / 2]).unwrap();

    let config = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj";
    let write = |name: &str, a: Tensor, b: Tensor| {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("adapter_config.json"), &config).unwrap();
        let t = HashMap::from([(format!("{key}.lora_A.weight"), a), (format!("{key}.lora_B.weight"), b)]);
        candle_core::safetensors::save(&t, d.join("adapter_model.safetensors")).unwrap();
    };
    let dev = Device::Cpu;
    let mut bv = vec![0.01f32; 576 * 2];
    bv[7] = f32::NAN;
    write("nan_values", Tensor::ones((2, 576), candle_core::DType::F32, &dev).unwrap(), Tensor::from_vec(bv, (576, 2), &dev).unwrap());
    write("wrong_shape", Tensor::ones((2, 100), candle_core::DType::F32, &dev).unwrap(), Tensor::ones((576, 2), candle_core::DType::F32, &dev).unwrap());

    copy_dir(&src, &root.join("bad_config"));
    std::fs::write(root.join("bad_config/adapter_config.json"), "{not json").unwrap();
}

/// The greedy continuation a reference produced: (prompt ids, generated ids). `source` is a
/// PEFT fixture name, or "base" for the base model's reference (testdata/smollm2).
pub fn reference_greedy(source: &str) -> (Vec<u32>, Vec<u32>) {
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    let (file, case) = if source == "base" {
        (testdata().join("smollm2/logits_ref.json"), "prompts")
    } else {
        (testdata().join("peft").join(source).join("expected.json"), "cases")
    };
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let case = &v[case][0];
    (ids(&case["input_ids"]), ids(&case["greedy"]["ids"]))
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect()
}
