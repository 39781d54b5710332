//! `ModelConfig`: the model's geometry and numerics, read in one place from GGUF metadata or HF config.json.

use super::ModelError;
use candle_core::quantized::gguf_file::Value;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    /// Qwen2 without q/k/v biases, with an RMSNorm over each head of q and k before RoPE.
    Qwen3,
    /// Gemma 3: q/k norms, RMSNorms before *and after* attention and the MLP, GeGLU (tanh GELU), embeddings
    /// scaled by √hidden, sliding-window ("local") layers beside global ones with their own RoPE base.
    Gemma3,
}

impl Arch {
    /// Whether q and k get a per-head RMSNorm (`q_norm`, `k_norm`) before RoPE.
    pub fn qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }

    /// Whether the attention and MLP outputs get their own RMSNorm before the residual add (Gemma 2/3).
    pub fn post_norms(self) -> bool {
        self == Arch::Gemma3
    }

    /// Whether the MLP gate is GELU (tanh approximation, "GeGLU") rather than SiLU.
    pub fn gelu(self) -> bool {
        self == Arch::Gemma3
    }
}

/// Sliding-window ("local") attention: a local layer's token at position p attends to positions
/// `p - window + 1 ..= p` only, so its cache never needs more than the last `window - 1` tokens before a step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SlidingWindow {
    /// Tokens a query sees, itself included (llama.cpp's `n_swa`, HF's `sliding_window`).
    pub window: usize,
    /// `local[l]`: layer `l` is a sliding-window layer (the others attend over everything).
    pub local: Vec<bool>,
    /// RoPE of the local layers (Gemma 3: base 10 000, unscaled; the global layers use `ModelConfig::rope`).
    pub rope: RopeConfig,
}

impl SlidingWindow {
    /// Gemma 3's layout: every `pattern`-th layer (1-based) is global, the rest local (llama.cpp
    /// `set_swa_pattern`).
    pub fn every(pattern: usize, layers: usize, window: usize, rope: RopeConfig) -> Self {
        SlidingWindow {
            window,
            local: (0..layers).map(|l| pattern == 0 || (l + 1) % pattern != 0).collect(),
            rope,
        }
    }
}

/// Which channels RoPE rotates together. KV calibration (key scales shared per rotary pair) depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeLayout {
    /// Pairs `(2j, 2j+1)`: GGUF files converted from HF Llama (llama.cpp permutes q/k rows for this).
    Interleaved,
    /// Pairs `(j, j+d/2)` ("rotate_half"): HF checkpoints and GGUF qwen2 / qwen3.
    Neox,
}

/// Llama 3.x frequency scaling (HF `rope_scaling.rope_type = "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RopeConfig {
    pub theta: f32,
    pub layout: RopeLayout,
    /// Rotated channels per head (= head_dim for every model in scope).
    pub dim: usize,
    pub llama3: Option<Llama3Scaling>,
    /// Linear position scaling (`rope.scaling.type = linear`): positions are divided by this factor.
    pub linear: Option<f32>,
}

impl RopeConfig {
    /// Inverse frequencies per rotary pair (`base^(-2j/d)`), including llama3 scaling.
    pub fn inv_freqs(&self) -> Vec<f32> {
        let half = self.dim / 2;
        (0..half)
            .map(|j| {
                let f = 1.0 / self.theta.powf(2.0 * j as f32 / self.dim as f32);
                match self.llama3 {
                    None => f,
                    Some(s) => llama3_scale(f, s),
                }
            })
            .collect()
    }

    /// Per-pair divisor of the angle (ggml's `freq_factors`): exactly 1 without scaling, the factor for linear
    /// scaling.
    pub fn freq_factors(&self) -> Vec<f32> {
        match self.llama3 {
            None => vec![self.linear.unwrap_or(1.0); self.dim / 2],
            Some(s) => (0..self.dim / 2)
                .map(|j| {
                    let f = 1.0 / self.theta.powf(2.0 * j as f32 / self.dim as f32);
                    f / llama3_scale(f, s)
                })
                .collect(),
        }
    }

    /// cos/sin of every pair's angle at position `pos`, computed the way ggml does (`θ_0 = pos`,
    /// `θ_j = θ_{j-1}·base^(-2/d)` in f32): RoPE feeds 8-bit activation quantization, where a last-bit
    /// difference in an angle can flip a code, so we follow llama.cpp's arithmetic rather than the closed form.
    pub fn angles(&self, pos: f32, factors: &[f32], cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        let step = self.theta.powf(-2.0 / self.dim as f32);
        let mut theta = pos;
        for &ff in factors {
            let (s, c) = (theta / ff).sin_cos();
            cos.push(c);
            sin.push(s);
            theta *= step;
        }
    }
}

