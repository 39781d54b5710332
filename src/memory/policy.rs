//! The budget policy: `kv_budget = min(operator cap, (available − reserve) × fraction + current KV)`, where
//! `available` is the tightest of host MemAvailable, the cgroup's headroom and (KV on a discrete GPU) the device's
//! free memory; memory pressure (PSI) lowers the fraction. A lower budget applies at once when it moves by more than
//! the hysteresis band; a higher one also waits `min_interval` since the last change, so a noisy MemAvailable does
//! not make caches thrash (shrinking is cheap, but precision dropped is never regained).

use super::samplers::MemorySample;
use tokio::time::{Duration, Instant};

/// The constraint that set the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetSource {
    Operator,
    Host,
    Cgroup,
    Device,
    Pressure,
}

impl BudgetSource {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetSource::Operator => "operator",
            BudgetSource::Host => "host",
            BudgetSource::Cgroup => "cgroup",
            BudgetSource::Device => "device",
            BudgetSource::Pressure => "pressure",
        }
    }
}

/// The operator's setting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OperatorCap {
    /// Follow the monitored memory only.
    Automatic,
    Bytes(u64),
    /// A fraction of what the monitor sees as usable for KV (available − reserve + current KV).
    Fraction(f64),
}

impl std::str::FromStr for OperatorCap {
    type Err = String;
    /// `auto`, a fraction with a decimal point in (0, 1] (`0.5`), or a byte size (`512MiB`, `1048576`).
    fn from_str(s: &str) -> Result<Self, String> {
        let v = s.trim();
        if v == "auto" {
            return Ok(OperatorCap::Automatic);
        }
        if v.contains('.') {
            if let Ok(f) = v.parse::<f64>() {
                return if f > 0.0 && f <= 1.0 {
                    Ok(OperatorCap::Fraction(f))
                } else {
                    Err(format!("a fraction must be in (0, 1], got `{v}`"))
                };
            }
        }
        match crate::units::parse_bytes(v) {
            Some(b) if b > 0 => Ok(OperatorCap::Bytes(b as u64)),
            _ => Err(format!(
                "must be `auto`, a byte size such as 512MiB, or a fraction such as 0.5, got `{v}`"
            )),
        }
    }
}

/// A budget as published to the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub bytes: u64,
    pub source: BudgetSource,
    /// The sample it came from.
    pub sample: MemorySample,
    /// KV bytes in use when it was computed.
    pub kv_bytes: u64,
}

#[derive(Clone, Debug)]
pub struct PolicyConfig {
    /// Memory kept free for everything else (weights, activations, other processes).
    pub reserve_bytes: u64,
    /// Share of the remaining available memory the KV cache may take.
    pub fraction: f64,
    /// PSI `some avg10` (percent) above which the fraction is multiplied by `pressure_factor`.
    pub pressure_some_pct: f64,
    pub pressure_factor: f64,
    /// Relative change below which a new budget is not published.
    pub hysteresis: f64,
    /// Minimum time between two increases.
    pub min_interval: Duration,
    /// The KV cache lives in device memory (CUDA backend): a discrete GPU's free memory constrains it.
    pub kv_on_device: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            reserve_bytes: 256 << 20,
            fraction: 0.5,
            pressure_some_pct: 10.0,
            pressure_factor: 0.5,
            hysteresis: 0.05,
            min_interval: Duration::from_secs(2),
            kv_on_device: false,
        }
    }
}

pub struct Policy {
    cfg: PolicyConfig,
    cap: OperatorCap,
    last: Option<Budget>,
    last_change: Option<Instant>,
}

impl Policy {
    pub fn new(cfg: PolicyConfig, cap: OperatorCap) -> Self {
        Policy {
            cfg,
            cap,
            last: None,
            last_change: None,
        }
    }

    pub fn cap(&self) -> OperatorCap {
        self.cap
    }

    /// New settings (a configuration reload); the next `evaluate` publishes their effect.
    pub fn set_config(&mut self, cfg: PolicyConfig) {
        self.cfg = cfg;
        self.last = None;
    }

    /// A new operator setting; the next `evaluate` publishes its effect whatever the hysteresis.
    pub fn set_cap(&mut self, cap: OperatorCap) {
        self.cap = cap;
        self.last = None;
    }

