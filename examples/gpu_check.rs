//! GPU forward-pass check and benchmark (run by `deploy/gpu-check.sh` on a machine with a GPU):
//! GPU vs CPU agreement (greedy tokens, teacher-forced top-1, device cache codes), a budget cut mid-generation,
//! batched streams vs solo, and speed side by side with the CPU path. Writes a markdown report to stdout.
//!
//!   gpu_check [--model FILE] [--golden FILE] [--trace-text FILE] [--quick]
//!
//! Without `--model` it writes a seeded synthetic GGUF with the default model's geometry and block types
//! (Q4_1 matrices, Q8_0 embeddings) and compares the two paths on it.

#[path = "../tests/common/tiny.rs"]
mod tiny;

use pmkvq::gpu::{DeviceChoice, GpuModel};
use pmkvq::kvcache::{KvGeometry, KvMethod, KvStore, MethodSpec};
use pmkvq::model::{Backend, LoadOptions, LogitsMode, Model, SeqInput};
use std::sync::Arc;
use std::time::Instant;

fn argmax(v: &[f32]) -> (u32, f32) {
    let mut best = (0u32, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &x) in v.iter().enumerate() {
        if x > best.1 {
            best = (i as u32, x, best.1);
        } else if x > best.2 {
            best.2 = x;
        }
    }
    (best.0, best.1 - best.2)
}

fn spec(m: &str, budget: Option<usize>) -> MethodSpec {
    MethodSpec::plain(m.parse::<KvMethod>().expect("method"), budget, m)
}

/// Greedy decode `n` tokens after `prompt`; returns (tokens, margins, final store bytes).
fn greedy(b: &dyn Backend, m: &MethodSpec, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>, Box<dyn KvStore>) {
    let mut kv = b.new_store(m, b.kv_geometry(), prompt.len() + n + 1).expect("store");
    let mut toks = Vec::new();
    let mut margins = Vec::new();
    let pos: Vec<u32> = (0..prompt.len() as u32).collect();
    let mut logits = b
        .forward(
            &[SeqInput {
                tokens: prompt,
                positions: &pos,
            }],
            &mut [kv.as_mut()],
            LogitsMode::Last,
        )
        .expect("prefill")
        .pop()
        .unwrap();
    for i in 0..n {
        let (t, mg) = argmax(&logits);
        toks.push(t);
        margins.push(mg);
        let p = [(prompt.len() + i) as u32];
        logits = b
            .forward(
                &[SeqInput {
                    tokens: &[t],
                    positions: &p,
                }],
                &mut [kv.as_mut()],
                LogitsMode::Last,
            )
            .expect("decode")
            .pop()
            .unwrap();
    }
    (toks, margins, kv)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// `streams` stores holding `depth` tokens each (seeded K/V through `append`), bound to `budget_frac` of the
/// fp16 bytes when given, with room for `ahead` more tokens.
fn filled(
    b: &dyn Backend,
    m: &MethodSpec,
    streams: usize,
    depth: usize,
    ahead: usize,
    budget_frac: Option<f64>,
) -> Vec<Box<dyn KvStore>> {
    let g = b.kv_geometry();
    let mut stores: Vec<Box<dyn KvStore>> = (0..streams)
        .map(|_| b.new_store(m, g, depth + ahead + 8).expect("store"))
        .collect();
    let kvd = g.kv_dim();
    let mut seed = 0x1234_5678u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
    };
    let fill: Vec<f32> = (0..depth.min(4096) * kvd).map(|_| rnd()).collect();
    for st in stores.iter_mut() {
        for li in 0..g.layers {
            let mut left = depth;
            while left > 0 {
                let n = left.min(4096);
                st.append(li, &fill[..n * kvd], &fill[..n * kvd], n).expect("fill");
                left -= n;
            }
        }
        if let Some(f) = budget_frac {
            let fp16 = depth * 2 * kvd * 2 * g.layers;
            let _ = st.set_total_budget((fp16 as f64 * f) as usize, None, ahead + 8);
        }
    }
    stores
}

/// Decode tok/s of `streams` sequences at `depth` stored tokens each, `steps` batched steps; median of 3.
fn decode_speed(
    b: &dyn Backend,
    m: &MethodSpec,
    streams: usize,
    depth: usize,
    steps: usize,
    budget_frac: Option<f64>,
) -> (f64, usize) {
    let mut stores = filled(b, m, streams, depth, 4 * steps, budget_frac);
    let bytes = stores[0].true_bytes();
    let mut pos = depth as u32;
    let rates = (0..3).map(|_| decode_steps(b, &mut stores, &mut pos, steps)).collect();
    (median(rates), bytes)
}

