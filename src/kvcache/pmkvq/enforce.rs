//! Lowering one layer until it fits its budget (ERS, whole bodies, the wider of K and V first).

use super::{Layer, PmkvqConfig, Seg, LAYER_BOOKKEEPING};
use crate::kvcache::quant::Bits;
use crate::kvcache::{KvError, KvGeometry};

/// The bytes a layer's budget is enforced on: true bytes, or code bytes only under payload accounting.
pub(super) fn charged_bytes(cfg: &PmkvqConfig, l: &Layer) -> usize {
    if cfg.payload_accounting {
        l.k.payload() + l.v.payload()
    } else {
        l.k.bytes() + l.v.bytes() + LAYER_BOOKKEEPING
    }
}

/// What lowering one layer did: levels lowered (K and V together count one per level) and whether it fits.
pub(super) struct Enforced {
    pub levels: u64,
    pub result: Result<(), KvError>,
}

/// Lower layer `li`'s body until the layer fits its budget: straight to the highest width that fits (ERS
/// composes, so one pass over the body however many levels it drops), or to the floor, where a layer that still
/// does not fit is refused.
pub(super) fn enforce_layer(cfg: &PmkvqConfig, geom: KvGeometry, li: usize, l: &mut Layer) -> Enforced {
    // what one token of one side costs in a body at a width, and in the window, as budgets count it
    let per_token = |w: Bits| cfg.charged_token_bytes(geom, Seg::Body(w));
    let per_window_token = cfg.charged_token_bytes(geom, Seg::Window);
    let mut levels = 0u64;
    loop {
        let bytes = charged_bytes(cfg, l);
        if bytes <= l.budget {
            return Enforced { levels, result: Ok(()) };
        }
        let floor = if cfg.adaptive { cfg.floor_bits } else { l.k.body.bits };
        let (kb, vb) = (l.k.body.bits, l.v.body.bits);
        let at_floor = l.k.body.is_empty() || kb.max(vb) <= floor;
        if at_floor && cfg.window_yields() && !l.k.window.is_empty() {
            // the elastic window: the oldest window tokens go to the body, just enough of them at the floor's
            // saving per token (an empty body still at a higher width is lowered by the next round)
            let saving = 2 * per_window_token.saturating_sub(per_token(floor)).max(1);
            let m = (bytes - l.budget).div_ceil(saving).min(l.k.window.len());
            for side in [&mut l.k, &mut l.v] {
                let rest = side.window.split_off(m.min(side.window.len()));
                let oldest = std::mem::replace(&mut side.window, rest);
                side.flush_into_body(oldest, cfg.shift);
            }
            continue;
        }
        if at_floor {
            let result = Err(KvError::OutOfBudget {
                layer: li,
                need: bytes,
                budget: l.budget,
                floor_bits: floor.count(),
            });
            return Enforced { levels, result };
        }
        if kb != vb {
            // a planned layer with K and V apart: the wider body gives way first, one level at a time
            let side = if kb > vb { &mut l.k } else { &mut l.v };
            if let Some(w) = side.body.bits.halved() {
                levels += side.body.shrink_to(w, cfg.shift) as u64;
            }
            continue;
        }
        let body_now = if cfg.payload_accounting {
            l.k.body.payload_bytes() + l.v.body.payload_bytes()
        } else {
            l.k.body.true_bytes() + l.v.body.true_bytes()
        };
        let at = |w: Bits| bytes - body_now + 2 * l.k.body.len() * per_token(w);
        let mut target = floor;
        let mut w = l.k.body.bits.halved();
        while let Some(b) = w.filter(|b| *b >= floor) {
            if at(b) <= l.budget {
                target = b;
                break;
            }
            w = b.halved();
        }
        let n = l.k.body.shrink_to(target, cfg.shift);
        l.v.body.shrink_to(target, cfg.shift);
        levels += n as u64;
    }
}
