//! core/v1 PodTemplate objects as a template source (SPEC §8), end to end against the real
//! kube-apiserver: the webhook's store runs AS THE CHART'S ServiceAccount, with the RBAC that
//! `helm template` renders from `charts/` (default values), and the API server calls the webhook
//! over TLS for every labelled pod.
//!
//! One API server and one webhook serve every test of this file; each test works in namespaces
//! of its own. The fixture lives on a dedicated thread so that the processes outlive single tests
//! and die with the test process.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodTemplate, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use pod_template_webhook::admission::{self, Policy};
use pod_template_webhook::names::Names;
use pod_template_webhook::server::AppState;
use pod_template_webhook::store::cluster::ClusterStore;
use pod_template_webhook::store::{EntryState, TemplateStore};
use serde_json::{json, Value};
use support::ApiServer;

const PLATFORM: &str = "flyte";
const APPLIED: &str = "flyte.org/pod-template-applied";

struct Env {
    kubeconfig: std::path::PathBuf,
    url: String,
    ca_pem: String,
    /// A token of the chart's ServiceAccount, which the webhook's store runs as.
    token: String,
    state: Arc<AppState>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| support::fixture("e2e-podtemplate", |api, rt| rt.block_on(start_webhook(api))))
}

/// `helm template` of the chart's ServiceAccount and RBAC, default values, release namespace
/// `flyte`: the objects a `helm install` would create.
fn chart_rbac() -> Vec<Value> {
    support::helm_template(
        PLATFORM,
        &["--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml"],
    )
}

async fn create<K>(api: Api<K>, object: &Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let typed: K = serde_json::from_value(object.clone()).unwrap();
    api.create(&PostParams::default(), &typed).await.unwrap_or_else(|e| panic!("create {object}: {e}"));
}

/// Creates the chart's RBAC in the API server; returns the ServiceAccount's name.
async fn install_chart_rbac(admin: &kube::Client) -> String {
    let mut service_account = None;
    for o in chart_rbac() {
        let ns = o["metadata"]["namespace"].as_str().unwrap_or(PLATFORM).to_owned();
        match o["kind"].as_str().unwrap() {
            "ServiceAccount" => {
                service_account = Some(o["metadata"]["name"].as_str().unwrap().to_owned());
                create(Api::<ServiceAccount>::namespaced(admin.clone(), &ns), &o).await
            }
            "Role" => create(Api::<Role>::namespaced(admin.clone(), &ns), &o).await,
            "RoleBinding" => create(Api::<RoleBinding>::namespaced(admin.clone(), &ns), &o).await,
            "ClusterRole" => create(Api::<ClusterRole>::all(admin.clone()), &o).await,
            "ClusterRoleBinding" => create(Api::<ClusterRoleBinding>::all(admin.clone()), &o).await,
            other => panic!("unexpected kind {other} in the chart's RBAC"),
        }
    }
    service_account.expect("the chart renders a ServiceAccount")
}