/// `n` batched decode steps of every store (one token each at `pos`, which advances); total tok/s.
fn decode_steps(b: &dyn Backend, stores: &mut [Box<dyn KvStore>], pos: &mut u32, n: usize) -> f64 {
    let t0 = Instant::now();
    for _ in 0..n {
        let toks: Vec<[u32; 1]> = (0..stores.len()).map(|i| [(i as u32 * 7 + *pos) % 1000 + 10]).collect();
        let ps = [*pos];
        let inputs: Vec<SeqInput> = toks
            .iter()
            .map(|t| SeqInput {
                tokens: t,
                positions: &ps,
            })
            .collect();
        let mut kvs: Vec<&mut dyn KvStore> = stores.iter_mut().map(|s| s.as_mut() as &mut dyn KvStore).collect();
        b.forward(&inputs, &mut kvs, LogitsMode::Last).expect("decode step");
        *pos += 1;
    }
    (stores.len() * n) as f64 / t0.elapsed().as_secs_f64()
}

/// Decode tok/s of one stream at `depth` under the current launch plan and the one the 2026-11-30 run measured
/// (unfused, a warp per query head), side by side on the same stores: 3 interleaved rounds of `steps` steps each
/// after a warm-up (which captures each plan's graph); medians. Returns (current, old).
fn launch_plans(dev: &GpuModel, m: &MethodSpec, depth: usize, steps: usize, frac: Option<f64>) -> (f64, f64) {
    let mut stores = filled(dev, m, 1, depth, 8 * steps + 16, frac);
    let mut pos = depth as u32;
    let mut run = |n: usize| decode_steps(dev, &mut stores, &mut pos, n);
    let plans = [(true, 4), (false, 1)];
    for &(fused, gqa) in &plans {
        dev.set_launch_plan(fused, gqa);
        run(2);
    }
    let mut rates = [Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (i, &(fused, gqa)) in plans.iter().enumerate() {
            dev.set_launch_plan(fused, gqa);
            rates[i].push(run(steps));
        }
    }
    dev.set_launch_plan(true, 4);
    let [a, b] = rates;
    (median(a), median(b))
}

/// One profiled decode step at `depth` (kernels launched directly, each timed with events).
fn profile(dev: &GpuModel, m: &MethodSpec, depth: usize, frac: Option<f64>, label: &str) {
    let mut stores = filled(dev, m, 1, depth, 8, frac);
    let step = |stores: &mut Vec<Box<dyn KvStore>>, p: u32| {
        let mut kvs: Vec<&mut dyn KvStore> = stores.iter_mut().map(|s| s.as_mut() as &mut dyn KvStore).collect();
        dev.profile_step(
            &[SeqInput {
                tokens: &[42],
                positions: &[p],
            }],
            &mut kvs,
        )
        .expect("profiled step")
    };
    let _ = step(&mut stores, depth as u32);
    let p = step(&mut stores, depth as u32 + 1);
    let mut k = p.kernels.clone();
    k.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    let parts: Vec<String> = k
        .iter()
        .map(|(n, ms, c)| format!("{n} {:.0} µs/{c}", ms * 1e3))
        .collect();
    println!(
        "- {label}: device {:.2} ms, wall {:.2} ms, {} launches: {}",
        p.device_ms,
        p.wall_ms,
        k.iter().map(|x| x.2).sum::<usize>(),
        parts.join(", ")
    );
}

fn prefill_speed(b: &dyn Backend, m: &MethodSpec, n: usize, chunk: usize) -> f64 {
    let prompt: Vec<u32> = (0..n as u32).map(|i| (i * 31 + 7) % 40000 + 10).collect();
    let mut rates = Vec::new();
    for _ in 0..3 {
        let mut kv = b.new_store(m, b.kv_geometry(), n + 1).expect("store");
        let t0 = Instant::now();
        for (ci, c) in prompt.chunks(chunk).enumerate() {
            let pos: Vec<u32> = (ci * chunk..ci * chunk + c.len()).map(|p| p as u32).collect();
            b.forward(
                &[SeqInput {
                    tokens: c,
                    positions: &pos,
                }],
                &mut [kv.as_mut()],
                LogitsMode::Last,
            )
            .expect("prefill");
        }
        rates.push(n as f64 / t0.elapsed().as_secs_f64());
    }
    median(rates)
}

