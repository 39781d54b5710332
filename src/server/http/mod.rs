//! The OpenAI-compatible HTTP API beside gRPC, from the same engine: `POST /v1/chat/completions`,
//! `POST /v1/completions` (SSE streaming or one JSON object), `GET /v1/models`, `GET /health`, `GET /metrics`
//! (when enabled) and `POST /v1/admin/memory_budget` (admin token).
//!
//! Owns: routing, reading bodies (bounded in size and time), the bearer check for admin routes and priorities,
//! and connections: the gRPC edge's accept loop (connection cap, first-bytes deadline), optional TLS with the same
//! certificate, HTTP/1.1 and h2 through hyper-util, graceful shutdown. Field mapping is in [`openai`], errors in
//! [`error`], streaming in [`stream`]. Does not own: validation (the engine's, its field names translated).

pub mod error;
pub mod openai;
pub mod shape;
pub mod stream;

use super::admin::{bearer_matches, AdminService, CapFailure};
use super::edge;
use crate::engine::EngineHandle;
use crate::memory::OperatorCap;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use serde_json::json;
use shape::{Kind, Shape};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

/// Largest request body: a prompt at any context length this daemon serves fits many times over.
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// A request body must arrive within this (a client trickling a body must not hold its connection forever).
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    engine: Arc<OnceLock<EngineHandle>>,
    admin: AdminService,
    admin_token: Option<Arc<str>>,
    /// `http.model_name`; empty: the model's file name.
    model_name: Arc<str>,
    metrics: bool,
    /// Set while the daemon is SERVING (the same moments gRPC health flips).
    serving: Arc<AtomicBool>,
    /// Unix seconds the daemon started (`created` in /v1/models).
    created: u64,
}

impl HttpState {
    pub fn new(
        engine: Arc<OnceLock<EngineHandle>>,
        admin: AdminService,
        admin_token: Option<Arc<str>>,
        model_name: &str,
        metrics: bool,
    ) -> Self {
        HttpState {
            engine,
            admin,
            admin_token,
            model_name: Arc::from(model_name),
            metrics,
            serving: Arc::new(AtomicBool::new(false)),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// `/health` answers 200 while this is set.
    pub fn set_serving(&self, on: bool) {
        self.serving.store(on, Ordering::Release);
    }

    fn engine(&self) -> Result<&EngineHandle, ApiError> {
        self.engine.get().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Some("loading"),
                "the server is loading the model",
            )
        })
    }

    /// The id `/v1/models` lists.
    fn model_id(&self, e: &EngineHandle) -> String {
        if self.model_name.is_empty() {
            e.model_info().name.clone()
        } else {
            self.model_name.to_string()
        }
    }

    /// The served id, when `asked` names this model (or nothing: the one model is meant).
    fn check_model(&self, e: &EngineHandle, asked: Option<&str>) -> Result<String, ApiError> {
        let id = self.model_id(e);
        match asked {
            None | Some("") => Ok(id),
            Some(m) if m == id || m == e.model_info().name => Ok(id),
            Some(m) => Err(ApiError {
                param: Some("model".into()),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    Some("model_not_found"),
                    format!("the model `{m}` does not exist here; this server serves `{id}` (GET /v1/models)"),
                )
            }),
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        bearer_matches(self.admin_token.as_deref(), auth)
    }
}

/// Every route, with OpenAI-shaped 404 and 405.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/admin/memory_budget", post(memory_budget))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        Some("not_found"),
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        Some("method_not_allowed"),
        format!("{} does not take {method}", uri.path()),
    )
}

/// The body, at most [`MAX_BODY_BYTES`] and within [`BODY_TIMEOUT`].
async fn read_body(headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Some("request_too_large"),
            format!("the request body must be at most {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            Some("body_timeout"),
            format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        )),
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => {
            let inner = e.into_inner();
            if inner.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                Err(too_large())
            } else {
                Err(ApiError::bad_request(
                    None,
                    format!("cannot read the request body: {inner}"),
                ))
            }
        }
    }
}

