//! `pmkvq generate`.

use super::*;
use pmkvq::engine::{self, GenerateRequest, SamplingParams};

pub(crate) fn cmd_generate(a: GenerateArgs) -> Result<(), Failure> {
    if a.max_tokens == 0 {
        return Err(fail(EX_USAGE, anyhow::anyhow!("`--max-tokens` must be >= 1, got 0")));
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repeat_penalty,
        repeat_last_n: a.repeat_last_n,
        seed: a.seed,
    };
    sampling.validate().map_err(|e| fail(EX_USAGE, e.into()))?;
    if let Some(server) = &a.server {
        let local_only = [
            ("--device", a.device != "cpu"),
            ("--kv-budget", a.kv_budget.is_some()),
            ("--kv-trace", a.kv_trace.is_some()),
            ("--profile", a.profile.is_some()),
        ];
        if let Some((flag, _)) = local_only.iter().find(|(_, given)| *given) {
            return Err(fail(
                EX_USAGE,
                anyhow::anyhow!("{flag} applies to local generation; the server has its own (drop it or --server)"),
            ));
        }
        return super::client::generate_remote(&a, server);
    }
    let (model, tok) = load(&a.model)?;
    let model = std::sync::Arc::new(model);
    let backend = open_backend(&a.device, &model)?;
    let prompt_ids = match (&a.prompt, &a.chat) {
        (Some(p), _) => tok.encode(p, true).map_err(|e| fail(EX_USAGE, e.into()))?,
        (None, Some(user)) => {
            let src = tok.chat_template.as_deref().ok_or_else(|| {
                fail(
                    EX_USAGE,
                    anyhow::anyhow!("the model has no chat template; use --prompt"),
                )
            })?;
            let tmpl = ChatTemplate::new(src).map_err(|e| fail(EX_DATAERR, e.into()))?;
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(ChatMessage {
                    role: "system".into(),
                    content: s.clone(),
                });
            }
            msgs.push(ChatMessage {
                role: "user".into(),
                content: user.clone(),
            });
            tmpl.encode(&tok, &msgs).map_err(|e| fail(EX_USAGE, e.into()))?
        }
        (None, None) => return Err(fail(EX_USAGE, anyhow::anyhow!("one of --prompt or --chat is required"))),
    };
    let kv_name = a.kv.as_deref().unwrap_or("fp16");
    let method: KvMethod = kv_name
        .parse()
        .map_err(|e: pmkvq::kvcache::method::BadMethod| fail(EX_USAGE, e.into()))?;
    let profile = load_profile(a.profile.as_deref().unwrap_or("auto"), &model)?;
    let budget = match &a.kv_budget {
        None => None,
        Some(b) => Some(parse_bytes(b).ok_or_else(|| {
            fail(
                EX_USAGE,
                anyhow::anyhow!("`--kv-budget` must be a byte size such as 4MiB or 1048576, got `{b}`"),
            )
        })?),
    };
    let spec = pmkvq::eval::MethodSpec {
        budget,
        label: kv_name.to_string(),
        ..pmkvq::calib::method_spec(method, profile.as_ref(), backend.kv_extensions())
    };
    let ctx = model.config.context_length;
    let mut kv = backend
        .new_store(&spec, model.kv_geometry(), ctx)
        .map_err(|e| fail(EX_USAGE, e.into()))?;
    let mut trace = match &a.kv_trace {
        None => None,
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
    };
    let req = GenerateRequest {
        prompt_ids,
        max_tokens: a.max_tokens,
        sampling,
        stop: a.stop.clone(),
        prefill_chunk: a.prefill_chunk.max(1),
    };
    let mut stdout = std::io::stdout().lock();
    let json = a.json;
    let mut trace_err = None;
    let out = engine::generate(
        &*backend,
        &tok,
        kv.as_mut(),
        &req,
        |piece| {
            if !json {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        },
        |store| {
            if let Some(w) = trace.as_mut() {
                let line = serde_json::json!({
                    "tokens": store.len(0),
                    "true_bytes": store.true_bytes(),
                    "payload_bytes": store.payload_bytes(),
                    "bits": store.layer_bits(),
                });
                if let Err(e) = writeln!(w, "{line}") {
                    trace_err.get_or_insert(e);
                }
            }
        },
    )
    .map_err(|e| match e {
        engine::generate::GenerateError::Model(m) => fail(EX_SOFTWARE, m.into()),
        other => fail(EX_USAGE, other.into()),
    })?;
    if let Some(e) = trace_err {
        return Err(fail(EX_SOFTWARE, anyhow::Error::new(e).context("writing the kv trace")));
    }
    if let Some(mut w) = trace {
        w.flush().context("writing the kv trace")?;
    }
    if json {
        serde_json::to_writer(&mut stdout, &out).context("writing JSON")?;
        writeln!(stdout)?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "prompt: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | finish: {:?} | {} | threads {} | kv {} {} bytes",
            out.prompt_ids.len(),
            out.prompt_tokens_per_s,
            out.ids.len(),
            out.decode_tokens_per_s,
            out.finish_reason,
            backend.device(),
            model.threads(),
            out.kv_method,
            out.kv_true_bytes
        );
    }
    Ok(())
}
