//! The engine's memory side, between steps: preempting sequences to disk while the floors do not fit the live
//! budget, choosing which come back, fitting every cache to its share of the budget, and restoring spilled caches
//! into theirs (after the others are fitted, so no instant holds more than the budget).

use super::{budget, Engine, FinishReason, Sequence};
use crate::kvcache::KvError;
use std::cmp::Reverse;

impl Engine {
    /// Bytes `s` needs at its floor to take its next step.
    pub(super) fn floor_of(&self, s: &Sequence<'_>) -> usize {
        match &s.kv {
            Some(k) => k.floor_bytes(s.ahead(self.cfg.prefill_chunk)),
            None if s.restoring() => s.resume_floor,
            None => 0,
        }
    }

    pub(super) fn used_floor(&self) -> usize {
        self.running.iter().map(|s| self.floor_of(s)).sum()
    }

    /// Choose preempted sequences to bring back (highest priority, oldest first) while their floors fit. They
    /// join the running ones with their caches still on disk; [`Engine::apply_budget`] restores each into its
    /// share of the budget, after the others have been fitted to theirs, so no instant holds more than the budget.
    pub(super) fn resume(&mut self) {
        if self.spilled.is_empty() {
            return;
        }
        self.spilled.sort_by_key(|s| (Reverse(s.req.priority), s.arrived()));
        let total = self.budget_bytes();
        let mut used = self.used_floor();
        while let Some(s) = self.spilled.first() {
            if self.batch_slots_used() >= self.cfg.max_running || !budget::fits(used, s.resume_floor, total) {
                break;
            }
            let s = self.spilled.remove(0);
            used += s.resume_floor;
            self.running.push(s);
        }
        self.running.sort_by_key(|s| s.arrived());
    }

    /// Restore `running[i]`'s spilled cache within `alloc` bytes (at a width that fits).
    fn restore(&mut self, i: usize, alloc: usize) {
        let chunk = self.cfg.prefill_chunk;
        let geom = self.model.kv_geometry();
        let s = &mut self.running[i];
        let Some(file) = s.spill.take() else { return };
        let ahead = s.ahead(chunk);
        let restored = self.compute.new_store(&s.req.kv, geom, s.max_len).and_then(|mut st| {
            // the file's length and checksum are verified before a byte of it is restored
            let map = file.map()?;
            st.restore_within(&map, alloc, s.req.kv.shares.as_deref(), ahead)?;
            Ok(st)
        });
        drop(file);
        match restored {
            Ok(kv) => {
                tracing::info!(
                    request_id = %s.id(),
                    tokens = kv.len(0),
                    bytes = kv.true_bytes(),
                    budget = alloc,
                    "resumed from spill"
                );
                s.kv = Some(kv);
                self.snapshot.resumptions += 1;
            }
            Err(KvError::OutOfBudget { .. }) => s.finish(FinishReason::MemoryPressure, None),
            Err(e) => s.finish(
                FinishReason::Error,
                Some(format!("cannot resume the spilled kv cache: {e}")),
            ),
        }
    }

