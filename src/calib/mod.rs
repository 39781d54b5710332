//! Offline calibration consumed by the KV cache (spec §4–5): per-layer sensitivity, exact bit allocation as
//! per-layer shares of any budget, max-|K| statistics with positional interpolation, the α search for key
//! reparameterization, and the versioned profile file bound to the model's hash.
//!
//! Owns: everything that is measured once per model. Does not run at serve time; the daemon and the CLI load
//! the profile. Invariants: positional interpolation is used in every calibration pass and never at inference;
//! key scales are shared by both channels of a rotary pair in the model's own layout.
#![forbid(unsafe_code)]

pub mod allocate;
pub mod capture;
pub mod profile;
pub mod run;

pub use profile::{method_spec, resolve_profile, LoadedProfile, Profile, ProfileChoice, AUTO_PROFILE};
pub use run::{calibrate, CalibConfig, Stage};
