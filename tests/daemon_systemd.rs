//! The real `pmkvqd` under the systemd notify protocol: READY only after the model is warm, WATCHDOG pings at
//! half the configured interval, SIGHUP re-reads the memory budget from the config file, SIGTERM drains and
//! exits 0 (after STOPPING).

mod common;

use pmkvq::server::proto::{self as pb, pmkvq_service_client::PmkvqServiceClient};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn recv_until(sock: &UnixDatagram, limit: Duration, want: impl Fn(&str) -> bool) -> Vec<(Instant, String)> {
    let mut got = Vec::new();
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = want(&msg);
            got.push((Instant::now(), msg));
            if done {
                break;
            }
        }
    }
    got
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_after_warmup_watchdog_sighup_reload_and_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let cfg = dir.path().join("pmkvqd.toml");
    std::fs::write(&cfg, "[memory]\nbudget = \"auto\"\n").unwrap();
    // A port found free can be taken before the daemon binds it (see common::daemon::spawn_pmkvqd): a daemon that
    // exits before READY starts again on another port.
    let (mut child, port, msgs) = 'start: {
        for _ in 0..5 {
            let port = common::http::free_port();
            let mut child = Command::new(env!("CARGO_BIN_EXE_pmkvqd"))
                .arg("--model")
                .arg(common::default_model_path())
                .arg("--config")
                .arg(&cfg)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--set", "log.filter=warn"])
                .env("NOTIFY_SOCKET", &sock_path)
                .env("WATCHDOG_USEC", "300000")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            // READY, and at that moment the engine is warm (GetStatus says ready).
            let t0 = Instant::now();
            let mut msgs = Vec::new();
            while t0.elapsed() < Duration::from_secs(60) {
                msgs.extend(tokio::task::block_in_place(|| {
                    recv_until(&sock, Duration::from_millis(200), |m| m.contains("READY=1"))
                }));
                if msgs.iter().any(|(_, m)| m.contains("READY=1")) {
                    break 'start (child, port, msgs);
                }
                if let Some(status) = child.try_wait().unwrap() {
                    eprintln!("pmkvqd exited at start ({status}); again on another port");
                    break;
                }
            }
            if child.try_wait().unwrap().is_none() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no READY=1 within 60 s");
            }
        }
        panic!("pmkvqd exited at start five times");
    };
    let pid = child.id();
    let ready = msgs
        .iter()
        .find(|(_, m)| m.contains("READY=1"))
        .expect("READY=1 within 60 s");
    assert!(ready.1.contains("STATUS=serving"), "{}", ready.1);
    let url = format!("http://127.0.0.1:{port}");
    let mut c = PmkvqServiceClient::connect(url.clone()).await.unwrap();
    let st = c.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert!(st.ready, "READY was sent before the engine was warm");

    // Watchdog pings every WATCHDOG_USEC/2 = 150 ms.
    let pings: Vec<Instant> = tokio::task::block_in_place(|| recv_until(&sock, Duration::from_millis(1600), |_| false))
        .into_iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .map(|(t, _)| t)
        .collect();
    assert!(pings.len() >= 7, "{} watchdog pings in 1.6 s", pings.len());
    let gaps: Vec<u128> = pings.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
    assert!(gaps.iter().all(|&g| g < 300), "gaps {gaps:?} ms");

    // SIGHUP re-reads the file: the budget follows.
    std::fs::write(&cfg, "[memory]\nbudget = \"64MiB\"\n").unwrap();
    signal(pid, "-HUP");
    let t0 = Instant::now();
    loop {
        let st = c.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
        if st.kv_budget_bytes == 64 << 20 {
            assert_eq!(st.budget_source, pb::BudgetSource::Operator as i32);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "budget after SIGHUP: {}",
            st.kv_budget_bytes
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // SIGTERM: STOPPING, then exit 0.
    signal(pid, "-TERM");
    let msgs = tokio::task::block_in_place(|| recv_until(&sock, Duration::from_secs(10), |m| m.contains("STOPPING=1")));
    assert!(msgs.iter().any(|(_, m)| m.contains("STOPPING=1")));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "still running after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn unit_file_is_type_notify_with_watchdog_and_hardening() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/pmkvqd.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=pmkvq",
        "ConfigurationDirectory=pmkvq",
        "EnvironmentFile=-/etc/pmkvq/pmkvqd.env",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=",
        "DeviceAllow=",
    ] {
        assert!(unit.contains(line), "unit lacks `{line}`");
    }
}
