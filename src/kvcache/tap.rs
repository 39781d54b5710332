//! `Tapped`: a store wrapped with a transformation of what reaches it (queries, keys, values), with every
//! other `KvStore` call delegated once here. Key reparameterization and the calibration stores are taps.

use super::{KvError, KvGeometry, KvStore};

/// What a wrapper changes or observes. `None` means "pass through unchanged"; layers out of range pass through
/// (the inner store reports them).
pub trait KvTap: Send {
    fn query(&self, layer: usize, g: &KvGeometry, q: &[f32]) -> Option<Vec<f32>> {
        let _ = (layer, g, q);
        None
    }
    fn key(&mut self, layer: usize, g: &KvGeometry, k: &[f32]) -> Option<Vec<f32>> {
        let _ = (layer, g, k);
        None
    }
    fn value(&mut self, layer: usize, g: &KvGeometry, v: &[f32]) -> Option<Vec<f32>> {
        let _ = (layer, g, v);
        None
    }
}

pub struct Tapped<T: KvTap> {
    inner: Box<dyn KvStore>,
    pub tap: T,
    label: String,
}

impl<T: KvTap> Tapped<T> {
    /// `suffix` is appended to the inner store's method name.
    pub fn wrap(inner: Box<dyn KvStore>, tap: T, suffix: &str) -> Self {
        let label = format!("{}{}", inner.method(), suffix);
        Tapped { inner, tap, label }
    }
}

impl<T: KvTap> KvStore for Tapped<T> {
    fn geometry(&self) -> KvGeometry {
        self.inner.geometry()
    }
    fn len(&self, layer: usize) -> usize {
        self.inner.len(layer)
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
        let g = self.inner.geometry();
        let q2 = self.tap.query(layer, &g, q);
        let k2 = self.tap.key(layer, &g, k);
        let v2 = self.tap.value(layer, &g, v);
        self.inner.attend_and_store(
            layer,
            q2.as_deref().unwrap_or(q),
            k2.as_deref().unwrap_or(k),
            v2.as_deref().unwrap_or(v),
            n,
            out,
        )
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError> {
        let g = self.inner.geometry();
        let k2 = self.tap.key(layer, &g, k);
        let v2 = self.tap.value(layer, &g, v);
        self.inner
            .append(layer, k2.as_deref().unwrap_or(k), v2.as_deref().unwrap_or(v), n)
    }
    fn clear(&mut self) {
        self.inner.clear()
    }
    fn truncate(&mut self, tokens: usize) {
        self.inner.truncate(tokens)
    }
    fn true_bytes(&self) -> usize {
        self.inner.true_bytes()
    }
    fn payload_bytes(&self) -> usize {
        self.inner.payload_bytes()
    }
    fn reserve(&mut self, n: usize) -> Result<(), KvError> {
        self.inner.reserve(n)
    }
    fn layer_bits(&self) -> Vec<u32> {
        self.inner.layer_bits()
    }
    fn set_layer_budgets(&mut self, budgets: &[usize]) -> Result<(), KvError> {
        self.inner.set_layer_budgets(budgets)
    }
    fn floor_bytes(&self, ahead: usize) -> usize {
        self.inner.floor_bytes(ahead)
    }
    fn set_total_budget(&mut self, total: usize, shares: Option<&[f64]>, ahead: usize) -> Result<(), KvError> {
        self.inner.set_total_budget(total, shares, ahead)
    }
    fn spill_to(&self, out: &mut dyn std::io::Write) -> Result<(), KvError> {
        self.inner.spill_to(out)
    }
    fn restore(&mut self, data: &[u8]) -> Result<(), KvError> {
        self.inner.restore(data)
    }
    fn restore_within(
        &mut self,
        data: &[u8],
        total: usize,
        shares: Option<&[f64]>,
        ahead: usize,
    ) -> Result<(), KvError> {
        self.inner.restore_within(data, total, shares, ahead)
    }
    fn requantizations(&self) -> u64 {
        self.inner.requantizations()
    }
    fn method(&self) -> String {
        self.label.clone()
    }
}
