//! `pmkvq eval divergence`.

use super::*;

/// A budget as written: bytes (`4MiB`), a fraction `a/b` of the f16 bytes of the sequence, or `min` (PM-KVQ's
/// floor for it). Checked when the command line is read; resolved once the sequence length is known.
#[derive(Clone, Copy, Debug)]
enum BudgetArg {
    Bytes(usize),
    Fraction(u64, u64),
    Min,
}

impl BudgetArg {
    fn parse(s: &str, what: &str) -> Result<Self, Failure> {
        let bad = |why: String| fail(EX_USAGE, anyhow::anyhow!("{what} `{s}`: {why}"));
        if s == "min" {
            return Ok(BudgetArg::Min);
        }
        if let Some((a, b)) = s.split_once('/') {
            let num = |x: &str| {
                x.trim()
                    .parse::<u64>()
                    .map_err(|_| bad(format!("`{x}` is not a whole number")))
            };
            let (a, b) = (num(a)?, num(b)?);
            if a == 0 || b == 0 || a > b {
                return Err(bad("a fraction a/b of the fp16 bytes needs 0 < a <= b".into()));
            }
            return Ok(BudgetArg::Fraction(a, b));
        }
        match parse_bytes(s) {
            Some(b) if b > 0 => Ok(BudgetArg::Bytes(b)),
            _ => Err(bad(
                "must be a byte size (4MiB), a fraction a/b of the fp16 bytes, or min".into(),
            )),
        }
    }

    fn bytes(self, fp16_bytes: usize, floor: usize) -> usize {
        match self {
            BudgetArg::Bytes(b) => b,
            BudgetArg::Fraction(a, b) => (fp16_bytes as u128 * a as u128 / b as u128) as usize,
            BudgetArg::Min => floor,
        }
    }
}

/// One `--methods` item: `pmkvq` (the method as shipped: everything the profile holds), a baseline, or an
/// ablation `progressive[+alloc][+rep|+rep-alt][+rot][+plan]` / `BASELINE+rot`, with an optional `@BUDGET`.
struct MethodArg {
    item: String,
    base: KvMethod,
    shipped: bool,
    flags: Vec<String>,
    budget: Option<BudgetArg>,
}

fn parse_methods(list: &str, global: Option<BudgetArg>) -> Result<Vec<MethodArg>, Failure> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, budget) = match item.split_once('@') {
            Some((n, b)) => (n, Some(BudgetArg::parse(b, &format!("budget of `{item}`"))?)),
            None => (item, global),
        };
        let mut parts = name.split('+');
        let base_name = parts.next().unwrap_or_default();
        let flags: Vec<String> = parts.map(str::to_string).collect();
        let (base, shipped) = match base_name {
            "progressive" => (
                KvMethod::Pmkvq(pmkvq::kvcache::PmkvqConfig {
                    name: "progressive".into(),
                    ..pmkvq::kvcache::PmkvqConfig::pmkvq()
                }),
                false,
            ),
            "pmkvq" => (KvMethod::Pmkvq(pmkvq::kvcache::PmkvqConfig::pmkvq()), true),
            b => (
                b.parse()
                    .map_err(|e: pmkvq::kvcache::method::BadMethod| fail(EX_USAGE, e.into()))?,
                false,
            ),
        };
        let allowed: &[&str] = match base_name {
            "progressive" => &["alloc", "rep", "rep-alt", "rot", "plan", "alt"],
            "pmkvq" => &[],
            _ => &["rot"],
        };
        for f in &flags {
            if !allowed.contains(&f.as_str()) {
                return Err(fail(
                    EX_USAGE,
                    anyhow::anyhow!(
                        "method `{item}`: unknown flag `+{f}` (`pmkvq` is the method as shipped; build ablations on \
                         `progressive` with +alloc, +rep, +rep-alt, +rot, +plan, +alt; baselines take +rot)"
                    ),
                ));
            }
        }
        out.push(MethodArg {
            item: item.to_string(),
            base,
            shipped,
            flags,
            budget,
        });
    }
    Ok(out)
}

pub(crate) fn cmd_divergence(a: DivergenceArgs) -> Result<(), Failure> {
    use pmkvq::eval::{self, DivergenceConfig, MethodSpec};
    if a.tokens < 2 {
        return Err(fail(
            EX_USAGE,
            anyhow::anyhow!("`--tokens` must be >= 2, got {}", a.tokens),
        ));
    }
    // everything on the command line is checked before a trace is written
    let global = a
        .kv_budget
        .as_deref()
        .map(|s| BudgetArg::parse(s, "`--kv-budget`"))
        .transpose()?;
    let method_args = parse_methods(&a.methods, global)?;
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
    let profile = load_profile(
        &a.profile.as_ref().map_or("auto".into(), |p| p.display().to_string()),
        &model,
    )?;
    let alt_profile = match &a.alt_profile {
        None => None,
        Some(p) => load_profile(&p.display().to_string(), &model)?,
    };
    let need = |p: &Option<pmkvq::calib::Profile>, item: &str, opt: &str| {
        p.clone()
            .ok_or_else(|| fail(EX_USAGE, anyhow::anyhow!("method `{item}` needs {opt}")))
    };
    // `+alt`: the item's +alloc, +rep and +plan come from --alt-profile instead of --profile
    let source = |m: &MethodArg| {
        if m.flags.iter().any(|f| f == "alt") {
            (&alt_profile, "--alt-profile")
        } else {
            (&profile, "a profile (--profile)")
        }
    };
    for m in &method_args {
        for f in &m.flags {
            match f.as_str() {
                "alloc" | "rep" | "plan" | "alt" => drop(need(source(m).0, &m.item, source(m).1)?),
                "rep-alt" => drop(need(&alt_profile, &m.item, "--alt-profile")?),
                _ => {}
            }
        }
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
    let ext = backend.kv_extensions();
    let mut methods = Vec::new();
    for m in method_args {
        let budget = m.budget.map(|b| b.bytes(fp16_bytes, floor));
        let mut spec = if m.shipped {
            MethodSpec {
                budget,
                label: m.item.clone(),
                ..pmkvq::calib::method_spec(m.base.clone(), profile.as_ref(), ext)
            }
        } else {
            MethodSpec::plain(m.base.clone(), budget, &m.item)
        };
        for flag in &m.flags {
            let p = || need(source(&m).0, &m.item, source(&m).1);
            match flag.as_str() {
                "alloc" => spec.shares = Some(p()?.shares),
                "rep" => spec.key_scales = Some(p()?.channel_scales()),
                "rep-alt" => spec.key_scales = Some(need(&alt_profile, &m.item, "--alt-profile")?.channel_scales()),
                "rot" => spec.rotate = true,
                "alt" => {}
                "plan" => {
                    if let KvMethod::Pmkvq(c) = &mut spec.method {
                        c.sensitivity = Some(std::sync::Arc::new(p()?.sensitivity()));
                    }
                }
                _ => unreachable!("flags are checked when parsed"),
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
