//! The module boundaries of architecture.md §2, checked by scanning the sources.

use std::path::Path;

fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
    if dir.is_file() {
        out.push((dir.display().to_string(), std::fs::read_to_string(dir).unwrap()));
        return;
    }
    assert!(dir.is_dir(), "{} does not exist", dir.display());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push((p.display().to_string(), std::fs::read_to_string(&p).unwrap()));
        }
    }
}

fn assert_module_avoids(module: &str, forbidden: &[&str]) {
    let mut files = Vec::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(module),
        &mut files,
    );
    for (path, text) in files {
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for f in forbidden {
                assert!(
                    !code.contains(f),
                    "{path}:{}: `{module}` must not use `{f}` (architecture.md §2)",
                    n + 1
                );
            }
        }
    }
}

#[test]
fn engine_does_not_see_transport_or_memory_sampling() {
    assert_module_avoids("engine", &["tonic::", "prost::", "sysinfo::", "unsafe "]);
}

#[test]
fn kvcache_does_not_know_requests_or_async() {
    assert_module_avoids("kvcache", &["tonic::", "prost::", "tokio::", "crate::engine"]);
}

#[test]
fn model_does_not_know_sequences_or_budgets() {
    assert_module_avoids("model", &["crate::engine", "tokio::", "tonic::"]);
}

#[test]
fn every_unsafe_block_has_a_safety_comment() {
    let mut files = Vec::new();
    sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    for (path, text) in files {
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains("unsafe {") {
                let window = &lines[i.saturating_sub(3)..=i];
                assert!(
                    window.iter().any(|l| l.contains("SAFETY:")),
                    "{path}:{}: unsafe block without `// SAFETY:`",
                    i + 1
                );
            }
        }
    }
}

#[test]
fn server_does_not_touch_compute() {
    assert_module_avoids(
        "server",
        &[
            "candle",
            "crate::model",
            "crate::kvcache",
            "crate::calib",
            "std::env::",
            "std::fs::",
        ],
    );
}

#[test]
fn config_is_the_only_reader_of_env_and_argv() {
    for module in ["engine", "server", "kvcache", "model", "calib", "eval", "app.rs"] {
        assert_module_avoids(module, &["std::env::var", "env::args", "env::var_os"]);
    }
}

#[test]
fn unsafe_is_forbidden_where_architecture_says() {
    for module in ["config", "server", "engine"] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join(module)
            .join("mod.rs");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.contains("#![forbid(unsafe_code)]"),
            "{}: must carry #![forbid(unsafe_code)]",
            p.display()
        );
    }
}