fn synth_model(path: &std::path::Path) {
    use candle_core::quantized::gguf_file::Value;
    let s = tiny::TinySpec {
        arch: tiny::TinyArch::Llama,
        vocab: 49152,
        hidden: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        ffn: 1536,
        seed: 7,
        weight_scale: 1.0 / 3.0,
        head_dim: None,
    };
    let toks: Vec<Value> = (0..s.vocab)
        .map(|i| {
            Value::String(if i < 3 {
                tiny::vocab(3)[i].clone()
            } else {
                format!("t{i}")
            })
        })
        .collect();
    tiny::write_gguf_quant(
        &s,
        path,
        &[
            ("tokenizer.ggml.tokens", Value::Array(toks)),
            ("ARCH.context_length", Value::U32(40000)),
        ],
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let quick = args.iter().any(|a| a == "--quick");
    let agreement_only = args.iter().any(|a| a == "--agreement-only");
    let speed_only = args.iter().any(|a| a == "--speed-only");
    let model_path = match arg("--model") {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let p = std::env::temp_dir().join("pmkvq-synth-smollm2.gguf");
            let t0 = Instant::now();
            synth_model(&p);
            eprintln!("synthetic model written in {:.1} s", t0.elapsed().as_secs_f64());
            p
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (cpu, tok) = Model::load(&model_path, &LoadOptions { threads }).expect("model");
    let gpu = Arc::new(pmkvq::gpu::open(DeviceChoice::Cuda(0)).expect("GPU").expect("a GPU"));
    let t0 = Instant::now();
    let dev = GpuModel::new(gpu.clone(), &cpu).expect("upload");
    println!("# GPU forward pass check\n");
    println!(
        "device: {} ({}), model: `{}`, CPU path: {} threads; weights uploaded in {:.2} s, {:.1} MiB on the device\n",
        gpu.name(),
        gpu.arch(),
        model_path.file_name().unwrap().to_string_lossy(),
        threads,
        t0.elapsed().as_secs_f64(),
        dev.device_weight_bytes() as f64 / 1048576.0
    );
    let g: KvGeometry = cpu.kv_geometry();
    let start = Instant::now();
    let stage = |name: &str| eprintln!("[{:7.1} s] {name}", start.elapsed().as_secs_f64());
    let mut failures = 0;
    let mut check = |name: &str, ok: bool, detail: String| {
        println!("- {} **{}**: {}", if ok { "PASS" } else { "FAIL" }, name, detail);
        if !ok {
            failures += 1;
        }
    };

    if !speed_only {
        stage("trace");
        diagnose(&cpu, &dev, g);
        stage("greedy");
        // 1. Greedy tokens: GPU vs CPU, fp16 and pmkvq caches; compared up to the first margin < 0.1.
        println!("## Agreement\n");
        let golden = arg("--golden").and_then(|p| std::fs::read_to_string(p).ok());
        type Case = (String, Vec<u32>, Option<(Vec<u32>, Vec<f64>)>);
        let mut prompts: Vec<Case> = Vec::new();
        if let Some(text) = &golden {
            let j: serde_json::Value = serde_json::from_str(text).expect("golden json");
            for c in j["cases"].as_array().unwrap() {
                let ids = |v: &serde_json::Value| {
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as u32)
                        .collect::<Vec<_>>()
                };
                let margins = c["greedy_margins"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                prompts.push((
                    c["id"].as_str().unwrap().to_string(),
                    ids(&c["prompt_ids"]),
                    Some((ids(&c["greedy_ids"]), margins)),
                ));
            }
        } else {
            for k in 0..4u32 {
                let p: Vec<u32> = (0..40 + 17 * k).map(|i| (i * 7919 + k * 104729) % 49000 + 3).collect();
                prompts.push((format!("synthetic-{k}"), p, None));
            }
        }
        let n_gen = if quick { 24 } else { 64 };
        // key reparameterization as a calibrated profile applies it (λ per kv channel, equal within a rotary pair)
        let scales: Vec<Vec<f32>> = (0..g.layers)
            .map(|l| {
                (0..g.kv_dim())
                    .map(|c| 0.6 + 0.8 * (((c / 2 + 7 * l) % 13) as f32 / 12.0))
                    .collect()
            })
            .collect();
        // pmkvq as a GPU runs it by default: `pk_rotate` scales and rotates the step's rows on the device, and
        // groups landing at 2 bits get the fitted floor (kv_shrink.cu)
        let rotated = MethodSpec {
            key_scales: Some(Arc::new(scales.clone())),
            rotate: true,
            method: KvMethod::Pmkvq(pmkvq::kvcache::PmkvqConfig {
                shift: pmkvq::kvcache::quant::ShiftMode::Fitted,
                ..pmkvq::kvcache::PmkvqConfig::pmkvq()
            }),
            ..spec("pmkvq", None)
        };
        for method in ["fp16", "pmkvq", "pmkvq+key-scales", "pmkvq+rot+fit+key-scales", "rtn:4"] {
            let m = match method {
                "pmkvq+key-scales" => MethodSpec {
                    key_scales: Some(Arc::new(scales.clone())),
                    ..spec("pmkvq", None)
                },
                "pmkvq+rot+fit+key-scales" => rotated.clone(),
                _ => spec(method, None),
            };
            let mut agree = 0usize;
            let mut compared = 0usize;
            let mut golden_agree = 0usize;
            for (id, p, gold) in &prompts {
                let (ct, cm, _) = greedy(&cpu, &m, p, n_gen);
                let (gt, _, _) = greedy(&dev, &m, p, n_gen);
                // compare up to the first small margin (the CPU's own, or the golden one when given)
                let limit = match gold {
                    Some((_, gm)) => gm.iter().position(|&x| x < 0.1).unwrap_or(gm.len()).min(n_gen),
                    None => cm.iter().position(|&x| x < 0.1).unwrap_or(n_gen),
                };
                let same = ct.iter().zip(&gt).take(limit).take_while(|(a, b)| a == b).count();
                compared += limit;
                agree += same;
                if let Some((gi, _)) = gold {
                    golden_agree += gt.iter().zip(gi).take(limit).take_while(|(a, b)| a == b).count();
                }
                if same < limit {
                    println!("  - {method} {id}: GPU and CPU diverge at token {same} of {limit} comparable");
                }
            }
            let extra = if golden.is_some() {
                format!("; GPU equals llama.cpp's golden tokens for {golden_agree}/{compared}")
            } else {
                String::new()
            };
            check(
                &format!("greedy tokens GPU == CPU ({method} cache)"),
                agree == compared,
                format!("{agree}/{compared} tokens equal up to each prompt's first margin < 0.1{extra}"),
            );
        }

        stage("teacher-forced");
        // 2. Teacher-forced top-1 over a long trace.
        let trace_len = if quick { 512 } else { 2048 };
        let text_trace = arg("--trace-text").map(|p| {
            let text = std::fs::read_to_string(&p).expect("trace text");
            let mut ids = tok.encode(&text, true).expect("tokenize");
            ids.truncate(trace_len);
            ids
        });
        let trace: Vec<u32> = if let Some(t) = text_trace {
            t
        } else {
            let (mut t, _, _) = greedy(&cpu, &spec("fp16", None), &prompts[0].1, 48);
            let mut all = prompts[0].1.clone();
            all.append(&mut t);
            let mut k = 0u32;
            while all.len() < trace_len {
                all.push((k * 2654435761u32.wrapping_add(all.len() as u32)) % 48000 + 5);
                k += 1;
            }
            all.truncate(trace_len);
            all
        };
        let trace_len = trace.len();
        let tf = |b: &dyn Backend, m: &MethodSpec| -> Vec<f32> {
            let mut kv = b.new_store(m, g, trace_len + 1).unwrap();
            let mut out = Vec::new();
            for (ci, c) in trace.chunks(256).enumerate() {
                let pos: Vec<u32> = (ci * 256..ci * 256 + c.len()).map(|p| p as u32).collect();
                out.extend(
                    b.forward(
                        &[SeqInput {
                            tokens: c,
                            positions: &pos,
                        }],
                        &mut [kv.as_mut()],
                        LogitsMode::All,
                    )
                    .unwrap()
                    .pop()
                    .unwrap(),
                );
            }
            out
        };
        let vocab = cpu.config.vocab_size;
        // yardstick: the CPU path against itself with every RMSNorm scale one ulp off
        {
            let m = spec("pmkvq", None);
            let a = tf(&cpu, &m);
            pmkvq::model::NORM_ULP_PROBE.store(true, std::sync::atomic::Ordering::Relaxed);
            let b = tf(&cpu, &m);
            pmkvq::model::NORM_ULP_PROBE.store(false, std::sync::atomic::Ordering::Relaxed);
            let same = a
                .chunks(vocab)
                .zip(b.chunks(vocab))
                .filter(|(x, y)| argmax(x).0 == argmax(y).0)
                .count();
            let md = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            println!(
            "- yardstick: CPU vs CPU with RMSNorm one ulp off, teacher-forced over {trace_len} tokens (pmkvq): {:.2} % top-1 agree, max |logit difference| {md:.4}",
            100.0 * same as f64 / trace_len as f64
        );
        }
        for method in ["fp16", "pmkvq"] {
            let m = spec(method, None);
            let mut kc = cpu.new_store(&m, g, trace_len + 1).unwrap();
            let mut kg = dev.new_store(&m, g, trace_len + 1).unwrap();
            let mut same = 0usize;
            let (mut confident, mut confident_same) = (0usize, 0usize);
            let mut maxdiff = 0f32;
            for (ci, c) in trace.chunks(256).enumerate() {
                let pos: Vec<u32> = (ci * 256..ci * 256 + c.len()).map(|p| p as u32).collect();
                let lc = cpu
                    .forward(
                        &[SeqInput {
                            tokens: c,
                            positions: &pos,
                        }],
                        &mut [kc.as_mut()],
                        LogitsMode::All,
                    )
                    .unwrap()
                    .pop()
                    .unwrap();
                let lg = dev
                    .forward(
                        &[SeqInput {
                            tokens: c,
                            positions: &pos,
                        }],
                        &mut [kg.as_mut()],
                        LogitsMode::All,
                    )
                    .unwrap()
                    .pop()
                    .unwrap();
                for (a, b) in lc.chunks(vocab).zip(lg.chunks(vocab)) {
                    let (ta, ma) = argmax(a);
                    same += usize::from(ta == argmax(b).0);
                    if ma >= 0.1 {
                        confident += 1;
                        confident_same += usize::from(ta == argmax(b).0);
                    }
                    for (x, y) in a.iter().zip(b) {
                        maxdiff = maxdiff.max((x - y).abs());
                    }
                }
            }
            let frac = same as f64 / trace_len as f64;
            check(
            &format!("teacher-forced top-1 GPU vs CPU over {trace_len} tokens ({method})"),
            frac >= 0.99,
            format!(
                "{:.2} % agree ({:.2} % of the {confident} positions where the CPU's top-2 margin is ≥ 0.1); max |logit difference| {maxdiff:.4}",
                100.0 * frac,
                100.0 * confident_same as f64 / confident.max(1) as f64
            ),
        );
        }

        stage("codes");
        // 3. Device cache codes == CPU cache codes after the same K/V and the same cuts.
        for (m, what) in [
            (spec("pmkvq", None), ""),
            (rotated.clone(), " (rotated, fitted floor, key scales)"),
        ] {
            let mut kc = cpu.new_store(&m, g, 2000).unwrap();
            let mut kg = dev.new_store(&m, g, 2000).unwrap();
            let kvd = g.kv_dim();
            let x: Vec<f32> = (0..700 * kvd)
                .map(|i| ((i as f32 * 0.7311).sin() * 3.0) + ((i % 97) as f32 * 0.01))
                .collect();
            let y: Vec<f32> = (0..700 * kvd).map(|i| (i as f32 * 0.1931).cos() * 2.0).collect();
            let mut steps = vec![];
            for (n, cut) in [(300usize, false), (1, false), (150, true), (249, false)] {
                let off = steps.iter().sum::<usize>();
                for li in 0..g.layers {
                    kc.append(li, &x[off * kvd..(off + n) * kvd], &y[off * kvd..(off + n) * kvd], n)
                        .unwrap();
                    kg.append(li, &x[off * kvd..(off + n) * kvd], &y[off * kvd..(off + n) * kvd], n)
                        .unwrap();
                }
                steps.push(n);
                if cut {
                    let _ = kc.set_layer_budgets(&vec![1; g.layers]);
                    let _ = kg.set_layer_budgets(&vec![1; g.layers]);
                }
                let (sc, sg) = (kc.spill().unwrap(), kg.spill().unwrap());
                if cut {
                    // lift the budget again so later tokens flush into the 2-bit body
                    kc.set_layer_budgets(&vec![usize::MAX; g.layers]).unwrap();
                    kg.set_layer_budgets(&vec![usize::MAX; g.layers]).unwrap();
                }
                let same = codes_equal(&sc, &sg);
                check(
                    &format!(
                        "device cache codes == CPU after {} tokens{}{what}",
                        off + n,
                        if cut { " and a cut to the floor" } else { "" }
                    ),
                    same && kc.layer_bits() == kg.layer_bits(),
                    format!(
                        "bits CPU {:?}… GPU {:?}…; spills {} / {} bytes",
                        &kc.layer_bits()[..3],
                        &kg.layer_bits()[..3],
                        sc.len(),
                        sg.len()
                    ),
                );
            }
            // a device spill restores on the CPU and back bit-exactly
            let sg = kg.spill().unwrap();
            let mut back = dev.new_store(&m, g, 2000).unwrap();
            back.restore(&sg).unwrap();
            check(
                &format!("device spill → restore round trip{what}"),
                back.spill().unwrap() == sg,
                format!("{} bytes", sg.len()),
            );
        }

        stage("budget cut");
        // 4. A budget cut mid-generation lowers device bits within one step; bytes stay under the budget after.
        {
            let m = spec("pmkvq", None);
            let p = &prompts[0].1;
            let mut kv = dev.new_store(&m, g, 4096).unwrap();
            let mut pos = 0u32;
            let posv: Vec<u32> = (0..p.len() as u32).collect();
            let mut logits = dev
                .forward(
                    &[SeqInput {
                        tokens: p,
                        positions: &posv,
                    }],
                    &mut [kv.as_mut()],
                    LogitsMode::Last,
                )
                .unwrap()
                .pop()
                .unwrap();
            pos += p.len() as u32;
            let mut ok = true;
            let mut detail = String::new();
            let mut budget = usize::MAX;
            for step in 0..400 {
                if step == 300 {
                    budget = kv.true_bytes() / 2;
                    let before = kv.layer_bits();
                    let r = kv.set_total_budget(budget, None, 1);
                    detail = format!(
                        "cut to {budget} B at step 300 ({} B held): {:?}, bits {:?}… → {:?}…",
                        kv.true_bytes(),
                        r.is_ok(),
                        &before[..3],
                        &kv.layer_bits()[..3]
                    );
                }
                let t = argmax(&logits).0;
                match dev.forward(
                    &[SeqInput {
                        tokens: &[t],
                        positions: &[pos],
                    }],
                    &mut [kv.as_mut()],
                    LogitsMode::Last,
                ) {
                    Ok(mut l) => logits = l.pop().unwrap(),
                    Err(e) => {
                        detail.push_str(&format!("; step {step}: {e}"));
                        break;
                    }
                }
                pos += 1;
                if kv.true_bytes() > budget {
                    ok = false;
                    detail.push_str(&format!("; step {step}: {} B > budget", kv.true_bytes()));
                    break;
                }
            }
            check("budget cut mid-generation", ok && budget != usize::MAX, detail);
        }

        stage("batched");
        // 5. 8 concurrent streams equal their solo runs.
        {
            // odd streams rotated: one batch mixes rows pk_rotate turns and rows it leaves alone
            let plain = spec("pmkvq", None);
            let method = |k: usize| if k % 2 == 1 { &rotated } else { &plain };
            let n = if quick { 16 } else { 48 };
            let ps: Vec<Vec<u32>> = (0..8u32)
                .map(|k| (0..20 + 9 * k).map(|i| (i * 7919 + k * 31337) % 49000 + 3).collect())
                .collect();
            let solo: Vec<(Vec<u32>, Vec<f32>)> = ps
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let (t, mg, _) = greedy(&dev, method(k), p, n);
                    (t, mg)
                })
                .collect();
            let mut stores: Vec<Box<dyn KvStore>> = (0..8).map(|k| dev.new_store(method(k), g, 512).unwrap()).collect();
            let mut out: Vec<Vec<u32>> = vec![Vec::new(); 8];
            let positions: Vec<Vec<u32>> = ps.iter().map(|p| (0..p.len() as u32).collect()).collect();
            let inputs: Vec<SeqInput> = ps
                .iter()
                .zip(&positions)
                .map(|(p, q)| SeqInput {
                    tokens: p,
                    positions: q,
                })
                .collect();
            let mut kvs: Vec<&mut dyn KvStore> = stores.iter_mut().map(|s| s.as_mut() as &mut dyn KvStore).collect();
            let mut logits = dev.forward(&inputs, &mut kvs, LogitsMode::Last).unwrap();
            for step in 0..n {
                let toks: Vec<[u32; 1]> = logits.iter().map(|l| [argmax(l).0]).collect();
                for (o, t) in out.iter_mut().zip(&toks) {
                    o.push(t[0]);
                }
                let pos: Vec<[u32; 1]> = ps.iter().map(|p| [(p.len() + step) as u32]).collect();
                let inputs: Vec<SeqInput> = toks
                    .iter()
                    .zip(&pos)
                    .map(|(t, q)| SeqInput {
                        tokens: t,
                        positions: q,
                    })
                    .collect();
                let mut kvs: Vec<&mut dyn KvStore> =
                    stores.iter_mut().map(|s| s.as_mut() as &mut dyn KvStore).collect();
                logits = dev.forward(&inputs, &mut kvs, LogitsMode::Last).unwrap();
            }
            let (mut eq, mut cmp) = (0, 0);
            for ((st, sm), o) in solo.iter().zip(&out) {
                let lim = sm.iter().position(|&x| x < 0.1).unwrap_or(n);
                cmp += lim;
                eq += st.iter().zip(o).take(lim).take_while(|(a, b)| a == b).count();
            }
            check(
                "8 batched streams (4 rotated) == their solo runs (GPU)",
                eq == cmp,
                format!("{eq}/{cmp} tokens up to each stream's first margin < 0.1"),
            );
        }
    }
    stage("speed");
    // 6. Speed, side by side with the CPU path.
    if agreement_only {
        println!("\n{} failure(s)", failures);
        std::process::exit(i32::from(failures > 0));
    }
    println!("\n## Speed (medians of 3; CPU path = {threads} threads on the same machine)\n");
    println!("| measurement | GPU | CPU | GPU/CPU |\n|---|---|---|---|");
    let fp16 = spec("fp16", None);
    let pm = spec("pmkvq", None);
    let row = |name: &str, gv: f64, cv: Option<f64>| match cv {
        Some(c) => println!("| {name} | {gv:.1} | {c:.1} | {:.1}x |", gv / c),
        None => println!("| {name} | {gv:.1} | — | — |"),
    };
    for depth in [0usize, 4096, 32768] {
        if quick && depth > 4096 {
            continue;
        }
        let steps = 32;
        let (gf, bf) = decode_speed(&dev, &fp16, 1, depth, steps, None);
        let (gp, bp) = decode_speed(&dev, &pm, 1, depth, steps, if depth > 0 { Some(0.2) } else { None });
        let cf = (depth <= 4096).then(|| decode_speed(&cpu, &fp16, 1, depth, 8, None).0);
        let cp =
            (depth <= 4096).then(|| decode_speed(&cpu, &pm, 1, depth, 8, if depth > 0 { Some(0.2) } else { None }).0);
        row(
            &format!(
                "decode tok/s, 1 stream, depth {depth}, fp16 KV ({:.1} MiB)",
                bf as f64 / 1048576.0
            ),
            gf,
            cf,
        );
        row(
            &format!(
                "decode tok/s, 1 stream, depth {depth}, PM-KVQ at 1/5 fp16 bytes ({:.1} MiB)",
                bp as f64 / 1048576.0
            ),
            gp,
            cp,
        );
        if depth == 32768 {
            println!("| PM-KVQ ⅕ vs fp16 at depth 32768 (GPU) | {:.2}x | | |", gp / gf);
        }
        if depth == 4096 {
            // what the rotation (inside pk_qkv_post and pk_attn_combine: no extra launches) and the fitted floor cost
            let shipped = MethodSpec {
                rotate: true,
                method: KvMethod::Pmkvq(pmkvq::kvcache::PmkvqConfig {
                    shift: pmkvq::kvcache::quant::ShiftMode::Fitted,
                    ..pmkvq::kvcache::PmkvqConfig::pmkvq()
                }),
                ..spec("pmkvq", None)
            };
            let (gr, _) = decode_speed(&dev, &shipped, 1, depth, steps, Some(0.2));
            println!(
                "| decode tok/s, 1 stream, depth 4096, PM-KVQ at 1/5 rotated + fitted floor (pmkvq on a GPU) | {gr:.1} | | {:.2}x unrotated |",
                gr / gp
            );
        }
    }
    let (one, _) = decode_speed(&dev, &pm, 1, 128, 32, None);
    for streams in [1usize, 8, 32] {
        let (r, _) = decode_speed(&dev, &pm, streams, 128, 32, None);
        let c = (streams <= 8).then(|| decode_speed(&cpu, &pm, streams, 128, 4, None).0);
        row(
            &format!(
                "total decode tok/s, {streams} streams, depth 128, PM-KVQ ({:.1}x one stream)",
                r / one
            ),
            r,
            c,
        );
    }
    // the fused launches and GQA-group attention against the launch plan the 2026-11-30 run measured
    for (depth, m, frac, name) in [
        (0usize, &fp16, None, "fp16"),
        (4096, &pm, Some(0.2), "PM-KVQ 1/5"),
        (32768, &fp16, None, "fp16"),
        (32768, &pm, Some(0.2), "PM-KVQ 1/5"),
    ] {
        if quick && depth > 4096 {
            continue;
        }
        let (now, old) = launch_plans(&dev, m, depth, 32, frac);
        println!(
            "| decode tok/s, 1 stream, depth {depth}, {name}: fused launches + GQA-group attention / unfused, a warp per head (the 2026-11-30 plan) | {now:.1} / {old:.1} | | {:.2}x |",
            now / old
        );
    }
    dev.set_graphs(false);
    let (nog, _) = decode_speed(&dev, &pm, 1, 0, 32, None);
    let (nog8, _) = decode_speed(&dev, &pm, 8, 128, 32, None);
    dev.set_graphs(true);
    println!("| decode tok/s without CUDA graphs: 1 stream depth 0 / 8 streams depth 128 | {nog:.1} / {nog8:.1} | | |");
    let (cap, rep) = dev.graph_stats();
    println!("| CUDA graphs captured / replayed so far | {cap} / {rep} | | |");
    for n in [512usize, 4096] {
        let gp = prefill_speed(&dev, &pm, n, 512);
        let cp = prefill_speed(&cpu, &pm, n, 512);
        row(
            &format!("prefill tok/s, {n}-token prompt (chunks of 512)"),
            gp,
            Some(cp),
        );
    }
    println!("\n## Where a decode step's device time goes (one step, kernels launched directly, event-timed)\n");
    profile(&dev, &fp16, 0, None, "fp16, depth 0");
    dev.set_launch_plan(false, 1);
    profile(
        &dev,
        &fp16,
        0,
        None,
        "fp16, depth 0, the 2026-11-30 launch plan (unfused, a warp per head)",
    );
    dev.set_launch_plan(true, 4);
    profile(&dev, &pm, 4096, Some(0.2), "PM-KVQ 1/5, depth 4096");
    if !quick {
        profile(&dev, &fp16, 32768, None, "fp16, depth 32768");
        profile(&dev, &pm, 32768, Some(0.2), "PM-KVQ 1/5, depth 32768");
    }
    println!("\n{} failure(s)", failures);
    if failures > 0 {
        std::process::exit(1);
    }
}

