//! `pmkvq eval divergence`.

use super::*;

/// `bytes`, `1/N` (of the f16 bytes of the sequence) or `min` (PM-KVQ's floor for it).
fn parse_budget(s: &str, fp16_bytes: usize, floor: usize) -> Option<usize> {
    if s == "min" {
        return Some(floor);
    }
    if let Some(d) = s.strip_prefix("1/") {
        let d: f64 = d.parse().ok().filter(|d: &f64| *d >= 1.0)?;
        return Some((fp16_bytes as f64 / d) as usize);
    }
    parse_bytes(s)
}

pub(crate) fn cmd_divergence(a: DivergenceArgs) -> Result<(), Failure> {
    use pmkvq::eval::{self, DivergenceConfig, MethodSpec};
    if a.tokens < 2 {
        return Err(fail(
            EX_USAGE,
            anyhow::anyhow!("`--tokens` must be >= 2, got {}", a.tokens),
        ));
    }
    let (model, tok) = load(&a.model)?;
    let model = std::sync::Arc::new(model);
    let backend = open_backend(&a.device, &model)?;
    if a.tokens > model.config.context_length {
        return Err(fail(
            EX_USAGE,
            anyhow::anyhow!(
                "`--tokens` must be <= the context length {}, got {}",
                model.config.context_length,
                a.tokens
            ),
        ));
    }
    let (tokens, prompt_len) = match (&a.prompt, &a.chat, &a.text_file) {
        (_, _, Some(f)) => {
            let text =
                std::fs::read_to_string(f).map_err(|e| fail(EX_NOINPUT, anyhow::anyhow!("{}: {e}", f.display())))?;
            let mut ids = tok.encode(&text, false).map_err(|e| fail(EX_DATAERR, e.into()))?;
            ids.truncate(a.tokens);
            (ids, 1)
        }
        (p, c, None) => {
            let ids = match (p, c) {
                (Some(p), _) => tok.encode(p, true).map_err(|e| fail(EX_USAGE, e.into()))?,
                (None, Some(c)) => {
                    let src = tok
                        .chat_template
                        .as_deref()
                        .ok_or_else(|| fail(EX_USAGE, anyhow::anyhow!("no chat template")))?;
                    let msgs = [ChatMessage {
                        role: "user".into(),
                        content: c.clone(),
                    }];
                    let text = ChatTemplate::new(src)
                        .and_then(|t| t.render(&msgs, true, "", ""))
                        .map_err(|e| fail(EX_USAGE, e.into()))?;
                    tok.encode(&text, false).map_err(|e| fail(EX_USAGE, e.into()))?
                }
                (None, None) => {
                    return Err(fail(
                        EX_USAGE,
                        anyhow::anyhow!("one of --prompt, --chat or --text-file is required"),
                    ))
                }
            };
            eprintln!(
                "writing a {}-token trace from a {}-token prompt ...",
                a.tokens,
                ids.len()
            );
            let n = ids.len();
            (
                eval::divergence::generate_trace(&*backend, &tok, &ids, a.tokens, a.seed)
                    .map_err(|e| fail(EX_SOFTWARE, e.into()))?,
                n,
            )
        }
    };
    let seq_len = if a.chunk_len > 0 {
        a.chunk_len.min(tokens.len())
    } else {
        tokens.len()
    };
    let geom = model.kv_geometry();
    let fp16_bytes = 2 * geom.layers * geom.kv_dim() * 2 * seq_len;
    let floor = pmkvq::kvcache::PmkvqStore::floor_bytes(geom, &pmkvq::kvcache::PmkvqConfig::pmkvq(), seq_len);
    let budget_of = |s: &str| {
        parse_budget(s, fp16_bytes, floor).ok_or_else(|| {
            fail(
                EX_USAGE,
                anyhow::anyhow!("budget must be bytes (4MiB), 1/N or min, got `{s}`"),
            )
        })
    };
    let global = a.kv_budget.as_deref().map(budget_of).transpose()?;
    let explicit = |p: &Option<PathBuf>| -> Result<Option<pmkvq::calib::Profile>, Failure> {
        match p {
            None => Ok(None),
            Some(p) => load_profile(&p.display().to_string(), &model),
        }
    };
    let profile = explicit(&a.profile)?;
    let alt_profile = explicit(&a.alt_profile)?;
    let mut methods = Vec::new();
    for item in a.methods.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, budget) = match item.split_once('@') {
            Some((n, b)) => (n, Some(budget_of(b)?)),
            None => (item, global),
        };
        // `METHOD[+alloc][+rep|+rep-alt]`: calibrated shares and key scales from --profile / --alt-profile
        let mut parts = name.split('+');
        let base = parts.next().unwrap_or_default();
        let method: KvMethod = base
            .parse()
            .map_err(|e: pmkvq::kvcache::method::BadMethod| fail(EX_USAGE, e.into()))?;
        let mut spec = MethodSpec::plain(method, budget, item);
        for flag in parts {
            let need = |p: &Option<pmkvq::calib::Profile>, opt: &str| {
                p.clone()
                    .ok_or_else(|| fail(EX_USAGE, anyhow::anyhow!("method `{item}` needs {opt}")))
            };
            match flag {
                "alloc" => spec.shares = Some(need(&profile, "--profile")?.shares),
                "rep" => spec.key_scales = Some(need(&profile, "--profile")?.channel_scales()),
                "rep-alt" => spec.key_scales = Some(need(&alt_profile, "--alt-profile")?.channel_scales()),
                "rot" => spec.rotate = true,
                other => {
                    return Err(fail(
                        EX_USAGE,
                        anyhow::anyhow!("unknown method flag `+{other}` (alloc, rep, rep-alt, rot)"),
                    ))
                }
            }
        }
        methods.push(spec);
    }
    let score_from = a.score_from.unwrap_or(if a.chunk_len > 0 {
        seq_len / 2
    } else {
        prompt_len.max(1)
    });
    let cfg = DivergenceConfig {
        methods,
        score_from,
        step: a.step.max(1),
        greedy_tokens: a.greedy_tokens,
        prefill_chunk: 512,
    };
    let report = if a.chunk_len > 0 {
        let mut parts = Vec::new();
        for (i, chunk) in tokens.chunks_exact(seq_len).enumerate() {
            eprintln!("chunk {} of {} ...", i + 1, tokens.len() / seq_len);
            parts.push(eval::run_divergence(&*backend, chunk, &cfg).map_err(|e| fail(EX_SOFTWARE, e.into()))?);
        }
        eval::DivergenceReport::merge(parts)
            .ok_or_else(|| fail(EX_USAGE, anyhow::anyhow!("text shorter than one chunk")))?
    } else {
        eval::run_divergence(&*backend, &tokens, &cfg).map_err(|e| fail(EX_SOFTWARE, e.into()))?
    };
    if let Some(p) = &a.plot {
        eval::report::plot_svg(&report, &a.title, p).map_err(|e| fail(EX_SOFTWARE, anyhow::anyhow!("plot: {e}")))?;
    }
    let table = eval::report::markdown(&report, &a.title);
    if let Some(p) = &a.markdown {
        std::fs::write(p, &table).with_context(|| format!("writing {}", p.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer(&mut stdout, &report).context("writing JSON")?;
        writeln!(stdout)?;
    } else {
        write!(stdout, "{table}")?;
    }
    Ok(())
}
