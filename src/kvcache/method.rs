//! KV methods by name, for the CLI, the evaluation harness and (later) per-request policies.

use super::kivi::KiviStore;
use super::quant::{Bits, ShiftMode};
use super::rotate::{Rotated, ROTATION_SEED};
use super::{
    F16KvStore, F32KvStore, KeyScaled, KeyScales, KvError, KvGeometry, KvStore, PmkvqConfig, PmkvqStore, Windowed,
    Windowing,
};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq)]
pub enum KvMethod {
    /// f16 K/V, llama.cpp's default cache (the reference).
    Fp16,
    /// f32 K/V (llama.cpp's `f32` cache type): nothing rounded; the yardstick for how far two exact caches differ.
    F32,
    /// Progressive mixed precision (this project), with its configuration.
    Pmkvq(PmkvqConfig),
    /// Every token quantized at b bits when stored.
    Rtn(Bits),
    /// Per-channel keys in 128-token blocks, per-token values, f16 residual.
    Kivi(Bits),
    /// llama.cpp's symmetric 32-element `q8_0` / `q4_0`.
    Llama(Bits),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown kv method `{0}`: use fp16, f32, pmkvq, pmkvq:direct, pmkvq:modified, rtn:<2|4|8>, kivi:<2|4|8>, q8_0 or q4_0"
)]
pub struct BadMethod(pub String);

impl FromStr for KvMethod {
    type Err = BadMethod;
    fn from_str(s: &str) -> Result<Self, BadMethod> {
        let bad = || BadMethod(s.to_string());
        let bits = |b: &str| {
            b.parse::<u32>()
                .ok()
                .and_then(Bits::from_count)
                .filter(|b| *b != Bits::B16)
                .ok_or_else(bad)
        };
        match s.split_once(':') {
            None => match s {
                "fp16" | "f16" => Ok(KvMethod::Fp16),
                "f32" => Ok(KvMethod::F32),
                "pmkvq" => Ok(KvMethod::Pmkvq(PmkvqConfig::pmkvq())),
                "q8_0" => Ok(KvMethod::Llama(Bits::B8)),
                "q4_0" => Ok(KvMethod::Llama(Bits::B4)),
                _ => Err(bad()),
            },
            Some(("pmkvq", "direct")) => Ok(KvMethod::Pmkvq(PmkvqConfig {
                shift: ShiftMode::Direct,
                name: s.to_string(),
                ..PmkvqConfig::pmkvq()
            })),
            Some(("pmkvq", "modified")) => Ok(KvMethod::Pmkvq(PmkvqConfig {
                shift: ShiftMode::Modified,
                name: s.to_string(),
                ..PmkvqConfig::pmkvq()
            })),
            Some(("rtn", b)) => Ok(KvMethod::Rtn(bits(b)?)),
            Some(("kivi", b)) => Ok(KvMethod::Kivi(bits(b)?)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for KvMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvMethod::Fp16 => write!(f, "fp16"),
            KvMethod::F32 => write!(f, "f32"),
            KvMethod::Pmkvq(c) => write!(f, "{}", c.name),
            KvMethod::Rtn(b) => write!(f, "rtn:{}", b.count()),
            KvMethod::Kivi(b) => write!(f, "kivi:{}", b.count()),
            KvMethod::Llama(b) => write!(f, "q{}_0", b.count()),
        }
    }
}

impl KvMethod {
    /// A store for one sequence. `layer_budgets` (true bytes per layer) bind adaptive methods; fixed-width
    /// methods are not limited by them (their cost is what their width costs).
    pub fn new_store(
        &self,
        geom: KvGeometry,
        layer_budgets: Option<&[usize]>,
        max_tokens: usize,
    ) -> Result<Box<dyn KvStore>, KvError> {
        let unlimited = vec![usize::MAX; geom.layers];
        let budgets = layer_budgets.unwrap_or(&unlimited);
        Ok(match self {
            KvMethod::Fp16 => Box::new(F16KvStore::new(geom, max_tokens)),
            KvMethod::F32 => Box::new(F32KvStore::new(geom, max_tokens)),
            KvMethod::Pmkvq(cfg) => Box::new(PmkvqStore::new(geom, cfg.clone(), budgets, max_tokens)?),
            KvMethod::Rtn(b) => Box::new(PmkvqStore::new(geom, PmkvqConfig::rtn(*b), &unlimited, max_tokens)?),
            KvMethod::Llama(b) => Box::new(PmkvqStore::new(geom, PmkvqConfig::llama(*b), &unlimited, max_tokens)?),
            KvMethod::Kivi(b) => {
                // values per token in groups of a head; keys per channel in blocks of 128 (always fit)
                if !super::quant::rows::group_fits(geom.head_dim, geom.head_dim) {
                    return Err(KvError::BadGroup {
                        method: self.to_string(),
                        group: geom.head_dim,
                        head_dim: geom.head_dim,
                    });
                }
                Box::new(KiviStore::new(geom, *b, max_tokens))
            }
        })
    }
}

impl KvMethod {
    /// The method for a store over `layers` of the model only (the global layers beside sliding windows): a
    /// calibrated sensitivity keeps those layers' rows.
    pub fn for_layers(&self, layers: &[usize]) -> KvMethod {
        match self {
            KvMethod::Pmkvq(c) => {
                let mut c = c.clone();
                if let Some(s) = &c.sensitivity {
                    if layers.iter().all(|&l| l < s.layers()) {
                        c.sensitivity = Some(std::sync::Arc::new(super::pmkvq_plan::Sensitivity {
                            k: layers.iter().map(|&l| s.k[l]).collect(),
                            v: layers.iter().map(|&l| s.v[l]).collect(),
                        }));
                    }
                }
                KvMethod::Pmkvq(c)
            }
            m => m.clone(),
        }
    }

