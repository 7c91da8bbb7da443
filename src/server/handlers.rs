//! The request handlers: `POST /mutate` and `/validate` (review in, the admission module's
//! answer out), and the admin endpoints. Thin: everything they decide is `admission`'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::admission::{self, Decision};

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

pub(super) async fn mutate(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
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
    let decided = catch_panic(|| {
        let decision = admission::parse_review(&body).and_then(|req| {
            span.record("uid", display(&req.uid));
            uid = Some(req.uid.clone());
            admission::mutate(req, &*state.store, &state.policy)
        })?;
        let body = admission::response_body(&decision);
        Ok::<_, admission::BadReview>((decision, body))
    });
    let decision = match decided {
        Ok(decision) => decision,
        Err(panic) => {
            span.record("result", "error");
            return panicked(&state, started, uid.or_else(|| uid_of(&body)), "admission", &panic);
        }
    };
    match decision {
        Ok((decision, body)) => {
            span.record("namespace", display(&decision.namespace));
            span.record("pod", display(&decision.pod));
            span.record("template", display(decision.template.as_deref().unwrap_or_default()));
            span.record("result", decision.outcome.as_str());
            let took = started.elapsed();
            state.metrics.admission(decision.outcome.as_str(), took);
            state.metrics.count_templates(&decision);
            for shadow in &decision.shadows {
                // Only names of shadow templates that exist get here: bounded like the above.
                state.metrics.shadows.count(&shadow.key, shadow.result(), |_| true);
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

/// Runs the synchronous part of a handler (parse, decide, encode), a panic in it turned into its
/// message: a bug of ours fails that one request (500), not the connection it came on, whose
/// task would otherwise end with it, nor the requests after it. The release profile unwinds.
fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let text = payload.downcast_ref::<&str>().map(|s| s.to_string());
        text.or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(no message)".to_owned())
    })
}

/// The answer to a request whose handler panicked: counted (a panic, and an admission with
/// result `error`), logged at error with the request's uid, answered 500. The panic's own
/// message stays in the log (the default panic hook also prints where it happened).
fn panicked(state: &AppState, started: Instant, uid: Option<String>, what: &str, panic: &str) -> Response {
    let uid = uid.unwrap_or_default();
    state.metrics.handler_panicked();
    state.metrics.admission("error", started.elapsed());
    tracing::error!(uid = %uid, panic, "{what} handler panicked (a bug in the webhook); answered 500");
    let message =
        format!("internal error of the webhook on request {uid:?} (a bug: see its log); nothing was decided\n");
    (StatusCode::INTERNAL_SERVER_ERROR, message).into_response()
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

pub(super) async fn validate(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    if let Some(refused) = not_a_review(&headers, &body) {
        state.metrics.admission("error", started.elapsed());
        return refused;
    }
    let mut uid = None;
    let decided = catch_panic(|| {
        let req = admission::parse_review(&body)?;
        uid = Some(req.uid.clone());
        let decision = admission::validate_templates(&req, &state.policy.names);
        let body = admission::response_body(&decision);
        Ok::<_, admission::BadReview>((req, decision, body))
    });
    let decided = match decided {
        Ok(decided) => decided,
        Err(panic) => return panicked(&state, started, uid.or_else(|| uid_of(&body)), "validation", &panic),
    };
    match decided {
        Ok((req, decision, body)) => {
            state.metrics.admission(decision.outcome.as_str(), started.elapsed());
            if decision.outcome == admission::Outcome::Denied {
                tracing::info!(uid = %req.uid, namespace = req.namespace.as_deref().unwrap_or_default(), name = %req.name,
                    message = %decision.response.result.message, "template ConfigMap refused");
            }
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => {
            state.metrics.admission("error", started.elapsed());
            let uid = uid_of(&body).unwrap_or_default();
            tracing::warn!(uid = %uid, error = %e, "bad validation request");
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
    }
}

pub(super) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let stats = state.store.stats();
    let text = state.metrics.render(stats.templates, stats.errors, stats.stale);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(feature = "noop-handler")]
mod noop {
    use super::*;

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
    /// `noop_router`'s handler: `allowed`, the uid echoed, nothing else read.
    pub(in crate::server) async fn noop_allow(body: Bytes) -> Response {
        match serde_json::from_slice::<Review<'_>>(&body) {
            Ok(Review { request: Some(Uid { uid }) }) => {
                let review = serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "response": {"uid": uid, "allowed": true}});
                ([(header::CONTENT_TYPE, "application/json")], review.to_string()).into_response()
            }
            _ => (StatusCode::BAD_REQUEST, "no request.uid\n").into_response(),
        }
    }
}
#[cfg(feature = "noop-handler")]
pub(super) use noop::noop_allow;
