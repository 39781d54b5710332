//! How the engine thread ends: normally (the drain's last flush), or on a fault. A panic inside a step is
//! contained to that step's sequences; one the engine cannot contain ends every stream with `error` and publishes
//! why, so the daemon reports NOT_SERVING and exits non-zero. Either way the intake is closed first, so no request
//! sent to the engine is left without an answer, and `stopped` is published however the thread ends.

use super::{fail_admission, Command, Engine, EngineStatus, FinishReason, Ordering, FINAL_FLUSH, PAUSED_POLL};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// Publishes `stopped` however the engine thread ends (a panic included), so waiters never hang.
pub(super) struct StoppedGuard(pub(super) watch::Sender<Arc<EngineStatus>>);

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        self.0.send_modify(|s| {
            let mut n = (**s).clone();
            n.stopped = true;
            n.sequences.clear();
            n.kv_true_bytes = 0;
            *s = Arc::new(n);
        });
    }
}

impl Engine {
    /// End every sequence of the step that panicked with `error` (their caches may be half-written), keep the
    /// rest.
    pub(super) fn contain_step_panic(&mut self, what: &str) {
        tracing::error!(error = %what, sequences = self.in_step.len(), "a step panicked; its sequences end with an error");
        for i in std::mem::take(&mut self.in_step) {
            if let Some(s) = self.running.get_mut(i) {
                s.finish(
                    FinishReason::Error,
                    Some(format!("internal error in this step: {what}")),
                );
            }
        }
        self.retire();
    }

    /// The engine cannot go on: end every stream with `error`, stop taking requests, publish why.
    pub(super) fn give_up(&mut self, why: &str) {
        tracing::error!(error = %why, "the engine failed and stops");
        let msg = format!("the engine failed: {why}");
        for s in self.running.iter_mut().chain(self.spilled.iter_mut()) {
            s.finish(FinishReason::Error, Some(msg.clone()));
        }
        for a in self.waiting.drain(..) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            fail_admission(a, msg.clone());
        }
        self.retire();
        for s in self.spilled.drain(..) {
            if !s.drained() {
                self.closing.push(s);
            }
        }
        self.close_intake();
        self.snapshot.failure = Some(why.to_string());
        self.final_flush();
    }

    /// Stop taking requests: close the gate `submit` sends under, then answer what was sent before it closed
    /// (cancelled, as queued requests are at the end of a drain), so every accepted stream gets its last message.
    pub(super) fn close_intake(&mut self) {
        *self
            .intake_closed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        while let Ok(c) = self.rx.try_recv() {
            if let Command::Submit(a) = c {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                a.finish_queued(FinishReason::Cancelled);
                self.snapshot.completed += 1;
                self.snapshot.count_finish(FinishReason::Cancelled.as_str());
            }
        }
    }

    /// Give finished streams a last moment to take their final message (after publishing the state without them).
    pub(super) fn final_flush(&mut self) {
        self.publish();
        let until = Instant::now() + FINAL_FLUSH;
        while !self.closing.is_empty() && Instant::now() < until {
            for s in &mut self.closing {
                s.flush();
            }
            self.closing.retain(|s| !s.drained());
            std::thread::sleep(PAUSED_POLL);
        }
        self.publish();
    }
}
