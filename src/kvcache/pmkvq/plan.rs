//! Budget-aware allocation at run time (issue 15): with the calibrated sensitivity of every layer's K and V at
//! each width, the widths a cache holds under a total budget are chosen by an exact knapsack over the 2·layers
//! bodies (K and V apart) for the bytes at hand, instead of splitting the budget by shares solved offline for one
//! average width. A body only ever goes down (ERS cannot add bits back), so each is bounded by its current width
//! and the floor. At a budget near q4_0's bytes this keeps most bodies at 4 bits and drops only the least
//! sensitive; at a fifth of fp16 it picks which K or V bodies take 2 bits.

use super::enforce::{charged_bytes, enforce_layer, Enforced};
use super::LAYER_BOOKKEEPING;
use crate::kvcache::quant::Bits;
use crate::kvcache::KvError;
use rayon::prelude::*;
use std::sync::Arc;

/// Widths by level: 0 = 16 bits, 1 = 8, 2 = 4, 3 = 2.
pub const LEVELS: [Bits; 4] = [Bits::B16, Bits::B8, Bits::B4, Bits::B2];

pub fn level(b: Bits) -> usize {
    LEVELS.iter().position(|&l| l == b).unwrap_or(0)
}

/// Calibrated cost of quantizing one layer's K or V body at each level (mean KL to full precision per token;
/// level 0 costs nothing).
#[derive(Clone, Debug, PartialEq)]
pub struct Sensitivity {
    pub k: Vec<[f64; 4]>,
    pub v: Vec<[f64; 4]>,
}

/// A width's cost where nothing is calibrated: each step down costs 16× the one before (quantization error
/// grows 4× per bit lost, squared), the same for every body.
pub const UNIFORM_ROW: [f64; 4] = [0.0, 1.0, 16.0, 256.0];

impl Sensitivity {
    /// Without calibration: every layer's K and V alike ([`UNIFORM_ROW`]). The store still plans one budget over
    /// all bodies (the widest that fit, as many as fit) instead of equal shares, which leave a share's bytes
    /// unused once every layer is too small for the next width up and so drop all layers together. The rows are
    /// filled in for the store's layers ([`for_layers`](Self::for_layers)).
    pub fn uniform() -> Self {
        Sensitivity {
            k: Vec::new(),
            v: Vec::new(),
        }
    }

    /// This table for a store of `layers` layers: [`uniform`](Self::uniform) filled in, a calibrated one checked
    /// and shared as it is.
    pub fn for_layers(self: &Arc<Self>, layers: usize) -> Result<Arc<Self>, KvError> {
        if self.k.is_empty() && self.v.is_empty() {
            return Ok(Arc::new(Sensitivity {
                k: vec![UNIFORM_ROW; layers],
                v: vec![UNIFORM_ROW; layers],
            }));
        }
        if self.k.len() != layers || self.v.len() != layers {
            return Err(KvError::BadBudgets {
                what: "sensitivity rows",
                expected: layers,
                got: self.k.len(),
            });
        }
        Ok(Arc::clone(self))
    }

    /// Units in store order: layer 0 K, layer 0 V, layer 1 K, ...
    pub fn units(&self) -> impl Iterator<Item = &[f64; 4]> {
        self.k.iter().zip(&self.v).flat_map(|(k, v)| [k, v])
    }
    pub fn layers(&self) -> usize {
        self.k.len()
    }
}

/// Resolution of the knapsack: the bytes to spare over every body at its floor are counted in at most STEPS
/// steps, each body's extra bytes rounded up to whole steps (so a chosen plan always fits; it may leave up to one
/// step per body unused, under 1 % of the spare bytes for 60 bodies).
const STEPS: usize = 8192;

