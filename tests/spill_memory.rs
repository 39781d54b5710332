//! Preemption under memory pressure must not need more memory (issue 14 item 5): spilling streams the cache into
//! its file without a second copy in memory, and a resumed cache is restored at a width that fits its share of the
//! budget instead of at the width it was spilled with. Measured with a counting allocator on this thread.

use pmkvq::kvcache::spill::SpillDir;
use pmkvq::kvcache::{KvGeometry, KvStore, PmkvqConfig, PmkvqStore};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    // `try_with`: the thread's locals may already be gone while it exits.
    let _ = LIVE.try_with(|l| {
        let now = l.get() + delta;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: every call forwards to the system allocator unchanged; the counters are plain thread-local cells.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account(layout.size() as isize);
        // SAFETY: the caller's contract is passed through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as isize));
        // SAFETY: the caller's contract is passed through.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        account(new_size as isize - layout.size() as isize);
        // SAFETY: the caller's contract is passed through.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes allocated on this thread while `f` runs, at the most, above what was live when it started.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, (PEAK.with(Cell::get) - base).max(0) as usize)
}

const GEOM: KvGeometry = KvGeometry {
    layers: 8,
    q_heads: 8,
    kv_heads: 2,
    head_dim: 64,
};

/// A PM-KVQ cache of `tokens` tokens with every layer's body still at 16 bits (no pressure yet).
fn filled(tokens: usize) -> PmkvqStore {
    let mut s = PmkvqStore::new(GEOM, PmkvqConfig::pmkvq(), &[usize::MAX; 8], 8192).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let x: Vec<f32> = (0..tokens * GEOM.kv_dim())
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    for l in 0..GEOM.layers {
        s.append(l, &x, &x, tokens).unwrap();
    }
    s
}

#[test]
fn spilling_streams_and_restoring_fits_the_budget_without_a_second_copy() {
    let s = filled(3000);
    let cache = s.true_bytes();
    let layer = cache / GEOM.layers;
    assert!(s.layer_bits().iter().all(|&b| b == 16));

    // Spill: the file gets every byte, memory gets a write buffer and at most one layer's codec scratch.
    let dir_path = std::env::temp_dir().join(format!("pmkvq-spillmem-{}", std::process::id()));
    let dir = SpillDir::open(&dir_path, None).unwrap();
    let (file, peak) = peak_during(|| dir.write_with("pmkvq-1-1.kv", |out| s.spill_to(out)).unwrap());
    assert!(
        file.bytes >= cache / 2,
        "the file holds the cache ({} bytes)",
        file.bytes
    );
    assert!(
        peak < layer,
        "spilling a {cache}-byte cache allocated {peak} bytes at once (one layer is {layer})"
    );
    let map = file.map().unwrap();
    assert_eq!(&*map, &s.spill().unwrap()[..], "the streamed file is the store's spill");

    // Restore into a third of what it held: lowered layer by layer as it is read.
    let ahead = 1;
    let total = s.floor_bytes(ahead) + (cache - s.floor_bytes(ahead)) / 3;
    let mut r = PmkvqStore::new(GEOM, PmkvqConfig::pmkvq(), &[usize::MAX; 8], 8192).unwrap();
    let (res, peak) = peak_during(|| r.restore_within(&map, total, None, ahead));
    res.unwrap();
    assert!(r.true_bytes() <= total, "{} > {total}", r.true_bytes());
    assert_eq!(r.len(0), 3000);
    assert!(
        peak <= total + 2 * layer,
        "restoring into {total} bytes allocated {peak} at once (the spilled cache is {cache}, a layer {layer})"
    );
    // The same cache as restoring at full width and fitting afterwards (what resume did before), bit for bit.
    let mut old = PmkvqStore::new(GEOM, PmkvqConfig::pmkvq(), &[usize::MAX; 8], 8192).unwrap();
    let (_, old_peak) = peak_during(|| {
        old.restore(&map).unwrap();
        old.set_total_budget(total, None, ahead).unwrap();
    });
    assert!(
        old_peak >= cache,
        "the old way held the whole cache at once ({old_peak} of {cache})"
    );
    assert_eq!(r.layer_bits(), old.layer_bits());
    assert_eq!(r.spill().unwrap(), old.spill().unwrap());
    assert!(
        r.layer_bits().iter().any(|&b| b < 16),
        "it had to lower precision to fit"
    );

    // Below the floor it is refused with the numbers, not restored over the budget.
    let mut small = PmkvqStore::new(GEOM, PmkvqConfig::pmkvq(), &[usize::MAX; 8], 8192).unwrap();
    let e = small
        .restore_within(&map, s.floor_bytes(ahead) / 2, None, ahead)
        .unwrap_err();
    assert!(matches!(e, pmkvq::kvcache::KvError::OutOfBudget { .. }), "{e}");
    drop((map, file));
    let _ = std::fs::remove_dir_all(&dir_path);
}
