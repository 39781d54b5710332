//! GGUF v2/v3 loading: candle's reader parses the header; tensor bytes are read with positioned reads.

use super::config::ModelConfig;
use super::linear::{Linear, WeightData};
use super::tokenizer::{GgufVocab, Tokenizer};
use super::{build_parts, ModelError, ModelParts, Role, WeightSource};
use crate::cpu::{BlockFormat, QK};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul};
use half::{bf16, f16};
use std::path::{Path, PathBuf};

/// Tensors are read with positioned reads straight into the buffers the model keeps, so loading never holds a
/// second copy of the weights (a memory map plus owned copies would double peak RSS on a small board).
struct GgufSource {
    file: PathBuf,
    handle: std::fs::File,
    len: u64,
    content: Content,
}

pub(crate) fn open(path: &Path) -> Result<(std::fs::File, Content), ModelError> {
    let io = |source| ModelError::Io {
        file: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut reader = std::io::BufReader::new(&f);
    // candle's reader panics on some hostile headers (`general.alignment = 0` divides by zero): a model file
    // is input, so its parser's panic is this file's error, never the daemon's end.
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)));
    let content = match read {
        Ok(r) => r.map_err(|e| format!("not a readable GGUF file: {e}")),
        Err(_) => Err("not a readable GGUF file: its header is malformed (e.g. `general.alignment` = 0)".into()),
    }
    .map_err(|what| ModelError::Format {
        file: path.to_path_buf(),
        what,
    })?;
    Ok((f, content))
}

fn strings(md: &std::collections::HashMap<String, Value>, key: &str) -> Option<Vec<String>> {
    md.get(key)?
        .to_vec()
        .ok()?
        .iter()
        .map(|v| v.to_string().ok().cloned())
        .collect()
}

fn read_tokenizer(c: &Content, file: &Path) -> Result<Tokenizer, ModelError> {
    let md = &c.metadata;
    let bad = |what: &str| ModelError::Format {
        file: file.to_path_buf(),
        what: what.to_string(),
    };
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| bad("missing tokenizer.ggml.model"))?;
    let tokens = strings(md, "tokenizer.ggml.tokens").ok_or_else(|| bad("missing tokenizer.ggml.tokens"))?;
    let types: Vec<i32> = md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
        .unwrap_or_default();
    let scores: Option<Vec<f32>> = md
        .get("tokenizer.ggml.scores")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|x| x.to_f32().unwrap_or(0.0)).collect());
    let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let flag = |k: &str| md.get(k).and_then(|v| v.to_bool().ok());
    Tokenizer::from_gguf(GgufVocab {
        model: model.as_str(),
        pre: md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str()),
        kinds: GgufVocab::raw_kinds(&types),
        tokens,
        scores,
        merges: strings(md, "tokenizer.ggml.merges"),
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        eot: id("tokenizer.ggml.eot_token_id"),
        add_bos: flag("tokenizer.ggml.add_bos_token"),
        add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
        chat_template: md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned(),
    })
}

pub(crate) fn load(path: &Path) -> Result<(ModelParts, Tokenizer), ModelError> {
    let (handle, content) = open(path)?;
    let tokenizer = read_tokenizer(&content, path)?;
    let mut cfg = ModelConfig::from_gguf(&content.metadata, tokenizer.vocab_size(), path)?;
    cfg.tie_embeddings = !content.tensor_infos.contains_key("output.weight");
    let len = handle
        .metadata()
        .map_err(|source| ModelError::Io {
            file: path.to_path_buf(),
            source,
        })?
        .len();
    let src = GgufSource {
        file: path.to_path_buf(),
        handle,
        len,
        content,
    };
    Ok((build_parts(cfg, &src)?, tokenizer))
}

impl GgufSource {
    /// The tensor's bytes, bounds-checked against the file, and its dtype.
    fn bytes(&self, name: &str, want: &[usize]) -> Result<(Vec<u8>, GgmlDType), ModelError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                file: self.file.clone(),
                name: name.to_string(),
            })?;
        let dims = info.shape.dims();
        // Vectors may be stored as [n] or [1, n].
        let squeezed: Vec<usize> = dims
            .iter()
            .copied()
            .skip_while(|&d| d == 1 && dims.len() > want.len())
            .collect();
        if squeezed != want {
            return Err(ModelError::BadShape {
                file: self.file.clone(),
                tensor: name.into(),
                expected: want.to_vec(),
                got: dims.to_vec(),
            });
        }
        let elems: usize = want.iter().product();
        let bs = info.ggml_dtype.block_size();
        if !elems.is_multiple_of(bs) || !want.last().copied().unwrap_or(0).is_multiple_of(bs) {
            return Err(ModelError::Format {
                file: self.file.clone(),
                what: format!("tensor `{name}`: row length not a multiple of the {bs}-element block"),
            });
        }
        let size = elems / bs * info.ggml_dtype.type_size();
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        if start.checked_add(size as u64).is_none_or(|e| e > self.len) {
            return Err(ModelError::Format {
                file: self.file.clone(),
                what: format!(
                    "tensor `{name}` needs bytes {start}..{} but the file has {} (truncated?)",
                    start.saturating_add(size as u64),
                    self.len
                ),
            });
        }
        let mut buf = vec![0u8; size];
        std::os::unix::fs::FileExt::read_exact_at(&self.handle, &mut buf, start).map_err(|source| ModelError::Io {
            file: self.file.clone(),
            source,
        })?;
        Ok((buf, info.ggml_dtype))
    }

    fn to_f32(&self, name: &str, bytes: &[u8], dtype: GgmlDType, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        Ok(match dtype {
            GgmlDType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            GgmlDType::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            GgmlDType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                let qt = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    other,
                    bytes,
                    shape.to_vec(),
                    &candle_core::Device::Cpu,
                )
                .map_err(|e| ModelError::UnsupportedDtype {
                    file: self.file.clone(),
                    tensor: name.into(),
                    dtype: format!("{other:?} ({e})"),
                })?;
                qt.dequantize(&candle_core::Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            }
        })
    }
}