async fn start_webhook(api: &ApiServer) -> Env {
    let admin = api.client().await;
    ensure_namespace(&admin, PLATFORM).await;
    let sa_name = install_chart_rbac(&admin).await;
    let token = support::service_account_token(&admin, PLATFORM, &sa_name).await;
    let sa = support::token_client(&api.url, &api.pki.ca_pem, &token).await;

    // The store as the chart's ServiceAccount: it becomes ready only if the chart lets it list
    // and watch both ConfigMaps and PodTemplates.
    let names = Names::default();
    let store = ClusterStore::spawn(sa, names.clone(), &[], Default::default());
    let t = Instant::now();
    while !store.is_ready() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the store (as the chart's ServiceAccount) never synced:\n{}",
            api.log_tail("kube-apiserver.log")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("[fixture] store synced as the chart's ServiceAccount in {:?}", t.elapsed());
    let state = AppState::new(store, Policy { names, ..Policy::default() });

    let pki = support::TestPki::new("ptw-podtemplate-webhook-ca");
    let webhook = support::serve_webhook(state.clone(), &pki).await;
    let mutating = support::mutating_webhook(webhook.port, &pki.ca_pem);
    Api::<MutatingWebhookConfiguration>::all(admin.clone()).create(&PostParams::default(), &mutating).await.unwrap();
    // The chart's validating rule (configmaps and podtemplates).
    let validating = support::validating_webhook(webhook.port, &pki.ca_pem, &["configmaps", "podtemplates"]);
    Api::<ValidatingWebhookConfiguration>::all(admin).create(&PostParams::default(), &validating).await.unwrap();
    Env { kubeconfig: api.kubeconfig.clone(), url: api.url.clone(), ca_pem: api.pki.ca_pem.clone(), token, state }
}

async fn ensure_namespace(c: &kube::Client, name: &str) {
    support::ensure_namespace(c, name, json!({})).await
}

/// Warning headers the API server sent to a client (admission `warnings` arrive this way).
type Warnings = Arc<Mutex<Vec<String>>>;

/// An admin client that records the `Warning` headers of every response.
async fn client() -> (kube::Client, Warnings) {
    let kc = kube::config::Kubeconfig::read_from(&env().kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    let warnings = Warnings::default();
    let sink = warnings.clone();
    let layer = tower::util::MapResponseLayer::new(move |response: axum::http::Response<_>| {
        for w in response.headers().get_all("warning") {
            sink.lock().unwrap().push(w.to_str().unwrap_or_default().to_owned());
        }
        response
    });
    let client = kube::client::ClientBuilder::try_from(config).unwrap().with_layer(&layer).build();
    (client, warnings)
}

async fn service_account_client() -> kube::Client {
    support::token_client(&env().url, &env().ca_pem, &env().token).await
}

/// A fresh namespace for one test.
async fn namespace(c: &kube::Client, prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    ensure_namespace(c, &name).await;
    name
}

fn store() -> &'static dyn TemplateStore {
    &*env().state.store
}

/// A labelled PodTemplate object, as a platform team keeps them for Flyte. Its container is
/// named after `primary` (the annotation), or `main` when that is no valid name.
fn pod_template(name: &str, primary: Option<&str>, version: &str) -> Value {
    let annotations = primary.map_or(json!({}), |p| json!({"flyte.org/primary-container-name": p}));
    let container = match primary {
        None => "primary",
        Some(p) if p.chars().all(|c| c.is_ascii_lowercase() || c == '-') => p,
        Some(_) => "main",
    };
    json!({
        "apiVersion": "v1", "kind": "PodTemplate",
        "metadata": {"name": name, "labels": {"flyte.org/pod-templates": "true"}, "annotations": annotations},
        "template": {
            "metadata": {"labels": {"version": version}, "annotations": {"cost-center": "42"}},
            "spec": {
                // Flyte's convention: the API server requires an image, the no-op one is never run.
                "containers": [{"name": container, "image": "docker.io/rwgrim/docker-noop",
                                "env": [{"name": "FROM_PODTEMPLATE", "value": version}]}],
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }
        }
    })
}

/// Creates or replaces a PodTemplate; waits until the webhook serves (or reports) that version.
/// Returns the resourceVersion and how long the webhook took to see it.
async fn apply_pod_template(c: &kube::Client, ns: &str, object: &Value) -> (String, Duration) {
    let api = Api::<PodTemplate>::namespaced(c.clone(), ns);
    let mut typed: PodTemplate = serde_json::from_value(object.clone()).unwrap();
    let name = typed.name_any();
    let stored = match api.get_opt(&name).await.unwrap() {
        Some(old) => {
            typed.metadata.resource_version = old.resource_version();
            api.replace(&name, &PostParams::default(), &typed).await.unwrap()
        }
        None => api.create(&PostParams::default(), &typed).await.unwrap(),
    };
    let version = stored.resource_version().unwrap();
    let seen = support::wait_for("the webhook sees the PodTemplate", Duration::from_secs(5), || {
        store().lookup(ns, &name).entry.is_some_and(|e| match &e.state {
            EntryState::Stale { broken_version, .. } => *broken_version == version,
            _ => e.source.version == version,
        })
    })
    .await;
    (version, seen)
}

fn env_pod(name: &str, environment: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"flyte.org/environment": environment}},
        "spec": {"containers": [{"name": "primary", "image": "registry.example/task:1.0"}]}
    }))
    .unwrap()
}

