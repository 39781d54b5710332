//! `pmkvq generate --server ADDR` and `pmkvq status`: the CLI as a gRPC client of pmkvqd.

use super::*;
use pmkvq::server::proto::{self as pb, pmkvq_service_client::PmkvqServiceClient};
use std::time::Duration;
use tonic::transport::Channel;

/// `HOST:PORT` or a full `http://` URI.
fn endpoint(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(EX_SOFTWARE, e.into()))
}

async fn connect(addr: &str) -> Result<PmkvqServiceClient<Channel>, Failure> {
    PmkvqServiceClient::connect(endpoint(addr))
        .await
        .map_err(|e| fail(EX_UNAVAILABLE, anyhow::anyhow!("cannot reach pmkvqd at {addr}: {e}")))
}

/// A gRPC status as a CLI failure: bad input is a usage error, the rest means the service is not available.
fn status_failure(s: tonic::Status) -> Failure {
    let code = match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => EX_USAGE,
        _ => EX_UNAVAILABLE,
    };
    fail(code, anyhow::anyhow!("{:?}: {}", s.code(), s.message()))
}

pub(crate) fn generate_remote(a: &GenerateArgs, server: &str) -> Result<(), Failure> {
    let input = match (&a.prompt, &a.chat) {
        (Some(p), _) => pb::generate_request::Input::Text(p.clone()),
        (None, Some(user)) => {
            let mut messages = Vec::new();
            if let Some(s) = &a.system {
                messages.push(pb::ChatMessage {
                    role: "system".into(),
                    content: s.clone(),
                });
            }
            messages.push(pb::ChatMessage {
                role: "user".into(),
                content: user.clone(),
            });
            pb::generate_request::Input::Chat(pb::ChatInput { messages })
        }
        (None, None) => return Err(fail(EX_USAGE, anyhow::anyhow!("one of --prompt or --chat is required"))),
    };
    let req = pb::GenerateRequest {
        request_id: String::new(),
        input: Some(input),
        sampling: Some(pb::SamplingParams {
            temperature: Some(a.temperature),
            top_k: Some(a.top_k as u32),
            top_p: Some(a.top_p),
            min_p: Some(a.min_p),
            repetition_penalty: Some(a.repeat_penalty),
            repeat_last_n: Some(a.repeat_last_n as u32),
            seed: Some(a.seed),
        }),
        stopping: Some(pb::StoppingCriteria {
            max_tokens: Some(a.max_tokens.min(u32::MAX as usize) as u32),
            stop: a.stop.clone(),
            ..Default::default()
        }),
        kv: Some(pb::KvPolicy {
            method: a.kv.clone(),
            ..Default::default()
        }),
        kv_state_every: None,
        thinking_budget: a.thinking_budget,
        enable_thinking: a.enable_thinking,
    };
    let (json, hide_thinking) = (a.json, a.hide_thinking);
    runtime()?.block_on(async move {
        let mut client = connect(server).await?;
        let mut stream = client.generate(req).await.map_err(status_failure)?.into_inner();
        let mut stdout = std::io::stdout().lock();
        let mut ids = Vec::new();
        let mut text = String::new();
        let mut reasoning_text = String::new();
        loop {
            let msg = stream.message().await.map_err(status_failure)?;
            let Some(msg) = msg else {
                return Err(fail(EX_UNAVAILABLE, anyhow::anyhow!("the stream ended without a completion")));
            };
            match msg.kind {
                Some(pb::generate_response::Kind::Chunk(c)) => {
                    ids.extend_from_slice(&c.token_ids);
                    if c.reasoning {
                        reasoning_text.push_str(&c.text);
                    } else {
                        text.push_str(&c.text);
                    }
                    let shown_here = !json && !c.text.is_empty();
                    if shown_here && !(c.reasoning && hide_thinking) {
                        // reasoning dimmed (SGR 2), the answer plain
                        let shown = if c.reasoning {
                            format!("\x1b[2m{}\x1b[0m", c.text)
                        } else {
                            c.text
                        };
                        let _ = stdout.write_all(shown.as_bytes());
                        let _ = stdout.flush();
                    }
                }
                Some(pb::generate_response::Kind::Complete(c)) => {
                    let reason = pb::FinishReason::try_from(c.finish_reason)
                        .map(|r| r.as_str_name().trim_start_matches("FINISH_REASON_").to_lowercase())
                        .unwrap_or_else(|_| c.finish_reason.to_string());
                    let usage = c.usage.unwrap_or_default();
                    let t = c.timings.unwrap_or_default();
                    let kv = c.kv.unwrap_or_default();
                    if json {
                        let out = serde_json::json!({
                            "request_id": msg.request_id,
                            "ids": ids,
                            "text": text,
                            "reasoning": reasoning_text,
                            "reasoning_tokens": usage.reasoning_tokens,
                            "thinking_budget_reached": c.thinking_budget_reached,
                            "finish_reason": reason,
                            "prompt_tokens": usage.prompt_tokens,
                            "completion_tokens": usage.completion_tokens,
                            "queue_ms": t.queue_ms, "prefill_ms": t.prefill_ms, "decode_ms": t.decode_ms,
                            "ttft_ms": t.ttft_ms, "total_ms": t.total_ms,
                            "kv_method": kv.method, "kv_true_bytes": kv.true_bytes, "kv_bits": kv.layer_bits,
                        });
                        serde_json::to_writer(&mut stdout, &out).context("writing JSON")?;
                        writeln!(stdout)?;
                    } else {
                        writeln!(stdout)?;
                        let decode_tps = if t.decode_ms > 0.0 {
                            (usage.completion_tokens.saturating_sub(1)) as f64 / (t.decode_ms / 1e3)
                        } else {
                            0.0
                        };
                        eprintln!(
                            "{} | prompt {} tokens | {} tokens, ttft {:.0} ms, decode {:.1} tok/s | finish: {} | kv {} {} bytes",
                            msg.request_id, usage.prompt_tokens, usage.completion_tokens, t.ttft_ms, decode_tps,
                            reason, kv.method, kv.true_bytes
                        );
                    }
                    return Ok(());
                }
                Some(pb::generate_response::Kind::Error(e)) => {
                    return Err(fail(EX_SOFTWARE, anyhow::anyhow!("server error: {}", e.message)));
                }
                None => {}
            }
        }
    })
}

