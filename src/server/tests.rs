use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;

use axum::body::Body;
use axum::body::Bytes;
use axum::http::Request;
use http_body_util::BodyExt;
use std::time::{Duration, Instant};
use tower::ServiceExt;

use super::*;
use crate::store::{Catalog, Lookup, Snapshot, StoreStats, TemplateEntry, TemplateIndex};

const SAMPLE: &str = include_str!("../../examples/reviews/flyte-task-pod.json");

fn index() -> TemplateIndex {
    let mut c = Catalog::new("flyte");
    c.apply("flyte", "cm", Some("1"), &BTreeMap::from([("hello_world".into(), "labels: {a: b}".into())]));
    c.index()
}

fn state() -> Arc<AppState> {
    AppState::new(Arc::new(index()), Policy::default())
}

/// The templates of [`index`] in a store that panics on its first `panics` snapshots (a bug in
/// the admission path, injected with no product code for it) and counts the lookups made
/// outside an admission's snapshot.
#[derive(Default)]
struct Faulty {
    index: TemplateIndex,
    panics: AtomicUsize,
    lookups: AtomicUsize,
}

impl TemplateStore for Faulty {
    fn lookup(&self, namespace: &str, name: &str) -> Lookup {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        self.index.lookup(namespace, name)
    }
    fn lookup_shadow(&self, namespace: &str, name: &str) -> Option<Arc<TemplateEntry>> {
        self.index.lookup_shadow(namespace, name)
    }
    fn snapshot(&self) -> Snapshot<'_> {
        if self.panics.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
            panic!("injected: the store failed");
        }
        Snapshot::Fixed(&self.index)
    }
    fn is_ready(&self) -> bool {
        true
    }
    fn stats(&self) -> StoreStats {
        self.index.stats()
    }
}

fn faulty(panics: usize) -> Arc<Faulty> {
    Arc::new(Faulty { index: index(), panics: panics.into(), ..Faulty::default() })
}

async fn call(app: Router, method: &str, uri: &str, body: impl Into<Body>) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap();
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
    assert!(v["response"]["patch"].is_string(), "base64, as Kubernetes encodes []byte: {v}");
}