    /// The budget this sample allows, before hysteresis.
    pub fn compute(&self, s: &MemorySample, kv_bytes: u64) -> Budget {
        let mut avail = s.host_available;
        // On a Jetson the GPU's memory is this same DRAM: MemAvailable is the device budget, and the CUDA
        // figure (MemFree, ignoring reclaimable page cache) is misleading (anchors §6).
        let mut source = if s.tegra && self.cfg.kv_on_device {
            BudgetSource::Device
        } else {
            BudgetSource::Host
        };
        if let Some(cur) = s.cgroup_current {
            for lim in [s.cgroup_max, s.cgroup_high].into_iter().flatten() {
                let room = lim.saturating_sub(cur);
                if room < avail {
                    avail = room;
                    source = BudgetSource::Cgroup;
                }
            }
        }
        if let (Some(d), true, false) = (s.device, self.cfg.kv_on_device, s.tegra) {
            if d.free < avail {
                avail = d.free;
                source = BudgetSource::Device;
            }
        }
        let mut fraction = self.cfg.fraction;
        if s.psi_some_avg10.is_some_and(|p| p > self.cfg.pressure_some_pct) {
            fraction *= self.cfg.pressure_factor;
            source = BudgetSource::Pressure;
        }
        let usable = avail.saturating_sub(self.cfg.reserve_bytes);
        let auto = (usable as f64 * fraction) as u64 + kv_bytes;
        let cap = match self.cap {
            OperatorCap::Automatic => None,
            OperatorCap::Bytes(b) => Some(b),
            OperatorCap::Fraction(f) => Some((f * (usable + kv_bytes) as f64) as u64),
        };
        let (bytes, source) = match cap {
            Some(c) if c <= auto => (c, BudgetSource::Operator),
            _ => (auto, source),
        };
        Budget {
            bytes,
            source,
            sample: s.clone(),
            kv_bytes,
        }
    }

    /// The budget to publish now, if it changed enough (see the module docs).
    pub fn evaluate(&mut self, s: &MemorySample, kv_bytes: u64, now: Instant) -> Option<Budget> {
        let b = self.compute(s, kv_bytes);
        let publish = match &self.last {
            None => true,
            Some(last) => {
                let band = (last.bytes as f64 * self.cfg.hysteresis) as u64;
                if b.bytes + band < last.bytes {
                    true
                } else if b.bytes > last.bytes + band {
                    self.last_change
                        .is_none_or(|t| now.duration_since(t) >= self.cfg.min_interval)
                } else {
                    false
                }
            }
        };
        if publish {
            self.last = Some(b.clone());
            self.last_change = Some(now);
            Some(b)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(avail_mib: u64) -> MemorySample {
        MemorySample {
            host_total: 8 << 30,
            host_available: avail_mib << 20,
            ..Default::default()
        }
    }

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            reserve_bytes: 100 << 20,
            fraction: 0.5,
            ..Default::default()
        }
    }

    #[test]
    fn formula_and_binding_constraint() {
        let p = Policy::new(cfg(), OperatorCap::Automatic);
        let b = p.compute(&sample(1100), 10 << 20);
        assert_eq!(b.bytes, (500 << 20) + (10 << 20));
        assert_eq!(b.source, BudgetSource::Host);
        let mut s = sample(1100);
        s.cgroup_max = Some(700 << 20);
        s.cgroup_current = Some(300 << 20);
        let b = p.compute(&s, 0);
        assert_eq!((b.bytes, b.source), (150 << 20, BudgetSource::Cgroup));
        s.psi_some_avg10 = Some(30.0);
        let b = p.compute(&s, 0);
        assert_eq!((b.bytes, b.source), (75 << 20, BudgetSource::Pressure));
        let p = Policy::new(cfg(), OperatorCap::Bytes(1 << 20));
        assert_eq!(p.compute(&s, 0).source, BudgetSource::Operator);
        let p = Policy::new(cfg(), OperatorCap::Fraction(0.5));
        assert_eq!(p.compute(&sample(1100), 0).bytes, 500 << 20);
    }

    #[test]
    fn hysteresis_and_min_interval() {
        let mut p = Policy::new(cfg(), OperatorCap::Automatic);
        let t0 = Instant::now();
        assert!(p.evaluate(&sample(1100), 0, t0).is_some());
        // 2 % down: inside the band.
        assert!(p.evaluate(&sample(1090), 0, t0 + Duration::from_millis(10)).is_none());
        // 20 % down: at once.
        assert!(p.evaluate(&sample(900), 0, t0 + Duration::from_millis(20)).is_some());
        // Up again: only after min_interval.
        assert!(p.evaluate(&sample(1100), 0, t0 + Duration::from_millis(30)).is_none());
        let b = p.evaluate(&sample(1100), 0, t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(b.bytes, 500 << 20);
    }
}
