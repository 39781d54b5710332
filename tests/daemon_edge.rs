//! The async runtime and the network edge (issue 14 items 8 and 9): CPU work on requests stays off the two
//! runtime threads and starts only once the queue has room; connections that never speak, peers that stop
//! answering, too many streams on one connection and a process out of descriptors are all bounded.

mod common;

use common::daemon::{start_server, text_request};
use pmkvq::server::proto::{self as pb, pmkvq_service_client::PmkvqServiceClient};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::Code;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

/// Just under tonic's 4 MiB message limit: plain words the tokenizer has to work through.
fn huge_prompt() -> String {
    let words = [
        "reason",
        "carefully",
        "about",
        "memory",
        "budgets",
        "on",
        "edge",
        "devices",
        "today",
    ];
    let mut s = String::with_capacity(4 << 20);
    let mut i = 0usize;
    while s.len() < (4 << 20) - 64 * 1024 {
        s.push_str(words[i % words.len()]);
        s.push(if i % 17 == 16 { '\n' } else { ' ' });
        i = i.wrapping_mul(31).wrapping_add(7) % 1_000_003;
    }
    s
}

/// Drain a stream in the background (the client keeps reading, so its sequence keeps its slot).
fn drain(mut s: tonic::Streaming<pb::GenerateResponse>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while let Ok(Some(_)) = s.message().await {} })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_a_huge_prompt_before_tokenizing_it() {
    let server = start_server(&[("engine.max_running", "1"), ("engine.max_queued", "1")]).await;
    let mut c = server.client().await;
    let long = || {
        let mut r = text_request("Tell me a very long story about a lighthouse keeper.", 4000);
        r.stopping.as_mut().unwrap().ignore_eos = Some(true);
        r
    };
    let running = drain(c.generate(long()).await.expect("first").into_inner());
    common::daemon::wait_status(&mut c, Duration::from_secs(10), |s| s.running == 1).await;
    let queued = drain(c.generate(long()).await.expect("second").into_inner());
    common::daemon::wait_status(&mut c, Duration::from_secs(10), |s| s.queued == 1).await;
    // The prompt is far too long for the model's context; refusing it for that would mean it was tokenized.
    let st = c
        .generate(pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Text(huge_prompt())),
            ..Default::default()
        })
        .await
        .expect_err("the queue is full");
    assert_eq!(st.code(), Code::ResourceExhausted, "{}", st.message());
    assert!(st.message().contains("the queue is full"), "{}", st.message());
    running.abort();
    queued.abort();
    server.stop().await;
}

type Daemon = common::daemon::Pmkvqd;

async fn health(port: u16, deadline: Duration) -> Result<ServingStatus, String> {
    let fut = async {
        let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .map_err(|e| e.to_string())?;
        Ok(r.into_inner().status())
    };
    tokio::time::timeout(deadline, fut)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {deadline:?}")))
}

