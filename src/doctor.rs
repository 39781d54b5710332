//! `pmkvq doctor`: what this machine is, what it has, whether pmkvqd can serve here, and a recommended
//! configuration. Reads everything below a root directory (`/` normally; a fake tree in tests).

use crate::memory::{Monitor, NoDevice, OperatorCap, Policy, PolicyConfig};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize)]
pub struct Report {
    pub platform: Platform,
    pub memory: MemoryFacts,
    pub model: Option<ModelFacts>,
    pub profile: Option<PathBuf>,
    /// The budget pmkvqd would start with (default policy).
    pub recommended_budget_bytes: u64,
    /// A config snippet for this machine.
    pub recommended_config: String,
    /// Anything that stops pmkvqd from serving here (non-empty = exit code 1).
    pub blockers: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Platform {
    pub arch: &'static str,
    pub cpus: usize,
    pub cpu_features: Vec<&'static str>,
    /// Device-tree model (e.g. "NVIDIA Jetson AGX Orin Developer Kit").
    pub board: Option<String>,
    pub tegra: bool,
    /// L4T release from /etc/nv_tegra_release (e.g. "R36.4") and the JetPack it belongs to.
    pub l4t: Option<String>,
    pub jetpack: Option<String>,
    /// GPU device nodes present (/dev/nvidia0, /dev/nvhost-gpu, …).
    pub gpu_nodes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct MemoryFacts {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub cgroup_max_bytes: Option<u64>,
    pub psi_some_avg10: Option<f64>,
    pub zram_devices: usize,
    pub swap_total_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ModelFacts {
    pub path: PathBuf,
    pub bytes: u64,
}

fn read(root: &Path, rel: &str) -> Option<String> {
    std::fs::read_to_string(root.join(rel)).ok()
}

fn cpu_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("f16c", std::arch::is_x86_feature_detected!("f16c")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        ] {
            if on {
                f.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        for (name, on) in [
            ("neon", std::arch::is_aarch64_feature_detected!("neon")),
            ("dotprod", std::arch::is_aarch64_feature_detected!("dotprod")),
            ("fp16", std::arch::is_aarch64_feature_detected!("fp16")),
        ] {
            if on {
                f.push(name);
            }
        }
    }
    f
}

/// "# R36 (release), REVISION: 4.0, …" → ("R36.4", JetPack).
fn l4t_release(text: &str) -> Option<(String, String)> {
    let major: u32 = text.split("# R").nth(1)?.split_whitespace().next()?.parse().ok()?;
    let rev = text
        .split("REVISION:")
        .nth(1)?
        .trim()
        .split([',', ' '])
        .next()?
        .to_string();
    let minor: u32 = rev.split('.').next()?.parse().ok()?;
    let jetpack = match (major, minor) {
        (36, 4..) => "JetPack 6.1/6.2 (CUDA 12.6)",
        (36, _) => "JetPack 6.0 (CUDA 12.2)",
        (35, _) => "JetPack 5.1 (CUDA 11.4)",
        (34, _) => "JetPack 5.0 (CUDA 11.4)",
        (32, _) => "JetPack 4 (CUDA 10.2): too old for the CUDA kernels",
        _ => "unknown JetPack",
    };
    Some((format!("R{major}.{minor}"), jetpack.to_string()))
}

/// Examine the machine below `root`; `model` is the model pmkvqd would serve.
pub fn examine(root: &Path, model: &Path) -> Report {
    let mut blockers = Vec::new();
    let mut warnings = Vec::new();
    let board = read(root, "proc/device-tree/model").map(|s| s.trim_end_matches('\0').trim().to_string());
    let tegra = crate::memory::is_tegra(root);
    let (l4t, jetpack) = match read(root, "etc/nv_tegra_release").and_then(|t| l4t_release(&t)) {
        Some((l, j)) => (Some(l), Some(j)),
        None => (None, None),
    };
    let gpu_nodes: Vec<String> = [
        "dev/nvidia0",
        "dev/nvidiactl",
        "dev/nvhost-gpu",
        "dev/nvhost-ctrl-gpu",
        "dev/nvmap",
    ]
    .iter()
    .filter(|n| root.join(n).exists())
    .map(|n| format!("/{n}"))
    .collect();
    let platform = Platform {
        arch: std::env::consts::ARCH,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_features: cpu_features(),
        board,
        tegra,
        l4t,
        jetpack,
        gpu_nodes,
    };
    let mut monitor = Monitor::at_root(root, Box::new(NoDevice));
    let sample = match monitor.sample() {
        Ok(s) => s,
        Err(e) => {
            blockers.push(format!("cannot read memory information: {e}"));
            Default::default()
        }
    };
    let swaps = read(root, "proc/swaps").unwrap_or_default();
    let zram = swaps.lines().filter(|l| l.contains("zram")).count();
    let swap_total = swaps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024;
    let memory = MemoryFacts {
        total_bytes: sample.host_total,
        available_bytes: sample.host_available,
        cgroup_max_bytes: sample.cgroup_max,
        psi_some_avg10: sample.psi_some_avg10,
        zram_devices: zram,
        swap_total_bytes: swap_total,
    };
    let model_facts = std::fs::metadata(model).ok().map(|m| ModelFacts {
        path: model.to_path_buf(),
        bytes: if m.is_dir() { 0 } else { m.len() },
    });
    match &model_facts {
        None => blockers.push(format!(
            "model {} not found: pmkvq fetch-model --dir {}",
            model.display(),
            model.parent().map_or(".".into(), |p| p.display().to_string())
        )),
        Some(m) => {
            let room = sample.cgroup_max.map_or(sample.host_available, |c| {
                c.saturating_sub(sample.cgroup_current.unwrap_or(0))
                    .min(sample.host_available)
            });
            if m.bytes > 0 && room < m.bytes + (64 << 20) {
                blockers.push(format!(
                    "the model needs {} MiB and {} MiB are available: free memory, raise MemoryMax, or use a smaller model",
                    m.bytes >> 20,
                    room >> 20
                ));
            }
        }
    }
    let profile = Path::new("profiles/default.profile.json");
    let profile = root
        .join("var/lib/pmkvq")
        .join(profile)
        .exists()
        .then(|| PathBuf::from("/var/lib/pmkvq/profiles/default.profile.json"))
        .or_else(|| profile.exists().then(|| profile.to_path_buf()));
    if profile.is_none() {
        warnings.push("no calibration profile: PM-KVQ splits the budget evenly over layers (pmkvq calibrate)".into());
    }
    if tegra && zram == 0 {
        warnings
            .push("Jetson without zram: enable it (nvzramconfig) so page cache pressure does not stall serving".into());
    }
    if sample.psi_some_avg10.is_some_and(|p| p > 10.0) {
        warnings.push("memory pressure is high now (PSI some avg10 > 10 %): the KV budget will be halved".into());
    }
    if platform.arch == "x86_64" && !platform.cpu_features.contains(&"avx2") {
        blockers.push("this CPU lacks AVX2: rebuild with RUSTFLAGS=\"-C target-cpu=native\"".into());
    }
    let policy = Policy::new(PolicyConfig::default(), OperatorCap::Automatic);
    let budget = policy.compute(&sample, 0);
    let device = if tegra || !platform.gpu_nodes.is_empty() {
        "auto"
    } else {
        "cpu"
    };
    let recommended_config = format!(
        "model = \"{}\"\nthreads = {}\ndevice = \"{device}\"\n\n[memory]\n# starts at {} MiB for the KV cache (budget set by {})\nbudget = \"auto\"\nreserve = \"256MiB\"\nfraction = \"0.5\"\n",
        model.display(),
        platform.cpus,
        budget.bytes >> 20,
        budget.source.as_str()
    );
    Report {
        platform,
        memory,
        model: model_facts,
        profile,
        recommended_budget_bytes: budget.bytes,
        recommended_config,
        blockers,
        warnings,
    }
}

impl Report {
    pub fn render(&self) -> String {
        let p = &self.platform;
        let m = &self.memory;
        let mib = |b: u64| b >> 20;
        let mut out = format!(
            "platform: {} ({} CPUs; {})\n",
            p.arch,
            p.cpus,
            if p.cpu_features.is_empty() {
                "no SIMD detected".to_string()
            } else {
                p.cpu_features.join(", ")
            }
        );
        if let Some(b) = &p.board {
            out += &format!("board: {b}\n");
        }
        if p.tegra {
            out += &format!(
                "jetson: L4T {} — {} (unified memory: the KV budget follows MemAvailable)\n",
                p.l4t.as_deref().unwrap_or("?"),
                p.jetpack.as_deref().unwrap_or("unknown JetPack")
            );
        }
        out += &format!(
            "gpu device nodes: {}\n",
            if p.gpu_nodes.is_empty() {
                "none".to_string()
            } else {
                p.gpu_nodes.join(" ")
            }
        );
        out += &format!(
            "memory: {} MiB total, {} MiB available; cgroup limit {}; PSI some avg10 {}; swap {} MiB ({} zram)\n",
            mib(m.total_bytes),
            mib(m.available_bytes),
            m.cgroup_max_bytes.map_or("none".into(), |c| format!("{} MiB", mib(c))),
            m.psi_some_avg10.map_or("n/a".into(), |p| format!("{p:.1} %")),
            mib(m.swap_total_bytes),
            m.zram_devices
        );
        match &self.model {
            Some(md) => out += &format!("model: {} ({} MiB)\n", md.path.display(), mib(md.bytes)),
            None => out += "model: not found\n",
        }
        out += &format!(
            "profile: {}\n",
            self.profile.as_ref().map_or("none".into(), |p| p.display().to_string())
        );
        out += &format!("kv budget at start: {} MiB\n", mib(self.recommended_budget_bytes));
        for w in &self.warnings {
            out += &format!("warning: {w}\n");
        }
        for b in &self.blockers {
            out += &format!("BLOCKER: {b}\n");
        }
        out += &format!("\nrecommended /etc/pmkvq/pmkvqd.toml:\n{}", self.recommended_config);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l4t_releases_map_to_jetpack() {
        let (l, j) =
            l4t_release("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64").unwrap();
        assert_eq!(l, "R36.4");
        assert!(j.contains("6.1"));
        assert!(l4t_release("# R35 (release), REVISION: 5.0").unwrap().1.contains("5.1"));
        assert!(l4t_release("garbage").is_none());
    }
}