/// Submit a converted request and answer it (SSE or JSON), with one tracing span per request as on gRPC.
async fn generate(
    s: &HttpState,
    headers: &HeaderMap,
    kind: Kind,
    model: Option<String>,
    max_tokens_param: &str,
    parsed: Result<(crate::engine::Request, openai::Delivery), ApiError>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let engine = s.engine()?;
    let model = s.check_model(engine, model.as_deref())?;
    let (mut req, delivery) = parsed?;
    if req.priority.is_some_and(|p| p > 0) && !s.authorized(headers) {
        return Err(ApiError {
            param: Some("priority".into()),
            ..ApiError::new(
                StatusCode::FORBIDDEN,
                Some("admin_token_required"),
                format!(
                    "`priority` above 0 needs the admin token (`Authorization: Bearer <token>`), got {}",
                    req.priority.unwrap_or(0)
                ),
            )
        });
    }
    if let Some(id) = headers.get("x-request-id") {
        req.request_id = match id.to_str() {
            Ok(v) => v.to_string(),
            Err(_) => {
                return Err(ApiError::bad_request(
                    Some("x-request-id"),
                    "`x-request-id` must be printable ASCII",
                ))
            }
        };
    }
    let route = match kind {
        Kind::Chat => "chat",
        Kind::Text => "completions",
    };
    let span = generate_span!("http.generate", route = route);
    let sub = engine.submit_async(req).await.map_err(|e| {
        let err = ApiError::of_engine(&e, max_tokens_param);
        span.in_scope(|| tracing::info!(status = err.status.as_u16(), error = %e, "request refused"));
        err
    })?;
    let outcome = super::RpcOutcome::new(span, started, &sub);
    let shape = Shape::new(kind, &sub.request_id, model, delivery.include_usage);
    Ok(stream::respond(sub, shape, delivery, outcome).await)
}

async fn chat_completions(State(s): State<HttpState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let body = read_body(&headers, body).await?;
    let r = openai::parse_chat(&body)?;
    let model = r.model().map(str::to_string);
    let max_param = if r.chat.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    generate(&s, &headers, Kind::Chat, model, max_param, r.into_request()).await
}

async fn completions(State(s): State<HttpState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let body = read_body(&headers, body).await?;
    let r = openai::parse_completion(&body)?;
    let model = r.model().map(str::to_string);
    generate(&s, &headers, Kind::Text, model, "max_tokens", r.into_request()).await
}

fn model_object(s: &HttpState, e: &EngineHandle) -> serde_json::Value {
    let info = e.model_info();
    json!({
        "id": s.model_id(e),
        "object": "model",
        "created": s.created,
        "owned_by": "pmkvq",
        "pmkvq": {
            "file": info.name,
            "architecture": info.architecture,
            "context_length": info.context_length,
            "max_tokens_limit": info.max_tokens_limit,
            "default_kv_method": info.default_kv_method,
            "device": info.device,
        },
    })
}

async fn models(State(s): State<HttpState>) -> Result<Response, ApiError> {
    let e = s.engine()?;
    Ok(axum::Json(json!({"object": "list", "data": [model_object(&s, e)]})).into_response())
}

async fn model(State(s): State<HttpState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let e = s.engine()?;
    s.check_model(e, Some(&id))?;
    Ok(axum::Json(model_object(&s, e)).into_response())
}

/// 200 once the model is warm, 503 while loading or draining (load balancers stop sending then).
async fn health(State(s): State<HttpState>) -> Response {
    let unavailable = |code, msg: &str| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Some(code), msg).into_response();
    let Some(e) = s.engine.get() else {
        return unavailable("loading", "the server is loading the model");
    };
    let st = e.status();
    if e.is_draining() || st.draining || st.stopped {
        unavailable("draining", "the server is shutting down")
    } else if !st.ready || !s.serving.load(Ordering::Acquire) {
        unavailable("loading", "the server is warming up")
    } else {
        axum::Json(json!({"status": "ok"})).into_response()
    }
}

