//! Writes the tiny random-weight GGUF models that `tests/llamacpp_parity.rs` compares with llama.cpp into a
//! directory (`scripts/llamacpp-parity.sh` runs this, then llama.cpp on each file).
//!   cargo run --release --example tiny_models -- DIR
#[path = "../tests/common/tiny.rs"]
mod tiny;

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: tiny_models DIR"));
    std::fs::create_dir_all(&dir).expect("create DIR");
    for (name, spec) in tiny::parity_specs() {
        let p = tiny::write_parity_gguf(&spec, &dir.join(format!("{name}.gguf")));
        println!("{}", p.display());
    }
}
