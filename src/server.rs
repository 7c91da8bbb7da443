//! HTTP: the TLS webhook endpoint (`POST /mutate`) and the plain admin endpoint (`/healthz`,
//! `/readyz`, `/metrics`), connection handling and graceful drain.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
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
        self.store.is_ready() && self.certificate_ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Relaxed)
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 3 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(20),
            max_concurrent_requests: 1024,
            request_timeout: Duration::from_secs(4),
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

/// A baseline for load tests only (`serve --noop-handler`): answers `allowed` without reading
/// the review, so the TLS and HTTP stack can be measured alone.
pub fn noop_router(limits: &Limits) -> Router {
    const ALLOWED: &str = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"","allowed":true}}"#;
    Router::new()
        .route("/mutate", post(|_: Bytes| async { ([(header::CONTENT_TYPE, "application/json")], ALLOWED) }))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
}

/// The admin routes (plain HTTP).
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn mutate(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let started = Instant::now();
    let decision = admission::parse_review(&body).and_then(|req| admission::mutate(req, &*state.store, &state.policy));
    match decision {
        Ok(decision) => {
            let body = admission::response_body(&decision);
            let took = started.elapsed();
            state.metrics.admission(decision.outcome.as_str(), took);
            log_decision(&decision, took);
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => {
            state.metrics.admission("error", started.elapsed());
            tracing::warn!(error = %e, "bad admission request");
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
    }
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
    if d.outcome == admission::Outcome::Denied || d.response.warnings.is_some() {
        line!(info);
    } else {
        line!(debug);
    }
}

async fn validate(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let started = Instant::now();
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
    let text = state.metrics.render(state.store.stats());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves, then stops accepting and lets
/// in-flight requests finish for up to `limits.drain_timeout`.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Duration::from_secs(30));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
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
        let (acceptor, app, builder) = (acceptor.clone(), app.clone(), builder.clone());
        let watcher = graceful.watcher();
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let service = TowerToHyperService::new(app);
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("draining in-flight requests");
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(timeout = ?limits.drain_timeout, "drain timeout reached; closing remaining connections");
    }
}

#[cfg(test)]
mod tests;
