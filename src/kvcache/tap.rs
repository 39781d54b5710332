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
    /// Map the attention output back (in place) after the inner store computed it from the tapped inputs.
    fn output(&self, layer: usize, g: &KvGeometry, out: &mut [f32]) {
        let _ = (layer, g, out);
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
        )?;
        self.tap.output(layer, &g, out);
        Ok(())
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError> {
        let g = self.inner.geometry();
        let k2 = self.tap.key(layer, &g, k);
        let v2 = self.tap.value(layer, &g, v);
        self.inner
            .append(layer, k2.as_deref().unwrap_or(k), v2.as_deref().unwrap_or(v), n)
    }
    fn method(&self) -> String {
        self.label.clone()
    }
    super::forward_kv_store!(self => self.inner);
}
