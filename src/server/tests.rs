use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::store::Catalog;

const SAMPLE: &str = include_str!("../../examples/reviews/flyte-task-pod.json");

fn state() -> Arc<AppState> {
    let mut c = Catalog::new("flyte");
    c.apply("flyte", "cm", Some("1"), &BTreeMap::from([("hello_world".into(), "labels: {a: b}".into())]));
    AppState::new(Arc::new(c.index()), Policy::default())
}

async fn call(app: Router, method: &str, uri: &str, body: impl Into<Body>) -> (StatusCode, String) {
    let req = Request::builder().method(method).uri(uri).header("content-type", "application/json").body(body.into()).unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn mutate_answers_a_review() {
    let app = webhook_router(state(), &Limits::default());
    let (status, body) = call(app, "POST", "/mutate", SAMPLE).await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"]["patch"].is_array());
}

#[tokio::test]
async fn body_over_the_cap_is_413() {
    let limits = Limits { max_body_bytes: 1024, ..Limits::default() };
    let app = webhook_router(state(), &limits);
    let (status, _) = call(app, "POST", "/mutate", vec![b' '; 2048]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn malformed_body_is_400_with_a_message_and_counted() {
    let st = state();
    let app = webhook_router(st.clone(), &Limits::default());
    let (status, body) = call(app, "POST", "/mutate", "{\"kind\": ").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("not a valid admission.k8s.io/v1 AdmissionReview"), "{body}");
    assert_eq!(st.metrics.admissions("error"), 1);
}

#[tokio::test]
async fn only_post_mutate_exists() {
    let app = webhook_router(state(), &Limits::default());
    assert_eq!(call(app.clone(), "GET", "/mutate", "").await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(call(app, "POST", "/other", SAMPLE).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn metrics_move_and_readiness_flips_when_draining() {
    let st = state();
    let webhook = webhook_router(st.clone(), &Limits::default());
    let admin = admin_router(st.clone());
    call(webhook.clone(), "POST", "/mutate", SAMPLE).await;
    call(webhook, "POST", "/mutate", SAMPLE).await;
    let (status, text) = call(admin.clone(), "GET", "/metrics", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("pod_template_webhook_admissions_total{result=\"mutated\"} 2"), "{text}");
    assert!(text.contains("pod_template_webhook_templates_loaded 1"), "{text}");
    assert_eq!(call(admin.clone(), "GET", "/healthz", "").await.0, StatusCode::OK);
    assert_eq!(call(admin.clone(), "GET", "/readyz", "").await.0, StatusCode::OK);
    st.draining.store(true, Ordering::Relaxed);
    assert_eq!(call(admin.clone(), "GET", "/readyz", "").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(call(admin, "GET", "/healthz", "").await.0, StatusCode::OK, "alive while draining");
}