/// HF `_compute_llama3_parameters`: long wavelengths are divided by `factor`, short ones kept, the band
/// between interpolated smoothly.
fn llama3_scale(freq: f32, s: Llama3Scaling) -> f32 {
    let old = s.original_max_position as f32;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f32::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub rms_eps: f32,
    pub rope: RopeConfig,
    pub context_length: usize,
    pub tie_embeddings: bool,
    /// Sliding-window layers, where the model has them (Gemma 3).
    pub sliding: Option<SlidingWindow>,
    /// Multiplier of the token embeddings (Gemma: √hidden).
    pub embed_scale: Option<f32>,
    /// Extra factor on the queries before attention (which scales scores by 1/√head_dim): Gemma 3 27B scales
    /// by 1/√(hidden/heads) instead (`query_pre_attn_scalar`). 1 for every other model.
    pub query_scale: f32,
}

/// More layers than any released model has (Llama 3.1 405B: 126); a larger `block_count` is a corrupt file.
pub const MAX_LAYERS: usize = 4096;

impl ModelConfig {
    /// The sliding-window layers as the KV stores see them.
    pub fn windowing(&self) -> Option<crate::kvcache::Windowing> {
        self.sliding.as_ref().map(|s| crate::kvcache::Windowing {
            window: s.window,
            local: s.local.clone(),
        })
    }

    /// Whether layer `l` is a sliding-window layer.
    pub fn is_local(&self, l: usize) -> bool {
        self.sliding
            .as_ref()
            .is_some_and(|s| s.local.get(l).copied().unwrap_or(false))
    }

