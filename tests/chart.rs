//! The Helm chart (`charts/pod-template-webhook`), with a real `helm` built from its Go module:
//!
//! - `helm lint --strict` and `helm template` over every `ci/*-values.yaml`, with assertions on the
//!   rendered objects (webhook selectors and exclusions, pod hardening, least-privilege RBAC, PDB,
//!   certificate modes, schema rejecting typos, deterministic builtin rendering);
//! - `helm install` into the REAL kube-apiserver of the test fixture, with the webhook running in
//!   this process AS THE CHART'S ServiceAccount (a TokenRequest token, not admin): it loads
//!   templates and pods get mutated through the chart's MutatingWebhookConfiguration (the chart's
//!   RBAC is enough), and the same identity is refused Secrets and ConfigMap writes (it is no more).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use pod_template_webhook::admission::Policy;
use pod_template_webhook::names::Names;
use pod_template_webhook::server::AppState;
use pod_template_webhook::store::cluster::ClusterStore;
use pod_template_webhook::store::TemplateStore;
use pod_template_webhook::tls;
use serde_json::{json, Value};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/pod-template-webhook");
const HELM_LIMIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// helm

fn helm_bin() -> &'static PathBuf {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| support::tool("helm"))
}

/// helm's own config/cache/data directories: never the user's.
fn helm_home() -> &'static Path {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    HOME.get_or_init(|| tempfile::Builder::new().prefix("ptw-helm-home-").tempdir().unwrap()).path()
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `cmd`, killing it after `limit` (every wait in these tests is bounded).
fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { ok: status.success(), stdout: out_reader.join().unwrap(), stderr: err_reader.join().unwrap() }
}

fn helm(args: &[&str]) -> Output {
    let home = helm_home();
    let mut cmd = Command::new(helm_bin());
    cmd.args(args)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG");
    run_bounded(&mut cmd, HELM_LIMIT)
}

fn ci_values_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(CHART).join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().ends_with("-values.yaml"))
        .collect();
    files.sort();
    files
}

/// `helm template` → the rendered objects (hooks included), or helm's error text.
fn render(release: &str, namespace: &str, values: Option<&Path>, sets: &[&str]) -> Result<Vec<Value>, String> {
    let mut args = vec!["template", release, CHART, "--namespace", namespace];
    let file;
    if let Some(v) = values {
        file = v.to_str().unwrap().to_owned();
        args.extend(["--values", &file]);
    }
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = helm(&args);
    if !out.ok {
        return Err(out.stderr);
    }
    Ok(parse_docs(&out.stdout))
}

fn render_ok(release: &str, namespace: &str, values: Option<&Path>, sets: &[&str]) -> Vec<Value> {
    render(release, namespace, values, sets)
        .unwrap_or_else(|e| panic!("helm template failed ({values:?} {sets:?}):\n{e}"))
}

fn parse_docs(text: &str) -> Vec<Value> {
    pod_template_webhook::yaml::documents(text).unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{text}"))
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(objects, kind);
    assert_eq!(found.len(), 1, "expected exactly one {kind}, got {}", found.len());
    found[0]
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|s| s.as_str().unwrap_or_default().to_owned()).collect()).unwrap_or_default()
}

/// The value at `path` (dotted) in a ci values file, falling back to the chart's values.yaml.
fn value_of(values: &Value, path: &str) -> Value {
    static DEFAULTS: OnceLock<Value> = OnceLock::new();
    let defaults = DEFAULTS.get_or_init(|| {
        pod_template_webhook::yaml::from_str(&std::fs::read_to_string(Path::new(CHART).join("values.yaml")).unwrap())
            .unwrap()
    });
    let pointer = format!("/{}", path.replace('.', "/"));
    values.pointer(&pointer).or_else(|| defaults.pointer(&pointer)).cloned().unwrap_or(Value::Null)
}

