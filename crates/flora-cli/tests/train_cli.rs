//! `flora train` end to end on the real default model and examples/train: a run that is killed
//! (SIGKILL, after its first checkpoints) and resumed with --resume ends bit-identical to an
//! uninterrupted run; the trained adapter directories load in `flora generate`; bad input fails
//! with a message naming file and line.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn train(out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flora"));
    c.arg("train")
        .arg("--data")
        .arg(repo().join("examples/train/toy.jsonl"))
        .arg("--config")
        .arg(repo().join("examples/train/adapters.toml"))
        .arg("--out")
        .arg(out)
        .args(["--steps", "6", "--batch-size", "3", "--seq-len", "48", "--save-every", "1", "--eval-every", "3", "--warmup", "2"])
        .args(extra)
        .env("RAYON_NUM_THREADS", "2");
    c
}

fn file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn killed_and_resumed_cli_run_equals_uninterrupted_and_adapters_load_in_generate() {
    let base = std::env::temp_dir().join(format!("flora-train-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (a, b) = (base.join("a"), base.join("b"));
    let out = train(&a, &[]).output().expect("run flora train");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Kill -9 once the run has checkpointed at least twice (step 2), before it finishes.
    let mut child = train(&b, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    let killed = loop {
        let steps = std::fs::read_to_string(b.join("metrics.jsonl")).map(|s| s.lines().filter(|l| l.contains("\"train\"")).count()).unwrap_or(0);
        if steps >= 2 && b.join("checkpoint.safetensors").exists() {
            child.kill().unwrap();
            break true;
        }
        if child.try_wait().unwrap().is_some() || t.elapsed() > Duration::from_secs(600) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.wait().unwrap();
    assert!(killed, "the run finished before it could be killed");
    assert!(!b.join("pirate").exists(), "killed before the final adapters");

    let again = train(&b, &[]).output().unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--resume"), "an existing checkpoint must not be overwritten");
    let resumed = train(&b, &["--resume"]).output().unwrap();
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{log}");
    assert!(log.contains("resumed from"), "{log}");
    for name in ["pirate", "formal", "shout"] {
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            assert!(file(&a.join(name).join(f)) == file(&b.join(name).join(f)), "{name}/{f} differs after kill and resume");
        }
    }
    let cfg: serde_json::Value = serde_json::from_slice(&file(&a.join("formal/adapter_config.json"))).unwrap();
    assert_eq!((cfg["peft_type"].as_str(), cfg["r"].as_u64()), (Some("LORA"), Some(4)));
    let cfg: serde_json::Value = serde_json::from_slice(&file(&a.join("shout/adapter_config.json"))).unwrap();
    assert_eq!(cfg["peft_type"].as_str(), Some("IA3"));
    assert!(std::fs::read_to_string(a.join("loss.svg")).unwrap().starts_with("<svg"));

    // A trained directory goes straight to `flora generate`.
    for name in ["pirate", "formal", "shout"] {
        let g = Command::new(env!("CARGO_BIN_EXE_flora"))
            .args(["generate", "--max-tokens", "3", "--prompt", "Say hello.", "--adapter"])
            .arg(a.join(name))
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .unwrap();
        assert!(g.status.success(), "generate with {name}: {}", String::from_utf8_lossy(&g.stderr));
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn malformed_data_fails_with_file_and_line() {
    let dir = std::env::temp_dir().join(format!("flora-train-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("bad.jsonl");
    std::fs::write(&data, "{\"adapter\": \"a\", \"text\": \"ok\"}\n{\"adapter\": \"a\", \"prompt\": \"p\"}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flora")).args(["train", "--steps", "1", "--data"]).arg(&data).arg("--out").arg(dir.join("out")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.jsonl:2: `prompt` and `completion` go together"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
