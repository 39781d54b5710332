//! The network edge: turning a listener into a stream of connections that neither spins when the process is out
//! of file descriptors nor holds more connections than it may, and gives each new connection a deadline for its
//! first bytes (a peer that connects and says nothing would otherwise hold a descriptor forever).
//!
//! Owns: the accept loop (back-off on EMFILE/ENFILE/ENOBUFS/ENOMEM, one warning per episode), the connection cap
//! (a semaphore permit travels with each connection and is returned when hyper drops it), and the handshake
//! deadline. Does not own: HTTP/2 settings, TLS (tonic's builder takes those).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// Bytes after which a connection has shown it speaks: the HTTP/2 client preface is 24 bytes, and a TLS
/// ClientHello is longer (its handshake has its own timeout in tonic).
const PREFACE_BYTES: usize = 24;
/// First and longest pause after an accept failed for want of resources.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A listener the accept loop can drive.
pub trait Acceptor: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Acceptor for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        let (s, _) = tokio::net::TcpListener::accept(self).await?;
        // Token chunks are small writes: without TCP_NODELAY, Nagle's algorithm meets the client's delayed ACK
        // and holds each one back ~40 ms. (Failing to set it is not worth dropping the connection.)
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

impl Acceptor for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        Ok(tokio::net::UnixListener::accept(self).await?.0)
    }
}

/// What the accept loop enforces.
#[derive(Clone, Copy, Debug)]
pub struct AcceptLimits {
    /// Connections open at once; the loop stops accepting (the kernel's backlog holds the rest) at the cap.
    pub max_connections: usize,
    /// A new connection must send [`PREFACE_BYTES`] within this (`None`: no deadline).
    pub handshake_timeout: Option<Duration>,
}

/// Whether an accept error is about one connection (try the next at once) rather than the process's resources.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM | libc::EINTR | libc::EAGAIN)
    )
}

/// Accept connections from `listener` until the returned stream is dropped (then the listener is closed).
/// `what` names the listener in log lines.
pub fn incoming<A: Acceptor>(
    listener: A,
    limits: AcceptLimits,
    what: &'static str,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Guarded<A::Io>>> {
    let (tx, rx) = mpsc::channel(1);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        let mut backoff = BACKOFF_MIN;
        let mut failing = false;
        loop {
            let permit = tokio::select! {
                _ = tx.closed() => return,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok(io) => {
                    if failing {
                        tracing::info!(listener = what, "accepting connections again");
                    }
                    failing = false;
                    backoff = BACKOFF_MIN;
                    let conn = Guarded::new(io, permit, limits.handshake_timeout);
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Err(e) if per_connection(&e) => continue,
                Err(e) => {
                    // Out of descriptors or buffers: the listener stays readable, so retrying at once would
                    // spin a core until something else frees one. Wait, longer each time, and say so once.
                    drop(permit);
                    if !failing {
                        tracing::warn!(listener = what, error = %e, "cannot accept connections; backing off");
                    }
                    failing = true;
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// An accepted connection holding its slot under the cap, with a deadline for its first bytes.
pub struct Guarded<Io> {
    io: Io,
    _slot: OwnedSemaphorePermit,
    deadline: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    seen: usize,
}

impl<Io> Guarded<Io> {
    fn new(io: Io, slot: OwnedSemaphorePermit, timeout: Option<Duration>) -> Self {
        Guarded {
            io,
            _slot: slot,
            deadline: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
            timeout: timeout.unwrap_or_default(),
            seen: 0,
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Guarded<Io> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(d) = this.deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no handshake within {:?} (server.handshake_timeout)", this.timeout),
                )));
            }
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.seen += buf.filled().len() - before;
            if this.seen >= PREFACE_BYTES {
                this.deadline = None;
            }
        }
        r
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Guarded<Io> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<Io: tonic::transport::server::Connected> tonic::transport::server::Connected for Guarded<Io> {
    type ConnectInfo = Io::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
