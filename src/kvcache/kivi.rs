//! KIVI baseline (spec §7): keys quantized per channel in blocks of 128 tokens, values per token, the newest
//! `T mod 128` tokens kept at f16, no sink. Decode: when the length including the current token reaches a
//! multiple of 128, the last 128 tokens are quantized *before* attention (the current step already sees them
//! quantized). Prefill: full-precision attention, then every complete block is quantized.

use super::attention::{attn_kernels, softmax_in_place};
use super::quant::{Bits, OffsetMode, PackedRows};
use super::{check_append, check_inputs, KvError, KvGeometry, KvStore};
use crate::cpu::kernels;
use half::f16;

/// Tokens per key block (KIVI's residual length).
pub const KIVI_BLOCK: usize = 128;

struct Layer {
    /// Per block, per KV head: rows = channels, "elements" = the block's 128 tokens.
    k_blocks: Vec<Vec<PackedRows>>,
    v: PackedRows,
    /// Not yet quantized, token-major `[token][kv_dim]`.
    k_res: Vec<f16>,
    v_res: Vec<f16>,
}

pub struct KiviStore {
    geom: KvGeometry,
    bits: Bits,
    layers: Vec<Layer>,
    max_tokens: usize,
}

impl KiviStore {
    pub fn new(geom: KvGeometry, bits: Bits, max_tokens: usize) -> Self {
        let layers = (0..geom.layers)
            .map(|_| Layer {
                k_blocks: Vec::new(),
                v: PackedRows::new(bits, geom.head_dim, geom.kv_heads, geom.head_dim, OffsetMode::Stored),
                k_res: Vec::new(),
                v_res: Vec::new(),
            })
            .collect();
        KiviStore {
            geom,
            bits,
            layers,
            max_tokens,
        }
    }

    fn res_len(&self, l: &Layer) -> usize {
        l.k_res.len() / self.geom.kv_dim()
    }

    /// Quantize the oldest 128 residual tokens of layer `li` into a key block and value rows.
    fn quantize_block(&mut self, li: usize) {
        let (h, d, kv) = (self.geom.kv_heads, self.geom.head_dim, self.geom.kv_dim());
        let bits = self.bits;
        let l = &mut self.layers[li];
        let ks: Vec<f32> = l.k_res.drain(..KIVI_BLOCK * kv).map(|x| x.to_f32()).collect();
        let vs: Vec<f32> = l.v_res.drain(..KIVI_BLOCK * kv).map(|x| x.to_f32()).collect();
        let mut block = Vec::with_capacity(h);
        for head in 0..h {
            // one row per channel holding that channel's 128 values
            let mut rows = PackedRows::new(bits, KIVI_BLOCK, 1, KIVI_BLOCK, OffsetMode::Stored);
            let mut col = vec![0f32; KIVI_BLOCK];
            for c in 0..d {
                for (t, x) in col.iter_mut().enumerate() {
                    *x = ks[t * kv + head * d + c];
                }
                rows.push_token(&col);
            }
            block.push(rows);
        }
        l.k_blocks.push(block);
        for t in vs.chunks_exact(kv) {
            l.v.push_token(t);
        }
    }
}

impl KvStore for KiviStore {
    fn geometry(&self) -> KvGeometry {
        self.geom
    }

    fn len(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .map_or(0, |l| l.k_blocks.len() * KIVI_BLOCK + self.res_len(l))
    }

