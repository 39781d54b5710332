//! Wiring for the daemon: bind → serve health (NOT_SERVING) → load and warm the model → SERVING → on shutdown:
//! NOT_SERVING, stop accepting, drain the engine within the grace period, exit.
//!
//! `pmkvqd` and the integration tests both start the daemon through [`run`], with a listener they bound and a
//! future that resolves on shutdown (mini-redis's pattern), so tests exercise exactly what ships.

use crate::config::{Config, ListenAddr, ProfileChoice};
use crate::engine::{EngineConfig, EngineHandle, EngineSetup};
use crate::memory::{self, Budget, Monitor, NoDevice, Policy};
use crate::model::{LoadOptions, Model, ModelError};
use crate::server::{self, AdminService, GrpcService, Listener, ServeOptions, ServingStatus};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// After the engine has drained, how long the transport gets to flush the last messages and close.
const TRANSPORT_CLOSE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("model {path}: {source}")]
    Model { path: PathBuf, source: ModelError },
    #[error("model {0} not found (run `pmkvq fetch-model` or set `model`)")]
    ModelMissing(PathBuf),
    #[error("engine.spill_dir: {0}")]
    Spill(String),
    #[error("profile {path}: {msg}")]
    Profile { path: PathBuf, msg: String },
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("loading the model: {0}")]
    Join(String),
    #[error("memory monitor: {0}")]
    Memory(#[from] crate::memory::MemoryError),
    #[error("cannot bind {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("device: {0}")]
    Gpu(#[from] crate::gpu::GpuError),
    #[error("{0}")]
    Engine(String),
    #[error("HTTP listener: {0}")]
    Tls(String),
}

impl AppError {
    /// sysexits-style code for the binary.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::ModelMissing(_) => 66,
            AppError::Model { .. } | AppError::Profile { .. } => 65,
            AppError::Transport(_) | AppError::Join(_) | AppError::Engine(_) => 70,
            AppError::Memory(_) | AppError::Bind(..) => 71,
            AppError::Gpu(_) => 69,
            AppError::Spill(_) => 73,
            AppError::Tls(_) => 78,
        }
    }
}

/// A configuration reload (SIGHUP): the budget-related settings to apply.
pub struct Reload {
    pub memory_cap: crate::memory::OperatorCap,
    pub memory_policy: crate::memory::PolicyConfig,
}

/// How often the service status line is refreshed when running under systemd.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Tell systemd (a no-op outside a notify unit).
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify");
    }
}

/// Serve until `shutdown` resolves, then drain. Returns when the daemon has stopped.
pub async fn run(cfg: Config, listener: Listener, shutdown: impl Future<Output = ()> + Send) -> Result<(), AppError> {
    let (_tx, reloads) = tokio::sync::mpsc::channel(1);
    run_with_reload(cfg, listener, shutdown, reloads).await
}

/// [`run`], also applying configuration reloads (SIGHUP in `pmkvqd`) to the memory budget. The phases, in order:
/// [`memory_start`] (the first budget) → [`front_start`] (transport up, health NOT_SERVING) → [`engine_start`]
/// (model, profile, warm-up; off the runtime) → [`supervise`] (SERVING, systemd READY/STATUS/WATCHDOG, SIGHUP)
/// → [`drain`].
pub async fn run_with_reload(
    cfg: Config,
    listener: Listener,
    shutdown: impl Future<Output = ()> + Send,
    mut reloads: tokio::sync::mpsc::Receiver<Reload>,
) -> Result<(), AppError> {
    let (monitor, policy, budget_tx, gpu) = memory_start(&cfg)?;
    let budget_rx = budget_tx.subscribe();
    let mut front = front_start(&cfg, listener, budget_rx.clone()).await?;
    tokio::pin!(shutdown);
    let Some(engine) = engine_start(&cfg, gpu, budget_rx, &mut front, &mut shutdown).await? else {
        return Ok(());
    };
    // The monitor follows memory from now on; it reads the KV bytes in use from the engine's status.
    let kv_status = engine.watch_status();
    let monitor_task = tokio::spawn(memory::run_monitor(
        monitor,
        policy,
        cfg.memory_interval,
        move || kv_status.borrow().kv_true_bytes as u64,
        front.cap_rx.take().expect("taken once"),
        budget_tx,
    ));
    let mut st = engine.watch_status();
    let shutdown_seen = tokio::select! {
        _ = st.wait_for(|s| s.ready || s.stopped) => false,
        _ = &mut shutdown => true,
    };
    let status = engine.status();
    let result = if let Some(why) = &status.failure {
        Err(AppError::Engine(format!("the engine failed to start: {why}")))
    } else if shutdown_seen {
        Ok(())
    } else if status.stopped {
        Err(AppError::Engine("the engine thread exited before it was ready".into()))
    } else {
        supervise(&engine, &mut front, &mut shutdown, &mut reloads).await
    };
    drain(cfg.shutdown_grace, &engine, front, monitor_task).await;
    result
}

