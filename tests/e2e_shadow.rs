//! Shadow templates (SPEC §10) end to end: the real kube-apiserver, the chart's own rendered
//! MutatingWebhookConfiguration, templates from a watch. A shadow source leaves pods as they
//! were and says what it would change (the API server's `Warning` headers, the metric); a broken
//! one never denies; removing the annotation applies it from the next pod.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http;
use http_body_util::BodyExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use pod_template_webhook::admission::Policy;
use pod_template_webhook::metrics::Metrics;
use pod_template_webhook::names::Names;
use pod_template_webhook::server::AppState;
use pod_template_webhook::store::cluster::ClusterStore;
use pod_template_webhook::store::TemplateStore;
use serde_json::{json, Value};

const PLATFORM: &str = "flyte";
const TEAM: &str = "ml";
const MODE: &str = "flyte.org/pod-template-mode";
const LIMIT: Duration = Duration::from_secs(20);

struct Fixture {
    kubeconfig: std::path::PathBuf,
    state: Arc<AppState>,
}

async fn start(api: &support::ApiServer) -> Fixture {
    let admin = api.client().await;
    for ns in [PLATFORM, TEAM] {
        support::ensure_namespace(&admin, ns, json!({})).await;
    }
    let names = Names::default();
    let store = ClusterStore::spawn(admin.clone(), names.clone(), &[], Default::default());
    let state =
        AppState::with_metrics(store.clone(), Policy { names, ..Policy::default() }, Arc::new(Metrics::default()));
    support::wait_for("the store syncs", Duration::from_secs(30), || store.is_ready()).await;
    let pki = support::TestPki::new("ptw-shadow-ca");
    let webhook = support::serve_webhook(state.clone(), &pki).await;
    let config = support::chart_mutating_webhook(webhook.port, &pki.ca_pem, &[]);
    Api::<MutatingWebhookConfiguration>::all(admin).create(&PostParams::default(), &config).await.unwrap();
    Fixture { kubeconfig: api.kubeconfig.clone(), state }
}

fn config_map(name: &str, mode: Option<&str>, key: &str, text: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"flyte.org/pod-templates": "true"},
                     "annotations": mode.map(|m| json!({MODE: m})).unwrap_or(json!({}))},
        "data": {key: text},
    }))
    .unwrap()
}

/// Creates pod `name` with environment `env` in the team namespace through the API server, as
/// `kubectl` would, and returns the stored pod and the API server's `Warning` headers.
async fn create(admin: &kube::Client, name: &str, env: &str) -> (Value, Vec<String>) {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"flyte.org/environment": env}},
        "spec": {"containers": [{"name": "primary", "image": "busybox", "env": [{"name": "OWN", "value": "pod"}]}]},
    });
    let request = http::Request::post(format!("/api/v1/namespaces/{TEAM}/pods"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(kube::client::Body::from(serde_json::to_vec(&pod).unwrap()))
        .unwrap();
    let response = admin.send(request).await.unwrap();
    let warnings = response.headers().get_all("warning").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&body));
    (serde_json::from_slice(&body).unwrap(), warnings)
}

/// Waits until the webhook holds `key` of `config_map` (at its version) as a shadow template.
async fn shadow_loaded(store: &dyn TemplateStore, key: &str, config_map: &ConfigMap) {
    let version = config_map.resource_version();
    support::wait_for("the shadow is loaded", LIMIT, || {
        store.lookup_shadow(TEAM, key).is_some_and(|e| Some(&e.source.version) == version.as_ref())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_templates_through_the_api_server() {
    let fixture = support::fixture("e2e-shadow", |api, rt| rt.block_on(start(api)));
    let admin = support::kubeconfig_client(&fixture.kubeconfig).await;
    let store = fixture.state.store.clone();
    let platform = Api::<ConfigMap>::namespaced(admin.clone(), PLATFORM);
    let team = Api::<ConfigMap>::namespaced(admin.clone(), TEAM);
    let pp = PostParams::default();

    // The platform's template applies; the team tries its own version of it in shadow.
    let base = platform.create(&pp, &config_map("base", None, "gpu", "labels: {team: ml}")).await.unwrap();
    let next = "labels: {team: ml}\npodSpec:\n  nodeSelector: {gpu: a100}\n  containers:\n  - {name: primary, env: [{name: TZ, value: UTC}]}\n";
    let next = team.create(&pp, &config_map("gpu-next", Some("shadow"), "gpu", next)).await.unwrap();
    shadow_loaded(&*store, "gpu", &next).await;
    let (pod, warnings) = create(&admin, "tried", "gpu").await;
    let applied = pod["metadata"]["annotations"]["flyte.org/pod-template-applied"].as_str().unwrap();
    assert_eq!(applied, format!("flyte/base/gpu@{}", base.resource_version().unwrap()), "only the enforced layer");
    assert_eq!(pod["metadata"]["labels"]["team"], "ml");
    assert!(pod["spec"].get("nodeSelector").is_none(), "the shadow is never applied: {pod}");
    assert_eq!(pod["spec"]["containers"][0]["env"], json!([{"name": "OWN", "value": "pod"}]));
    let said = "shadow: ml/gpu-next/gpu would change 2 fields: /spec/containers/0/env/0, /spec/nodeSelector";
    assert!(warnings.iter().any(|w| w.contains(said)), "{warnings:?}");
    let metrics = fixture.state.metrics.render(0, 0, 0);
    assert!(
        metrics.contains("pod_template_webhook_shadow_total{template=\"gpu\",result=\"would_change\"} 1"),
        "{metrics}"
    );

    // A broken shadow template never denies, whatever the policy says of broken templates.
    let etl = team.create(&pp, &config_map("etl-next", Some("shadow"), "etl", "podSpec: [")).await.unwrap();
    shadow_loaded(&*store, "etl", &etl).await;
    let (pod, warnings) = create(&admin, "etl", "etl").await;
    assert!(pod["metadata"]["annotations"].get("flyte.org/pod-template-applied").is_none(), "{pod}");
    assert!(
        warnings.iter().any(|w| w.contains("shadow: ml/etl-next/etl does not parse: ConfigMap ml/etl-next key")),
        "{warnings:?}"
    );

    // Enforced: from the next pod on (the watch's delay measured, within §10's 2 s).
    let switched = Instant::now();
    let patch = json!({"metadata": {"annotations": {MODE: "enforce"}}});
    let enforced = team.patch("gpu-next", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let version = enforced.resource_version().unwrap();
    let took = support::wait_for("the enforced template serves", LIMIT, || {
        store.lookup(TEAM, "gpu").entry.is_some_and(|e| e.source.version == version)
    })
    .await;
    eprintln!("shadow → enforce served after {:?} (patch to index: {took:?})", switched.elapsed());
    assert!(switched.elapsed() < Duration::from_secs(2), "{:?}", switched.elapsed());
    let (pod, warnings) = create(&admin, "enforced", "gpu").await;
    assert_eq!(pod["metadata"]["annotations"]["flyte.org/pod-template-applied"], format!("ml/gpu-next/gpu@{version}"));
    assert_eq!(pod["spec"]["nodeSelector"]["gpu"], "a100");
    assert!(!warnings.iter().any(|w| w.contains("shadow:")), "{warnings:?}");
}
