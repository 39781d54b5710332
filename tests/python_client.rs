//! A stock Python client (grpcio + grpcio-health-checking + grpcio-reflection, no generated code) checks health,
//! discovers the API by reflection and streams a generation: the same tokens the Rust client gets.
//!
//! The test command (scripts/test.sh) installs those packages into a virtual environment and points
//! PMKVQ_PYTHON at it; without them this test fails and says how to set them up.

mod common;

use common::daemon::{collect, start_server, text_request};
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_uses_health_reflection_and_streams() {
    let python = std::env::var("PMKVQ_PYTHON").unwrap_or_else(|_| "python3".into());
    let server = start_server(&[]).await;
    let mut c = server.client().await;
    let want = collect(&mut c, text_request("Once upon a time", 24)).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python/pmkvq_client.py");
    let addr = server.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .args([
                script,
                "--server",
                &addr,
                "--prompt",
                "Once upon a time",
                "--max-tokens",
                "24",
                "--json",
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"))
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed (needs grpcio, grpcio-health-checking, grpcio-reflection; scripts/test.sh sets \
         PMKVQ_PYTHON to a venv with them):\n{stderr}"
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["health"], "SERVING");
    let services: Vec<&str> = j["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(services.contains(&"pmkvq.v1.PmkvqService") && services.contains(&"grpc.health.v1.Health"));
    let ids: Vec<u32> = j["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want.ids, "python and rust clients get the same greedy tokens");
    assert_eq!(j["text"].as_str().unwrap(), want.text);
    assert_eq!(j["finish_reason"], "FINISH_REASON_LENGTH");
    server.stop().await;
}
