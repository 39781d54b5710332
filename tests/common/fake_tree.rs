//! Fake /proc, /sys and /etc trees for the samplers and `pmkvq doctor`.

use std::path::Path;

/// Write `text` to `root/rel`, creating directories.
pub fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// `root/proc/meminfo` with MemTotal and MemAvailable (MemFree deliberately unrelated, as on a real machine).
pub fn meminfo(root: &Path, total_mib: u64, avail_mib: u64) {
    write(
        root,
        "proc/meminfo",
        &format!(
            "MemTotal:       {} kB\nMemFree:         123456 kB\nMemAvailable:   {} kB\nBuffers:          1000 kB\n",
            total_mib * 1024,
            avail_mib * 1024
        ),
    );
}