    /// Width of one token's K (or V) in one layer: `kv_heads · head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    fn validate(self, file: &Path) -> Result<Self, ModelError> {
        let bad = |what: String| ModelError::Format {
            file: file.to_path_buf(),
            what,
        };
        if self.layers == 0
            || self.heads == 0
            || self.kv_heads == 0
            || self.hidden == 0
            || self.head_dim == 0
            || self.vocab_size == 0
        {
            return Err(bad(format!("zero-sized geometry: {self:?}")));
        }
        if self.context_length < 2 {
            return Err(bad(format!(
                "context_length must be >= 2 (a prompt token and a generated one), got {}",
                self.context_length
            )));
        }
        if self.layers > MAX_LAYERS {
            return Err(bad(format!("block_count must be <= {MAX_LAYERS}, got {}", self.layers)));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(bad(format!(
                "{} query heads not a multiple of {} kv heads",
                self.heads, self.kv_heads
            )));
        }
        if let Some(sw) = &self.sliding {
            if sw.window < 1 || sw.local.len() != self.layers || sw.rope.dim != self.head_dim {
                return Err(bad(format!(
                    "sliding window {} over {} layer flags with rope dim {} (need >= 1, {} layers, rope dim {})",
                    sw.window,
                    sw.local.len(),
                    sw.rope.dim,
                    self.layers,
                    self.head_dim
                )));
            }
        }
        if !self.head_dim.is_multiple_of(2) || self.rope.dim != self.head_dim {
            return Err(bad(format!(
                "rope dimension {} must equal the (even) head dim {}",
                self.rope.dim, self.head_dim
            )));
        }
        Ok(self)
    }

    pub fn from_gguf(md: &HashMap<String, Value>, vocab_len: usize, file: &Path) -> Result<Self, ModelError> {
        let bad = |what: String| ModelError::Format {
            file: file.to_path_buf(),
            what,
        };
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| bad("missing general.architecture".into()))?
            .clone();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(ModelError::UnsupportedArch {
                    file: file.to_path_buf(),
                    arch: other.to_string(),
                })
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let get_u = |k: &str| -> Result<usize, ModelError> {
            md.get(&key(k))
                .ok_or_else(|| bad(format!("missing metadata {}", key(k))))
                .and_then(|v| {
                    v.to_u64()
                        .or_else(|_| v.to_u32().map(u64::from))
                        .map_err(|e| bad(format!("{}: {e}", key(k))))
                })
                .map(|v| v as usize)
        };
        let get_f = |k: &str| md.get(&key(k)).and_then(|v| v.to_f32().ok());
        let hidden = get_u("embedding_length")?;
        let heads = get_u("attention.head_count")?;
        let kv_heads = get_u("attention.head_count_kv").unwrap_or(heads);
        let head_dim = get_u("attention.key_length").unwrap_or(hidden / heads.max(1));
        let rope_dim = get_u("rope.dimension_count").unwrap_or(head_dim);
        let scaling = md
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str());
        let llama3 = match scaling {
            Some("llama3") => Some(Llama3Scaling {
                factor: get_f("rope.scaling.factor").unwrap_or(8.0),
                low_freq_factor: get_f("rope.scaling.low_freq_factor").unwrap_or(1.0),
                high_freq_factor: get_f("rope.scaling.high_freq_factor").unwrap_or(4.0),
                original_max_position: get_u("rope.scaling.original_context_length").unwrap_or(8192),
            }),
            _ => None,
        };
        let linear = match scaling {
            Some("linear") => match get_f("rope.scaling.factor") {
                Some(f) if f.is_finite() && f > 0.0 => Some(f),
                other => {
                    return Err(bad(format!(
                        "{}: {other:?} is not a positive factor",
                        key("rope.scaling.factor")
                    )))
                }
            },
            None | Some("none") | Some("llama3") => None,
            Some(other) => {
                return Err(bad(format!(
                    "{}: `{other}` is not supported (none, linear, llama3)",
                    key("rope.scaling.type")
                )))
            }
        };
        let vocab_size = get_u("vocab_size").unwrap_or(vocab_len);
        let layers = get_u("block_count")?;
        let gemma = arch == Arch::Gemma3;
        let sliding = match (gemma, get_u("attention.sliding_window")) {
            // llama.cpp: Gemma 3's local layers use RoPE base 10 000 without scaling; every 6th layer is global
            (true, Ok(window)) => Some(SlidingWindow::every(
                6,
                layers.min(MAX_LAYERS),
                window,
                RopeConfig {
                    theta: 10_000.0,
                    layout: RopeLayout::Neox,
                    dim: rope_dim,
                    llama3: None,
                    linear: None,
                },
            )),
            _ => None,
        };
        ModelConfig {
            arch,
            vocab_size,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            ffn: get_u("feed_forward_length")?,
            rms_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope: RopeConfig {
                theta: get_f("rope.freq_base").unwrap_or(10_000.0),
                layout: match arch {
                    Arch::Llama => RopeLayout::Interleaved,
                    Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => RopeLayout::Neox,
                },
                dim: rope_dim,
                llama3,
                linear,
            },
            context_length: get_u("context_length").unwrap_or(4096),
            tie_embeddings: false, // decided by the loader from the tensor list
            sliding,
            embed_scale: gemma.then(|| (hidden as f32).sqrt()),
            // llama.cpp: `f_attention_scale` is 1/√(n_embd/n_head) for Gemma 3 27B (62 layers), else 1/√head_dim
            query_scale: if gemma && layers == 62 && heads > 0 {
                (head_dim as f32 / (hidden as f32 / heads as f32)).sqrt()
            } else {
                1.0
            },
        }
        .validate(file)
    }

    pub fn from_hf_json(text: &str, file: &Path) -> Result<Self, ModelError> {
        let bad = |what: String| ModelError::Format {
            file: file.to_path_buf(),
            what,
        };
        let j: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let archs = j["architectures"].as_array().cloned().unwrap_or_default();
        let arch_name = archs.first().and_then(|v| v.as_str()).unwrap_or("");
        let arch = match arch_name {
            "LlamaForCausalLM" => Arch::Llama,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            other => {
                return Err(ModelError::UnsupportedArch {
                    file: file.to_path_buf(),
                    arch: other.to_string(),
                })
            }
        };
        let u = |k: &str| {
            j[k].as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("missing or non-integer `{k}`")))
        };
        let hidden = u("hidden_size")?;
        let heads = u("num_attention_heads")?;
        let head_dim = u("head_dim").unwrap_or(hidden / heads.max(1));
        let rs = &j["rope_scaling"];
        let llama3 = (rs["rope_type"].as_str() == Some("llama3") || rs["type"].as_str() == Some("llama3")).then(|| {
            Llama3Scaling {
                factor: rs["factor"].as_f64().unwrap_or(8.0) as f32,
                low_freq_factor: rs["low_freq_factor"].as_f64().unwrap_or(1.0) as f32,
                high_freq_factor: rs["high_freq_factor"].as_f64().unwrap_or(4.0) as f32,
                original_max_position: rs["original_max_position_embeddings"].as_u64().unwrap_or(8192) as usize,
            }
        });
        ModelConfig {
            arch,
            vocab_size: u("vocab_size")?,
            hidden,
            layers: u("num_hidden_layers")?,
            heads,
            kv_heads: u("num_key_value_heads").unwrap_or(heads),
            head_dim,
            ffn: u("intermediate_size")?,
            rms_eps: j["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
            rope: RopeConfig {
                theta: j["rope_theta"].as_f64().unwrap_or(10_000.0) as f32,
                layout: RopeLayout::Neox,
                dim: head_dim,
                llama3,
                linear: None,
            },
            context_length: u("max_position_embeddings").unwrap_or(4096),
            tie_embeddings: j["tie_word_embeddings"].as_bool().unwrap_or(false),
            sliding: None,
            embed_scale: None,
            query_scale: 1.0,
        }
        .validate(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192,
        };
        let rope = RopeConfig {
            theta: 500_000.0,
            layout: RopeLayout::Neox,
            dim: 128,
            llama3: Some(s),
            linear: None,
        };
        let plain = RopeConfig {
            llama3: None,
            ..rope.clone()
        };
        let (a, b) = (rope.inv_freqs(), plain.inv_freqs());
        assert_eq!(a[0], b[0]);
        assert!((a[63] - b[63] / 8.0).abs() < 1e-12);
        assert!(a.iter().zip(&b).all(|(x, y)| x <= y));
    }
}