fn env_of(pod: &Pod) -> Vec<(String, String)> {
    let c = &pod.spec.as_ref().unwrap().containers[0];
    c.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect()
}

#[tokio::test]
async fn a_pod_template_object_is_created_updated_broken_and_deleted() {
    let started = Instant::now();
    let (c, warnings) = client().await;
    let ns = namespace(&c, "podtemplate").await;
    let pods = Api::<Pod>::namespaced(c.clone(), &ns);
    let templates = Api::<PodTemplate>::namespaced(c.clone(), &ns);

    // Created: the next labelled pod gets it.
    let (v1, seen) = apply_pod_template(&c, &ns, &pod_template("gpu", Some("main"), "one")).await;
    eprintln!("created: the webhook serves the PodTemplate {seen:?} after the API server stored it");
    let t = Instant::now();
    let p1 = pods.create(&PostParams::default(), &env_pod("p1", "gpu")).await.unwrap();
    eprintln!("labelled pod created (mutated) in {:?}", t.elapsed());
    assert_eq!(p1.labels()["version"], "one");
    assert_eq!(p1.annotations()["cost-center"], "42");
    assert_eq!(p1.annotations()[APPLIED], format!("{ns}/podtemplate:gpu/gpu@{v1}"));
    assert_eq!(
        env_of(&p1),
        [("FROM_PODTEMPLATE".to_owned(), "one".to_owned())],
        "the template's `main` (the annotation) is the pod's primary"
    );
    let spec = p1.spec.as_ref().unwrap();
    assert_eq!(spec.containers.len(), 1, "the template's primary container is no sidecar");
    assert_eq!(spec.containers[0].image, Some("registry.example/task:1.0".into()), "the pod's image stays");
    assert_eq!(
        spec.containers[0].image_pull_policy.as_deref(),
        Some("IfNotPresent"),
        "the Always the API server defaulted into the PodTemplate (untagged image) is not the template's choice"
    );
    assert!(spec.tolerations.iter().flatten().any(|t| t.key.as_deref() == Some("nvidia.com/gpu")));
    assert!(warnings.lock().unwrap().is_empty(), "{warnings:?}");

    // Updated: the next pod sees the update within 5 s.
    let t = Instant::now();
    let (v2, seen) = apply_pod_template(&c, &ns, &pod_template("gpu", Some("main"), "two")).await;
    let p2 = pods.create(&PostParams::default(), &env_pod("p2", "gpu")).await.unwrap();
    let delay = t.elapsed();
    eprintln!("updated: served after {seen:?}; update + next pod {delay:?}");
    assert!(delay < Duration::from_secs(5), "{delay:?}");
    assert_eq!(p2.labels()["version"], "two");
    assert_eq!(p2.annotations()[APPLIED], format!("{ns}/podtemplate:gpu/gpu@{v2}"));

    // Broken (the API server accepts it; the webhook does not): the last good version serves,
    // with a warning on the admission and an Event on the PodTemplate.
    let (v3, _) = apply_pod_template(&c, &ns, &pod_template("gpu", Some("Main_Container"), "three")).await;
    let p3 = pods.create(&PostParams::default(), &env_pod("p3", "gpu")).await.unwrap();
    assert_eq!(p3.labels()["version"], "two", "the last good version keeps serving");
    assert_eq!(p3.annotations()[APPLIED], format!("{ns}/podtemplate:gpu/gpu@{v2}"));
    let w = warnings.lock().unwrap().join("\n");
    assert!(
        w.contains(&format!("PodTemplate {ns}/gpu at version {v3} does not parse"))
            && w.contains("not a valid container name")
            && w.contains(&format!("using its last good version {v2}")),
        "{w}"
    );
    let events = Api::<K8sEvent>::namespaced(c.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = events.list(&ListParams::default()).await.unwrap();
        let found = list.items.iter().find(|e| {
            let r = e.regarding.as_ref();
            r.and_then(|r| r.kind.as_deref()) == Some("PodTemplate") && r.and_then(|r| r.name.as_deref()) == Some("gpu")
        });
        if let Some(e) = found {
            assert_eq!(e.reason.as_deref(), Some("TemplateParseError"));
            let note = e.note.as_deref().unwrap_or_default();
            assert!(note.contains("last good version keeps serving") && note.contains("Main_Container"), "{note}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Event on the PodTemplate (published as the chart's ServiceAccount): {:?}",
            list.items
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Deleted: gone.
    let t = Instant::now();
    templates.delete("gpu", &DeleteParams::default()).await.unwrap();
    let gone = support::wait_for("the deleted PodTemplate leaves the store", Duration::from_secs(5), || {
        store().lookup(&ns, "gpu").entry.is_none()
    })
    .await;
    eprintln!("deleted: gone from the webhook after {gone:?} ({:?} incl. the DELETE)", t.elapsed());
    let p4 = pods.create(&PostParams::default(), &env_pod("p4", "gpu")).await.unwrap();
    assert!(!p4.labels().contains_key("version") && !p4.annotations().contains_key(APPLIED), "{:?}", p4.metadata);
    eprintln!("whole lifecycle in {:?}", started.elapsed());
}

#[tokio::test]
async fn a_pod_template_that_never_parsed_is_refused_naming_it() {
    let (c, _) = client().await;
    let ns = namespace(&c, "podtemplate-broken").await;
    apply_pod_template(&c, &ns, &pod_template("bad", Some("Not A Name"), "one")).await;
    let err =
        Api::<Pod>::namespaced(c.clone(), &ns).create(&PostParams::default(), &env_pod("p", "bad")).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("denied the request") && text.contains(&format!("PodTemplate {ns}/bad does not parse")),
        "{text}"
    );
    assert!(text.contains("flyte.org/primary-container-name"), "{text}");
}

#[tokio::test]
async fn a_config_map_key_wins_over_a_pod_template_of_the_same_name() {
    let (c, _) = client().await;
    let ns = namespace(&c, "podtemplate-clash").await;
    let (pt_version, _) = apply_pod_template(&c, &ns, &pod_template("shared", None, "podtemplate")).await;
    let cms = Api::<ConfigMap>::namespaced(c.clone(), &ns);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "templates", "labels": {"flyte.org/pod-templates": "true"}},
        "data": {"shared": "labels: {version: configmap}"},
    }))
    .unwrap();
    let cm_version = cms.create(&PostParams::default(), &cm).await.unwrap().resource_version().unwrap();
    support::wait_for("the ConfigMap key serves", Duration::from_secs(5), || {
        store().lookup(&ns, "shared").entry.is_some_and(|e| e.source.version == cm_version)
    })
    .await;
    let pods = Api::<Pod>::namespaced(c.clone(), &ns);
    let p1 = pods.create(&PostParams::default(), &env_pod("p1", "shared")).await.unwrap();
    assert_eq!(p1.labels()["version"], "configmap");
    assert_eq!(p1.annotations()[APPLIED], format!("{ns}/templates/shared@{cm_version}"));

    cms.delete("templates", &DeleteParams::default()).await.unwrap();
    support::wait_for("the PodTemplate serves once the key is gone", Duration::from_secs(5), || {
        store().lookup(&ns, "shared").entry.is_some_and(|e| e.source.version == pt_version)
    })
    .await;
    let p2 = pods.create(&PostParams::default(), &env_pod("p2", "shared")).await.unwrap();
    assert_eq!(p2.labels()["version"], "podtemplate");
    assert_eq!(p2.annotations()[APPLIED], format!("{ns}/podtemplate:shared/shared@{pt_version}"));
}

