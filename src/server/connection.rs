//! TLS connections: the accept loop, each connection's timers (request-head timeout, idle
//! keep-alive, the drain), and graceful shutdown. The timer decisions are a pure function,
//! [`on_timer`], tested on its own.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::header;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::Limits;
use crate::metrics::Metrics;

/// How long an HTTP/1.1 connection must have been idle, once draining, before it is closed.
/// HTTP/1.1 has no way to tell a client "no more requests" on an idle connection: closing it races
/// with a request the client may be writing at that moment, which then fails with `EOF` (Go's
/// transport, the API server's, does not retry a POST on a reused connection). So while draining,
/// busy connections are closed by the `Connection: close` of their next response, and only
/// connections that have been quiet this long are closed by the server.
pub const DRAIN_IDLE_CLOSE: Duration = Duration::from_secs(1);

/// The server's life cycle, seen by every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Shutdown began: no new connections; HTTP/2 connections got GOAWAY; HTTP/1.1 responses say
    /// `Connection: close`; quiet HTTP/1.1 connections are closed.
    Draining,
    /// The drain timeout passed: remaining connections are dropped.
    Closing,
}

/// What a connection is doing, for its timers: requests in flight, since when it has been idle,
/// and since when a request head has been arriving (HTTP/1.1 only).
struct Activity {
    base: Instant,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds since `base` at which the connection last became idle.
    idle_since: std::sync::atomic::AtomicU64,
    /// 1 + milliseconds since `base` at which bytes of a request head were first read while no
    /// request was in flight; 0 = none pending.
    head_since: std::sync::atomic::AtomicU64,
    /// Track `head_since` (HTTP/1.1; HTTP/2 reads control frames while idle).
    track_heads: bool,
}

impl Activity {
    fn new(track_heads: bool) -> Arc<Self> {
        Arc::new(Activity {
            base: Instant::now(),
            in_flight: 0.into(),
            idle_since: 0.into(),
            // A new HTTP/1.1 connection must send its first request head within the timeout.
            head_since: u64::from(track_heads).into(),
            track_heads,
        })
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
    }

    fn end(&self) {
        self.idle_since.store(self.now_ms(), Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    fn read(&self) {
        if self.track_heads
            && self.in_flight.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Acquire) == 0
        {
            self.head_since.store(self.now_ms() + 1, Ordering::Release);
        }
    }

    /// How long a request head has been pending, if one is.
    fn head_pending(&self) -> Option<Duration> {
        match self.head_since.load(Ordering::Acquire) {
            0 => None,
            at => Some(Duration::from_millis(self.now_ms().saturating_sub(at - 1))),
        }
    }

    /// How long the connection has been idle (no request in flight), if it is.
    fn idle(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(Duration::from_millis(self.now_ms().saturating_sub(self.idle_since.load(Ordering::Acquire))))
    }
}

/// Ends a request's activity also when hyper drops its future (client gone).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// The TLS stream, noting reads in the connection's `Activity`.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        res
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves, then drains: no new
/// connections; HTTP/2 connections get GOAWAY (their clients retry elsewhere what the server did
/// not take); every HTTP/1.1 response says `Connection: close` so the client stops reusing the
/// connection before the server closes it; requests arriving on open connections are still
/// answered; HTTP/1.1 connections idle for [`DRAIN_IDLE_CLOSE`] are closed. Returns when every
/// connection is closed, or after `limits.drain_timeout`.
///
/// Outside shutdown, an idle HTTP/1.1 keep-alive connection is closed after
/// `limits.keep_alive_timeout` (longer than the API server's 90 s client idle timeout, so the
/// client, not the server, closes idle connections); a request head must arrive within
/// `limits.header_read_timeout` of its first byte (and of the TLS handshake).
///
/// Failed TLS handshakes are counted in `metrics` and logged at info with the peer: a client
/// that does not trust the certificate (a caBundle that does not match) fails nowhere else.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No hyper header_read_timeout: it also runs while a keep-alive connection is idle and closes
    // it after the timeout, racing with the client's next request. The connection task below
    // times request heads and idle connections separately.
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Duration::from_secs(30));
    let builder = Arc::new(builder);
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Serving);
    // Every connection task holds a clone; the drain is over when all are dropped.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let conn = Connection {
            acceptor: acceptor.clone(),
            app: app.clone(),
            builder: builder.clone(),
            limits: limits.clone(),
            phase: phase_rx.clone(),
            metrics: metrics.clone(),
            _open: open_tx.clone(),
        };
        tokio::spawn(conn.run(tcp, peer));
    }
    drop(listener);
    drop(open_tx);
    let _ = phase_tx.send(Phase::Draining);
    tracing::info!("draining: open connections finish their requests and close");
    if tokio::time::timeout(limits.drain_timeout, open_rx.recv()).await.is_err() {
        tracing::warn!(timeout = ?limits.drain_timeout, "drain timeout reached; closing remaining connections");
        let _ = phase_tx.send(Phase::Closing);
        let _ = tokio::time::timeout(Duration::from_millis(500), open_rx.recv()).await;
    }
}