/// Exact multiple-choice knapsack: one option `(cost, value)` per unit minimizing the total value with the total
/// cost at most `cap`, by dynamic programming over cost totals. Ties go to the costlier option (more bits), then to
/// the larger total. Returns each unit's option index; `None` when nothing fits. The offline allocation
/// (`calib::allocate`, cost = width) and the run-time plan below both solve this.
pub fn knapsack(options: &[Vec<(usize, f64)>], cap: usize) -> Option<Vec<usize>> {
    let n = options.len();
    // best[t] = least value of the units so far at total cost exactly t; pick[u·(cap+1) + t] = unit u's option
    let mut best = vec![f64::INFINITY; cap + 1];
    best[0] = 0.0;
    let mut pick = vec![u8::MAX; n * (cap + 1)];
    for (u, opts) in options.iter().enumerate() {
        let row = &mut pick[u * (cap + 1)..(u + 1) * (cap + 1)];
        let mut next = vec![f64::INFINITY; cap + 1];
        for (t, &b) in best.iter().enumerate() {
            if !b.is_finite() {
                continue;
            }
            for (k, &(c, v)) in opts.iter().enumerate() {
                let t2 = t + c;
                if t2 > cap {
                    continue;
                }
                let s = b + v;
                if s < next[t2] || (s == next[t2] && row[t2] != u8::MAX && c > opts[row[t2] as usize].0) {
                    next[t2] = s;
                    row[t2] = k as u8;
                }
            }
        }
        best = next;
    }
    let (mut t, least) = best
        .iter()
        .enumerate()
        .fold((0, f64::INFINITY), |acc, (t, &v)| if v <= acc.1 { (t, v) } else { acc });
    if !least.is_finite() {
        return None;
    }
    let mut out = vec![0; n];
    for u in (0..n).rev() {
        let k = pick[u * (cap + 1) + t] as usize;
        out[u] = k;
        t -= options[u][k].0;
    }
    Some(out)
}

/// The levels minimizing total sensitivity such that the bodies' bytes fit `capacity`: `cost[u][lvl]` is body
/// `u`'s bytes at level `lvl`, `current[u]` its level now (it may only rise, toward fewer bits, up to `floor`).
/// `None` when even every body at the floor does not fit.
pub fn choose(
    sens: &[[f64; 4]],
    cost: &[[usize; 4]],
    current: &[usize],
    floor: usize,
    capacity: usize,
) -> Option<Vec<usize>> {
    let n = current.len();
    // a body already narrower than the floor (a floor raised later) stays where it is
    let lowest = |u: usize| floor.max(current[u]);
    let base: usize = (0..n).map(|u| cost[u][lowest(u)]).sum();
    let spare = capacity.checked_sub(base)?;
    let q = spare.div_ceil(STEPS).max(1);
    // each body's bytes over its floor, in steps of q rounded up
    let options: Vec<Vec<(usize, f64)>> = (0..n)
        .map(|u| {
            (current[u]..=lowest(u))
                .map(|l| (cost[u][l].saturating_sub(cost[u][lowest(u)]).div_ceil(q), sens[u][l]))
                .collect()
        })
        .collect();
    let picks = knapsack(&options, spare / q)?;
    Some((0..n).map(|u| current[u] + picks[u]).collect())
}

/// The planned store: choosing and applying the widths (see the module header).
impl super::PmkvqStore {
    /// Whether widths are planned on the calibrated sensitivity (a total budget is set and the store adapts).
    pub(super) fn planned(&self) -> bool {
        self.total.is_some() && self.cfg.plans_widths()
    }

