//! The recent window: storing tokens into sink, window and body in chunks (spec §3.4), and sizing the window
//! for a budget ([`PmkvqConfig::window_share`]).

use super::{PmkvqConfig, PmkvqStore, Quantizer, Side};
use crate::kvcache::quant::{Bits, PackedRows, ShiftMode};
use crate::kvcache::KvGeometry;

impl Side {
    /// Lower tokens leaving the window (oldest first) to the body's width and append them to it: a
    /// chunk flush, and the elastic window yielding.
    pub(super) fn flush_into_body(&mut self, mut chunk: PackedRows, shift: ShiftMode) {
        chunk.shrink_to(self.body.bits, shift);
        self.body.append(&mut chunk);
    }

    /// Bring the window to `cfg`'s width and size: a narrower width lowers its tokens (ERS) and any wider body
    /// with them (a body is never wider than the window that flushes into it); an empty window takes the width
    /// as it is. Then the oldest whole chunks of a window that holds `cfg.window` tokens or more go to the body,
    /// as storing would have flushed them under a window of that size. Never raises the bytes. Returns the
    /// levels the body was lowered by.
    pub(super) fn fit_window(&mut self, cfg: &PmkvqConfig) -> usize {
        let mut levels = 0;
        if self.window.bits != cfg.window_bits {
            if self.window.is_empty() {
                self.window = self.window.empty_like(cfg.window_bits);
            } else {
                self.window.shrink_to(cfg.window_bits, cfg.shift);
            }
            if self.body.bits > cfg.window_bits {
                levels = self.body.shrink_to(cfg.window_bits, cfg.shift) as usize;
            }
        }
        let (_, keep) = flushed(0, self.window.len(), cfg.window);
        if keep < self.window.len() {
            let rest = self.window.split_off(self.window.len() - keep);
            let oldest = std::mem::replace(&mut self.window, rest);
            self.flush_into_body(oldest, cfg.shift);
        }
        levels
    }

    /// Store `x` (whole tokens of `kv_dim`): the sink fills first, then the window in chunks of `cfg.window`
    /// tokens — the old window plus the first new tokens leave at the window's width and drop to the body's — or,
    /// without a window, the body directly.
    pub(super) fn store(&mut self, cfg: &PmkvqConfig, x: &[f32], kv_dim: usize) {
        let n = x.len() / kv_dim;
        let tok = |i: usize| &x[i * kv_dim..(i + 1) * kv_dim];
        let mut i = 0;
        while self.sink.len() < cfg.sink && i < n {
            self.sink.push_token(tok(i));
            i += 1;
        }
        if i == n {
            return;
        }
        if cfg.window == 0 {
            for j in i..n {
                match cfg.quantizer {
                    Quantizer::Asymmetric => self.body.push_token(tok(j)),
                    Quantizer::LlamaSymmetric => self.body.push_token_symmetric(tok(j)),
                }
            }
            return;
        }
        let w = self.window.len();
        let n_out = (w + n - i) / cfg.window * cfg.window;
        if n_out == 0 {
            for j in i..n {
                self.window.push_token(tok(j));
            }
            return;
        }
        let fresh = self.window.empty_like(cfg.window_bits);
        let mut chunk = std::mem::replace(&mut self.window, fresh);
        // (the window never holds `cfg.window` tokens between calls, so the old window leaves whole)
        let enter = n_out.saturating_sub(w);
        for j in i..i + enter {
            chunk.push_token(tok(j));
        }
        self.flush_into_body(chunk, cfg.shift);
        for j in i + enter..n {
            self.window.push_token(tok(j));
        }
    }
}

impl PmkvqConfig {
    /// [`window_for`](Self::window_for) for a store whose non-empty windows are at `held` bits: a window holding
    /// tokens never widens (ERS only lowers), so above its width it keeps its width and the tokens that pays for.
    pub(super) fn window_within(
        &self,
        geom: KvGeometry,
        total: usize,
        tokens: usize,
        held: Option<Bits>,
    ) -> (usize, Bits) {
        let (w, bits) = self.window_for(geom, total, tokens);
        match held {
            Some(h) if h < bits => (self.window_tokens_at(geom, total, h), h),
            _ => (w, bits),
        }
    }
}

impl PmkvqStore {
    /// Size the window for `total` bytes and `ahead` more tokens ([`PmkvqConfig::window_within`]) and bring every
    /// layer's window to it.
    pub(super) fn fit_window(&mut self, total: usize, ahead: usize) {
        let tokens = self.layers.first().map_or(0, |l| l.k.len()) + ahead;
        let held = self
            .layers
            .iter()
            .any(|l| !l.k.window.is_empty())
            .then_some(self.cfg.window_bits);
        (self.cfg.window, self.cfg.window_bits) = self.base.window_within(self.geom, total, tokens, held);
        let cfg = &self.cfg;
        let levels: usize = self
            .layers
            .iter_mut()
            .map(|l| l.k.fit_window(cfg) + l.v.fit_window(cfg))
            .sum();
        self.requants = self.requants.saturating_add(levels as u64);
    }

    /// The bytes the store is held to: its total, or its layers' budgets together.
    pub(super) fn total_budget(&self) -> usize {
        self.total
            .unwrap_or_else(|| self.layers.iter().fold(0usize, |a, l| a.saturating_add(l.budget)))
    }
}

/// `body` and `win` token counts once the window's whole chunks of `window` tokens have gone to the body, as a
/// store (or a cap) flushes them; without a window every token is in the body.
pub(super) fn flushed(body: usize, win: usize, window: usize) -> (usize, usize) {
    match win.checked_div(window) {
        Some(chunks) => (body + chunks * window, win % window),
        None => (body + win, 0),
    }
}