#[tokio::test]
async fn a_platform_pod_template_serves_every_namespace() {
    let (c, _) = client().await;
    let name = format!("platform-pt-{}", std::process::id());
    let (version, _) = apply_pod_template(&c, PLATFORM, &pod_template(&name, None, "platform")).await;
    let ns = namespace(&c, "podtemplate-tenant").await;
    let pod =
        Api::<Pod>::namespaced(c.clone(), &ns).create(&PostParams::default(), &env_pod("p", &name)).await.unwrap();
    assert_eq!(pod.labels()["version"], "platform");
    assert_eq!(pod.annotations()[APPLIED], format!("{PLATFORM}/podtemplate:{name}/{name}@{version}"));
}

#[tokio::test]
async fn broken_pod_templates_are_refused_at_apply_time() {
    let (c, _) = client().await;
    let ns = format!("podtemplate-validate-{}", std::process::id());
    support::ensure_namespace(&c, &ns, json!({"ptw-validate": "true"})).await;
    let api = Api::<PodTemplate>::namespaced(c.clone(), &ns);
    let typed = |v: Value| -> PodTemplate { serde_json::from_value(v).unwrap() };
    let broken = typed(pod_template("tpl", Some("Bad_Name"), "one"));
    let text = api.create(&PostParams::default(), &broken).await.unwrap_err().to_string();
    assert!(
        text.contains("denied the request")
            && text.contains(&format!("template PodTemplate {ns}/tpl does not parse"))
            && text.contains("Bad_Name"),
        "{text}"
    );
    let dry = PostParams { dry_run: true, ..PostParams::default() };
    assert!(api.create(&dry, &broken).await.is_err(), "server-side dry-run is validated too");
    api.create(&PostParams::default(), &typed(pod_template("tpl", Some("main"), "one"))).await.unwrap();
    let patch = json!({"metadata": {"annotations": {"flyte.org/primary-container-name": "Bad_Name"}}});
    assert!(
        api.patch("tpl", &PatchParams::default(), &Patch::Merge(&patch)).await.is_err(),
        "a broken update is refused too"
    );
    // Unlabelled PodTemplates are never sent: anything the API server accepts goes through.
    let mut plain = pod_template("plain", Some("Bad_Name"), "one");
    plain["metadata"]["labels"] = json!({});
    api.create(&PostParams::default(), &typed(plain)).await.unwrap();
}

