//! `pmkvq eval divergence`.

use super::*;
use pmkvq::kvcache::quant::Bits;

/// A budget as written: bytes (`4MiB`), a fraction `a/b` of the f16 bytes of the sequence, or `min` (PM-KVQ's
/// floor for it). Checked when the command line is read; resolved once the sequence length is known.
#[derive(Clone, Copy, Debug)]
enum BudgetArg {
    Bytes(usize),
    Fraction(u64, u64),
    Min,
    /// The floor of the elastic window: the 16-bit sink and every other token at the floor width.
    Floor,
}

impl BudgetArg {
    fn parse(s: &str, what: &str) -> Result<Self, Failure> {
        let bad = |why: String| fail(EX_USAGE, anyhow::anyhow!("{what} `{s}`: {why}"));
        if s == "min" {
            return Ok(BudgetArg::Min);
        }
        if s == "floor" {
            return Ok(BudgetArg::Floor);
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
                "must be a byte size (4MiB), a fraction a/b of the fp16 bytes, min or floor".into(),
            )),
        }
    }

    fn bytes(self, fp16_bytes: usize, floors: Floors) -> usize {
        match self {
            BudgetArg::Bytes(b) => b,
            BudgetArg::Fraction(a, b) => (fp16_bytes as u128 * a as u128 / b as u128) as usize,
            BudgetArg::Min => floors.full_window,
            BudgetArg::Floor => floors.elastic,
        }
    }
}

/// PM-KVQ's floors for one sequence: every body at the floor width with the full 16-bit window (`min`), and with
/// the window yielded too (`floor`).
#[derive(Clone, Copy)]
struct Floors {
    full_window: usize,
    elastic: usize,
}

impl Floors {
    fn of(geom: pmkvq::kvcache::KvGeometry, win: Option<&pmkvq::kvcache::Windowing>, tokens: usize) -> Self {
        let elastic = pmkvq::kvcache::PmkvqConfig {
            elastic_window: true,
            ..pmkvq::kvcache::PmkvqConfig::pmkvq()
        };
        Floors {
            full_window: pmkvq::kvcache::pmkvq_floor(geom, win, tokens),
            elastic: pmkvq::kvcache::pmkvq_floor_with(geom, win, tokens, &elastic),
        }
    }
}

/// The largest `+wN` window an ablation item may ask for.
const MAX_WINDOW: usize = 4096;
/// Most 16-bit sink tokens `+sN` accepts.
const MAX_SINK: usize = 64;
/// The narrowest window share `+wsN` takes (1/N of a layer's budget).
const MAX_WINDOW_SHARE: usize = 64;
/// Largest quantization group `+gN` accepts.
const MAX_GROUP: usize = 256;

