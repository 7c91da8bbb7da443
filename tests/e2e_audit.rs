//! `pod-template-webhook audit` (SPEC §10) against the real kube-apiserver, run as the real binary
//! with the API server's kubeconfig. Pods are made the way each class arises: created through the
//! chart's own MutatingWebhookConfiguration (current), then their template updated (outdated),
//! created with the webhook configuration deleted (missed), with no template for their environment
//! (untouched); a Succeeded pod and an unlabelled pod are never listed. Then 2,000 pods: the LIST
//! calls `audit` reports are checked against the API server's own `apiserver_request_total`.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use pod_template_webhook::admission::Policy;
use pod_template_webhook::names::Names;
use pod_template_webhook::server::AppState;
use pod_template_webhook::store::cluster::ClusterStore;
use pod_template_webhook::store::TemplateStore;
use serde_json::{json, Value};

const PLATFORM: &str = "flyte";
const NS: &str = "audit-a";
const SCALE_NS: &str = "audit-scale";
const APPLIED: &str = "flyte.org/pod-template-applied";
const LIMIT: Duration = Duration::from_secs(30);
const SCALE_PODS: usize = 2000;
const PAGE_SIZE: usize = 500;

struct Fixture {
    kubeconfig: std::path::PathBuf,
    url: String,
    ca_pem: String,
    state: Arc<AppState>,
    config: MutatingWebhookConfiguration,
}

async fn start(api: &support::ApiServer) -> Fixture {
    let admin = api.client().await;
    for ns in [PLATFORM, NS, SCALE_NS] {
        support::ensure_namespace(&admin, ns, json!({})).await;
    }
    let names = Names::default();
    let store = ClusterStore::spawn(admin.clone(), names.clone(), &[], Default::default());
    let state = AppState::with_metrics(store.clone(), Policy { names, ..Policy::default() }, Default::default());
    support::wait_for("the store syncs", LIMIT, || store.is_ready()).await;
    let pki = support::TestPki::new("ptw-audit-ca");
    let webhook = support::serve_webhook(state.clone(), &pki).await;
    let config = support::chart_mutating_webhook(webhook.port, &pki.ca_pem, &[]);
    Fixture { kubeconfig: api.kubeconfig.clone(), url: api.url.clone(), ca_pem: api.pki.ca_pem.clone(), state, config }
}

struct Cluster {
    admin: kube::Client,
    state: Arc<AppState>,
    kubeconfig: std::path::PathBuf,
}

impl Cluster {
    /// Creates or replaces a template ConfigMap of the platform namespace and waits until the
    /// webhook serves its version.
    async fn template(&self, name: &str, key: &str, text: &str) -> String {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"flyte.org/pod-templates": "true"}},
            "data": {key: text},
        }))
        .unwrap();
        let api = Api::<ConfigMap>::namespaced(self.admin.clone(), PLATFORM);
        let params = PatchParams::apply("e2e-audit").force();
        let version = api.patch(name, &params, &Patch::Apply(&cm)).await.unwrap().resource_version().unwrap();
        let store = &self.state.store;
        support::wait_for("the webhook serves the template", LIMIT, || {
            store.lookup(PLATFORM, key).entry.is_some_and(|e| e.source.version == version)
        })
        .await;
        version
    }

    async fn pod(&self, ns: &str, name: &str, labels: Value) -> Pod {
        create_pod(&self.admin, ns, name, labels).await
    }

    /// Runs the binary's `audit` with the API server's kubeconfig.
    fn audit(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_pod-template-webhook"))
            .arg("audit")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("PTW_PLATFORM_NAMESPACE", PLATFORM)
            .env_remove("POD_NAMESPACE")
            .env("RUST_LOG", "warn")
            .output()
            .expect("run pod-template-webhook audit")
    }
}

fn pod_manifest(name: &str, labels: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "primary", "image": "registry.k8s.io/pause:3.10"}]},
    }))
    .unwrap()
}

async fn create_pod(admin: &kube::Client, ns: &str, name: &str, labels: Value) -> Pod {
    let pods = Api::<Pod>::namespaced(admin.clone(), ns);
    pods.create(&PostParams::default(), &pod_manifest(name, labels))
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"))
}

fn recorded(pod: &Pod) -> Option<&str> {
    pod.annotations().get(APPLIED).map(String::as_str)
}

