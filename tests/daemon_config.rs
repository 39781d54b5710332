//! pmkvqd's configuration from the outside: the example file lists every key with its default, `--print-config`
//! shows values and sources, and a bad configuration exits 64 naming every problem before binding.

use std::process::Command;

fn pmkvqd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pmkvqd"));
    // Only what the test sets may reach the daemon.
    for (k, _) in std::env::vars() {
        if k.starts_with("PMKVQ_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn example_config_lists_every_key_with_its_default() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/pmkvqd.example.toml");
    let table: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    let in_file: std::collections::BTreeMap<String, String> = pmkvq::config::flatten(&table)
        .into_iter()
        .map(|(k, v)| (k, v.unwrap()))
        .collect();
    // The installed config turns the HTTP API on at loopback; the built-in default is off.
    let example_differs = [("http.listen", "127.0.0.1:8080")];
    let keys: std::collections::BTreeMap<String, String> = pmkvq::config::KEYS
        .iter()
        .map(|k| {
            let v = example_differs
                .iter()
                .find(|(key, _)| *key == k.key)
                .map_or(k.default, |(_, v)| *v);
            (k.key.to_string(), v.to_string())
        })
        .collect();
    assert_eq!(
        in_file, keys,
        "deploy/pmkvqd.example.toml is out of sync with src/config/mod.rs"
    );
}

#[test]
fn print_config_shows_values_and_sources() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.toml");
    std::fs::write(&file, "[engine]\nmax_running = 3\nprefill_chunk = 128\n").unwrap();
    let out = pmkvqd()
        .arg("--config")
        .arg(&file)
        .args([
            "--print-config",
            "--set",
            "engine.prefill_chunk=256",
            "--listen",
            "127.0.0.1:6000",
        ])
        .env("PMKVQ_ENGINE_MAX_QUEUED", "5")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        format!("max_running = 3  # file {}", file.display()),
        "prefill_chunk = 256  # flag --set engine.prefill_chunk".to_string(),
        "max_queued = 5  # env PMKVQ_ENGINE_MAX_QUEUED".to_string(),
        "listen = \"127.0.0.1:6000\"  # flag --listen".to_string(),
        "kv_method = \"pmkvq\"  # default".to_string(),
    ] {
        assert!(text.contains(&line), "missing `{line}` in:\n{text}");
    }
    // The output is itself a valid config file.
    let _: toml::Table = text.parse().unwrap();
}

#[test]
fn bad_configuration_exits_64_naming_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "threads = \"many\"\n[engine]\nmax_queud = 3\n").unwrap();
    let out = pmkvqd()
        .arg("--config")
        .arg(&file)
        .args(["--listen", "not-an-address", "--set", "shutdown.grace=forever"])
        .env("PMKVQ_ENGINE_MAX_RUNNING", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "`threads`",
        "engine.max_queud",
        "`listen`",
        "`shutdown.grace`",
        "`engine.max_running`",
    ] {
        assert!(err.contains(needle), "`{needle}` missing from:\n{err}");
    }
    // Usage errors from the command line are 64 as well.
    let out = pmkvqd().arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    // A token or certificate path naming a device (endless) or a huge file is refused, not read forever.
    let out = pmkvqd()
        .args([
            "--set",
            "auth.token_file=/dev/zero",
            "--set",
            "tls.cert=/dev/urandom",
            "--set",
            "tls.key=/dev/zero",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["`auth.token_file`", "`tls.cert`", "not a regular file"] {
        assert!(err.contains(needle), "`{needle}` missing from:\n{err}");
    }
}
