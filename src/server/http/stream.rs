//! An engine event stream as a response: Server-Sent Events (`data: {chunk}` … `data: [DONE]`) or, collected,
//! one JSON completion.
//!
//! Dropping the body (the client went away) drops the event receiver, and the engine cancels the sequence before
//! its next step, as on gRPC. A client that stops reading fills the bounded channel and pauses its sequence.

use super::super::RpcOutcome;
use super::error::ApiError;
use super::openai::Delivery;
use super::shape::Shape;
use crate::engine::{Event, Submission};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::time::Duration;
use tokio::sync::mpsc;

/// An SSE comment after this long without an event (queueing, a long prefill), so proxies and clients with idle
/// timeouts keep the stream.
const KEEPALIVE: Duration = Duration::from_secs(15);

fn frame(v: &serde_json::Value) -> String {
    format!("data: {v}\n\n")
}

/// Where an SSE stream is.
struct Sse {
    events: mpsc::Receiver<Event>,
    outcome: RpcOutcome,
    shape: Shape,
    /// The role chunk (chat) has been sent.
    started: bool,
    done: bool,
}

impl Sse {
    /// The next bytes to send; `None` once `[DONE]` went out.
    async fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if !self.started {
            self.started = true;
            if self.shape.kind == super::shape::Kind::Chat {
                // OpenAI's first chunk announces the role before any text.
                return Some(frame(&self.shape.chunk("", true, None)).into());
            }
        }
        loop {
            let ev = match tokio::time::timeout(KEEPALIVE, self.events.recv()).await {
                Err(_) => return Some(Bytes::from_static(b": keep-alive\n\n")),
                Ok(ev) => ev,
            };
            if let Some(ev) = &ev {
                self.outcome.observe(ev);
            }
            let out = match ev {
                Some(Event::Chunk { text, .. }) if text.is_empty() => continue,
                Some(Event::Chunk {
                    text, reasoning: true, ..
                }) => frame(&self.shape.reasoning_chunk(&text)),
                Some(Event::Chunk { text, .. }) => frame(&self.shape.chunk(&text, false, None)),
                Some(Event::Complete(c)) => {
                    self.done = true;
                    let mut s = frame(&self.shape.chunk("", false, Some(&c)));
                    if self.shape.include_usage {
                        s.push_str(&frame(&self.shape.usage_chunk(&c)));
                    }
                    s + "data: [DONE]\n\n"
                }
                Some(Event::Error(m)) => {
                    self.done = true;
                    let e = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Some("generation_failed"), m);
                    frame(&e.body()) + "data: [DONE]\n\n"
                }
                None => {
                    // (the engine always ends a stream with Complete or Error; a closed channel means it stopped)
                    self.done = true;
                    let e = ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Some("unavailable"),
                        "the engine stopped before the stream ended",
                    );
                    frame(&e.body()) + "data: [DONE]\n\n"
                }
            };
            return Some(out.into());
        }
    }
}

/// The response for a started submission: SSE or one JSON object.
pub(super) async fn respond(sub: Submission, shape: Shape, delivery: Delivery, outcome: RpcOutcome) -> Response {
    let id = HeaderValue::from_str(&sub.request_id).ok();
    let mut r = if delivery.stream {
        let sse = Sse {
            events: sub.events,
            outcome,
            shape,
            started: false,
            done: false,
        };
        let body = futures_util::stream::unfold(sse, |mut s| async move {
            s.next().await.map(|b| (Ok::<_, std::convert::Infallible>(b), s))
        });
        let mut r = Body::from_stream(body).into_response();
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        // nginx would otherwise buffer the stream.
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        r
    } else {
        collect(sub.events, &shape, outcome).await
    };
    if let Some(id) = id {
        r.headers_mut().insert("x-request-id", id);
    }
    r
}

/// Wait for the whole generation and answer with one completion object.
async fn collect(mut events: mpsc::Receiver<Event>, shape: &Shape, mut outcome: RpcOutcome) -> Response {
    let (mut text, mut reasoning) = (String::new(), String::new());
    while let Some(ev) = events.recv().await {
        outcome.observe(&ev);
        match ev {
            Event::Chunk {
                text: t,
                reasoning: true,
                ..
            } => reasoning.push_str(&t),
            Event::Chunk { text: t, .. } => text.push_str(&t),
            Event::Complete(c) => return axum::Json(shape.complete(text, reasoning, &c)).into_response(),
            Event::Error(m) => {
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Some("generation_failed"), m).into_response()
            }
        }
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Some("unavailable"),
        "the engine stopped before the generation ended",
    )
    .into_response()
}