/// `-o json`: the pods by name, and the summary.
fn parse_json(out: &Output) -> (BTreeMap<String, Value>, Value) {
    assert!(out.status.success(), "audit failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let mut lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let summary = lines.pop().expect("a summary line")["summary"].clone();
    assert!(summary.is_object(), "{text}");
    let pods =
        lines.into_iter().map(|p| (format!("{}/{}", p["namespace"].as_str().unwrap(), p["name"].as_str().unwrap()), p));
    (pods.collect(), summary)
}

/// The API server's own count of LIST requests for pods, from its `/metrics`.
async fn pod_lists(admin: &kube::Client) -> u64 {
    let request = axum::http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = admin.request_text(request).await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains("resource=\"pods\"") && l.contains("verb=\"LIST\"") && l.contains("subresource=\"\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_classifies_the_selected_pods_and_pages_through_them() {
    let fixture = support::fixture("e2e-audit", |api, rt| rt.block_on(start(api)));
    let admin = support::kubeconfig_client(&fixture.kubeconfig).await;
    let c = Cluster { admin: admin.clone(), state: fixture.state, kubeconfig: fixture.kubeconfig };
    let gpu_v1 = c.template("gpu-templates", "gpu", "labels: {team: ml}").await;
    let cpu = c.template("cpu-templates", "cpu", "labels: {team: data}").await;
    let webhooks = Api::<MutatingWebhookConfiguration>::all(admin.clone());
    webhooks.create(&PostParams::default(), &fixture.config).await.unwrap();

    // (a) Through the webhook: each gets its record. The API server reads its webhook
    // configurations through an informer: wait until it sends pods (probes, deleted at once: an
    // unscheduled pod has no grace period).
    let pods = Api::<Pod>::namespaced(admin.clone(), NS);
    let sent = |probe: &Pod| recorded(probe).is_some();
    probe_until(&c, &pods, "the API server calls the webhook", sent).await;
    let gpu_pod = c.pod(NS, "gpu-1", json!({"flyte.org/environment": "gpu"})).await;
    assert_eq!(recorded(&gpu_pod), Some(format!("flyte/gpu-templates/gpu@{gpu_v1}").as_str()));
    let cpu_pod = c.pod(NS, "cpu-1", json!({"flyte.org/environment": "cpu"})).await;
    assert_eq!(recorded(&cpu_pod), Some(format!("flyte/cpu-templates/cpu@{cpu}").as_str()));
    // A Flyte task pod: no environment label, the environment in its task-name (the chart's
    // second webhook entry).
    let flyte = json!({"flyte.org/managed": "true", "task-name": "gpu.train", "project": "p", "domain": "development"});
    let flyte_pod = c.pod(NS, "flyte-gpu", flyte).await;
    assert!(recorded(&flyte_pod).unwrap().ends_with("; environment from task-name gpu.train"));

    // (b) The gpu template changes: its pods are outdated, the cpu pod stays current.
    let gpu_v2 = c.template("gpu-templates", "gpu", "labels: {team: ml, tier: gold}").await;
    assert_ne!(gpu_v1, gpu_v2);

    // (c) The webhook configuration deleted: pods are created without it (missed).
    webhooks.delete(fixture.config.metadata.name.as_deref().unwrap(), &DeleteParams::default()).await.unwrap();
    probe_until(&c, &pods, "the API server stops calling the webhook", |probe| recorded(probe).is_none()).await;
    let missed = c.pod(NS, "missed-cpu", json!({"flyte.org/environment": "cpu"})).await;
    assert_eq!(recorded(&missed), None);
    c.pod(NS, "missed-flyte", json!({"flyte.org/managed": "true", "task-name": "cpu.load"})).await;
    // (d) Nothing applies: an environment without a template, a Flyte pod likewise.
    c.pod(NS, "untouched-env", json!({"flyte.org/environment": "nothing"})).await;
    c.pod(NS, "untouched-flyte", json!({"flyte.org/managed": "true", "task-name": "nothing.run"})).await;
    // Never listed: a finished pod, a pod the webhook does not select.
    c.pod(NS, "done", json!({"flyte.org/environment": "gpu"})).await;
    let status = Patch::Merge(json!({"status": {"phase": "Succeeded"}}));
    let done = pods.patch_status("done", &PatchParams::default(), &status).await.unwrap();
    assert_eq!(done.status.unwrap().phase.as_deref(), Some("Succeeded"));
    c.pod(NS, "plain", json!({"app": "other"})).await;

    let json_out = c.audit(&["-n", NS, "-o", "json"]);
    eprintln!("audit -n {NS} -o json:\n{}", String::from_utf8_lossy(&json_out.stdout));
    let (found, summary) = parse_json(&json_out);
    let classes: BTreeMap<&str, &str> =
        found.iter().map(|(k, v)| (k.strip_prefix("audit-a/").unwrap(), v["class"].as_str().unwrap())).collect();
    assert_eq!(
        classes,
        BTreeMap::from([
            ("cpu-1", "current"),
            ("flyte-gpu", "outdated"),
            ("gpu-1", "outdated"),
            ("missed-cpu", "missed"),
            ("missed-flyte", "missed"),
            ("untouched-env", "untouched"),
            ("untouched-flyte", "untouched"),
        ])
    );
    let gpu = &found["audit-a/gpu-1"];
    assert_eq!(gpu["recorded"], json!([format!("flyte/gpu-templates/gpu@{gpu_v1}")]));
    assert_eq!(gpu["now"], json!([format!("flyte/gpu-templates/gpu@{gpu_v2}")]));
    assert_eq!(
        gpu["reason"],
        format!(
            "flyte/gpu-templates/gpu changed: flyte/gpu-templates/gpu@{gpu_v1} -> flyte/gpu-templates/gpu@{gpu_v2}"
        )
    );
    assert_eq!(found["audit-a/missed-flyte"]["now"], json!([format!("flyte/cpu-templates/cpu@{cpu}")]));
    assert_eq!(found["audit-a/missed-cpu"]["recorded"], Value::Null);
    assert_eq!(
        (summary["pods"].as_u64(), summary["outdated"].as_u64(), summary["missed"].as_u64()),
        (Some(7), Some(2), Some(2))
    );

    // Text, for the README.
    let text = c.audit(&["-n", NS]);
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    eprintln!("audit -n {NS}:\n{text}");
    assert!(text.contains("flyte/gpu-templates/gpu") && text.contains("audit-a/missed-cpu"), "{text}");
    assert!(text.contains("7 pods: 1 current, 2 outdated, 2 missed, 2 untouched"), "{text}");

    // --fail-on: exit 1 naming the pods, and only those classes.
    let failed = c.audit(&["-n", NS, "--fail-on", "outdated,missed"]);
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    eprintln!("--fail-on outdated,missed: {stderr}");
    for pod in ["gpu-1 (outdated)", "flyte-gpu (outdated)", "missed-cpu (missed)", "missed-flyte (missed)"] {
        assert!(stderr.contains(&format!("audit-a/{pod}")), "{pod}: {stderr}");
    }
    assert!(!stderr.contains("cpu-1") && !stderr.contains("untouched"), "{stderr}");
    assert_eq!(c.audit(&["-n", NS, "--fail-on", "outdated"]).status.code(), Some(1));
    assert_eq!(c.audit(&["-n", "default", "--fail-on", "outdated,missed"]).status.code(), Some(0), "no pods there");
    // One of -n / -A is required.
    let neither = c.audit(&[]);
    assert_eq!(neither.status.code(), Some(2), "{}", String::from_utf8_lossy(&neither.stderr));

    as_the_charts_cronjob(&c, &fixture.url, &fixture.ca_pem).await;
    scale(&c).await;
}

/// The chart's audit objects applied to the API server; the binary run with the CronJob's own
/// arguments and environment, as its ServiceAccount: the list-only RBAC is enough, and the Job
/// fails naming the pods.
async fn as_the_charts_cronjob(c: &Cluster, url: &str, ca_pem: &str) {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let objects =
        support::helm_template(PLATFORM, &["--show-only", "templates/audit.yaml", "--set", "audit.enabled=true"]);
    let of = |kind: &str| objects.iter().find(|o| o["kind"] == kind).unwrap_or_else(|| panic!("a {kind}")).clone();
    let sa: ServiceAccount = serde_json::from_value(of("ServiceAccount")).unwrap();
    let name = sa.name_any();
    let pp = PostParams::default();
    Api::<ServiceAccount>::namespaced(c.admin.clone(), PLATFORM).create(&pp, &sa).await.unwrap();
    let role: ClusterRole = serde_json::from_value(of("ClusterRole")).unwrap();
    Api::<ClusterRole>::all(c.admin.clone()).create(&pp, &role).await.unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(of("ClusterRoleBinding")).unwrap();
    Api::<ClusterRoleBinding>::all(c.admin.clone()).create(&pp, &binding).await.unwrap();
    let token = support::service_account_token(&c.admin, PLATFORM, &name).await;
    let kubeconfig = c.kubeconfig.with_file_name("audit-sa.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: ptw\n  cluster:\n    server: {url}\n    certificate-authority-data: {}\n\
             users:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: sa\n  context: {{cluster: ptw, user: sa}}\ncurrent-context: sa\n",
            support::b64(ca_pem)
        ),
    )
    .unwrap();
    let cron = of("CronJob");
    let container = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pod-template-webhook"));
    cmd.args(&args).arg("--kubeconfig").arg(&kubeconfig).env_remove("POD_NAMESPACE");
    for e in container["env"].as_array().unwrap() {
        cmd.env(e["name"].as_str().unwrap(), e["value"].as_str().unwrap());
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the CronJob's audit ({args:?}) as {name}: {stderr}");
    assert!(stderr.contains("audit-a/gpu-1 (outdated)") && stderr.contains("audit-a/missed-cpu (missed)"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("forbidden"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("7 pods: 1 current, 2 outdated, 2 missed, 2 untouched"), "{stdout}");
}

/// Creates (and deletes) probe pods of an environment with a template until `done` holds for one.
async fn probe_until(c: &Cluster, pods: &Api<Pod>, what: &str, done: impl Fn(&Pod) -> bool) {
    static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    loop {
        let name = format!("probe-{}", PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let probe = c.pod(NS, &name, json!({"flyte.org/environment": "cpu"})).await;
        pods.delete(&name, &DeleteParams::default().grace_period(0)).await.unwrap();
        if done(&probe) {
            return;
        }
        assert!(started.elapsed() < LIMIT, "{what}: not within {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 2,000 missed pods (created without the webhook, for speed) in pages of 500.
async fn scale(c: &Cluster) {
    let started = Instant::now();
    let admin = c.admin.clone();
    let created = futures::stream::iter(0..SCALE_PODS)
        .map(|i| {
            let admin = admin.clone();
            async move {
                create_pod(&admin, SCALE_NS, &format!("bulk-{i:04}"), json!({"flyte.org/environment": "cpu"})).await
            }
        })
        .buffer_unordered(16)
        .count()
        .await;
    assert_eq!(created, SCALE_PODS);
    eprintln!("created {SCALE_PODS} pods in {:?}", started.elapsed());

    let before = pod_lists(&admin).await;
    let run = Instant::now();
    let out = c.audit(&["-n", SCALE_NS, "-o", "json", "--page-size", &PAGE_SIZE.to_string()]);
    let wall = run.elapsed();
    let after = pod_lists(&admin).await;
    let (found, summary) = parse_json(&out);
    assert_eq!(found.len(), SCALE_PODS);
    assert!(found.values().all(|p| p["class"] == "missed"));
    let expected = SCALE_PODS.div_ceil(PAGE_SIZE) + 1;
    assert_eq!(summary["list_calls"].as_u64(), Some(expected as u64), "{summary}");
    assert_eq!(summary["selectors"][0]["pages"].as_u64(), Some(SCALE_PODS.div_ceil(PAGE_SIZE) as u64), "{summary}");
    assert_eq!(after - before, expected as u64, "the API server counted {} LIST calls for pods", after - before);
    eprintln!(
        "audit of {SCALE_PODS} pods, --page-size {PAGE_SIZE}: {} list calls (API server: {}), pages {}, \
         process wall time {wall:?}, reported {}s",
        summary["list_calls"],
        after - before,
        summary["selectors"],
        summary["seconds"]
    );
    let text = c.audit(&["-n", SCALE_NS, "--page-size", &PAGE_SIZE.to_string()]);
    let text = String::from_utf8(text.stdout).unwrap();
    eprintln!("audit -n {SCALE_NS} (last line): {}", text.lines().last().unwrap_or_default());
}