/// A request with the admin bearer token attached, if one is given.
fn with_token<T>(msg: T, token: Option<&str>) -> Result<tonic::Request<T>, Failure> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token {
        let v = format!("Bearer {t}").parse().map_err(|_| {
            fail(
                EX_USAGE,
                anyhow::anyhow!("--token holds characters a header cannot carry"),
            )
        })?;
        req.metadata_mut().insert("authorization", v);
    }
    Ok(req)
}

fn print_status(s: &pb::ServerStatus, a: &StatusArgs) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    if a.json {
        writeln!(stdout, "{}", status_json(s))?;
    } else {
        if a.watch {
            // Clear the screen and home the cursor between refreshes.
            write!(stdout, "\x1b[2J\x1b[H")?;
        }
        write!(stdout, "{}", status_table(s))?;
    }
    stdout.flush()?;
    Ok(())
}

pub(crate) fn cmd_status(a: StatusArgs) -> Result<(), Failure> {
    runtime()?.block_on(async move {
        let mut client = connect(&a.server).await?;
        if !a.watch {
            let s = client
                .get_status(pb::GetStatusRequest {})
                .await
                .map_err(status_failure)?
                .into_inner();
            print_status(&s, &a)?;
            // Health checks (the Docker HEALTHCHECK) rely on the exit code: loading, draining or failed is not ready.
            if !s.ready || s.draining {
                let state = if s.draining { "draining" } else { "not ready" };
                return Err(fail(
                    EX_UNAVAILABLE,
                    anyhow::anyhow!("pmkvqd at {} is {state}", a.server),
                ));
            }
            return Ok(());
        }
        let ch = Channel::from_shared(endpoint(&a.server))
            .map_err(|e| fail(EX_USAGE, anyhow::anyhow!("bad --server: {e}")))?
            .connect()
            .await
            .map_err(|e| {
                fail(
                    EX_UNAVAILABLE,
                    anyhow::anyhow!("cannot reach pmkvqd at {}: {e}", a.server),
                )
            })?;
        let mut admin = pb::pmkvq_admin_client::PmkvqAdminClient::new(ch);
        let req = with_token(pb::WatchStatusRequest {}, a.token.as_deref())?;
        let mut stream = admin.watch_status(req).await.map_err(status_failure)?.into_inner();
        let every = Duration::from_millis(a.interval_ms.max(50));
        let mut last = tokio::time::Instant::now() - every;
        while let Some(u) = stream.message().await.map_err(status_failure)? {
            if last.elapsed() >= every {
                last = tokio::time::Instant::now();
                if let Some(s) = u.status {
                    print_status(&s, &a)?;
                }
            }
        }
        Ok(())
    })
}

