//! Long-context retrieval (issue 15): a pass key placed at a given depth of a long distracting context, then the
//! question; the answer must contain the key exactly. A task-level check beside KL: a cache that keeps the
//! distribution close on average can still lose the one token far back that the answer depends on.

use crate::engine::sampler::argmax;
use crate::kvcache::MethodSpec;
use crate::model::{Backend, LogitsMode, ModelError, Tokenizer};
use serde::Serialize;

/// The classic distractor (Mohtashami & Jaggi's passkey task): bland sentences the key hides among.
pub const FILLER: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// One retrieval prompt: what the model reads and the key it must answer.
#[derive(Clone, Debug)]
pub struct Probe {
    pub tokens: Vec<u32>,
    pub key: String,
    pub length: usize,
    pub depth: f64,
}

/// Build a probe of about `length` tokens (chat template applied, the answer's first words already given), the
/// key sentence at `depth` (0 = start, 1 = end) of the filler. `filler` is repeated (and cut at a sentence) to
/// fill; `None` uses [`FILLER`].
pub fn probe(
    tok: &Tokenizer,
    template: &crate::model::chat::ChatTemplate,
    length: usize,
    depth: f64,
    key: u32,
    filler: Option<&str>,
) -> Result<Probe, ModelError> {
    let key = format!("{key:05}");
    let filler = filler.unwrap_or(FILLER);
    let sentences: Vec<&str> = filler
        .split_inclusive(['.', '!', '?'])
        .filter(|s| !s.trim().is_empty())
        .collect();
    if sentences.is_empty() {
        return Err(ModelError::Input("the filler text has no sentences".into()));
    }
    let head = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. \
                I will quiz you about the pass key.\n\n";
    let needle = format!(" The pass key is {key}. Remember it. {key} is the pass key.");
    let question = "\n\nWhat is the pass key?";
    let render = |n: usize| -> Result<Vec<u32>, ModelError> {
        let mut body = String::new();
        let at = ((n as f64) * depth.clamp(0.0, 1.0)).round() as usize;
        for i in 0..n {
            if i == at {
                body.push_str(&needle);
            }
            body.push_str(sentences[i % sentences.len()]);
        }
        if at >= n {
            body.push_str(&needle);
        }
        let msgs = [crate::model::chat::ChatMessage {
            role: "user".into(),
            content: format!("{head}{body}{question}"),
        }];
        let text = template.render(&msgs, true, "", "")? + "The pass key is";
        tok.encode(&text, false)
    };
    // grow the filler to the largest count of sentences that stays within `length` tokens
    let (mut lo, mut hi) = (0usize, 1usize);
    while render(hi)?.len() <= length {
        lo = hi;
        hi *= 2;
        if hi > 1 << 20 {
            break;
        }
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if render(mid)?.len() <= length {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let tokens = render(lo)?;
    if tokens.len() > length {
        return Err(ModelError::Input(format!(
            "a retrieval prompt needs more than {length} tokens even without filler"
        )));
    }
    Ok(Probe {
        length: tokens.len(),
        tokens,
        key,
        depth,
    })
}

/// What one method answered to one probe.
#[derive(Clone, Debug, Serialize)]
pub struct Answer {
    pub method: String,
    pub length: usize,
    pub depth: f64,
    pub key: String,
    pub answer: String,
    pub correct: bool,
    /// Log-probability of the key's tokens teacher-forced after the prompt (a continuous view of the same
    /// probe: how sure the cache leaves the model of the right answer); `None` when the run ended early.
    pub key_logprob: Option<f64>,
    /// Why the run stopped before answering (a budget too small for the prompt).
    pub error: Option<String>,
    pub true_bytes: usize,
    /// Each layer's K and V body widths when the answer was done (where precision went).
    pub kv_bits: Vec<[u32; 2]>,
}

/// Prefill the probe into `spec`'s cache in chunks of `prefill_chunk` tokens (0: the whole prompt at once) and
/// answer greedily (`answer_tokens` tokens); correct when the key's digits appear in the answer.
pub fn answer(
    model: &dyn Backend,
    tok: &Tokenizer,
    spec: &MethodSpec,
    probe: &Probe,
    answer_tokens: usize,
    prefill_chunk: usize,
) -> Result<Answer, ModelError> {
    let mut out = Answer {
        method: spec.label.clone(),
        length: probe.length,
        depth: probe.depth,
        key: probe.key.clone(),
        answer: String::new(),
        correct: false,
        key_logprob: None,
        error: None,
        true_bytes: 0,
        kv_bits: Vec::new(),
    };
    let mut store = model.new_store(spec, model.kv_geometry(), probe.tokens.len() + answer_tokens + 1)?;
    let mut ids = Vec::new();
    let key_tokens = tok.encode(&format!(" {}", probe.key), false)?;
    let mut key_logprob = None;
    let run = (|| -> Result<(), ModelError> {
        let chunk = match prefill_chunk {
            0 => probe.tokens.len(),
            c => c,
        };
        let mut logits = model.forward_chunked(&probe.tokens, store.as_mut(), chunk, LogitsMode::Last)?;
        // the key teacher-forced from a bit-exact copy of the prefilled cache, so the greedy answer below reads
        // the very cache it would have read without this
        let snapshot = store.spill()?;
        key_logprob = teacher_forced(model, spec, probe, &snapshot, &logits, &key_tokens).ok();
        for i in 0..answer_tokens {
            let t = argmax(&logits);
            if tok.eos.contains(&t) {
                break;
            }
            ids.push(t);
            if i + 1 < answer_tokens {
                let pos = [(probe.tokens.len() + i) as u32];
                logits = model.forward_one(&[t], &pos, store.as_mut(), LogitsMode::Last)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = run {
        out.error = Some(e.to_string());
    }
    out.key_logprob = key_logprob;
    out.answer = tok.decode(&ids, false);
    let digits: String = out.answer.chars().filter(char::is_ascii_digit).collect();
    out.correct = digits.contains(&probe.key);
    out.true_bytes = store.true_bytes();
    out.kv_bits = store.layer_kv_bits();
    Ok(out)
}

/// Σ log p(key token | prompt, earlier key tokens) on a store restored from `snapshot` (the prefilled cache);
/// `last` are the prompt's last logits.
fn teacher_forced(
    model: &dyn Backend,
    spec: &MethodSpec,
    probe: &Probe,
    snapshot: &[u8],
    last: &[f32],
    key: &[u32],
) -> Result<f64, ModelError> {
    let Some((&first, rest)) = key.split_first() else {
        return Ok(0.0);
    };
    let mut store = model.new_store(spec, model.kv_geometry(), probe.tokens.len() + key.len() + 1)?;
    store.restore(snapshot)?;
    let mut sum = log_prob(last, first);
    if !rest.is_empty() {
        let n = probe.tokens.len() as u32;
        let positions: Vec<u32> = (n..n + rest.len() as u32).collect();
        let logits = model.forward_one(&key[..rest.len()], &positions, store.as_mut(), LogitsMode::All)?;
        let vocab = last.len();
        for (row, &t) in logits.chunks_exact(vocab).zip(rest) {
            sum += log_prob(row, t);
        }
    }
    Ok(sum)
}

fn log_prob(logits: &[f32], t: u32) -> f64 {
    super::divergence::log_softmax(logits)[t as usize]
}
