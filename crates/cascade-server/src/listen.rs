//! The gRPC port's accept loop and the life of each connection.
//!
//! tonic's `Server` bounds too little for a port that hostile or careless
//! peers can reach. It has no handshake or idle timeout and no connection
//! limit. With a grace period set it closes an aged connection without a
//! GOAWAY. Its own `grpc-timeout` timer answers CANCELLED. So the routes are
//! served on hyper here (HTTP/2 only, as gRPC is), and every bound below is
//! ours and tested:
//! - **handshake**: the 24-byte HTTP/2 client preface must arrive within
//!   `handshake_timeout`, or the connection is dropped;
//! - **idle**: a connection with no request in flight for `idle_timeout`
//!   gets a GOAWAY. This also ends a peer trickling a request's headers,
//!   because a request counts only once its headers are complete;
//! - **age**: after `max_age`, a GOAWAY, then `max_age_grace` for the
//!   requests still open;
//! - **count**: past `max_connections`, new connections are closed at once;
//! - **drain**: at shutdown every connection gets a GOAWAY; after
//!   `drain_timeout` the rest are cut.
//!
//! A GOAWAY that the peer never answers is followed by a forced close, so
//! no peer can hold a connection open past its bound.

use std::convert::Infallible;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::body::Body;
use tonic::service::Routes;

use crate::{Connections, ServerMetrics};

/// Length of the HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE_BYTES: usize = 24;

/// Largest header block a request may send (gRPC metadata included).
pub const MAX_HEADER_LIST_BYTES: u32 = 64 << 10;

/// Why a connection ended: the `reason` label of
/// `cascade_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// The peer closed it.
    Peer,
    /// A protocol or I/O error (logged at debug).
    Error,
    /// No client preface within the handshake timeout.
    Handshake,
    /// No request in flight for the idle timeout.
    Idle,
    /// Older than the connection age bound.
    Age,
    /// Shut down with the server.
    Drain,
    /// Still open when the drain bound passed.
    Cut,
    /// Refused: the connection limit was reached.
    Limit,
}

impl Closed {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Closed::Peer => "peer",
            Closed::Error => "error",
            Closed::Handshake => "handshake_timeout",
            Closed::Idle => "idle_timeout",
            Closed::Age => "max_age",
            Closed::Drain => "drain",
            Closed::Cut => "drain_timeout",
            Closed::Limit => "limit",
        }
    }
}

/// Serve `routes` on `listener` until `shutdown` resolves, then drain.
/// Returns how many connections were still open when the drain bound passed
/// (they were cut).
pub(crate) async fn serve_routes(
    listener: TcpListener,
    routes: Routes,
    c: Connections,
    metrics: Option<Arc<ServerMetrics>>,
    shutdown: impl Future<Output = ()>,
) -> usize {
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .keep_alive_interval(Some(c.keepalive_interval))
        .keep_alive_timeout(c.keepalive_timeout)
        .max_concurrent_streams(c.max_streams)
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    let mut at_limit = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if conns.len() >= c.max_connections {
                        if !at_limit {
                            tracing::warn!(
                                "connection limit ({}) reached: refusing new connections (first: {peer})",
                                c.max_connections
                            );
                        }
                        at_limit = true;
                        count(&metrics, Closed::Limit);
                        drop(stream);
                        continue;
                    }
                    at_limit = false;
                    conns.spawn(connection(
                        stream,
                        h2.clone(),
                        routes.clone(),
                        c,
                        drain_rx.clone(),
                        metrics.clone(),
                    ));
                }
                Err(e) => accept_failed(e).await,
            },
        }
    }
    // Stop accepting at once: the kernel refuses new connections instead of
    // queueing them for a server that will not answer.
    drop(listener);
    let _ = drain_tx.send(true);
    let bound = pin!(tokio::time::sleep(c.drain_timeout));
    tokio::select! {
        _ = async { while conns.join_next().await.is_some() {} } => 0,
        _ = bound => {
            let cut = conns.len();
            conns.abort_all();
            while conns.join_next().await.is_some() {}
            for _ in 0..cut {
                count(&metrics, Closed::Cut);
            }
            cut
        }
    }
}

/// Out of file descriptors (or memory) is worth a pause before the next
/// accept; a peer that reset before it was accepted is not.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) {
        tracing::debug!("accept: {e}");
    } else {
        tracing::warn!("accept: {e}; pausing 100 ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn count(metrics: &Option<Arc<ServerMetrics>>, why: Closed) {
    if let Some(m) = metrics {
        m.connections_closed.with_label_values(&[why.label()]).inc();
    }
}

/// Counts the connection in `cascade_connections_open` while it lives,
/// even when its task is aborted.
struct Open(Option<Arc<ServerMetrics>>);

impl Open {
    fn new(m: Option<Arc<ServerMetrics>>) -> Self {
        if let Some(m) = &m {
            m.connections_open.inc();
        }
        Open(m)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.connections_open.dec();
        }
    }
}

