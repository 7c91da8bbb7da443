//! HTTP: the TLS webhook endpoint (`POST /mutate`) and the plain admin endpoint (`/healthz`,
//! `/readyz`, `/metrics`), connection handling and graceful drain.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::{BoxError, ServiceBuilder};

use crate::admission::{self, Decision, Policy};
use crate::metrics::Metrics;
use crate::store::TemplateStore;

/// Everything a request handler needs.
pub struct AppState {
    pub store: Arc<dyn TemplateStore>,
    pub policy: Policy,
    pub metrics: Arc<Metrics>,
    /// Set on SIGTERM: readiness turns false while in-flight requests finish.
    pub draining: AtomicBool,
    /// False until the serving certificate is in place (builtin certificates).
    pub certificate_ready: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(store: Arc<dyn TemplateStore>, policy: Policy) -> Arc<Self> {
        Self::with_metrics(store, policy, Arc::default())
    }

    pub fn with_metrics(store: Arc<dyn TemplateStore>, policy: Policy, metrics: Arc<Metrics>) -> Arc<Self> {
        let certificate_ready = Arc::new(AtomicBool::new(true));
        Arc::new(AppState { store, policy, metrics, draining: AtomicBool::new(false), certificate_ready })
    }

    pub fn is_ready(&self) -> bool {
        self.store.is_ready()
            && self.certificate_ready.load(Ordering::Acquire)
            && !self.draining.load(Ordering::Relaxed)
    }
}

/// Timeouts and caps of the webhook listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// A client must finish the TLS handshake and send its request headers within this time.
    pub header_read_timeout: Duration,
    /// How long in-flight requests may take to finish after shutdown starts.
    pub drain_timeout: Duration,
    /// Requests handled at once; more are answered 503 at once.
    pub max_concurrent_requests: usize,
    /// A request (body included) must complete within this; below the webhook's timeoutSeconds.
    pub request_timeout: Duration,
    /// An idle keep-alive connection is closed after this. Longer than the clients' own idle
    /// timeout (the API server's is 90 s), so that the client closes it: a server-side close
    /// races with the client's next request.
    pub keep_alive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 3 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(20),
            max_concurrent_requests: 1024,
            request_timeout: Duration::from_secs(4),
            keep_alive_timeout: Duration::from_secs(120),
        }
    }
}

/// The webhook routes (served over TLS).
pub fn webhook_router(state: Arc<AppState>, limits: &Limits) -> Router {
    let guard = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(refused))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::new(limits.max_concurrent_requests))
        .timeout(limits.request_timeout);
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(guard)
        .with_state(state)
}

/// Requests over the concurrency bound, or slower than the request timeout, get a clear answer
/// instead of a queue: the API server's own timeout is close behind.
async fn refused(err: BoxError) -> (StatusCode, String) {
    if err.is::<tower::load_shed::error::Overloaded>() {
        (StatusCode::SERVICE_UNAVAILABLE, "too many concurrent requests; retry\n".into())
    } else if err.is::<tower::timeout::error::Elapsed>() {
        (StatusCode::REQUEST_TIMEOUT, "request not completed within the request timeout\n".into())
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n"))
    }
}

/// A baseline for load tests only (`serve --noop-handler`, cargo feature `noop-handler`, not in
/// the default build): answers `allowed` with the request's uid (so an API server accepts it too)
/// and reads nothing else, so the TLS and HTTP stack can be measured alone.
#[cfg(feature = "noop-handler")]
pub fn noop_router(limits: &Limits) -> Router {
    #[derive(serde::Deserialize)]
    struct Review<'a> {
        #[serde(borrow)]
        request: Option<Uid<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Uid<'a> {
        #[serde(borrow)]
        uid: std::borrow::Cow<'a, str>,
    }
    async fn allow(body: Bytes) -> Response {
        match serde_json::from_slice::<Review<'_>>(&body) {
            Ok(Review { request: Some(Uid { uid }) }) => {
                let review = serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "response": {"uid": uid, "allowed": true}});
                ([(header::CONTENT_TYPE, "application/json")], review.to_string()).into_response()
            }
            _ => (StatusCode::BAD_REQUEST, "no request.uid\n").into_response(),
        }
    }
    Router::new().route("/mutate", post(allow)).layer(DefaultBodyLimit::max(limits.max_body_bytes))
}

