//! `explain` (SPEC §10) end to end: the real binary against the real kube-apiserver, with the
//! chart's own MutatingWebhookConfiguration (its labels kept, so `explain` finds it by them; only
//! the clientConfig points at the webhook on loopback) and pods the webhook really mutated, so the
//! applied records `explain` compares are the ones `serve` wrote.
//!
//! One test, in steps: updating the platform default changes what every later step sees.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodTemplate};
use kube::api::{Api, PostParams};
use kube::ResourceExt;
use pod_template_webhook::admission::Policy;
use pod_template_webhook::names::Names;
use pod_template_webhook::server::AppState;
use pod_template_webhook::store::cluster::ClusterStore;
use pod_template_webhook::store::TemplateStore;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_pod-template-webhook");
const PLATFORM: &str = "flyte";
const TEAM: &str = "ml-team";
/// Left out by the chart's namespaceSelector (`webhook.excludeNamespaces`).
const QUARANTINE: &str = "quarantine";
const LIMIT: Duration = Duration::from_secs(20);

struct Fixture {
    kubeconfig: PathBuf,
    state: Arc<AppState>,
    reviews: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    /// The name the chart gave the configuration.
    configuration: String,
}

async fn start(api: &support::ApiServer) -> Fixture {
    let admin = api.client().await;
    for ns in [PLATFORM, TEAM, QUARANTINE] {
        support::ensure_namespace(&admin, ns, json!({})).await;
    }
    let names = Names::default();
    let store = ClusterStore::spawn(admin.clone(), names.clone(), &[], Default::default());
    let policy = Policy { names, default_template: Some("defaults".into()), ..Policy::default() };
    let state = AppState::with_metrics(store.clone(), policy, Default::default());
    support::wait_for("the store syncs", Duration::from_secs(30), || store.is_ready()).await;
    let pki = support::TestPki::new("ptw-explain-ca");
    let webhook = support::serve_webhook(state.clone(), &pki).await;
    let set = format!("webhook.excludeNamespaces[0]={QUARANTINE}");
    let config = support::chart_mutating_webhook(webhook.port, &pki.ca_pem, &[&set]);
    let labels = config.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("app.kubernetes.io/part-of").map(String::as_str), Some("pod-template-webhook"), "{labels:?}");
    let created =
        Api::<MutatingWebhookConfiguration>::all(admin).create(&PostParams::default(), &config).await.unwrap();
    Fixture { kubeconfig: api.kubeconfig.clone(), state, reviews: webhook.reviews, configuration: created.name_any() }
}

/// Creates or replaces the platform default; waits until the webhook serves that version.
async fn platform_default(c: &kube::Client, state: &AppState, text: &str) -> String {
    let api = Api::<ConfigMap>::namespaced(c.clone(), PLATFORM);
    let mut cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "platform-defaults", "labels": {"flyte.org/pod-templates": "true"}},
        "data": {"defaults": text},
    }))
    .unwrap();
    let version = match api.get_opt("platform-defaults").await.unwrap() {
        None => api.create(&PostParams::default(), &cm).await.unwrap(),
        Some(old) => {
            cm.metadata.resource_version = old.resource_version();
            api.replace("platform-defaults", &PostParams::default(), &cm).await.unwrap()
        }
    }
    .resource_version()
    .unwrap();
    support::wait_for("the webhook serves the default", LIMIT, || {
        state.store.lookup(PLATFORM, "defaults").entry.is_some_and(|e| e.source.version == version)
    })
    .await;
    version
}

/// The team's `gpu` template, a PodTemplate object of its own namespace.
async fn gpu_template(c: &kube::Client, state: &AppState) -> String {
    let object: PodTemplate = serde_json::from_value(json!({
        "metadata": {"name": "gpu", "labels": {"flyte.org/pod-templates": "true"}},
        "template": {"spec": {
            "containers": [{"name": "default", "image": "docker.io/rwgrim/docker-noop", "env": [{"name": "GPU", "value": "1"}]}],
            "nodeSelector": {"accelerator": "nvidia"},
        }},
    }))
    .unwrap();
    let created = Api::<PodTemplate>::namespaced(c.clone(), TEAM).create(&PostParams::default(), &object).await;
    let version = created.unwrap().resource_version().unwrap();
    support::wait_for("the webhook serves the PodTemplate", LIMIT, || {
        state.store.lookup(TEAM, "gpu").entry.is_some_and(|e| e.source.version == version)
    })
    .await;
    version
}