/// `/validate` without an API server: what the webhook answers for PodTemplate objects.
#[test]
fn validate_answers_for_pod_template_objects() {
    let review = |operation: &str, object: Value| {
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u1", "operation": operation, "namespace": "team", "name": "tpl",
                        "kind": {"group": "", "version": "v1", "kind": "PodTemplate"},
                        "resource": {"group": "", "version": "v1", "resource": "podtemplates"},
                        "userInfo": {}, "object": object}
        });
        let req = admission::parse_review(&serde_json::to_vec(&body).unwrap()).unwrap();
        admission::validate_templates(&req, &Names::default())
    };
    let mut broken = pod_template("tpl", Some("main"), "one");
    broken["template"]["spec"]["containers"][0]["evn"] = json!([]);
    let d = review("CREATE", broken.clone());
    assert!(!d.response.allowed);
    assert_eq!(d.response.result.code, 422);
    assert_eq!(
        d.response.result.message,
        "template PodTemplate team/tpl does not parse: template.spec.containers[0].evn: unknown field"
    );
    assert!(!review("UPDATE", broken.clone()).response.allowed);
    assert!(review("DELETE", broken.clone()).response.allowed, "deletions are not validated");
    assert!(review("CREATE", pod_template("tpl", Some("main"), "one")).response.allowed);
    broken["metadata"]["labels"] = json!({});
    assert!(review("CREATE", broken).response.allowed, "not a template source");
}

