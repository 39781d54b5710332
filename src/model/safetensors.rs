//! HF checkpoint directories: `config.json`, one or more `*.safetensors` (memory-mapped) and `tokenizer.json`.

use super::config::ModelConfig;
use super::linear::{Linear, WeightData};
use super::tokenizer::Tokenizer;
use super::{build_parts, ModelError, ModelParts, Role, WeightSource};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

struct Shard {
    file: PathBuf,
    map: memmap2::Mmap,
    header: usize,
    meta: Metadata,
}

struct SafetensorsSource {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    index: HashMap<String, usize>,
}

pub(crate) fn load(dir: &Path) -> Result<(ModelParts, Tokenizer), ModelError> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(|source| ModelError::Io { file: p, source })
    };
    let cfg_text = String::from_utf8_lossy(&read("config.json")?).into_owned();
    let cfg = ModelConfig::from_hf_json(&cfg_text, &dir.join("config.json"))?;
    let tok_cfg = read("tokenizer_config.json")
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    let tokenizer = Tokenizer::from_hf_files(&read("tokenizer.json")?, tok_cfg.as_deref())?;

    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ModelError::Io {
            file: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Format {
            file: dir.to_path_buf(),
            what: "no *.safetensors files".into(),
        });
    }
    let mut shards = Vec::new();
    let mut index = HashMap::new();
    for file in files {
        let io = |source| ModelError::Io {
            file: file.clone(),
            source,
        };
        let f = std::fs::File::open(&file).map_err(io)?;
        // SAFETY: read-only private map of a checkpoint file; concurrent modification is unsupported.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
        let (header, meta) = SafeTensors::read_metadata(&map).map_err(|e| ModelError::Format {
            file: file.clone(),
            what: format!("not a safetensors file: {e}"),
        })?;
        for name in meta.tensors().keys() {
            index.insert(name.clone(), shards.len());
        }
        shards.push(Shard {
            file,
            map,
            header,
            meta,
        });
    }
    let src = SafetensorsSource {
        dir: dir.to_path_buf(),
        shards,
        index,
    };
    Ok((build_parts(cfg, &src)?, tokenizer))
}

impl SafetensorsSource {
    fn values(&self, name: &str, want: &[usize]) -> Result<(Dtype, &[u8], &Path), ModelError> {
        let &si = self.index.get(name).ok_or_else(|| ModelError::MissingTensor {
            file: self.dir.clone(),
            name: name.into(),
        })?;
        let shard = &self.shards[si];
        let info = shard.meta.info(name).ok_or_else(|| ModelError::MissingTensor {
            file: shard.file.clone(),
            name: name.into(),
        })?;
        if info.shape != want {
            return Err(ModelError::BadShape {
                file: shard.file.clone(),
                tensor: name.into(),
                expected: want.to_vec(),
                got: info.shape.clone(),
            });
        }
        let (a, b) = info.data_offsets;
        let start = 8 + shard.header + a;
        let end = 8 + shard.header + b;
        if end > shard.map.len() || a > b {
            return Err(ModelError::Format {
                file: shard.file.clone(),
                what: format!("tensor `{name}` lies past the end of the file"),
            });
        }
        Ok((info.dtype, &shard.map[start..end], &shard.file))
    }

    fn f32s(&self, name: &str, want: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (dtype, bytes, file) = self.values(name, want)?;
        Ok(match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    file: file.to_path_buf(),
                    tensor: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }
}

impl WeightSource for SafetensorsSource {
    fn name(&self, role: Role) -> String {
        let p = |l: usize, s: &str| format!("model.layers.{l}.{s}");
        match role {
            Role::Embed => "model.embed_tokens.weight".into(),
            Role::Output => "lm_head.weight".into(),
            Role::OutputNorm => "model.norm.weight".into(),
            Role::AttnNorm(l) => p(l, "input_layernorm.weight"),
            Role::Q(l) => p(l, "self_attn.q_proj.weight"),
            Role::K(l) => p(l, "self_attn.k_proj.weight"),
            Role::V(l) => p(l, "self_attn.v_proj.weight"),
            Role::O(l) => p(l, "self_attn.o_proj.weight"),
            Role::QBias(l) => p(l, "self_attn.q_proj.bias"),
            Role::KBias(l) => p(l, "self_attn.k_proj.bias"),
            Role::VBias(l) => p(l, "self_attn.v_proj.bias"),
            Role::QNorm(l) => p(l, "self_attn.q_norm.weight"),
            Role::KNorm(l) => p(l, "self_attn.k_norm.weight"),
            Role::FfnNorm(l) => p(l, "post_attention_layernorm.weight"),
            // (no safetensors architecture here has these: HF Gemma 3 is not loaded from safetensors)
            Role::PostAttnNorm(l) => p(l, "post_attention_norm.weight"),
            Role::PostFfnNorm(l) => p(l, "post_feedforward_layernorm.weight"),
            Role::Gate(l) => p(l, "mlp.gate_proj.weight"),
            Role::Up(l) => p(l, "mlp.up_proj.weight"),
            Role::Down(l) => p(l, "mlp.down_proj.weight"),
        }
    }

    fn has(&self, role: Role) -> bool {
        self.index.contains_key(&self.name(role))
    }

    fn matrix(&self, role: Role, rows: usize, cols: usize) -> Result<Linear, ModelError> {
        let name = self.name(role);
        let (dtype, bytes, _) = self.values(&name, &[rows, cols])?;
        // f16 stays f16 (half the memory, exact); bf16 widens to f32 (f16 cannot hold its range).
        let data = if dtype == Dtype::F16 {
            WeightData::F16(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            )
        } else {
            WeightData::F32(self.f32s(&name, &[rows, cols])?)
        };
        Ok(Linear {
            rows,
            cols,
            data,
            bias: None,
        })
    }

    fn vector(&self, role: Role, len: usize) -> Result<Vec<f32>, ModelError> {
        self.f32s(&self.name(role), &[len])
    }
}
