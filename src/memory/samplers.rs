//! Samplers. Each reads below a root directory (`/` in production, a fake tree in tests).

use super::MemoryError;
use std::path::{Path, PathBuf};

/// One look at the machine's memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemorySample {
    pub host_total: u64,
    /// MemAvailable: what can be allocated without swapping (page cache counts as available).
    pub host_available: u64,
    /// Our own cgroup v2 (`None` outside one, or when the file says `max`).
    pub cgroup_max: Option<u64>,
    pub cgroup_high: Option<u64>,
    pub cgroup_current: Option<u64>,
    /// PSI `some avg10` / `full avg10` (percent of time stalled on memory).
    pub psi_some_avg10: Option<f64>,
    pub psi_full_avg10: Option<f64>,
    pub device: Option<DeviceSample>,
    /// A Jetson (Tegra): CPU and GPU share DRAM, so MemAvailable is the device's budget too.
    pub tegra: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSample {
    pub total: u64,
    pub free: u64,
}

/// Device memory (CUDA `cuMemGetInfo` when built with the CUDA features; none otherwise).
pub trait DeviceMemory: Send {
    fn sample(&mut self) -> Option<DeviceSample>;
}

/// No accelerator.
pub struct NoDevice;

impl DeviceMemory for NoDevice {
    fn sample(&mut self) -> Option<DeviceSample> {
        None
    }
}

/// A fixed figure (tests; e.g. the misleading `cuMemGetInfo` of a Jetson).
pub struct StaticDevice(pub DeviceSample);

impl DeviceMemory for StaticDevice {
    fn sample(&mut self) -> Option<DeviceSample> {
        Some(self.0)
    }
}

/// Host memory: sysinfo on the real machine (memory refresh only), `<root>/proc/meminfo` under a fake root.
pub enum HostSampler {
    System(Box<sysinfo::System>),
    File(PathBuf),
}

impl HostSampler {
    pub fn system() -> Self {
        HostSampler::System(Box::new(sysinfo::System::new()))
    }

    /// (total, available) in bytes.
    pub fn sample(&mut self) -> Result<(u64, u64), MemoryError> {
        match self {
            HostSampler::System(s) => {
                s.refresh_memory();
                Ok((s.total_memory(), s.available_memory()))
            }
            HostSampler::File(root) => {
                let path = root.join("proc/meminfo");
                let text = read(&path)?;
                let field = |name: &str| -> Result<u64, MemoryError> {
                    text.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
                        .and_then(|kib| kib.parse::<u64>().ok())
                        .map(|kib| kib * 1024)
                        .ok_or_else(|| MemoryError::Parse {
                            path: path.clone(),
                            what: name.to_string(),
                        })
                };
                Ok((field("MemTotal")?, field("MemAvailable")?))
            }
        }
    }
}

fn read(path: &Path) -> Result<String, MemoryError> {
    std::fs::read_to_string(path).map_err(|e| MemoryError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// `max` → None, a number → Some.
fn limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => None,
        v => v.parse().ok(),
    }
}

/// Our own cgroup v2: `<root>/proc/self/cgroup` names it, `<root>/sys/fs/cgroup/<it>/memory.*` describe it.
pub struct CgroupSampler {
    root: PathBuf,
}

impl CgroupSampler {
    pub fn new(root: &Path) -> Self {
        CgroupSampler {
            root: root.to_path_buf(),
        }
    }

    /// (max, high, current); `None` when we are not in a cgroup v2 with the memory controller.
    pub fn sample(&self) -> Option<(Option<u64>, Option<u64>, u64)> {
        let own = std::fs::read_to_string(self.root.join("proc/self/cgroup")).ok()?;
        // cgroup v2 has the single line `0::/path`.
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))?
            .trim()
            .trim_start_matches('/');
        let dir = self.root.join("sys/fs/cgroup").join(rel);
        let current = std::fs::read_to_string(dir.join("memory.current")).ok()?;
        let current = current.trim().parse().ok()?;
        let max = std::fs::read_to_string(dir.join("memory.max"))
            .ok()
            .and_then(|t| limit(&t));
        let high = std::fs::read_to_string(dir.join("memory.high"))
            .ok()
            .and_then(|t| limit(&t));
        Some((max, high, current))
    }
}

/// Pressure stall information for memory (`<root>/proc/pressure/memory`).
pub struct PsiSampler {
    root: PathBuf,
}

impl PsiSampler {
    pub fn new(root: &Path) -> Self {
        PsiSampler {
            root: root.to_path_buf(),
        }
    }

    /// (some avg10, full avg10), in percent.
    pub fn sample(&self) -> Option<(f64, f64)> {
        let text = std::fs::read_to_string(self.root.join("proc/pressure/memory")).ok()?;
        let avg10 = |kind: &str| -> Option<f64> {
            let line = text.lines().find(|l| l.starts_with(kind))?;
            line.split_whitespace()
                .find_map(|f| f.strip_prefix("avg10="))?
                .parse()
                .ok()
        };
        Some((avg10("some")?, avg10("full").unwrap_or(0.0)))
    }
}

/// Tegra (Jetson) detection: L4T's release file or the device tree's compatible string.
pub fn is_tegra(root: &Path) -> bool {
    root.join("etc/nv_tegra_release").exists()
        || std::fs::read(root.join("proc/device-tree/compatible"))
            .map(|c| String::from_utf8_lossy(&c).contains("nvidia,tegra"))
            .unwrap_or(false)
}

/// All samplers together.
pub struct Monitor {
    host: HostSampler,
    cgroup: CgroupSampler,
    psi: PsiSampler,
    device: Box<dyn DeviceMemory>,
    tegra: bool,
}

impl Monitor {
    /// The real machine.
    pub fn system(device: Box<dyn DeviceMemory>) -> Self {
        let root = Path::new("/");
        Monitor {
            host: HostSampler::system(),
            cgroup: CgroupSampler::new(root),
            psi: PsiSampler::new(root),
            device,
            tegra: is_tegra(root),
        }
    }

    /// Everything read below `root` (tests, containers with a bind-mounted host /proc).
    pub fn at_root(root: &Path, device: Box<dyn DeviceMemory>) -> Self {
        Monitor {
            host: HostSampler::File(root.to_path_buf()),
            cgroup: CgroupSampler::new(root),
            psi: PsiSampler::new(root),
            device,
            tegra: is_tegra(root),
        }
    }

    pub fn sample(&mut self) -> Result<MemorySample, MemoryError> {
        let (host_total, host_available) = self.host.sample()?;
        let cg = self.cgroup.sample();
        let psi = self.psi.sample();
        Ok(MemorySample {
            host_total,
            host_available,
            cgroup_max: cg.and_then(|c| c.0),
            cgroup_high: cg.and_then(|c| c.1),
            cgroup_current: cg.map(|c| c.2),
            psi_some_avg10: psi.map(|p| p.0),
            psi_full_avg10: psi.map(|p| p.1),
            device: self.device.sample(),
            tegra: self.tegra,
        })
    }
}