/// `cargo test --features noop-handler`: the load-test baseline echoes the uid (an API server
/// refuses an answer without it) and refuses a body without one.
#[cfg(feature = "noop-handler")]
#[tokio::test]
async fn the_noop_handler_echoes_the_uid() {
    let (status, body) = call(noop_router(&Limits::default()), "POST", "/mutate", SAMPLE).await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sent: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
    assert_eq!(v["response"]["uid"], sent["request"]["uid"]);
    assert!(!v["response"]["uid"].as_str().unwrap().is_empty());
    assert_eq!((v["response"]["allowed"].clone(), v["response"].get("patch")), (true.into(), None));
    let (status, _) = call(noop_router(&Limits::default()), "POST", "/mutate", "{}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// What a test subscriber wrote, shared with the writer it hands out.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `f` with a debug-level subscriber on this thread; returns what it logged (no colours).
async fn logged<F: std::future::Future<Output = ()>>(f: F) -> String {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    f.await;
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    text
}

#[tokio::test]
async fn each_admission_has_a_span_with_its_fields_and_errors_name_the_uid() {
    let text = logged(async {
        call(webhook_router(state(), &Limits::default()), "POST", "/mutate", SAMPLE).await;
    })
    .await;
    let sent: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
    let uid = sent["request"]["uid"].as_str().unwrap();
    let line =
        text.lines().find(|l| l.contains("admission{")).unwrap_or_else(|| panic!("a span named admission: {text}"));
    let span = &line[line.find("admission{").unwrap()..line.find("}:").unwrap()];
    let fields = [
        format!("uid={uid}"),
        "namespace=flytesnacks-development".into(),
        "pod=r7x2k9qp-a0-0".into(),
        "template=hello_world".into(),
        "result=\"mutated\"".into(),
    ];
    for field in fields {
        assert!(span.contains(&field), "{field} not in the span {span}");
    }

    // Refused as a whole (a pod nested 200 levels deep): the warning still names the uid.
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let body = SAMPLE.replacen("\"spec\": {", &format!("\"spec\": {{\"x\": {deep}, "), 1);
    let text = logged(async {
        let (status, _) = call(webhook_router(state(), &Limits::default()), "POST", "/mutate", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    })
    .await;
    let line = text.lines().find(|l| l.contains("bad admission request")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(&format!("uid={uid}")) && line.contains("result=\"error\""), "{line}");
}

#[tokio::test]
async fn a_panic_in_the_handler_is_a_500_counted_and_logged_with_the_uid_and_the_next_request_is_served() {
    let st = AppState::new(faulty(1), Policy::default());
    let app = webhook_router(st.clone(), &Limits::default());
    let uid = serde_json::from_str::<serde_json::Value>(SAMPLE).unwrap()["request"]["uid"].as_str().unwrap().to_owned();
    let text = logged(async {
        let (status, body) = call(app.clone(), "POST", "/mutate", SAMPLE).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        assert!(body.contains("internal error of the webhook") && body.contains(&uid), "{body}");
    })
    .await;
    let line = text.lines().find(|l| l.contains("handler panicked")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("ERROR") && line.contains(&format!("uid={uid}")), "{line}");
    assert!(line.contains("injected: the store failed"), "the panic's message: {line}");
    assert_eq!((st.metrics.handler_panics(), st.metrics.admissions("error")), (1, 1));
    let metrics = call(admin_router(st.clone()), "GET", "/metrics", "").await.1;
    assert!(metrics.contains("pod_template_webhook_handler_panics_total 1\n"), "{metrics}");

    let (status, body) = call(app, "POST", "/mutate", SAMPLE).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"patch\""), "{body}");
    assert_eq!((st.metrics.handler_panics(), st.metrics.admissions("mutated")), (1, 1));
}

#[tokio::test]
async fn the_per_template_counter_needs_no_lookup_and_keeps_its_series_across_template_versions() {
    let store = faulty(0);
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let app =
        webhook_router(AppState::with_metrics(store.clone(), Policy::default(), metrics.clone()), &Limits::default());
    assert_eq!(call(app.clone(), "POST", "/mutate", SAMPLE).await.0, StatusCode::OK);
    // Two names, the first no template (denied): it counts as `other`, the second as itself.
    let two = SAMPLE.replacen(
        "\"annotations\": {",
        "\"annotations\": {\"flyte.org/pod-template\": \"nope, hello_world\", ",
        1,
    );
    assert_eq!(call(app, "POST", "/mutate", two).await.0, StatusCode::OK);
    assert_eq!(store.lookups.load(Ordering::Relaxed), 0, "the handler counted with the admission's own lookups");
    // The template updated: a new entry, the same series.
    let mut c = Catalog::new("flyte");
    c.apply("flyte", "cm", Some("2"), &BTreeMap::from([("hello_world".into(), "labels: {a: c}".into())]));
    let app = webhook_router(
        AppState::with_metrics(Arc::new(c.index()), Policy::default(), metrics.clone()),
        &Limits::default(),
    );
    assert_eq!(call(app, "POST", "/mutate", SAMPLE).await.0, StatusCode::OK);
    let text = metrics.render(0, 0, 0);
    let series: Vec<&str> =
        text.lines().filter(|l| l.starts_with("pod_template_webhook_template_admissions_total{")).collect();
    assert_eq!(
        series,
        [
            "pod_template_webhook_template_admissions_total{template=\"hello_world\",result=\"mutated\"} 2",
            "pod_template_webhook_template_admissions_total{template=\"hello_world\",result=\"denied\"} 1",
            "pod_template_webhook_template_admissions_total{template=\"other\",result=\"denied\"} 1",
        ]
    );
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
async fn another_content_type_is_415_and_an_empty_body_400() {
    let st = state();
    let app = webhook_router(st.clone(), &Limits::default());
    for (path, content_type, body, status, says) in [
        ("/mutate", Some("text/plain"), SAMPLE, StatusCode::UNSUPPORTED_MEDIA_TYPE, "application/json"),
        ("/validate", Some("application/yaml"), SAMPLE, StatusCode::UNSUPPORTED_MEDIA_TYPE, "application/json"),
        ("/mutate", Some("application/json"), "", StatusCode::BAD_REQUEST, "empty request body"),
        ("/validate", None, "", StatusCode::BAD_REQUEST, "empty request body"),
        ("/mutate", Some("Application/JSON; charset=utf-8"), SAMPLE, StatusCode::OK, "\"allowed\":true"),
        ("/mutate", None, SAMPLE, StatusCode::OK, "\"allowed\":true"),
    ] {
        let mut req = Request::builder().method("POST").uri(path);
        if let Some(content_type) = content_type {
            req = req.header("content-type", content_type);
        }
        let resp = app.clone().oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
        let got = resp.status();
        let text = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
        assert_eq!(got, status, "{path} {content_type:?}: {text}");
        assert!(text.contains(says), "{path} {content_type:?}: {text}");
    }
    assert_eq!(st.metrics.admissions("error"), 4, "refusals are counted");
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

/// A request whose body never ends: it holds its slot until dropped.
fn stalled_request() -> (Request<Body>, tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let req = Request::post("/mutate").body(Body::from_stream(stream)).unwrap();
    (req, tx)
}

#[tokio::test]
async fn requests_over_the_concurrency_bound_get_503_at_once() {
    let limits = Limits { max_concurrent_requests: 1, ..Limits::default() };
    let app = webhook_router(state(), &limits);
    let (held, _tx) = stalled_request();
    let first = tokio::spawn(app.clone().oneshot(held));
    // Until the stalled request holds the one slot, others still pass: wait for the first 503.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body, took) = loop {
        let started = Instant::now();
        let (status, body) = call(app.clone(), "POST", "/mutate", SAMPLE).await;
        if status != StatusCode::OK || Instant::now() > deadline {
            break (status, body, started.elapsed());
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("too many concurrent requests"), "{body}");
    assert!(took < Duration::from_secs(1), "refused without queueing");
    first.abort();
    let _ = first.await;
    assert_eq!(call(app, "POST", "/mutate", SAMPLE).await.0, StatusCode::OK, "the slot is free again");
}

#[tokio::test]
async fn a_request_slower_than_the_timeout_is_answered_408() {
    let limits = Limits { request_timeout: Duration::from_millis(200), ..Limits::default() };
    let app = webhook_router(state(), &limits);
    let (req, _tx) = stalled_request();
    let started = Instant::now();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(2));
}

fn config_map_review(operation: &str, labels: serde_json::Value, data: serde_json::Value) -> String {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "cm-1", "operation": operation, "namespace": "team", "name": "tpl", "userInfo": {},
            "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
            "resource": {"group": "", "version": "v1", "resource": "configmaps"},
            "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tpl", "namespace": "team", "labels": labels}, "data": data}
        }
    })
    .to_string()
}

