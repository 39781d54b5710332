//! `pmkvq bench`: llama-bench's measurements on pmkvq's own forward pass and KV stores. For each depth, the cache
//! is filled with `depth` tokens (not timed); then `pp` times a `--prompt`-token prefill on top of it and `tg`
//! times `--gen` single-token decode steps, each feeding the previous step's greedy token. Tokens are drawn
//! from the vocabulary with a fixed seed, as llama-bench does, so no text file is needed and EOS never ends a run.

use super::*;
use pmkvq::model::LogitsMode;
use std::time::Instant;

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens already in the cache when a test starts (comma-separated list).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    depth: Vec<usize>,
    /// Prefill test: tokens per prompt (0 = skip).
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Decode test: tokens generated (0 = skip).
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// KV cache method (see `generate --kv`).
    #[arg(long, default_value = "fp16")]
    kv: String,
    /// KV budget for the whole sequence: bytes (4MiB), or `1/N` of what fp16 K/V takes at depth + the test's
    /// tokens. Binds `pmkvq`; fixed-width methods cost what their width costs.
    #[arg(long)]
    kv_budget: Option<String>,
    /// Calibration profile for `--kv pmkvq` (`auto`, `none` or a path).
    #[arg(long, default_value = "auto")]
    profile: String,
    /// Repetitions of each test (the cache is filled once per depth and taken back to it after each).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Tokens per prefill forward pass (the fill and the pp test).
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Where the model runs: cpu, auto or cuda:N.
    #[arg(long, default_value = "cpu", env = "PMKVQ_DEVICE")]
    device: String,
    /// One JSON object per test on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn cmd_bench(a: BenchArgs) -> Result<(), Failure> {
    if a.reps == 0 {
        return Err(fail(EX_USAGE, anyhow::anyhow!("`--reps` must be >= 1, got 0")));
    }
    let (model, _tok) = load(&a.model)?;
    let model = std::sync::Arc::new(model);
    let backend = open_backend(&a.device, &model)?;
    let method: KvMethod =
        a.kv.parse()
            .map_err(|e: pmkvq::kvcache::method::BadMethod| fail(EX_USAGE, e.into()))?;
    let profile = load_profile(&a.profile, &model)?;
    let geom = model.kv_geometry();
    let ctx = model.config.context_length;
    let vocab = model.config.vocab_size as u64;
    let chunk = a.prefill_chunk.max(1);
    let mut rng = 0x853c_49e6_748f_ea9bu64;
    let mut draw = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % vocab) as u32
            })
            .collect()
    };
    if !a.json {
        println!(
            "| model | kv | budget | threads | test | t/s (mean ± sd over {}) |\n|---|---|---|---|---|---|",
            a.reps
        );
    }
    for &depth in &a.depth {
        // one fill per depth; the budget (1/N) and the store's capacity cover the longer of the two tests
        let total = depth + a.prompt.max(a.gen);
        if total > ctx {
            return Err(fail(
                EX_USAGE,
                anyhow::anyhow!(
                    "depth {depth} + {} tokens exceeds the context length {ctx}",
                    a.prompt.max(a.gen)
                ),
            ));
        }
        let fp16_bytes = pmkvq::kvcache::fp16_bytes(geom, backend.config().windowing().as_ref(), total);
        let budget = match a.kv_budget.as_deref() {
            None => None,
            Some(s) => Some(match s.strip_prefix("1/") {
                Some(d) => {
                    let d: f64 =
                        d.parse().ok().filter(|d: &f64| *d >= 1.0).ok_or_else(|| {
                            fail(EX_USAGE, anyhow::anyhow!("`--kv-budget` 1/N needs N >= 1, got `{s}`"))
                        })?;
                    (fp16_bytes as f64 / d) as usize
                }
                None => parse_bytes(s).ok_or_else(|| {
                    fail(
                        EX_USAGE,
                        anyhow::anyhow!("`--kv-budget` must be bytes or 1/N, got `{s}`"),
                    )
                })?,
            }),
        };
        let spec = pmkvq::eval::MethodSpec {
            budget,
            label: a.kv.clone(),
            ..pmkvq::calib::method_spec(method.clone(), profile.as_ref(), backend.kv_extensions())
        };
        let mut kv = backend
            .new_store(&spec, geom, total)
            .map_err(|e| fail(EX_USAGE, e.into()))?;
        let fill = draw(depth);
        let mut last = backend
            .forward_chunked(&fill, kv.as_mut(), chunk, LogitsMode::Last)
            .map_err(|e| fail(EX_SOFTWARE, e.into()))?;
        let at_depth = kv.true_bytes();
        // A sliding-window model's local layers cannot give back more than their last step (they evict): each
        // repetition starts from a copy of the cache at depth instead.
        let snapshot = match kv.windowing() {
            Some(_) => {
                let mut b = Vec::new();
                kv.spill_to(&mut b).map_err(|e| fail(EX_SOFTWARE, e.into()))?;
                Some(b)
            }
            None => None,
        };
        for (test, n) in [("pp", a.prompt), ("tg", a.gen)] {
            if n == 0 {
                continue;
            }
            let mut rates = Vec::with_capacity(a.reps);
            let mut end_bytes = 0;
            for _ in 0..a.reps {
                match &snapshot {
                    Some(b) => kv.restore(b).map_err(|e| fail(EX_SOFTWARE, e.into()))?,
                    None => kv.truncate(depth),
                }
                let toks = draw(n);
                let t0 = Instant::now();
                if test == "pp" {
                    backend
                        .forward_chunked(&toks, kv.as_mut(), chunk, LogitsMode::Last)
                        .map_err(|e| fail(EX_SOFTWARE, e.into()))?;
                } else {
                    for i in 0..n {
                        let tok = argmax(&last).unwrap_or(0) as u32;
                        let pos = [(depth + i) as u32];
                        last = backend
                            .forward_one(&[tok], &pos, kv.as_mut(), LogitsMode::Last)
                            .map_err(|e| fail(EX_SOFTWARE, e.into()))?;
                    }
                }
                rates.push(n as f64 / t0.elapsed().as_secs_f64());
                end_bytes = kv.true_bytes();
            }
            let mean = rates.iter().sum::<f64>() / rates.len() as f64;
            let sd = (rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len() as f64).sqrt();
            let name = if depth > 0 {
                format!("{test}{n} @ d{depth}")
            } else {
                format!("{test}{n}")
            };
            let budget_s = budget.map_or("-".to_string(), |b| format!("{:.2} MiB", b as f64 / 1048576.0));
            if a.json {
                let line = serde_json::json!({
                    "test": test, "n": n, "depth": depth, "kv": a.kv, "budget_bytes": budget,
                    "kv_bytes_at_depth": at_depth, "kv_bytes_at_end": end_bytes, "fp16_bytes": fp16_bytes,
                    "layer_bits": kv.layer_bits(), "threads": model.threads(), "device": backend.device(),
                    "tokens_per_s": rates, "mean": mean, "sd": sd,
                });
                println!("{line}");
            } else {
                println!(
                    "| {:?} | {} | {budget_s} | {} | {name} | {mean:.2} ± {sd:.2} |",
                    model.config.arch,
                    a.kv,
                    model.threads()
                );
            }
        }
    }
    Ok(())
}

fn argmax(x: &[f32]) -> Option<usize> {
    x.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i)
}
