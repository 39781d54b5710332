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

/// The layers, bottom first. A module may import only modules of lower layers: nothing below imports above,
/// and modules of one layer stand beside each other (e.g. `memory` and `kvcache`, `gpu` and `calib`).
const LAYERS: &[&[&str]] = &[
    &["cpu", "units", "fetch"],
    &["memory", "kvcache"],
    &["model"],
    &["gpu", "calib"],
    &["engine", "doctor"],
    &["eval", "server", "config"],
    &["app", "fuzz"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The crate modules `text` names through `crate::…` paths (`crate::a::b`, `crate::{a, b::c}`), comments
/// excluded.
fn crate_imports(text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // top-level names of the group: split at commas outside nested braces
            let (mut depth, mut start) = (0, 0);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.push(ident(group[start..j].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

#[test]
fn nothing_below_imports_above() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap().flatten() {
        let p = entry.path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "lib" || name == "bin" {
            continue;
        }
        let layer = layer_of(&name).unwrap_or_else(|| panic!("src/{name}: add the module to LAYERS"));
        seen.push(name.clone());
        let mut files = Vec::new();
        sources(&p, &mut files);
        for (path, text) in files {
            for m in crate_imports(&text) {
                if m == name {
                    continue;
                }
                let theirs = layer_of(&m).unwrap_or_else(|| panic!("{path}: crate::{m} is not in LAYERS"));
                assert!(
                    theirs < layer,
                    "{path}: `{name}` (layer {layer}) imports `{m}` (layer {theirs}); only lower layers may be imported"
                );
            }
        }
    }
    for l in LAYERS.iter().flat_map(|l| l.iter()) {
        assert!(
            seen.iter().any(|s| s == l),
            "LAYERS names `{l}`, which src/ does not have"
        );
    }
}

#[test]
fn the_import_scanner_sees_groups_and_paths() {
    let text = "use crate::kvcache::{KvStore};\nuse crate::{cpu::dot, units::{parse_bytes, x}};\n// crate::app\n";
    assert_eq!(crate_imports(text), ["kvcache", "cpu", "units"]);
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
