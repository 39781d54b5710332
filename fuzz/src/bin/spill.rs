//! AFL++ target `spill` (see pmkvq::fuzz and scripts/fuzz.sh).
fn main() {
    let target = pmkvq::fuzz::TARGETS.iter().find(|(n, _)| *n == "spill").expect("a target of that name").1;
    afl::fuzz!(|data: &[u8]| target(data));
}