/// The device (a GPU contributes its memory figures; a requested one that cannot be opened stops the start),
/// the memory monitor and policy, and the first budget, so the engine never runs without one.
#[allow(clippy::type_complexity)]
fn memory_start(
    cfg: &Config,
) -> Result<
    (
        Monitor,
        Policy,
        tokio::sync::watch::Sender<Budget>,
        Option<Arc<crate::gpu::Gpu>>,
    ),
    AppError,
> {
    let gpu = crate::gpu::open(cfg.device)?.map(Arc::new);
    let device: Box<dyn crate::memory::DeviceMemory> = match &gpu {
        Some(g) => {
            tracing::info!(gpu = g.name(), arch = g.arch(), "CUDA device opened");
            Box::new(crate::gpu::CudaDeviceMemory { gpu: g.clone() })
        }
        None => {
            if cfg.device == crate::gpu::DeviceChoice::Auto {
                tracing::info!("device = auto: no usable CUDA device, the model runs on the CPU");
            }
            Box::new(NoDevice)
        }
    };
    let mut monitor = if cfg.memory_root == Path::new("/") {
        Monitor::system(device)
    } else {
        Monitor::at_root(&cfg.memory_root, device)
    };
    let mut policy = Policy::new(cfg.memory_policy.clone(), cfg.memory_cap);
    let first = memory::initial_budget(&mut monitor, &mut policy)?;
    tracing::info!(
        budget_bytes = first.bytes,
        source = first.source.as_str(),
        "initial kv budget"
    );
    let (budget_tx, _) = tokio::sync::watch::channel::<Budget>(first);
    Ok((monitor, policy, budget_tx, gpu))
}

/// What faces clients: the gRPC transport (health answers NOT_SERVING until the engine is warm), the admin
/// service's channel to the monitor, and the metrics listener.
struct Front {
    health: server::HealthReporter,
    service: GrpcService,
    cap_tx: tokio::sync::mpsc::Sender<memory::CapRequest>,
    /// The monitor's end of `cap_tx`, handed over when the monitor starts.
    cap_rx: Option<tokio::sync::mpsc::Receiver<memory::CapRequest>>,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    transport: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    /// The OpenAI-compatible listener (`http.listen`): its state (health follows SERVING), stop signal and task.
    http: Option<HttpFront>,
}

