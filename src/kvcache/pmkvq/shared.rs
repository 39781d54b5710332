//! What every PM-KVQ layout shares whatever holds its bytes (host memory here, device memory in `gpu::kv`): the
//! split of a total budget over layers, and the spill format (one codec, so a cache spilled on one side restores
//! on the other).

use super::{Bits, OffsetMode, PackedRows, PmkvqConfig};
use crate::kvcache::spill::{Reader, Writer};
use crate::kvcache::{KvError, KvGeometry};

/// Per-layer budgets for `total` true bytes. `floors[l]` / `current[l]`: what layer `l` needs for the next step
/// at its floor width / its current width. When every layer fits at its current width nothing shrinks
/// (precision is only given up under pressure); otherwise every layer gets its floor first (so none is starved
/// below what it must hold) and the rest follows the calibrated shares (spec §11), or is split evenly.
pub fn split_total_budget(
    floors: Vec<usize>,
    current: Vec<usize>,
    total: usize,
    shares: Option<&[f64]>,
    floor_bits: u32,
) -> Result<Vec<usize>, KvError> {
    let need: usize = floors.iter().sum();
    if need > total {
        return Err(KvError::OutOfBudget {
            layer: 0,
            need,
            budget: total,
            floor_bits,
        });
    }
    let (base, need) = match current.iter().sum::<usize>() {
        c if c <= total => (current, c),
        _ => (floors, need),
    };
    let rest = (total - need) as f64;
    let n = base.len() as f64;
    let sum: f64 = shares.map_or(n, |s| s.iter().sum::<f64>().max(f64::MIN_POSITIVE));
    Ok(base
        .iter()
        .enumerate()
        .map(|(li, f)| {
            let share = shares.map_or(1.0, |s| s.get(li).copied().unwrap_or(0.0));
            f + (rest * share / sum).floor() as usize
        })
        .collect())
}

/// One layer as spilled: its budget and (sink, body, window) of K and of V.
pub struct SpilledLayer {
    pub budget: usize,
    pub sides: [[PackedRows; 3]; 2],
}

/// Serialize a PM-KVQ cache into `out`: its name, re-quantization count, then per layer the budget and the six
/// segments. Layers come one at a time (borrowed from host memory, or downloaded from the device one by one).
pub fn write_spill<R: std::borrow::Borrow<PackedRows>>(
    out: &mut dyn std::io::Write,
    name: &str,
    requants: u64,
    layers: impl Iterator<Item = Result<(usize, [[R; 3]; 2]), KvError>>,
) -> Result<(), KvError> {
    let mut w = Writer::new(out, "pmkvq");
    w.bytes(name.as_bytes());
    w.u64(requants);
    for layer in layers {
        let (budget, sides) = layer?;
        w.u64(budget as u64);
        for seg in sides.iter().flatten() {
            w.rows(seg.borrow());
        }
    }
    w.finish()
}

/// More re-quantizations than a cache can have gone through (three per layer per shrink, far beyond any run).
const MAX_REQUANTS: u64 = 1 << 48;

/// Reads what [`write_spill`] wrote for a cache configured as `cfg` over `geom` (groups of `group`) one layer at
/// a time, checking every length against the configuration: segment sizes, K and V alike, sink ≤ the configured
/// sink, window shorter than the window size, 16-bit sink and window, one token count across layers.
pub struct SpillLayers<'a> {
    r: Reader<'a>,
    cfg: &'a PmkvqConfig,
    geom: KvGeometry,
    group: usize,
    left: usize,
    tokens: Option<usize>,
    /// The cache's re-quantizations when it was spilled.
    pub requants: u64,
}

impl<'a> SpillLayers<'a> {
    pub fn new(data: &'a [u8], cfg: &'a PmkvqConfig, geom: KvGeometry, group: usize) -> Result<Self, KvError> {
        let mut r = Reader::new(data, "pmkvq")?;
        if r.bytes()? != cfg.name.as_bytes() {
            return Err(KvError::Corrupt("written by a differently configured cache".into()));
        }
        let requants = r.u64()?;
        // a count, not a size: anything near 2^64 is a corrupt file (and would overflow the next increment)
        if requants > MAX_REQUANTS {
            return Err(KvError::Corrupt(format!("{requants} re-quantizations")));
        }
        Ok(SpillLayers {
            r,
            cfg,
            geom,
            group,
            left: geom.layers,
            tokens: None,
            requants,
        })
    }

    /// The next layer (`None` after the last).
    pub fn next_layer(&mut self) -> Result<Option<SpilledLayer>, KvError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let (cfg, geom, group) = (self.cfg, self.geom, self.group);
        let r = &mut self.r;
        let budget = r.u64()? as usize;
        let mut segment = |i: usize| -> Result<PackedRows, KvError> {
            let offsets = if i == 1 { cfg.body_offsets() } else { OffsetMode::Stored };
            r.rows(&PackedRows::new(
                Bits::B16,
                group,
                geom.kv_heads,
                geom.head_dim,
                offsets,
            ))
        };
        let mut side = || -> Result<[PackedRows; 3], KvError> { Ok([segment(0)?, segment(1)?, segment(2)?]) };
        let sides = [side()?, side()?];
        let [k, v] = &sides;
        if (0..3).any(|i| k[i].len() != v[i].len()) {
            return Err(KvError::Corrupt("k and v hold different token counts".into()));
        }
        for s in [k, v] {
            if s[0].len() > cfg.sink || (cfg.window > 0 && s[2].len() >= cfg.window) {
                return Err(KvError::Corrupt(format!(
                    "sink of {} or window of {} tokens: this cache keeps at most {} and fewer than {}",
                    s[0].len(),
                    s[2].len(),
                    cfg.sink,
                    cfg.window
                )));
            }
            if s[0].bits != Bits::B16 || !cfg.window_width_ok(s[2].bits) || k[2].bits != v[2].bits {
                return Err(KvError::Corrupt(format!(
                    "the sink must be 16-bit and the K and V windows {}-bit{}",
                    cfg.window_bits.count(),
                    if cfg.window_share.is_some() { " or 8-bit" } else { "" }
                )));
            }
        }
        let tokens = k.iter().map(PackedRows::len).sum::<usize>();
        if *self.tokens.get_or_insert(tokens) != tokens {
            return Err(KvError::Corrupt("layers hold different token counts".into()));
        }
        Ok(Some(SpilledLayer { budget, sides }))
    }

    /// Check that every layer was read and nothing follows.
    pub fn finish(self) -> Result<(), KvError> {
        if self.left > 0 {
            return Err(KvError::Corrupt(format!("{} layers not read", self.left)));
        }
        self.r.finish()
    }
}

/// Read a whole spill at once (see [`SpillLayers`]).
pub fn read_spill(
    data: &[u8],
    cfg: &PmkvqConfig,
    geom: KvGeometry,
    group: usize,
) -> Result<(u64, Vec<SpilledLayer>), KvError> {
    let mut r = SpillLayers::new(data, cfg, geom, group)?;
    let mut layers = Vec::with_capacity(geom.layers);
    while let Some(l) = r.next_layer()? {
        layers.push(l);
    }
    let requants = r.requants;
    r.finish()?;
    Ok((requants, layers))
}