/// One accepted connection and what it needs.
struct Connection {
    acceptor: TlsAcceptor,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Limits,
    phase: tokio::sync::watch::Receiver<Phase>,
    metrics: Arc<Metrics>,
    _open: tokio::sync::mpsc::Sender<()>,
}

/// What a connection's periodic check decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerAction {
    Wait,
    /// A request head did not arrive within the header read timeout: drop the connection.
    HeadTimeout,
    /// Idle past its limit: close gracefully (hyper closes an idle HTTP/1.1 connection at once).
    CloseIdle,
}

/// The timer decision of one check, pure: an HTTP/2 (`h2`) or HTTP/1.1 connection, the server
/// draining or not, how long a request head has been pending and how long the connection has been
/// idle (each if it is).
fn on_timer(
    h2: bool,
    draining: bool,
    head_pending: Option<Duration>,
    idle: Option<Duration>,
    limits: &Limits,
) -> TimerAction {
    if let Some(pending) = head_pending {
        return if pending >= limits.header_read_timeout { TimerAction::HeadTimeout } else { TimerAction::Wait };
    }
    let Some(idle) = idle else { return TimerAction::Wait };
    let limit = match (h2, draining) {
        (_, false) => limits.keep_alive_timeout,
        (false, true) => DRAIN_IDLE_CLOSE,
        // GOAWAY was sent when the drain began; hyper closes once the streams are done.
        (true, true) => return TimerAction::Wait,
    };
    if idle >= limit {
        TimerAction::CloseIdle
    } else {
        TimerAction::Wait
    }
}

/// How often a connection checks its timers: often enough to see a request head start while it
/// idles, and a quiet connection soon after the drain began.
fn recheck_every(draining: bool, limits: &Limits) -> Duration {
    let every = (limits.header_read_timeout / 2).clamp(Duration::from_millis(20), Duration::from_secs(1));
    if draining {
        every.min(DRAIN_IDLE_CLOSE / 4)
    } else {
        every
    }
}