#[tokio::test]
async fn the_charts_rbac_lets_the_webhook_list_and_watch_pod_templates_and_nothing_more() {
    let (admin, _) = client().await;
    let ns = namespace(&admin, "podtemplate-rbac").await;
    apply_pod_template(&admin, &ns, &pod_template("gpu", None, "one")).await;
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "other-secret"}, "stringData": {"a": "b"}})).unwrap();
    Api::<Secret>::namespaced(admin.clone(), &ns).create(&PostParams::default(), &secret).await.unwrap();
    let sa = service_account_client().await;

    // What the store does: list and watch PodTemplates, all namespaces.
    let all = Api::<PodTemplate>::all(sa.clone());
    assert!(all.list(&ListParams::default()).await.is_ok(), "list podtemplates");
    let mut watch =
        Box::pin(all.watch(&kube::api::WatchParams::default().timeout(1), "0").await.expect("watch podtemplates"));
    let _ = futures::StreamExt::next(&mut watch).await;

    // ...and nothing more, through the API server's authorizer.
    let can_i = |verb: &'static str, resource: &'static str, ns: Option<String>| {
        let sa = sa.clone();
        async move {
            let review: SelfSubjectAccessReview = serde_json::from_value(json!({
                "spec": {"resourceAttributes": {"verb": verb, "group": "", "resource": resource, "namespace": ns.unwrap_or_default()}}
            }))
            .unwrap();
            let out = Api::<SelfSubjectAccessReview>::all(sa).create(&PostParams::default(), &review).await.unwrap();
            out.status.unwrap().allowed
        }
    };
    let here = || Some(ns.clone());
    for (verb, resource, namespace, allowed) in [
        ("list", "podtemplates", None, true),
        ("watch", "podtemplates", None, true),
        ("list", "podtemplates", here(), true),
        ("watch", "podtemplates", here(), true),
        ("get", "podtemplates", here(), false),
        ("create", "podtemplates", here(), false),
        ("update", "podtemplates", here(), false),
        ("patch", "podtemplates", here(), false),
        ("delete", "podtemplates", here(), false),
        ("deletecollection", "podtemplates", here(), false),
        ("get", "secrets", here(), false),
        ("list", "secrets", here(), false),
        ("list", "secrets", None, false),
        ("watch", "secrets", None, false),
        ("list", "pods", None, false),
        ("create", "pods", here(), false),
    ] {
        assert_eq!(can_i(verb, resource, namespace.clone()).await, allowed, "can-i {verb} {resource} in {namespace:?}");
    }
    // The same refusals from the API itself.
    let forbidden = |r: Result<_, kube::Error>| matches!(r, Err(kube::Error::Api(e)) if e.code == 403);
    let mine = Api::<PodTemplate>::namespaced(sa.clone(), &ns);
    assert!(forbidden(mine.get("gpu").await.map(|_| ())), "get podtemplate");
    let evil: PodTemplate = serde_json::from_value(pod_template("evil", None, "evil")).unwrap();
    assert!(forbidden(mine.create(&PostParams::default(), &evil).await.map(|_| ())), "create podtemplate");
    let patch = json!({"metadata": {"labels": {"evil": "yes"}}});
    assert!(
        forbidden(mine.patch("gpu", &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())),
        "patch podtemplate"
    );
    assert!(forbidden(mine.delete("gpu", &DeleteParams::default()).await.map(|_| ())), "delete podtemplate");
    let secrets = Api::<Secret>::namespaced(sa.clone(), &ns);
    assert!(forbidden(secrets.get("other-secret").await.map(|_| ())), "get secret");
    assert!(forbidden(secrets.list(&ListParams::default()).await.map(|_| ())), "list secrets");
}

// ---------------------------------------------------------------------------------------------
// the command line with PodTemplate manifests (no API server)

