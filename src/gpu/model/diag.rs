//! Diagnostics on the GPU forward pass: the residual stream layer by layer, an event-timed step, graph
//! switches and counts. `gpu_check` uses them; the daemon never does.

use super::{gerr, Backend, GpuModel, KvStore, LogitsMode, ModelError, SeqInput};
use crate::gpu::cuda::drv;
use crate::gpu::GpuError;
use cudarc::driver::CudaSlice;

/// Where one step's device time went: per kernel, total milliseconds and launches.
#[derive(Debug, Clone)]
pub struct StepProfile {
    pub kernels: Vec<(String, f64, usize)>,
    pub device_ms: f64,
    pub wall_ms: f64,
}

impl GpuModel {
    /// Diagnostics: run one forward pass and return the residual stream (all rows) after the embedding, after
    /// layer 0's attention block (residual added) and after every layer — what `Model::layer_inputs` and
    /// `Model::attention_block` give on the CPU, to find the first step where the two paths part.
    pub fn trace_hidden(
        &self,
        seqs: &[SeqInput<'_>],
        kv: &mut [&mut dyn KvStore],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        *self.dumps.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
        self.diagnosing.store(true, std::sync::atomic::Ordering::Relaxed);
        let r = Backend::forward(self, seqs, kv, LogitsMode::None);
        self.diagnosing.store(false, std::sync::atomic::Ordering::Relaxed);
        let d = self
            .dumps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        r.map(|_| d)
    }

    /// Diagnostics: run one forward pass launching kernels directly (no graph), timing every launch with
    /// events. Launch overhead shows as the gaps a kernel's time includes.
    pub fn profile_step(&self, seqs: &[SeqInput<'_>], kv: &mut [&mut dyn KvStore]) -> Result<StepProfile, ModelError> {
        let t0 = std::time::Instant::now();
        let start = self.gpu.timing_event().map_err(gerr)?;
        *self.profile.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
        self.diagnosing.store(true, std::sync::atomic::Ordering::Relaxed);
        let r = Backend::forward(self, seqs, kv, LogitsMode::Last);
        self.diagnosing.store(false, std::sync::atomic::Ordering::Relaxed);
        let events = self
            .profile
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        r?;
        let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut kernels: Vec<(String, f64, usize)> = Vec::new();
        let mut prev = &start;
        for (name, ev) in &events {
            let ms = prev.elapsed_ms(ev).map_err(|e| gerr(drv(e)))? as f64;
            match kernels.iter_mut().find(|k| k.0 == *name) {
                Some(k) => {
                    k.1 += ms;
                    k.2 += 1;
                }
                None => kernels.push((name.to_string(), ms, 1)),
            }
            prev = ev;
        }
        let device_ms = kernels.iter().map(|k| k.1).sum();
        Ok(StepProfile {
            kernels,
            device_ms,
            wall_ms,
        })
    }

    /// The launch plan of the next steps, for side-by-side benchmarks: `fused` (the default) runs 10 launches per
    /// layer, 7 in a decode step; off, RoPE, the rotation, the K/V store, the inverse rotation, the 8-bit blocks of
    /// the attention output, the norms and SwiGLU are each their own launch again (12 or 14 per layer). `heads_per_warp` (1..=4, default 4): query heads one attention
    /// warp serves. `(false, 1)` is the launch plan the 2026-11-30 H200 run measured. Same results either way.
    pub fn set_launch_plan(&self, fused: bool, heads_per_warp: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.unfused.store(!fused, Relaxed);
        self.heads_per_warp
            .store(heads_per_warp.clamp(1, super::ATTENTION_HEADS), Relaxed);
    }

    pub(super) fn launch_plan(&self) -> (bool, usize) {
        use std::sync::atomic::Ordering::Relaxed;
        (!self.unfused.load(Relaxed), self.heads_per_warp.load(Relaxed))
    }

    /// Allow or forbid graph replay for decode steps (benchmarks compare both).
    pub fn set_graphs(&self, on: bool) {
        self.graphs_on.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// (graphs captured, graph replays) since load.
    pub fn graph_stats(&self) -> (u64, u64) {
        let l = |i: usize| self.graph_counts[i].load(std::sync::atomic::Ordering::Relaxed);
        (l(0), l(1))
    }

    pub(super) fn mark(&self, name: &'static str) -> Result<(), GpuError> {
        if !self.diagnosing.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let mut g = self.profile.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = g.as_mut() {
            v.push((name, self.gpu.timing_event()?));
        }
        Ok(())
    }

    pub(super) fn dump(&self, x: &CudaSlice<f32>, n: usize) -> Result<(), GpuError> {
        if !self.diagnosing.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let mut g = self.dumps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = g.as_mut() {
            d.push(self.gpu.dtoh(x, n)?);
        }
        Ok(())
    }
}