async fn spawn_daemon(sets: &[&str]) -> Daemon {
    common::daemon::spawn_pmkvqd(sets).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_answers_within_a_second_while_clients_send_4_mib_prompts() {
    let d = spawn_daemon(&[]).await;
    let url = format!("http://127.0.0.1:{}", d.port);
    let prompt = std::sync::Arc::new(huge_prompt());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut floods = Vec::new();
    for _ in 0..4 {
        let (url, prompt, stop) = (url.clone(), prompt.clone(), stop.clone());
        floods.push(tokio::spawn(async move {
            let mut c = PmkvqServiceClient::connect(url)
                .await
                .unwrap()
                .max_encoding_message_size(8 << 20);
            let mut answered = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let st = c
                    .generate(pb::GenerateRequest {
                        input: Some(pb::generate_request::Input::Text(prompt.to_string())),
                        ..Default::default()
                    })
                    .await
                    .expect_err("longer than the context");
                assert_eq!(st.code(), Code::InvalidArgument, "{}", st.message());
                answered += 1;
            }
            answered
        }));
    }
    // Health checks with a 1 s deadline, every 100 ms for 8 s, each on a fresh connection.
    let t0 = Instant::now();
    let (mut ok, mut late) = (0, Vec::new());
    while t0.elapsed() < Duration::from_secs(8) {
        let asked = Instant::now();
        match health(d.port, Duration::from_secs(1)).await {
            Ok(ServingStatus::Serving) => ok += 1,
            other => late.push(format!("at {:.1} s: {other:?}", asked.duration_since(t0).as_secs_f64())),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut tokenized = 0;
    for f in floods {
        tokenized += f.await.expect("flood client");
    }
    assert!(
        tokenized >= 4,
        "the flood must really have run: {tokenized} prompts answered"
    );
    assert!(late.is_empty(), "{ok} health checks answered, these not: {late:?}");
}

/// A raw HTTP/2 frame: (type, flags, stream, payload).
fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut h = [0u8; 9];
    s.read_exact(&mut h)?;
    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    Ok((h[3], h[4], stream, payload))
}

/// Read until the server closes the connection (or sends GOAWAY); how long that took, or `None` past `limit`.
fn time_to_close(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) if t0.elapsed() > limit => return None,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return None,
            Err(_) => return Some(t0.elapsed()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_and_unanswered_pings_are_closed_and_streams_per_connection_are_capped() {
    let d = spawn_daemon(&[
        "server.handshake_timeout=1s",
        "server.keepalive_interval=1s",
        "server.keepalive_timeout=1s",
        "server.max_streams_per_connection=3",
    ])
    .await;
    let port = d.port;
    tokio::task::spawn_blocking(move || {
        // Connects and says nothing: closed after the handshake timeout.
        let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let t = time_to_close(&mut silent, Duration::from_secs(6)).expect("a silent connection is closed");
        assert!(t >= Duration::from_millis(800), "closed too early: {t:?}");

        // Speaks HTTP/2, then never answers a ping: the server says how many streams it allows, pings, and
        // closes the connection.
        let mut peer = TcpStream::connect(("127.0.0.1", port)).unwrap();
        peer.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        peer.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap(); // empty SETTINGS
        peer.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let (kind, _, _, payload) = read_frame(&mut peer).expect("server SETTINGS");
        assert_eq!(kind, 4, "the server's first frame is SETTINGS");
        let max_streams = payload
            .chunks_exact(6)
            .find(|p| u16::from_be_bytes([p[0], p[1]]) == 3)
            .map(|p| u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
        assert_eq!(max_streams, Some(3), "SETTINGS_MAX_CONCURRENT_STREAMS");
        let t0 = Instant::now();
        let mut pinged = false;
        loop {
            match read_frame(&mut peer) {
                Ok((6, flags, _, _)) if flags & 1 == 0 => pinged = true,
                Ok((7, ..)) => break, // GOAWAY
                Ok(_) => {}
                Err(_) => break,
            }
            assert!(t0.elapsed() < Duration::from_secs(6), "still open after 6 s");
        }
        assert!(pinged, "the server pinged the idle peer before closing");
    })
    .await
    .unwrap();
    // A well-behaved client is unaffected.
    assert_eq!(health(d.port, Duration::from_secs(2)).await, Ok(ServingStatus::Serving));
}

/// CPU seconds the process has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 (utime, stime) of stat(5), counted from after the command name.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// The soft limit on open files of a process.
fn nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Set the soft limit on open files (the hard limit stays, so it can be raised again).
fn set_nofile(pid: u32, n: u64) {
    let ok = Command::new("prlimit")
        .args([format!("--pid={pid}"), format!("--nofile={n}:")])
        .status()
        .expect("prlimit (util-linux)")
        .success();
    assert!(ok, "prlimit --nofile={n}:");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_listeners_back_off_instead_of_spinning() {
    let d = common::daemon::spawn_pmkvqd_with_metrics(&[]).await;
    let metrics_port = d.metrics_port.expect("asked for");
    let pid = d.child.id();
    // Leave the daemon two spare descriptors, then connect far more clients than that to both listeners.
    let soft = nofile(pid);
    set_nofile(pid, open_fds(pid) as u64 + 2);
    let mut flood = Vec::new();
    for i in 0..40 {
        let port = if i % 2 == 0 { metrics_port } else { d.port };
        flood.push(TcpStream::connect(("127.0.0.1", port)).expect("the kernel's backlog takes the connection"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (c0, t0) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_seconds(pid) - c0;
    let wall = t0.elapsed().as_secs_f64();
    assert!(
        used < 0.25 * wall,
        "the daemon used {used:.2} CPU s in {wall:.1} s with its descriptors exhausted (spinning on accept)"
    );
    // Once the flood is gone (and the limit back), both listeners serve again.
    drop(flood);
    set_nofile(pid, soft);
    let t0 = Instant::now();
    loop {
        let scraped = TcpStream::connect(("127.0.0.1", metrics_port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        });
        if scraped.as_deref().is_ok_and(|b| b.starts_with("HTTP/1.1 200")) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "metrics did not recover: {scraped:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(health(d.port, Duration::from_secs(5)).await, Ok(ServingStatus::Serving));
}