fn env_of(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (e["name"].as_str().unwrap().to_owned(), e.get("value").cloned().unwrap_or_else(|| e["valueFrom"].clone()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// static checks

#[test]
fn lint_strict_passes_with_every_ci_values_file() {
    let files = ci_values_files();
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for wanted in
        ["default", "certmanager", "existing-secret", "watch-namespaces", "single-replica", "url-mode", "custom-names"]
    {
        assert!(names.contains(&format!("{wanted}-values.yaml")), "ci/{wanted}-values.yaml is missing: {names:?}");
    }
    let started = Instant::now();
    for file in &files {
        let out = helm(&["lint", "--strict", CHART, "--namespace", "flyte", "--values", file.to_str().unwrap()]);
        assert!(out.ok, "helm lint --strict with {}:\n{}{}", file.display(), out.stdout, out.stderr);
        assert!(out.stdout.contains("0 chart(s) failed"), "{}", out.stdout);
    }
    eprintln!("helm lint --strict x{} in {:?}", files.len(), started.elapsed());
}

#[test]
fn every_ci_permutation_renders_a_safe_webhook() {
    let started = Instant::now();
    let files = ci_values_files();
    for file in &files {
        let values: Value = pod_template_webhook::yaml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let values = if values.is_null() { json!({}) } else { values };
        let objects = render_ok("ptw", "flyte", Some(file), &[]);
        let ctx = file.file_name().unwrap().to_string_lossy().into_owned();
        check_webhook(&objects, &values, "flyte", &ctx);
        check_workload(&objects, &values, &ctx);
        check_rbac(&objects, &values, "flyte", &ctx);
        check_certificates(&objects, &values, "flyte", &ctx);
        // PDB only when replicas > 1.
        let replicas = value_of(&values, "replicas").as_i64().unwrap();
        assert_eq!(
            of_kind(&objects, "PodDisruptionBudget").len(),
            usize::from(replicas > 1),
            "{ctx}: PDB with {replicas} replicas"
        );
        if replicas > 1 {
            let pdb = one(&objects, "PodDisruptionBudget");
            assert_eq!(pdb["spec"]["selector"], one(&objects, "Deployment")["spec"]["selector"], "{ctx}");
        }
        // Optional objects are off by default.
        for (kind, key) in [
            ("NetworkPolicy", "networkPolicy.enabled"),
            ("ServiceMonitor", "serviceMonitor.enabled"),
            ("PrometheusRule", "metrics.prometheusRule.enabled"),
        ] {
            let on = value_of(&values, key).as_bool().unwrap();
            assert_eq!(of_kind(&objects, kind).len(), usize::from(on), "{ctx}: {kind}");
        }
        let (dashboards, examples): (Vec<&Value>, Vec<&Value>) = of_kind(&objects, "ConfigMap")
            .into_iter()
            .partition(|cm| cm["metadata"]["name"].as_str().unwrap().ends_with("-dashboard"));
        let dashboard_on = value_of(&values, "metrics.dashboard.enabled").as_bool().unwrap();
        assert_eq!(dashboards.len(), usize::from(dashboard_on), "{ctx}: dashboard");
        assert_eq!(
            examples.len(),
            usize::from(value_of(&values, "exampleTemplates.enabled").as_bool().unwrap()),
            "{ctx}"
        );
        for cm in examples {
            let label = value_of(&values, "config.sourceLabel");
            assert_eq!(cm["metadata"]["labels"][label.as_str().unwrap()], "true", "{ctx}");
            // The example must be a template the webhook accepts.
            for (key, text) in cm["data"].as_object().unwrap() {
                pod_template_webhook::template::PodTemplate::parse(text.as_str().unwrap())
                    .unwrap_or_else(|e| panic!("{ctx}: example template {key:?} does not parse: {e}"));
            }
        }
    }
    // The optional objects, where they are on.
    let objects = render_ok("ptw", "flyte", Some(&Path::new(CHART).join("ci/url-mode-values.yaml")), &[]);
    let np = one(&objects, "NetworkPolicy");
    let ports: Vec<&Value> = np["spec"]["ingress"].as_array().unwrap().iter().collect();
    assert_eq!(ports.len(), 2);
    assert_eq!(ports[0]["ports"][0]["port"], "https");
    assert_eq!(ports[1]["ports"][0]["port"], "admin");
    assert!(!ports[1]["from"].as_array().unwrap().is_empty(), "the admin port is never open to everyone");
    let sm = one(&objects, "ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "admin");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    // Default NetworkPolicy: the webhook port from anywhere (no `from`).
    let objects = render_ok("ptw", "flyte", None, &["networkPolicy.enabled=true"]);
    let np = one(&objects, "NetworkPolicy");
    assert!(np["spec"]["ingress"][0].get("from").is_none(), "{np}");
    eprintln!("helm template x{} + checks in {:?}", files.len() + 2, started.elapsed());
}

fn check_webhook(objects: &[Value], values: &Value, ns: &str, ctx: &str) {
    let config = one(objects, "MutatingWebhookConfiguration");
    let webhooks = config["webhooks"].as_array().unwrap();
    let label = value_of(values, "config.environmentLabel");
    let task_name = value_of(values, "config.taskNameLabel");
    let by_label = json!({"matchExpressions": [{"key": label, "operator": "Exists"}]});
    let mut selectors = vec![by_label];
    // SPEC §9: managed pods with a task-name label and no environment label, exclusive with the
    // first entry (each pod sent once); no second entry when the rule is off.
    if task_name != "" {
        selectors.push(json!({"matchExpressions": [
            {"key": label, "operator": "DoesNotExist"},
            {"key": value_of(values, "config.managedLabel"), "operator": "In", "values": [value_of(values, "config.managedValue")]},
            {"key": task_name, "operator": "Exists"},
        ]}));
    }
    assert_eq!(webhooks.len(), selectors.len(), "{ctx}: one entry per selection");
    for (w, selector) in webhooks.iter().zip(&selectors) {
        assert_eq!(&w["objectSelector"], selector, "{ctx}: {}", w["name"]);
        check_webhook_entry(objects, values, w, ns, ctx);
    }
    let names: Vec<&str> = webhooks.iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert!(names.len() == 1 || names[0] != names[1], "{ctx}: entry names are unique: {names:?}");
    check_validating_webhook(objects, values, ctx);
}

/// What every entry of the MutatingWebhookConfiguration has alike.
fn check_webhook_entry(objects: &[Value], values: &Value, w: &Value, ns: &str, ctx: &str) {
    let rules = w["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{ctx}: {rules:?}");
    assert_eq!(strs(&rules[0]["operations"]), ["CREATE"], "{ctx}");
    assert_eq!(strs(&rules[0]["resources"]), ["pods"], "{ctx}");
    assert_eq!(strs(&rules[0]["apiGroups"]), [""], "{ctx}");
    assert_eq!(strs(&rules[0]["apiVersions"]), ["v1"], "{ctx}");
    if value_of(values, "webhook.namespaceSelector").as_object().is_none_or(|m| m.is_empty()) {
        let exprs = w["namespaceSelector"]["matchExpressions"].as_array().unwrap();
        assert_eq!(exprs.len(), 1, "{ctx}");
        assert_eq!(exprs[0]["key"], "kubernetes.io/metadata.name", "{ctx}");
        assert_eq!(exprs[0]["operator"], "NotIn", "{ctx}");
        let excluded = strs(&exprs[0]["values"]);
        for must in ["kube-system", "kube-public", "kube-node-lease"] {
            assert!(excluded.iter().any(|e| e == must), "{ctx}: {must} not excluded: {excluded:?}");
        }
        let extras = strs(&value_of(values, "webhook.excludeNamespaces"));
        for extra in &extras {
            assert!(excluded.contains(extra), "{ctx}: {extra}");
        }
        // Task pods in the release namespace (e.g. `flyte`) are mutated: only the objectSelector
        // keeps the webhook's own pods out.
        assert!(
            extras.iter().any(|e| e == ns) || !excluded.iter().any(|e| e == ns),
            "{ctx}: release namespace {ns} excluded by default"
        );
    }
    assert_eq!(w["sideEffects"], "None", "{ctx}");
    assert_eq!(strs(&w["admissionReviewVersions"]), ["v1"], "{ctx}");
    assert_eq!(w["reinvocationPolicy"], "IfNeeded", "{ctx}");
    assert_eq!(w["failurePolicy"], value_of(values, "webhook.failurePolicy"), "{ctx}");
    let timeout = w["timeoutSeconds"].as_i64().unwrap();
    assert!((1..=30).contains(&timeout), "{ctx}: {timeout}");
    if values.pointer("/webhook/timeoutSeconds").is_none() {
        assert!(timeout <= 5, "{ctx}: default timeout {timeout} > 5");
    }
    let name = w["name"].as_str().unwrap();
    assert!(name.split('.').count() >= 3, "{ctx}: webhook name {name} must be fully qualified");
    let client = &w["clientConfig"];
    match value_of(values, "webhook.url").as_str().filter(|u| !u.is_empty()) {
        Some(url) => {
            assert_eq!(client["url"], url, "{ctx}");
            assert!(client.get("service").is_none(), "{ctx}");
        }
        None => {
            let svc = one(objects, "Service");
            assert_eq!(client["service"]["name"], svc["metadata"]["name"], "{ctx}");
            assert_eq!(client["service"]["namespace"], ns, "{ctx}");
            assert_eq!(client["service"]["path"], "/mutate", "{ctx}");
            assert_eq!(client["service"]["port"], value_of(values, "service.port"), "{ctx}");
            let port = svc["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == "https").unwrap();
            assert_eq!(port["port"], value_of(values, "service.port"), "{ctx}");
            assert_eq!(port["targetPort"], "https", "{ctx}");
        }
    }
}

/// `https://host:port/any/path` -> `https://host:port/validate` (the chart's url-mode rule).
fn with_validate_path(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.split('/').next().unwrap();
    format!("{scheme}://{host}/validate")
}

/// The optional ValidatingWebhookConfiguration: rendered exactly when enabled; same name, selectors
/// and endpoint as the mutating one, but `/validate`, labelled template ConfigMaps only.
fn check_validating_webhook(objects: &[Value], values: &Value, ctx: &str) {
    let enabled = value_of(values, "validatingWebhook.enabled").as_bool().unwrap();
    let found = of_kind(objects, "ValidatingWebhookConfiguration");
    assert_eq!(
        found.len(),
        usize::from(enabled),
        "{ctx}: ValidatingWebhookConfiguration exactly when validatingWebhook.enabled"
    );
    if !enabled {
        return;
    }
    let (v, m) = (found[0], one(objects, "MutatingWebhookConfiguration"));
    // The same name: the builtin certificate mode patches the caBundle of both.
    assert_eq!(v["metadata"]["name"], m["metadata"]["name"], "{ctx}");
    assert_eq!(v["metadata"]["annotations"], m["metadata"]["annotations"], "{ctx}");
    let webhooks = v["webhooks"].as_array().unwrap();
    assert_eq!(webhooks.len(), 1, "{ctx}");
    let (w, mw) = (&webhooks[0], &m["webhooks"][0]);
    assert_eq!(w["name"], format!("validate.{}", value_of(values, "webhook.name").as_str().unwrap()), "{ctx}");
    assert!(w["name"].as_str().unwrap().split('.').count() >= 3, "{ctx}");
    assert_eq!(
        w["rules"],
        json!([{"operations": ["CREATE", "UPDATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps", "podtemplates"], "scope": "Namespaced"}]),
        "{ctx}: CREATE/UPDATE of core/v1 configmaps and podtemplates only"
    );
    let label = value_of(values, "config.sourceLabel");
    assert_eq!(
        w["objectSelector"],
        json!({"matchLabels": {label.as_str().unwrap(): "true"}}),
        "{ctx}: template sources only"
    );
    let selector = value_of(values, "validatingWebhook.namespaceSelector");
    if selector.as_object().is_none_or(|m| m.is_empty()) {
        assert!(w.get("namespaceSelector").is_none(), "{ctx}: every namespace, the release namespace included");
    } else {
        assert_eq!(w["namespaceSelector"], selector, "{ctx}");
    }
    assert_eq!(w["sideEffects"], "None", "{ctx}");
    assert_eq!(strs(&w["admissionReviewVersions"]), ["v1"], "{ctx}");
    assert_eq!(w["failurePolicy"], value_of(values, "validatingWebhook.failurePolicy"), "{ctx}");
    assert_eq!(w["timeoutSeconds"], mw["timeoutSeconds"], "{ctx}: webhook.timeoutSeconds is shared");
    assert!(w.get("reinvocationPolicy").is_none(), "{ctx}");
    let (client, mclient) = (&w["clientConfig"], &mw["clientConfig"]);
    match value_of(values, "webhook.url").as_str().filter(|u| !u.is_empty()) {
        Some(url) => {
            assert_eq!(client["url"], with_validate_path(url), "{ctx}: webhook.url with the path /validate");
            assert!(client.get("service").is_none(), "{ctx}");
        }
        None => {
            let mut want = mclient["service"].clone();
            want["path"] = json!("/validate");
            assert_eq!(client["service"], want, "{ctx}");
        }
    }
    assert_eq!(client.get("caBundle"), mclient.get("caBundle"), "{ctx}: caBundle handled like the mutating one");
}

fn check_pod_security(spec: &Value, ctx: &str) {
    let pod = &spec["securityContext"];
    assert_eq!(pod["runAsNonRoot"], true, "{ctx}");
    assert_eq!(pod["runAsUser"], 65532, "{ctx}");
    assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault", "{ctx}");
    assert!(spec.get("hostNetwork").is_none() && spec.get("hostPID").is_none(), "{ctx}");
    for c in spec["containers"].as_array().unwrap() {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{ctx}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{ctx}");
        assert_eq!(sc["runAsNonRoot"], true, "{ctx}");
        assert_eq!(sc["runAsUser"], 65532, "{ctx}");
        assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"], "{ctx}");
        assert!(sc["capabilities"].get("add").is_none(), "{ctx}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{ctx}");
        assert_ne!(sc["privileged"], true, "{ctx}");
    }
}

fn check_workload(objects: &[Value], values: &Value, ctx: &str) {
    let deploy = one(objects, "Deployment");
    assert_eq!(deploy["spec"]["replicas"], value_of(values, "replicas"), "{ctx}");
    let spec = &deploy["spec"]["template"]["spec"];
    check_pod_security(spec, ctx);
    assert_eq!(spec["automountServiceAccountToken"], true, "{ctx}: the webhook needs its token");
    let sa = spec["serviceAccountName"].as_str().unwrap();
    if value_of(values, "serviceAccount.create") == true {
        let sas = of_kind(objects, "ServiceAccount");
        assert_eq!(sas.len(), 1, "{ctx}");
        assert_eq!(sas[0]["metadata"]["name"], sa, "{ctx}");
    }
    match value_of(values, "priorityClassName").as_str().filter(|p| !p.is_empty()) {
        Some(p) => assert_eq!(spec["priorityClassName"], p, "{ctx}"),
        None => assert!(spec.get("priorityClassName").is_none(), "{ctx}"),
    }
    if value_of(values, "topologySpread.enabled") == true {
        let tsc = &spec["topologySpreadConstraints"][0];
        assert_eq!(tsc["topologyKey"], value_of(values, "topologySpread.topologyKey"), "{ctx}");
        assert_eq!(tsc["labelSelector"]["matchLabels"], deploy["spec"]["selector"]["matchLabels"], "{ctx}");
    }
    let c = &spec["containers"].as_array().unwrap()[0];
    assert_eq!(strs(&c["args"]), ["serve"], "{ctx}");
    let image = c["image"].as_str().unwrap();
    let repo = value_of(values, "image.repository");
    assert!(image.starts_with(repo.as_str().unwrap()), "{ctx}: {image}");
    if values.pointer("/image").is_none() {
        assert_eq!(image, "ghcr.io/pod-template-webhook/pod-template-webhook:0.1.0", "{ctx}");
    }
    // Resources: the defaults, and never a CPU limit.
    assert!(c["resources"]["limits"].get("cpu").is_none(), "{ctx}: no CPU limit");
    if values.pointer("/resources").is_none() {
        assert_eq!(
            c["resources"],
            json!({"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}),
            "{ctx}"
        );
    }
    // Ports and probes.
    let ports: BTreeMap<String, Value> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["containerPort"].clone()))
        .collect();
    assert_eq!(ports["https"], value_of(values, "config.port"), "{ctx}");
    assert_eq!(ports["admin"], value_of(values, "config.adminPort"), "{ctx}");
    assert_eq!(c["livenessProbe"]["httpGet"], json!({"path": "/healthz", "port": "admin"}), "{ctx}");
    assert_eq!(c["readinessProbe"]["httpGet"], json!({"path": "/readyz", "port": "admin"}), "{ctx}");
    let svc = one(objects, "Service");
    let admin = svc["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == "admin").unwrap();
    assert_eq!(admin["targetPort"], "admin", "{ctx}");
    // Environment: every flag is set from values.
    let env = env_of(c);
    assert_eq!(env["POD_NAMESPACE"], json!({"fieldRef": {"fieldPath": "metadata.namespace"}}), "{ctx}");
    assert_eq!(env["POD_NAME"], json!({"fieldRef": {"fieldPath": "metadata.name"}}), "{ctx}");
    let s = |path: &str| match value_of(values, path) {
        Value::String(s) => s,
        other => other.to_string(),
    };
    let host = s("config.listenAddress");
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let expected = [
        ("PTW_LISTEN", format!("{host}:{}", s("config.port"))),
        ("PTW_ADMIN_LISTEN", format!("{host}:{}", s("config.adminPort"))),
        ("PTW_CERT_RELOAD_SECONDS", s("config.certReloadSeconds")),
        ("PTW_MAX_BODY_BYTES", s("config.maxBodyBytes")),
        ("PTW_HEADER_READ_TIMEOUT_SECONDS", s("config.headerReadTimeoutSeconds")),
        ("PTW_DRAIN_TIMEOUT_SECONDS", s("config.drainTimeoutSeconds")),
        ("PTW_MAX_CONCURRENT_REQUESTS", s("config.maxConcurrentRequests")),
        ("PTW_REQUEST_TIMEOUT_SECONDS", s("config.requestTimeoutSeconds")),
        ("PTW_ENVIRONMENT_LABEL", s("config.environmentLabel")),
        ("PTW_TEMPLATE_ANNOTATION", s("config.templateAnnotation")),
        ("PTW_SOURCE_LABEL", s("config.sourceLabel")),
        ("PTW_APPLIED_ANNOTATION", s("config.appliedAnnotation")),
        ("PTW_ON_MISSING_TEMPLATE", s("config.onMissingTemplate")),
        ("PTW_ON_BROKEN_TEMPLATE", s("config.onBrokenTemplate")),
        ("PTW_ON_CONFLICT", s("config.onConflict")),
        ("PTW_LOG_FORMAT", s("config.logFormat")),
        ("RUST_LOG", s("config.logLevel")),
    ];
    for (name, value) in expected {
        assert_eq!(env.get(name), Some(&Value::String(value.clone())), "{ctx}: {name}");
    }
    match s("config.defaultTemplate").as_str() {
        "" => assert!(!env.contains_key("PTW_DEFAULT_TEMPLATE"), "{ctx}: no default template unless set"),
        name => assert_eq!(env.get("PTW_DEFAULT_TEMPLATE"), Some(&json!(name)), "{ctx}"),
    }
    let watch = strs(&value_of(values, "config.watchNamespaces"));
    if watch.is_empty() {
        assert!(!env.contains_key("PTW_WATCH_NAMESPACES"), "{ctx}");
    } else {
        assert_eq!(env["PTW_WATCH_NAMESPACES"], watch.join(","), "{ctx}");
    }
    // The helm test hook: hardened too, and it probes readiness on the admin port of the Service.
    if value_of(values, "tests.enabled") == true {
        let test = of_kind(objects, "Pod").into_iter().find(|p| p["metadata"]["annotations"]["helm.sh/hook"] == "test");
        let test = test.unwrap_or_else(|| panic!("{ctx}: no helm test pod"));
        check_pod_security(&test["spec"], &format!("{ctx} (helm test pod)"));
        let url =
            test["spec"]["containers"][0]["args"].as_array().unwrap().last().unwrap().as_str().unwrap().to_owned();
        let svc_name = svc["metadata"]["name"].as_str().unwrap();
        assert!(url.starts_with(&format!("http://{svc_name}.")), "{ctx}: {url}");
        assert!(url.ends_with(&format!(":{}/readyz", s("service.adminPort"))), "{ctx}: {url}");
        // It must not be selected by the webhook's Service.
        let sel = svc["spec"]["selector"].as_object().unwrap();
        let labels = test["metadata"]["labels"].as_object().unwrap();
        assert!(!sel.iter().all(|(k, v)| labels.get(k) == Some(v)), "{ctx}: the Service selects the test pod");
    }
}

/// Every rule of every Role/ClusterRole, with where it is granted.
fn rbac_rules(objects: &[Value]) -> Vec<(String, Option<String>, Value)> {
    let mut out = Vec::new();
    for o in objects {
        let kind = o["kind"].as_str().unwrap_or_default();
        if kind == "Role" || kind == "ClusterRole" {
            for r in o["rules"].as_array().unwrap() {
                out.push((kind.to_owned(), o["metadata"]["namespace"].as_str().map(str::to_owned), r.clone()));
            }
        }
    }
    out
}

fn check_rbac(objects: &[Value], values: &Value, ns: &str, ctx: &str) {
    let builtin = value_of(values, "certs.mode") == "builtin";
    let rules = rbac_rules(objects);
    assert!(!rules.is_empty(), "{ctx}");
    for (kind, role_ns, r) in &rules {
        for field in ["apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"] {
            assert!(!strs(&r[field]).iter().any(|s| s.contains('*')), "{ctx}: wildcard in {kind} rule {r}");
        }
        assert!(r.get("nonResourceURLs").is_none(), "{ctx}: {r}");
        let verbs: BTreeSet<String> = strs(&r["verbs"]).into_iter().collect();
        let names = strs(&r["resourceNames"]);
        for resource in strs(&r["resources"]) {
            let groups = strs(&r["apiGroups"]);
            match resource.as_str() {
                "configmaps" => {
                    assert_eq!(groups, [""], "{ctx}");
                    assert_eq!(
                        verbs,
                        ["get", "list", "watch"].map(String::from).into(),
                        "{ctx}: configmaps are read only"
                    );
                }
                "podtemplates" => {
                    assert_eq!(groups, [""], "{ctx}");
                    assert_eq!(verbs, ["list", "watch"].map(String::from).into(), "{ctx}: podtemplates: list, watch");
                    assert!(names.is_empty(), "{ctx}: {r}");
                }
                "events" => {
                    assert!(groups == [""] || groups == ["events.k8s.io"], "{ctx}: {r}");
                    assert_eq!(verbs, ["create", "patch"].map(String::from).into(), "{ctx}: {r}");
                }
                "secrets" => {
                    assert!(builtin, "{ctx}: Secret access outside the builtin certificate mode: {r}");
                    assert_eq!(kind, "Role", "{ctx}: Secret access must be namespaced");
                    assert_eq!(role_ns.as_deref(), Some(ns), "{ctx}: Secret access only in the release namespace");
                    if verbs == BTreeSet::from(["create".to_owned()]) {
                        assert!(names.is_empty(), "{ctx}");
                    } else {
                        assert_eq!(names.len(), 1, "{ctx}: secrets only by resourceNames: {r}");
                        assert!(verbs.is_subset(&["get", "update", "patch"].map(String::from).into()), "{ctx}: {r}");
                    }
                }
                "mutatingwebhookconfigurations" => {
                    assert!(builtin, "{ctx}: webhook configuration access outside builtin mode: {r}");
                    let config = one(objects, "MutatingWebhookConfiguration");
                    assert_eq!(names, [config["metadata"]["name"].as_str().unwrap()], "{ctx}: {r}");
                    assert_eq!(verbs, ["get", "patch"].map(String::from).into(), "{ctx}: {r}");
                }
                "validatingwebhookconfigurations" => {
                    assert!(builtin, "{ctx}: webhook configuration access outside builtin mode: {r}");
                    assert_eq!(kind, "ClusterRole", "{ctx}");
                    let config = one(objects, "ValidatingWebhookConfiguration");
                    assert_eq!(names, [config["metadata"]["name"].as_str().unwrap()], "{ctx}: {r}");
                    assert_eq!(verbs, ["get", "patch"].map(String::from).into(), "{ctx}: {r}");
                }
                other => panic!("{ctx}: unexpected RBAC resource {other}: {r}"),
            }
        }
    }
    let has_secrets = rules.iter().any(|(_, _, r)| strs(&r["resources"]).contains(&"secrets".to_owned()));
    assert_eq!(has_secrets, builtin, "{ctx}: Secret rules exactly in builtin mode");
    let validating = value_of(values, "validatingWebhook.enabled") == true;
    let has_validating =
        rules.iter().any(|(_, _, r)| strs(&r["resources"]).contains(&"validatingwebhookconfigurations".to_owned()));
    assert_eq!(
        has_validating,
        builtin && validating,
        "{ctx}: validating webhook configuration access exactly in builtin mode with validatingWebhook.enabled"
    );
    // ConfigMaps and PodTemplates (the two template sources): ClusterRole cluster-wide, or Roles
    // in the watched namespaces + the release namespace.
    for resource in ["configmaps", "podtemplates"] {
        let roles: Vec<(String, Option<String>)> = rules
            .iter()
            .filter(|(_, _, r)| strs(&r["resources"]).contains(&resource.to_owned()))
            .map(|(k, n, _)| (k.clone(), n.clone()))
            .collect();
        let watch = strs(&value_of(values, "config.watchNamespaces"));
        if watch.is_empty() {
            assert_eq!(roles, [("ClusterRole".to_owned(), None)], "{ctx}: {resource}");
        } else {
            let mut want: BTreeSet<String> = watch.into_iter().collect();
            want.insert(ns.to_owned());
            let got: BTreeSet<String> = roles
                .iter()
                .map(|(k, n)| {
                    assert_eq!(k, "Role", "{ctx}: watchNamespaces set, but a {k} reads {resource}");
                    n.clone().unwrap()
                })
                .collect();
            assert_eq!(got, want, "{ctx}: {resource}");
        }
    }
    // Every binding names the chart's ServiceAccount, and a role the chart renders.
    let deploy = one(objects, "Deployment");
    let sa = &deploy["spec"]["template"]["spec"]["serviceAccountName"];
    for b in objects.iter().filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding") {
        assert_eq!(b["subjects"], json!([{"kind": "ServiceAccount", "name": sa, "namespace": ns}]), "{ctx}");
        let role = objects.iter().find(|o| {
            o["kind"] == b["roleRef"]["kind"]
                && o["metadata"]["name"] == b["roleRef"]["name"]
                && o["metadata"]["namespace"] == b["metadata"]["namespace"]
        });
        assert!(role.is_some(), "{ctx}: binding {} to a role the chart does not render", b["metadata"]["name"]);
    }
}

fn check_certificates(objects: &[Value], values: &Value, ns: &str, ctx: &str) {
    let mode = value_of(values, "certs.mode");
    let config = one(objects, "MutatingWebhookConfiguration");
    let client = &config["webhooks"][0]["clientConfig"];
    let deploy = one(objects, "Deployment");
    let spec = &deploy["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    let env = env_of(c);
    let tls_volume = spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tls").cloned();
    let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "tls").cloned();
    assert!(of_kind(objects, "Secret").is_empty(), "{ctx}: the chart never renders a Secret");
    let svc = one(objects, "Service")["metadata"]["name"].as_str().unwrap().to_owned();
    let domain = value_of(values, "certs.clusterDomain");
    let dns = [format!("{svc}.{ns}.svc"), format!("{svc}.{ns}.svc.{}", domain.as_str().unwrap())];
    match mode.as_str().unwrap() {
        "builtin" => {
            // Empty: not rendered at all, so no `helm upgrade` or GitOps apply resets what the
            // process patched in (a rendered `caBundle: ""` would be owned and reset by apply).
            assert!(client.get("caBundle").is_none(), "{ctx}: builtin leaves the caBundle empty: {client}");
            assert!(tls_volume.is_none() && mount.is_none(), "{ctx}");
            assert!(!env.contains_key("PTW_TLS_CERT") && !env.contains_key("PTW_TLS_KEY"), "{ctx}");
            let secret = env["PTW_CERT_SECRET"].as_str().unwrap();
            assert!(!secret.is_empty(), "{ctx}");
            let names = env["PTW_CERT_DNS_NAMES"].as_str().unwrap().split(',').map(str::to_owned).collect::<Vec<_>>();
            for d in &dns {
                assert!(names.contains(d), "{ctx}: {d} not in {names:?}");
            }
            assert_eq!(env["PTW_WEBHOOK_CONFIGURATION"], config["metadata"]["name"], "{ctx}");
            // The Role's resourceNames name the same Secret.
            let role_names: Vec<String> = rbac_rules(objects)
                .into_iter()
                .filter(|(_, _, r)| strs(&r["resources"]) == ["secrets"] && r.get("resourceNames").is_some())
                .flat_map(|(_, _, r)| strs(&r["resourceNames"]))
                .collect();
            assert_eq!(role_names, [secret], "{ctx}");
            assert!(of_kind(objects, "Certificate").is_empty() && of_kind(objects, "Issuer").is_empty(), "{ctx}");
        }
        "certManager" => {
            let certs = of_kind(objects, "Certificate");
            let serving = certs.iter().find(|c| c["spec"]["isCA"] != true).expect("a serving Certificate");
            let annotation = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].as_str().unwrap();
            assert_eq!(annotation, format!("{ns}/{}", serving["metadata"]["name"].as_str().unwrap()), "{ctx}");
            assert!(client.get("caBundle").is_none(), "{ctx}: the cainjector owns the caBundle");
            let names = strs(&serving["spec"]["dnsNames"]);
            for d in &dns {
                assert!(names.contains(d), "{ctx}: {d} not in {names:?}");
            }
            let secret = serving["spec"]["secretName"].as_str().unwrap();
            assert_eq!(tls_volume.unwrap()["secret"]["secretName"], secret, "{ctx}");
            assert_eq!(mount.unwrap()["mountPath"], "/etc/webhook/tls", "{ctx}");
            assert_eq!(env["PTW_TLS_CERT"], "/etc/webhook/tls/tls.crt", "{ctx}");
            assert_eq!(env["PTW_TLS_KEY"], "/etc/webhook/tls/tls.key", "{ctx}");
            assert!(!env.contains_key("PTW_CERT_SECRET"), "{ctx}");
            if value_of(values, "certs.certManager.issuerRef").as_object().is_none_or(|m| m.is_empty()) {
                // selfsigned Issuer -> CA Certificate -> CA Issuer -> serving Certificate.
                assert_eq!(of_kind(objects, "Issuer").len(), 2, "{ctx}");
                let ca = certs.iter().find(|c| c["spec"]["isCA"] == true).expect("a CA Certificate");
                let ca_issuer = of_kind(objects, "Issuer").into_iter().find(|i| i["spec"].get("ca").is_some()).unwrap();
                assert_eq!(ca_issuer["spec"]["ca"]["secretName"], ca["spec"]["secretName"], "{ctx}");
                assert_eq!(serving["spec"]["issuerRef"]["name"], ca_issuer["metadata"]["name"], "{ctx}");
            } else {
                assert!(of_kind(objects, "Issuer").is_empty(), "{ctx}");
                assert_eq!(
                    serving["spec"]["issuerRef"]["name"],
                    value_of(values, "certs.certManager.issuerRef.name"),
                    "{ctx}"
                );
            }
        }
        "existingSecret" => {
            assert_eq!(client["caBundle"], value_of(values, "certs.existingSecret.caBundle"), "{ctx}");
            assert_eq!(
                tls_volume.unwrap()["secret"]["secretName"],
                value_of(values, "certs.existingSecret.name"),
                "{ctx}"
            );
            assert_eq!(mount.unwrap()["mountPath"], "/etc/webhook/tls", "{ctx}");
            assert_eq!(env["PTW_TLS_CERT"], "/etc/webhook/tls/tls.crt", "{ctx}");
            assert_eq!(env["PTW_TLS_KEY"], "/etc/webhook/tls/tls.key", "{ctx}");
            assert!(of_kind(objects, "Certificate").is_empty(), "{ctx}");
        }
        other => panic!("{ctx}: unknown mode {other}"),
    }
}

#[test]
fn existing_secret_without_a_ca_bundle_fails_with_a_clear_message() {
    let err =
        render("ptw", "flyte", None, &["certs.mode=existingSecret", "certs.existingSecret.name=my-tls"]).unwrap_err();
    assert!(err.contains("certs.mode=existingSecret requires certs.existingSecret.caBundle"), "{err}");
    let err =
        render("ptw", "flyte", None, &["certs.mode=existingSecret", "certs.existingSecret.caBundle=Zm9v"]).unwrap_err();
    assert!(err.contains("requires certs.existingSecret.name"), "{err}");
    // (helm lint deliberately ignores errors raised by `fail`; install and template render, and fail.)
    let err =
        render("ptw", "flyte", None, &["certs.mode=certManager", "certs.certManager.issuerRef.kind=ClusterIssuer"])
            .unwrap_err();
    assert!(err.contains("issuerRef needs a name"), "{err}");
}

/// The alert rules and the dashboard: off by default; with `ci/monitoring-values.yaml` a
/// PrometheusRule with every alert (severity, runbook, the release's selector, thresholds from
/// values) and the dashboard ConfigMap the Grafana sidecar loads. Their PromQL is checked by
/// promtool and against a running server in `tests/monitoring.rs`.
#[test]
fn alert_rules_and_dashboard_are_opt_in_and_render_valid_objects() {
    let defaults = render_ok("ptw", "flyte", None, &[]);
    assert!(of_kind(&defaults, "PrometheusRule").is_empty());
    assert!(of_kind(&defaults, "ConfigMap").is_empty());

    let file = Path::new(CHART).join("ci/monitoring-values.yaml");
    let objects = render_ok("ptw", "flyte", Some(&file), &[]);
    let rule = one(&objects, "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["metadata"]["namespace"], "flyte");
    assert_eq!(rule["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let groups = rule["spec"]["groups"].as_array().unwrap();
    let rules: Vec<&Value> = groups.iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    let names: BTreeSet<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    let expected = [
        "PodTemplateWebhookCertificateExpiresSoon",
        "PodTemplateWebhookDenialRateHigh",
        "PodTemplateWebhookDown",
        "PodTemplateWebhookErrorRateHigh",
        "PodTemplateWebhookLatencyHigh",
        "PodTemplateWebhookNoReadyReplica",
        "PodTemplateWebhookTargetDown",
        "PodTemplateWebhookTemplateErrors",
        "PodTemplateWebhookTemplateWatchDown",
    ];
    assert_eq!(names, BTreeSet::from(expected));
    let runbook = value_of(&json!({}), "metrics.prometheusRule.runbookUrl");
    let duration = |d: &str| {
        !d.is_empty() && d.trim_end_matches(|c: char| c.is_ascii_alphabetic()).chars().all(|c| c.is_ascii_digit())
    };
    for r in &rules {
        let name = r["alert"].as_str().unwrap();
        let expr = r["expr"].as_str().unwrap();
        assert!(expr.contains("namespace=\"flyte\""), "{name}: {expr}");
        assert!(
            expr.contains("job=\"ptw-pod-template-webhook\"")
                || expr.contains("deployment=\"ptw-pod-template-webhook\""),
            "{name}: {expr}"
        );
        assert!(duration(r["for"].as_str().unwrap()), "{name}: for {}", r["for"]);
        assert!(["warning", "critical"].contains(&r["labels"]["severity"].as_str().unwrap()), "{name}");
        assert_eq!(r["labels"]["team"], "platform", "{name}: metrics.prometheusRule.alertLabels");
        assert!(!r["annotations"]["summary"].as_str().unwrap().is_empty(), "{name}");
        assert!(!r["annotations"]["description"].as_str().unwrap().is_empty(), "{name}");
        let url = r["annotations"]["runbook_url"].as_str().unwrap();
        assert_eq!(url, format!("{}#{}", runbook.as_str().unwrap(), name.to_lowercase()), "{name}");
    }
    let latency = rules.iter().find(|r| r["alert"] == "PodTemplateWebhookLatencyHigh").unwrap();
    assert!(latency["expr"].as_str().unwrap().ends_with("> 0.25"), "the ci file's threshold: {}", latency["expr"]);
    // Scraped some other way: metrics.selector replaces the job and namespace matchers.
    let custom =
        render_ok("ptw", "flyte", None, &["metrics.prometheusRule.enabled=true", "metrics.selector=app=\"ptw\""]);
    for r in one(&custom, "PrometheusRule")["spec"]["groups"][0]["rules"].as_array().unwrap() {
        let expr = r["expr"].as_str().unwrap();
        assert!(!expr.contains("job="), "{expr}");
        assert!(expr.contains("{app=\"ptw\"") || expr.contains("deployment="), "{expr}");
    }

    let cm = one(&objects, "ConfigMap");
    assert_eq!(cm["metadata"]["name"], "ptw-pod-template-webhook-dashboard");
    assert_eq!(cm["metadata"]["namespace"], "monitoring", "metrics.dashboard.namespace");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1", "the label kube-prometheus-stack's sidecar loads");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "Platform");
    let data = cm["data"].as_object().unwrap();
    assert_eq!(data.len(), 1);
    let dashboard: Value = serde_json::from_str(data["pod-template-webhook.json"].as_str().unwrap()).unwrap();
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(CHART).join("dashboards/pod-template-webhook.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard, file, "the ConfigMap carries the dashboard file unchanged");
    assert_eq!(dashboard["uid"], "pod-template-webhook");
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: BTreeSet<&str> = panels.iter().map(|p| p["title"].as_str().unwrap()).collect();
    assert_eq!(titles.len(), panels.len(), "panel titles are unique");
    for wanted in [
        "Admissions by result",
        "Admissions by template and result",
        "Admission latency",
        "Certificate days left",
        "Template watch",
        "Replicas ready",
        "Templates loaded, broken, stale",
    ] {
        assert!(titles.contains(wanted), "no panel {wanted:?}: {titles:?}");
    }
    // Each panel has a query and a place on the grid, and none overlaps another.
    let mut cells = BTreeSet::new();
    for p in panels {
        assert!(!p["targets"].as_array().unwrap().is_empty(), "{}", p["title"]);
        let g = &p["gridPos"];
        let (x, y, w, h) =
            (g["x"].as_u64().unwrap(), g["y"].as_u64().unwrap(), g["w"].as_u64().unwrap(), g["h"].as_u64().unwrap());
        assert!(x + w <= 24, "{}", p["title"]);
        for cell in (x..x + w).flat_map(|cx| (y..y + h).map(move |cy| (cx, cy))) {
            assert!(cells.insert(cell), "{} overlaps another panel", p["title"]);
        }
    }
}

#[test]
fn the_schema_rejects_typos_and_bad_values() {
    let cases: &[(&[&str], &str)] = &[
        (&["replicaCount=2"], "replicaCount"),
        (&["foo=bar"], "foo"),
        (&["config.logformat=json"], "logformat"),
        (&["certs.mod=builtin"], "mod"),
        (&["webhook.failurePolicy=Maybe"], "failurePolicy"),
        (&["webhook.timeoutSeconds=31"], "timeoutSeconds"),
        (&["certs.mode=selfSigned"], "mode"),
        (&["config.onMissingTemplate=allow"], "onMissingTemplate"),
        (&["config.onConflict=ignore"], "onConflict"),
        (&["image.tagg=1"], "tagg"),
        (&["validatingWebhook.enable=true"], "enable"),
        (&["validatingWebhook.failurePolicy=Maybe"], "failurePolicy"),
        (&["validatingWebhook.timeoutSeconds=3"], "timeoutSeconds"),
        (&["metrics.prometheusRule.enable=true"], "enable"),
        (&["metrics.prometheusRule.thresholds.denialRatio=2"], "denialRatio"),
        (&["metrics.prometheusRule.thresholds.downFor=soon"], "downFor"),
        (&["metrics.prometheusRule.thresholds.latencyP99=1"], "latencyP99"),
        (&["metrics.dashboard.label=x"], "label"),
    ];
    for (sets, needle) in cases {
        let err = render("ptw", "flyte", None, sets).expect_err(&format!("{sets:?} was accepted"));
        assert!(err.contains("schema") && err.contains(needle), "{sets:?}: {err}");
    }
    // A values file with a typo, the way users write them.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.yaml");
    std::fs::write(&file, "replicas: 2\nwebhook:\n  failurepolicy: Ignore\n").unwrap();
    let err = render("ptw", "flyte", Some(&file), &[]).unwrap_err();
    assert!(err.contains("failurepolicy"), "{err}");
    let out = helm(&["lint", "--strict", CHART, "--values", file.to_str().unwrap()]);
    assert!(!out.ok, "lint accepted a typo: {}", out.stdout);
}

/// Every object of the schema that declares properties forbids others (typos are errors); the
/// only open objects are Kubernetes types passed through to the API server, and maps.
#[test]
fn the_schema_closes_every_level() {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(CHART).join("values.schema.json")).unwrap()).unwrap();
    fn walk(node: &Value, path: &str, open: &mut Vec<String>) {
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            assert_eq!(node["additionalProperties"], false, "{path}: declares properties but allows others");
            for (k, v) in props {
                walk(v, &format!("{path}.{k}"), open);
            }
        } else if node["type"] == "object" && node.get("additionalProperties").is_none() {
            open.push(path.to_owned());
        }
        if let Some(items) = node.get("items") {
            walk(items, &format!("{path}[]"), open);
        }
    }
    let mut open = Vec::new();
    walk(&schema, "", &mut open);
    open.sort();
    assert_eq!(
        open,
        [
            ".affinity",
            ".extraEnv[]",
            ".global",
            ".networkPolicy.adminFrom[]",
            ".networkPolicy.webhookFrom[]",
            ".tolerations[]",
            ".validatingWebhook.namespaceSelector",
            ".webhook.namespaceSelector"
        ],
        "only pass-through Kubernetes objects may be open"
    );
    // Every key of values.yaml is in the schema (and the defaults validate: helm lint does that).
    let values: Value =
        pod_template_webhook::yaml::from_str(&std::fs::read_to_string(Path::new(CHART).join("values.yaml")).unwrap())
            .unwrap();
    fn covered(values: &Value, schema: &Value, path: &str) {
        if let (Some(map), Some(props)) = (values.as_object(), schema.get("properties").and_then(Value::as_object)) {
            for (k, v) in map {
                let s = props.get(k).unwrap_or_else(|| panic!("{path}.{k} is not in values.schema.json"));
                covered(v, s, &format!("{path}.{k}"));
            }
        }
    }
    covered(&values, &schema, "");
}

#[test]
fn builtin_mode_renders_identically_every_time() {
    let first = helm(&["template", "ptw", CHART, "--namespace", "flyte"]);
    let second = helm(&["template", "ptw", CHART, "--namespace", "flyte"]);
    assert!(first.ok && second.ok, "{}{}", first.stderr, second.stderr);
    assert_eq!(first.stdout, second.stdout, "helm template must be deterministic in builtin mode");
    // No lookup, no random or time functions anywhere in the templates.
    for entry in walk_files(&Path::new(CHART).join("templates")) {
        let text = std::fs::read_to_string(&entry).unwrap();
        for banned in [
            "lookup",
            "randAlpha",
            "randAlphaNum",
            "randNumeric",
            "randAscii",
            "genCA",
            "genSelfSignedCert",
            "genSignedCert",
            "genPrivateKey",
            "uuidv4",
            "now",
        ] {
            let found = text.match_indices(banned).any(|(i, _)| {
                let before = text[..i].chars().last().unwrap_or(' ');
                let after = text[i + banned.len()..].chars().next().unwrap_or(' ');
                !before.is_alphanumeric()
                    && !after.is_alphanumeric()
                    && (before == ' ' || before == '(' || before == '{')
            });
            assert!(!found, "{}: uses {banned}", entry.display());
        }
    }
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The optional ValidatingWebhookConfiguration in every certificate mode and in url mode; its
/// RBAC exists only in builtin mode with it enabled, and names exactly that configuration.
#[test]
fn validating_webhook_is_optional_and_follows_every_certificate_mode() {
    let validating = |objects: &[Value]| of_kind(objects, "ValidatingWebhookConfiguration").len();
    let rbac_resources = |objects: &[Value]| -> Vec<String> {
        rbac_rules(objects).into_iter().flat_map(|(_, _, r)| strs(&r["resources"])).collect()
    };
    // Off by default: no object, no RBAC.
    let objects = render_ok("ptw", "flyte", None, &[]);
    assert_eq!(validating(&objects), 0);
    assert!(!rbac_resources(&objects).contains(&"validatingwebhookconfigurations".to_owned()));
    let ca = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==";
    let cases: &[(&str, &[&str])] = &[
        ("builtin", &[]),
        ("certManager", &["certs.mode=certManager"]),
        ("existingSecret", &["certs.mode=existingSecret", "certs.existingSecret.name=tls"]),
        (
            "url",
            &[
                "webhook.url=https://dev.example.com:9443/hooks/mutate",
                "certs.mode=existingSecret",
                "certs.existingSecret.name=tls",
            ],
        ),
    ];
    for (case, sets) in cases {
        let ca_set = format!("certs.existingSecret.caBundle={ca}");
        let mut all: Vec<&str> = vec!["validatingWebhook.enabled=true", &ca_set];
        all.extend_from_slice(sets);
        let objects = render_ok("ptw", "flyte", None, &all);
        let v = one(&objects, "ValidatingWebhookConfiguration");
        assert_eq!(v["metadata"]["name"], "ptw-pod-template-webhook", "{case}");
        let w = &v["webhooks"][0];
        assert_eq!(w["name"], "validate.pod-templates.flyte.org", "{case}");
        assert_eq!(w["failurePolicy"], "Ignore", "{case}: the default");
        assert_eq!(w["objectSelector"], json!({"matchLabels": {"flyte.org/pod-templates": "true"}}), "{case}");
        let client = &w["clientConfig"];
        match *case {
            "url" => assert_eq!(client["url"], "https://dev.example.com:9443/validate", "{case}: the path is replaced"),
            _ => assert_eq!(
                client["service"],
                json!({"name": "ptw-pod-template-webhook", "namespace": "flyte", "path": "/validate", "port": 443}),
                "{case}"
            ),
        }
        let annotations = &v["metadata"]["annotations"];
        match *case {
            "builtin" => assert!(
                client.get("caBundle").is_none() && annotations.is_null(),
                "{case}: the process fills the caBundle"
            ),
            "certManager" => {
                assert!(client.get("caBundle").is_none(), "{case}: the cainjector fills the caBundle");
                assert_eq!(
                    annotations["cert-manager.io/inject-ca-from"], "flyte/ptw-pod-template-webhook-serving",
                    "{case}"
                );
            }
            _ => assert_eq!(client["caBundle"], ca, "{case}"),
        }
        let resources = rbac_resources(&objects);
        assert_eq!(
            resources.contains(&"validatingwebhookconfigurations".to_owned()),
            *case == "builtin",
            "{case}: {resources:?}"
        );
        // The shared checks (selectors, RBAC scoping, no wildcard).
        let mut values = json!({"validatingWebhook": {"enabled": true}});
        for set in sets.iter() {
            let (path, value) = set.split_once('=').unwrap();
            let pointer = format!("/{}", path.replace('.', "/"));
            let mut at = &mut values;
            for part in pointer.split('/').skip(1) {
                at = at.as_object_mut().unwrap().entry(part).or_insert_with(|| json!({}));
            }
            *at = json!(value);
        }
        values["certs"]["existingSecret"]["caBundle"] = json!(ca);
        check_webhook(&objects, &values, "flyte", case);
        check_rbac(&objects, &values, "flyte", case);
        check_certificates(&objects, &values, "flyte", case);
    }
    // failurePolicy is its own value; the mutating webhook's is unaffected.
    let objects = render_ok(
        "ptw",
        "flyte",
        None,
        &["validatingWebhook.enabled=true", "validatingWebhook.failurePolicy=Fail", "webhook.failurePolicy=Ignore"],
    );
    assert_eq!(one(&objects, "ValidatingWebhookConfiguration")["webhooks"][0]["failurePolicy"], "Fail");
    assert_eq!(one(&objects, "MutatingWebhookConfiguration")["webhooks"][0]["failurePolicy"], "Ignore");
    // The ci permutation that enables it, with its custom source label.
    let objects = render_ok("ptw", "flyte", Some(&Path::new(CHART).join("ci/validating-values.yaml")), &[]);
    let w = &one(&objects, "ValidatingWebhookConfiguration")["webhooks"][0];
    assert_eq!(w["objectSelector"], json!({"matchLabels": {"platform.example.com/templates": "true"}}));
    assert!(w.get("namespaceSelector").is_none(), "webhook.excludeNamespaces is the mutating webhook's own");
    assert_eq!(w["timeoutSeconds"], 3);
}

#[test]
fn names_and_values_follow_the_custom_names_permutation() {
    let objects = render_ok("ptw", "platform", Some(&Path::new(CHART).join("ci/custom-names-values.yaml")), &[]);
    let deploy = one(&objects, "Deployment");
    assert_eq!(deploy["metadata"]["name"], "templater");
    assert_eq!(deploy["metadata"]["labels"]["team"], "platform");
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example.com/platform/pod-template-webhook@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
    let env = env_of(c);
    assert_eq!(env["PTW_LISTEN"], "[::]:9443");
    assert_eq!(env["PTW_CERT_SECRET"], "templater-serving-cert");
    assert_eq!(env["PTW_WEBHOOK_CONFIGURATION"], "templater.example.com");
    assert_eq!(env["PTW_CERT_DNS_NAMES"], "templater.platform.svc,templater.platform.svc.corp.local");
    assert_eq!(env["EXTRA"], "1");
    assert_eq!(deploy["spec"]["template"]["spec"]["serviceAccountName"], "templater-sa");
    let config = one(&objects, "MutatingWebhookConfiguration");
    assert_eq!(config["metadata"]["name"], "templater.example.com");
    assert_eq!(config["webhooks"][0]["name"], "templates.platform.example.com");
    let excluded = strs(&config["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]["values"]);
    assert_eq!(excluded, ["kube-system", "kube-public", "kube-node-lease", "monitoring"]);
    // A replacement namespaceSelector is used verbatim.
    let objects = render_ok("ptw", "flyte", None, &["webhook.namespaceSelector.matchLabels.templates=enabled"]);
    let config = one(&objects, "MutatingWebhookConfiguration");
    assert_eq!(config["webhooks"][0]["namespaceSelector"], json!({"matchLabels": {"templates": "enabled"}}));
    // terminationGracePeriodSeconds must cover the preStop sleep and the drain.
    let err = render("ptw", "flyte", None, &["terminationGracePeriodSeconds=10"]).unwrap_err();
    assert!(err.contains("terminationGracePeriodSeconds"), "{err}");
}

/// `config.platformNamespace`: the webhook in its own namespace, the platform templates elsewhere.
/// Default: the release namespace. The certificate Secret (POD_NAMESPACE) stays in the release
/// namespace; with watchNamespaces, the template Roles cover the platform namespace.
#[test]
fn platform_namespace_can_differ_from_the_release_namespace() {
    let objects = render_ok("ptw", "ptw-system", None, &[]);
    let env = env_of(&one(&objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]);
    assert_eq!(env["PTW_PLATFORM_NAMESPACE"], "ptw-system", "default: the release namespace");
    let objects = render_ok(
        "ptw",
        "ptw-system",
        None,
        &["config.platformNamespace=flyte", "exampleTemplates.enabled=true", "config.watchNamespaces={ml-team}"],
    );
    let env = env_of(&one(&objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]);
    assert_eq!(env["PTW_PLATFORM_NAMESPACE"], "flyte");
    assert_eq!(
        env["POD_NAMESPACE"],
        json!({"fieldRef": {"fieldPath": "metadata.namespace"}}),
        "the webhook's own namespace"
    );
    let examples = of_kind(&objects, "ConfigMap");
    assert!(
        examples.iter().all(|cm| cm["metadata"]["namespace"] == "flyte"),
        "example templates in the platform namespace"
    );
    let role_namespaces: Vec<&str> = of_kind(&objects, "Role")
        .iter()
        .filter(|r| r["metadata"]["name"].as_str().is_some_and(|n| n.ends_with("-templates")))
        .map(|r| r["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert!(role_namespaces.contains(&"flyte") && role_namespaces.contains(&"ml-team"), "{role_namespaces:?}");
    // Neither namespace is excluded from mutation.
    let hook = &one(&objects, "MutatingWebhookConfiguration")["webhooks"][0];
    let excluded = strs(&hook["namespaceSelector"]["matchExpressions"][0]["values"]);
    assert_eq!(excluded, ["kube-system", "kube-public", "kube-node-lease"]);
    assert!(
        render("ptw", "ptw-system", None, &["config.platformNamespace=Not_A_Namespace"]).is_err(),
        "schema checks the name"
    );
}

#[test]
fn dev_certs_script_makes_a_pair_the_server_loads() {
    let found = Command::new("openssl").arg("version").stdout(Stdio::null()).status();
    assert!(
        found.is_ok_and(|s| s.success()),
        "openssl not found: certs/dev-certs.sh needs it (Debian package `openssl`)"
    );
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/dev-certs.sh");
    let out = run_bounded(
        Command::new("bash").arg(&script).arg(dir.path()).args(["localhost", "127.0.0.1", "webhook.flyte.svc"]),
        Duration::from_secs(60),
    );
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let p = |n: &str| dir.path().join(n);
    let (loaded, _) = tls::load_files(&p("tls.crt"), &p("tls.key")).expect("the server loads the pair");
    assert!(loaded.not_after > 0);
    let verify = run_bounded(
        Command::new("openssl").arg("verify").arg("-CAfile").arg(p("ca.crt")).arg(p("tls.crt")),
        Duration::from_secs(30),
    );
    assert!(verify.ok, "{}{}", verify.stdout, verify.stderr);
    let text = run_bounded(
        Command::new("openssl").args(["x509", "-noout", "-ext", "subjectAltName", "-in"]).arg(p("tls.crt")),
        Duration::from_secs(30),
    );
    assert!(
        text.stdout.contains("DNS:webhook.flyte.svc") && text.stdout.contains("IP Address:127.0.0.1"),
        "{}",
        text.stdout
    );
    let bundle = std::fs::read_to_string(p("ca-bundle.b64")).unwrap();
    assert!(!bundle.contains('\n') && bundle.starts_with("LS0t"), "{bundle}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(p("tls.key")).unwrap().permissions().mode() & 0o077, 0, "private keys are private");
    // No private key is committed next to the script.
    for f in walk_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("certs")) {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        assert!(
            !text.contains("-----BEGIN") || f.ends_with("dev-certs.sh") || f.ends_with("README.md"),
            "{}",
            f.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// install into the real API server, run the webhook as the chart's ServiceAccount

async fn helm_async(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || helm(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap()
}

/// A client authenticated by a bearer token only (no client certificate).
async fn token_client(api: &support::ApiServer, token: &str) -> kube::Client {
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ptw\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n\
         users:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: sa\n  context: {{cluster: ptw, user: sa}}\ncurrent-context: sa\n",
        api.url,
        support::b64(api.pki.ca_pem.as_bytes()),
    );
    let kc = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    assert!(config.auth_info.client_certificate_data.is_none());
    kube::Client::try_from(config).unwrap()
}

async fn serve_webhook(store: Arc<dyn TemplateStore>, pki: &support::TestPki) -> support::Webhook {
    support::serve_webhook(AppState::new(store, Policy { names: Names::default(), ..Policy::default() }), pki).await
}

async fn ensure_namespace(c: &kube::Client, name: &str) {
    support::ensure_namespace(c, name, json!({})).await
}

fn is_forbidden<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> bool {
    match r {
        Err(kube::Error::Api(e)) => e.code == 403,
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
}

async fn can_i(c: &kube::Client, verb: &str, group: &str, resource: &str, ns: Option<&str>) -> bool {
    can_i_named(c, verb, group, resource, ns, "").await
}

async fn can_i_named(c: &kube::Client, verb: &str, group: &str, resource: &str, ns: Option<&str>, name: &str) -> bool {
    let review: SelfSubjectAccessReview = serde_json::from_value(json!({
        "spec": {"resourceAttributes": {"verb": verb, "group": group, "resource": resource, "namespace": ns.unwrap_or_default(), "name": name}}
    }))
    .unwrap();
    let out = Api::<SelfSubjectAccessReview>::all(c.clone()).create(&PostParams::default(), &review).await.unwrap();
    out.status.unwrap().allowed
}

const PLATFORM: &str = "flyte";
const APPS: &str = "apps";
const RELEASE: &str = "ptw";

fn template_cm(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"flyte.org/pod-templates": "true"}},
        "data": data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
    }))
    .unwrap()
}

fn env_pod(name: &str, environment: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"flyte.org/environment": environment}},
        "spec": {"containers": [{"name": "primary", "image": "registry.example/task:1.0"}]}
    }))
    .unwrap()
}

#[test]
fn helm_install_into_the_real_api_server_and_run_as_the_charts_service_account() {
    let started = Instant::now();
    let helm = helm_bin().clone();
    let api = support::ApiServer::start();
    eprintln!("[{:?}] API server up ({})", started.elapsed(), helm.display());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(install_and_check(&api, started));
}

async fn install_and_check(api: &support::ApiServer, started: Instant) {
    let step = |what: &str| eprintln!("[{:?}] {what}", started.elapsed());
    let admin = api.client().await;
    ensure_namespace(&admin, PLATFORM).await;
    ensure_namespace(&admin, APPS).await;
    ensure_namespace(&admin, "other").await;
    let kubeconfig = api.kubeconfig.to_str().unwrap().to_owned();

    // The webhook's serving certificate, and the TLS Secret the chart mounts (as an operator
    // would create it for certs.mode=existingSecret; no kubelet runs, so nothing mounts it here).
    let pki = support::TestPki::new("ptw-chart-webhook-ca");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "ptw-dev-tls"}, "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": "placeholder", "tls.key": "placeholder"}
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), PLATFORM).create(&PostParams::default(), &secret).await.unwrap();

    // Port of the (first) webhook: bind now, serve once the store exists.
    let store_holder: Arc<Mutex<Option<Arc<ClusterStore>>>> = Arc::default();
    let lazy = Arc::new(LazyStore(store_holder.clone()));
    let webhook = serve_webhook(lazy.clone(), &pki).await;
    let ca_bundle = support::b64(pki.ca_pem.as_bytes());

    // 1. helm install, url mode + existingSecret.
    let base_args = |verb: &str, port: u16| -> Vec<String> {
        [
            verb,
            RELEASE,
            CHART,
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            PLATFORM,
            "--timeout",
            "60s",
            "--set",
            &format!("webhook.url=https://127.0.0.1:{port}/mutate"),
            "--set",
            "certs.mode=existingSecret",
            "--set",
            "certs.existingSecret.name=ptw-dev-tls",
            "--set",
            &format!("certs.existingSecret.caBundle={ca_bundle}"),
        ]
        .map(String::from)
        .to_vec()
    };
    let t = Instant::now();
    let out = helm_async(base_args("install", webhook.port)).await;
    assert!(out.ok, "helm install failed:\n{}{}\n{}", out.stdout, out.stderr, api.log_tail("kube-apiserver.log"));
    step(&format!("helm install in {:?}", t.elapsed()));
    let status = helm_async(vec![
        "status".into(),
        RELEASE.into(),
        "--kubeconfig".into(),
        kubeconfig.clone(),
        "-n".into(),
        PLATFORM.into(),
    ])
    .await;
    assert!(status.ok && status.stdout.contains("STATUS: deployed"), "{}{}", status.stdout, status.stderr);

    // The objects exist in the API server as rendered.
    let config = Api::<MutatingWebhookConfiguration>::all(admin.clone()).get("ptw-pod-template-webhook").await.unwrap();
    let w = &config.webhooks.as_ref().unwrap()[0];
    assert_eq!(w.client_config.url.as_deref(), Some(format!("https://127.0.0.1:{}/mutate", webhook.port).as_str()));
    assert_eq!(w.reinvocation_policy.as_deref(), Some("IfNeeded"));
    let sas = Api::<ServiceAccount>::namespaced(admin.clone(), PLATFORM)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}")))
        .await
        .unwrap();
    assert_eq!(sas.items.len(), 1);
    let sa_name = sas.items[0].name_any();
    let deploy =
        Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(admin.clone(), PLATFORM).get(&sa_name).await.unwrap();
    assert_eq!(deploy.spec.template.spec.unwrap().service_account_name.as_deref(), Some(sa_name.as_str()));

    // 2. A token for the chart's ServiceAccount (TokenRequest API), and a client with only that.
    let token = support::service_account_token(&admin, PLATFORM, &sa_name).await;
    let sa = token_client(api, &token).await;
    let me: SelfSubjectReview = serde_json::from_value(json!({"metadata": {}})).unwrap();
    let me = Api::<SelfSubjectReview>::all(sa.clone()).create(&PostParams::default(), &me).await.unwrap();
    let username = me.status.unwrap().user_info.unwrap().username.unwrap();
    assert_eq!(username, format!("system:serviceaccount:{PLATFORM}:{sa_name}"));
    step(&format!("authenticated as {username}"));

    // 3. The webhook's template store, as the ServiceAccount: the chart's RBAC lets it sync.
    let t = Instant::now();
    let store = ClusterStore::spawn(sa.clone(), Names::default(), &[], Default::default());
    *store_holder.lock().unwrap() = Some(store.clone());
    let synced = support::wait_for("the store (as the chart's ServiceAccount) syncs", Duration::from_secs(30), || {
        store.is_ready()
    })
    .await;
    step(&format!("store synced as the ServiceAccount in {synced:?} ({:?} incl. setup)", t.elapsed()));

    // 4. A platform template (created by admin) is applied to a pod in another namespace, through
    // the chart's MutatingWebhookConfiguration.
    let cms = Api::<ConfigMap>::namespaced(admin.clone(), PLATFORM);
    cms.create(
        &PostParams::default(),
        &template_cm("platform-templates", &[("gpu", "labels: {installed-by: helm}\npodSpec:\n  containers:\n  - name: primary\n    env: [{name: FROM_TEMPLATE, value: \"yes\"}]\n")]),
    )
    .await
    .unwrap();
    let visible = support::wait_for("the template reaches the store", Duration::from_secs(10), || {
        store.lookup(APPS, "gpu").entry.is_some()
    })
    .await;
    step(&format!("template visible to the webhook after {visible:?}"));
    let pods = Api::<Pod>::namespaced(admin.clone(), APPS);
    let t = Instant::now();
    let pod = pods.create(&PostParams::default(), &env_pod("task-1", "gpu")).await.unwrap();
    step(&format!("labelled pod created (mutated) in {:?}", t.elapsed()));
    assert_eq!(pod.labels().get("installed-by").map(String::as_str), Some("helm"), "{:?}", pod.metadata);
    let applied = &pod.annotations()["flyte.org/pod-template-applied"];
    assert!(applied.starts_with(&format!("{PLATFORM}/platform-templates/gpu@")), "{applied}");
    let env = pod.spec.unwrap().containers[0].env.clone().unwrap_or_default();
    assert!(env.iter().any(|e| e.name == "FROM_TEMPLATE"), "{env:?}");
    assert_eq!(webhook.reviews.lock().unwrap().get(APPS).copied(), Some(1));
    // The release namespace is not excluded: installed into the platform namespace (`flyte`), task
    // pods there are mutated too (the objectSelector alone keeps the webhook's own pods out).
    let own = Api::<Pod>::namespaced(admin.clone(), PLATFORM)
        .create(&PostParams::default(), &env_pod("own", "gpu"))
        .await
        .unwrap();
    assert!(own.annotations().contains_key("flyte.org/pod-template-applied"), "{:?}", own.metadata);
    assert_eq!(webhook.reviews.lock().unwrap().get(PLATFORM).copied(), Some(1));

    // 5. Events: a template that does not parse gets an Event, published by the ServiceAccount.
    Api::<ConfigMap>::namespaced(admin.clone(), APPS)
        .create(&PostParams::default(), &template_cm("broken-templates", &[("broken", "labels: [")]))
        .await
        .unwrap();
    let events = Api::<K8sEvent>::namespaced(admin.clone(), APPS);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = events.list(&ListParams::default()).await.unwrap();
        let found = list
            .items
            .iter()
            .find(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken-templates"));
        if let Some(e) = found {
            assert_eq!(e.reason.as_deref(), Some("TemplateParseError"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Event for the broken template: the chart's RBAC does not allow creating it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    step("Event for a broken template published by the ServiceAccount");

    // 6. ...and the same identity can do nothing more.
    let secrets = Api::<Secret>::namespaced(sa.clone(), PLATFORM);
    assert!(is_forbidden(secrets.list(&ListParams::default()).await), "Secret list");
    assert!(is_forbidden(secrets.get("ptw-dev-tls").await), "Secret get");
    assert!(
        is_forbidden(Api::<Secret>::all(sa.clone()).list(&ListParams::default()).await),
        "Secret list, all namespaces"
    );
    let sa_cms = Api::<ConfigMap>::namespaced(sa.clone(), PLATFORM);
    assert!(
        is_forbidden(
            sa_cms.create(&PostParams::default(), &template_cm("evil", &[("gpu", "labels: {evil: yes}")])).await
        ),
        "ConfigMap create"
    );
    let mut current = sa_cms.get("platform-templates").await.expect("reading templates is allowed");
    current.data.as_mut().unwrap().insert("gpu".into(), "labels: {evil: yes}".into());
    assert!(
        is_forbidden(sa_cms.replace("platform-templates", &PostParams::default(), &current).await),
        "ConfigMap update"
    );
    let patch = json!({"data": {"gpu": "labels: {evil: yes}"}});
    assert!(
        is_forbidden(sa_cms.patch("platform-templates", &PatchParams::default(), &Patch::Merge(&patch)).await),
        "ConfigMap patch"
    );
    assert!(is_forbidden(sa_cms.delete("platform-templates", &Default::default()).await), "ConfigMap delete");
    assert!(
        is_forbidden(
            Api::<Pod>::namespaced(sa.clone(), APPS).create(&PostParams::default(), &env_pod("x", "gpu")).await
        ),
        "Pod create"
    );
    let mwc_patch = json!({"metadata": {"labels": {"evil": "yes"}}});
    assert!(
        is_forbidden(
            Api::<MutatingWebhookConfiguration>::all(sa.clone())
                .patch("ptw-pod-template-webhook", &PatchParams::default(), &Patch::Merge(&mwc_patch))
                .await
        ),
        "the webhook configuration is not writable outside builtin mode"
    );
    for (verb, group, resource, ns, allowed) in [
        ("watch", "", "configmaps", None, true),
        ("list", "", "configmaps", Some(APPS), true),
        ("list", "", "podtemplates", None, true),
        ("watch", "", "podtemplates", Some(APPS), true),
        ("get", "", "podtemplates", Some(APPS), false),
        ("create", "", "podtemplates", Some(APPS), false),
        ("update", "", "podtemplates", Some(APPS), false),
        ("patch", "", "podtemplates", Some(APPS), false),
        ("delete", "", "podtemplates", Some(APPS), false),
        ("create", "events.k8s.io", "events", Some(APPS), true),
        ("create", "", "events", Some(APPS), true),
        ("get", "", "secrets", Some(PLATFORM), false),
        ("create", "", "secrets", Some(PLATFORM), false),
        ("update", "", "configmaps", Some(APPS), false),
        ("delete", "", "events", Some(APPS), false),
        ("list", "", "pods", None, false),
        ("get", "", "serviceaccounts", Some(PLATFORM), false),
        ("create", "", "serviceaccounts/token", Some(PLATFORM), false),
        ("create", "rbac.authorization.k8s.io", "rolebindings", Some(PLATFORM), false),
    ] {
        assert_eq!(can_i(&sa, verb, group, resource, ns).await, allowed, "can-i {verb} {group}/{resource} in {ns:?}");
    }
    step("the ServiceAccount is refused Secrets, ConfigMap writes, pods and the webhook configuration");

    // 7. helm upgrade to watchNamespaces=[apps]: Roles replace the ClusterRole; a webhook that
    // watches only those namespaces (plus the platform namespace) still syncs and mutates, and
    // ConfigMaps of other namespaces are no longer readable.
    let pki2 = support::TestPki::new("ptw-chart-webhook-ca-2");
    let holder2: Arc<Mutex<Option<Arc<ClusterStore>>>> = Arc::default();
    let webhook2 = serve_webhook(Arc::new(LazyStore(holder2.clone())), &pki2).await;
    let mut args = base_args("upgrade", webhook2.port);
    args.iter_mut().for_each(|a| {
        if a.starts_with("certs.existingSecret.caBundle=") {
            *a = format!("certs.existingSecret.caBundle={}", support::b64(pki2.ca_pem.as_bytes()));
        }
    });
    args.extend(["--set".into(), format!("config.watchNamespaces={{{APPS}}}")]);
    let t = Instant::now();
    let out = helm_async(args).await;
    assert!(out.ok, "helm upgrade failed:\n{}{}", out.stdout, out.stderr);
    step(&format!("helm upgrade (watchNamespaces=[{APPS}]) in {:?}", t.elapsed()));
    // The API server's RBAC cache follows the deleted ClusterRoleBinding within moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    while can_i(&sa, "list", "", "configmaps", None).await {
        assert!(Instant::now() < deadline, "cluster-wide ConfigMap access survived the upgrade to watchNamespaces");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        is_forbidden(Api::<ConfigMap>::all(sa.clone()).list(&ListParams::default()).await),
        "cluster-wide ConfigMap list after the upgrade"
    );
    assert!(
        is_forbidden(Api::<ConfigMap>::namespaced(sa.clone(), "other").list(&ListParams::default()).await),
        "ConfigMaps of an unwatched namespace"
    );
    let store2 = ClusterStore::spawn(sa.clone(), Names::default(), &[APPS.to_owned()], Default::default());
    *holder2.lock().unwrap() = Some(store2.clone());
    let synced = support::wait_for("the namespaced store syncs", Duration::from_secs(30), || store2.is_ready()).await;
    step(&format!("namespaced store synced in {synced:?}"));
    support::wait_for("platform template in the namespaced store", Duration::from_secs(10), || {
        store2.lookup(APPS, "gpu").entry.is_some()
    })
    .await;
    let pod = pods.create(&PostParams::default(), &env_pod("task-2", "gpu")).await.unwrap();
    assert_eq!(pod.labels().get("installed-by").map(String::as_str), Some("helm"));
    assert_eq!(
        webhook2.reviews.lock().unwrap().get(APPS).copied(),
        Some(1),
        "the upgraded configuration calls the new URL"
    );
    assert!(!can_i(&sa, "list", "", "configmaps", Some("other")).await);
    assert!(can_i(&sa, "watch", "", "configmaps", Some(PLATFORM)).await);
    assert!(!can_i(&sa, "list", "", "podtemplates", None).await, "PodTemplates follow watchNamespaces too");
    assert!(!can_i(&sa, "watch", "", "podtemplates", Some("other")).await);
    assert!(can_i(&sa, "watch", "", "podtemplates", Some(APPS)).await);

    // 8. helm uninstall removes the cluster-scoped objects too.
    let out = helm_async(vec![
        "uninstall".into(),
        RELEASE.into(),
        "--kubeconfig".into(),
        kubeconfig,
        "-n".into(),
        PLATFORM.into(),
        "--timeout".into(),
        "60s".into(),
    ])
    .await;
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert!(Api::<MutatingWebhookConfiguration>::all(admin.clone())
        .get_opt("ptw-pod-template-webhook")
        .await
        .unwrap()
        .is_none());
    let plain = pods.create(&PostParams::default(), &env_pod("task-3", "gpu")).await.unwrap();
    assert!(!plain.annotations().contains_key("flyte.org/pod-template-applied"), "no webhook after uninstall");
    step("helm uninstall");

    builtin_mode_rbac_and_ca_bundle(api, &admin, &kubeconfig_path(api)).await;
    step("builtin mode: RBAC and caBundle across upgrades; total");
}

fn kubeconfig_path(api: &support::ApiServer) -> String {
    api.kubeconfig.to_str().unwrap().to_owned()
}

/// What the builtin certificate mode relies on, against the real authorizer: the chart's
/// ServiceAccount can create its Secret, read and renew exactly that Secret, and read and patch the
/// caBundle of exactly its webhook configuration; and a later `helm upgrade` keeps the caBundle the
/// process patched in.
async fn builtin_mode_rbac_and_ca_bundle(api: &support::ApiServer, admin: &kube::Client, kubeconfig: &str) {
    const NS: &str = "platform-b";
    ensure_namespace(admin, NS).await;
    let other: Secret =
        serde_json::from_value(json!({"metadata": {"name": "someone-elses"}, "stringData": {"k": "v"}})).unwrap();
    Api::<Secret>::namespaced(admin.clone(), NS).create(&PostParams::default(), &other).await.unwrap();
    let install = |verb: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> =
            [verb, "ptwb", CHART, "--kubeconfig", kubeconfig, "--namespace", NS, "--timeout", "60s"]
                .map(String::from)
                .to_vec();
        // Select no namespace: no pod of this test may be sent to a webhook nobody serves.
        args.extend(
            ["--set", "fullnameOverride=ptwb", "--set", "webhook.namespaceSelector.matchLabels.ptw-test=never"]
                .map(String::from),
        );
        for e in extra {
            args.extend(["--set".to_owned(), (*e).to_owned()]);
        }
        args
    };
    let out = helm_async(install("install", &[])).await;
    assert!(out.ok, "helm install (builtin) failed:\n{}{}", out.stdout, out.stderr);
    let configs = Api::<MutatingWebhookConfiguration>::all(admin.clone());
    let config = configs.get("ptwb").await.unwrap();
    let w = &config.webhooks.as_ref().unwrap()[0];
    assert!(w.client_config.ca_bundle.as_ref().is_none_or(|b| b.0.is_empty()), "rendered empty");
    let svc = w.client_config.service.as_ref().unwrap();
    assert_eq!(
        (svc.name.as_str(), svc.namespace.as_str(), svc.path.as_deref(), svc.port),
        ("ptwb", NS, Some("/mutate"), Some(443))
    );

    let token = support::service_account_token(admin, NS, "ptwb").await;
    let sa = token_client(api, &token).await;
    // The API server's RBAC cache picks the new bindings up within moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !can_i(&sa, "create", "", "secrets", Some(NS)).await
        || !can_i_named(&sa, "patch", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", None, "ptwb")
            .await
    {
        assert!(Instant::now() < deadline, "the builtin-mode RBAC never took effect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The Secret: create-if-absent, get, update, patch; nothing else.
    let secrets = Api::<Secret>::namespaced(sa.clone(), NS);
    let mine: Secret = serde_json::from_value(json!({
        "metadata": {"name": "ptwb-tls"}, "type": "Opaque",
        "stringData": {"ca.crt": "ca", "tls.crt": "crt", "tls.key": "key"}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &mine).await.expect("create the certificate Secret");
    let mut got = secrets.get("ptwb-tls").await.expect("get the certificate Secret");
    got.string_data = Some(BTreeMap::from([("tls.crt".to_owned(), "renewed".to_owned())]));
    secrets.replace("ptwb-tls", &PostParams::default(), &got).await.expect("update the certificate Secret");
    let patch = json!({"stringData": {"tls.key": "renewed"}});
    secrets
        .patch("ptwb-tls", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch the certificate Secret");
    assert!(is_forbidden(secrets.get("someone-elses").await), "another Secret");
    assert!(
        is_forbidden(secrets.patch("someone-elses", &PatchParams::default(), &Patch::Merge(&patch)).await),
        "patch another Secret"
    );
    assert!(is_forbidden(secrets.list(&ListParams::default()).await), "Secret list");
    assert!(is_forbidden(secrets.delete("ptwb-tls", &Default::default()).await), "Secret delete");
    assert!(
        is_forbidden(Api::<Secret>::namespaced(sa.clone(), APPS).create(&PostParams::default(), &mine).await),
        "Secret create elsewhere"
    );

    // The webhook configuration: get and patch its own caBundle; no other configuration.
    let sa_configs = Api::<MutatingWebhookConfiguration>::all(sa.clone());
    let own = sa_configs.get("ptwb").await.expect("get its webhook configuration");
    let name = own.webhooks.as_ref().unwrap()[0].name.clone();
    let bundle = support::b64(api.pki.ca_pem.as_bytes());
    let patch = json!({"webhooks": [{"name": name, "clientConfig": {"caBundle": bundle}}]});
    sa_configs.patch("ptwb", &PatchParams::default(), &Patch::Strategic(&patch)).await.expect("patch the caBundle");
    let other_config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": "someone-elses"},
        "webhooks": [{
            "name": "other.example.com", "clientConfig": {"url": "https://127.0.0.1:1/x"},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"]}],
            "namespaceSelector": {"matchLabels": {"ptw-test": "never"}},
            "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Ignore"
        }]
    }))
    .unwrap();
    configs.create(&PostParams::default(), &other_config).await.unwrap();
    assert!(is_forbidden(sa_configs.get("someone-elses").await), "another webhook configuration");
    assert!(
        is_forbidden(sa_configs.patch("someone-elses", &PatchParams::default(), &Patch::Strategic(&patch)).await),
        "patch another"
    );
    assert!(is_forbidden(sa_configs.list(&ListParams::default()).await), "list webhook configurations");
    configs.delete("someone-elses", &Default::default()).await.unwrap();

    // Without validatingWebhook.enabled: no access to a validating configuration, even of its name.
    assert!(
        !can_i_named(&sa, "get", "admissionregistration.k8s.io", "validatingwebhookconfigurations", None, "ptwb").await
    );
    assert!(
        !can_i_named(&sa, "patch", "admissionregistration.k8s.io", "validatingwebhookconfigurations", None, "ptwb")
            .await
    );
    assert!(Api::<ValidatingWebhookConfiguration>::all(admin.clone()).get_opt("ptwb").await.unwrap().is_none());

    // helm upgrade keeps the caBundle the process patched in (the chart does not render it); it
    // also turns the validating webhook on (its namespaceSelector matches nothing here either).
    let out = helm_async(install(
        "upgrade",
        &[
            "webhook.timeoutSeconds=3",
            "validatingWebhook.enabled=true",
            "validatingWebhook.namespaceSelector.matchLabels.ptw-test=never",
        ],
    ))
    .await;
    assert!(out.ok, "helm upgrade (builtin) failed:\n{}{}", out.stdout, out.stderr);
    let config = configs.get("ptwb").await.unwrap();
    let w = &config.webhooks.as_ref().unwrap()[0];
    assert_eq!(w.timeout_seconds, Some(3), "the upgrade applied");
    assert_eq!(
        w.client_config.ca_bundle.as_ref().map(|b| b.0.clone()),
        Some(api.pki.ca_pem.as_bytes().to_vec()),
        "helm upgrade reset the caBundle"
    );

    // The ValidatingWebhookConfiguration of the same name, accepted by the API server, and the
    // ServiceAccount can get and patch its caBundle (what the builtin mode does), nothing else.
    let validating = Api::<ValidatingWebhookConfiguration>::all(admin.clone());
    let v = validating.get("ptwb").await.expect("the validating webhook configuration is installed");
    let vw = &v.webhooks.as_ref().unwrap()[0];
    assert_eq!(vw.name, format!("validate.{name}"));
    assert_eq!(vw.client_config.service.as_ref().unwrap().path.as_deref(), Some("/validate"));
    assert_eq!(vw.timeout_seconds, Some(3));
    assert!(vw.client_config.ca_bundle.as_ref().is_none_or(|b| b.0.is_empty()), "rendered empty");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !can_i_named(&sa, "patch", "admissionregistration.k8s.io", "validatingwebhookconfigurations", None, "ptwb")
        .await
    {
        assert!(Instant::now() < deadline, "the validating-webhook RBAC never took effect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sa_validating = Api::<ValidatingWebhookConfiguration>::all(sa.clone());
    sa_validating.get("ptwb").await.expect("get its validating webhook configuration");
    let vpatch = json!({"webhooks": [{"name": vw.name, "clientConfig": {"caBundle": bundle}}]});
    sa_validating
        .patch("ptwb", &PatchParams::default(), &Patch::Strategic(&vpatch))
        .await
        .expect("patch the validating caBundle");
    let v = validating.get("ptwb").await.unwrap();
    assert_eq!(
        v.webhooks.as_ref().unwrap()[0].client_config.ca_bundle.as_ref().map(|b| b.0.clone()),
        Some(api.pki.ca_pem.as_bytes().to_vec())
    );
    assert!(
        !can_i_named(
            &sa,
            "patch",
            "admissionregistration.k8s.io",
            "validatingwebhookconfigurations",
            None,
            "someone-elses"
        )
        .await
    );
    assert!(is_forbidden(sa_validating.list(&ListParams::default()).await), "list validating webhook configurations");
    let out = helm_async(vec![
        "uninstall".into(),
        "ptwb".into(),
        "--kubeconfig".into(),
        kubeconfig.into(),
        "-n".into(),
        NS.into(),
    ])
    .await;
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert!(validating.get_opt("ptwb").await.unwrap().is_none(), "helm uninstall removes the validating configuration");
}

/// A store that is filled in after the webhook's port is known (the port goes into the chart).
struct LazyStore(Arc<Mutex<Option<Arc<ClusterStore>>>>);

impl TemplateStore for LazyStore {
    fn lookup(&self, namespace: &str, name: &str) -> pod_template_webhook::store::Lookup {
        let store = self.0.lock().unwrap().clone().expect("the webhook was called before its store exists");
        store.lookup(namespace, name)
    }

    fn snapshot(&self) -> pod_template_webhook::store::Snapshot<'_> {
        let store = self.0.lock().unwrap().clone().expect("the webhook was called before its store exists");
        pod_template_webhook::store::Snapshot::Current(store.current())
    }

    fn lookup_shadow(&self, namespace: &str, name: &str) -> Option<Arc<pod_template_webhook::store::TemplateEntry>> {
        self.0.lock().unwrap().as_ref()?.lookup_shadow(namespace, name)
    }

    fn is_ready(&self) -> bool {
        self.0.lock().unwrap().as_ref().is_some_and(|s| s.is_ready())
    }

    fn stats(&self) -> pod_template_webhook::store::StoreStats {
        self.0.lock().unwrap().as_ref().map(|s| s.stats()).unwrap_or_default()
    }
}

#[test]
fn exported_environments_leave_both_selections() {
    let webhooks = |sets: &[&str]| {
        let objects = render_ok("ptw", "flyte", None, sets);
        one(&objects, "MutatingWebhookConfiguration")["webhooks"].as_array().unwrap().clone()
    };
    let exists = json!({"key": "flyte.org/environment", "operator": "Exists"});
    let plain = webhooks(&[]);
    assert_eq!(plain[0]["objectSelector"], json!({"matchExpressions": [exists]}));
    assert!(plain.iter().all(|w| w.get("matchConditions").is_none()), "no condition without exclusions");
    let excluding = webhooks(&["webhook.excludeEnvironments={gpu,hello_world}"]);
    assert_eq!(
        excluding[0]["objectSelector"],
        json!({"matchExpressions": [exists, {"key": "flyte.org/environment", "operator": "NotIn", "values": ["gpu", "hello_world"]}]})
    );
    // The task-name selection cannot select on part of a label value: a CEL matchCondition does.
    assert_eq!(excluding[1]["name"], "task-name.pod-templates.flyte.org");
    assert_eq!(
        excluding[1]["matchConditions"],
        json!([{"name": "environment-not-exported", "expression":
            r#"!has(object.metadata.labels) || !("task-name" in object.metadata.labels) || !["gpu","hello_world"].exists(e, object.metadata.labels["task-name"].startsWith(e + "."))"#}])
    );
    let err = render("ptw", "flyte", None, &["webhook.excludeEnvironments={not a label value}"]).unwrap_err();
    assert!(err.contains("excludeEnvironments"), "{err}");
}

#[test]
fn the_task_name_selection_follows_its_names_and_turns_off() {
    let sets = [
        "config.managedLabel=example.com/managed-by",
        "config.managedValue=executor",
        "config.taskNameLabel=example.com/task",
    ];
    let objects = render_ok("ptw", "flyte", None, &sets);
    let w = &one(&objects, "MutatingWebhookConfiguration")["webhooks"][1];
    assert_eq!(
        w["objectSelector"]["matchExpressions"],
        json!([
            {"key": "flyte.org/environment", "operator": "DoesNotExist"},
            {"key": "example.com/managed-by", "operator": "In", "values": ["executor"]},
            {"key": "example.com/task", "operator": "Exists"},
        ])
    );
    let env = env_of(&one(&objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]);
    assert_eq!(env["PTW_MANAGED_LABEL"], "example.com/managed-by");
    assert_eq!(env["PTW_MANAGED_VALUE"], "executor");
    assert_eq!(env["PTW_TASK_NAME_LABEL"], "example.com/task");
    // Off: one entry, and the webhook is told so (an empty task-name label).
    let objects = render_ok("ptw", "flyte", None, &["config.taskNameLabel="]);
    assert_eq!(one(&objects, "MutatingWebhookConfiguration")["webhooks"].as_array().unwrap().len(), 1);
    let env = env_of(&one(&objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]);
    assert_eq!(env["PTW_TASK_NAME_LABEL"], "");
}

#[test]
fn the_audit_cronjob_is_off_by_default_and_read_only() {
    let named_audit = |o: &&Value| o["metadata"]["name"].as_str().unwrap_or_default().ends_with("-audit");
    let objects = render_ok("ptw", "flyte", None, &[]);
    assert!(of_kind(&objects, "CronJob").is_empty(), "no CronJob by default");
    assert!(!objects.iter().any(|o| named_audit(&o)), "nothing of the audit by default");

    let objects = render_ok("ptw", "flyte", None, &["audit.enabled=true", "audit.args={-o,json}"]);
    let cron = one(&objects, "CronJob");
    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid");
    let job = &cron["spec"]["jobTemplate"]["spec"];
    assert_eq!(job["backoffLimit"], 0, "a failed audit is a finding, not retried");
    let pod = &job["template"]["spec"];
    check_pod_security(pod, "audit");
    let container = &pod["containers"][0];
    assert_eq!(strs(&container["args"]), ["audit", "--all-namespaces", "--fail-on", "outdated,missed", "-o", "json"]);
    let deploy = one(&objects, "Deployment");
    let webhook = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], webhook["image"], "the same image");
    // The webhook's names and policy, so the audit judges pods by the webhook's rules.
    let (audit_env, webhook_env) = (env_of(container), env_of(webhook));
    for (name, value) in &audit_env {
        if name != "PTW_LOG_FORMAT" && name != "RUST_LOG" {
            assert_eq!(webhook_env.get(name), Some(value), "{name}");
        }
    }
    for name in ["PTW_PLATFORM_NAMESPACE", "PTW_ENVIRONMENT_LABEL", "PTW_TASK_NAME_LABEL", "PTW_APPLIED_ANNOTATION"] {
        assert!(audit_env.contains_key(name), "{name}");
    }
    // Its own ServiceAccount, bound to a ClusterRole that lists and does nothing else.
    let sa = pod["serviceAccountName"].as_str().unwrap();
    assert_ne!(sa, deploy["spec"]["template"]["spec"]["serviceAccountName"], "not the webhook's identity");
    assert!(of_kind(&objects, "ServiceAccount").iter().any(|s| s["metadata"]["name"] == sa));
    let role = of_kind(&objects, "ClusterRole").into_iter().find(|r| r["metadata"]["name"] == sa).expect("audit role");
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
            {"apiGroups": [""], "resources": ["configmaps", "podtemplates"], "verbs": ["list"]},
        ])
    );
    let binding =
        of_kind(&objects, "ClusterRoleBinding").into_iter().find(|b| b["metadata"]["name"] == sa).expect("binding");
    assert_eq!(binding["roleRef"]["name"], sa);
    assert_eq!(binding["subjects"], json!([{"kind": "ServiceAccount", "name": sa, "namespace": "flyte"}]));
    // The webhook's own objects do not change when the audit is on.
    let without = render_ok("ptw", "flyte", None, &[]);
    let others: Vec<&Value> = objects.iter().filter(|o| !named_audit(o)).collect();
    assert_eq!(others, without.iter().collect::<Vec<_>>());

    // No failOn: the Job only reports. watchNamespaces: pods cluster-wide, templates in Roles.
    let objects =
        render_ok("ptw", "flyte", None, &["audit.enabled=true", "audit.failOn=null", "config.watchNamespaces={ml}"]);
    assert_eq!(
        strs(&one(&objects, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]),
        ["audit", "--all-namespaces"]
    );
    let audit_rules: Vec<_> = rbac_rules(&objects)
        .into_iter()
        .filter(|(kind, ns, r)| {
            let role = objects.iter().find(|o| {
                o["kind"] == kind.as_str()
                    && o["metadata"]["namespace"].as_str() == ns.as_deref()
                    && o["rules"].as_array().is_some_and(|rs| rs.contains(r))
            });
            role.is_some_and(|o| named_audit(&o))
        })
        .collect();
    let want = [
        ("ClusterRole".to_owned(), None, json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]})),
        (
            "Role".to_owned(),
            Some("flyte".to_owned()),
            json!({"apiGroups": [""], "resources": ["configmaps", "podtemplates"], "verbs": ["list"]}),
        ),
        (
            "Role".to_owned(),
            Some("ml".to_owned()),
            json!({"apiGroups": [""], "resources": ["configmaps", "podtemplates"], "verbs": ["list"]}),
        ),
    ];
    assert_eq!(audit_rules, want);
    let err = render("ptw", "flyte", None, &["audit.enabled=true", "audit.failOn={stale}"]).unwrap_err();
    assert!(err.contains("schema"), "{err}");

    for sets in [
        vec!["--set", "audit.enabled=true"],
        vec!["--set", "audit.enabled=true", "--set", "config.watchNamespaces={ml}"],
    ] {
        let mut args = vec!["lint", "--strict", CHART, "--namespace", "flyte"];
        args.extend(sets);
        let out = helm(&args);
        assert!(out.ok && out.stdout.contains("0 chart(s) failed"), "helm lint: {}{}", out.stdout, out.stderr);
    }
}