/// The admin routes (plain HTTP).
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// A body that cannot be a review at all, refused before it is parsed: another content type than
/// JSON (415; none at all is taken as JSON, as curl sends it), or nothing (400).
fn not_a_review(headers: &HeaderMap, body: &[u8]) -> Option<Response> {
    let content_type = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("(not text)"));
    if let Some(content_type) = content_type {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            let message = format!("content type {content_type:?}: an AdmissionReview is application/json\n");
            return Some((StatusCode::UNSUPPORTED_MEDIA_TYPE, message).into_response());
        }
    }
    body.is_empty()
        .then(|| (StatusCode::BAD_REQUEST, "empty request body: expected an AdmissionReview\n").into_response())
}

async fn mutate(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    use tracing::field::{display, Empty};
    let started = Instant::now();
    if let Some(refused) = not_a_review(&headers, &body) {
        state.metrics.admission("error", started.elapsed());
        return refused;
    }
    // One span per admission, its fields filled in as they are known. At debug, like the
    // per-admission line: at info, a span on every admission would cost what that line cost
    // (docs/performance.md); the info and warn lines below carry the same fields themselves.
    let span = tracing::debug_span!(
        "admission",
        uid = Empty,
        namespace = Empty,
        pod = Empty,
        template = Empty,
        result = Empty
    );
    let _entered = span.enter();
    let mut uid = None;
    let decision = admission::parse_review(&body).and_then(|req| {
        span.record("uid", display(&req.uid));
        uid = Some(req.uid.clone());
        admission::mutate(req, &*state.store, &state.policy)
    });
    match decision {
        Ok(decision) => {
            span.record("namespace", display(&decision.namespace));
            span.record("pod", display(&decision.pod));
            span.record("template", display(decision.template.as_deref().unwrap_or_default()));
            span.record("result", decision.outcome.as_str());
            let body = admission::response_body(&decision);
            let took = started.elapsed();
            state.metrics.admission(decision.outcome.as_str(), took);
            if let Some(names) = &decision.template {
                let exists = |name: &str| state.store.lookup(&decision.namespace, name).entry.is_some();
                state.metrics.templates.count(names, decision.outcome.as_str(), exists);
            }
            log_decision(&decision, took);
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => {
            let uid = uid.or_else(|| uid_of(&body)).unwrap_or_default();
            span.record("uid", display(&uid));
            span.record("result", "error");
            state.metrics.admission("error", started.elapsed());
            tracing::warn!(uid = %uid, error = %e, "bad admission request");
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
    }
}

/// The review's `request.uid`, if the body has one, for the log line of a body refused as a
/// whole (too deep, a wrong shape elsewhere): only read on that error path.
fn uid_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Review {
        request: Option<Uid>,
    }
    #[derive(serde::Deserialize)]
    struct Uid {
        uid: String,
    }
    serde_json::from_slice::<Review>(body).ok()?.request.map(|r| r.uid)
}

/// The log line of an admission (no env values, no other pod content): at `info` when the
/// user has something to read (a denial, warnings), else at `debug`. A line for every admission
/// cost 12-22% of the throughput (docs/performance.md); metrics and the `applied` audit
/// annotation already record each one.
pub fn log_decision(d: &Decision, took: Duration) {
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                uid = %d.response.uid,
                namespace = %d.namespace,
                pod = %d.pod,
                template = d.template.as_deref().unwrap_or_default(),
                applied = d.applied.as_deref().unwrap_or_default(),
                result = d.outcome.as_str(),
                patch_operations = d.patch_operations,
                micros = took.as_micros() as u64,
                "admission"
            )
        };
    }
    if d.outcome == admission::Outcome::Error {
        line!(error);
    } else if d.outcome == admission::Outcome::Denied || d.response.warnings.is_some() {
        line!(info);
    } else {
        line!(debug);
    }
}

