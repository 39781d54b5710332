//! GGUF v2/v3 loading: candle's reader parses the header; tensor bytes are read from a memory map of the file.

use super::config::ModelConfig;
use super::kernels::{BlockFormat, QK};
use super::linear::{Linear, WeightData};
use super::tokenizer::{GgufVocab, Tokenizer};
use super::{build_parts, ModelError, ModelParts, Role, WeightSource};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul};
use half::{bf16, f16};
use std::path::{Path, PathBuf};

struct GgufSource {
    file: PathBuf,
    map: memmap2::Mmap,
    content: Content,
}

pub(crate) fn open(path: &Path) -> Result<(memmap2::Mmap, Content), ModelError> {
    let io = |source| ModelError::Io { file: path.to_path_buf(), source };
    let f = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is read-only and private to this process; a model file changed underneath a running
    // daemon is outside what we support (llama.cpp maps model files the same way).
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
    let content = Content::read(&mut std::io::Cursor::new(&map[..]))
        .map_err(|e| ModelError::Format { file: path.to_path_buf(), what: format!("not a readable GGUF file: {e}") })?;
    Ok((map, content))
}

fn strings(md: &std::collections::HashMap<String, Value>, key: &str) -> Option<Vec<String>> {
    md.get(key)?.to_vec().ok()?.iter().map(|v| v.to_string().ok().cloned()).collect()
}

fn read_tokenizer(c: &Content, file: &Path) -> Result<Tokenizer, ModelError> {
    let md = &c.metadata;
    let bad = |what: &str| ModelError::Format { file: file.to_path_buf(), what: what.to_string() };
    let model = md.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).ok_or_else(|| bad("missing tokenizer.ggml.model"))?;
    let tokens = strings(md, "tokenizer.ggml.tokens").ok_or_else(|| bad("missing tokenizer.ggml.tokens"))?;
    let types: Vec<i32> = md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
        .unwrap_or_default();
    let scores: Option<Vec<f32>> =
        md.get("tokenizer.ggml.scores").and_then(|v| v.to_vec().ok()).map(|v| v.iter().map(|x| x.to_f32().unwrap_or(0.0)).collect());
    let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let flag = |k: &str| md.get(k).and_then(|v| v.to_bool().ok());
    Tokenizer::from_gguf(GgufVocab {
        model: model.as_str(),
        pre: md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(|s| s.as_str()),
        kinds: GgufVocab::raw_kinds(&types),
        tokens,
        scores,
        merges: strings(md, "tokenizer.ggml.merges"),
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        eot: id("tokenizer.ggml.eot_token_id"),
        add_bos: flag("tokenizer.ggml.add_bos_token"),
        add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
        chat_template: md.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
    })
}

pub(crate) fn load(path: &Path) -> Result<(ModelParts, Tokenizer), ModelError> {
    let (map, content) = open(path)?;
    let tokenizer = read_tokenizer(&content, path)?;
    let mut cfg = ModelConfig::from_gguf(&content.metadata, tokenizer.vocab_size(), path)?;
    cfg.tie_embeddings = !content.tensor_infos.contains_key("output.weight");
    let src = GgufSource { file: path.to_path_buf(), map, content };
    Ok((build_parts(cfg, &src)?, tokenizer))
}

impl GgufSource {
    /// The tensor's bytes, bounds-checked against the file, and its dtype.
    fn bytes(&self, name: &str, want: &[usize]) -> Result<(&[u8], GgmlDType), ModelError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { file: self.file.clone(), name: name.to_string() })?;
        let dims = info.shape.dims();
        // Vectors may be stored as [n] or [1, n].
        let squeezed: Vec<usize> = dims.iter().copied().skip_while(|&d| d == 1 && dims.len() > want.len()).collect();
        if squeezed != want {
            return Err(ModelError::BadShape { file: self.file.clone(), tensor: name.into(), expected: want.to_vec(), got: dims.to_vec() });
        }
        let elems: usize = want.iter().product();
        let bs = info.ggml_dtype.block_size();
        if !elems.is_multiple_of(bs) || !want.last().copied().unwrap_or(0).is_multiple_of(bs) {
            return Err(ModelError::Format { file: self.file.clone(), what: format!("tensor `{name}`: row length not a multiple of the {bs}-element block") });
        }
        let size = elems / bs * info.ggml_dtype.type_size();
        let start = self.content.tensor_data_offset.saturating_add(info.offset) as usize;
        let end = start.checked_add(size).filter(|&e| e <= self.map.len()).ok_or_else(|| ModelError::Format {
            file: self.file.clone(),
            what: format!("tensor `{name}` needs bytes {start}..{} but the file has {} (truncated?)", start.saturating_add(size), self.map.len()),
        })?;
        Ok((&self.map[start..end], info.ggml_dtype))
    }

    fn to_f32(&self, name: &str, bytes: &[u8], dtype: GgmlDType, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        Ok(match dtype {
            GgmlDType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            GgmlDType::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            GgmlDType::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                let qt = candle_core::quantized::ggml_file::qtensor_from_ggml(other, bytes, shape.to_vec(), &candle_core::Device::Cpu)
                    .map_err(|e| ModelError::UnsupportedDtype { file: self.file.clone(), tensor: name.into(), dtype: format!("{other:?} ({e})") })?;
                qt.dequantize(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?
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
            Role::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
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
            _ => None,
        };
        let data = match (native, dtype) {
            (Some(format), _) if cols.is_multiple_of(QK) => WeightData::Blocks { format, bytes: bytes.to_vec() },
            (_, GgmlDType::F32) | (_, GgmlDType::BF16) => WeightData::F32(self.to_f32(&name, bytes, dtype, &[rows, cols])?),
            (_, GgmlDType::F16) => WeightData::F16(bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect()),
            // Embedding rows are looked up one at a time: keep them in a format we can slice.
            _ if matches!(role, Role::Embed) => WeightData::F32(self.to_f32(&name, bytes, dtype, &[rows, cols])?),
            _ => {
                let qt = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, bytes, vec![rows, cols], &candle_core::Device::Cpu)
                    .map_err(|e| ModelError::UnsupportedDtype { file: self.file.clone(), tensor: name.clone(), dtype: format!("{dtype:?} ({e})") })?;
                WeightData::Candle(QMatMul::from_qtensor(qt)?)
            }
        };
        Ok(Linear { rows, cols, data, bias: None })
    }

    fn vector(&self, role: Role, len: usize) -> Result<Vec<f32>, ModelError> {
        let name = self.name(role);
        let (bytes, dtype) = self.bytes(&name, &[len])?;
        self.to_f32(&name, bytes, dtype, &[len])
    }
}
