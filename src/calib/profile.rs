//! The calibration profile: one versioned JSON file bound to the model it was measured on.

use crate::kvcache::pmkvq_plan::{level, Sensitivity};
use crate::kvcache::quant::{Bits, ShiftMode};
use crate::kvcache::{KeyScales, KvExtensions, KvMethod, MethodSpec};
use crate::model::{Arch, Model, RopeLayout};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Version 2 adds K and V sensitivity apart (for the run-time plan) and whether calibration ran rotated;
/// version 1 profiles still load (joint sensitivity, unrotated).
pub const PROFILE_VERSION: u32 = 2;

/// Where `profile = "auto"` (the daemon's and the CLI's default) looks.
pub const AUTO_PROFILE: &str = "profiles/default.profile.json";

/// Which calibration profile to use: `auto`, `none` or a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProfileChoice {
    /// [`AUTO_PROFILE`], or another `*.profile.json` beside it, calibrated for this model; none otherwise.
    Auto,
    None,
    Path(PathBuf),
}

impl std::str::FromStr for ProfileChoice {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => ProfileChoice::Auto,
            "none" | "" => ProfileChoice::None,
            p => ProfileChoice::Path(PathBuf::from(p)),
        })
    }
}

/// A profile checked against the model it serves, and the file it came from.
#[derive(Clone, Debug)]
pub struct LoadedProfile {
    pub profile: Arc<Profile>,
    pub path: PathBuf,
}

/// The one profile loader of the daemon and the CLI: resolve `choice` for `model`. Returns the profile, if any,
/// and the model's SHA-256 (empty when nothing had to be checked against it). A chosen path must load and match
/// the model; `auto` quietly goes without when there is no profile file, and with a warning when none of them
/// loads and belongs to this model.
pub fn resolve_profile(choice: &ProfileChoice, model: &Model) -> Result<(Option<LoadedProfile>, String), ProfileError> {
    let (candidates, required) = match choice {
        ProfileChoice::None => return Ok((None, String::new())),
        ProfileChoice::Path(p) => (vec![p.clone()], true),
        ProfileChoice::Auto => {
            let found = auto_candidates(Path::new(AUTO_PROFILE));
            if found.is_empty() {
                tracing::info!(path = AUTO_PROFILE, "no calibration profile; equal per-layer shares");
                return Ok((None, String::new()));
            }
            (found, false)
        }
    };
    let sha = crate::fetch::model_sha256(&model.source).map_err(|source| ProfileError::Io {
        file: model.source.display().to_string(),
        source,
    })?;
    let mut first_err = None;
    for path in candidates {
        match Profile::load(&path).and_then(|p| p.check(model, &sha, &path).map(|_| p)) {
            Ok(p) => {
                return Ok((
                    Some(LoadedProfile {
                        profile: Arc::new(p),
                        path,
                    }),
                    sha,
                ))
            }
            Err(e) if required => return Err(e),
            Err(e) => {
                first_err.get_or_insert((path, e));
            }
        }
    }
    if let Some((path, e)) = first_err {
        tracing::warn!(path = %path.display(), error = %e, "no automatic profile matches the model; equal per-layer shares");
    }
    Ok((None, sha))
}

/// Where `auto` looks, in order: the default profile, then every other `*.profile.json` beside it (one per
/// model a deployment ships, e.g. `gemma-3-270m.profile.json`); the first calibrated for the model is used.
fn auto_candidates(default: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = default.exists().then(|| default.to_path_buf()).into_iter().collect();
    let dir = default
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut others: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".profile.json") && p.as_path() != default)
        .collect();
    others.sort();
    out.extend(others);
    out
}

