//! Flyte 2 task pods (SPEC §9) end to end against the real kube-apiserver, with the chart's own
//! rendered MutatingWebhookConfiguration (only its clientConfig pointed at the webhook on
//! loopback). The pods are made by `tests/flyte_sdk/make_pods.py` from the real Flyte SDK's
//! serialized tasks, shaped as Flyte's executor shapes them: no environment label, the
//! environment only in the `task-name` label.
//!
//! One test, in steps: the webhook's own admission counter is read around single pod creations
//! ("sent once", "never sent"), and the defaults of the last step would change every pod before it.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::ResourceExt;
use pod_template_webhook::admission::Policy;
use pod_template_webhook::metrics::Metrics;
use pod_template_webhook::names::Names;
use pod_template_webhook::server::AppState;
use pod_template_webhook::store::cluster::ClusterStore;
use pod_template_webhook::store::TemplateStore;
use serde_json::{json, Value};
use support::flyte::{task_pod, TaskPod};

const PLATFORM: &str = "flyte";
const APPLIED: &str = "flyte.org/pod-template-applied";
const LIMIT: Duration = Duration::from_secs(20);

/// The platform's templates for the Flyte environments (the pods' tasks set some of the same
/// fields: theirs must win).
const ML_GPU: &str = "\
labels: {team: ml}
annotations: {example.com/cost-center: \"42\"}
podSpec:
  nodeSelector: {accelerator: nvidia}
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  containers:
  - name: default
    env: [{name: TZ, value: UTC}]
  - name: primary
    env: [{name: SHARED, value: from-template}, {name: FROM_TEMPLATE, value: template}]
";

/// The API server and the webhook, started once; they live as long as the test process.
struct Fixture {
    kubeconfig: std::path::PathBuf,
    state: Arc<AppState>,
}

struct Cluster {
    admin: kube::Client,
    state: Arc<AppState>,
    pki: support::TestPki,
}

async fn start(api: &support::ApiServer) -> Fixture {
    let admin = api.client().await;
    support::ensure_namespace(&admin, PLATFORM, json!({})).await;
    let names = Names::default();
    let store = ClusterStore::spawn(admin.clone(), names.clone(), &[], Default::default());
    let policy = Policy { names, default_template: Some("defaults".into()), ..Policy::default() };
    let state = AppState::with_metrics(store.clone(), policy, Arc::new(Metrics::default()));
    support::wait_for("the store syncs", Duration::from_secs(30), || store.is_ready()).await;
    let pki = support::TestPki::new("ptw-flyte-ca");
    let webhook = support::serve_webhook(state.clone(), &pki).await;
    let config = support::chart_mutating_webhook(webhook.port, &pki.ca_pem, &[]);
    let names: Vec<_> = config.webhooks.iter().flatten().map(|w| w.name.clone()).collect();
    assert_eq!(names, ["pod-templates.flyte.org", "task-name.pod-templates.flyte.org"], "the chart's two selections");
    Api::<MutatingWebhookConfiguration>::all(admin).create(&PostParams::default(), &config).await.unwrap();
    Fixture { kubeconfig: api.kubeconfig.clone(), state }
}

impl Cluster {
    /// Reviews the webhook answered, whatever the result.
    fn admissions(&self) -> u64 {
        ["mutated", "unchanged", "denied", "error"].iter().map(|r| self.state.metrics.admissions(r)).sum()
    }

    /// Creates a template ConfigMap and waits until the webhook serves each of its keys.
    async fn templates(&self, ns: &str, name: &str, data: &[(&str, &str)]) -> String {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"flyte.org/pod-templates": "true"}},
            "data": data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        }))
        .unwrap();
        let created = Api::<ConfigMap>::namespaced(self.admin.clone(), ns).create(&PostParams::default(), &cm).await;
        let version = created.unwrap().resource_version().unwrap();
        let store = &self.state.store;
        for (key, _) in data {
            support::wait_for("the webhook serves the template", LIMIT, || {
                store.lookup(ns, key).entry.is_some_and(|e| e.source.version == version)
            })
            .await;
        }
        version
    }

    /// Creates `pod` in `ns` (its manifest's namespace replaced, `name` if given) and returns the
    /// stored pod and how many reviews the webhook answered for it.
    async fn create(&self, ns: &str, pod: &Value, name: Option<&str>) -> (Value, u64) {
        let mut pod = pod.clone();
        pod["metadata"]["namespace"] = json!(ns);
        if let Some(name) = name {
            pod["metadata"]["name"] = json!(name);
        }
        let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
        let before = self.admissions();
        let pods = Api::<Pod>::namespaced(self.admin.clone(), ns);
        let created = pods.create(&PostParams::default(), &typed).await.unwrap_or_else(|e| panic!("create {pod}: {e}"));
        let sent = self.admissions() - before;
        (serde_json::to_value(pods.get(&created.name_any()).await.unwrap()).unwrap(), sent)
    }
}