#[tokio::test]
async fn validate_refuses_labelled_config_maps_whose_templates_do_not_parse() {
    let app = webhook_router(state(), &Limits::default());
    let labelled = serde_json::json!({"flyte.org/pod-templates": "true"});
    let broken = serde_json::json!({"good": "labels: {a: b}", "bad": "podspec: {}"});
    for op in ["CREATE", "UPDATE"] {
        let (status, body) =
            call(app.clone(), "POST", "/validate", config_map_review(op, labelled.clone(), broken.clone())).await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["response"]["allowed"], false, "{op}");
        let msg = v["response"]["status"]["message"].as_str().unwrap();
        assert!(
            msg.contains("team/tpl") && msg.contains("key \"bad\"") && msg.contains("unknown field `podspec`"),
            "{msg}"
        );
        assert!(!msg.contains("\"good\""), "{msg}");
    }
    let ok = config_map_review("CREATE", labelled.clone(), serde_json::json!({"good": "labels: {a: b}"}));
    let v: serde_json::Value = serde_json::from_str(&call(app.clone(), "POST", "/validate", ok).await.1).unwrap();
    assert_eq!(v["response"]["allowed"], true);
    let unlabelled = config_map_review("CREATE", serde_json::json!({}), broken.clone());
    let v: serde_json::Value =
        serde_json::from_str(&call(app.clone(), "POST", "/validate", unlabelled).await.1).unwrap();
    assert_eq!(v["response"]["allowed"], true, "only template sources are checked");
    let delete = config_map_review("DELETE", labelled, broken);
    let v: serde_json::Value = serde_json::from_str(&call(app, "POST", "/validate", delete).await.1).unwrap();
    assert_eq!(v["response"]["allowed"], true, "a broken ConfigMap can always be deleted");
}
