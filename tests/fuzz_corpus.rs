//! Every input in the fuzz corpora (`fuzz/corpus/<target>/`, the seeds and what AFL++ kept) and every crash it
//! once found (`fuzz/crashes/<target>/`, kept after the fix) goes through its target again: a parser that panics
//! on any of them fails here, in the ordinary test command, without AFL++.

mod common;

use std::path::PathBuf;

#[test]
fn every_corpus_and_crash_input_is_handled_without_a_panic() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    std::env::set_var("PMKVQ_MODEL", common::default_model_path());
    for (name, target) in pmkvq::fuzz::TARGETS {
        let mut seen = 0;
        for kind in ["corpus", "crashes"] {
            let Ok(entries) = std::fs::read_dir(root.join(kind).join(name)) else {
                continue;
            };
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).unwrap();
                let path = e.path();
                let r = std::panic::catch_unwind(|| target(&data));
                assert!(r.is_ok(), "{name}: {} panics", path.display());
                seen += 1;
            }
        }
        assert!(seen > 0, "{name}: no corpus under fuzz/corpus/{name}");
    }
}
