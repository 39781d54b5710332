//! `pmkvq.v1.PmkvqAdmin`: the operator's memory budget and the live status stream, behind an optional bearer
//! token.

use super::convert;
use super::proto::{self as pb, pmkvq_admin_server::PmkvqAdmin};
use crate::engine::EngineHandle;
use crate::memory::{Budget, CapRequest, OperatorCap};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// How long SetMemoryBudget waits for the monitor to apply the cap.
const CAP_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct AdminService {
    engine: Arc<OnceLock<EngineHandle>>,
    budget: watch::Receiver<Budget>,
    caps: mpsc::Sender<CapRequest>,
}

impl AdminService {
    pub fn new(
        engine: Arc<OnceLock<EngineHandle>>,
        budget: watch::Receiver<Budget>,
        caps: mpsc::Sender<CapRequest>,
    ) -> Self {
        AdminService { engine, budget, caps }
    }

    fn engine(&self) -> Result<&EngineHandle, Status> {
        self.engine
            .get()
            .ok_or_else(|| Status::unavailable("the server is loading the model"))
    }
}

/// Rejects calls without `authorization: Bearer <token>` when a token is configured.
pub fn bearer_check(token: Option<Arc<str>>) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        if bearer_ok(token.as_deref(), req.metadata()) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "admin calls need `authorization: Bearer <token>`",
            ))
        }
    }
}

/// Whether `md` carries the bearer token `want` (always, when no token is configured).
pub fn bearer_ok(want: Option<&str>, md: &tonic::metadata::MetadataMap) -> bool {
    bearer_matches(want, md.get("authorization").and_then(|v| v.to_str().ok()))
}

/// Whether an `authorization` header value is `Bearer <want>` (always, when no token is configured); gRPC
/// metadata and HTTP headers both come here.
pub fn bearer_matches(want: Option<&str>, authorization: Option<&str>) -> bool {
    let Some(want) = want else {
        return true;
    };
    let got = authorization.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    constant_time_eq(got.as_bytes(), want.as_bytes())
}

/// Equality whose time does not depend on where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What an operator's cap did (SetMemoryBudget, and `POST /v1/admin/memory_budget` on HTTP).
pub struct CapOutcome {
    pub budget: Budget,
    /// KV bytes in use when the cap was applied.
    pub kv_bytes: u64,
    /// In words: whether sequences shrink.
    pub effect: String,
}

/// Why a cap could not be applied.
pub enum CapFailure {
    Unavailable(&'static str),
    Timeout(&'static str),
}

impl AdminService {
    /// Hand `cap` to the memory monitor and wait (bounded) for the budget it yields: the one path both
    /// transports take.
    pub async fn apply_cap(&self, cap: OperatorCap) -> Result<CapOutcome, CapFailure> {
        let (tx, rx) = oneshot::channel();
        self.caps
            .send(CapRequest {
                cap,
                policy: None,
                reply: tx,
            })
            .await
            .map_err(|_| CapFailure::Unavailable("the memory monitor is not running"))?;
        let b = tokio::time::timeout(CAP_REPLY_TIMEOUT, rx)
            .await
            .map_err(|_| CapFailure::Timeout("the memory monitor did not answer"))?
            .map_err(|_| CapFailure::Unavailable("the memory monitor stopped"))?;
        let used = self.engine().map(|e| e.status().kv_true_bytes as u64).unwrap_or(0);
        let effect = if (b.bytes) < used {
            format!(
                "{used} bytes in use exceed the budget: sequences shrink (preempting the lowest priority if needed) \
                 before their next step"
            )
        } else {
            "within budget: sequences keep their precision; new tokens enter at 16 bits".to_string()
        };
        tracing::info!(
            ?cap,
            budget_bytes = b.bytes,
            source = b.source.as_str(),
            "operator set the kv budget"
        );
        Ok(CapOutcome {
            budget: b,
            kv_bytes: used,
            effect,
        })
    }

    /// The budget the monitor last published.
    pub fn budget(&self) -> Budget {
        self.budget.borrow().clone()
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::StatusUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl PmkvqAdmin for AdminService {
    async fn set_memory_budget(
        &self,
        req: Request<pb::SetMemoryBudgetRequest>,
    ) -> Result<Response<pb::SetMemoryBudgetResponse>, Status> {
        use pb::set_memory_budget_request::Budget as B;
        let cap = match req.into_inner().budget {
            Some(B::Bytes(0)) => return Err(Status::invalid_argument("`bytes` must be >= 1, got 0")),
            Some(B::Bytes(b)) => OperatorCap::Bytes(b),
            Some(B::Fraction(f)) if f > 0.0 && f <= 1.0 => OperatorCap::Fraction(f),
            Some(B::Fraction(f)) => {
                return Err(Status::invalid_argument(format!(
                    "`fraction` must be in (0, 1], got {f}"
                )))
            }
            Some(B::Automatic(true)) => OperatorCap::Automatic,
            Some(B::Automatic(false)) | None => {
                return Err(Status::invalid_argument(
                    "`budget` is required: one of bytes, fraction, automatic = true",
                ))
            }
        };
        let o = self.apply_cap(cap).await.map_err(|e| match e {
            CapFailure::Unavailable(m) => Status::unavailable(m),
            CapFailure::Timeout(m) => Status::deadline_exceeded(m),
        })?;
        Ok(Response::new(pb::SetMemoryBudgetResponse {
            budget_bytes: o.budget.bytes,
            source: convert::budget_source(o.budget.source) as i32,
            kv_bytes: o.kv_bytes,
            effect: o.effect,
        }))
    }

    type WatchStatusStream = WatchStream;

    async fn watch_status(
        &self,
        _req: Request<pb::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let engine = self.engine()?.clone();
        let budget = self.budget.clone();
        let stream = tokio_stream::wrappers::WatchStream::new(engine.watch_status()).map(move |st| {
            let b = budget.borrow().clone();
            Ok(pb::StatusUpdate {
                status: Some(convert::server_status(&st, engine.is_draining())),
                memory: Some(convert::memory_info(&b)),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