struct HttpFront {
    state: server::http::HttpState,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn front_start(
    cfg: &Config,
    listener: Listener,
    budget_rx: tokio::sync::watch::Receiver<Budget>,
) -> Result<Front, AppError> {
    let (cap_tx, cap_rx) = tokio::sync::mpsc::channel(memory::CAP_CHANNEL);
    let (health, health_svc) = server::health_service().await;
    let admin_token: Option<Arc<str>> = cfg.admin_token.as_deref().map(Arc::from);
    let service = GrpcService::new().with_admin_token(admin_token.clone());
    let admin = AdminService::new(service.engine_cell(), budget_rx.clone(), cap_tx.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let addr = match &listener {
        Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        Listener::Unix(_) => format!("{:?}", cfg.listen),
    };
    if let (ListenAddr::Tcp(a), Some(_), None) = (&cfg.listen, &cfg.admin_token, &cfg.tls) {
        if !a.ip().is_loopback() {
            tracing::warn!(
                listen = %a,
                "the admin token travels in clear text: {a} is reachable from other machines without TLS; \
                 set tls.cert and tls.key, or listen on loopback or a unix socket"
            );
        }
    }
    let opts = ServeOptions {
        admin_token,
        tls: cfg.tls.clone(),
        max_connections: cfg.edge.max_connections,
        max_streams_per_connection: cfg.edge.max_streams_per_connection,
        handshake_timeout: cfg.edge.handshake_timeout,
        keepalive_interval: cfg.edge.keepalive_interval,
        keepalive_timeout: cfg.edge.keepalive_timeout,
    };
    let http = match cfg.http.listen {
        None => None,
        Some(a) => Some(http_start(cfg, a, &service, admin.clone(), &opts).await?),
    };
    let transport = tokio::spawn(server::serve(
        listener,
        service.clone(),
        admin,
        health_svc,
        opts,
        async {
            let _ = stop_rx.await;
        },
    ));
    tracing::info!(listen = %addr, model = %cfg.model.display(), "listening; loading the model");
    let metrics_task = match cfg.metrics_listen {
        None => None,
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| AppError::Bind(a.to_string(), e))?;
            tracing::info!(listen = %a, "metrics on /metrics");
            Some(tokio::spawn(server::metrics::serve(
                l,
                service.engine_cell(),
                budget_rx,
            )))
        }
    };
    Ok(Front {
        health,
        service,
        cap_tx,
        cap_rx: Some(cap_rx),
        stop_tx,
        transport,
        metrics_task,
        http,
    })
}

/// Bind `http.listen` and serve the OpenAI-compatible API from the same engine, with gRPC's TLS identity, admin
/// token and connection limits (`opts`).
async fn http_start(
    cfg: &Config,
    addr: std::net::SocketAddr,
    service: &GrpcService,
    admin: AdminService,
    opts: &ServeOptions,
) -> Result<HttpFront, AppError> {
    let tls = match &opts.tls {
        None => None,
        Some((cert, key)) => Some(server::http::tls_acceptor(cert, key).map_err(AppError::Tls)?),
    };
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| AppError::Bind(addr.to_string(), e))?;
    let state = server::http::HttpState::new(
        service.engine_cell(),
        admin,
        opts.admin_token.clone(),
        &cfg.http.model_name,
        cfg.http.metrics,
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::http::serve(l, state.clone(), opts.clone(), tls, async {
        let _ = stop_rx.await;
    }));
    tracing::info!(listen = %addr, tls = cfg.tls.is_some(), "OpenAI-compatible HTTP API on /v1");
    Ok(HttpFront { state, stop_tx, task })
}

/// Load the model and start the engine off the runtime. `None` when shutdown came first (the transport is
/// closed then); an error when the transport died.
async fn engine_start(
    cfg: &Config,
    gpu: Option<Arc<crate::gpu::Gpu>>,
    budget_rx: tokio::sync::watch::Receiver<Budget>,
    front: &mut Front,
    shutdown: &mut std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
) -> Result<Option<EngineHandle>, AppError> {
    let load_cfg = cfg.clone();
    let loading = tokio::task::spawn_blocking(move || start_engine(&load_cfg, gpu, budget_rx));
    let engine = tokio::select! {
        r = loading => r.map_err(|e| AppError::Join(e.to_string()))??,
        _ = shutdown.as_mut() => {
            tracing::info!("shutdown requested while loading");
            let (stop, _) = tokio::sync::oneshot::channel();
            let _ = std::mem::replace(&mut front.stop_tx, stop).send(());
            let _ = tokio::time::timeout(TRANSPORT_CLOSE, &mut front.transport).await;
            return Ok(None);
        }
        r = &mut front.transport => return Err(transport_ended(r)),
    };
    front.service.set_engine(engine.clone());
    Ok(Some(engine))
}

