//! Tiny random models written to disk in both formats we load, for tests that need control over the weights:
//! the same network as an HF safetensors directory (NeoX RoPE) and as a GGUF file (llama: rows of Q/K permuted
//! to the interleaved layout, exactly as llama.cpp's converter does; qwen2: unpermuted, with q/k/v biases).
#![allow(dead_code)]

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TinyArch {
    Llama,
    Qwen2,
    /// No biases; q/k RMSNorm per head before RoPE.
    Qwen3,
}

pub struct TinySpec {
    pub arch: TinyArch,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub seed: u64,
    /// Multiplies every matrix's random range (1 for the tiny models; ~1/√(hidden/64) keeps a wide model's
    /// activations in the range a trained one has).
    pub weight_scale: f32,
    /// Head size when it is not `hidden / heads` (Qwen3's q dimension differs from the hidden size).
    pub head_dim: Option<usize>,
}

impl TinySpec {
    pub fn new(arch: TinyArch) -> Self {
        TinySpec {
            arch,
            vocab: 64,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 96,
            seed: 1,
            weight_scale: 1.0,
            head_dim: None,
        }
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads)
    }
}

/// Token strings: three control tokens, then printable ASCII (byte-level BPE maps these bytes to themselves)
/// and 'Ġ' (the byte-level stand-in for a space).
pub fn vocab(n: usize) -> Vec<String> {
    let mut v = vec![
        "<|endoftext|>".to_string(),
        "<|im_start|>".to_string(),
        "<|im_end|>".to_string(),
        "\u{120}".to_string(),
    ];
    let mut c = b'a';
    while v.len() < n {
        v.push((c as char).to_string());
        c = if c == b'z' { b'A' } else { c + 1 };
    }
    v
}

/// HF-named tensors, `[rows, cols]` row-major.
pub fn weights(s: &TinySpec) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut seed = s.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let ws = s.weight_scale;
    let mut rnd = move |scale: f32| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5) * 2.0 * scale * ws
    };
    let mut m = BTreeMap::new();
    let (h, d, f) = (s.hidden, s.head_dim(), s.ffn);
    let (qd, kd) = (s.heads * d, s.kv_heads * d);
    fn mat(
        m: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>,
        name: String,
        r: usize,
        c: usize,
        scale: f32,
        rnd: &mut dyn FnMut(f32) -> f32,
    ) {
        m.insert(name, (vec![r, c], (0..r * c).map(|_| rnd(scale)).collect::<Vec<f32>>()));
    }
    mat(&mut m, "model.embed_tokens.weight".into(), s.vocab, h, 1.0, &mut rnd);
    mat(&mut m, "lm_head.weight".into(), s.vocab, h, 0.3, &mut rnd);
    for l in 0..s.layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        mat(&mut m, p("self_attn.q_proj.weight"), qd, h, 0.4, &mut rnd);
        mat(&mut m, p("self_attn.k_proj.weight"), kd, h, 0.4, &mut rnd);
        mat(&mut m, p("self_attn.v_proj.weight"), kd, h, 0.3, &mut rnd);
        mat(&mut m, p("self_attn.o_proj.weight"), h, qd, 0.2, &mut rnd);
        mat(&mut m, p("mlp.gate_proj.weight"), f, h, 0.3, &mut rnd);
        mat(&mut m, p("mlp.up_proj.weight"), f, h, 0.3, &mut rnd);
        mat(&mut m, p("mlp.down_proj.weight"), h, f, 0.2, &mut rnd);
        if s.arch == TinyArch::Qwen2 {
            for (n, r) in [("q", qd), ("k", kd), ("v", kd)] {
                m.insert(
                    p(&format!("self_attn.{n}_proj.bias")),
                    (vec![r], (0..r).map(|_| rnd(0.5)).collect()),
                );
            }
        }
        for n in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            m.insert(p(n), (vec![h], (0..h).map(|_| 1.0 + rnd(0.2)).collect()));
        }
        if s.arch == TinyArch::Qwen3 {
            for n in ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] {
                m.insert(p(n), (vec![d], (0..d).map(|_| 1.0 + rnd(0.5)).collect()));
            }
        }
    }
    m.insert(
        "model.norm.weight".into(),
        (vec![h], (0..h).map(|_| 1.0 + rnd(0.2)).collect()),
    );
    m
}

