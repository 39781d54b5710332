//! What the host-run kernel tests share: the driver (`driver.cpp`: forward.cu, kv_quant.cu and kv_shrink.cu
//! compiled by the host's C++ compiler with the CUDA words stubbed by their IEEE meaning, warps and blocks run as
//! fibers) built once per test process, a line protocol to it, and seeded test data.

#![allow(dead_code)] // each test binary uses its own part

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

const DRIVER: &str = include_str!("driver.cpp");

pub fn kernels() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

/// The driver, built once per test process with the host C++ compiler (`CXX`, else `c++`): a missing compiler
/// fails the tests.
pub fn driver() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pmkvq-cuda-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("driver.cpp");
        std::fs::write(&src, DRIVER).unwrap();
        let exe = dir.join("driver");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = Command::new(&cxx)
            .args(["-O2", "-std=c++17", "-ffp-contract=off", "-I"])
            .arg(kernels())
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap_or_else(|e| panic!("the host C++ compiler `{cxx}` is needed to run the kernels on the CPU: {e}"));
        assert!(
            out.status.success(),
            "compiling the kernels on the host:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    })
}

/// Run the driver on `input`; one line of hex words per output.
pub fn run(input: &str) -> Vec<Vec<u32>> {
    let mut child = Command::new(driver())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // written from another thread: the driver's output fills its pipe long before it has read all of this
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "driver exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    writer.join().unwrap().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|w| u32::from_str_radix(w, 16).unwrap())
                .collect()
        })
        .collect()
}

pub fn words<T: Copy + Into<u32>>(v: &[T]) -> String {
    v.iter().map(|&x| format!("{:x} ", x.into())).collect::<String>() + "\n"
}

pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            // a few outlier channels, as real keys have
            if i % 23 == 5 {
                u * 40.0
            } else {
                u * 3.0
            }
        })
        .collect()
}

pub fn hex(v: &[f32]) -> String {
    v.iter().map(|x| format!("{:08x} ", x.to_bits())).collect()
}
