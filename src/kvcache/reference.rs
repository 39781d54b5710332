//! The reference stores: every token's K and V at f16, as llama.cpp's default cache keeps them (the parity
//! reference), or at f32 (no rounding at all: the baseline for calibration and exactness tests).

use super::attention::group::{attend_layer, F16Rows, GroupOps, Heads};
use super::attention::softmax_in_place;
use super::{check_append, check_inputs, KvError, KvGeometry, KvStore};
use crate::cpu::{kernels, Kernels};
use half::f16;
use rayon::prelude::*;

/// An element type of a reference store.
pub trait RefElem: Copy + Send + Sync + 'static {
    const NAME: &'static str;
    fn from_f32(x: f32) -> Self;
    /// Exact (`from_f32(to_f32(x)) == x`).
    fn to_f32(self) -> f32;
    /// What storing a value does to it (f16: rounding; f32: nothing). Queries and probabilities get the same
    /// treatment, as llama.cpp's f16 path converts them to the cache's type.
    fn round(x: f32) -> f32;
    fn dot(k: &Kernels, row: &[Self], q: &[f32]) -> f32;
    fn axpy(k: &Kernels, w: f32, row: &[Self], acc: &mut [f32]);
    /// The values as f16, when they are (the grouped, split attention path reads those).
    fn as_f16(values: &[Self]) -> Option<&[f16]>;
}

impl RefElem for f16 {
    const NAME: &'static str = "fp16";
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn round(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }
    fn dot(k: &Kernels, row: &[Self], q: &[f32]) -> f32 {
        (k.dot_f16)(row, q)
    }
    fn axpy(k: &Kernels, w: f32, row: &[Self], acc: &mut [f32]) {
        (k.axpy_f16)(w, row, acc)
    }
    fn as_f16(values: &[Self]) -> Option<&[f16]> {
        Some(values)
    }
}

impl RefElem for f32 {
    const NAME: &'static str = "fp32";
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn round(x: f32) -> f32 {
        x
    }
    fn dot(k: &Kernels, row: &[Self], q: &[f32]) -> f32 {
        (k.dot_f32)(row, q)
    }
    fn axpy(_: &Kernels, w: f32, row: &[Self], acc: &mut [f32]) {
        for (a, x) in acc.iter_mut().zip(row) {
            *a += w * x;
        }
    }
    fn as_f16(_: &[Self]) -> Option<&[f16]> {
        None
    }
}

pub struct RefKvStore<T: RefElem> {
    geom: KvGeometry,
    /// Per layer, token-major: `[token][kv_head][d]`.
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
    max_tokens: usize,
}

/// llama.cpp's default cache.
pub type F16KvStore = RefKvStore<f16>;
/// Full precision.
pub type F32KvStore = RefKvStore<f32>;

/// Below this many score multiply-adds per call, heads run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 15;

impl<T: RefElem> RefKvStore<T> {
    pub fn new(geom: KvGeometry, max_tokens: usize) -> Self {
        RefKvStore {
            geom,
            k: vec![Vec::new(); geom.layers],
            v: vec![Vec::new(); geom.layers],
            max_tokens,
        }
    }
}

impl<T: RefElem> KvStore for RefKvStore<T> {
    fn geometry(&self) -> KvGeometry {
        self.geom
    }