fn transport_ended(r: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>) -> AppError {
    match r {
        Ok(Err(e)) => e.into(),
        _ => AppError::Join("the gRPC server stopped".into()),
    }
}

/// Serving: health SERVING and systemd READY (the model is loaded and a warm-up step ran), then until shutdown:
/// watchdog pings that follow the engine thread's heartbeat (not the runtime: a wedged engine gets the service
/// restarted even though gRPC still answers), the status line, and configuration reloads.
async fn supervise(
    engine: &EngineHandle,
    front: &mut Front,
    shutdown: &mut std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
    reloads: &mut tokio::sync::mpsc::Receiver<Reload>,
) -> Result<(), AppError> {
    server::set_health(&front.health, ServingStatus::Serving).await;
    if let Some(h) = &front.http {
        h.state.set_serving(true);
    }
    let info = engine.model_info();
    tracing::info!(
        model = %info.name,
        layers = info.layers,
        context = info.context_length,
        kv_method = %info.default_kv_method,
        profile = info.profile.as_ref().map(|p| p.path.display().to_string()),
        "serving"
    );
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status_line(engine)),
    ]);
    let watchdog = sd_notify::watchdog_enabled();
    let tick_every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
    let mut tick = tokio::time::interval(tick_every);
    let mut last_status = tokio::time::Instant::now();
    let mut engine_status = engine.watch_status();
    loop {
        tokio::select! {
            _ = shutdown.as_mut() => return Ok(()),
            // (the watch guard `wait_for` yields must not live across the awaits below)
            _ = async { drop(engine_status.wait_for(|s| s.stopped).await) } => {
                // The engine gave up (or its thread died): nothing can serve; say so, and exit non-zero so the
                // supervisor (systemd, Kubernetes) restarts the daemon.
                server::set_health(&front.health, ServingStatus::NotServing).await;
                if let Some(h) = &front.http {
                    h.state.set_serving(false);
                }
                let why = engine.status().failure.clone().unwrap_or_else(|| "its thread exited".into());
                return Err(AppError::Engine(format!("the engine stopped: {why}")));
            }
            r = &mut front.transport => {
                // The transport died under us: nothing can reach the engine any more.
                engine.drain(Duration::ZERO);
                return Err(transport_ended(r));
            }
            Some(r) = reloads.recv() => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let req = memory::CapRequest { cap: r.memory_cap, policy: Some(r.memory_policy), reply: tx };
                if front.cap_tx.send(req).await.is_ok() {
                    if let Ok(b) = rx.await {
                        tracing::info!(budget_bytes = b.bytes, source = b.source.as_str(), "configuration reloaded");
                    }
                }
                notify(&[sd_notify::NotifyState::Status(&status_line(engine))]);
            }
            _ = tick.tick() => {
                if let Some(w) = watchdog {
                    if engine.status().heartbeat.elapsed() < w {
                        notify(&[sd_notify::NotifyState::Watchdog]);
                    } else {
                        tracing::error!("engine heartbeat is stale; withholding the watchdog ping");
                    }
                }
                if last_status.elapsed() >= STATUS_EVERY {
                    last_status = tokio::time::Instant::now();
                    notify(&[sd_notify::NotifyState::Status(&status_line(engine))]);
                }
            }
        }
    }
}

/// Shutdown: health first, so load balancers stop sending; then refuse new work, let the engine end every
/// stream (completed, or cancelled at the deadline), flush the transport and stop the tasks.
async fn drain(grace: Duration, engine: &EngineHandle, mut front: Front, monitor_task: tokio::task::JoinHandle<()>) {
    tracing::info!(grace_s = grace.as_secs_f64(), "shutting down: draining");
    server::set_health(&front.health, ServingStatus::NotServing).await;
    if let Some(h) = &front.http {
        h.state.set_serving(false);
    }
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
    engine.drain(grace);
    let _ = front.stop_tx.send(());
    if tokio::time::timeout(grace + TRANSPORT_CLOSE, engine.stopped())
        .await
        .is_err()
    {
        tracing::warn!("the engine did not stop within the grace period");
    }
    // The HTTP listener accepts until here, answering /health and new requests with 503 (a load balancer's probe
    // sees "draining", not a refused connection); then it closes idle connections and lets the last bytes out.
    let mut http_task = front.http.map(|h| {
        let _ = h.stop_tx.send(());
        h.task
    });
    // Streams that ended are flushed; long-lived ones (health watches) are cut here.
    let _ = tokio::time::timeout(TRANSPORT_CLOSE, &mut front.transport).await;
    if let Some(t) = http_task.as_mut() {
        if tokio::time::timeout(TRANSPORT_CLOSE, &mut *t).await.is_err() {
            t.abort();
        }
    }
    monitor_task.abort();
    if let Some(t) = front.metrics_task {
        t.abort();
    }
    tracing::info!("stopped");
}