/// One `--methods` item: `pmkvq` (the method as shipped: everything the profile holds), a baseline, or an
/// ablation `progressive[+alloc][+rep|+rep-alt][+rot][+plan][+fit]` / `BASELINE+rot`, with an optional `@BUDGET`.
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
            "progressive" => &[
                "alloc",
                "rep",
                "rep-alt",
                "rot",
                "plan",
                "plan-even",
                "plan-k",
                "plan-v",
                "alt",
                "fit",
                "elastic",
            ],
            "pmkvq" => &[],
            _ => &["rot"],
        };
        for f in &flags {
            if base_name == "progressive" {
                if let Some(checked) = numeric_flag(f) {
                    match checked {
                        Ok(_) => continue,
                        Err(bound) => return Err(fail(EX_USAGE, anyhow::anyhow!("method `{item}`: `+{f}`: {bound}"))),
                    }
                }
            }
            if !allowed.contains(&f.as_str()) {
                return Err(fail(
                    EX_USAGE,
                    anyhow::anyhow!(
                        "method `{item}`: unknown flag `+{f}` (`pmkvq` is the method as shipped; build ablations on \
                         `progressive` with +alloc, +rep, +rep-alt, +rot, +plan, +plan-even, +plan-k, +plan-v, +fit, +elastic, +wN (window), +wbN (window bits), +wsN (window share), +gN (group), +sN (sink), +alt; baselines take +rot)"
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

/// What a numeric ablation flag sets.
#[derive(Clone, Copy)]
enum Numeric {
    WindowShare,
    WindowBits,
    Window,
    Group,
    Sink,
}

/// A numeric flag of a `progressive` item (`+wsN`, `+wbN`, `+wN`, `+gN`, `+sN`): `None` if `f` is none of them, else its
/// value, or the bound it breaks.
fn numeric_flag(f: &str) -> Option<Result<(Numeric, usize), String>> {
    type Check = fn(usize) -> bool;
    let flags: [(&str, Numeric, Check, String); 5] = [
        (
            "ws",
            Numeric::WindowShare,
            |n| (2..=MAX_WINDOW_SHARE).contains(&n),
            format!("the window's share must be 1/N of a layer's budget with N in 2..={MAX_WINDOW_SHARE}"),
        ),
        (
            "wb",
            Numeric::WindowBits,
            |n| n == 8 || n == 16,
            "the window's width must be 8 or 16 bits".into(),
        ),
        (
            "w",
            Numeric::Window,
            |n| (1..=MAX_WINDOW).contains(&n),
            format!("the window must be a whole number of tokens in 1..={MAX_WINDOW}"),
        ),
        (
            "g",
            Numeric::Group,
            |n| (4..=MAX_GROUP).contains(&n) && n.is_multiple_of(4),
            format!("the group must be a multiple of 4 in 4..={MAX_GROUP} (and divide head_dim)"),
        ),
        (
            "s",
            Numeric::Sink,
            |n| n <= MAX_SINK,
            format!("the sink must be a whole number of tokens in 0..={MAX_SINK}"),
        ),
    ];
    let (kind, n, ok, bound) = flags
        .into_iter()
        .find_map(|(prefix, kind, ok, bound)| f.strip_prefix(prefix).map(|n| (kind, n, ok, bound)))?;
    Some(match n.parse::<usize>() {
        Ok(n) if ok(n) => Ok((kind, n)),
        _ => Err(bound),
    })
}

/// The profiles `--methods` draw on: `--profile` (default: the automatic one) and `--alt-profile` (`+alt`).
struct Calibrations {
    profile: Option<pmkvq::calib::Profile>,
    alt: Option<pmkvq::calib::Profile>,
}

impl Calibrations {
    /// Load both and check every item's flags have the profile they need (before any long work starts).
    fn load(
        profile: &Option<PathBuf>,
        alt: &Option<PathBuf>,
        model: &Model,
        methods: &[MethodArg],
    ) -> Result<Self, Failure> {
        let cal = Calibrations {
            profile: load_profile(
                &profile.as_ref().map_or("auto".into(), |p| p.display().to_string()),
                model,
            )?,
            alt: match alt {
                None => None,
                Some(p) => load_profile(&p.display().to_string(), model)?,
            },
        };
        for m in methods {
            for f in &m.flags {
                match f.as_str() {
                    "alloc" | "rep" | "plan" | "alt" => drop(cal.source(m)?),
                    "rep-alt" => drop(cal.need(&cal.alt, m, "--alt-profile")?),
                    _ => {}
                }
            }
        }
        Ok(cal)
    }

    fn need(
        &self,
        p: &Option<pmkvq::calib::Profile>,
        m: &MethodArg,
        opt: &str,
    ) -> Result<pmkvq::calib::Profile, Failure> {
        p.clone()
            .ok_or_else(|| fail(EX_USAGE, anyhow::anyhow!("method `{}` needs {opt}", m.item)))
    }

    /// The profile an item's +alloc, +rep and +plan come from: --alt-profile with `+alt`, else --profile.
    fn source(&self, m: &MethodArg) -> Result<pmkvq::calib::Profile, Failure> {
        if m.flags.iter().any(|f| f == "alt") {
            self.need(&self.alt, m, "--alt-profile")
        } else {
            self.need(&self.profile, m, "a profile (--profile)")
        }
    }

    /// Store configurations for a sequence whose fp16 cache takes `fp16_bytes` (PM-KVQ's floor for it: `floor`)
    /// on a model of `layers` layers.
    fn specs(
        &self,
        methods: &[MethodArg],
        extensions: pmkvq::kvcache::KvExtensions,
        fp16_bytes: usize,
        floor: Floors,
        layers: usize,
    ) -> Result<Vec<pmkvq::eval::MethodSpec>, Failure> {
        use pmkvq::eval::MethodSpec;
        let mut out = Vec::new();
        for m in methods {
            let budget = m.budget.map(|b| b.bytes(fp16_bytes, floor));
            let mut spec = if m.shipped {
                MethodSpec {
                    budget,
                    label: m.item.clone(),
                    ..pmkvq::calib::method_spec(m.base.clone(), self.profile.as_ref(), extensions)
                }
            } else {
                MethodSpec::plain(m.base.clone(), budget, &m.item)
            };
            for flag in &m.flags {
                if let (KvMethod::Pmkvq(c), Some(Ok((kind, n)))) = (&mut spec.method, numeric_flag(flag)) {
                    match kind {
                        Numeric::WindowShare => c.window_share = Some(n),
                        // checked to be 8 or 16 when parsed
                        Numeric::WindowBits => c.window_bits = Bits::from_count(n as u32).unwrap_or(c.window_bits),
                        Numeric::Window => c.window = n,
                        Numeric::Group => c.group = n,
                        Numeric::Sink => c.sink = n,
                    }
                    continue;
                }
                match flag.as_str() {
                    "alloc" => spec.shares = Some(self.source(m)?.shares),
                    "rep" => spec.key_scales = Some(self.source(m)?.channel_scales()),
                    "rep-alt" => spec.key_scales = Some(self.need(&self.alt, m, "--alt-profile")?.channel_scales()),
                    "rot" => spec.rotate = true,
                    "fit" => {
                        if let KvMethod::Pmkvq(c) = &mut spec.method {
                            c.shift = pmkvq::kvcache::quant::ShiftMode::Fitted;
                        }
                    }
                    "elastic" => {
                        if let KvMethod::Pmkvq(c) = &mut spec.method {
                            c.elastic_window = true;
                        }
                    }
                    "plan" => {
                        if let KvMethod::Pmkvq(c) = &mut spec.method {
                            c.sensitivity = Some(std::sync::Arc::new(self.source(m)?.sensitivity()));
                        }
                    }
                    side @ ("plan-even" | "plan-k" | "plan-v") => {
                        if let KvMethod::Pmkvq(c) = &mut spec.method {
                            c.sensitivity = Some(std::sync::Arc::new(uncalibrated_plan(side, layers)));
                        }
                    }
                    _ => {} // `alt` only chooses the source
                }
            }
            out.push(spec);
        }
        Ok(out)
    }
}

/// A plan without calibration, to measure where the bytes matter: one budget over all layers (not equal
/// shares), every layer alike, and with `plan-k` (`plan-v`) the keys (values) kept wider as long as the budget
/// allows, the other side lowered first (its costs a thousandth of the other's); `plan-even` prefers neither
/// (what `pmkvq` plans on without a profile).
fn uncalibrated_plan(flag: &str, layers: usize) -> pmkvq::kvcache::pmkvq_plan::Sensitivity {
    use pmkvq::kvcache::pmkvq_plan::{Sensitivity, UNIFORM_ROW};
    let low = UNIFORM_ROW.map(|x| x * 1e-3);
    let (k, v) = match flag {
        "plan-k" => (UNIFORM_ROW, low),
        "plan-v" => (low, UNIFORM_ROW),
        _ => return Sensitivity::uniform(),
    };
    Sensitivity {
        k: vec![k; layers],
        v: vec![v; layers],
    }
}

pub(crate) fn cmd_divergence(a: DivergenceArgs) -> Result<(), Failure> {
    use pmkvq::eval::{self, DivergenceConfig};
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
    let cal = Calibrations::load(&a.profile, &a.alt_profile, &model, &method_args)?;
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
    let (geom, win) = (model.kv_geometry(), model.config.windowing());
    let fp16_bytes = pmkvq::kvcache::fp16_bytes(geom, win.as_ref(), seq_len);
    let floor = Floors::of(geom, win.as_ref(), seq_len);
    let methods = cal.specs(&method_args, backend.kv_extensions(), fp16_bytes, floor, geom.layers)?;
    let score_from = a.score_from.unwrap_or(if a.chunk_len > 0 {
        seq_len / 2
    } else {
        prompt_len.max(1)
    });
    let cfg = DivergenceConfig {
        methods,
        reference: a.reference,
        score_from,
        step: a.step.max(1),
        greedy_tokens: a.greedy_tokens,
        // the protocol the ablation tables were measured with (Botchan's 1023-token context in two passes)
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

pub(crate) fn cmd_retrieval(a: RetrievalArgs) -> Result<(), Failure> {
    use pmkvq::eval::retrieval;
    let global = BudgetArg::parse(&a.kv_budget, "`--kv-budget`")?;
    let method_args = parse_methods(&a.methods, Some(global))?;
    let bad = |what: &str| fail(EX_USAGE, anyhow::anyhow!("{what}"));
    if a.depths.iter().any(|d| !(0.0..=1.0).contains(d)) {
        return Err(bad("`--depths` must lie in [0, 1]"));
    }
    if a.keys == 0 || a.answer_tokens == 0 {
        return Err(bad("`--keys` and `--answer-tokens` must be >= 1"));
    }
    let filler = match &a.filler_file {
        None => None,
        Some(f) => {
            Some(std::fs::read_to_string(f).map_err(|e| fail(EX_NOINPUT, anyhow::anyhow!("{}: {e}", f.display())))?)
        }
    };
    let (model, tok) = load(&a.model)?;
    let model = std::sync::Arc::new(model);
    let ctx = model.config.context_length;
    if let Some(l) = a.lengths.iter().find(|&&l| l < 64 || l + a.answer_tokens > ctx) {
        return Err(bad(&format!(
            "`--lengths`: {l} must be >= 64 and leave room for the answer in the context of {ctx} tokens"
        )));
    }
    let backend = open_backend(&a.device, &model)?;
    let cal = Calibrations::load(&a.profile, &a.alt_profile, &model, &method_args)?;
    let src = tok
        .chat_template
        .as_deref()
        .ok_or_else(|| bad("the model has no chat template"))?;
    let template = ChatTemplate::new(src).map_err(|e| fail(EX_DATAERR, e.into()))?;
    let geom = model.kv_geometry();
    let mut answers = Vec::new();
    let mut rng = a.seed;
    for (li, &length) in a.lengths.iter().enumerate() {
        for &depth in &a.depths {
            for _ in 0..a.keys {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let key = 10_000 + ((rng >> 33) % 90_000) as u32;
                let p = retrieval::probe(&tok, &template, length, depth, key, filler.as_deref())
                    .map_err(|e| fail(EX_USAGE, e.into()))?;
                let n = p.tokens.len() + a.answer_tokens;
                let win = model.config.windowing();
                let fp16_bytes = pmkvq::kvcache::fp16_bytes(geom, win.as_ref(), n);
                let floor = Floors::of(geom, win.as_ref(), n);
                for spec in cal.specs(&method_args, backend.kv_extensions(), fp16_bytes, floor, geom.layers)? {
                    let ans = retrieval::answer(&*backend, &tok, &spec, &p, a.answer_tokens, a.prefill_chunk)
                        .map_err(|e| fail(EX_SOFTWARE, e.into()))?;
                    eprintln!(
                        "{:>6} tokens, depth {:.2}, {:<24} {} {:?}",
                        ans.length,
                        depth,
                        ans.method,
                        match (ans.correct, &ans.error) {
                            (true, _) => "ok  ",
                            (false, Some(_)) => "ENDED",
                            (false, None) => "MISS",
                        },
                        ans.answer
                    );
                    answers.push((li, ans));
                }
            }
        }
    }
    let mut table = format!(
        "### {}\n\nExact-match accuracy ({} keys per length and depth; depths {:?}; budget {} of the fp16 bytes; {})\n\n",
        a.title,
        a.keys,
        a.depths,
        a.kv_budget,
        match a.prefill_chunk {
            0 => "each prompt prefilled in one pass".to_string(),
            c => format!("prompts prefilled in chunks of {c} tokens"),
        }
    );
    let acc = |v: Vec<&(usize, retrieval::Answer)>| {
        let ok = v.iter().filter(|(_, x)| x.correct).count();
        let ended = v.iter().filter(|(_, x)| x.error.is_some()).count();
        let mut c = format!("{ok}/{} ({:.0} %)", v.len(), 100.0 * ok as f64 / v.len().max(1) as f64);
        if ended > 0 {
            c.push_str(&format!(", {ended} out of budget"));
        }
        c
    };
    // the same probes, continuously: how sure each cache leaves the model of the key (exact match moves by a
    // whole prompt; this shows what is lost before a key is)
    let mean_lp = |v: Vec<&(usize, retrieval::Answer)>| {
        let lp: Vec<f64> = v.iter().filter_map(|(_, x)| x.key_logprob).collect();
        match lp.len() {
            0 => "—".to_string(),
            n => format!("{:.3}", lp.iter().sum::<f64>() / n as f64),
        }
    };
    let names: Vec<&str> = method_args.iter().map(|m| m.item.as_str()).collect();
    table.push_str(&per_length(&a.lengths, &names, &answers, acc));
    table.push_str("\nMean log-probability of the key's tokens, teacher-forced after the prompt (0 = certain)\n\n");
    table.push_str(&per_length(&a.lengths, &names, &answers, mean_lp));
    if let Some(p) = &a.markdown {
        std::fs::write(p, &table).with_context(|| format!("writing {}", p.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    if a.json {
        let all: Vec<_> = answers.iter().map(|(_, x)| x).collect();
        serde_json::to_writer(&mut stdout, &all).context("writing JSON")?;
        writeln!(stdout)?;
    } else {
        write!(stdout, "{table}")?;
    }
    Ok(())
}

/// A Markdown table of `cell` over each method's answers, per length and over all.
fn per_length(
    lengths: &[usize],
    methods: &[&str],
    answers: &[(usize, pmkvq::eval::retrieval::Answer)],
    cell: impl Fn(Vec<&(usize, pmkvq::eval::retrieval::Answer)>) -> String,
) -> String {
    let mut t = String::from("| method |");
    for l in lengths {
        t.push_str(&format!(" ≤ {l} tokens |"));
    }
    t.push_str(" all |\n|---|");
    t.push_str(&"---|".repeat(lengths.len() + 1));
    t.push('\n');
    for &m in methods {
        let mine = || answers.iter().filter(move |(_, x)| x.method == m);
        t.push_str(&format!("| {m} |"));
        for li in 0..lengths.len() {
            t.push_str(&format!(" {} |", cell(mine().filter(|(l, _)| *l == li).collect())));
        }
        t.push_str(&format!(" {} |\n", cell(mine().collect())));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::uncalibrated_plan;
    use pmkvq::kvcache::pmkvq_plan::knapsack;

    /// Which units (layer 0 K, layer 0 V, layer 1 K, ...) a plan keeps at 4 bits (cost 2) rather than 2 (cost
    /// 1) with room for `wide` of them.
    fn kept_wide(flag: &str, layers: usize, wide: usize) -> Vec<bool> {
        let sens = std::sync::Arc::new(uncalibrated_plan(flag, layers))
            .for_layers(layers)
            .unwrap();
        let options: Vec<Vec<(usize, f64)>> = sens.units().map(|s| vec![(1, s[2]), (0, s[3])]).collect();
        let picks = knapsack(&options, wide).expect("every body at 2 bits fits");
        picks.iter().map(|&p| p == 0).collect()
    }

    #[test]
    fn uncalibrated_plans_keep_the_side_they_name_wider() {
        let (layers, wide) = (6, 6);
        for (flag, keys) in [("plan-k", true), ("plan-v", false)] {
            let kept = kept_wide(flag, layers, wide);
            let (k, v): (Vec<_>, Vec<_>) = kept.chunks(2).map(|u| (u[0], u[1])).unzip();
            assert_eq!(k.iter().all(|&w| w), keys, "{flag}: {kept:?}");
            assert_eq!(v.iter().all(|&w| w), !keys, "{flag}: {kept:?}");
        }
        // even: the room is used, whichever side gets it
        assert_eq!(
            kept_wide("plan-even", layers, wide).iter().filter(|&&w| w).count(),
            wide
        );
        // with room for every key and two values, plan-k keeps every key and two values wide
        let kept = kept_wide("plan-k", layers, layers + 2);
        assert!(kept.chunks(2).all(|u| u[0]), "{kept:?}");
        assert_eq!(kept.chunks(2).filter(|u| u[1]).count(), 2, "{kept:?}");
    }
}
