//! gRPC front end: the `pmkvq.v1` service, standard health checking and server reflection.
//!
//! Owns: wire ⇄ engine conversion ([`convert`], also the one error → status mapping), one tracing span per RPC,
//! turning an engine event stream into a response stream. Does not own: model, KV cache or sampling (it may not
//! import `candle`, `model` or `kvcache`); it never blocks the runtime (tokenizing runs on the engine handle's
//! preparation threads).
//! Invariants: every started Generate stream ends with `complete` or `error`, or the client went away.
#![forbid(unsafe_code)]

/// The span of one generation request (`rpc.generate`, `http.generate`, extra fields after the name): every
/// field [`RpcOutcome`] records is declared here, once for both transports (a field not declared is dropped).
macro_rules! generate_span {
    ($name:literal $(, $k:ident = $v:expr)*) => {
        tracing::info_span!(
            $name,
            $($k = $v,)*
            request_id = tracing::field::Empty,
            prompt_tokens = tracing::field::Empty,
            completion_tokens = tracing::field::Empty,
            ttft_ms = tracing::field::Empty,
            total_ms = tracing::field::Empty,
            finish_reason = tracing::field::Empty
        )
    };
}

pub mod admin;
pub mod convert;
pub mod edge;
pub mod http;
pub mod metrics;
pub mod proto;

pub use admin::AdminService;

use crate::engine::{EngineHandle, Event};
use proto::pmkvq_service_server::{PmkvqService, PmkvqServiceServer};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

pub use tonic_health::server::HealthReporter;
pub use tonic_health::ServingStatus;

/// The fully qualified name health checks use for our service.
pub const SERVICE_NAME: &str = "pmkvq.v1.PmkvqService";

/// What the handlers share: the engine, once the model is loaded, and the admin token.
#[derive(Clone, Default)]
pub struct GrpcService {
    engine: Arc<OnceLock<EngineHandle>>,
    /// When set, a request may raise its priority above 0 only with this bearer token: a client must not buy
    /// precedence over others (and their memory) unasked.
    admin_token: Option<Arc<str>>,
}

impl GrpcService {
    pub fn new() -> Self {
        Self::default()
    }

    /// Guard priorities above 0 with the admin token.
    pub fn with_admin_token(mut self, token: Option<Arc<str>>) -> Self {
        self.admin_token = token;
        self
    }

    /// Install the engine (once; the model is loaded).
    pub fn set_engine(&self, h: EngineHandle) {
        let _ = self.engine.set(h);
    }

    /// The cell the engine is installed in (shared with the admin service).
    pub fn engine_cell(&self) -> Arc<OnceLock<EngineHandle>> {
        self.engine.clone()
    }