pub(crate) fn cmd_budget(b: BudgetCmd) -> Result<(), Failure> {
    let BudgetCmd::Set { value, server, token } = b;
    use pb::set_memory_budget_request::Budget as B;
    let budget = match value.parse::<pmkvq::memory::OperatorCap>() {
        Ok(pmkvq::memory::OperatorCap::Automatic) => B::Automatic(true),
        Ok(pmkvq::memory::OperatorCap::Fraction(f)) => B::Fraction(f),
        Ok(pmkvq::memory::OperatorCap::Bytes(b)) => B::Bytes(b),
        Err(e) => return Err(fail(EX_USAGE, anyhow::anyhow!("the budget {e}"))),
    };
    runtime()?.block_on(async move {
        let ch = Channel::from_shared(endpoint(&server))
            .map_err(|e| fail(EX_USAGE, anyhow::anyhow!("bad --server: {e}")))?
            .connect()
            .await
            .map_err(|e| fail(EX_UNAVAILABLE, anyhow::anyhow!("cannot reach pmkvqd at {server}: {e}")))?;
        let mut admin = pb::pmkvq_admin_client::PmkvqAdminClient::new(ch);
        let req = with_token(pb::SetMemoryBudgetRequest { budget: Some(budget) }, token.as_deref())?;
        let r = admin.set_memory_budget(req).await.map_err(status_failure)?.into_inner();
        let source = pb::BudgetSource::try_from(r.source)
            .map(|s| s.as_str_name().trim_start_matches("BUDGET_SOURCE_").to_lowercase())
            .unwrap_or_default();
        println!(
            "kv budget {} bytes ({:.1} MiB), set by {source}; {} bytes in use; {}",
            r.budget_bytes,
            r.budget_bytes as f64 / (1u64 << 20) as f64,
            r.kv_bytes,
            r.effect
        );
        Ok(())
    })
}

fn state_name(s: i32) -> String {
    pb::SequenceState::try_from(s)
        .map(|r| r.as_str_name().trim_start_matches("SEQUENCE_STATE_").to_lowercase())
        .unwrap_or_else(|_| s.to_string())
}

fn status_json(s: &pb::ServerStatus) -> serde_json::Value {
    serde_json::json!({
        "ready": s.ready, "draining": s.draining, "running": s.running, "queued": s.queued,
        "kv_true_bytes": s.kv_true_bytes, "kv_budget_bytes": s.kv_budget_bytes, "preemptions": s.preemptions,
        "resumptions": s.resumptions, "requantizations": s.requantizations, "steps": s.steps, "uptime_s": s.uptime_s,
        "completed_requests": s.completed_requests, "generated_tokens": s.generated_tokens,
        "sequences": s.sequences.iter().map(|q| {
            let kv = q.kv.clone().unwrap_or_default();
            serde_json::json!({
                "request_id": q.request_id, "state": state_name(q.state), "prompt_tokens": q.prompt_tokens,
                "prefilled_tokens": q.prefilled_tokens, "generated_tokens": q.generated_tokens,
                "priority": q.priority, "kv_tokens": kv.tokens, "kv_true_bytes": kv.true_bytes,
                "kv_bits": kv.layer_bits, "kv_method": kv.method,
            })
        }).collect::<Vec<_>>(),
    })
}

fn status_table(s: &pb::ServerStatus) -> String {
    let mut out = format!(
        "ready {} | draining {} | running {} | queued {} | kv {:.2} / {:.2} MiB | preempted {} | steps {} | done {} | tokens {} | up {:.0} s\n",
        s.ready,
        s.draining,
        s.running,
        s.queued,
        s.kv_true_bytes as f64 / (1 << 20) as f64,
        s.kv_budget_bytes as f64 / (1 << 20) as f64,
        s.preemptions,
        s.steps,
        s.completed_requests,
        s.generated_tokens,
        s.uptime_s
    );
    if !s.sequences.is_empty() {
        out.push_str(&format!(
            "{:<24} {:<8} {:>7} {:>7} {:>6} {:>4} {:>10}  bits per layer\n",
            "request", "state", "prompt", "filled", "gen", "prio", "kv bytes"
        ));
    }
    for q in &s.sequences {
        let kv = q.kv.clone().unwrap_or_default();
        let bits: Vec<String> = kv.layer_bits.iter().map(|b| b.to_string()).collect();
        out.push_str(&format!(
            "{:<24} {:<8} {:>7} {:>7} {:>6} {:>4} {:>10}  {}\n",
            q.request_id,
            state_name(q.state),
            q.prompt_tokens,
            q.prefilled_tokens,
            q.generated_tokens,
            q.priority,
            kv.true_bytes,
            bits.join(" ")
        ));
    }
    out
}