fn pod(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
           "spec": {"containers": [{"name": "main", "image": "registry.example/task:1.0"}]}})
}

async fn create(c: &kube::Client, ns: &str, pod: &Value) -> Pod {
    let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
    Api::<Pod>::namespaced(c.clone(), ns).create(&PostParams::default(), &typed).await.unwrap()
}

/// `pod-template-webhook explain ARGS...` as the platform runs the webhook: (exit code, stdout, stderr).
async fn explain(kubeconfig: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(BIN)
        .arg("explain")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--platform-namespace", PLATFORM, "--default-template", "defaults"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

async fn explain_json(kubeconfig: &std::path::Path, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let (code, out, err) = explain(kubeconfig, &args).await;
    assert_eq!(code, 0, "explain {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Each entry of the one configuration: name → the clauses that exclude the pod.
fn verdicts(report: &Value) -> BTreeMap<String, Vec<String>> {
    let configurations = report["configurations"].as_array().unwrap();
    assert_eq!(configurations.len(), 1, "{report}");
    let entries = configurations[0]["webhooks"].as_array().unwrap();
    entries
        .iter()
        .map(|w| {
            let excluded = w["excluded_by"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned());
            (w["name"].as_str().unwrap().to_owned(), excluded.collect())
        })
        .collect()
}

/// (role, source, kind, searched) of each layer.
fn layers(report: &Value) -> Vec<(String, String, String, Vec<String>)> {
    let s = |v: &Value| v.as_str().unwrap().to_owned();
    report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (s(&l["role"]), s(&l["source"]), s(&l["kind"]), l["searched"].as_array().unwrap().iter().map(s).collect())
        })
        .collect()
}

fn patch(report: &Value) -> BTreeMap<String, String> {
    let entries = report["patch"].as_array().unwrap();
    entries.iter().map(|p| (p["path"].as_str().unwrap().to_owned(), p["layer"].as_str().unwrap().to_owned())).collect()
}

const LABEL_ENTRY: &str = "pod-templates.flyte.org";
const TASK_ENTRY: &str = "task-name.pod-templates.flyte.org";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_live_and_file_pods() {
    let fixture = support::fixture("e2e-explain", |api, rt| rt.block_on(start(api)));
    let kc = fixture.kubeconfig.as_path();
    let admin = support::kubeconfig_client(kc).await;
    let state = &fixture.state;
    let v1 = platform_default(&admin, state, "labels: {platform: v1}").await;
    let gpu = gpu_template(&admin, state).await;
    let (default_v1, gpu_source) =
        (format!("flyte/platform-defaults/defaults@{v1}"), format!("ml-team/podtemplate:gpu/gpu@{gpu}"));

    // (b) A live pod the webhook mutated: sent by the label entry, its layers and where they were
    // found, and a record equal to what would be applied now.
    let stored = create(&admin, TEAM, &pod("train", json!({"flyte.org/environment": "gpu"}))).await;
    let applied = stored.annotations().get("flyte.org/pod-template-applied").cloned().expect("mutated");
    assert_eq!(applied, format!("{default_v1},{gpu_source}"));
    let report = explain_json(kc, &["-n", TEAM, "train"]).await;
    assert_eq!(report["from"], "live");
    assert_eq!(report["sent"], true);
    let entries = verdicts(&report);
    assert_eq!(entries[LABEL_ENTRY], Vec::<String>::new());
    assert_eq!(
        entries[TASK_ENTRY],
        ["objectSelector: matchExpressions[0] flyte.org/environment DoesNotExist: pod label flyte.org/environment=gpu"]
    );
    assert_eq!(report["rule"], "label flyte.org/environment");
    let platform_only = vec![PLATFORM.to_owned()];
    assert_eq!(
        layers(&report),
        [
            ("platform default".into(), default_v1.clone(), "ConfigMap".into(), platform_only.clone()),
            ("template".into(), gpu_source.clone(), "PodTemplate".into(), vec![TEAM.into(), PLATFORM.into()]),
        ]
    );
    assert_eq!((&report["record"]["applied"], &report["record"]["now"]), (&json!(applied), &json!(applied)));
    assert_eq!(report["record"]["state"], "current");
    assert!(patch(&report).is_empty(), "nothing left to change on a current pod: {}", report["patch"]);
    let (code, text, err) = explain(kc, &["-n", TEAM, "train"]).await;
    assert_eq!(code, 0, "{err}");
    eprintln!("--- explain -n {TEAM} train (current)\n{text}");
    assert!(
        text.contains(&format!("{} (labelled app.kubernetes.io/part-of=pod-template-webhook)", fixture.configuration))
    );
    assert!(text.contains(&format!("    {LABEL_ENTRY}: sent\n")), "{text}");

    // The platform default changes: the pod is outdated, both records shown, and the patch it
    // would get now adds the new field, set by the platform default's new version.
    let v2 = platform_default(&admin, state, "labels: {platform: v1, tier: gold}").await;
    let default_v2 = format!("flyte/platform-defaults/defaults@{v2}");
    let report = explain_json(kc, &["-n", TEAM, "train"]).await;
    assert_eq!(report["record"]["state"], "outdated");
    assert_eq!(report["record"]["applied"], json!(applied));
    assert_eq!(report["record"]["now"], json!(format!("{default_v2},{gpu_source}")));
    let paths = patch(&report);
    assert_eq!(paths.get("/metadata/labels/tier"), Some(&format!("platform default {default_v2}")), "{paths:?}");
    assert!(paths.get("/metadata/annotations/flyte.org~1pod-template-applied").is_some_and(|l| l.contains("record")));
    let (code, text, _) = explain(kc, &["-n", TEAM, "train"]).await;
    assert_eq!(code, 0);
    eprintln!("--- explain -n {TEAM} train (after the default changed)\n{text}");
    assert!(
        text.contains(&format!("  applied: {applied}\n"))
            && text.contains(&format!(
                "  => outdated: flyte/platform-defaults/defaults changed: {default_v1} -> {default_v2}\n"
            )),
        "{text}"
    );

    // (c) A pod not created yet, from a file: every path the webhook would set, with its layer.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.yaml");
    let manifest = pod("predict", json!({"flyte.org/environment": "gpu"}));
    std::fs::write(&file, pod_template_webhook::yaml::to_string(&manifest).unwrap()).unwrap();
    let report = explain_json(kc, &["-n", TEAM, "-f", file.to_str().unwrap()]).await;
    assert_eq!(
        (&report["from"], &report["sent"], &report["record"]["state"]),
        (&json!("file"), &json!(true), &json!("new"))
    );
    let paths = patch(&report);
    let template = format!("template {gpu_source}");
    assert_eq!(paths.get("/spec/nodeSelector"), Some(&template), "{paths:?}");
    assert_eq!(paths.get("/spec/containers/0/env"), Some(&template), "{paths:?}");
    assert_eq!(paths.get("/metadata/labels/tier"), Some(&format!("platform default {default_v2}")), "{paths:?}");
    assert!(Api::<Pod>::namespaced(admin.clone(), TEAM).get_opt("predict").await.unwrap().is_none(), "not created");

    // A shadow ConfigMap key of the same name in the team namespace would hide the PodTemplate
    // if enforced: explain shows what it would change, and the patch stays the PodTemplate's.
    let shadow: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "gpu-next", "labels": {"flyte.org/pod-templates": "true"},
                     "annotations": {"flyte.org/pod-template-mode": "shadow"}},
        "data": {"gpu": "podSpec: {nodeSelector: {gpu: h100}}"},
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(admin.clone(), TEAM).create(&PostParams::default(), &shadow).await.unwrap();
    let report = explain_json(kc, &["-n", TEAM, "-f", file.to_str().unwrap()]).await;
    assert_eq!(patch(&report).get("/spec/nodeSelector"), Some(&template), "a shadow is never applied");
    assert_eq!(report["shadows"][0]["template"], format!("{TEAM}/gpu-next/gpu"), "{report}");
    let paths = report["shadows"][0]["outcome"]["evaluated"]["paths"].as_array().unwrap();
    assert!(paths.contains(&json!("/spec/nodeSelector/gpu")), "{paths:?}");
    let (_, text, _) = explain(kc, &["-n", TEAM, "-f", file.to_str().unwrap()]).await;
    assert!(text.contains(&format!("  shadow \"gpu\": {TEAM}/gpu-next/gpu (never applied): would_change: ")), "{text}");
    Api::<ConfigMap>::namespaced(admin.clone(), TEAM).delete("gpu-next", &Default::default()).await.unwrap();

    // (d) A pod without labels: neither entry's objectSelector takes it, and the webhook was not called.
    let before = fixture.reviews.lock().unwrap().get(TEAM).copied().unwrap_or(0);
    create(
        &admin,
        TEAM,
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "main", "image": "registry.example/web:1"}]}}),
    )
    .await;
    assert_eq!(
        fixture.reviews.lock().unwrap().get(TEAM).copied().unwrap_or(0),
        before,
        "the API server did not call it"
    );
    let report = explain_json(kc, &["-n", TEAM, "plain"]).await;
    assert_eq!((&report["sent"], &report["record"]["state"]), (&json!(false), &json!("not sent")));
    let entries = verdicts(&report);
    assert_eq!(
        entries[LABEL_ENTRY],
        ["objectSelector: matchExpressions[0] flyte.org/environment Exists: pod has no label flyte.org/environment"]
    );
    assert_eq!(
        entries[TASK_ENTRY],
        ["objectSelector: matchExpressions[1] flyte.org/managed In [true]: pod has no label flyte.org/managed"]
    );

    // (a) A pod in a namespace the chart's namespaceSelector leaves out: created unmutated, and
    // explain names the clause.
    let stored = create(&admin, QUARANTINE, &pod("held", json!({"flyte.org/environment": "gpu"}))).await;
    assert!(stored.annotations().get("flyte.org/pod-template-applied").is_none());
    assert_eq!(fixture.reviews.lock().unwrap().get(QUARANTINE), None);
    let report = explain_json(kc, &["-n", QUARANTINE, "held"]).await;
    assert_eq!(report["sent"], false);
    let excluded = format!(
        "namespaceSelector: matchExpressions[0] kubernetes.io/metadata.name NotIn [kube-system, kube-public, kube-node-lease, {QUARANTINE}]: namespace label kubernetes.io/metadata.name={QUARANTINE}"
    );
    assert_eq!(verdicts(&report)[LABEL_ENTRY], [excluded]);
    let (_, text, _) = explain(kc, &["-n", QUARANTINE, "held"]).await;
    eprintln!("--- explain -n {QUARANTINE} held\n{text}");
    assert!(text.contains("Templates (if it were sent)"), "{text}");

    // A pod that does not exist: a clear error, non-zero. A configuration asked for by name that
    // does not exist: said, and the pod would not be mutated at all.
    let (code, _, err) = explain(kc, &["-n", TEAM, "nope"]).await;
    assert_ne!(code, 0);
    assert!(err.contains(&format!("pod {TEAM}/nope not found")), "{err}");
    let (code, text, _) = explain(kc, &["-n", TEAM, "train", "--webhook-configuration", "other"]).await;
    assert_eq!(code, 0);
    assert!(text.contains("MutatingWebhookConfiguration other does not exist"), "{text}");
    assert!(text.contains("it would not be mutated at all"), "{text}");
    // Exactly one of a name and -f.
    let (code, _, err) = explain(kc, &["-n", TEAM, "train", "-f", file.to_str().unwrap()]).await;
    assert_ne!(code, 0, "{err}");
}