    fn engine(&self) -> Result<&EngineHandle, Status> {
        self.engine
            .get()
            .ok_or_else(|| Status::unavailable("the server is loading the model"))
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<proto::GenerateResponse, Status>> + Send>>;

/// Closes the request's span with its outcome, also when the client drops the stream.
struct RpcOutcome {
    span: tracing::Span,
    started: Instant,
    done: bool,
    tokens: usize,
}

impl RpcOutcome {
    /// Trace a submitted request in `span` (opened by [`generate_span!`] at `started`).
    fn new(span: tracing::Span, started: Instant, sub: &crate::engine::Submission) -> Self {
        span.record("request_id", sub.request_id.as_str());
        span.record("prompt_tokens", sub.prompt_tokens);
        RpcOutcome {
            span,
            started,
            done: false,
            tokens: 0,
        }
    }

    fn observe(&mut self, ev: &Event) {
        match ev {
            Event::Chunk { token_ids, .. } => self.tokens += token_ids.len(),
            Event::Complete(c) => {
                self.done = true;
                let reason = format!("{:?}", c.finish).to_lowercase();
                self.span.record("finish_reason", reason.as_str());
                self.span.record("completion_tokens", c.usage.completion_tokens);
                self.span.record("ttft_ms", c.timings.ttft_ms);
                self.span.record("total_ms", c.timings.total_ms);
                self.span.in_scope(|| tracing::info!("request finished"));
            }
            Event::Error(m) => {
                self.done = true;
                self.span.record("finish_reason", "error");
                self.span.in_scope(|| tracing::error!(error = %m, "request failed"));
            }
        }
    }
}

impl Drop for RpcOutcome {
    fn drop(&mut self) {
        if !self.done {
            self.span.record("finish_reason", "client_cancelled");
            self.span.record("completion_tokens", self.tokens);
            self.span.record("total_ms", self.started.elapsed().as_secs_f64() * 1e3);
            self.span.in_scope(|| tracing::info!("client went away"));
        }
    }
}

#[tonic::async_trait]
impl PmkvqService for GrpcService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, req: Request<proto::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let started = Instant::now();
        let engine = self.engine()?;
        let span = generate_span!("rpc.generate");
        let priority = req.get_ref().kv.as_ref().and_then(|k| k.priority).unwrap_or(0);
        if priority > 0 && !admin::bearer_ok(self.admin_token.as_deref(), req.metadata()) {
            return Err(Status::permission_denied(format!(
                "`kv.priority` above 0 needs the admin token (`authorization: Bearer <token>`), got {priority}"
            )));
        }
        let r = convert::request_of(req.into_inner())?;
        // (a refused id with control characters is not logged: validation says why)
        if !r.request_id.is_empty() && r.request_id.chars().all(crate::engine::is_printable_id_char) {
            span.record("request_id", r.request_id.as_str());
        }
        let sub = engine.submit_async(r).await.map_err(|e| {
            let st = convert::status_of(&e);
            span.in_scope(|| tracing::info!(code = ?st.code(), error = %e, "request refused"));
            st
        })?;
        let mut outcome = RpcOutcome::new(span, started, &sub);
        let id = sub.request_id;
        let stream = tokio_stream::wrappers::ReceiverStream::new(sub.events).map(move |ev| {
            outcome.observe(&ev);
            Ok(convert::response_of(&id, &ev))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        req: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        let input = convert::prompt_of_tokenize(req.into_inner().input)?;
        let (ids, pieces) = self
            .engine()?
            .tokenize_async(input)
            .await
            .map_err(|e| convert::status_of(&e))?;
        Ok(Response::new(proto::TokenizeResponse { ids, pieces }))
    }

    async fn get_model_info(
        &self,
        _req: Request<proto::GetModelInfoRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        Ok(Response::new(convert::model_info(self.engine()?.model_info())))
    }

    async fn get_status(
        &self,
        _req: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::ServerStatus>, Status> {
        let e = self.engine()?;
        Ok(Response::new(convert::server_status(&e.status(), e.is_draining())))
    }
}

/// Where the daemon listens.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Transport security (a bearer token for admin calls, TLS for everything) and the limits at the edge.
#[derive(Clone)]
pub struct ServeOptions {
    pub admin_token: Option<Arc<str>>,
    /// PEM certificate chain and private key.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Open connections at most (the listener stops accepting at the cap).
    pub max_connections: usize,
    /// SETTINGS_MAX_CONCURRENT_STREAMS: RPCs one connection may carry at once.
    pub max_streams_per_connection: u32,
    /// For the HTTP/2 preface after accept, and separately for the TLS handshake.
    pub handshake_timeout: std::time::Duration,
    /// HTTP/2 pings after this long idle (`None`: off), answered within `keepalive_timeout` or the connection ends.
    pub keepalive_interval: Option<std::time::Duration>,
    pub keepalive_timeout: std::time::Duration,
}

/// Serve `pmkvq.v1` (generation and admin), health and reflection on `listener` until `shutdown` resolves; then
/// stop accepting and let in-flight RPCs finish (the caller bounds how long).
pub async fn serve(
    listener: Listener,
    service: GrpcService,
    admin: AdminService,
    health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Both reflection versions: grpcurl speaks v1, many grpcio releases still ask v1alpha.
    let reflect_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .expect("our descriptor sets are valid");
    let reflect_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .expect("our descriptor sets are valid");
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(opts.max_streams_per_connection)
        .http2_keepalive_interval(opts.keepalive_interval)
        .http2_keepalive_timeout(Some(opts.keepalive_timeout));
    if let Some((cert, key)) = &opts.tls {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        builder = builder.tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(identity)
                .timeout(opts.handshake_timeout),
        )?;
    }
    let router = builder
        .add_service(health)
        .add_service(reflect_v1)
        .add_service(reflect_v1alpha)
        .add_service(PmkvqServiceServer::new(service))
        .add_service(proto::pmkvq_admin_server::PmkvqAdminServer::with_interceptor(
            admin,
            admin::bearer_check(opts.admin_token.clone()),
        ));
    let limits = edge::AcceptLimits {
        max_connections: opts.max_connections,
        handshake_timeout: Some(opts.handshake_timeout),
    };
    match listener {
        Listener::Tcp(l) => {
            router
                .serve_with_incoming_shutdown(edge::incoming(l, limits, "grpc"), shutdown)
                .await
        }
        Listener::Unix(l) => {
            router
                .serve_with_incoming_shutdown(edge::incoming(l, limits, "grpc"), shutdown)
                .await
        }
    }
}

/// A fresh health reporter with the whole server and our service NOT_SERVING (until the model is warm).
pub async fn health_service() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, svc) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;
    (reporter, svc)
}

/// Set the overall ("") and `pmkvq.v1.PmkvqService` status together.
pub async fn set_health(r: &HealthReporter, s: ServingStatus) {
    r.set_service_status("", s).await;
    r.set_service_status(SERVICE_NAME, s).await;
}