/// llama.cpp's `permute` for Q/K rows: HF row `(head, half, j)` becomes GGUF row `(head, j, half)`.
fn permute_rows(data: &[f32], heads: usize, d: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for half in 0..2 {
            for j in 0..d / 2 {
                let src = h * d + half * (d / 2) + j;
                let dst = h * d + 2 * j + half;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

pub fn write_hf_dir(s: &TinySpec, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let w = weights(s);
    let arch = match s.arch {
        TinyArch::Llama => "LlamaForCausalLM",
        TinyArch::Qwen2 => "Qwen2ForCausalLM",
        TinyArch::Qwen3 => "Qwen3ForCausalLM",
    };
    let mut cfg = serde_json::json!({
        "architectures": [arch], "hidden_size": s.hidden, "intermediate_size": s.ffn,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "num_hidden_layers": s.layers,
        "vocab_size": s.vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": false
    });
    if let Some(d) = s.head_dim {
        cfg["head_dim"] = d.into();
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let bytes: BTreeMap<String, (Vec<usize>, Vec<u8>)> = w
        .iter()
        .map(|(k, (shape, v))| {
            (
                k.clone(),
                (shape.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, (shape, b))| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let toks = vocab(s.vocab);
    let vocab_json: serde_json::Map<String, serde_json::Value> = toks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = (0..3)
        .map(|i| serde_json::json!({"id": i, "content": toks[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tj = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab_json, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tj).unwrap()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>", "add_bos_token": false}"#,
    )
    .unwrap();
    dir.to_path_buf()
}

/// What to break when writing a GGUF file (for error tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Damage {
    None,
    /// Write `attn_q` of layer 0 with one row too few.
    ShortQ,
    /// Leave out `ffn_down` of layer 1.
    MissingDown,
    /// Declare an architecture we do not support.
    UnknownArch,
}

pub fn write_gguf(s: &TinySpec, path: &Path, damage: Damage) -> PathBuf {
    write_gguf_with(s, path, damage, &[])
}

/// [`write_gguf`] with metadata entries replaced or added (a hostile or broken header). A key without the
/// architecture's prefix (`general.alignment`) is used as it is; `ARCH.` is replaced by the architecture's name.
pub fn write_gguf_with(s: &TinySpec, path: &Path, damage: Damage, overrides: &[(&str, Value)]) -> PathBuf {
    write_gguf_impl(s, path, damage, overrides, false)
}

/// [`write_gguf_with`] in the default model's block types: Q8_0 embeddings and output, Q4_1 matrices, F32 norms
/// (dimensions must be multiples of 32).
pub fn write_gguf_quant(s: &TinySpec, path: &Path, overrides: &[(&str, Value)]) -> PathBuf {
    write_gguf_impl(s, path, Damage::None, overrides, true)
}

fn write_gguf_impl(s: &TinySpec, path: &Path, damage: Damage, overrides: &[(&str, Value)], quant: bool) -> PathBuf {
    let w = weights(s);
    let d = s.head_dim();
    let arch = match (damage, s.arch) {
        (Damage::UnknownArch, _) => "gpt5",
        (_, TinyArch::Llama) => "llama",
        (_, TinyArch::Qwen2) => "qwen2",
        (_, TinyArch::Qwen3) => "qwen3",
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut put = |name: String, shape: &[usize], data: Vec<f32>| {
        let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
        let dtype = match (quant, shape.len(), name.as_str()) {
            (false, _, _) | (_, 1, _) => GgmlDType::F32,
            (true, _, "token_embd.weight" | "output.weight") => GgmlDType::Q8_0,
            (true, _, _) => GgmlDType::Q4_1,
        };
        tensors.push((name, QTensor::quantize(&t, dtype).unwrap()));
    };
    let get = |k: &str| w.get(k).unwrap_or_else(|| panic!("{k}")).clone();
    let (e_shape, e) = get("model.embed_tokens.weight");
    put("token_embd.weight".into(), &e_shape, e);
    let (o_shape, o) = get("lm_head.weight");
    put("output.weight".into(), &o_shape, o);
    let (n_shape, n) = get("model.norm.weight");
    put("output_norm.weight".into(), &n_shape, n);
    for l in 0..s.layers {
        let hf = |n: &str| get(&format!("model.layers.{l}.{n}"));
        let names = [
            ("self_attn.q_proj.weight", "attn_q.weight"),
            ("self_attn.k_proj.weight", "attn_k.weight"),
            ("self_attn.v_proj.weight", "attn_v.weight"),
            ("self_attn.o_proj.weight", "attn_output.weight"),
            ("mlp.gate_proj.weight", "ffn_gate.weight"),
            ("mlp.up_proj.weight", "ffn_up.weight"),
            ("mlp.down_proj.weight", "ffn_down.weight"),
            ("input_layernorm.weight", "attn_norm.weight"),
            ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ];
        for (hf_name, gg) in names {
            if damage == Damage::MissingDown && l == 1 && gg == "ffn_down.weight" {
                continue;
            }
            let (mut shape, mut data) = hf(hf_name);
            if s.arch == TinyArch::Llama && (gg == "attn_q.weight" || gg == "attn_k.weight") {
                data = permute_rows(&data, shape[0] / d, d, shape[1]);
            }
            if damage == Damage::ShortQ && l == 0 && gg == "attn_q.weight" {
                shape[0] -= 1;
                data.truncate(shape[0] * shape[1]);
            }
            put(format!("blk.{l}.{gg}"), &shape, data);
        }
        if s.arch == TinyArch::Qwen2 {
            for n in ["q", "k", "v"] {
                let (shape, data) = hf(&format!("self_attn.{n}_proj.bias"));
                put(format!("blk.{l}.attn_{n}.bias"), &shape, data);
            }
        }
        if s.arch == TinyArch::Qwen3 {
            for n in ["q", "k"] {
                let (shape, data) = hf(&format!("self_attn.{n}_norm.weight"));
                put(format!("blk.{l}.attn_{n}_norm.weight"), &shape, data);
            }
        }
    }
    let toks = vocab(s.vocab);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), Value::U32(s.layers as u32)),
        (format!("{arch}.context_length"), Value::U32(256)),
        (format!("{arch}.embedding_length"), Value::U32(s.hidden as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(s.ffn as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(s.heads as u32)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(s.kv_heads as u32)),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(toks.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array((0..s.vocab).map(|i| Value::I32(if i < 3 { 3 } else { 1 })).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
    ];
    md.push((
        "tokenizer.chat_template".into(),
        Value::String(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}".into(),
        ),
    ));
    if let Some(d) = s.head_dim {
        md.push((format!("{arch}.attention.key_length"), Value::U32(d as u32)));
        md.push((format!("{arch}.attention.value_length"), Value::U32(d as u32)));
    }
    for (k, v) in overrides {
        let k = k.replace("ARCH.", &format!("{arch}."));
        md.retain(|(have, _)| *have != k);
        md.push((k, v.clone()));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    path.to_path_buf()
}

/// The tiny models checked against llama.cpp (`tests/llamacpp_parity.rs`, reference logits in
/// `tests/golden/llamacpp-tiny.json` from `scripts/llamacpp-parity.sh`): one per architecture, each with a shape
/// its architecture has in the wild (llama: GQA; qwen2: biases; qwen3: q dimension ≠ hidden size, q/k norms).
pub fn parity_specs() -> Vec<(&'static str, TinySpec)> {
    let mut out = Vec::new();
    for (name, arch, seed) in [
        ("llama", TinyArch::Llama, 11),
        ("qwen2", TinyArch::Qwen2, 12),
        ("qwen3", TinyArch::Qwen3, 13),
    ] {
        let mut s = TinySpec::new(arch);
        s.seed = seed;
        s.layers = 3;
        if arch == TinyArch::Qwen3 {
            s.head_dim = Some(24);
        }
        out.push((name, s));
    }
    out
}

/// A parity model as a GGUF file llama.cpp loads: its vocabulary reader wants unique tokens ([`vocab`] wraps
/// around after `` ` `` for 64 tokens; repeats become `0`, `1`, …) and a non-empty merge list (an empty array has
/// no element type), so the last token becomes "ab" with the one merge `a b`.
pub fn write_parity_gguf(s: &TinySpec, path: &Path) -> PathBuf {
    let mut toks = vocab(s.vocab);
    let mut seen = std::collections::HashSet::new();
    let mut digit = 0;
    for t in toks.iter_mut() {
        if !seen.insert(t.clone()) {
            *t = digit.to_string();
            digit += 1;
            seen.insert(t.clone());
        }
    }
    *toks.last_mut().unwrap() = "ab".into();
    let tokens = Value::Array(toks.into_iter().map(Value::String).collect());
    let merges = Value::Array(vec![Value::String("a b".into())]);
    write_gguf_with(
        s,
        path,
        Damage::None,
        &[("tokenizer.ggml.tokens", tokens), ("tokenizer.ggml.merges", merges)],
    )
}

/// The real Qwen3 chat template's name (fetched; `common::chat_template` reads it): `enable_thinking = false` closes an empty
/// span in the generation prompt, otherwise the model opens its own.
pub const QWEN3_TEMPLATE: &str = "Qwen-Qwen3-0.6B";

/// The name of a real DeepSeek-R1 distill template as llama.cpp keeps it: the generation prompt opens the span
/// (`<｜Assistant｜><think>\n`) and closes it again unless `enable_thinking` is true.
pub const R1_TEMPLATE: &str = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B";

/// The R1 distills' turn markers, control tokens 57..=60 of the thinking vocabulary.
pub const R1_MARKERS: [&str; 4] = [
    "<\u{ff5c}User\u{ff5c}>",
    "<\u{ff5c}Assistant\u{ff5c}>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "<\u{ff5c}begin\u{2581}of\u{2581}sentence\u{ff5c}>",
];

/// A tiny model with a thinking span: `<think>` and `</think>` as control tokens (ids 62, 63), a newline token
/// (`Ċ`, id 61) and the R1 turn markers (57..=60), with the chat template `template` (its source).
pub fn write_thinking_gguf(s: &TinySpec, path: &Path, template: &str) -> PathBuf {
    assert!(
        s.vocab == 64,
        "the thinking vocabulary replaces the last seven of 64 tokens"
    );
    let mut toks = vocab(s.vocab);
    for (i, m) in R1_MARKERS.iter().enumerate() {
        toks[57 + i] = m.to_string();
    }
    toks[61] = "\u{10a}".into();
    toks[62] = "<think>".into();
    toks[63] = "</think>".into();
    let types = (0..s.vocab)
        .map(|i| Value::I32(if (3..57).contains(&i) { 1 } else { 3 }))
        .collect();
    write_gguf_with(
        s,
        path,
        Damage::None,
        &[
            (
                "tokenizer.ggml.tokens",
                Value::Array(toks.into_iter().map(Value::String).collect()),
            ),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.chat_template", Value::String(template.into())),
        ],
    )
}