    /// The plan for layers holding `lens` tokens with bodies at `widths` (K, V) under `total` bytes, `ahead` tokens
    /// to come: each layer's budget and (K, V) widths. Nothing is lowered that fits; otherwise the exact knapsack
    /// on the sensitivity chooses which bodies give way.
    pub(super) fn plan_layers(
        &self,
        shapes: &[([usize; 3], [Bits; 2])],
        total: usize,
        ahead: usize,
    ) -> Result<Vec<(usize, [Bits; 2])>, KvError> {
        let sens = self
            .cfg
            .sensitivity
            .as_deref()
            .expect("planned stores have a sensitivity");
        let floor = level(self.cfg.floor_bits);
        let mut cost = Vec::with_capacity(2 * shapes.len());
        let mut current = Vec::with_capacity(2 * shapes.len());
        for &(lens, widths) in shapes {
            let c = LEVELS.map(|b| self.side_cost(lens, ahead, b));
            for w in widths {
                cost.push(c);
                current.push(level(w));
            }
        }
        let capacity = total.saturating_sub(shapes.len() * LAYER_BOOKKEEPING);
        let spent = |levels: &[usize]| (0..levels.len()).map(|u| cost[u][levels[u]]).sum::<usize>();
        let levels = if spent(&current) <= capacity {
            current
        } else {
            let units: Vec<[f64; 4]> = sens.units().copied().collect();
            match choose(&units, &cost, &current, floor, capacity) {
                Some(levels) => levels,
                None if self.cfg.window_yields() => return self.plan_yielding(shapes, total, ahead),
                None => {
                    return Err(KvError::OutOfBudget {
                        layer: 0,
                        need: spent(&vec![floor; cost.len()]) + shapes.len() * LAYER_BOOKKEEPING,
                        budget: total,
                        floor_bits: self.cfg.floor_bits.count(),
                    })
                }
            }
        };
        let slack = (capacity - spent(&levels)) / shapes.len().max(1);
        Ok((0..shapes.len())
            .map(|li| {
                let (k, v) = (levels[2 * li], levels[2 * li + 1]);
                let budget = cost[2 * li][k] + cost[2 * li + 1][v] + LAYER_BOOKKEEPING + slack;
                (budget, [LEVELS[k], LEVELS[v]])
            })
            .collect())
    }

    /// The plan where even every body at the floor does not hold the full windows: every body at the floor,
    /// each layer budgeted what it holds with no window (the sink at 16 bits, everything else at the floor) plus
    /// an even part of what is left, so each window keeps as many recent tokens as that part pays for.
    fn plan_yielding(
        &self,
        shapes: &[([usize; 3], [Bits; 2])],
        total: usize,
        ahead: usize,
    ) -> Result<Vec<(usize, [Bits; 2])>, KvError> {
        let floor = self.cfg.floor_bits;
        let needs: Vec<usize> = shapes
            .iter()
            .map(|&(lens, _)| self.floor_projected(lens, ahead, floor))
            .collect();
        let need: usize = needs.iter().sum();
        let spare = total.checked_sub(need).ok_or(KvError::OutOfBudget {
            layer: 0,
            need,
            budget: total,
            floor_bits: floor.count(),
        })?;
        let each = spare / shapes.len().max(1);
        Ok(needs.into_iter().map(|n| (n + each, [floor, floor])).collect())
    }

    /// Plan the whole cache for `ahead` more tokens under its total and lower the bodies the plan lowers.
    pub(super) fn replan(&mut self, ahead: usize) -> Result<(), KvError> {
        self.deferred.clear();
        let Some(total) = self.total else { return Ok(()) };
        let shapes: Vec<_> = (0..self.layers.len()).map(|li| self.kv_shape(li)).collect();
        let plan = self.plan_layers(&shapes, total, ahead)?;
        let lowering = self
            .layers
            .iter()
            .zip(&plan)
            .any(|(l, (_, [kb, vb]))| l.k.body.bits != *kb || l.v.body.bits != *vb);
        if !lowering {
            // the widths held fit: the plan's budgets (what each layer holds now and after the step, plus its
            // share of the slack) are all that changes — the per-step case
            for (l, (budget, _)) in self.layers.iter_mut().zip(plan) {
                l.budget = budget;
            }
            // only an elastic window can hold more than its plan (it yields now)
            if self.cfg.window_yields() {
                for li in 0..self.layers.len() {
                    self.enforce(li)?;
                }
            }
            return Ok(());
        }
        // a prompt chunk's layers that can wait for their own read are lowered then (lower_deferred)
        let later = if ahead > 1 {
            self.deferrable(&shapes, &plan, total, ahead)
        } else {
            vec![false; plan.len()]
        };
        self.deferred = plan.iter().zip(&later).map(|(p, &d)| d.then_some(*p)).collect();
        let (cfg, geom) = (&self.cfg, self.geom);
        let results: Vec<Enforced> = self
            .layers
            .par_iter_mut()
            .zip(plan)
            .zip(later)
            .enumerate()
            .map(|(li, ((l, (budget, [kb, vb])), later))| {
                if later {
                    return Enforced {
                        levels: 0,
                        result: Ok(()),
                    };
                }
                l.budget = budget;
                let n = l.k.body.shrink_to(kb, cfg.shift) as u64 + l.v.body.shrink_to(vb, cfg.shift) as u64;
                let r = enforce_layer(cfg, geom, li, l);
                Enforced {
                    levels: n + r.levels,
                    result: r.result,
                }
            })
            .collect();
        self.tally(results)
    }

