//! Soak: many concurrent streams against a real pmkvqd over loopback for minutes, with mixed KV methods and
//! lengths, clients that cancel, and a budget cut half-way, while WatchStatus is read throughout. Not a test (it
//! runs for minutes); `scripts/soak.sh` runs it and its summary goes into issue notes.
//!
//! Checks, each a failure (exit 1) when broken: KV bytes ≤ budget in every status update; no stream ends with
//! an error or a transport failure (MEMORY_PRESSURE is counted apart, split by whether the request could fit
//! the budget alone); after the run the server holds 0 sequences and 0 KV bytes. Reports RSS over time.
//!
//! `cargo run --release --example soak -- --minutes 10 [--clients 16] [--budget 64MiB] [--cut 0.75]
//!  [--max-total 340] [--pmkvqd PATH] [--set key=value]...`

use pmkvq::server::proto::{
    self as pb, pmkvq_admin_client::PmkvqAdminClient, pmkvq_service_client::PmkvqServiceClient,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    minutes: f64,
    clients: usize,
    budget: u64,
    cut: f64,
    max_total: u32,
    pmkvqd: std::path::PathBuf,
    sets: Vec<String>,
}

fn parse_args() -> Args {
    let exe = std::env::current_exe().expect("own path");
    let mut a = Args {
        minutes: 10.0,
        clients: 16,
        budget: 64 << 20,
        cut: 0.75,
        max_total: 340,
        // target/release/examples/soak → target/release/pmkvqd
        pmkvqd: exe
            .parent()
            .and_then(|p| p.parent())
            .expect("target dir")
            .join("pmkvqd"),
        sets: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--minutes" => a.minutes = v().parse().expect("--minutes: a number"),
            "--clients" => a.clients = v().parse().expect("--clients: a count"),
            "--budget" => a.budget = pmkvq::units::parse_bytes(&v()).expect("--budget: bytes such as 64MiB") as u64,
            "--cut" => a.cut = v().parse().expect("--cut: a fraction"),
            "--max-total" => a.max_total = v().parse().expect("--max-total: tokens"),
            "--pmkvqd" => a.pmkvqd = v().into(),
            "--set" => a.sets.push(v()),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// xorshift64*, seeded per client: the run is the same every time for the same arguments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const METHODS: &[&str] = &[
    "pmkvq",
    "pmkvq",
    "pmkvq",
    "fp16",
    "kivi:2",
    "rtn:4",
    "q4_0",
    "pmkvq:direct",
];
const TOPICS: &[&str] = &[
    "Explain step by step how a binary search works",
    "Write a short poem about the sea at night",
    "What are three uses of a Raspberry Pi in a greenhouse",
    "Summarize the plot of a detective story you invent",
    "List the planets of the solar system with one fact each",
    "How do I compute the area of a triangle from its sides",
];

#[derive(Default)]
struct Tally {
    /// finish reason (or error kind) → count
    outcomes: BTreeMap<String, usize>,
    errors: Vec<String>,
    /// MEMORY_PRESSURE endings of requests that fit the budget alone (the server refuses those that cannot).
    pressure: usize,
    cancelled_by_client: usize,
    tokens: u64,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

async fn client_loop(id: usize, url: String, stop: Arc<AtomicBool>, max_total: u32, tally: Arc<Mutex<Tally>>) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    let mut c = loop {
        match PmkvqServiceClient::connect(url.clone()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let topic = TOPICS[rng.below(TOPICS.len() as u64) as usize];
        let repeat = 1 + rng.below(6) as usize;
        let prompt = vec![topic; repeat].join(". Also, ");
        let max_tokens = 16 + rng.below(max_total as u64 / 2) as u32;
        let method = METHODS[rng.below(METHODS.len() as u64) as usize];
        // one stream in ten walks away after a few chunks
        let cancel_after = (rng.below(10) == 0).then(|| 1 + rng.below(20) as usize);
        let req = pb::GenerateRequest {
            request_id: format!("soak-{id}-{n}"),
            input: Some(pb::generate_request::Input::Chat(pb::ChatInput {
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: prompt,
                }],
            })),
            sampling: Some(pb::SamplingParams {
                temperature: Some(0.8),
                seed: Some(rng.next()),
                ..Default::default()
            }),
            stopping: Some(pb::StoppingCriteria {
                max_tokens: Some(max_tokens),
                ignore_eos: Some(rng.below(2) == 0),
                ..Default::default()
            }),
            kv: Some(pb::KvPolicy {
                method: Some(method.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let outcome = match c.generate(req).await {
            Err(st) if st.code() == tonic::Code::ResourceExhausted => format!("refused: {}", st.message()),
            Err(st) => format!("error: {st}"),
            Ok(resp) => {
                let mut s = resp.into_inner();
                let mut chunks = 0;
                let end = loop {
                    match s.message().await {
                        Ok(Some(m)) => match m.kind {
                            Some(pb::generate_response::Kind::Chunk(ch)) => {
                                chunks += 1;
                                tally.lock().unwrap().tokens += ch.token_ids.len() as u64;
                                if cancel_after.is_some_and(|k| chunks >= k) {
                                    break "client cancelled".to_string();
                                }
                            }
                            Some(pb::generate_response::Kind::Complete(cm)) => {
                                let r = pb::FinishReason::try_from(cm.finish_reason)
                                    .map(|r| r.as_str_name().trim_start_matches("FINISH_REASON_").to_lowercase())
                                    .unwrap_or_else(|_| "unknown".into());
                                break r;
                            }
                            Some(pb::generate_response::Kind::Error(e)) => break format!("error: {}", e.message),
                            None => {}
                        },
                        Ok(None) => break "error: stream ended without complete or error".to_string(),
                        Err(st) => break format!("error: transport {st}"),
                    }
                };
                drop(s);
                end
            }
        };
        let mut t = tally.lock().unwrap();
        if outcome == "client cancelled" {
            t.cancelled_by_client += 1;
        }
        if outcome == "memory_pressure" {
            t.pressure += 1;
        }
        if outcome.starts_with("error") || outcome.starts_with("refused") {
            if t.errors.len() < 20 {
                t.errors.push(format!("soak-{id}-{n}: {outcome}"));
            }
            *t.outcomes
                .entry(outcome.split(':').next().unwrap_or("error").to_string())
                .or_default() += 1;
        } else {
            *t.outcomes.entry(outcome).or_default() += 1;
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = parse_args();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::env::temp_dir().join(format!("pmkvq-soak-{}.log", std::process::id()));
    let mut cmd = std::process::Command::new(&a.pmkvqd);
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--set", &format!("memory.budget={}", a.budget)])
        .args(["--set", "log.filter=warn"]);
    for s in &a.sets {
        cmd.args(["--set", s]);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", a.pmkvqd.display()));
    let pid = child.id();
    let url = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    let mut admin = loop {
        if let Ok(mut c) = PmkvqServiceClient::connect(url.clone()).await {
            if c.get_status(pb::GetStatusRequest {})
                .await
                .is_ok_and(|s| s.into_inner().ready)
            {
                break PmkvqAdminClient::connect(url.clone()).await.unwrap();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "pmkvqd not ready; see {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rss_start = rss_kib(pid);
    println!(
        "soak: {} clients, {:.1} min, budget {} MiB cut by {:.0} % half-way, pmkvqd pid {pid} (log {})",
        a.clients,
        a.minutes,
        a.budget >> 20,
        a.cut * 100.0,
        log.display()
    );

    // The watcher: every status update, KV bytes against the budget.
    let watch_stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let mut admin = admin.clone();
        let stop = watch_stop.clone();
        tokio::spawn(async move {
            let mut s = admin
                .watch_status(pb::WatchStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            let (mut updates, mut over, mut worst) = (0u64, Vec::new(), 0f64);
            while !stop.load(Ordering::Relaxed) {
                let Ok(Ok(Some(u))) = tokio::time::timeout(Duration::from_millis(500), s.message()).await else {
                    continue;
                };
                let st = u.status.unwrap_or_default();
                updates += 1;
                if st.kv_budget_bytes > 0 {
                    worst = worst.max(st.kv_true_bytes as f64 / st.kv_budget_bytes as f64);
                }
                if st.kv_true_bytes > st.kv_budget_bytes && over.len() < 10 {
                    over.push(format!("{} > {} bytes", st.kv_true_bytes, st.kv_budget_bytes));
                }
            }
            (updates, over, worst)
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients: Vec<_> = (0..a.clients)
        .map(|i| tokio::spawn(client_loop(i, url.clone(), stop.clone(), a.max_total, tally.clone())))
        .collect();

    let total = Duration::from_secs_f64(a.minutes * 60.0);
    let start = Instant::now();
    let mut cut_done = false;
    let mut rss = vec![(0.0, rss_start)];
    while start.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(5).min(total.saturating_sub(start.elapsed()))).await;
        rss.push((start.elapsed().as_secs_f64(), rss_kib(pid)));
        if !cut_done && start.elapsed() >= total / 2 {
            let to = (a.budget as f64 * (1.0 - a.cut)) as u64;
            let r = admin
                .set_memory_budget(pb::SetMemoryBudgetRequest {
                    budget: Some(pb::set_memory_budget_request::Budget::Bytes(to)),
                })
                .await
                .expect("SetMemoryBudget");
            println!(
                "at {:.0} s: budget cut to {} bytes: {}",
                start.elapsed().as_secs_f64(),
                to,
                r.into_inner().effect
            );
            cut_done = true;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    // Everything ends: 0 sequences and 0 KV bytes within 10 s.
    let mut svc = PmkvqServiceClient::connect(url.clone()).await.unwrap();
    let t = Instant::now();
    let last = loop {
        let s = svc.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
        if (s.sequences.is_empty() && s.kv_true_bytes == 0) || t.elapsed() > Duration::from_secs(10) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    watch_stop.store(true, Ordering::Relaxed);
    let (updates, over, worst) = watcher.await.unwrap();
    let rss_end = rss_kib(pid);
    let _ = child.kill();
    let _ = child.wait();

    let t = tally.lock().unwrap();
    let streams: usize = t.outcomes.values().sum();
    println!(
        "\nstreams: {streams}, tokens: {}, status updates read: {updates}",
        t.tokens
    );
    for (k, v) in &t.outcomes {
        println!("  {k:<24} {v:>6}");
    }
    let fit_alone = streams - t.cancelled_by_client;
    println!(
        "memory_pressure among requests that fit the budget alone: {} of {} ({:.2} %)",
        t.pressure,
        fit_alone,
        100.0 * t.pressure as f64 / fit_alone.max(1) as f64
    );
    println!(
        "preemptions {}, resumptions {}, re-quantizations {}",
        last.preemptions, last.resumptions, last.requantizations
    );
    println!("KV / budget at most {:.3} over {updates} updates", worst);
    let mid = rss
        .iter()
        .find(|(s, _)| *s >= total.as_secs_f64() / 2.0)
        .map_or(0, |r| r.1);
    println!(
        "RSS (MiB): start {:.1}, half-way {:.1}, end {:.1}; samples every 5 s: {}",
        rss_start as f64 / 1024.0,
        mid as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        rss.iter()
            .map(|(_, k)| format!("{:.0}", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut failed = Vec::new();
    if !over.is_empty() {
        failed.push(format!("KV bytes above the budget: {over:?}"));
    }
    if !t.errors.is_empty() {
        failed.push(format!("errors: {:?}", t.errors));
    }
    if !(last.sequences.is_empty() && last.kv_true_bytes == 0) {
        failed.push(format!(
            "left after the run: {} sequences, {} KV bytes",
            last.sequences.len(),
            last.kv_true_bytes
        ));
    }
    if failed.is_empty() {
        println!("soak: OK");
    } else {
        for f in &failed {
            println!("soak: FAILED: {f}");
        }
        std::process::exit(1);
    }
}