/// Two PM-KVQ spills hold the same codes and parameters (per-layer budgets, which follow each side's own byte
/// accounting, are not compared).
fn codes_equal(a: &[u8], b: &[u8]) -> bool {
    use pmkvq::kvcache::spill::Reader;
    let (Ok(mut ra), Ok(mut rb)) = (Reader::new(a, "pmkvq"), Reader::new(b, "pmkvq")) else {
        return false;
    };
    let same = |ra: &mut Reader, rb: &mut Reader| -> Option<bool> {
        if ra.bytes().ok()? != rb.bytes().ok()? {
            return Some(false);
        }
        let _ = (ra.u64().ok()?, rb.u64().ok()?);
        loop {
            // per layer: budget, then 6 segments of (bits, data, scale, offset)
            let Ok(_) = ra.u64() else {
                return Some(rb.u64().is_err());
            };
            rb.u64().ok()?;
            for _ in 0..6 {
                if ra.u64().ok()? != rb.u64().ok()? || ra.bytes().ok()? != rb.bytes().ok()? {
                    return Some(false);
                }
                if ra.f16s().ok()? != rb.f16s().ok()? || ra.f16s().ok()? != rb.f16s().ok()? {
                    return Some(false);
                }
            }
        }
    };
    same(&mut ra, &mut rb).unwrap_or(false)
}

