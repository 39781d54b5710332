//! Writes the starting corpus of every fuzz target into `fuzz/corpus/<target>/`: valid inputs the fuzzer mutates
//! (tiny models in both formats from the tests' generator, the default model's chat template, the example config,
//! spills of every cache, encoded requests). Run from the repository root: `cargo run --manifest-path
//! fuzz/Cargo.toml --bin seeds`.

#[path = "../../../tests/common/tiny.rs"]
#[allow(dead_code)]
mod tiny;

use pmkvq::fuzz::FILE_SEPARATOR;
use pmkvq::kvcache::{KvGeometry, KvMethod};
use pmkvq::server::proto as pb;
use prost::Message;
use std::path::{Path, PathBuf};

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = PathBuf::from("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn joined(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(FILE_SEPARATOR)
}

fn main() {
    assert!(Path::new("fuzz/Cargo.toml").exists(), "run from the repository root");
    let tmp = std::env::temp_dir().join(format!("pmkvq-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();

    // Tiny models, both architectures, both formats.
    for arch in [tiny::TinyArch::Llama, tiny::TinyArch::Qwen2] {
        // as small as the loaders take: AFL++ mutates small files best
        let mut spec = tiny::TinySpec::new(arch);
        spec.hidden = 32;
        spec.heads = 2;
        spec.kv_heads = 1;
        spec.ffn = 32;
        spec.layers = 1;
        let name = format!("{arch:?}").to_lowercase();
        let g = tiny::write_gguf(&spec, &tmp.join(format!("{name}.gguf")), tiny::Damage::None);
        write("gguf", &format!("tiny-{name}.gguf"), &std::fs::read(g).unwrap());
        let dir = tiny::write_hf_dir(&spec, &tmp.join(&name));
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap_or_default();
        write(
            "safetensors",
            &format!("tiny-{name}"),
            &joined(&[&read("config.json"), &read("tokenizer.json"), &read("model.safetensors")]),
        );
        write(
            "tokenizer",
            &format!("tiny-{name}"),
            &joined(&[&read("tokenizer.json"), &read("tokenizer_config.json")]),
        );
    }

    // Chat templates: the default model's, and the common shapes.
    let model = Path::new("models").join(pmkvq::fetch::DEFAULT_MODEL_FILE);
    let (_, tok) = pmkvq::model::Model::load(&model, &pmkvq::model::LoadOptions { threads: 1 })
        .expect("the default model (deploy/fetch-model.sh models)");
    let msgs = b"system:Be brief.\nuser:Hello\nassistant:Hi there\nuser:Why is the sky blue?";
    let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                  {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let llama2 = "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content | trim }} [/INST]\
                  {% elif m.role == 'assistant' %} {{ m.content }}{{ eos_token }}{% else %}<<SYS>>{{ m.content }}<</SYS>>\
                  {% endif %}{% endfor %}";
    let default = tok.chat_template.clone().expect("the default model has a chat template");
    for (name, t) in [("default", default.as_str()), ("chatml", chatml), ("llama2", llama2)] {
        write("chat_template", name, &[t.as_bytes(), b"\0", msgs].concat());
    }

    // Config files.
    write("config", "example.toml", &std::fs::read("deploy/pmkvqd.example.toml").unwrap());
    write(
        "config",
        "small.toml",
        b"listen = \"127.0.0.1:0\"\n[engine]\nmax_running = 4\npause_timeout = \"5s\"\n[memory]\nbudget = \"64MiB\"\n",
    );

    // Spills of every cache, with a sink, a body and a window.
    let g = KvGeometry {
        layers: 2,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 32,
    };
    for method in ["fp16", "pmkvq", "rtn:4", "kivi:2", "q4_0"] {
        let mut s = method.parse::<KvMethod>().unwrap().new_store(g, None, 512).unwrap();
        let n = if method == "fp16" { 24 } else { 140 };
        let x: Vec<f32> = (0..n * g.kv_dim()).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        for l in 0..g.layers {
            s.append(l, &x, &x, n).unwrap();
        }
        write("spill", &method.replace(':', "-"), &s.spill().unwrap());
    }

    // Requests: text, chat, tokens, with every field group set.
    let text = pb::GenerateRequest {
        request_id: "seed-1".into(),
        input: Some(pb::generate_request::Input::Text("Once upon a time".into())),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.7),
            top_k: Some(40),
            top_p: Some(0.9),
            seed: Some(7),
            ..Default::default()
        }),
        stopping: Some(pb::StoppingCriteria {
            max_tokens: Some(64),
            stop: vec!["\n\n".into()],
            stop_token_ids: vec![2],
            time_limit_ms: Some(5000),
            ignore_eos: Some(false),
        }),
        kv: Some(pb::KvPolicy {
            method: Some("pmkvq".into()),
            min_bits: Some(4),
            priority: Some(-3),
        }),
        kv_state_every: Some(8),
    };
    let chat = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Chat(pb::ChatInput {
            messages: vec![
                pb::ChatMessage {
                    role: "system".into(),
                    content: "Be brief.".into(),
                },
                pb::ChatMessage {
                    role: "user".into(),
                    content: "Why is the sky blue?".into(),
                },
            ],
        })),
        ..Default::default()
    };
    let tokens = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Tokens(pb::TokenIds {
            ids: vec![1, 504, 3458, 17, 2],
        })),
        kv: Some(pb::KvPolicy {
            method: Some("kivi:2".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    for (name, r) in [("text", text), ("chat", chat), ("tokens", tokens)] {
        write("request", name, &r.encode_to_vec());
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!("seeds written under fuzz/corpus/");
}
