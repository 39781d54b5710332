//! The engine's client side: [`EngineHandle`] (cloneable, never blocks) validates and queues requests, reads
//! status snapshots and starts a drain; [`EngineHandle::spawn`] starts the engine thread. What the transport
//! knows of the engine is here; the loop itself is in `scheduler.rs`.

use super::budget;
use super::events::{EngineStatus, Event};
use super::request::{Frontend, PromptInput, Request, RequestError};
use super::scheduler::{Engine, EngineConfig, EngineParts};
use super::sequence::Admission;
use crate::calib::Profile;
use crate::kvcache::quant::Bits;
use crate::kvcache::{KvGeometry, PmkvqConfig, PmkvqStore};
use crate::memory::Budget;
use crate::model::{Model, ModelError, Tokenizer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// The model as clients see it (`GetModelInfo`).
#[derive(Clone, Debug)]
pub struct ModelSummary {
    pub name: String,
    pub architecture: String,
    pub path: PathBuf,
    pub sha256: String,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub context_length: usize,
    pub vocab_size: usize,
    pub weight_bytes: usize,
    /// Where the forward pass runs (`cpu`, or the GPU's name and architecture).
    pub device: String,
    /// Bytes of weights in device memory (0 on the CPU).
    pub device_weight_bytes: usize,
    /// (bits, bytes per token over all layers, K and V).
    pub kv_bytes_per_token: Vec<(u32, usize)>,
    pub profile: Option<ProfileSummary>,
    pub default_kv_method: String,
    pub max_tokens_limit: usize,
}

#[derive(Clone, Debug)]
pub struct ProfileSummary {
    pub path: PathBuf,
    pub avg_bits: f64,
    pub layer_shares: Vec<f64>,
    pub layer_bits: Vec<u32>,
}

/// A started stream: its id and its events (ends with exactly one `Complete` or `Error`).
pub struct Submission {
    pub request_id: String,
    pub prompt_tokens: usize,
    pub events: mpsc::Receiver<Event>,
}

pub(super) enum Command {
    Submit(Box<Admission>),
    /// Nothing to do but look at the drain signal.
    Wake,
}

/// One place counted in a shared counter, given back when dropped unless it was handed on ([`Place::keep`]).
struct Place {
    counter: Arc<AtomicUsize>,
    held: bool,
}

impl Place {
    /// One of `limit` places, with how many were taken before it; `Err(taken)` when none is free.
    fn take(counter: &Arc<AtomicUsize>, limit: usize) -> Result<(Place, usize), usize> {
        let taken = counter.fetch_add(1, Ordering::AcqRel);
        let place = Place {
            counter: counter.clone(),
            held: true,
        };
        if taken >= limit {
            return Err(taken);
        }
        Ok((place, taken))
    }

    /// Someone else gives it back now (the engine, on admission).
    fn keep(mut self) {
        self.held = false;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.held {
            self.counter.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A place in the engine's queue (see [`EngineHandle::reserve`]).
pub struct QueueSlot {
    place: Place,
    /// Requests already waiting when this one came.
    queued: usize,
}

/// Cloneable handle the transport uses: validates and submits requests, reads status. Never blocks.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    cmd: SyncSender<Command>,
    frontend: Frontend,
    max_queued: usize,
    stream_buffer: usize,
    /// Accepted requests not yet running (shared with the engine, which decrements on admission).
    pending: Arc<AtomicUsize>,
    /// Permits for the preparation threads (tokenizing, templates, store sizing).
    prep: Arc<tokio::sync::Semaphore>,
    /// Tokenize calls waiting for a preparation thread.
    prep_waiting: Arc<AtomicUsize>,
    draining: AtomicBool,
    /// Set by the engine thread when it stops taking commands (shared with it).
    intake_closed: Arc<Mutex<bool>>,
    fault: Option<super::FaultHook>,
    drain: watch::Sender<Option<Instant>>,
    next_id: AtomicU64,
    status: watch::Receiver<Arc<EngineStatus>>,
    info: ModelSummary,
    geom: KvGeometry,
    context_length: usize,
    budget: watch::Receiver<Budget>,
}

/// What the engine is started with.
pub struct EngineSetup {
    pub model: Model,
    /// Where the forward pass runs (`None`: on the CPU, the model itself).
    pub backend: Option<Arc<dyn crate::model::Backend>>,
    pub tokenizer: Tokenizer,
    pub profile: Option<(Arc<Profile>, PathBuf)>,
    pub model_sha256: String,
    pub config: EngineConfig,
    /// The live KV budget for all sequences together (the memory monitor's output).
    pub budget: watch::Receiver<Budget>,
    /// Where preempted sequences' caches are spilled (private, with its quota).
    pub spill: crate::kvcache::spill::SpillDir,
}

impl EngineHandle {
    /// Start the engine thread. It warms the model up (one forward pass) before reporting `ready`.
    pub fn spawn(setup: EngineSetup) -> Result<EngineHandle, ModelError> {
        let EngineSetup {
            model,
            backend,
            tokenizer,
            profile,
            model_sha256,
            config,
            budget,
            spill,
        } = setup;
        let geom = model.kv_geometry();
        let context_length = model.config.context_length;
        let tokenizer = Arc::new(tokenizer);
        let mut info = summarize(&model, &model_sha256, profile.as_ref(), &config);
        let frontend = Frontend::new(
            tokenizer.clone(),
            model.config.context_length,
            model.config.vocab_size,
            config.limits.clone(),
            profile.map(|(p, _)| p),
            backend
                .as_ref()
                .map_or(crate::kvcache::KvExtensions::ALL, |b| b.kv_extensions()),
        )?;
        let (cmd_tx, cmd_rx) = sync_channel(config.max_queued.max(1));
        let (status_tx, status_rx) = watch::channel(Arc::new(EngineStatus::new()));
        let (drain_tx, drain_rx) = watch::channel(None);
        let pending = Arc::new(AtomicUsize::new(0));
        let intake_closed = Arc::new(Mutex::new(false));
        let model = Arc::new(model);
        let compute: Arc<dyn crate::model::Backend> = match backend {
            Some(b) => b,
            None => model.clone(),
        };
        info.device = compute.device();
        info.device_weight_bytes = compute.device_weight_bytes();
        tracing::info!(
            device = info.device,
            device_weight_bytes = info.device_weight_bytes,
            "forward pass"
        );
        let engine = Engine::new(EngineParts {
            model,
            compute,
            tok: tokenizer,
            cfg: config.clone(),
            rx: cmd_rx,
            drain: drain_rx,
            pending: pending.clone(),
            intake_closed: intake_closed.clone(),
            status: status_tx,
            budget: budget.clone(),
            spill,
        });
        std::thread::Builder::new()
            .name("pmkvq-engine".into())
            .spawn(move || engine.run())
            .map_err(|e| ModelError::Input(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle {
            inner: Arc::new(HandleInner {
                cmd: cmd_tx,
                frontend,
                max_queued: config.max_queued,
                stream_buffer: config.stream_buffer.max(2),
                pending,
                prep: Arc::new(tokio::sync::Semaphore::new(config.prepare_threads.max(1))),
                prep_waiting: Arc::new(AtomicUsize::new(0)),
                draining: AtomicBool::new(false),
                intake_closed,
                fault: config.fault.clone(),
                drain: drain_tx,
                next_id: AtomicU64::new(1),
                status: status_rx,
                info,
                geom,
                context_length,
                budget,
            }),
        })
    }

    /// Take a place in the queue before any work is spent on a request: a draining, warming or full server
    /// refuses here, before tokenizing. The place is given back when the slot is dropped unless the request
    /// reached the engine.
    pub fn reserve(&self) -> Result<QueueSlot, RequestError> {
        let h = &*self.inner;
        if h.draining.load(Ordering::Acquire) {
            return Err(RequestError::Unavailable("shutting down"));
        }
        if !h.status.borrow().ready {
            return Err(RequestError::Unavailable("warming up"));
        }
        let (place, queued) = Place::take(&h.pending, h.max_queued).map_err(|queued| RequestError::QueueFull {
            queued,
            limit: h.max_queued,
        })?;
        Ok(QueueSlot { place, queued })
    }

    /// Validate, tokenize and queue a request. Errors are immediate; once this returns `Ok` the stream always
    /// ends with a `Complete` or `Error` event. Blocking (tokenizing a long prompt takes a while): the network
    /// runtime calls [`EngineHandle::submit_async`] instead.
    pub fn submit(&self, req: Request) -> Result<Submission, RequestError> {
        let slot = self.reserve()?;
        self.submit_reserved(slot, req)
    }

    /// [`EngineHandle::submit`] without blocking the async runtime: the queue place is taken first, then
    /// validation, tokenizing and template rendering run on one of the `prepare_threads` blocking threads
    /// (requests beyond them wait, each holding its queue place, so the wait is bounded by `max_queued`).
    /// A panic while preparing ends this request with `Internal`, nothing else.
    pub async fn submit_async(&self, req: Request) -> Result<Submission, RequestError> {
        let slot = self.reserve()?;
        let h = self.clone();
        self.prepare(move || h.submit_reserved(slot, req)).await
    }

    /// [`EngineHandle::tokenize`] on the preparation threads; at most `max_queued` calls wait for one.
    pub async fn tokenize_async(&self, input: PromptInput) -> Result<(Vec<u32>, Vec<String>), RequestError> {
        let h = &*self.inner;
        let _place = Place::take(&h.prep_waiting, h.max_queued).map_err(|queued| RequestError::QueueFull {
            queued,
            limit: h.max_queued,
        })?;
        let me = self.clone();
        self.prepare(move || me.tokenize(&input)).await
    }

    /// Run `work` on a preparation thread once one of the `prepare_threads` permits is free.
    async fn prepare<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, RequestError> + Send + 'static,
    ) -> Result<T, RequestError> {
        let permit = self
            .inner
            .prep
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| RequestError::Unavailable("stopped"))?;
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        });
        match task.await {
            Ok(r) => r,
            Err(e) => {
                let what = match e.try_into_panic() {
                    Ok(p) => crate::model::panic_text(p.as_ref()),
                    Err(e) => e.to_string(),
                };
                tracing::error!(error = %what, "preparing a request panicked; it ends, the server goes on");
                Err(RequestError::Internal(what))
            }
        }
    }

    /// [`EngineHandle::submit`] with the queue place already taken.
    pub fn submit_reserved(&self, slot: QueueSlot, req: Request) -> Result<Submission, RequestError> {
        let h = &*self.inner;
        let id = if req.request_id.is_empty() {
            format!("req-{}", h.next_id.fetch_add(1, Ordering::Relaxed))
        } else {
            req.request_id.clone()
        };
        let valid = h.frontend.validate(req, id.clone())?;
        // A request whose cache could never fit the budget, even at its floor width, is refused now with the
        // numbers; one that fits later waits in the queue.
        let max_len = budget::max_len(valid.prompt_ids.len(), valid.max_tokens, h.context_length);
        if let Ok(store) = valid.kv.new_store(h.geom, max_len) {
            let need = store.floor_bytes(max_len);
            let budget = h.budget.borrow().bytes.min(usize::MAX as u64) as usize;
            if need > budget {
                return Err(RequestError::WontFit {
                    need,
                    budget,
                    tokens: max_len,
                });
            }
        }
        let (tx, rx) = mpsc::channel(h.stream_buffer);
        let prompt_tokens = valid.prompt_ids.len();
        let adm = Admission {
            req: valid,
            tx,
            arrived: Instant::now(),
        };
        super::fault::check(&h.fault, super::FaultPoint::Submit, &id);
        // The intake gate: held from the check to the send, so once the engine has closed it (leaving its loop)
        // no request lands in a channel nobody reads; every one sent before is answered by the engine.
        let gate = h
            .intake_closed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *gate {
            return Err(RequestError::Unavailable("shutting down"));
        }
        let sent = h.cmd.try_send(Command::Submit(Box::new(adm)));
        drop(gate);
        match sent {
            Ok(()) => {
                // The engine owns the place now (it gives it back on admission).
                slot.place.keep();
                Ok(Submission {
                    request_id: id,
                    prompt_tokens,
                    events: rx,
                })
            }
            Err(TrySendError::Full(_)) => Err(RequestError::QueueFull {
                queued: slot.queued,
                limit: h.max_queued,
            }),
            Err(TrySendError::Disconnected(_)) => Err(RequestError::Unavailable("stopped")),
        }
    }

    /// Token ids and each token's text.
    pub fn tokenize(&self, input: &PromptInput) -> Result<(Vec<u32>, Vec<String>), RequestError> {
        let f = &self.inner.frontend;
        let ids = match input {
            PromptInput::Text(t) if t.is_empty() => Vec::new(),
            _ => f.encode(input)?,
        };
        let pieces = ids
            .iter()
            .map(|&i| String::from_utf8_lossy(f.tokenizer.token_bytes(i, true)).into_owned())
            .collect();
        Ok((ids, pieces))
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    pub fn model_info(&self) -> &ModelSummary {
        &self.inner.info
    }

    pub fn status(&self) -> Arc<EngineStatus> {
        self.inner.status.borrow().clone()
    }

    /// Status snapshots as the engine publishes them (after every step).
    pub fn watch_status(&self) -> watch::Receiver<Arc<EngineStatus>> {
        self.inner.status.clone()
    }

    /// Refuse new requests; let running and queued ones finish until `grace` passes, then end them as
    /// cancelled. The engine thread exits when nothing is left (`status().stopped`).
    pub fn drain(&self, grace: Duration) {
        let h = &*self.inner;
        h.draining.store(true, Ordering::Release);
        h.drain.send_replace(Some(Instant::now() + grace));
        // Wake an idle engine now rather than at its next poll; a full channel means it is busy anyway.
        let _ = h.cmd.try_send(Command::Wake);
    }

    /// Wait until the engine thread has exited.
    pub async fn stopped(&self) {
        let mut rx = self.inner.status.clone();
        let _ = rx.wait_for(|s| s.stopped).await;
    }
}

fn summarize(model: &Model, sha: &str, profile: Option<&(Arc<Profile>, PathBuf)>, cfg: &EngineConfig) -> ModelSummary {
    let c = &model.config;
    let geom = model.kv_geometry();
    let pm = PmkvqConfig::pmkvq();
    ModelSummary {
        name: model
            .source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        architecture: format!("{:?}", c.arch).to_lowercase(),
        path: model.source.clone(),
        sha256: sha.to_string(),
        layers: c.layers,
        heads: c.heads,
        kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        context_length: c.context_length,
        vocab_size: c.vocab_size,
        weight_bytes: model.weight_bytes(),
        device: "cpu".into(),
        device_weight_bytes: 0,
        kv_bytes_per_token: [Bits::B16, Bits::B8, Bits::B4, Bits::B2]
            .iter()
            .map(|&b| (b.count(), PmkvqStore::token_bytes(geom, &pm, b)))
            .collect(),
        profile: profile.map(|(p, path)| ProfileSummary {
            path: path.clone(),
            avg_bits: p.settings.avg_bits,
            layer_shares: p.shares.clone(),
            layer_bits: p.bits.clone(),
        }),
        default_kv_method: cfg.limits.default_kv_method.to_string(),
        max_tokens_limit: cfg.limits.max_tokens_limit,
    }
}