/// One line for `systemctl status`: sequences, KV use against the budget and what sets it.
fn status_line(engine: &EngineHandle) -> String {
    let s = engine.status();
    format!(
        "serving: {} running, {} queued, {} preempted; KV {:.1} of {:.1} MiB (budget set by {})",
        s.running(),
        s.queued(),
        s.preempted(),
        s.kv_true_bytes as f64 / (1u64 << 20) as f64,
        s.budget_bytes as f64 / (1u64 << 20) as f64,
        s.budget_source.as_str()
    )
}

/// Load the model and profile, and start the engine thread (blocking: run off the runtime).
fn start_engine(
    cfg: &Config,
    gpu: Option<Arc<crate::gpu::Gpu>>,
    budget: tokio::sync::watch::Receiver<Budget>,
) -> Result<EngineHandle, AppError> {
    if !cfg.model.exists() {
        return Err(AppError::ModelMissing(cfg.model.clone()));
    }
    let (model, tokenizer) =
        Model::load(&cfg.model, &LoadOptions { threads: cfg.threads }).map_err(|e| AppError::Model {
            path: cfg.model.clone(),
            source: e,
        })?;
    let (profile, sha) = crate::calib::resolve_profile(&cfg.profile, &model).map_err(|e| AppError::Profile {
        path: match &cfg.profile {
            ProfileChoice::Path(p) => p.clone(),
            _ => PathBuf::from(crate::calib::AUTO_PROFILE),
        },
        msg: e.to_string(),
    })?;
    let profile = profile.map(|p| (p.profile, p.path));
    let mut limits = cfg.limits.clone();
    limits.max_tokens_limit = limits.max_tokens_limit.min(model.config.context_length - 1);
    limits.default_max_tokens = limits.default_max_tokens.min(limits.max_tokens_limit);
    let spill = crate::kvcache::spill::SpillDir::open(&cfg.spill_dir, cfg.spill_max_bytes)
        .map_err(|e| AppError::Spill(format!("{}: {e}", cfg.spill_dir.display())))?;
    let backend = match gpu {
        Some(g) => match crate::gpu::upload_model(g, &model) {
            Ok(b) => Some(b),
            // `auto` takes the GPU when the model can run there, the CPU otherwise; `cuda:N` insists.
            Err(e) if cfg.device == crate::gpu::DeviceChoice::Auto => {
                tracing::warn!(error = %e, "device = auto: the model cannot run on the GPU; it runs on the CPU");
                None
            }
            Err(e) => {
                return Err(AppError::Model {
                    path: cfg.model.clone(),
                    source: e,
                })
            }
        },
        None => None,
    };
    EngineHandle::spawn(EngineSetup {
        model,
        backend,
        tokenizer,
        profile,
        model_sha256: sha,
        config: EngineConfig {
            max_running: cfg.max_running,
            max_queued: cfg.max_queued,
            prefill_chunk: cfg.prefill_chunk,
            stream_buffer: cfg.stream_buffer,
            pause_timeout: cfg.pause_timeout,
            prepare_threads: cfg.prepare_threads,
            limits,
            fault: cfg.fault.clone(),
            conclude_reserve: cfg.conclude_reserve,
        },
        budget,
        spill,
    })
    .map_err(|e| AppError::Model {
        path: cfg.model.clone(),
        source: e,
    })
}
