//! The API server goes away after the initial sync: the webhook stays ready, keeps answering from
//! its cache, and its watch resumes when the API server returns. Own API server: it is stopped.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, Patch, PatchParams, PostParams};
use pod_template_webhook::admission::Policy;
use pod_template_webhook::names::Names;
use pod_template_webhook::server::{self, AppState, Limits};
use pod_template_webhook::store::cluster::ClusterStore;
use pod_template_webhook::store::{EntryState, TemplateStore};
use serde_json::{json, Value};
use tower::ServiceExt;

const SAMPLE: &str = include_str!("../examples/reviews/flyte-task-pod.json");

async fn status(app: axum::Router, req: Request<Body>) -> (StatusCode, Vec<u8>) {
    let resp = app.oneshot(req).await.unwrap();
    let code = resp.status();
    (code, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
}

async fn readyz(state: &Arc<AppState>) -> StatusCode {
    status(server::admin_router(state.clone()), Request::get("/readyz").body(Body::empty()).unwrap()).await.0
}

async fn mutated_label(state: &Arc<AppState>) -> Option<String> {
    let req = Request::post("/mutate").header("content-type", "application/json").body(Body::from(SAMPLE)).unwrap();
    let (code, body) = status(server::webhook_router(state.clone(), &Limits::default()), req).await;
    assert_eq!(code, StatusCode::OK);
    let review: Value = serde_json::from_slice(&body).unwrap();
    use base64::Engine as _;
    let patch = base64::engine::general_purpose::STANDARD.decode(review["response"]["patch"].as_str()?).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod: Value = serde_json::from_str::<Value>(SAMPLE).unwrap()["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod["metadata"]["labels"]["generation"].as_str().map(str::to_owned)
}

fn version(store: &ClusterStore) -> Option<String> {
    match &store.lookup("flyte", "hello_world").entry?.state {
        EntryState::Ready(t) => t.labels.get("generation").cloned(),
        _ => None,
    }
}

#[test]
fn the_webhook_keeps_serving_while_the_api_server_is_away_and_resumes_after() {
    let mut api = support::ApiServer::start();
    // A current-thread runtime: the store's watch task cannot run before we first await, so the
    // "not ready before the initial list" observation below is deterministic.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let admin = api.client().await;
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "flyte"}})).unwrap();
        Api::<Namespace>::all(admin.clone()).create(&PostParams::default(), &ns).await.unwrap();
        let cms = Api::<ConfigMap>::namespaced(admin.clone(), "flyte");
        let cm = |generation: &str| -> ConfigMap {
            serde_json::from_value(json!({
                "metadata": {"name": "platform", "labels": {"flyte.org/pod-templates": "true"}},
                "data": BTreeMap::from([("hello_world", format!("labels: {{generation: {generation}}}"))]),
            }))
            .unwrap()
        };
        cms.create(&PostParams::default(), &cm("one")).await.unwrap();

        let metrics = std::sync::Arc::new(pod_template_webhook::metrics::Metrics::default());
        let store = ClusterStore::spawn(api.client().await, Names::default(), &[], metrics.clone());
        let state = AppState::new(store.clone(), Policy::default());
        assert_eq!(readyz(&state).await, StatusCode::SERVICE_UNAVAILABLE, "not ready before the initial list");
        let deadline = Instant::now() + Duration::from_secs(30);
        while readyz(&state).await != StatusCode::OK {
            assert!(Instant::now() < deadline, "never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(mutated_label(&state).await.as_deref(), Some("one"));

        api.stop_apiserver();
        // The watch notices the outage (and backs off): wait for that, not for a time.
        let errors_before = metrics.template_watch_errors();
        let deadline = Instant::now() + Duration::from_secs(60);
        while metrics.template_watch_errors() == errors_before {
            assert!(Instant::now() < deadline, "the watch never noticed the API server was gone");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(readyz(&state).await, StatusCode::OK, "still ready with the API server gone");
        assert_eq!(mutated_label(&state).await.as_deref(), Some("one"), "answers from the cache");

        api.restart_apiserver();
        let admin = api.client().await;
        Api::<ConfigMap>::namespaced(admin, "flyte")
            .patch(
                "platform",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"hello_world": "labels: {generation: two}"}})),
            )
            .await
            .unwrap();
        let started = Instant::now();
        while version(&store).as_deref() != Some("two") {
            assert!(started.elapsed() < Duration::from_secs(60), "the watch did not resume");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("watch resumed; update seen {:?} after the API server came back", started.elapsed());
        assert_eq!(mutated_label(&state).await.as_deref(), Some("two"));
    });
}
