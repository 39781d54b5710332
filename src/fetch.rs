//! The default model: where it lives and how it is fetched. `deploy/fetch-model.sh` is the one implementation;
//! it is compiled into the binary so `pmkvq fetch-model` works from any install location.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SCRIPT: &str = include_str!("../deploy/fetch-model.sh");

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("could not run bash for the fetch script: {0}")]
    Spawn(std::io::Error),
    #[error("fetching the model failed (exit code {code:?}); see the messages above")]
    Failed { code: Option<i32> },
}

/// The default model's path inside `dir`.
pub fn default_model_path(dir: &Path) -> PathBuf {
    dir.join(DEFAULT_MODEL_FILE)
}

/// Models the fetch script knows: the default, and Gemma-3-270M (Gemma terms of use apply).
pub const KNOWN_MODELS: &[&str] = &["smollm2", "gemma3"];

/// Fetch (or verify) the default model into `dir`; returns its path.
pub fn fetch_default_model(dir: &Path) -> Result<PathBuf, FetchError> {
    fetch_model(dir, "smollm2")
}

/// Fetch (or verify) one of [`KNOWN_MODELS`] into `dir`; returns its path.
pub fn fetch_model(dir: &Path, name: &str) -> Result<PathBuf, FetchError> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(SCRIPT)
        .arg("fetch-model")
        .arg(dir)
        .arg(name)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(FetchError::Spawn)?;
    if !out.status.success() {
        return Err(FetchError::Failed {
            code: out.status.code(),
        });
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

/// SHA-256 identifying a model: of the file for GGUF, of the sorted files' hashes for an HF directory.
pub fn model_sha256(path: &Path) -> std::io::Result<String> {
    if !path.is_dir() {
        return sha256_file(path);
    }
    use sha2::{Digest, Sha256};
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .as_bytes(),
        );
        h.update(sha256_file(&f)?.as_bytes());
    }
    Ok(format!("{:x}", h.finalize()))
}
