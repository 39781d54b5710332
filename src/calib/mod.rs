//! Offline calibration consumed by the KV cache: per-layer bit allocation (spec §4).
//!
//! Owns: the exact allocation of final widths under a memory budget and the per-layer shares it yields.
//! Does not run at serve time.
#![forbid(unsafe_code)]

pub mod allocate;
