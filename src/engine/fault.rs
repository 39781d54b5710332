//! A fault injector for tests: the engine calls it at fixed points with the request id it is working on, and
//! panics where it says so (at [`FaultPoint::StoreError`] a sequence's cache returns an error instead; a hook
//! may also sleep before answering, to widen a race window). Off (`None`) in every configuration a file, the
//! environment or argv can express; only code that builds a `Config` (the integration tests) can set one. It
//! exists so that fault containment is tested against real panics and errors in the real loop.

use crate::kvcache::{KvError, KvStore};
use std::sync::Arc;

/// Where the engine asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// The warm-up forward pass, before the engine reports ready (id `""`).
    WarmUp,
    /// Inside a batched step, once per sequence in the batch, before the forward pass.
    Step,
    /// Between steps, once per running sequence (outside any step: the engine cannot contain it).
    Housekeeping,
    /// In `EngineHandle::submit`, after the request passed the draining check and before it is sent.
    Submit,
    /// Inside the forward pass, when a sequence's cache takes the middle layer's new tokens: answering true makes
    /// that cache fail with an error (not a panic), half-way through the layers of a batched step.
    StoreError,
    /// On the engine thread, right after it left its loop (id `""`). A hook that sleeps here widens the
    /// window in which a submission can race the engine's exit.
    EngineExit,
    /// On the engine thread, before it publishes its status (id `""`). A hook that sleeps here widens the window
    /// between a step and the status that reports it.
    Publish,
}

/// Answers whether to panic at a point for a request id.
pub type FaultFn = dyn Fn(FaultPoint, &str) -> bool + Send + Sync;

#[derive(Clone)]
pub struct FaultHook(pub Arc<FaultFn>);

impl std::fmt::Debug for FaultHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultHook")
    }
}

/// Panic if `hook` asks for a fault at `at` for `id`.
pub fn check(hook: &Option<FaultHook>, at: FaultPoint, id: &str) {
    if let Some(h) = hook {
        if (h.0)(at, id) {
            panic!("fault injected at {at:?} for request `{id}`");
        }
    }
}

/// With a hook, `kv` wrapped so that the hook can fail it at [`FaultPoint::StoreError`]; without one, `kv`.
pub(super) fn wrap_store(hook: &Option<FaultHook>, kv: Box<dyn KvStore>, id: &str) -> Box<dyn KvStore> {
    match hook {
        None => kv,
        Some(h) => Box::new(FaultyStore {
            inner: kv,
            hook: h.clone(),
            id: id.to_string(),
        }),
    }
}

/// A cache that fails when the hook says so (tests only: a per-sequence error in the middle of a real step).
struct FaultyStore {
    inner: Box<dyn KvStore>,
    hook: FaultHook,
    id: String,
}

impl KvStore for FaultyStore {
    fn attend_and_store(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), KvError> {
        if layer == self.inner.geometry().layers / 2 && (self.hook.0)(FaultPoint::StoreError, &self.id) {
            return Err(KvError::Corrupt(format!("fault injected in layer {layer}")));
        }
        self.inner.attend_and_store(layer, q, k, v, n, out)
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError> {
        self.inner.append(layer, k, v, n)
    }
    fn method(&self) -> String {
        self.inner.method()
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        self.inner.as_any_mut()
    }
    crate::kvcache::forward_kv_store!(self => self.inner);
}
