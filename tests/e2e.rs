//! End-to-end against the real kube-apiserver (SPEC §7): the API server calls the webhook over
//! TLS with the caBundle, and the webhook reads its templates through the API server.
//!
//! One API server and one webhook serve every test of this file; each test works in namespaces
//! of its own. The fixture lives on a dedicated thread so that the processes outlive single tests
//! and die with the test process.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::ResourceExt;
use pod_template_webhook::admission::Policy;
use pod_template_webhook::names::Names;
use pod_template_webhook::server::{self, AppState};
use pod_template_webhook::store::cluster::ClusterStore;
use pod_template_webhook::store::TemplateStore;
use serde_json::{json, Value};
use support::ApiServer;

const PLATFORM: &str = "flyte";

struct Env {
    kubeconfig: std::path::PathBuf,
    state: Arc<AppState>,
    /// Requests the webhook's own Kubernetes client has sent.
    api_calls: Arc<AtomicUsize>,
    /// The endpoint the API server calls; counts reviews by namespace.
    webhook: support::Webhook,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| support::fixture("e2e-fixture", |api, rt| rt.block_on(start_webhook(api))))
}

async fn start_webhook(api: &ApiServer) -> Env {
    let api_calls = Arc::new(AtomicUsize::new(0));
    let counter = api_calls.clone();
    // Events (published for broken templates) are not template reads; everything else counts.
    let count = tower::util::MapRequestLayer::new(move |req: axum::http::Request<kube::client::Body>| {
        if !req.uri().path().contains("/events") {
            counter.fetch_add(1, Ordering::SeqCst);
        }
        req
    });
    let client = kube::client::ClientBuilder::try_from(api.config().await).unwrap().with_layer(&count).build();
    let admin = api.client().await;
    ensure_namespace(&admin, PLATFORM).await;

    let names = Names::default();
    let store = ClusterStore::spawn(client, names.clone(), &[], Default::default());
    let state = AppState::new(store.clone(), Policy { names, ..Policy::default() });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !store.is_ready() {
        assert!(Instant::now() < deadline, "the cluster store never synced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pki = support::TestPki::new("ptw-webhook-ca");
    let webhook = support::serve_webhook(state.clone(), &pki).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], webhook.port));
    let config = support::mutating_webhook(addr.port(), &pki.ca_pem);
    Api::<MutatingWebhookConfiguration>::all(admin.clone()).create(&PostParams::default(), &config).await.unwrap();
    let validating = support::validating_webhook(addr.port(), &pki.ca_pem, &["configmaps"]);
    Api::<ValidatingWebhookConfiguration>::all(admin).create(&PostParams::default(), &validating).await.unwrap();
    Env { kubeconfig: api.kubeconfig.clone(), state, api_calls, webhook }
}

async fn client() -> kube::Client {
    support::kubeconfig_client(&env().kubeconfig).await
}

async fn ensure_namespace(c: &kube::Client, name: &str) {
    support::ensure_namespace(c, name, json!({})).await
}

/// A fresh namespace for one test.
async fn namespace(c: &kube::Client, prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    ensure_namespace(c, &name).await;
    name
}

/// Creates or replaces a template ConfigMap and waits until the webhook serves its new version;
/// returns how long that took.
async fn apply_templates(c: &kube::Client, ns: &str, name: &str, data: &[(&str, &str)]) -> Duration {
    let api = Api::<ConfigMap>::namespaced(c.clone(), ns);
    let mut cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"flyte.org/pod-templates": "true"}},
        "data": data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
    }))
    .unwrap();
    let started = Instant::now();
    let stored = match api.get_opt(name).await.unwrap() {
        Some(old) => {
            cm.metadata.resource_version = old.resource_version();
            api.replace(name, &PostParams::default(), &cm).await.unwrap()
        }
        None => api.create(&PostParams::default(), &cm).await.unwrap(),
    };
    let version = stored.resource_version().unwrap();
    let key = data[0].0;
    support::wait_for("the webhook serves the new version", Duration::from_secs(10), || {
        env().state.store.lookup(ns, key).entry.is_some_and(|e| match &e.state {
            pod_template_webhook::store::EntryState::Stale { broken_version, .. } => *broken_version == version,
            _ => e.source.version == version,
        })
    })
    .await;
    started.elapsed()
}

fn pod(name: &str, labels: Value, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "primary", "image": "registry.example/task:1.0",
                                  "env": [{"name": "MINE", "value": "pod"}]}]}
    }))
    .unwrap()
}

fn env_pod(name: &str, environment: &str) -> Pod {
    pod(name, json!({"flyte.org/environment": environment}), json!({}))
}