    /// Keep every sequence inside the budget before the next step: preempt (lowest priority, newest first) while
    /// the floors do not fit, finish a lone sequence that cannot fit at all, then split the budget and shrink.
    pub(super) fn apply_budget(&mut self) {
        let total = {
            let b = self.budget.borrow_and_update();
            // Status reports the budget the caches were last fitted to, never one not yet applied.
            self.snapshot.budget_source = b.source;
            b.bytes.min(usize::MAX as u64) as usize
        };
        self.snapshot.budget_bytes = total;
        // Floors are computed once per round (a finished sequence holds no cache: floor 0) and reused below.
        let floors = loop {
            let floors: Vec<usize> = self.running.iter().map(|s| self.floor_of(s)).collect();
            let need: usize = floors.iter().sum();
            let live: Vec<usize> = (0..self.running.len()).filter(|&i| !self.running[i].finished).collect();
            if need <= total || live.is_empty() {
                break floors;
            }
            let Some(victim) = budget::victim(
                live.iter()
                    .map(|&i| (i, self.running[i].req.priority, self.running[i].arrived())),
            ) else {
                break floors;
            };
            if live.len() > 1 {
                self.preempt(victim);
            } else {
                let s = &mut self.running[victim];
                tracing::warn!(request_id = %s.id(), need, budget = total, "kv budget below this sequence's floor");
                s.finish(FinishReason::MemoryPressure, None);
            }
        };
        let chunk = self.cfg.prefill_chunk;
        let f16_token = self.f16_token_bytes;
        let demands: Vec<usize> = self
            .running
            .iter()
            .zip(&floors)
            .map(|(s, &f)| budget::demand(f, f16_token, s.max_len))
            .collect();
        let weights: Vec<f64> = self.running.iter().map(|s| budget::weight(s.req.priority)).collect();
        let alloc = budget::water_fill(total, &floors, &demands, &weights);
        // Caches in memory are fitted (shrunk) first, then spilled ones restored into what they were given.
        for (s, &a) in self.running.iter_mut().zip(&alloc) {
            let ahead = s.ahead(chunk);
            if let Some(kv) = s.kv.as_mut() {
                if let Err(e) = kv.set_total_budget(a, s.req.kv.shares.as_deref(), ahead) {
                    tracing::warn!(request_id = %s.id(), error = %e, "cannot apply the kv budget");
                    s.finish(FinishReason::MemoryPressure, None);
                }
            }
        }
        // A reasoning trace about to run out of room concludes while its answer still fits.
        if let Some(reserve) = self.cfg.conclude_reserve {
            for (s, &a) in self.running.iter_mut().zip(&alloc) {
                if s.kv.as_ref().is_some_and(|kv| kv.floor_bytes(reserve) > a) && s.conclude_thinking() {
                    tracing::info!(request_id = %s.id(), budget = a, reserve, "closing the thinking span: memory");
                }
            }
        }
        for (i, &a) in alloc.iter().enumerate() {
            if self.running[i].restoring() {
                self.restore(i, a);
            }
        }
        self.retire();
    }

    /// Spill `running[i]`'s cache to disk and set it aside; if that is impossible, finish it (memory pressure).
    fn preempt(&mut self, i: usize) {
        let floor = self.floor_of(&self.running[i]);
        let mut s = self.running.remove(i);
        if s.restoring() {
            // its file is still there
            self.spilled.push(s);
            return;
        }
        self.spill_seq += 1;
        // pid first (stale-file cleanup reads it), then this engine (several may share a process and a directory)
        let name = format!(
            "pmkvq-{}-{}-{}.kv",
            std::process::id(),
            self.engine_nonce,
            self.spill_seq
        );
        // Streamed into the file as it is read: no second copy of the cache in memory.
        let spilled = s.kv.as_ref().ok_or_else(|| "no cache".to_string()).and_then(|kv| {
            self.spill
                .write_with(&name, |out| kv.spill_to(out))
                .map_err(|e| e.to_string())
        });
        match spilled {
            Ok(file) => {
                tracing::info!(
                    request_id = %s.id(),
                    priority = s.req.priority,
                    bytes = file.bytes,
                    path = %file.path().display(),
                    "preempted: kv spilled"
                );
                let kv = s.kv.take().expect("checked above");
                s.requants_before = s.requants_before.saturating_add(kv.requantizations());
                s.spill = Some(file);
                s.resume_floor = floor;
                self.snapshot.preemptions += 1;
                self.spilled.push(s);
            }
            Err(e) => {
                tracing::warn!(request_id = %s.id(), error = %e, "cannot spill; finishing under memory pressure");
                s.finish(FinishReason::MemoryPressure, None);
                self.running.insert(i, s);
            }
        }
    }
}
