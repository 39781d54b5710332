//! Memory monitoring: samplers (host, cgroup v2, PSI, device, Jetson unified memory) → a KV [`Budget`] on a
//! `watch` channel.
//!
//! Owns: reading what the machine has (every sampler reads below a configurable root, so tests feed fake
//! `/proc` and `/sys` trees), and the policy that turns samples and the operator's cap into one budget with its
//! binding constraint. Does not own: what the engine does with the budget (it never touches the engine or a KV
//! cache). Invariants: a failed sample never raises the budget; the operator's cap always binds.
#![forbid(unsafe_code)]

mod policy;
mod samplers;

pub use policy::{Budget, BudgetSource, OperatorCap, Policy, PolicyConfig};
pub use samplers::{
    is_tegra, CgroupSampler, DeviceMemory, DeviceSample, HostSampler, MemorySample, Monitor, NoDevice, PsiSampler,
    StaticDevice,
};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot parse `{what}`")]
    Parse { path: std::path::PathBuf, what: String },
}

use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Operator requests to the monitor task: a new cap (and, on a configuration reload, new policy settings),
/// answered with the budget it produces.
pub struct CapRequest {
    pub cap: OperatorCap,
    pub policy: Option<PolicyConfig>,
    pub reply: oneshot::Sender<Budget>,
}

/// Commands to the monitor task are rare (an operator's RPC); a few in flight is plenty.
pub const CAP_CHANNEL: usize = 4;

/// The monitor task: sample every `interval` (and at once on an operator change), run the policy, publish
/// budgets on `tx`. `kv_bytes` reads the KV bytes in use (the engine's last status). Ends when every sender
/// of `caps` is gone and `tx` has no receivers.
pub async fn run_monitor(
    mut monitor: Monitor,
    mut policy: Policy,
    interval: Duration,
    kv_bytes: impl Fn() -> u64 + Send,
    mut caps: mpsc::Receiver<CapRequest>,
    tx: watch::Sender<Budget>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reply = tokio::select! {
            _ = tick.tick() => None,
            req = caps.recv() => match req {
                Some(CapRequest { cap, policy: settings, reply }) => {
                    if let Some(s) = settings {
                        policy.set_config(s);
                    }
                    policy.set_cap(cap);
                    Some(reply)
                }
                None if tx.is_closed() => return,
                None => None,
            },
        };
        match monitor.sample() {
            Ok(s) => {
                if let Some(b) = policy.evaluate(&s, kv_bytes(), tokio::time::Instant::now()) {
                    tracing::info!(budget_bytes = b.bytes, source = b.source.as_str(), "kv budget");
                    tx.send_replace(b);
                }
            }
            // A failed sample keeps the last budget (never raises it).
            Err(e) => tracing::warn!(error = %e, "memory sample failed"),
        }
        if let Some(r) = reply {
            let _ = r.send(tx.borrow().clone());
        }
    }
}

/// The first budget, computed synchronously before serving (so the engine starts under a real one).
pub fn initial_budget(monitor: &mut Monitor, policy: &mut Policy) -> Result<Budget, MemoryError> {
    let s = monitor.sample()?;
    Ok(policy
        .evaluate(&s, 0, tokio::time::Instant::now())
        .unwrap_or_else(|| policy.compute(&s, 0)))
}