fn reviews_in(ns: &str) -> usize {
    env().webhook.reviews_in(ns)
}

const RICH: &str = r#"
labels: {team: ml}
annotations: {cost-center: "42"}
podSpec:
  imagePullSecrets: [{name: regcred}]
  volumes: [{name: cache, emptyDir: {}}]
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  containers:
  - name: primary
    env: [{name: hello, value: world}, {name: MINE, value: template}]
    volumeMounts: [{name: cache, mountPath: /cache}]
"#;

#[tokio::test]
async fn pods_get_their_template_through_the_real_api_server() {
    let c = client().await;
    let ns = namespace(&c, "rich").await;
    apply_templates(&c, &ns, "templates", &[("rich", RICH)]).await;
    let pods = Api::<Pod>::namespaced(c.clone(), &ns);
    let created = pods.create(&PostParams::default(), &env_pod("p1", "rich")).await.unwrap();
    let stored = pods.get("p1").await.unwrap();
    assert_eq!(created.spec, stored.spec);
    let labels = stored.labels();
    assert_eq!(labels["team"], "ml");
    assert_eq!(stored.annotations()["cost-center"], "42");
    let applied = &stored.annotations()["flyte.org/pod-template-applied"];
    assert!(applied.starts_with(&format!("{ns}/templates/rich@")), "{applied}");
    let spec = stored.spec.unwrap();
    let primary = &spec.containers[0];
    let env: Vec<(String, String)> =
        primary.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect();
    assert_eq!(
        env,
        [("hello".into(), "world".into()), ("MINE".into(), "pod".into())],
        "the pod's own value wins, once"
    );
    assert_eq!(primary.volume_mounts.as_ref().unwrap().iter().filter(|m| m.mount_path == "/cache").count(), 1);
    assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "regcred");
    assert!(spec.volumes.unwrap().iter().any(|v| v.name == "cache"));
    let tolerations = spec.tolerations.unwrap();
    assert!(tolerations.iter().any(|t| t.key.as_deref() == Some("nvidia.com/gpu")), "{tolerations:?}");
    assert_eq!(reviews_in(&ns), 1, "reinvocation is not needed when no other webhook changed the pod");
}

#[tokio::test]
async fn a_pod_without_the_label_is_untouched_and_never_sent() {
    let c = client().await;
    let ns = namespace(&c, "nolabel").await;
    apply_templates(&c, &ns, "templates", &[("rich", RICH)]).await;
    let pods = Api::<Pod>::namespaced(c.clone(), &ns);
    let plain = pods.create(&PostParams::default(), &pod("plain", json!({"app": "x"}), json!({}))).await.unwrap();
    assert!(!plain.annotations().contains_key("flyte.org/pod-template-applied"));
    assert_eq!(plain.spec.unwrap().containers[0].env.as_ref().unwrap().len(), 1);
    assert_eq!(reviews_in(&ns), 0, "the objectSelector keeps unlabelled pods away from the webhook");
    pods.create(&PostParams::default(), &env_pod("labelled", "rich")).await.unwrap();
    assert_eq!(reviews_in(&ns), 1);
}

#[tokio::test]
async fn template_updates_apply_to_the_next_pod_and_deletes_remove_it() {
    let c = client().await;
    let ns = namespace(&c, "update").await;
    apply_templates(&c, &ns, "templates", &[("t", "labels: {version: one}")]).await;
    let pods = Api::<Pod>::namespaced(c.clone(), &ns);
    let first = pods.create(&PostParams::default(), &env_pod("a", "t")).await.unwrap();
    assert_eq!(first.labels()["version"], "one");

    let delay = apply_templates(&c, &ns, "templates", &[("t", "labels: {version: two}")]).await;
    eprintln!("template update visible to the webhook after {delay:?}");
    assert!(delay < Duration::from_secs(2), "{delay:?}");
    let second = pods.create(&PostParams::default(), &env_pod("b", "t")).await.unwrap();
    assert_eq!(second.labels()["version"], "two");

    // A broken update keeps the last good version serving.
    apply_templates(&c, &ns, "templates", &[("t", "labels: [")]).await;
    let third = pods.create(&PostParams::default(), &env_pod("c", "t")).await.unwrap();
    assert_eq!(third.labels()["version"], "two");

    Api::<ConfigMap>::namespaced(c.clone(), &ns).delete("templates", &DeleteParams::default()).await.unwrap();
    support::wait_for("the deleted template leaves the store", Duration::from_secs(5), || {
        env().state.store.lookup(&ns, "t").entry.is_none()
    })
    .await;
    let fourth = pods.create(&PostParams::default(), &env_pod("d", "t")).await.unwrap();
    assert!(!fourth.labels().contains_key("version"));
    assert!(!fourth.annotations().contains_key("flyte.org/pod-template-applied"));
}