/// The store configuration for `method`: PM-KVQ as shipped takes everything the profile measured — per-layer
/// shares, key scales, and where the backend's caches support them (`ext`): the rotation it was calibrated with
/// (always, without a profile); the K/V sensitivity its widths are planned on, the fitted 2-bit floor
/// ([`ShiftMode::Fitted`], with or without a profile) and the budget-following window. The baselines run as
/// they are. The daemon's requests and the CLI both go through here.
pub fn method_spec(method: KvMethod, profile: Option<&Profile>, ext: KvExtensions) -> MethodSpec {
    let label = method.to_string();
    let p = profile.filter(|_| matches!(method, KvMethod::Pmkvq(_)));
    let method = match (method, p) {
        (KvMethod::Pmkvq(mut c), p) => {
            if ext.planning {
                // widths planned over one budget for every body: on the calibrated sensitivity, or without a
                // profile every layer alike (equal shares would drop every layer to the floor together and leave
                // bytes unused)
                c.sensitivity = Some(Arc::new(p.map_or_else(Sensitivity::uniform, |p| p.sensitivity())));
                // below the floor with a full window, the window yields instead of the sequence ending
                c.elastic_window = true;
                // the paper's 128-token window at 16 bits until the budget binds, then 8-bit and at most a sixth
                if c.window == crate::kvcache::PmkvqConfig::pmkvq().window && c.window_share.is_none() {
                    c.window_share = Some(crate::kvcache::PmkvqConfig::SHIPPED_WINDOW_SHARE);
                }
            }
            // the fitted 2-bit floor needs no calibration either (a profile measured without it still plans well:
            // its 2-bit sensitivity only overstates the floor's cost)
            if ext.fitted_floor && c.shift == ShiftMode::Equivalent {
                c.shift = ShiftMode::Fitted;
            }
            KvMethod::Pmkvq(c)
        }
        (m, _) => m,
    };
    MethodSpec {
        shares: p.map(|p| p.shares.clone()),
        key_scales: p
            .filter(|p| p.alpha.iter().any(|a| *a > 0.0))
            .map(|p| p.channel_scales()),
        // rotation needs no calibration: without a profile the progressive cache rotates too; a profile
        // calibrated unrotated (version 1, `--no-rotate`) is used as it was measured
        rotate: ext.rotation && matches!(method, KvMethod::Pmkvq(_)) && p.is_none_or(|p| p.rotated),
        ..MethodSpec::plain(method, None, &label)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibSettings {
    pub samples: usize,
    pub seq_len: usize,
    pub effective_len: usize,
    /// Positional-interpolation stride `effective_len / seq_len`.
    pub pi_stride: usize,
    pub choices: Vec<u32>,
    /// Average width per layer the allocation was solved for.
    pub avg_bits: f64,
    pub alpha_bits: u32,
    pub data: Vec<String>,
    pub seed: u64,
    /// The 2-bit width was measured as the fitted floor (profiles written before it existed: shifted).
    #[serde(default)]
    pub fit: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub version: u32,
    pub model_sha256: String,
    pub model_file: String,
    pub arch: Arch,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `kv_heads · head_dim`.
    pub d_kv: usize,
    pub rope_layout: RopeLayout,
    pub settings: CalibSettings,
    /// Widths sensitivity was measured at (columns of the two tables below).
    pub widths: Vec<u32>,
    /// Mean KL(p_fp ‖ p_quant) per token with only that layer's K/V quantized: `[layer][width]`.
    pub sensitivity_kl: Vec<Vec<f64>>,
    /// Increase in mean next-token loss, same setting: `[layer][width]`.
    pub sensitivity_loss: Vec<Vec<f64>>,
    /// Chosen final width per layer and each layer's share of any total budget.
    pub bits: Vec<u32>,
    pub shares: Vec<f64>,
    /// α per layer and the resulting key scales `max|K|^α` per KV head and rotary pair:
    /// `[layer][kv_head·(d/2) + pair]`.
    pub alpha: Vec<f64>,
    pub key_scales: Vec<Vec<f32>>,
    /// Calibration ran with the rotation (`+rot`) in place: sensitivity and α were measured on rotated K/V, and
    /// the method as shipped rotates.
    #[serde(default)]
    pub rotated: bool,
    /// Mean KL per token with only that layer's K (resp. V) quantized: `[layer][width]` (version 2).
    #[serde(default)]
    pub sensitivity_k: Vec<Vec<f64>>,
    #[serde(default)]
    pub sensitivity_v: Vec<Vec<f64>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{file}: {source}")]
    Io { file: String, source: std::io::Error },
    #[error("{file}: not a profile: {what}")]
    Format { file: String, what: String },
    #[error("{file}: profile version {got}, this build reads version {want}")]
    Version { file: String, got: u32, want: u32 },
    #[error("{file}: profile belongs to another model: {what}")]
    WrongModel { file: String, what: String },
}

impl Profile {
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            file: file.clone(),
            source,
        })?;
        let p: Profile = serde_json::from_str(&text).map_err(|e| ProfileError::Format {
            file: file.clone(),
            what: e.to_string(),
        })?;
        if p.version == 0 || p.version > PROFILE_VERSION {
            return Err(ProfileError::Version {
                file,
                got: p.version,
                want: PROFILE_VERSION,
            });
        }
        let n = p.layers;
        let ok = p.bits.len() == n
            && p.shares.len() == n
            && p.alpha.len() == n
            && p.key_scales.len() == n
            && p.key_scales.iter().all(|s| s.len() == p.kv_heads * p.head_dim / 2)
            && p.key_scales.iter().flatten().all(|s| s.is_finite() && *s > 0.0)
            && p.sensitivity_kl.len() == n
            && [&p.sensitivity_kl, &p.sensitivity_k, &p.sensitivity_v].iter().all(|t| {
                t.iter()
                    .all(|r| r.len() == p.widths.len() && r.iter().all(|x| x.is_finite()))
            })
            && [&p.sensitivity_k, &p.sensitivity_v]
                .iter()
                .all(|t| t.is_empty() || t.len() == n)
            && p.widths.iter().all(|&w| Bits::from_count(w).is_some());
        if !ok {
            return Err(ProfileError::Format {
                file,
                what: "per-layer tables do not match the layer count".into(),
            });
        }
        Ok(p)
    }

    pub fn save(&self, path: &Path) -> Result<(), ProfileError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| ProfileError::Format {
            file: path.display().to_string(),
            what: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(|source| ProfileError::Io {
            file: path.display().to_string(),
            source,
        })
    }

    /// Check the profile was made for `model` (whose file hashes to `sha256`).
    pub fn check(&self, model: &Model, sha256: &str, file: &Path) -> Result<(), ProfileError> {
        let c = &model.config;
        let wrong = |what: String| ProfileError::WrongModel {
            file: file.display().to_string(),
            what,
        };
        if self.model_sha256 != sha256 {
            return Err(wrong(format!(
                "model sha256 {}, profile made for {}",
                sha256, self.model_sha256
            )));
        }
        if self.layers != c.layers || self.kv_heads != c.kv_heads || self.head_dim != c.head_dim {
            return Err(wrong(format!(
                "geometry {}x{}x{}, profile {}x{}x{}",
                c.layers, c.kv_heads, c.head_dim, self.layers, self.kv_heads, self.head_dim
            )));
        }
        if self.rope_layout != c.rope.layout {
            return Err(wrong(format!(
                "rope layout {:?}, profile {:?}",
                c.rope.layout, self.rope_layout
            )));
        }
        Ok(())
    }

    /// Per layer, the cost of K and of V at 16/8/4/2 bits for the run-time plan. Version 1 profiles measured K
    /// and V together: each side gets half. A width not measured is estimated from the next narrower one (÷16:
    /// two more bits quarter the step, and the KL follows the squared error); costs never fall as bits fall.
    pub fn sensitivity(&self) -> Sensitivity {
        let side = |table: &[Vec<f64>], scale: f64| -> Vec<[f64; 4]> {
            table
                .iter()
                .map(|row| {
                    let mut at = [None; 4];
                    for (w, x) in self.widths.iter().zip(row) {
                        if let Some(b) = Bits::from_count(*w) {
                            at[level(b)] = Some(x.max(0.0) * scale);
                        }
                    }
                    let mut out = [0.0; 4];
                    let mut narrower = None;
                    for lvl in (1..4).rev() {
                        out[lvl] = at[lvl].or(narrower.map(|n: f64| n / 16.0)).unwrap_or(0.0);
                        narrower = Some(out[lvl]);
                    }
                    for lvl in 1..4 {
                        out[lvl] = out[lvl].max(out[lvl - 1]);
                    }
                    out
                })
                .collect()
        };
        if self.sensitivity_k.len() == self.layers && self.sensitivity_v.len() == self.layers {
            Sensitivity {
                k: side(&self.sensitivity_k, 1.0),
                v: side(&self.sensitivity_v, 1.0),
            }
        } else {
            let joint = side(&self.sensitivity_kl, 0.5);
            Sensitivity {
                k: joint.clone(),
                v: joint,
            }
        }
    }

    /// Per-channel key scales for `KeyScaled`.
    pub fn channel_scales(&self) -> KeyScales {
        Arc::new(
            self.key_scales
                .iter()
                .map(|l| super::capture::expand_pair_scales(l, self.kv_heads, self.head_dim, self.rope_layout))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvcache::PmkvqConfig;

    /// Without a profile the shipped method still plans its widths (on the uniform table), with the extensions
    /// the backend supports; without planning (the GPU) it splits by shares, and rotates where the caches can.
    #[test]
    fn without_a_profile_pmkvq_plans_on_the_uniform_table_where_the_backend_can() {
        let spec = |ext| method_spec(KvMethod::Pmkvq(PmkvqConfig::pmkvq()), None, ext);
        let all = spec(KvExtensions::ALL);
        match all.method {
            KvMethod::Pmkvq(c) => assert_eq!(c.sensitivity.as_deref(), Some(&Sensitivity::uniform())),
            m => panic!("{m:?}"),
        }
        assert!(all.rotate);
        let device = spec(KvExtensions {
            rotation: true,
            fitted_floor: true,
            planning: false,
        });
        match device.method {
            KvMethod::Pmkvq(c) => {
                assert!(c.sensitivity.is_none());
                assert_eq!(c.shift, ShiftMode::Fitted);
                assert!(!c.elastic_window && c.window_share.is_none());
            }
            m => panic!("{m:?}"),
        }
        assert!(
            device.rotate,
            "the device store rotates: pmkvq on a GPU takes the rotation"
        );
        let none = spec(KvExtensions::NONE);
        assert!(!none.rotate);
        match none.method {
            KvMethod::Pmkvq(c) => assert_eq!(c.shift, ShiftMode::Equivalent),
            m => panic!("{m:?}"),
        }
        // baselines never rotate by default
        assert!(!method_spec("kivi:2".parse().unwrap(), None, KvExtensions::ALL).rotate);
    }
}
