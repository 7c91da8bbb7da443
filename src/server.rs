//! HTTP: the TLS webhook endpoint (`POST /mutate`) and the plain admin endpoint (`/healthz`,
//! `/readyz`, `/metrics`): the state, limits and routers here; the handlers in `handlers`, TLS
//! connections and the graceful drain in `connection`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::{BoxError, ServiceBuilder};

use crate::admission::Policy;
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

mod connection;
mod handlers;

pub use connection::{serve_tls, DRAIN_IDLE_CLOSE};
pub use handlers::log_decision;
use handlers::{metrics, mutate, readyz, validate};

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
    Router::new().route("/mutate", post(handlers::noop_allow)).layer(DefaultBodyLimit::max(limits.max_body_bytes))
}

/// The admin routes (plain HTTP).
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

#[cfg(test)]
mod tests;