    fn len(&self, layer: usize) -> usize {
        self.k.get(layer).map_or(0, |k| k.len() / self.geom.kv_dim())
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
        let stored = self.len(layer);
        if stored + n > self.max_tokens {
            return Err(KvError::CapacityExceeded {
                layer,
                stored: stored + n,
                limit: self.max_tokens,
            });
        }
        let (d, kv_dim, qh, group) = (g.head_dim, g.kv_dim(), g.q_heads, g.group());
        let scale = 1.0 / (d as f32).sqrt();
        // llama.cpp writes the batch's K/V into its f16 cache before attention reads it back; doing the same
        // keeps our f16 reference bit-compatible with the peer's numerics.
        self.k[layer].extend(k.iter().map(|&x| T::from_f32(x)));
        self.v[layer].extend(v.iter().map(|&x| T::from_f32(x)));
        let (ks, vs) = (&self.k[layer], &self.v[layer]);
        if let (Some(kf), Some(vf)) = (T::as_f16(ks), T::as_f16(vs)) {
            // f16: the query heads of a KV head together, split over the pool (flash decoding); Q rounded to f16
            // as llama.cpp's f16 path does, probabilities kept in f32 as its flash attention does
            let qr: Vec<f32> = q[..n * qh * d].iter().map(|&x| T::round(x)).collect();
            let rows = |data| F16Rows {
                data,
                kv_heads: g.kv_heads,
                d,
            };
            let (kr, vr) = (rows(kf), rows(vf));
            let heads = Heads {
                q_heads: qh,
                kv_heads: g.kv_heads,
                d,
            };
            attend_layer(
                GroupOps::detected(),
                &[&kr],
                &[&vr],
                heads,
                &qr,
                n,
                |i| (stored + i + 1, None),
                out,
            );
            return Ok(());
        }
        let kern = kernels();
        let head = |(idx, o): (usize, &mut [f32])| {
            let (i, h) = (idx / qh, idx % qh);
            let kvh = h / group;
            // llama.cpp converts Q to the cache's f16 for the K·Q product, and the probabilities to f16 for P·V.
            let qv: Vec<f32> = q[idx * d..(idx + 1) * d].iter().map(|&x| T::round(x)).collect();
            let n_ctx = stored + i + 1;
            let mut scores = vec![0.0f32; n_ctx];
            for (t, s) in scores.iter_mut().enumerate() {
                let off = t * kv_dim + kvh * d;
                *s = T::dot(kern, &ks[off..off + d], &qv) * scale;
            }
            softmax_in_place(&mut scores);
            o.fill(0.0);
            for (t, &p) in scores.iter().enumerate() {
                let off = t * kv_dim + kvh * d;
                T::axpy(kern, T::round(p), &vs[off..off + d], o);
            }
        };
        if rayon::current_num_threads() > 1 && n * qh * (stored + n) * d >= PARALLEL_MIN_MACS {
            out.par_chunks_mut(d).enumerate().for_each(head);
        } else {
            out.chunks_mut(d).enumerate().for_each(head);
        }
        Ok(())
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError> {
        check_append(&self.geom, layer, k, v, n)?;
        self.k[layer].extend(k.iter().map(|&x| T::from_f32(x)));
        self.v[layer].extend(v.iter().map(|&x| T::from_f32(x)));
        Ok(())
    }

    fn clear(&mut self) {
        for l in 0..self.geom.layers {
            self.k[l].clear();
            self.v[l].clear();
        }
    }

    fn truncate(&mut self, tokens: usize) {
        let keep = tokens * self.geom.kv_dim();
        for l in 0..self.geom.layers {
            self.k[l].truncate(keep);
            self.v[l].truncate(keep);
        }
    }

    fn true_bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .map(|l| l.len() * std::mem::size_of::<T>())
            .sum()
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

    fn method(&self) -> String {
        T::NAME.into()
    }

    fn floor_bytes(&self, ahead: usize) -> usize {
        self.true_bytes() + ahead * 2 * self.geom.kv_dim() * std::mem::size_of::<T>() * self.geom.layers
    }

    fn spill_to(&self, out: &mut dyn std::io::Write) -> Result<(), KvError> {
        let mut w = super::spill::Writer::new(out, T::NAME);
        for side in [&self.k, &self.v] {
            for layer in side {
                w.f32s(&layer.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
            }
        }
        w.finish()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), KvError> {
        let mut r = super::spill::Reader::new(data, T::NAME)?;
        let layers = self.geom.layers;
        let mut sides = Vec::with_capacity(2);
        for _ in 0..2 {
            let mut side = Vec::with_capacity(layers);
            for _ in 0..layers {
                side.push(r.f32s()?.into_iter().map(T::from_f32).collect::<Vec<T>>());
            }
            sides.push(side);
        }
        r.finish()?;
        let lens: Vec<usize> = sides.iter().flatten().map(Vec::len).collect();
        if lens.iter().any(|&l| l != lens[0] || l % self.geom.kv_dim() != 0) {
            return Err(KvError::Corrupt("layers hold different token counts".into()));
        }
        self.v = sides.pop().unwrap_or_default();
        self.k = sides.pop().unwrap_or_default();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain f64 causal attention with llama.cpp's f16 roundings (K, V, Q and the probabilities), the definition
    /// the store must meet.
    fn naive(g: KvGeometry, qs: &[f32], ks: &[f32], vs: &[f32], t: usize) -> Vec<f32> {
        let (d, kv) = (g.head_dim, g.kv_dim());
        let r = |x: f32| f16::from_f32(x).to_f32() as f64;
        let mut out = vec![0.0f32; t * g.q_dim()];
        for i in 0..t {
            for h in 0..g.q_heads {
                let kvh = h / g.group();
                let q = &qs[(i * g.q_heads + h) * d..][..d];
                let s: Vec<f64> = (0..=i)
                    .map(|j| (0..d).map(|c| q[c] as f64 * r(ks[j * kv + kvh * d + c])).sum::<f64>() / (d as f64).sqrt())
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for c in 0..d {
                    let acc: f64 = (0..=i)
                        .map(|j| (s[j] - m).exp() / z * r(vs[j * kv + kvh * d + c]))
                        .sum();
                    out[(i * g.q_heads + h) * d + c] = acc as f32;
                }
            }
        }
        out
    }

    #[test]
    fn chunked_calls_equal_one_causal_attention() {
        let g = KvGeometry {
            layers: 1,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let t = 9;
        let mut seed = 3u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let q: Vec<f32> = (0..t * g.q_dim()).map(|_| rnd()).collect();
        let k: Vec<f32> = (0..t * g.kv_dim()).map(|_| f16::from_f32(rnd()).to_f32()).collect();
        let v: Vec<f32> = (0..t * g.kv_dim()).map(|_| f16::from_f32(rnd()).to_f32()).collect();
        let want = naive(g, &q, &k, &v, t);
        let mut store = F16KvStore::new(g, 64);
        let mut got = vec![0.0f32; t * g.q_dim()];
        let mut start = 0;
        for n in [4usize, 1, 3, 1] {
            let (qd, kd) = (g.q_dim(), g.kv_dim());
            store
                .attend_and_store(
                    0,
                    &q[start * qd..(start + n) * qd],
                    &k[start * kd..(start + n) * kd],
                    &v[start * kd..(start + n) * kd],
                    n,
                    &mut got[start * qd..(start + n) * qd],
                )
                .unwrap();
            start += n;
        }
        assert_eq!(store.len(0), t);
        // f32 vs f64 softmax may round a probability to the neighbouring f16 value: ≤ 2^-11 relative.
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 5e-4, "{a} vs {b}");
        }
        assert_eq!(store.true_bytes(), 2 * t * g.kv_dim() * 2);
        let err = store.attend_and_store(0, &q[..g.q_dim()], &k[..1], &v[..1], 1, &mut got[..g.q_dim()]);
        assert!(matches!(err, Err(KvError::BadShape { .. })));
    }

    #[test]
    fn f16_spill_round_trips_exactly() {
        let g = KvGeometry {
            layers: 2,
            q_heads: 2,
            kv_heads: 1,
            head_dim: 8,
        };
        let mut a = F16KvStore::new(g, 100);
        let x: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        for l in 0..2 {
            a.append(l, &x, &x, 5).unwrap();
        }
        let data = a.spill().unwrap();
        let mut b = F16KvStore::new(g, 100);
        b.restore(&data).unwrap();
        assert_eq!(b.spill().unwrap(), data);
        assert_eq!((b.len(0), b.true_bytes()), (5, a.true_bytes()));
        assert_eq!(b.floor_bytes(3), a.true_bytes() + 3 * 2 * 8 * 2 * 2);
        assert!(
            F32KvStore::new(g, 100).restore(&data).is_err(),
            "another element type is refused"
        );
    }
}