fn env_of(container: &Value) -> Vec<(String, String)> {
    let entries = container["env"].as_array().map(Vec::as_slice).unwrap_or_default();
    entries
        .iter()
        .map(|e| (e["name"].as_str().unwrap().into(), e["value"].as_str().unwrap_or("<ref>").into()))
        .collect()
}

fn has_env(container: &Value, name: &str, value: &str) -> bool {
    env_of(container).iter().any(|(n, v)| n == name && v == value)
}

fn applied(pod: &Value) -> &str {
    pod["metadata"]["annotations"][APPLIED].as_str().unwrap_or_else(|| panic!("no applied record: {pod}"))
}

/// The pod as created had only what its task and Flyte gave it.
fn assert_untouched(stored: &Value, sent: &TaskPod, what: &str) {
    assert!(stored["metadata"]["annotations"].get(APPLIED).is_none(), "{what}: {stored}");
    assert_eq!(stored["metadata"]["labels"], sent.pod["metadata"]["labels"], "{what}");
    let names = |p: &Value| env_of(&p["spec"]["containers"][0]);
    assert_eq!(names(stored), names(&sent.pod), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flyte_task_pods_through_the_api_server() {
    let fixture = support::fixture("e2e-flyte", |api, rt| rt.block_on(start(api)));
    let admin = support::kubeconfig_client(&fixture.kubeconfig).await;
    // The fake injectors of the coexistence step have a CA of their own.
    let c = Cluster { admin, state: fixture.state, pki: support::TestPki::new("ptw-injectors-ca") };
    let ml = c.templates(PLATFORM, "flyte-templates", &[("ml-gpu", ML_GPU)]).await;
    let etl = c.templates(PLATFORM, "etl-templates", &[("etl_batch", "labels: {team: data}")]).await;
    let long_env = "research-team-feature-store-backfill-2026";
    let research = c.templates(PLATFORM, "research-templates", &[(long_env, "labels: {team: research}")]).await;
    // Named like the 72-character environment: Flyte cuts its task-name before the dot, so the
    // pod never says which environment it belongs to, and this template never applies.
    let reconciliation =
        task_pod("platform-data-engineering-nightly-warehouse-reconciliation-job-eu-west-1", "reconcile");
    c.templates(PLATFORM, "warehouse-templates", &[(&reconciliation.environment, "labels: {team: warehouse}")]).await;

    // A container task: its one container is named like the pod and is the primary.
    let train = task_pod("ml-gpu", "train");
    assert_eq!(train.target, "container");
    let (pod, sent) = c.create(PLATFORM, &train.pod, None).await;
    assert_eq!(sent, 1, "sent once");
    assert_eq!(applied(&pod), format!("flyte/flyte-templates/ml-gpu@{ml}; environment from task-name ml-gpu.train"));
    assert_eq!(pod["metadata"]["labels"]["team"], "ml");
    assert_eq!(pod["spec"]["nodeSelector"]["accelerator"], "nvidia");
    let primary = &pod["spec"]["containers"][0];
    assert_eq!(primary["name"], train.pod["metadata"]["name"], "Flyte names the container like the pod");
    for (name, value) in [("TZ", "UTC"), ("FROM_TEMPLATE", "template"), ("SHARED", "from-template"), ("HF_HOME", "/hf")]
    {
        assert!(has_env(primary, name, value), "{name}={value} in {:?}", env_of(primary));
    }

    // A task with its own pod_template (k8sPod target): the task's values are the pod's, and win.
    let predict = task_pod("ml-gpu", "predict");
    assert_eq!(predict.target, "k8sPod");
    let (pod, _) = c.create(PLATFORM, &predict.pod, None).await;
    let primary = &pod["spec"]["containers"][0];
    assert_eq!(primary["name"], "primary");
    assert!(has_env(primary, "SHARED", "from-task"), "the task's own value wins: {:?}", env_of(primary));
    assert!(has_env(primary, "FROM_TASK", "task") && has_env(primary, "FROM_TEMPLATE", "template"));
    assert_eq!(env_of(primary).iter().filter(|(n, _)| n == "SHARED").count(), 1, "no duplicate");
    assert_eq!(
        (&pod["metadata"]["labels"]["task-own"], &pod["metadata"]["labels"]["team"]),
        (&json!("yes"), &json!("ml"))
    );

    // A snake_case environment; a task-name Flyte cut at 63 characters that kept its dot.
    let (pod, _) = c.create(PLATFORM, &task_pod("etl_batch", "load").pod, None).await;
    assert_eq!(pod["metadata"]["labels"]["team"], "data");
    assert!(applied(&pod).starts_with(&format!("flyte/etl-templates/etl_batch@{etl}; ")));
    let backfill = task_pods_of(long_env);
    assert!(backfill.task_name.len() > 63 && backfill.task_name_label.len() == 63, "{backfill:?}");
    let (pod, _) = c.create(PLATFORM, &backfill.pod, None).await;
    assert_eq!(pod["metadata"]["labels"]["team"], "research");
    let rule = format!("environment from task-name {}", backfill.task_name_label);
    assert_eq!(applied(&pod), format!("flyte/research-templates/{long_env}@{research}; {rule}"));

    // No environment: one without a template, one whose cut task-name has no dot. Sent (they are
    // Flyte's), answered, left alone.
    let no_template = task_pod("no-template", "noop");
    for pod in [no_template, reconciliation] {
        let (stored, sent) = c.create(PLATFORM, &pod.pod, None).await;
        assert_eq!(sent, 1, "{}", pod.task_name_label);
        assert_untouched(&stored, pod, &pod.task_name_label);
    }

    // The environment label and Flyte's labels: sent once (the chart's selections are exclusive),
    // and the explicit label wins.
    let mut both = train.pod.clone();
    both["metadata"]["labels"]["flyte.org/environment"] = json!("etl_batch");
    let (pod, sent) = c.create(PLATFORM, &both, Some("both-labels")).await;
    assert_eq!(sent, 1, "a pod matching both selections is sent once");
    assert_eq!(applied(&pod), format!("flyte/etl-templates/etl_batch@{etl}"), "the label wins; no rule recorded");

    // Never sent: a task-name label without the managed label, the managed label without a
    // task-name label, no labels at all.
    let mut unmanaged = train.pod.clone();
    unmanaged["metadata"]["labels"].as_object_mut().unwrap().remove("flyte.org/managed");
    let mut nameless = train.pod.clone();
    nameless["metadata"]["labels"].as_object_mut().unwrap().remove("task-name");
    let mut unlabelled = train.pod.clone();
    unlabelled["metadata"]["labels"] = json!({});
    for (what, pod) in [("unmanaged", unmanaged), ("nameless", nameless), ("unlabelled", unlabelled)] {
        let (stored, sent) = c.create(PLATFORM, &pod, Some(what)).await;
        assert_eq!(sent, 0, "{what}: never sent");
        assert!(stored["metadata"]["annotations"].get(APPLIED).is_none(), "{what}");
    }

    coexistence(&c).await;

    // Platform and namespace defaults (§8) apply to Flyte pods, below the environment's template;
    // and to a Flyte pod whose environment has no template.
    let tenant = "ml-team";
    support::ensure_namespace(&c.admin, tenant, json!({})).await;
    let platform_default =
        c.templates(PLATFORM, "platform-defaults", &[("defaults", "labels: {tier: platform}")]).await;
    let tenant_default =
        c.templates(tenant, "tenant-defaults", &[("defaults", "labels: {tier: tenant, tenant: ml}")]).await;
    let layers = format!(
        "flyte/platform-defaults/defaults@{platform_default},ml-team/tenant-defaults/defaults@{tenant_default}"
    );
    let (pod, _) = c.create(tenant, &task_pod("etl_batch", "load").pod, None).await;
    let labels = &pod["metadata"]["labels"];
    assert_eq!((&labels["tier"], &labels["tenant"], &labels["team"]), (&json!("tenant"), &json!("ml"), &json!("data")));
    assert_eq!(
        applied(&pod),
        format!("{layers},flyte/etl-templates/etl_batch@{etl}; environment from task-name etl_batch.load")
    );
    let (pod, _) = c.create(tenant, &no_template.pod, None).await;
    assert_eq!(pod["metadata"]["labels"]["tier"], "tenant");
    assert_eq!(applied(&pod), format!("{layers}; environment from task-name no-template.noop"));
}

/// The pod of the one task of `environment`.
fn task_pods_of(environment: &str) -> &'static TaskPod {
    let pods: Vec<_> = support::flyte::task_pods().iter().filter(|p| p.environment == environment).collect();
    assert_eq!(pods.len(), 1, "{environment}");
    pods[0]
}

/// What a fake webhook saw of each pod: did it already carry our applied record.
type Seen = Arc<Mutex<Vec<(String, bool)>>>;

/// A webhook like Flyte's secret injector (executor/pkg/webhook): for a pod labelled
/// `inject-flyte-secrets: "true"`, appends an env var to every container and a volume, blindly
/// (JSON Patch `-`), as its reinvocation policy `Never` allows; the env var's value names the
/// configuration that called it. Or, on `/mesh`, a mesh injector that adds a sidecar container.
async fn injectors(c: &Cluster, seen: Seen) -> u16 {
    use axum::routing::post;
    let respond = |review: &Value, patch: Vec<Value>| {
        use base64::Engine as _;
        let patch = base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&patch).unwrap());
        Json(json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {
            "uid": review["request"]["uid"], "allowed": true, "patchType": "JSONPatch", "patch": patch}}))
    };
    let record = move |review: &Value| {
        let pod = &review["request"]["object"];
        let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        seen.lock().unwrap().push((name, pod["metadata"]["annotations"].get(APPLIED).is_some()));
    };
    let secrets = {
        let record = record.clone();
        move |axum::extract::Path(config): axum::extract::Path<String>, Json(review): Json<Value>| async move {
            record(&review);
            let pod = &review["request"]["object"];
            let mut patch = vec![json!({"op": "add", "path": "/spec/volumes/-",
                "value": {"name": "flyte-secrets", "secret": {"secretName": "flyte-secrets"}}})];
            if pod["spec"].get("volumes").is_none() {
                patch[0] = json!({"op": "add", "path": "/spec/volumes", "value": [patch[0]["value"]]});
            }
            let var = json!({"name": "FLYTE_SECRETS_INJECTED_BY", "value": config});
            for (i, container) in pod["spec"]["containers"].as_array().unwrap().iter().enumerate() {
                patch.push(match container.get("env") {
                    Some(_) => json!({"op": "add", "path": format!("/spec/containers/{i}/env/-"), "value": var}),
                    None => json!({"op": "add", "path": format!("/spec/containers/{i}/env"), "value": [var]}),
                });
            }
            respond(&review, patch)
        }
    };
    let mesh = move |Json(review): Json<Value>| async move {
        record(&review);
        let containers = review["request"]["object"]["spec"]["containers"].as_array().unwrap();
        let patch = match containers.iter().any(|c| c["name"] == "mesh-proxy") {
            true => vec![],
            false => vec![json!({"op": "add", "path": "/spec/containers/-",
                "value": {"name": "mesh-proxy", "image": "registry.example/mesh-proxy:1"}})],
        };
        respond(&review, patch)
    };
    let app = axum::Router::new().route("/secrets/{config}", post(secrets)).route("/mesh", post(mesh));
    support::serve_router(app, &c.pki).await
}

