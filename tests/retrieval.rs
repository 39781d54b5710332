//! `pmkvq eval retrieval` on the real default model: prompts fill the requested length with the key at the
//! requested depth, and the model answers a short one from its f16 cache.

mod common;

use common::load_default;
use pmkvq::eval::retrieval::{answer, probe};
use pmkvq::eval::MethodSpec;
use pmkvq::kvcache::KvMethod;
use pmkvq::model::chat::ChatTemplate;
use pmkvq::model::{Backend, LogitsMode};

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
    let a = answer(&model, &tok, &spec, &p, 8, 512).unwrap();
    assert!(a.correct, "answered {:?} for {}", a.answer, p.key);
    assert!(a.error.is_none());
    // the key's teacher-forced log-probability (read from a restored copy of the prefilled cache) is the one a
    // fresh f16 cache gives the prompt followed by the key
    let key = tok.encode(&format!(" {}", p.key), false).unwrap();
    let mut store = model
        .new_store(&spec, model.kv_geometry(), p.tokens.len() + key.len())
        .unwrap();
    let mut seq = p.tokens.clone();
    seq.extend(&key);
    let vocab = model.config().vocab_size;
    let logits = model
        .forward_chunked(&seq[..seq.len() - 1], store.as_mut(), 512, LogitsMode::All)
        .unwrap();
    let direct: f64 = (0..key.len())
        .map(|i| {
            let row = &logits[(p.tokens.len() - 1 + i) * vocab..][..vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
            row[key[i] as usize] as f64 - lse
        })
        .sum();
    let got = a.key_logprob.expect("a key log-probability");
    assert!(
        got < 0.0 && got > -(key.len() as f64) * 0.7,
        "a correct answer is a likely one: {got}"
    );
    assert!((got - direct).abs() < 1e-2, "{got} vs {direct}");
    // the prompt in one pass (`--prefill-chunk 0`) or in chunks: the same answer from the f16 cache, which rounds
    // what it stores either way
    let long = probe(&tok, &template, 700, 0.3, 48213, None).unwrap();
    let [chunked, whole] = [256, 0].map(|c| answer(&model, &tok, &spec, &long, 8, c).unwrap());
    assert!(chunked.correct && whole.correct, "{chunked:?} {whole:?}");
    let (c, w) = (chunked.key_logprob.unwrap(), whole.key_logprob.unwrap());
    assert!((c - w).abs() < 0.05, "{c} vs {w}");
    // a budget far below the prompt's floor ends the run with the reason, not a panic
    let tiny = MethodSpec::plain(
        KvMethod::Pmkvq(pmkvq::kvcache::PmkvqConfig::pmkvq()),
        Some(10_000),
        "pmkvq",
    );
    let a = answer(&model, &tok, &tiny, &p, 8, 512);
    let a = a.expect("a budget error is the answer's, not the harness's");
    assert!(
        !a.correct && a.error.as_deref().is_some_and(|e| e.contains("budget")) && a.key_logprob.is_none(),
        "{a:?}"
    );
}