impl Connection {
    async fn run(self, tcp: tokio::net::TcpStream, peer: std::net::SocketAddr) {
        let Some(tls) = self.handshake(tcp, peer).await else { return };
        // `_open` lives until the connection is done: the drain waits for every one of them.
        let Connection { app, builder, limits, mut phase, _open, .. } = self;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let activity = Activity::new(!h2);
        let io = TokioIo::new(Watched { inner: tls, activity: activity.clone() });
        let conn = builder.serve_connection(io, service(app, activity.clone(), phase.clone())).into_owned();
        tokio::pin!(conn);
        let mut draining = *phase.borrow() != Phase::Serving;
        let mut closing = false;
        if draining && h2 {
            conn.as_mut().graceful_shutdown();
        }
        loop {
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                changed = phase.changed(), if !closing => match changed.map(|()| *phase.borrow_and_update()) {
                    Ok(Phase::Draining) if !draining => {
                        draining = true;
                        if h2 {
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                    Ok(Phase::Closing) | Err(_) => return tracing::debug!(%peer, "drain timeout: connection dropped"),
                    Ok(_) => {}
                },
                () = tokio::time::sleep(recheck_every(draining, &limits)), if !closing => {
                    match on_timer(h2, draining, activity.head_pending(), activity.idle(), &limits) {
                        TimerAction::Wait => {}
                        TimerAction::HeadTimeout => {
                            return tracing::debug!(%peer, "request head not received within the header read timeout")
                        }
                        TimerAction::CloseIdle => {
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                }
            }
        }
    }

    /// The TLS handshake, bounded by the header read timeout; a failure is counted and logged.
    async fn handshake(
        &self,
        tcp: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
    ) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
        let mut phase = self.phase.clone();
        tokio::select! {
            tls = tokio::time::timeout(self.limits.header_read_timeout, self.acceptor.accept(tcp)) => match tls {
                Ok(Ok(tls)) => Some(tls),
                Ok(Err(e)) => {
                    self.metrics.tls_handshake_failed();
                    tracing::info!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                // A client that connected and said nothing (a port probe, a slow client): counted,
                // but only worth a line at debug.
                Err(_) => {
                    self.metrics.tls_handshake_failed();
                    tracing::debug!(%peer, "TLS handshake timed out");
                    None
                }
            },
            _ = phase.wait_for(|p| *p != Phase::Serving) => None,
        }
    }
}

/// The connection's hyper service: the app, with the request noted in `activity` and, once the
/// server drains, `Connection: close` on HTTP/1.1 responses.
fn service(
    app: Router,
    activity: Arc<Activity>,
    phase: tokio::sync::watch::Receiver<Phase>,
) -> impl hyper::service::Service<
    axum::http::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
        activity.begin();
        let guard = InFlight(activity.clone());
        let (app, phase) = (app.clone(), phase.clone());
        async move {
            let http1 = req.version() < axum::http::Version::HTTP_2;
            let Ok(mut resp) = tower::ServiceExt::oneshot(app, req).await;
            if http1 && *phase.borrow() != Phase::Serving {
                // The client learns before the close that it must not reuse the connection; hyper
                // closes it after this response.
                resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            }
            drop(guard);
            Ok::<_, std::convert::Infallible>(resp)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn limits() -> Limits {
        Limits { header_read_timeout: S(5), keep_alive_timeout: S(120), ..Limits::default() }
    }

    #[test]
    fn a_pending_head_is_timed_out_by_the_header_read_timeout_alone() {
        let l = limits();
        for (h2, draining) in [(false, false), (false, true), (true, false)] {
            assert_eq!(on_timer(h2, draining, Some(S(4)), Some(S(500)), &l), TimerAction::Wait, "idle does not count");
            assert_eq!(on_timer(h2, draining, Some(S(5)), None, &l), TimerAction::HeadTimeout);
        }
    }

    #[test]
    fn idle_connections_close_after_keep_alive_or_soon_once_draining() {
        let l = limits();
        assert_eq!(on_timer(false, false, None, None, &l), TimerAction::Wait, "a request in flight");
        assert_eq!(on_timer(false, false, None, Some(S(119)), &l), TimerAction::Wait);
        assert_eq!(on_timer(false, false, None, Some(S(120)), &l), TimerAction::CloseIdle);
        assert_eq!(on_timer(true, false, None, Some(S(120)), &l), TimerAction::CloseIdle);
        // Draining: a quiet HTTP/1.1 connection closes after DRAIN_IDLE_CLOSE, not before (a
        // client may be writing its next request); HTTP/2 already got GOAWAY.
        assert_eq!(
            on_timer(false, true, None, Some(DRAIN_IDLE_CLOSE - Duration::from_millis(1)), &l),
            TimerAction::Wait
        );
        assert_eq!(on_timer(false, true, None, Some(DRAIN_IDLE_CLOSE), &l), TimerAction::CloseIdle);
        assert_eq!(on_timer(true, true, None, Some(S(1000)), &l), TimerAction::Wait);
    }

    #[test]
    fn checks_come_often_enough_for_the_limits() {
        let l = limits();
        assert_eq!(recheck_every(false, &l), S(1));
        assert_eq!(recheck_every(true, &l), DRAIN_IDLE_CLOSE / 4);
        let quick = Limits { header_read_timeout: Duration::from_millis(10), ..limits() };
        assert_eq!(recheck_every(false, &quick), Duration::from_millis(20));
    }
}