async fn validate(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    if let Some(refused) = not_a_review(&headers, &body) {
        state.metrics.admission("error", started.elapsed());
        return refused;
    }
    match admission::parse_review(&body) {
        Ok(req) => {
            let decision = admission::validate_templates(&req, &state.policy.names);
            state.metrics.admission(decision.outcome.as_str(), started.elapsed());
            if decision.outcome == admission::Outcome::Denied {
                tracing::info!(uid = %req.uid, namespace = req.namespace.as_deref().unwrap_or_default(), name = %req.name,
                    message = %decision.response.result.message, "template ConfigMap refused");
            }
            ([(header::CONTENT_TYPE, "application/json")], admission::response_body(&decision)).into_response()
        }
        Err(e) => {
            state.metrics.admission("error", started.elapsed());
            let uid = uid_of(&body).unwrap_or_default();
            tracing::warn!(uid = %uid, error = %e, "bad validation request");
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let stats = state.store.stats();
    let text = state.metrics.render(stats.templates, stats.errors, stats.stale);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

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

impl Connection {
    async fn run(self, tcp: tokio::net::TcpStream, peer: std::net::SocketAddr) {
        let Connection { acceptor, app, builder, limits, mut phase, metrics, _open } = self;
        let tls = tokio::select! {
            tls = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp)) => match tls {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    metrics.tls_handshake_failed();
                    return tracing::info!(%peer, error = %e, "TLS handshake failed");
                }
                // A client that connected and said nothing (a port probe, a slow client): counted,
                // but only worth a line at debug.
                Err(_) => {
                    metrics.tls_handshake_failed();
                    return tracing::debug!(%peer, "TLS handshake timed out");
                }
            },
            _ = phase.wait_for(|p| *p != Phase::Serving) => return,
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let activity = Activity::new(!h2);
        let io = TokioIo::new(Watched { inner: tls, activity: activity.clone() });
        let service = {
            let (activity, phase) = (activity.clone(), phase.clone());
            hyper::service::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
                activity.begin();
                let guard = InFlight(activity.clone());
                let (app, phase) = (app.clone(), phase.clone());
                async move {
                    let http1 = req.version() < axum::http::Version::HTTP_2;
                    let Ok(mut resp) = tower::ServiceExt::oneshot(app, req).await;
                    if http1 && *phase.borrow() != Phase::Serving {
                        // The client learns before the close that it must not reuse the
                        // connection; hyper closes it after this response.
                        resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
                    }
                    drop(guard);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            })
        };
        let conn = builder.serve_connection(io, service).into_owned();
        tokio::pin!(conn);
        let mut draining = *phase.borrow() != Phase::Serving;
        let mut closing = false;
        if draining && h2 {
            conn.as_mut().graceful_shutdown();
        }
        loop {
            // The next moment a timer may fire; re-checked often enough to see a request head
            // start while the connection idles.
            let idle_limit = if draining { DRAIN_IDLE_CLOSE } else { limits.keep_alive_timeout };
            let head_limit = limits.header_read_timeout;
            let recheck = (head_limit / 2).clamp(Duration::from_millis(20), Duration::from_secs(1));
            let recheck = if draining { recheck.min(DRAIN_IDLE_CLOSE / 4) } else { recheck };
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
                () = tokio::time::sleep(recheck) => {
                    if closing {
                        continue;
                    }
                    if let Some(pending) = activity.head_pending() {
                        if pending >= head_limit {
                            return tracing::debug!(%peer, "request head not received within the header read timeout");
                        }
                    } else if let Some(idle) = activity.idle() {
                        if !h2 && idle >= idle_limit {
                            // Idle HTTP/1.1: hyper closes it at once.
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        } else if h2 && !draining && idle >= limits.keep_alive_timeout {
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
