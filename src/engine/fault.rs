//! A fault injector for tests: the engine calls it at fixed points with the request id it is working on, and
//! panics where it says so (a hook may also sleep before answering, to widen a race window). Off (`None`) in every configuration a file, the environment or argv can express;
//! only code that builds a `Config` (the integration tests) can set one. It exists so that panic containment is
//! tested against real panics in the real loop.

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
    /// On the engine thread, right after it left its loop (id `""`). A hook that sleeps here widens the
    /// window in which a submission can race the engine's exit.
    EngineExit,
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

/// The message of a caught panic.
pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