impl WeightSource for GgufSource {
    fn name(&self, role: Role) -> String {
        match role {
            Role::Embed => "token_embd.weight".into(),
            Role::Output => "output.weight".into(),
            Role::OutputNorm => "output_norm.weight".into(),
            Role::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            Role::Q(l) => format!("blk.{l}.attn_q.weight"),
            Role::K(l) => format!("blk.{l}.attn_k.weight"),
            Role::V(l) => format!("blk.{l}.attn_v.weight"),
            Role::O(l) => format!("blk.{l}.attn_output.weight"),
            Role::QBias(l) => format!("blk.{l}.attn_q.bias"),
            Role::KBias(l) => format!("blk.{l}.attn_k.bias"),
            Role::VBias(l) => format!("blk.{l}.attn_v.bias"),
            Role::QNorm(l) => format!("blk.{l}.attn_q_norm.weight"),
            Role::KNorm(l) => format!("blk.{l}.attn_k_norm.weight"),
            Role::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            Role::PostAttnNorm(l) => format!("blk.{l}.post_attention_norm.weight"),
            Role::PostFfnNorm(l) => format!("blk.{l}.post_ffw_norm.weight"),
            Role::Gate(l) => format!("blk.{l}.ffn_gate.weight"),
            Role::Up(l) => format!("blk.{l}.ffn_up.weight"),
            Role::Down(l) => format!("blk.{l}.ffn_down.weight"),
        }
    }

    fn has(&self, role: Role) -> bool {
        self.content.tensor_infos.contains_key(&self.name(role))
    }

    fn matrix(&self, role: Role, rows: usize, cols: usize) -> Result<Linear, ModelError> {
        let name = self.name(role);
        let (bytes, dtype) = self.bytes(&name, &[rows, cols])?;
        let native = match dtype {
            GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            GgmlDType::Q5_0 => Some(BlockFormat::Q5_0),
            _ => None,
        };
        // Q4_K runs on the Q4_1 kernels: same codes, each 32-weight block's scale and minimum rounded once to f16
        // (`cpu::q4_k_to_q4_1`; a tensor whose products leave f16's range keeps candle's exact path).
        // Q6_K becomes `Q6K32` (its codes per 32 weights under two f16 scales) where a panel kernel runs that;
        // elsewhere candle's Q6_K path is the faster one.
        let rewritten = match dtype {
            GgmlDType::Q4K if cols.is_multiple_of(256) => {
                crate::cpu::q4_k_to_q4_1(&bytes).map(|b| (BlockFormat::Q4_1, b))
            }
            GgmlDType::Q6K if cols.is_multiple_of(256) && crate::cpu::kernels().panel_dot.is_some() => {
                crate::cpu::q6_k_to_q6k32(&bytes).map(|b| (BlockFormat::Q6K32, b))
            }
            _ => None,
        };
        let (native, bytes) = match rewritten {
            Some((format, b)) => (Some(format), b),
            None => (native, bytes),
        };
        let data = match (native, dtype) {
            (Some(format), _) if cols.is_multiple_of(QK) => WeightData::Blocks { format, bytes },
            (_, GgmlDType::F32) | (_, GgmlDType::BF16) => {
                WeightData::F32(self.to_f32(&name, &bytes, dtype, &[rows, cols])?)
            }
            (_, GgmlDType::F16) => WeightData::F16(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            // Embedding rows are looked up one at a time: keep them in a format we can slice.
            _ if matches!(role, Role::Embed) => WeightData::F32(self.to_f32(&name, &bytes, dtype, &[rows, cols])?),
            _ => {
                let qt = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    dtype,
                    &bytes,
                    vec![rows, cols],
                    &candle_core::Device::Cpu,
                )
                .map_err(|e| ModelError::UnsupportedDtype {
                    file: self.file.clone(),
                    tensor: name.clone(),
                    dtype: format!("{dtype:?} ({e})"),
                })?;
                WeightData::Candle(QMatMul::from_qtensor(qt)?)
            }
        };
        Ok(Linear {
            rows,
            cols,
            data,
            bias: None,
        })
    }

    fn vector(&self, role: Role, len: usize) -> Result<Vec<f32>, ModelError> {
        let name = self.name(role);
        let (bytes, dtype) = self.bytes(&name, &[len])?;
        self.to_f32(&name, &bytes, dtype, &[len])
    }
}
