//! `pmkvq eval retrieval` on the real default model: prompts fill the requested length with the key at the
//! requested depth, and the model answers a short one from its f16 cache.

mod common;

use common::load_default;
use pmkvq::eval::retrieval::{answer, probe};
use pmkvq::eval::MethodSpec;
use pmkvq::kvcache::KvMethod;
use pmkvq::model::chat::ChatTemplate;

#[test]
fn probes_fill_their_length_and_place_the_key_at_its_depth() {
    let (_, tok) = load_default(1);
    let template = ChatTemplate::new(tok.chat_template.as_deref().unwrap()).unwrap();
    for (length, depth) in [(300, 0.1), (1000, 0.5), (2048, 0.9)] {
        let p = probe(&tok, &template, length, depth, 12345, None).unwrap();
        assert!(p.tokens.len() <= length, "{} > {length}", p.tokens.len());
        assert!(p.tokens.len() + 40 >= length, "{} far below {length}", p.tokens.len());
        let text = tok.decode(&p.tokens, true);
        let at = text.find("The pass key is 12345").expect("the key sentence") as f64;
        let (start, end) = (
            text.find("quiz you").unwrap() as f64,
            text.find("What is the pass key").unwrap() as f64,
        );
        let placed = (at - start) / (end - start);
        assert!(
            (placed - depth).abs() < 0.1,
            "key at {placed:.2} of the filler, asked for {depth}"
        );
        assert!(text.ends_with("The pass key is"), "the answer is primed");
    }
    assert!(
        probe(&tok, &template, 20, 0.5, 1, None).is_err(),
        "too short for the question itself"
    );
    assert!(
        probe(&tok, &template, 500, 0.5, 1, Some("   ")).is_err(),
        "a filler without sentences"
    );
}

#[test]
fn the_f16_cache_retrieves_a_key_from_a_short_context() {
    let (model, tok) = load_default(2);
    let template = ChatTemplate::new(tok.chat_template.as_deref().unwrap()).unwrap();
    let p = probe(&tok, &template, 400, 0.5, 48213, None).unwrap();
    let spec = MethodSpec::plain(KvMethod::Fp16, None, "fp16");
    let a = answer(&model, &tok, &spec, &p, 8).unwrap();
    assert!(a.correct, "answered {:?} for {}", a.answer, p.key);
    assert!(a.error.is_none());
    // a budget far below the prompt's floor ends the run with the reason, not a panic
    let tiny = MethodSpec::plain(
        KvMethod::Pmkvq(pmkvq::kvcache::PmkvqConfig::pmkvq()),
        Some(10_000),
        "pmkvq",
    );
    let a = answer(&model, &tok, &tiny, &p, 8);
    let a = a.expect("a budget error is the answer's, not the harness's");
    assert!(
        !a.correct && a.error.as_deref().is_some_and(|e| e.contains("budget")),
        "{a:?}"
    );
}
