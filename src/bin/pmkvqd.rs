//! `pmkvqd`: the daemon. Thin: configuration → logging → `app::run` until SIGTERM/SIGINT → exit code.

use pmkvq::config::{self, Action, ConfigError, LogFormat};
use std::process::ExitCode;

/// sysexits.h: bad configuration or usage.
const EX_USAGE: u8 = 64;
const EX_OSERR: u8 = 71;

/// glibc's allocator, tuned for a long-running daemon before any thread starts: few arenas (each thread that
/// allocates — tokio workers, preparation threads that come and go, the compute pool — otherwise gets its own,
/// and KV buffers freed on another thread than the one that grew them leave arenas fragmented), and fixed
/// mmap/trim thresholds (the dynamic threshold climbs after large frees, so later large buffers come from the
/// heap and are never returned). Measured with `scripts/soak.sh`: RSS climbed 125 → 217 MiB over 10 minutes
/// without this and levels off with it (README, "Soak"). An operator's `MALLOC_*` variable wins over each setting.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    for (var, param, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 2),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, MALLOC_THRESHOLD),
        ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, MALLOC_THRESHOLD),
    ] {
        if std::env::var_os(var).is_none() {
            // SAFETY: mallopt only sets allocator parameters; it is called before any other thread exists.
            unsafe { libc::mallopt(param, value) };
        }
    }
}

/// Allocations from this size up are mapped on their own and returned to the system when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_THRESHOLD: libc::c_int = 1 << 20;

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> ExitCode {
    tune_malloc();
    let action = match config::load(std::env::args_os().collect(), &|k| std::env::var(k).ok()) {
        Ok(a) => a,
        Err(ConfigError::Cli(e)) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
        Err(e) => {
            eprintln!("pmkvqd: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let (cfg, _raw) = match action {
        Action::PrintConfig(raw) => {
            print!("{}", raw.render());
            return ExitCode::SUCCESS;
        }
        Action::Run(cfg, raw) => (*cfg, raw),
    };
    let filter = tracing_subscriber::EnvFilter::new(&cfg.log_filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match cfg.log_format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Pretty => builder.init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        // The runtime only moves bytes; compute runs on the engine thread and its pool.
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pmkvqd: cannot start the async runtime: {e}");
            return ExitCode::from(EX_OSERR);
        }
    };
    rt.block_on(async move {
        let listener = match bind(&cfg.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listen = ?cfg.listen, error = %e, "cannot bind");
                return ExitCode::from(EX_OSERR);
            }
        };
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(reload_on_sighup(reload_tx));
        match pmkvq::app::run_with_reload(cfg, listener, shutdown_signal(), reload_rx).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "pmkvqd failed");
                ExitCode::from(e.exit_code())
            }
        }
    })
}

async fn bind(addr: &config::ListenAddr) -> std::io::Result<pmkvq::server::Listener> {
    use pmkvq::server::Listener;
    match addr {
        config::ListenAddr::Tcp(a) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(a).await?)),
        config::ListenAddr::Unix(p) => {
            // A socket left by a previous run would make bind fail; nothing else may live at our path.
            if std::fs::symlink_metadata(p).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
                std::fs::remove_file(p)?;
            }
            Ok(Listener::Unix(tokio::net::UnixListener::bind(p)?))
        }
    }
}

/// SIGHUP: read the configuration again (file, environment, this process's flags) and hand the budget-related
/// part to the daemon; an invalid configuration is logged and ignored (the running one stays).
async fn reload_on_sighup(tx: tokio::sync::mpsc::Sender<pmkvq::app::Reload>) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match config::load(std::env::args_os().collect(), &|k| std::env::var(k).ok()) {
                Ok(Action::Run(cfg, _)) => {
                    let r = pmkvq::app::Reload {
                        memory_cap: cfg.memory_cap,
                        memory_policy: cfg.memory_policy.clone(),
                    };
                    if tx.send(r).await.is_err() {
                        return;
                    }
                }
                Ok(Action::PrintConfig(_)) => {}
                Err(e) => tracing::error!(error = %e, "SIGHUP: configuration not reloaded"),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tx;
}

/// Resolves on SIGTERM (systemd, docker stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT"),
        _ = term => tracing::info!("SIGTERM"),
    }
}
