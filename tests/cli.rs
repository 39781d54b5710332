//! The `pmkvq` binary as a user runs it: exit codes and messages for bad input, and a real generation.

mod common;

use std::process::Command;

fn pmkvq(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pmkvq"))
        .args(args)
        .output()
        .expect("run pmkvq")
}

#[test]
fn bad_arguments_exit_64_naming_the_field() {
    let model = common::default_model_path();
    let m = model.to_str().unwrap();
    // clap's own parse errors are usage errors too
    let out = pmkvq(&["generate", "--model", m, "--prompt", "hi", "--max-tokens", "many"]);
    assert_eq!(out.status.code(), Some(64));
    for (args, field) in [
        (
            vec!["generate", "--model", m, "--prompt", "hi", "--max-tokens", "0"],
            "--max-tokens",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "hi", "--temperature", "-1"],
            "temperature",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "hi", "--top-p", "1.5"],
            "top_p",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "hi", "--min-p", "1"],
            "min_p",
        ),
        (
            vec![
                "eval",
                "divergence",
                "--model",
                m,
                "--prompt",
                "hi",
                "--reference",
                "q4_0",
            ],
            "--reference",
        ),
    ] {
        let out = pmkvq(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(field), "{args:?}: message should name {field}: {err}");
    }
    // ablation flags are checked before a trace is written
    for (method, bound) in [
        ("progressive+g6@1/5", "`+g6`: the group must be a multiple of 4"),
        ("progressive+w0@1/5", "`+w0`: the window must be"),
        ("progressive+s65@1/5", "`+s65`: the sink must be"),
        ("progressive+wb4@1/5", "`+wb4`: the window's width must be 8 or 16 bits"),
        (
            "progressive+ws1@1/5",
            "`+ws1`: the window's share must be 1/N of a layer's budget with N in 2..=64",
        ),
        ("progressive+ws65@1/5", "`+ws65`: the window's share must be"),
    ] {
        let out = pmkvq(&[
            "eval",
            "divergence",
            "--model",
            m,
            "--prompt",
            "hi",
            "--methods",
            method,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{method}: {err}");
        assert!(err.contains(bound), "{method}: message should say {bound}: {err}");
    }
}

#[test]
fn missing_or_broken_model_has_its_own_exit_codes() {
    let out = pmkvq(&["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"]);
    assert_eq!(out.status.code(), Some(66));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fetch-model"));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF but not really").unwrap();
    let out = pmkvq(&["generate", "--model", bad.to_str().unwrap(), "--prompt", "hi"]);
    assert_eq!(out.status.code(), Some(65), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn json_output_has_the_documented_fields_and_streams_match() {
    let model = common::default_model_path();
    let m = model.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        m,
        "--chat",
        "What is the capital of France?",
        "--max-tokens",
        "12",
        "--threads",
        "2",
    ];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = pmkvq(&json_args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for field in [
        "prompt_ids",
        "ids",
        "text",
        "prompt_tokens_per_s",
        "decode_tokens_per_s",
        "finish_reason",
    ] {
        assert!(v.get(field).is_some(), "missing {field}: {v}");
    }
    let n = v["ids"].as_array().unwrap().len();
    assert!((1..=12).contains(&n), "{n} tokens");
    assert!(matches!(v["finish_reason"].as_str(), Some("length" | "eos")), "{v}");
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // the streamed text is the same text
    let streamed = pmkvq(&args);
    assert!(streamed.status.success());
    assert_eq!(
        String::from_utf8_lossy(&streamed.stdout).trim_end(),
        v["text"].as_str().unwrap().trim_end()
    );
    assert!(String::from_utf8_lossy(&streamed.stderr).contains("tok/s"));
}