    /// Per-layer budgets for a total: PM-KVQ splits it by calibrated `shares` after each layer's fixed
    /// sink/window cost; without shares, and for fixed-width methods (which budgets do not bind), evenly.
    pub fn layer_budgets(&self, geom: KvGeometry, total: usize, shares: Option<&[f64]>) -> Vec<usize> {
        match (self, shares) {
            (KvMethod::Pmkvq(cfg), Some(sh)) => PmkvqStore::budgets_from_shares(geom, cfg, total, sh),
            _ => even_layer_budgets(total, geom.layers),
        }
    }
}

/// What a backend's caches can do beyond the paper's method: rotate their inputs, fit the 2-bit floor
/// ([`super::quant::ShiftMode::Fitted`]), and the host store's planning (widths planned over one budget on a
/// sensitivity table, a window that yields to the floor and follows the budget). The CPU stores do all three;
/// the device store rotates and fits, and splits its budget by shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvExtensions {
    pub rotation: bool,
    pub fitted_floor: bool,
    pub planning: bool,
}

impl KvExtensions {
    pub const ALL: KvExtensions = KvExtensions {
        rotation: true,
        fitted_floor: true,
        planning: true,
    };
    pub const NONE: KvExtensions = KvExtensions {
        rotation: false,
        fitted_floor: false,
        planning: false,
    };
}

/// A KV method with what configures one sequence's store: its budget, calibrated shares and key scales.
#[derive(Clone, Debug)]
pub struct MethodSpec {
    pub method: KvMethod,
    /// Total true-byte budget: binds adaptive methods; fixed-width methods are checked against it.
    pub budget: Option<usize>,
    /// Name in reports (`pmkvq@1/4` when several budgets run side by side).
    pub label: String,
    /// Per-layer shares of the budget (calibrated allocation); `None` = equal shares.
    pub shares: Option<Vec<f64>>,
    /// Key reparameterization scales applied after RoPE.
    pub key_scales: Option<KeyScales>,
    /// Rotate queries, keys and values per head before the store sees them (`+rot`, [`super::rotate`]).
    pub rotate: bool,
}

impl MethodSpec {
    pub fn plain(method: KvMethod, budget: Option<usize>, label: &str) -> Self {
        MethodSpec {
            method,
            budget,
            label: label.to_string(),
            shares: None,
            key_scales: None,
            rotate: false,
        }
    }