    /// Which layers the plan lowers may wait until the step's attention has read them in their current widths
    /// (lowered by [`lower_deferred`](Self::lower_deferred) just before the layer stores its new tokens): as
    /// many as keep the cache within `total` at every moment of the step. Layers are done in order; a layer done
    /// holds at most its planned bytes `a`, a waiting one what it holds now `h`, any other at most `a` (it was
    /// lowered before the step, or is not lowered). So after layer `t` the cache holds at most
    /// Σ a + Σ over waiting layers past `t` of (h − a); while that exceeds `total` somewhere, the waiting layer
    /// past that point that would free the most is lowered up front instead.
    ///
    /// Why: a prompt prefilled in chunks reads its earlier chunks through the cache, and lowering first makes
    /// the chunk read them at the widths meant for after it (docs/retrieval.md: at 1/5 of fp16's bytes, 1024-token
    /// chunks read at the widths before the step find the pass key as often as fp16). A decode step (`ahead` 1)
    /// lowers first as before: one token's read gains nothing measurable.
    fn deferrable(
        &self,
        shapes: &[([usize; 3], [Bits; 2])],
        plan: &[(usize, [Bits; 2])],
        total: usize,
        ahead: usize,
    ) -> Vec<bool> {
        let a: Vec<usize> = shapes
            .iter()
            .zip(plan)
            .map(|((lens, _), (_, [kb, vb]))| {
                self.side_cost(*lens, ahead, *kb) + self.side_cost(*lens, ahead, *vb) + LAYER_BOOKKEEPING
            })
            .collect();
        let h: Vec<usize> = self.layers.iter().map(|l| charged_bytes(&self.cfg, l)).collect();
        let mut wait: Vec<bool> = shapes.iter().zip(plan).map(|((_, now), (_, w))| now != w).collect();
        let base: usize = a.iter().sum();
        loop {
            // the cache's most after each layer: Σ a plus the waiting layers' excess past that point
            let mut excess = 0isize;
            let mut worst = (0isize, usize::MAX);
            for t in (0..wait.len()).rev() {
                if wait[t] {
                    excess += h[t] as isize - a[t] as isize;
                }
                // before layer t is done: layers t.. still as they are
                if excess >= worst.0 {
                    worst = (excess, t);
                }
            }
            if base as isize + worst.0 <= total as isize {
                return wait;
            }
            // the waiting layer at or past the worst point that frees the most by going first
            let Some(j) = (worst.1..wait.len())
                .filter(|&j| wait[j] && h[j] > a[j])
                .max_by_key(|&j| h[j] - a[j])
            else {
                return vec![false; wait.len()];
            };
            wait[j] = false;
        }
    }

    /// Lower layer `li` as the step's plan says, if it waited for its read ([`deferrable`](Self::deferrable)).
    pub(super) fn lower_deferred(&mut self, li: usize) {
        if let Some((budget, [kb, vb])) = self.deferred.get_mut(li).and_then(Option::take) {
            let (l, shift) = (&mut self.layers[li], self.cfg.shift);
            l.budget = budget;
            let n = l.k.body.shrink_to(kb, shift) + l.v.body.shrink_to(vb, shift);
            self.requants = self.requants.saturating_add(n as u64);
        }
    }

    /// What one side (K or V) of a layer holding `lens` tokens costs a plan with its body at `bits`: the larger
    /// of its bytes now and after `ahead` more tokens.
    fn side_cost(&self, lens: [usize; 3], ahead: usize, bits: Bits) -> usize {
        self.side_bytes_after(lens, 0, bits)
            .max(self.side_bytes_after(lens, ahead, bits))
    }

