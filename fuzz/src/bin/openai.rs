//! AFL++ target `openai` (see pmkvq::fuzz and scripts/fuzz.sh).
fn main() {
    let target = pmkvq::fuzz::TARGETS.iter().find(|(n, _)| *n == "openai").expect("a target of that name").1;
    // `nohook`: a panic the code under test catches itself (as pmkvq does around the tokenizers library) is
    // handled, not a crash; one that escapes still aborts.
    afl::fuzz_nohook!(|data: &[u8]| target(data));
}