/// Runs the binary; returns (success, stdout, stderr).
fn run_bin(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pod-template-webhook"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const PODTEMPLATES_YAML: &str = "\
apiVersion: v1
kind: ConfigMap
metadata: {name: cm, labels: {flyte.org/pod-templates: \"true\"}}
data:
  fine: 'labels: {a: b}'
---
apiVersion: v1
kind: PodTemplate
metadata:
  name: typo
  labels: {flyte.org/pod-templates: \"true\"}
template:
  spec:
    containers:
    - name: primary
      image: x
      evn: []
---
apiVersion: v1
kind: PodTemplate
metadata:
  name: badname
  namespace: team
  labels: {flyte.org/pod-templates: \"true\"}
  annotations: {flyte.org/primary-container-name: Main}
template:
  spec: {}
---
apiVersion: v1
kind: PodTemplate
metadata:
  name: gpu
  labels: {flyte.org/pod-templates: \"true\"}
  annotations: {flyte.org/primary-container-name: main}
template:
  metadata:
    labels: {accelerator: a100}
  spec:
    containers:
    - name: main
      image: docker.io/rwgrim/docker-noop
      env: [{name: FROM_PODTEMPLATE, value: \"yes\"}]
";

#[test]
fn validate_checks_pod_template_manifests_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("templates.yaml");
    std::fs::write(&file, PODTEMPLATES_YAML).unwrap();
    let (ok, stdout, stderr) = run_bin(&["validate", dir.path().to_str().unwrap()]);
    assert!(!ok, "{stdout}{stderr}");
    let f = file.display();
    assert!(
        stderr.contains(&format!(
            "error: {f}:12: PodTemplate flyte/typo: template.spec.containers[0].evn: unknown field"
        )),
        "the line of the PodTemplate's `template`: {stderr}"
    );
    assert!(
        stderr.contains(&format!("error: {f}:21: PodTemplate team/badname: metadata.annotations[flyte.org/primary-container-name]: \"Main\" is not a valid container name")),
        "the line of its `metadata`: {stderr}"
    );
    assert!(stdout.contains("2 template(s) valid, 2 error(s)"), "{stdout}");

    let good = tempfile::tempdir().unwrap();
    let docs: Vec<&str> = PODTEMPLATES_YAML.split("---\n").collect();
    std::fs::write(good.path().join("ok.yaml"), [docs[0], docs[3]].join("---\n")).unwrap();
    let (ok, stdout, stderr) = run_bin(&["validate", good.path().to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("2 template(s) valid, 0 error(s)"), "{stdout}");
}

#[test]
fn render_applies_a_pod_template_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<&str> = PODTEMPLATES_YAML.split("---\n").collect();
    std::fs::write(dir.path().join("gpu.yaml"), docs[3]).unwrap();
    let pod = dir.path().join("pod.yaml");
    std::fs::write(
        &pod,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: task, namespace: ml, labels: {flyte.org/environment: gpu}}\n\
         spec: {containers: [{name: task, image: 'registry.example/task:1.0', imagePullPolicy: IfNotPresent}]}\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = run_bin(&["render", "--templates", dir.path().to_str().unwrap(), pod.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    let rendered: Value = pod_template_webhook::yaml::from_str(&stdout).unwrap();
    assert_eq!(rendered["metadata"]["labels"]["accelerator"], "a100");
    let applied = rendered["metadata"]["annotations"][APPLIED].as_str().unwrap();
    assert!(applied.starts_with("flyte/podtemplate:gpu/gpu@sha256:"), "{applied}");
    let container = &rendered["spec"]["containers"][0];
    assert_eq!(container["env"], json!([{"name": "FROM_PODTEMPLATE", "value": "yes"}]), "{stdout}");
    assert_eq!(container["image"], "registry.example/task:1.0");
    assert_eq!(rendered["spec"]["containers"].as_array().unwrap().len(), 1);
}