    /// A store for this method: its budget split by the shares, wrapped in the rotation and then the key
    /// scaling if any (keys are scaled first, then rotated: [`super::rotate`]).
    pub fn new_store(&self, geom: KvGeometry, max_tokens: usize) -> Result<Box<dyn KvStore>, KvError> {
        self.new_store_in(geom, None, max_tokens)
    }

    /// [`new_store`](Self::new_store) for a model with sliding-window layers (`win`): the method's store is
    /// built over the global layers only, with the budget left once the windows' bounded cost is set aside,
    /// the global layers' shares and sensitivity, inside a [`Windowed`] store that keeps the windows at f16.
    pub fn new_store_in(
        &self,
        geom: KvGeometry,
        win: Option<&Windowing>,
        max_tokens: usize,
    ) -> Result<Box<dyn KvStore>, KvError> {
        let mut store = match win {
            None => self.base_store(geom, max_tokens)?,
            Some(w) => {
                let globals = w.globals();
                // the windows follow the method: an adaptive cache starts them at its initial width and may
                // lower them to its floor when the global layers at theirs no longer fit beside them; a
                // fixed-width method keeps them at its width
                let (start, floor) = match &self.method {
                    // (the windows of an f32 cache are kept at f16, as every method's are)
                    KvMethod::Fp16 | KvMethod::F32 => (Bits::B16, Bits::B16),
                    KvMethod::Pmkvq(c) if c.adaptive => (c.init_bits, c.floor_bits),
                    KvMethod::Pmkvq(c) => (c.init_bits, c.init_bits),
                    KvMethod::Rtn(b) | KvMethod::Kivi(b) | KvMethod::Llama(b) => (*b, *b),
                };
                let inner = MethodSpec {
                    method: self.method.for_layers(&globals),
                    budget: None,
                    shares: None,
                    ..self.clone()
                };
                let inner_geom = KvGeometry {
                    layers: globals.len(),
                    ..geom
                };
                let mut store = Windowed::with_widths(
                    inner.base_store(inner_geom, max_tokens)?,
                    geom,
                    w.clone(),
                    max_tokens,
                    start,
                    floor,
                )?;
                // (budgets bind adaptive methods; a fixed-width one costs what its width costs, as without windows)
                if let (Some(b), true) = (self.budget, floor < start) {
                    store.set_total_budget(b, self.shares.as_deref(), 0)?;
                }
                Box::new(store)
            }
        };
        if self.rotate {
            store = Box::new(Rotated::rotate(store, ROTATION_SEED)?);
        }
        match &self.key_scales {
            None => Ok(store),
            Some(s) => Ok(Box::new(KeyScaled::new(store, s.clone(), "")?)),
        }
    }

    /// The method's own store with its budget, before rotation and key scaling.
    fn base_store(&self, geom: KvGeometry, max_tokens: usize) -> Result<Box<dyn KvStore>, KvError> {
        // a store that plans its widths on the calibrated sensitivity takes the total itself
        let planned = matches!(&self.method, KvMethod::Pmkvq(c) if c.plans_widths());
        let budgets = match self.budget {
            Some(b) if !planned => Some(self.method.layer_budgets(geom, b, self.shares.as_deref())),
            _ => None,
        };
        let mut store = self.method.new_store(geom, budgets.as_deref(), max_tokens)?;
        if let (true, Some(b)) = (planned, self.budget) {
            store.set_total_budget(b, None, 0)?;
        }
        Ok(store)
    }
}

/// Split a total budget evenly over layers.
pub fn even_layer_budgets(total: usize, layers: usize) -> Vec<usize> {
    vec![total / layers.max(1); layers]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_errors() {
        for name in [
            "fp16",
            "f32",
            "pmkvq",
            "pmkvq:direct",
            "pmkvq:modified",
            "rtn:2",
            "rtn:4",
            "kivi:2",
            "q8_0",
            "q4_0",
        ] {
            assert_eq!(name.parse::<KvMethod>().unwrap().to_string(), name);
        }
        for bad in ["rtn:3", "kivi:16", "q5_0", "pm", "rtn:"] {
            assert!(bad.parse::<KvMethod>().is_err(), "{bad}");
        }
    }
}
