//! `pmkvq generate --kv pmkvq` and `pmkvqd` with nothing else set run the same token loop with the same profile
//! default, so the same greedy request gives the same tokens (they used to differ: the daemon found the shipped
//! profile by itself, the CLI did not).

mod common;

use common::daemon::{chat_request, collect, start_server};
use std::process::Command;

/// `pmkvq generate --kv pmkvq --json` with default settings otherwise: its token ids and finish reason.
fn cli(prompt_text: &str, max_tokens: usize) -> (Vec<u32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pmkvq"))
        .args(["generate", "--json", "--kv", "pmkvq", "--max-tokens"])
        .arg(max_tokens.to_string())
        .arg("--prompt")
        .arg(prompt_text)
        .arg("--model")
        .arg(common::default_model_path())
        .env_remove("PMKVQ_PROFILE")
        .output()
        .expect("run pmkvq generate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids = j["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    (ids, j["finish_reason"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_daemon_defaults_give_the_same_greedy_tokens() {
    assert!(
        std::path::Path::new(pmkvq::calib::AUTO_PROFILE).exists(),
        "the shipped profile is what both must find by default"
    );
    let golden = common::golden();
    let server = start_server(&[]).await;
    let mut c = server.client().await;
    for case in &golden.cases {
        let n = case.greedy_ids.len() as u32;
        let msgs: Vec<(&str, &str)> = case
            .messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        let got = collect(&mut c, chat_request(&msgs, n)).await;
        let complete = got.complete.as_ref().expect("the stream completes");
        assert_eq!(
            complete.usage.unwrap().prompt_tokens as usize,
            case.prompt_ids.len(),
            "{}",
            case.id
        );
        let (want, finish) = cli(&case.prompt_text, n as usize);
        assert_eq!(
            got.ids, want,
            "{}: pmkvqd and `pmkvq generate --kv pmkvq` differ",
            case.id
        );
        let wire = got.finish_reason().as_str_name().to_ascii_lowercase();
        assert!(
            wire.ends_with(&finish),
            "{}: finish reasons differ: daemon {wire}, CLI {finish}",
            case.id
        );
    }
    server.stop().await;
}