#[tokio::test]
async fn a_template_never_reaches_another_namespace() {
    let c = client().await;
    let (a, b) = (namespace(&c, "tenant-a").await, namespace(&c, "tenant-b").await);
    apply_templates(&c, &a, "templates", &[("private", "labels: {owner: tenant-a}")]).await;
    let in_b =
        Api::<Pod>::namespaced(c.clone(), &b).create(&PostParams::default(), &env_pod("p", "private")).await.unwrap();
    assert!(!in_b.labels().contains_key("owner"));
    let in_a =
        Api::<Pod>::namespaced(c.clone(), &a).create(&PostParams::default(), &env_pod("p", "private")).await.unwrap();
    assert_eq!(in_a.labels()["owner"], "tenant-a");
}

#[tokio::test]
async fn platform_templates_serve_every_namespace_and_own_namespace_wins() {
    let c = client().await;
    apply_templates(&c, PLATFORM, "platform-shared", &[("shared", "labels: {from: platform}")]).await;
    let ns = namespace(&c, "override").await;
    let pods = Api::<Pod>::namespaced(c.clone(), &ns);
    assert_eq!(
        pods.create(&PostParams::default(), &env_pod("a", "shared")).await.unwrap().labels()["from"],
        "platform"
    );
    apply_templates(&c, &ns, "mine", &[("shared", "labels: {from: own}")]).await;
    assert_eq!(pods.create(&PostParams::default(), &env_pod("b", "shared")).await.unwrap().labels()["from"], "own");
}

#[tokio::test]
async fn a_missing_explicit_template_is_refused_with_its_name() {
    let c = client().await;
    let ns = namespace(&c, "missing").await;
    let pods = Api::<Pod>::namespaced(c.clone(), &ns);
    let p = pod("p", json!({"flyte.org/environment": "x"}), json!({"flyte.org/pod-template": "no-such-template"}));
    let err = pods.create(&PostParams::default(), &p).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("denied the request") && text.contains("\"no-such-template\""), "{text}");
    assert!(text.contains(&ns) && text.contains(PLATFORM), "names the namespaces searched: {text}");
    assert!(pods.get_opt("p").await.unwrap().is_none());
}

#[tokio::test]
async fn a_broken_template_is_refused_naming_configmap_and_key_and_gets_an_event() {
    let c = client().await;
    let ns = namespace(&c, "broken").await;
    apply_templates(&c, &ns, "bad-templates", &[("oops", "podSpec: {containers: [{name: primary, evn: []}]}")]).await;
    let err =
        Api::<Pod>::namespaced(c.clone(), &ns).create(&PostParams::default(), &env_pod("p", "oops")).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("bad-templates") && text.contains("\"oops\"") && text.contains("evn: unknown field"),
        "{text}"
    );
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = events.list(&ListParams::default()).await.unwrap();
        let found = list.items.iter().any(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("bad-templates")
                && e.note.as_deref().is_some_and(|n| n.contains("\"oops\"") && n.contains("unknown field"))
        });
        if found {
            break;
        }
        assert!(Instant::now() < deadline, "no Event on the ConfigMap: {:?}", list.items);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn server_side_dry_run_creates_nothing_and_returns_the_mutated_pod() {
    let c = client().await;
    let ns = namespace(&c, "dryrun").await;
    apply_templates(&c, &ns, "templates", &[("rich", RICH)]).await;
    let pods = Api::<Pod>::namespaced(c.clone(), &ns);
    let dry = PostParams { dry_run: true, ..PostParams::default() };
    let returned = pods.create(&dry, &env_pod("p", "rich")).await.unwrap();
    assert_eq!(returned.labels()["team"], "ml");
    assert!(pods.get_opt("p").await.unwrap().is_none());
}

