//! Sampling: repetition penalty → top-k → top-p → min-p → temperature → draw (llama.cpp's default chain order).
//! Temperature 0 is greedy (argmax after penalties). The random stream is seeded and self-contained, so a seed
//! reproduces a generation on every platform and version.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off; >1 discourages tokens seen in the last `repeat_last_n`.
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("`temperature` must be >= 0 and finite, got {0}")]
    Temperature(f32),
    #[error("`top_p` must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("`min_p` must be in [0, 1), got {0}")]
    MinP(f32),
    #[error("`repetition_penalty` must be > 0 and finite, got {0}")]
    RepetitionPenalty(f32),
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return Err(SamplingError::MinP(self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(SamplingError::RepetitionPenalty(self.repetition_penalty));
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and stable across versions (unlike library RNGs).
#[derive(Clone, Debug)]
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }
    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = Rng::new(params.seed);
        Ok(Sampler { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token; `history` is every token so far (prompt and generated), for the penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen: Vec<u32> = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    // CTRL-paper penalty as llama.cpp applies it: shrink positive logits, grow negative ones.
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        // Probabilities at temperature 1 decide the top-p / min-p cut (llama.cpp order: filters, then temp).
        let max = cand[0].1;
        let probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let z: f64 = probs.iter().sum();
        let mut keep = cand.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, pr) in probs.iter().enumerate() {
                cum += pr / z;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = p.min_p as f64; // relative to the top probability, which is exp(0) = 1 here
            keep = keep.min(probs.iter().take_while(|&&pr| pr >= floor).count().max(1));
        }
        cand.truncate(keep);
        let t = p.temperature as f64;
        let w: Vec<f64> = cand.iter().map(|c| (((c.1 - max) as f64) / t).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (c, wi) in cand.iter().zip(&w) {
            if r < *wi {
                return c.0;
            }
            r -= wi;
        }
        cand[cand.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_is_argmax_and_penalty_applies() {
        let mut s = Sampler::new(params(0.0)).unwrap();
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.9], &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        })
        .unwrap();
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.9], &[1]), 2);
    }

    #[test]
    fn seed_reproduces_and_filters_restrict() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p).unwrap();
            (0..200).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        let p = SamplingParams {
            seed: 42,
            ..params(1.0)
        };
        assert_eq!(draw(p.clone()), draw(p.clone()));
        assert_ne!(draw(p.clone()), draw(SamplingParams { seed: 43, ..p.clone() }));
        let top3: Vec<u32> = {
            let mut idx: Vec<u32> = (0..50).collect();
            idx.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
            idx[..3].to_vec()
        };
        assert!(draw(SamplingParams { top_k: 3, ..p.clone() })
            .iter()
            .all(|t| top3.contains(t)));
        let tiny_p = draw(SamplingParams {
            top_p: 1e-6,
            ..p.clone()
        });
        assert!(tiny_p.iter().all(|&t| t == top3[0]));
        // min-p 0.9 keeps only tokens whose probability is ≥ 0.9 × the best one's
        let best = logits[top3[0] as usize];
        let kept = draw(SamplingParams {
            min_p: 0.9,
            ..p.clone()
        });
        assert!(kept.iter().all(|&t| (logits[t as usize] - best).exp() >= 0.9 - 1e-6));
        // temperature 1 over all 50 tokens should visit many of them
        let mut distinct = draw(p);
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 20, "{}", distinct.len());
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            }
            .validate(),
            Err(SamplingError::Temperature(-1.0))
        );
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string()
        .contains("top_p"));
        assert!(SamplingParams {
            min_p: 1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            repetition_penalty: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
