//! Shared helpers for integration tests: the real default model and the shared reference data.
#![allow(dead_code)]

pub mod daemon;
pub mod fake_tree;
pub mod http;
pub mod tiny;

use pmkvq::model::{LoadOptions, Model, Tokenizer};
use std::path::PathBuf;

/// `../shared` beside the checkout (CI lays it there), or `$PMKVQ_SHARED`.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("PMKVQ_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

/// The default model. The test command (`.ci/run`, README) fetches it first; a missing model is a failure,
/// never a skip.
pub fn default_model_path() -> PathBuf {
    let p = std::env::var_os("PMKVQ_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(pmkvq::fetch::DEFAULT_MODEL_FILE)
    });
    assert!(
        p.exists(),
        "default model missing at {}: run `deploy/fetch-model.sh` (the test command does)",
        p.display()
    );
    p
}

pub fn load_default(threads: usize) -> (Model, Tokenizer) {
    Model::load(&default_model_path(), &LoadOptions { threads }).expect("default model loads")
}

pub struct GoldenCase {
    pub id: String,
    pub messages: Vec<pmkvq::model::chat::ChatMessage>,
    pub prompt_text: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_margins: Vec<f64>,
    pub last_prompt_top10: Vec<(u32, f64)>,
}

pub struct Golden {
    pub chat_template: String,
    pub cases: Vec<GoldenCase>,
}

pub fn golden() -> Golden {
    let path = shared_dir().join("golden/smollm2-135m-instruct-q4_1.greedy.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let j: serde_json::Value = serde_json::from_str(&text).expect("golden JSON");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = j["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| GoldenCase {
            id: c["id"].as_str().unwrap().to_string(),
            messages: serde_json::from_value(c["messages"].clone()).unwrap(),
            prompt_text: c["prompt_text"].as_str().unwrap().to_string(),
            prompt_ids: ids(&c["prompt_ids"]),
            greedy_ids: ids(&c["greedy_ids"]),
            greedy_margins: c["greedy_margins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect(),
            last_prompt_top10: c["last_prompt_top10"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| (t["token"].as_u64().unwrap() as u32, t["logprob"].as_f64().unwrap()))
                .collect(),
        })
        .collect();
    Golden {
        chat_template: j["chat_template"].as_str().unwrap().to_string(),
        cases,
    }
}

/// log-softmax in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// The real chat templates fetched by `scripts/fetch-chat-templates.sh` (the test command runs it); missing is a
/// failure, never a skip.
pub fn chat_templates_dir() -> PathBuf {
    let p = std::env::var_os("PMKVQ_CHAT_TEMPLATES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/templates"));
    assert!(
        p.join(".fetched-from").exists(),
        "chat templates missing at {}: run `scripts/fetch-chat-templates.sh` (the test command does)",
        p.display()
    );
    p
}

/// One fetched chat template's source, by file stem (`Qwen-Qwen3-0.6B`).
pub fn chat_template(name: &str) -> String {
    let p = chat_templates_dir().join(format!("{name}.jinja"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