#[tokio::test]
async fn fields_the_api_server_defaulted_take_the_templates_values() {
    let c = client().await;
    let ns = namespace(&c, "defaults").await;
    let template = r#"
podSpec:
  dnsPolicy: Default
  schedulerName: gang-scheduler
  terminationGracePeriodSeconds: 120
  enableServiceLinks: false
  restartPolicy: OnFailure
  containers:
  - name: primary
    imagePullPolicy: Always
    terminationMessagePolicy: FallbackToLogsOnError
"#;
    apply_templates(&c, &ns, "templates", &[("defaults", template)]).await;
    let pods = Api::<Pod>::namespaced(c.clone(), &ns);
    let spec = pods.create(&PostParams::default(), &env_pod("a", "defaults")).await.unwrap().spec.unwrap();
    assert_eq!(spec.dns_policy.as_deref(), Some("Default"));
    assert_eq!(spec.scheduler_name.as_deref(), Some("gang-scheduler"));
    assert_eq!(spec.termination_grace_period_seconds, Some(120));
    assert_eq!(spec.enable_service_links, Some(false));
    assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
    assert_eq!(spec.containers[0].image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(spec.containers[0].termination_message_policy.as_deref(), Some("FallbackToLogsOnError"));

    // Values the pod's author chose stay, even where the template differs.
    let mut explicit = env_pod("b", "defaults");
    let s = explicit.spec.as_mut().unwrap();
    s.restart_policy = Some("Never".into());
    s.dns_policy = Some("None".into());
    s.dns_config = Some(serde_json::from_value(json!({"nameservers": ["1.1.1.1"]})).unwrap());
    s.containers[0].image_pull_policy = Some("Never".into());
    let spec = pods.create(&PostParams::default(), &explicit).await.unwrap().spec.unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.dns_policy.as_deref(), Some("None"));
    assert_eq!(spec.containers[0].image_pull_policy.as_deref(), Some("Never"));
}

#[tokio::test]
async fn admissions_make_no_api_calls() {
    let c = client().await;
    let ns = namespace(&c, "zero-calls").await;
    apply_templates(&c, &ns, "templates", &[("rich", RICH)]).await;
    let pods = Api::<Pod>::namespaced(c.clone(), &ns);
    let before = env().api_calls.load(Ordering::SeqCst);
    for i in 0..10 {
        pods.create(&PostParams::default(), &env_pod(&format!("p{i}"), "rich")).await.unwrap();
    }
    assert_eq!(reviews_in(&ns), 10);
    assert_eq!(env().api_calls.load(Ordering::SeqCst), before, "the webhook called the API server during admissions");
}

#[tokio::test]
async fn the_webhook_is_ready_and_counts_admissions_in_metrics() {
    let c = client().await;
    let ns = namespace(&c, "metrics").await;
    apply_templates(&c, &ns, "templates", &[("rich", RICH)]).await;
    Api::<Pod>::namespaced(c.clone(), &ns).create(&PostParams::default(), &env_pod("p", "rich")).await.unwrap();
    let admin = server::admin_router(env().state.clone());
    let resp = tower::ServiceExt::oneshot(admin, Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let mutated: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("pod_template_webhook_admissions_total{result=\"mutated\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(mutated >= 1, "{text}");
    assert!(env().state.is_ready());
}

#[tokio::test]
async fn broken_template_config_maps_are_refused_at_apply_time() {
    let c = client().await;
    let ns = format!("validate-{}", std::process::id());
    support::ensure_namespace(&c, &ns, json!({"ptw-validate": "true"})).await;
    let cms = Api::<ConfigMap>::namespaced(c.clone(), &ns);
    let cm = |data: Value| -> ConfigMap {
        serde_json::from_value(
            json!({"metadata": {"name": "tpl", "labels": {"flyte.org/pod-templates": "true"}}, "data": data}),
        )
        .unwrap()
    };
    let broken = cm(json!({"fine": "labels: {a: b}", "typo": "podSpec: {containers: [{name: primary, evn: []}]}"}));
    let text = cms.create(&PostParams::default(), &broken).await.unwrap_err().to_string();
    assert!(
        text.contains("denied the request") && text.contains("key \"typo\"") && text.contains("evn: unknown field"),
        "{text}"
    );
    assert!(cms.get_opt("tpl").await.unwrap().is_none());
    let dry = PostParams { dry_run: true, ..PostParams::default() };
    assert!(cms.create(&dry, &broken).await.is_err(), "server-side dry-run is validated too");
    assert!(cms.create(&dry, &cm(json!({"fine": "labels: {a: b}"}))).await.is_ok());
    assert!(cms.get_opt("tpl").await.unwrap().is_none(), "dry-run stored nothing");
    cms.create(&PostParams::default(), &cm(json!({"fine": "labels: {a: b}"}))).await.unwrap();
    let mut update = cms.get("tpl").await.unwrap();
    update.data.as_mut().unwrap().insert("typo".into(), "labels: [".into());
    assert!(cms.replace("tpl", &PostParams::default(), &update).await.is_err(), "a broken update is refused too");
}