    /// Layer `li`'s token counts and its K and V body widths.
    pub(super) fn kv_shape(&self, li: usize) -> ([usize; 3], [Bits; 2]) {
        let l = &self.layers[li];
        (self.shape(li).0, [l.k.body.bits, l.v.body.bits])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(sens: &[[f64; 4]], cost: &[[usize; 4]], current: &[usize], floor: usize, cap: usize) -> Option<f64> {
        let n = current.len();
        let mut best: Option<f64> = None;
        let mut idx = current.to_vec();
        loop {
            let bytes: usize = (0..n).map(|u| cost[u][idx[u]]).sum();
            if bytes <= cap {
                let s: f64 = (0..n).map(|u| sens[u][idx[u]]).sum();
                best = Some(best.map_or(s, |b: f64| b.min(s)));
            }
            let mut u = 0;
            while u < n {
                if idx[u] < floor {
                    idx[u] += 1;
                    break;
                }
                idx[u] = current[u];
                u += 1;
            }
            if u == n {
                return best;
            }
        }
    }

    #[test]
    fn the_knapsack_matches_brute_force_and_never_overspends() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as f64 / (1u64 << 31) as f64
        };
        for case in 0..200 {
            let n = 2 + case % 5;
            let sens: Vec<[f64; 4]> = (0..n)
                .map(|_| {
                    let a = rnd();
                    [0.0, a * 0.01, a * 0.1 + rnd() * 0.01, a + rnd()]
                })
                .collect();
            // cost per token shaped like 16/8/4/2-bit bodies with per-group parameters, over a body length
            let body = 1 + (rnd() * 500.0) as usize;
            let cost: Vec<[usize; 4]> = (0..n).map(|_| [396, 204, 108, 60].map(|b| b * body)).collect();
            let current: Vec<usize> = (0..n).map(|_| (rnd() * 3.0) as usize).collect();
            let floor = 3;
            let lo: usize = (0..n).map(|u| cost[u][3]).sum();
            let hi: usize = (0..n).map(|u| cost[u][current[u]]).sum();
            let cap = lo + ((hi - lo) as f64 * rnd()) as usize;
            let got = choose(&sens, &cost, &current, floor, cap).expect("the floor fits");
            let bytes: usize = (0..n).map(|u| cost[u][got[u]]).sum();
            assert!(bytes <= cap, "case {case}: {bytes} > {cap}");
            assert!(
                (0..n).all(|u| got[u] >= current[u] && got[u] <= floor),
                "case {case}: raised a width"
            );
            let s: f64 = (0..n).map(|u| sens[u][got[u]]).sum();
            let best = brute(&sens, &cost, &current, floor, cap).unwrap();
            assert!(s >= best - 1e-12, "case {case}: better than the optimum?");
            // rounding each body's cost up to a step loses at most one step per body of the capacity: the
            // plan is at least as good as the optimum for that much less
            let step = (cap - lo).div_ceil(STEPS).max(1);
            if let Some(b) = brute(&sens, &cost, &current, floor, cap.saturating_sub(n * step)) {
                assert!(
                    s <= b + 1e-12,
                    "case {case}: {s} worse than the optimum {b} with {} bytes less",
                    n * step
                );
            }
        }
        assert_eq!(
            choose(&[[0.0; 4]], &[[10, 8, 6, 4]], &[0], 3, 3),
            None,
            "below the floor"
        );
    }

    #[test]
    fn the_least_sensitive_body_gives_way_first() {
        let sens = [[0.0, 0.001, 0.01, 1.0], [0.0, 0.001, 0.01, 0.1]];
        let cost = [[400, 200, 100, 60], [400, 200, 100, 60]];
        // room for one body at 4 bits and one at 2: the second (less sensitive at 2 bits) takes the 2
        assert_eq!(choose(&sens, &cost, &[0, 0], 3, 160), Some(vec![2, 3]));
        // everything at 16 fits: nothing moves
        assert_eq!(choose(&sens, &cost, &[0, 0], 3, 800), Some(vec![0, 0]));
        // a body already at 4 bits never comes back up
        assert_eq!(choose(&sens, &cost, &[2, 0], 3, 800), Some(vec![2, 0]));
    }
}