async fn connection(
    stream: TcpStream,
    h2: http2::Builder<TokioExecutor>,
    routes: Routes,
    c: Connections,
    mut drain: watch::Receiver<bool>,
    metrics: Option<Arc<ServerMetrics>>,
) {
    let _open = Open::new(metrics.clone());
    // Small responses must leave at once: without TCP_NODELAY, Nagle's
    // algorithm and the peer's delayed ACK add up to 40 ms to a reply.
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(c.keepalive_interval));
    let read = Arc::new(AtomicUsize::new(0));
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Counted {
        inner: stream,
        read: read.clone(),
    });
    let svc = ConnService {
        routes,
        activity: activity.clone(),
    };
    let mut conn = pin!(h2.serve_connection(io, svc));
    let greeted = || read.load(Ordering::Relaxed) >= PREFACE_BYTES;
    let accepted = Instant::now();
    let handshake_by = accepted + c.handshake_timeout;
    let age_at = c.max_age.map(|a| accepted + a);
    // Once a GOAWAY is sent: when to stop waiting for the peer, and why.
    let mut closing: Option<(Instant, Closed)> = None;
    let why = loop {
        let wake = match closing {
            Some((t, _)) => t,
            None => {
                let mut t = activity.idle_deadline(c.idle_timeout);
                if !greeted() {
                    t = t.min(handshake_by);
                }
                age_at.map_or(t, |a| t.min(a))
            }
        };
        tokio::select! {
            done = conn.as_mut() => break match (done, closing) {
                (_, Some((_, why))) => why,
                (Ok(()), None) => Closed::Peer,
                (Err(e), None) => {
                    tracing::debug!("connection: {e}");
                    Closed::Error
                }
            },
            _ = drain.changed(), if closing.is_none() => {
                if !greeted() {
                    break Closed::Drain;
                }
                conn.as_mut().graceful_shutdown();
                // The accept loop's drain bound cuts it if the peer never
                // lets it close.
                closing = Some((Instant::now() + c.drain_timeout, Closed::Drain));
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                if let Some((by, why)) = closing {
                    if now >= by {
                        // The peer did not close after the GOAWAY.
                        break why;
                    }
                } else if !greeted() && now >= handshake_by {
                    break Closed::Handshake;
                } else if age_at.is_some_and(|a| now >= a) {
                    conn.as_mut().graceful_shutdown();
                    closing = Some((now + c.max_age_grace, Closed::Age));
                } else if activity.idle_deadline(c.idle_timeout) <= now {
                    conn.as_mut().graceful_shutdown();
                    // Nothing is in flight: the peer only has to read the
                    // GOAWAY and answer its PING.
                    closing = Some((now + c.keepalive_timeout, Closed::Idle));
                }
            }
        }
    };
    count(&metrics, why);
}

/// Requests in flight on one connection, and when the last one ended.
struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `base` when the connection last became idle.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    /// When the connection will have been idle for `idle` (if nothing
    /// starts before then).
    fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            Instant::now() + idle
        } else {
            self.base + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire)) + idle
        }
    }
}

/// One request in flight, from its headers until its response body is
/// done (a streaming response keeps the connection busy).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(a: Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(a)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let ms = self.0.base.elapsed().as_millis() as u64;
        self.0.idle_since_ms.fetch_max(ms, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The routes as one connection's hyper service.
#[derive(Clone)]
struct ConnService {
    routes: Routes,
    activity: Arc<Activity>,
}

impl hyper::service::Service<http::Request<Incoming>> for ConnService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let busy = Busy::new(self.activity.clone());
        let mut routes = self.routes.clone();
        Box::pin(async move {
            use tower::Service;
            std::future::poll_fn(|cx| {
                Service::<http::Request<Incoming>>::poll_ready(&mut routes, cx)
            })
            .await?;
            let resp = routes.call(req).await?;
            Ok(resp.map(|body| Body::new(Tracked { body, _busy: busy })))
        })
    }
}

/// A response body that keeps its request counted until it is done.
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A TCP stream that counts the bytes read, so the connection knows when
/// the peer has sent its preface.
struct Counted {
    inner: TcpStream,
    read: Arc<AtomicUsize>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