/// A MutatingWebhookConfiguration named `name` (the API server calls configurations in name order)
/// calling `path` for pods of `namespace` selected by `labels`.
fn injector_config(
    name: &str,
    port: u16,
    path: &str,
    ca: &str,
    namespace: &str,
    labels: Value,
) -> MutatingWebhookConfiguration {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": format!("{name}.example.com"),
            "clientConfig": {"url": format!("https://127.0.0.1:{port}{path}"), "caBundle": support::b64(ca)},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "objectSelector": {"matchLabels": labels},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "sideEffects": "None", "admissionReviewVersions": ["v1"], "reinvocationPolicy": "Never",
            "failurePolicy": "Fail", "timeoutSeconds": 5,
        }]
    }))
    .unwrap()
}

/// Other mutating webhooks on the same pods (SPEC §9 "Coexistence"): Flyte's secret injector
/// ordered before ours, then after ours; a mesh injector after ours. Each time the stored pod has
/// both mutations, no duplicate env var or volume, one applied record, and the sidecar the
/// `default` template container.
async fn coexistence(c: &Cluster) {
    let ns = "coexist";
    support::ensure_namespace(&c.admin, ns, json!({})).await;
    let seen: Seen = Arc::default();
    let port = injectors(c, seen.clone()).await;
    let configs = Api::<MutatingWebhookConfiguration>::all(c.admin.clone());
    let secret_pod = task_pod("ml-gpu", "with_secret");
    assert!(secret_pod.secrets && secret_pod.pod["metadata"]["labels"]["inject-flyte-secrets"] == "true");
    let secret_labels = json!({"inject-flyte-secrets": "true"});
    let pods = Api::<Pod>::namespaced(c.admin.clone(), ns);

    // The chart's configuration is `ptw-pod-template-webhook`: `aaa-…` runs before it, `zzz-…` after.
    for (i, (config, before_ours)) in
        [("aaa-flyte-pod-webhook", true), ("zzz-flyte-pod-webhook", false)].into_iter().enumerate()
    {
        let injector =
            injector_config(config, port, &format!("/secrets/{config}"), &c.pki.ca_pem, ns, secret_labels.clone());
        configs.create(&PostParams::default(), &injector).await.unwrap();
        // The API server picks configurations up asynchronously: wait until dry runs show this one.
        let mut probe: Pod = serde_json::from_value(secret_pod.pod.clone()).unwrap();
        probe.metadata.namespace = Some(ns.into());
        let dry_run = PostParams { dry_run: true, ..PostParams::default() };
        let started = std::time::Instant::now();
        loop {
            let answer = serde_json::to_value(pods.create(&dry_run, &probe).await.unwrap()).unwrap();
            if has_env(&answer["spec"]["containers"][0], "FLYTE_SECRETS_INJECTED_BY", config) {
                break;
            }
            assert!(started.elapsed() < LIMIT, "the API server never called {config}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen.lock().unwrap().clear();
        let name = format!("secrets-{i}");
        let (pod, _) = c.create(ns, &secret_pod.pod, Some(&name)).await;
        let calls: Vec<bool> = seen.lock().unwrap().iter().filter(|(n, _)| *n == name).map(|(_, ours)| *ours).collect();
        assert_eq!(
            calls,
            [!before_ours],
            "{config}: called once, {} ours",
            if before_ours { "before" } else { "after" }
        );
        let primary = &pod["spec"]["containers"][0];
        let vars = env_of(primary);
        assert!(
            has_env(primary, "FLYTE_SECRETS_INJECTED_BY", config) && has_env(primary, "TZ", "UTC"),
            "{config}: {vars:?}"
        );
        let mut names: Vec<_> = vars.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), vars.len(), "{config}: no duplicate env var: {vars:?}");
        let volumes = pod["spec"]["volumes"].as_array().unwrap();
        assert_eq!(volumes.iter().filter(|v| v["name"] == "flyte-secrets").count(), 1, "{config}: {volumes:?}");
        assert_eq!(applied(&pod).matches("ml-gpu@").count(), 1, "{config}: one record: {}", applied(&pod));
        configs.delete(config, &DeleteParams::default()).await.unwrap();
    }

    // A mesh injector after ours adds a sidecar; the API server calls ours again (IfNeeded), and
    // the sidecar gets the `default` template container.
    let mesh =
        injector_config("zzz-mesh-injector", port, "/mesh", &c.pki.ca_pem, ns, json!({"flyte.org/managed": "true"}));
    configs.create(&PostParams::default(), &mesh).await.unwrap();
    let train = task_pod("ml-gpu", "train");
    let started = std::time::Instant::now();
    let pod = loop {
        let name = format!("mesh-{}", started.elapsed().as_millis());
        let (pod, _) = c.create(ns, &train.pod, Some(&name)).await;
        if pod["spec"]["containers"].as_array().unwrap().len() == 2 {
            break pod;
        }
        assert!(started.elapsed() < LIMIT, "the API server never called the mesh injector");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let sidecar = &pod["spec"]["containers"][1];
    assert_eq!(sidecar["name"], "mesh-proxy");
    assert_eq!(env_of(sidecar), [("TZ".to_owned(), "UTC".to_owned())], "the sidecar got the default container");
    assert!(!has_env(sidecar, "FROM_TEMPLATE", "template"), "the primary's template is the primary's");
    assert!(has_env(&pod["spec"]["containers"][0], "FROM_TEMPLATE", "template"));
    assert_eq!(applied(&pod).matches("ml-gpu@").count(), 1, "one record: {}", applied(&pod));
    configs.delete("zzz-mesh-injector", &DeleteParams::default()).await.unwrap();
}
