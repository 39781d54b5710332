//! The memory monitor follows fake /proc and /sys trees (host, cgroup v2, PSI, a Jetson with a misleading CUDA
//! figure): budget and source change as the files change, with hysteresis, under paused tokio time.

mod common;

use common::fake_tree::{meminfo, write};

use pmkvq::memory::{
    self, Budget, BudgetSource, DeviceSample, Monitor, NoDevice, OperatorCap, Policy, PolicyConfig, StaticDevice,
};
use std::path::Path;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

const MIB: u64 = 1 << 20;

fn psi(root: &Path, some: f64) {
    write(
        root,
        "proc/pressure/memory",
        &format!(
            "some avg10={some:.2} avg60=0.00 avg300=0.00 total=1\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        ),
    );
}

fn cfg(kv_on_device: bool) -> PolicyConfig {
    PolicyConfig {
        reserve_bytes: 100 * MIB,
        fraction: 0.5,
        pressure_some_pct: 10.0,
        pressure_factor: 0.5,
        hysteresis: 0.05,
        min_interval: Duration::from_secs(2),
        kv_on_device,
    }
}

struct Running {
    rx: watch::Receiver<Budget>,
    _caps: mpsc::Sender<memory::CapRequest>,
}

fn start(mut m: Monitor, policy: PolicyConfig) -> Running {
    let mut p = Policy::new(policy, OperatorCap::Automatic);
    let first = memory::initial_budget(&mut m, &mut p).unwrap();
    let (tx, rx) = watch::channel(first);
    let (caps, caps_rx) = mpsc::channel(4);
    tokio::spawn(memory::run_monitor(m, p, Duration::from_millis(500), || 0, caps_rx, tx));
    Running { rx, _caps: caps }
}

/// Wait (in virtual time) for the next published budget; `None` if none comes within `within`.
async fn next(r: &mut Running, within: Duration) -> Option<Budget> {
    match tokio::time::timeout(within, r.rx.changed()).await {
        Ok(Ok(())) => Some(r.rx.borrow_and_update().clone()),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn budget_follows_meminfo_cgroup_and_pressure_with_hysteresis() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    meminfo(root, 8192, 2100);
    psi(root, 0.0);
    let mut r = start(Monitor::at_root(root, Box::new(NoDevice)), cfg(false));
    let b = r.rx.borrow().clone();
    assert_eq!((b.bytes, b.source), (1000 * MIB, BudgetSource::Host));
    assert_eq!(b.sample.host_total, 8192 * MIB);

    // 2 % less available: inside the hysteresis band, nothing is published.
    meminfo(root, 8192, 2060);
    assert!(next(&mut r, Duration::from_secs(1)).await.is_none());
    // Much less: published at the next sample.
    meminfo(root, 8192, 1100);
    let b = next(&mut r, Duration::from_secs(1)).await.expect("a lower budget");
    assert_eq!((b.bytes, b.source), (500 * MIB, BudgetSource::Host));
    // More again: only after the minimum interval since the last change.
    meminfo(root, 8192, 2100);
    let t0 = tokio::time::Instant::now();
    let b = next(&mut r, Duration::from_secs(5)).await.expect("a higher budget");
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "raised after {:?}",
        t0.elapsed()
    );
    assert_eq!(b.bytes, 1000 * MIB);

    // Our cgroup's limit binds.
    write(root, "proc/self/cgroup", "0::/system.slice/pmkvqd.service\n");
    let cg = "sys/fs/cgroup/system.slice/pmkvqd.service";
    write(root, &format!("{cg}/memory.max"), &format!("{}\n", 900 * MIB));
    write(root, &format!("{cg}/memory.high"), "max\n");
    write(root, &format!("{cg}/memory.current"), &format!("{}\n", 300 * MIB));
    let b = next(&mut r, Duration::from_secs(1)).await.expect("cgroup-bound budget");
    assert_eq!((b.bytes, b.source), (250 * MIB, BudgetSource::Cgroup));
    assert_eq!(b.sample.cgroup_max, Some(900 * MIB));
    assert_eq!(b.sample.cgroup_high, None);

    // Memory pressure halves the fraction.
    psi(root, 35.5);
    let b = next(&mut r, Duration::from_secs(1))
        .await
        .expect("pressure lowers the budget");
    assert_eq!((b.bytes, b.source), (125 * MIB, BudgetSource::Pressure));
    assert_eq!(b.sample.psi_some_avg10, Some(35.5));
}

#[tokio::test(start_paused = true)]
async fn jetson_budget_follows_memavailable_not_the_cuda_figure() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // An Orin-like tree: L4T release file, 7.4 GiB shared DRAM; cuMemGetInfo reports 6 GiB "free" (MemFree,
    // ignoring the page cache) while MemAvailable is 1.1 GiB.
    write(root, "etc/nv_tegra_release", "# R36 (release), REVISION: 4.0\n");
    meminfo(root, 7620, 1100);
    let cuda = StaticDevice(DeviceSample {
        total: 7620 * MIB,
        free: 6144 * MIB,
    });
    let mut r = start(Monitor::at_root(root, Box::new(cuda)), cfg(true));
    let b = r.rx.borrow().clone();
    assert!(b.sample.tegra);
    assert_eq!(b.sample.device.unwrap().free, 6144 * MIB);
    assert_eq!(
        (b.bytes, b.source),
        (500 * MIB, BudgetSource::Device),
        "MemAvailable is the device budget"
    );
    meminfo(root, 7620, 600);
    let b = next(&mut r, Duration::from_secs(1))
        .await
        .expect("follows MemAvailable");
    assert_eq!(b.bytes, 250 * MIB);

    // A discrete GPU (no Tegra): its free memory binds a device-resident cache.
    let dir = tempfile::tempdir().unwrap();
    meminfo(dir.path(), 65536, 60000);
    let gpu = StaticDevice(DeviceSample {
        total: 16384 * MIB,
        free: 2100 * MIB,
    });
    let r = start(Monitor::at_root(dir.path(), Box::new(gpu)), cfg(true));
    let b = r.rx.borrow().clone();
    assert_eq!((b.bytes, b.source), (1000 * MIB, BudgetSource::Device));
}