async fn metrics(State(s): State<HttpState>) -> Result<Response, ApiError> {
    if !s.metrics {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            Some("not_found"),
            "metrics are not served on this listener (http.metrics = false)",
        ));
    }
    let e = s.engine()?;
    let text = super::metrics::render(&e.status(), &s.admin.budget(), e.model_info());
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// `SetMemoryBudget` over HTTP: exactly one of `bytes`, `fraction`, `automatic: true`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetBody {
    bytes: Option<u64>,
    fraction: Option<f64>,
    automatic: Option<bool>,
}

async fn memory_budget(State(s): State<HttpState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    if !s.authorized(&headers) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            Some("invalid_api_key"),
            "admin routes need `Authorization: Bearer <token>` (auth.token)",
        ));
    }
    let body = read_body(&headers, body).await?;
    let b: BudgetBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            None,
            format!("the body must be {{\"bytes\": N}}, {{\"fraction\": F}} or {{\"automatic\": true}}: {e}"),
        )
    })?;
    let cap = match (b.bytes, b.fraction, b.automatic) {
        (Some(0), None, None) => return Err(ApiError::bad_request(Some("bytes"), "`bytes` must be >= 1, got 0")),
        (Some(n), None, None) => OperatorCap::Bytes(n),
        (None, Some(f), None) if f > 0.0 && f <= 1.0 => OperatorCap::Fraction(f),
        (None, Some(f), None) => {
            return Err(ApiError::bad_request(
                Some("fraction"),
                format!("`fraction` must be in (0, 1], got {f}"),
            ))
        }
        (None, None, Some(true)) => OperatorCap::Automatic,
        _ => {
            return Err(ApiError::bad_request(
                None,
                "exactly one of `bytes`, `fraction` or `automatic: true` is required",
            ))
        }
    };
    let o = s.admin.apply_cap(cap).await.map_err(|e| match e {
        CapFailure::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Some("unavailable"), m),
        CapFailure::Timeout(m) => ApiError::new(StatusCode::GATEWAY_TIMEOUT, Some("timeout"), m),
    })?;
    Ok(axum::Json(json!({
        "budget_bytes": o.budget.bytes,
        "source": o.budget.source.as_str(),
        "kv_bytes": o.kv_bytes,
        "effect": o.effect,
    }))
    .into_response())
}

/// A TLS acceptor for PEM `cert` (chain) and `key`, offering h2 and HTTP/1.1.
pub fn tls_acceptor(cert: &[u8], key: &[u8]) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.cert: {e}"))?;
    if certs.is_empty() {
        return Err("tls.cert: no certificate in the file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("tls.key: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.cert/tls.key: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Serve until `shutdown` resolves; then stop accepting, let every open request finish (the engine's drain
/// bounds how long) and close idle connections. `opts` are the gRPC listener's connection limits (its PEM
/// identity arrives built, as `tls`, so a bad one stops the start: [`tls_acceptor`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    opts: super::ServeOptions,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let service = hyper_util::service::TowerToHyperService::new(router(state));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.handshake_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(opts.max_streams_per_connection)
        .keep_alive_interval(opts.keepalive_interval)
        .keep_alive_timeout(opts.keepalive_timeout);
    let builder = Arc::new(builder);
    let limits = edge::AcceptLimits {
        max_connections: opts.max_connections,
        handshake_timeout: Some(opts.handshake_timeout),
    };
    let mut conns = edge::incoming(listener, limits, "http");
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let io = tokio::select! {
            c = conns.next() => match c {
                Some(Ok(io)) => io,
                Some(Err(_)) => continue,
                None => break,
            },
            _ = &mut shutdown => break,
        };
        let (builder, service, watcher, tls) = (builder.clone(), service.clone(), graceful.watcher(), tls.clone());
        let handshake = opts.handshake_timeout;
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(io), service).into_owned();
                    watcher.watch(conn).await
                }
                Some(acceptor) => match tokio::time::timeout(handshake, acceptor.accept(io)).await {
                    Ok(Ok(tls_io)) => {
                        let conn = builder.serve_connection(TokioIo::new(tls_io), service).into_owned();
                        watcher.watch(conn).await
                    }
                    Ok(Err(e)) => return tracing::debug!(error = %e, "http: TLS handshake failed"),
                    Err(_) => return tracing::debug!("http: TLS handshake timed out"),
                },
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
    drop(conns);
    graceful.shutdown().await;
}