/// Where the GPU and CPU paths part: the residual stream after the embedding, after layer 0's attention block and
/// after each layer, for one token and for five.
fn diagnose(cpu: &Model, dev: &GpuModel, g: KvGeometry) {
    println!("## Residual stream, GPU vs CPU (max |difference| / max |value|)\n");
    for n in [1usize, 5] {
        let toks: Vec<u32> = (0..n as u32).map(|i| 100 + 37 * i).collect();
        let pos: Vec<u32> = (0..n as u32).collect();
        let m = spec("fp16", None);
        let mut kc = cpu.new_store(&m, g, 16).unwrap();
        let cpu_in = cpu.layer_inputs(&toks, &pos, kc.as_mut()).unwrap();
        let mut ka = cpu.new_store(&m, g, 16).unwrap();
        let attn0 = cpu.attention_block(0, &cpu_in[0], &pos, ka.as_mut()).unwrap();
        let after_attn: Vec<f32> = cpu_in[0].iter().zip(&attn0).map(|(a, b)| a + b).collect();
        let mut kg = dev.new_store(&m, g, 16).unwrap();
        let gd = dev
            .trace_hidden(
                &[SeqInput {
                    tokens: &toks,
                    positions: &pos,
                }],
                &mut [kg.as_mut()],
            )
            .unwrap();
        let rel = |a: &[f32], b: &[f32]| {
            let mx = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-20);
            let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            format!("{:.2e} (max {mx:.3})", d / mx)
        };
        let mut line = format!("- {n} token(s): embedding {}", rel(&cpu_in[0], &gd[0]));
        line.push_str(&format!("; layer 0 after attention {}", rel(&after_attn, &gd[1])));
        for (li, c) in cpu_in.iter().enumerate().skip(1).take(4) {
            line.push_str(&format!("; after layer {} {}", li - 1, rel(c, &gd[li + 1])));
        }
        line.push_str(&format!(
            "; after layer {} {}",
            g.layers - 1,
            rel(&cpu_in[g.layers], &gd[g.layers + 1])
        ));
        println!("{line}");
    }
    println!();
}