    fn attend_and_store(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), KvError> {
        let g = self.geom;
        check_inputs(&g, layer, q, k, v, n, out)?;
        let (d, kv, qh, group) = (g.head_dim, g.kv_dim(), g.q_heads, g.group());
        let scale = 1.0 / (d as f32).sqrt();
        // decode step that completes a block: quantize it first, the current token included
        let decode_flush = n == 1 && (self.len(layer) + 1).is_multiple_of(KIVI_BLOCK);
        let raw_new = if decode_flush {
            let l = &mut self.layers[layer];
            l.k_res.extend(k.iter().map(|&x| f16::from_f32(x)));
            l.v_res.extend(v.iter().map(|&x| f16::from_f32(x)));
            self.quantize_block(layer);
            0
        } else {
            n
        };
        let l = &self.layers[layer];
        let (ak, kern) = (attn_kernels(), kernels());
        let n_blocks = l.k_blocks.len();
        let n_res = self.res_len(l);
        let n_quant = n_blocks * KIVI_BLOCK;
        for (idx, o) in out.chunks_mut(d).enumerate() {
            let (i, hq) = (idx / qh, idx % qh);
            let kvh = hq / group;
            let qv = &q[idx * d..(idx + 1) * d];
            let visible_new = if raw_new == 0 { 0 } else { i + 1 };
            let mut p = vec![0.0f32; n_quant + n_res + visible_new];
            for (b, block) in l.k_blocks.iter().enumerate() {
                // scores of the block's tokens: Σ_c q_c·x̂[c][t], i.e. `accumulate` with channels as rows
                let s = &mut p[b * KIVI_BLOCK..(b + 1) * KIVI_BLOCK];
                (ak.accumulate)(&block[kvh], 0, qv, 0, s);
                s.iter_mut().for_each(|x| *x *= scale);
            }
            for t in 0..n_res {
                let kr = &l.k_res[t * kv + kvh * d..t * kv + (kvh + 1) * d];
                p[n_quant + t] = (kern.dot_f16)(kr, qv) * scale;
            }
            for j in 0..visible_new {
                p[n_quant + n_res + j] = (kern.dot_f32)(qv, &k[j * kv + kvh * d..j * kv + (kvh + 1) * d]) * scale;
            }
            softmax_in_place(&mut p);
            o.fill(0.0);
            (ak.accumulate)(&l.v, kvh, &p[..n_quant], 0, o);
            for t in 0..n_res {
                (kern.axpy_f16)(p[n_quant + t], &l.v_res[t * kv + kvh * d..t * kv + (kvh + 1) * d], o);
            }
            for j in 0..visible_new {
                let w = p[n_quant + n_res + j];
                for (a, x) in o.iter_mut().zip(&v[j * kv + kvh * d..j * kv + (kvh + 1) * d]) {
                    *a += w * x;
                }
            }
        }
        if raw_new > 0 {
            let l = &mut self.layers[layer];
            l.k_res.extend(k.iter().map(|&x| f16::from_f32(x)));
            l.v_res.extend(v.iter().map(|&x| f16::from_f32(x)));
            while self.res_len(&self.layers[layer]) >= KIVI_BLOCK {
                self.quantize_block(layer);
            }
        }
        Ok(())
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError> {
        check_append(&self.geom, layer, k, v, n)?;
        let l = &mut self.layers[layer];
        l.k_res.extend(k.iter().map(|&x| f16::from_f32(x)));
        l.v_res.extend(v.iter().map(|&x| f16::from_f32(x)));
        while self.res_len(&self.layers[layer]) >= KIVI_BLOCK {
            self.quantize_block(layer);
        }
        Ok(())
    }

    fn reserve(&mut self, n: usize) -> Result<(), KvError> {
        let stored = self.len(0);
        if stored + n > self.max_tokens {
            return Err(KvError::CapacityExceeded {
                layer: 0,
                stored: stored + n,
                limit: self.max_tokens,
            });
        }
        Ok(())
    }

    fn clear(&mut self) {
        self.truncate(0);
    }

    fn truncate(&mut self, tokens: usize) {
        let kv = self.geom.kv_dim();
        for l in &mut self.layers {
            let quant = l.k_blocks.len() * KIVI_BLOCK;
            if tokens < quant {
                // blocks cannot be split: drop whole blocks past the cut
                l.k_blocks.truncate(tokens / KIVI_BLOCK);
                l.v.truncate(tokens / KIVI_BLOCK * KIVI_BLOCK);
                l.k_res.clear();
                l.v_res.clear();
            } else {
                l.k_res.truncate((tokens - quant) * kv);
                l.v_res.truncate((tokens - quant) * kv);
            }
        }
    }

    fn true_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.k_blocks.iter().flatten().map(PackedRows::true_bytes).sum::<usize>()
                    + l.v.true_bytes()
                    + 2 * (l.k_res.len() + l.v_res.len())
            })
            .sum()
    }

    fn payload_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.k_blocks
                    .iter()
                    .flatten()
                    .map(PackedRows::payload_bytes)
                    .sum::<usize>()
                    + l.v.payload_bytes()
                    + 2 * (l.k_res.len() + l.v_res.len())
            })
            .sum()
    }

    fn layer_bits(&self) -> Vec<u32> {
        vec![self.bits.count(); self.geom.layers]
    }

    fn method(&self) -> String {
        format!("kivi:{}", self.bits.count())
    }

    fn spill_to(&self, out: &mut dyn std::io::Write) -> Result<(), KvError> {
        let mut w = super::spill::Writer::new(out, "kivi");
        w.u64(self.bits.count() as u64);
        for l in &self.layers {
            w.u64(l.k_blocks.len() as u64);
            for rows in l.k_blocks.iter().flatten() {
                w.rows(rows);
            }
            w.rows(&l.v);
            w.f16s(&l.k_res);
            w.f16s(&l.v_res);
        }
        w.finish()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), KvError> {
        let corrupt = |what: &str| KvError::Corrupt(what.to_string());
        let mut r = super::spill::Reader::new(data, "kivi")?;
        if r.u64()? != self.bits.count() as u64 {
            return Err(corrupt("written by a cache of another bit-width"));
        }
        let (h, d, kv) = (self.geom.kv_heads, self.geom.head_dim, self.geom.kv_dim());
        let key_rows = PackedRows::new(self.bits, KIVI_BLOCK, 1, KIVI_BLOCK, OffsetMode::Stored);
        let mut layers = Vec::with_capacity(self.geom.layers);
        let mut tokens = None;
        for _ in 0..self.geom.layers {
            let blocks = r.u64()? as usize;
            if blocks > self.max_tokens / KIVI_BLOCK {
                return Err(corrupt("more key blocks than the cache holds"));
            }
            let mut k_blocks = Vec::with_capacity(blocks);
            for _ in 0..blocks {
                let block = (0..h).map(|_| r.rows(&key_rows)).collect::<Result<Vec<_>, _>>()?;
                // one row per channel, every row one block of tokens
                if block.iter().any(|b| b.bits != self.bits || b.len() != d) {
                    return Err(corrupt("a key block of the wrong shape"));
                }
                k_blocks.push(block);
            }
            let v = r.rows(&self.layers[0].v)?;
            let (k_res, v_res) = (r.f16s()?, r.f16s()?);
            let res = k_res.len() / kv;
            if v.bits != self.bits
                || v.len() != blocks * KIVI_BLOCK
                || k_res.len() != v_res.len()
                || !k_res.len().is_multiple_of(kv)
                || res >= KIVI_BLOCK
            {
                return Err(corrupt("values or residual tokens of the wrong length"));
            }
            let n = blocks * KIVI_BLOCK + res;
            if *tokens.get_or_insert(n) != n || n > self.max_tokens {
                return Err(corrupt("layers hold different token counts, or more than the cache"));
            }
            layers.push(Layer {
                k_blocks,
                v,
                k_res,
                v_res,
            });
        }
        r.finish()?;
        self.layers = layers;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvcache::F16KvStore;

    #[test]
    fn spill_and_restore_are_bit_exact_and_a_damaged_spill_is_refused() {
        let g = KvGeometry {
            layers: 2,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 32,
        };
        let mut s = KiviStore::new(g, Bits::B2, 1024);
        let x = vals(300 * g.kv_dim(), 7);
        for l in 0..2 {
            s.append(l, &x, &x, 300).unwrap();
        }
        let data = s.spill().unwrap();
        let mut r = KiviStore::new(g, Bits::B2, 1024);
        r.restore(&data).unwrap();
        assert_eq!(r.len(0), 300);
        assert_eq!(r.true_bytes(), s.true_bytes());
        assert_eq!(r.spill().unwrap(), data);
        let q = vals(g.q_dim(), 9);
        let (mut a, mut b) = (vec![0f32; g.q_dim()], vec![0f32; g.q_dim()]);
        let k = vals(g.kv_dim(), 11);
        s.attend_and_store(1, &q, &k, &k, 1, &mut a).unwrap();
        r.attend_and_store(1, &q, &k, &k, 1, &mut b).unwrap();
        assert_eq!(a, b, "the restored cache attends exactly as the original");
        for bad in [&data[..data.len() - 5], &data[..40]] {
            let mut f = KiviStore::new(g, Bits::B2, 1024);
            assert!(f.restore(bad).is_err());
            assert_eq!(f.len(0), 0, "a failed restore leaves the store empty");
        }
        assert!(
            KiviStore::new(g, Bits::B4, 1024).restore(&data).is_err(),
            "another width"
        );
        assert!(
            KiviStore::new(g, Bits::B2, 200).restore(&data).is_err(),
            "more than it holds"
        );
    }

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 40503) % 2000) as f32 / 1000.0) - 1.0)
            .collect()
    }

    #[test]
    fn blocks_form_every_128_tokens_and_a_completing_decode_step_sees_them_quantized() {
        let g = KvGeometry {
            layers: 1,
            q_heads: 2,
            kv_heads: 1,
            head_dim: 64,
        };
        let mut s = KiviStore::new(g, Bits::B8, 1024);
        let mut f = F16KvStore::new(g, 1024);
        // prefill of 200: one block, 72 residual
        let (k, v, q) = (vals(200 * 64, 1), vals(200 * 64, 2), vals(200 * 128, 3));
        let (mut o1, mut o2) = (vec![0f32; 200 * 128], vec![0f32; 200 * 128]);
        s.attend_and_store(0, &q, &k, &v, 200, &mut o1).unwrap();
        f.attend_and_store(0, &q, &k, &v, 200, &mut o2).unwrap();
        assert_eq!((s.layers[0].k_blocks.len(), s.res_len(&s.layers[0])), (1, 72));
        // prefill attends in full precision: equal to the f16 cache up to f16 rounding
        for (a, b) in o1.iter().zip(&o2) {
            assert!((a - b).abs() < 2e-3, "{a} vs {b}");
        }
        // decode to 255 tokens: still one block; the step that makes 256 quantizes the second block first
        for t in 200..256 {
            let (k, v, q) = (
                vals(64, 10 + t as u64),
                vals(64, 500 + t as u64),
                vals(128, 900 + t as u64),
            );
            let (mut a, mut b) = (vec![0f32; 128], vec![0f32; 128]);
            s.attend_and_store(0, &q, &k, &v, 1, &mut a).unwrap();
            f.attend_and_store(0, &q, &k, &v, 1, &mut b).unwrap();
            let want_blocks = if t + 1 == 256 { 2 } else { 1 };
            assert_eq!(s.layers[0].k_blocks.len(), want_blocks, "after token {t}");
            // 8-bit per-channel keys and per-token values stay close to f16
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 0.05, "token {t}: {x} vs {y}");
            }
        }
        assert_eq!(s.len(0), 256);
        assert_eq!(s.res_len(&s.layers[0]), 0);
        s.truncate(130);
        assert_eq!(s.len(0), 128, "a cut inside a block drops to the block boundary");
    }
}
