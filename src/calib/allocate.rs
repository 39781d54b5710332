//! Block-wise memory allocation (spec §4.2): one final bit-width per layer, minimizing total sensitivity under
//! a total memory budget, solved exactly by dynamic programming over bit totals (the memory of a choice is
//! proportional to its width and the same for every layer, so "bits" is the only resource).

use crate::kvcache::pmkvq_plan::knapsack;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AllocError {
    #[error("the budget allows {budget_bits} layer-bits but even the lowest choice needs {need_bits} ({layers} layers at {min_bits} bits)")]
    Infeasible {
        budget_bits: u64,
        need_bits: u64,
        layers: usize,
        min_bits: u32,
    },
    #[error("`choices` must be non-empty distinct widths, and every layer needs one sensitivity per choice")]
    BadInput,
}

/// Pick `choices[k]` for each layer minimizing Σ `sens[layer][k]` subject to Σ width ≤ `budget_bits`.
/// Ties go to the wider choice. Returns the chosen width per layer.
pub fn allocate(sens: &[Vec<f64>], choices: &[u32], budget_bits: u64) -> Result<Vec<u32>, AllocError> {
    let mut distinct = choices.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    if choices.is_empty() || distinct.len() != choices.len() || sens.iter().any(|s| s.len() != choices.len()) {
        return Err(AllocError::BadInput);
    }
    let n = sens.len();
    let min_bits = *distinct.first().unwrap_or(&0);
    let need = n as u64 * min_bits as u64;
    if need > budget_bits {
        return Err(AllocError::Infeasible {
            budget_bits,
            need_bits: need,
            layers: n,
            min_bits,
        });
    }
    let max_total = (n as u64 * *distinct.last().unwrap_or(&0) as u64).min(budget_bits) as usize;
    let options: Vec<Vec<(usize, f64)>> = sens
        .iter()
        .map(|s| choices.iter().zip(s).map(|(&w, &v)| (w as usize, v)).collect())
        .collect();
    let picks = knapsack(&options, max_total).ok_or(AllocError::BadInput)?;
    Ok(picks.into_iter().map(|k| choices[k]).collect())
}

/// Each layer's share of a total budget, proportional to its width (spec §11: budgets as per-layer shares).
pub fn shares(bits: &[u32]) -> Vec<f64> {
    let total: f64 = bits.iter().map(|&b| b as f64).sum();
    bits.iter().map(|&b| b as f64 / total.max(1.0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(sens: &[Vec<f64>], choices: &[u32], budget: u64) -> Option<f64> {
        let n = sens.len();
        let k = choices.len();
        let mut best: Option<f64> = None;
        for code in 0..k.pow(n as u32) {
            let (mut c, mut bits, mut cost) = (code, 0u64, 0.0);
            for s in sens {
                let j = c % k;
                c /= k;
                bits += choices[j] as u64;
                cost += s[j];
            }
            if bits <= budget && best.is_none_or(|b| cost < b) {
                best = Some(cost);
            }
        }
        best
    }

    #[test]
    fn dp_equals_brute_force_on_random_instances() {
        let mut seed = 99u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as f64 / (1u64 << 31) as f64
        };
        for trial in 0..300 {
            let n = 1 + trial % 10;
            let choices: Vec<u32> = if trial % 3 == 0 {
                vec![4, 8]
            } else if trial % 3 == 1 {
                vec![2, 4]
            } else {
                vec![2, 4, 8]
            };
            // sensitivities fall with width, as measured ones do, with noise
            let sens: Vec<Vec<f64>> = (0..n)
                .map(|_| choices.iter().map(|&b| rnd() * 10.0 / b as f64).collect())
                .collect();
            let lo = n as u64 * choices[0] as u64;
            let hi = n as u64 * *choices.last().unwrap() as u64;
            let budget = lo + (rnd() * (hi - lo + 1) as f64) as u64;
            let got = allocate(&sens, &choices, budget).unwrap();
            let cost: f64 = got
                .iter()
                .zip(&sens)
                .map(|(b, s)| s[choices.iter().position(|c| c == b).unwrap()])
                .sum();
            let bits: u64 = got.iter().map(|&b| b as u64).sum();
            assert!(bits <= budget);
            let want = brute(&sens, &choices, budget).unwrap();
            assert!((cost - want).abs() < 1e-9, "trial {trial}: dp {cost} vs brute {want}");
        }
    }

    #[test]
    fn reproduces_the_spec_example_and_rejects_budgets_below_the_floor() {
        // §4.3: Qwen-7B (28 layers, D_kv 512) at 280 MiB with choices {2,4}: mem(b) = b·512·2·32768/8 bytes,
        // i.e. 4 MiB per bit per layer -> 70 layer-bits -> 7 layers at 4 bits, 21 at 2 (with sensitivities that
        // favour upgrading any layer)
        let sens: Vec<Vec<f64>> = (0..28).map(|i| vec![1.0 + i as f64, 0.0]).collect();
        let got = allocate(&sens, &[2, 4], 280 / 4).unwrap();
        assert_eq!(got.iter().filter(|&&b| b == 4).count(), 7);
        assert_eq!(got[27], 4, "the most sensitive layers get the extra bits");
        assert_eq!(
            allocate(&sens, &[2, 4], 55),
            Err(AllocError::Infeasible {
                budget_bits: 55,
                need_bits: 56,
                layers: 28,
                min_bits: 2
            })
        );
        assert_eq!(allocate(&sens, &[2, 2], 100), Err(AllocError::BadInput));
        let sh = shares(&got);
        assert!((sh.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}
