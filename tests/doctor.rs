//! `pmkvq doctor` against fake machine trees: a Jetson (L4T release, device tree, GPU nodes, little memory)
//! and an ordinary x86/arm server.

mod common;

use common::fake_tree::{meminfo, write};

use std::path::Path;
use std::process::Command;

fn doctor(root: &Path, model: &Path, json: bool) -> (Option<i32>, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pmkvq"));
    c.args(["doctor", "--root"]).arg(root).arg("--model").arg(model);
    if json {
        c.arg("--json");
    }
    let out = c.env_remove("PMKVQ_MODEL").output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn jetson_tree_is_recognised_and_a_model_that_does_not_fit_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(
        root,
        "etc/nv_tegra_release",
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n",
    );
    write(
        root,
        "proc/device-tree/model",
        "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\0",
    );
    write(root, "dev/nvhost-gpu", "");
    write(root, "dev/nvmap", "");
    write(
        root,
        "proc/swaps",
        "Filename Type Size Used Priority\n/dev/zram0 partition 1048572 0 5\n",
    );
    write(
        root,
        "proc/pressure/memory",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    );
    meminfo(root, 7620, 3000);
    let model = root.join("model.gguf");
    std::fs::File::create(&model).unwrap().set_len(300 << 20).unwrap();
    let (code, out) = doctor(root, &model, false);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("board: NVIDIA Jetson Orin Nano"), "{out}");
    assert!(out.contains("L4T R36.4") && out.contains("JetPack 6.1/6.2"), "{out}");
    assert!(out.contains("/dev/nvhost-gpu"), "{out}");
    assert!(out.contains("device = \"auto\""), "{out}");
    assert!(out.contains("1 zram"), "{out}");
    // Budget at start: (3000 − 256) × 0.5 MiB.
    assert!(out.contains("kv budget at start: 1372 MiB"), "{out}");

    // Little memory left: the model cannot be loaded.
    meminfo(root, 7620, 200);
    let (code, json) = doctor(root, &model, true);
    assert_eq!(code, Some(1));
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(j["platform"]["tegra"].as_bool().unwrap());
    let blockers = j["blockers"].as_array().unwrap();
    assert!(
        blockers
            .iter()
            .any(|b| b.as_str().unwrap().contains("the model needs 300 MiB")),
        "{blockers:?}"
    );
}

#[test]
fn plain_server_tree_and_a_missing_model() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    meminfo(root, 65536, 60000);
    write(root, "proc/self/cgroup", "0::/system.slice/pmkvqd.service\n");
    write(
        root,
        "sys/fs/cgroup/system.slice/pmkvqd.service/memory.max",
        "4294967296\n",
    );
    write(
        root,
        "sys/fs/cgroup/system.slice/pmkvqd.service/memory.current",
        "1073741824\n",
    );
    let model = root.join("model.gguf");
    std::fs::File::create(&model).unwrap().set_len(100 << 20).unwrap();
    let (code, out) = doctor(root, &model, false);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("jetson:"), "{out}");
    assert!(
        out.contains("gpu device nodes: none") && out.contains("device = \"cpu\""),
        "{out}"
    );
    assert!(out.contains("cgroup limit 4096 MiB"), "{out}");
    // The cgroup binds: (4096 − 1024 − 256) × 0.5 = 1408 MiB.
    assert!(out.contains("kv budget at start: 1408 MiB"), "{out}");
    let (code, out) = doctor(root, &root.join("absent.gguf"), false);
    assert_eq!(code, Some(1));
    assert!(out.contains("BLOCKER: model") && out.contains("not found"), "{out}");
}
