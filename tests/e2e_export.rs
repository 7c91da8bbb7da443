//! `export-policy` (issue 14) against the real kube-apiserver: the same pods created once through
//! the webhook and once through the exported MutatingAdmissionPolicies (webhook configuration
//! removed) must be equal, field for field — the applied annotation included, since the webhook
//! here serves the same directory (content-hash versions, like the export). Then both at once,
//! as during a rollout: the webhook's merge of the policy's pod changes nothing.
//!
//! Its own API server: admission configuration is cluster-wide, and it changes here.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{
    MutatingAdmissionPolicy, MutatingAdmissionPolicyBinding, MutatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use pod_template_webhook::admission::Policy;
use pod_template_webhook::names::Names;
use pod_template_webhook::server::AppState;
use pod_template_webhook::store::dir::DirStore;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_pod-template-webhook");
const APPLIED: &str = "flyte.org/pod-template-applied";
/// Namespaces the pods are created in: the platform's, a tenant with templates of its own, and
/// one without.
const NAMESPACES: [&str; 3] = ["flyte", "ml-team", "team-a"];

struct Env {
    kubeconfig: std::path::PathBuf,
    pki: support::TestPki,
    runtime: tokio::runtime::Handle,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        support::fixture("e2e-export", |api, rt| {
            rt.block_on(async {
                let admin = api.client().await;
                for ns in NAMESPACES {
                    support::ensure_namespace(&admin, ns, json!({})).await;
                }
            });
            Env {
                kubeconfig: api.kubeconfig.clone(),
                pki: support::TestPki::new("ptw-export-ca"),
                runtime: rt.handle().clone(),
            }
        })
    })
}

/// `pod-template-webhook export-policy ARGS...`: (exit code, stdout, stderr).
fn export_policy(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).arg("export-policy").args(args).env("RUST_LOG", "warn").output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

/// The objects of a multi-document YAML text.
fn documents(yaml: &str) -> Vec<Value> {
    pod_template_webhook::yaml::documents(yaml).unwrap_or_else(|e| panic!("export-policy printed no YAML: {e}\n{yaml}"))
}

/// Pods of several shapes that name `template`: by label, by annotation (spaces around it), with
/// fields of their own that overlap the templates', several containers, init containers.
fn shapes(template: &str, index: usize) -> Vec<Value> {
    let name = |shape: &str| format!("t{index}-{shape}");
    let image = "registry.example/app:1";
    vec![
        json!({"metadata": {"name": name("plain"), "labels": {"flyte.org/environment": template}},
               "spec": {"containers": [{"name": "primary", "image": image}]}}),
        json!({"metadata": {"name": name("annotated"), "labels": {"flyte.org/environment": "other", "team": "mine"},
                     "annotations": {"flyte.org/pod-template": format!(" {template} "), "example.com/owner": "me"}},
        "spec": {
            "nodeSelector": {"zone": "b"},
            "tolerations": [{"key": "spot", "operator": "Exists"}],
            "volumes": [{"name": "scratch", "emptyDir": {"medium": "Memory"}}],
            "initContainers": [{"name": "setup", "image": "busybox:1.36"}],
            "containers": [
                {"name": "app", "image": "registry.example/app", "env": [{"name": "TZ", "value": "Europe/Paris"}],
                 "ports": [{"containerPort": 8080, "name": "web"}], "args": ["--own"]},
                {"name": "proxy", "image": "registry.example/proxy:latest", "imagePullPolicy": "IfNotPresent"},
            ]}}),
        // Named like one of its containers, which is then its primary; and a container named
        // like a template container that would otherwise be added.
        json!({"metadata": {"name": name("named"), "labels": {"flyte.org/environment": template}},
               "spec": {
                   "schedulerName": "own-scheduler",
                   "securityContext": {"runAsUser": 1000},
                   "containers": [
                       {"name": "helper", "image": "registry.example/helper@sha256:0000000000000000000000000000000000000000000000000000000000000000"},
                       {"name": name("named"), "image": image, "resources": {"limits": {"cpu": "2"}},
                        "volumeMounts": [{"name": "own", "mountPath": "/scratch"}]},
                       {"name": "no-image", "image": image},
                       // Named like a template init container: that one is then not added.
                       {"name": "fetch", "image": image},
                   ],
                   "volumes": [{"name": "own", "emptyDir": {}}]}}),
        // Chooses its primary container by annotation; a blank template annotation leaves the label.
        json!({"metadata": {"name": name("chosen"), "labels": {"flyte.org/environment": template},
                            "annotations": {"kubectl.kubernetes.io/default-container": "second", "flyte.org/pod-template": " "}},
               "spec": {"containers": [{"name": "first", "image": image}, {"name": "second", "image": image}]}}),
        // A Flyte 2 task pod (SPEC §9): no environment label, the environment in its task-name.
        json!({"metadata": {"name": name("flyte"), "labels": {"flyte.org/managed": "true", "task-name": format!("{template}.train")},
                            "annotations": {"primary_container_name": name("flyte")}},
               "spec": {"containers": [{"name": name("flyte"), "image": image, "args": ["pyflyte-execute"]}]}}),
    ]
}

/// Every pod for every template name of the export, in every namespace, plus one no template
/// applies to.
fn all_pods(templates: &[String]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for ns in NAMESPACES {
        for (i, t) in templates.iter().enumerate() {
            out.extend(shapes(t, i).into_iter().map(|p| (ns.to_owned(), p)));
        }
        out.push((ns.to_owned(), shapes("no-such-template", templates.len()).remove(0)));
    }
    out
}

/// A stored pod without what differs between two creations of it.
fn normalized(pod: Pod) -> Value {
    let mut v = serde_json::to_value(pod).unwrap();
    let meta = v["metadata"].as_object_mut().unwrap();
    for volatile in ["uid", "creationTimestamp", "resourceVersion", "managedFields"] {
        meta.remove(volatile);
    }
    // The ServiceAccount admission plugin names the token volume with a random suffix.
    let text = v.to_string();
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find("kube-api-access-") {
        out.push_str(&rest[..at + "kube-api-access".len()]);
        rest = &rest[at + "kube-api-access-".len() + 5..];
    }
    out.push_str(rest);
    serde_json::from_str(&out).unwrap()
}

/// Creates the pods, returns them as stored, and deletes them again.
async fn create_all(c: &kube::Client, pods: &[(String, Value)]) -> Vec<Value> {
    let mut stored = Vec::new();
    for (ns, pod) in pods {
        let api = Api::<Pod>::namespaced(c.clone(), ns);
        let pod: Pod = serde_json::from_value(pod.clone()).unwrap();
        let created = api.create(&PostParams::default(), &pod).await.unwrap_or_else(|e| panic!("{ns}/{pod:?}: {e}"));
        stored.push(normalized(created));
    }
    for (ns, pod) in pods {
        let name = pod["metadata"]["name"].as_str().unwrap();
        Api::<Pod>::namespaced(c.clone(), ns)
            .delete(name, &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() })
            .await
            .unwrap();
    }
    // No kubelet: an unscheduled pod is gone at once; wait anyway so that names are free.
    for ns in NAMESPACES {
        let api = Api::<Pod>::namespaced(c.clone(), ns);
        let started = Instant::now();
        while !api.list(&ListParams::default()).await.unwrap().items.is_empty() {
            assert!(started.elapsed() < Duration::from_secs(30), "pods of {ns} not deleted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stored
}

/// Waits until a dry-run creation of each probe is mutated (`true`) or not (`false`): admission
/// configuration reaches the API server's admission chain asynchronously.
async fn wait_admission(c: &kube::Client, probes: &[(String, Value)], mutated: bool) {
    let dry = PostParams { dry_run: true, ..PostParams::default() };
    for (ns, pod) in probes {
        let api = Api::<Pod>::namespaced(c.clone(), ns);
        let pod: Pod = serde_json::from_value(pod.clone()).unwrap();
        let started = Instant::now();
        loop {
            let made = api.create(&dry, &pod).await.unwrap();
            if made.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(APPLIED)) == mutated {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "admission of {ns} not {mutated} in time");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn compare(what: &str, expected: &[Value], got: &[Value]) {
    assert_eq!(expected.len(), got.len());
    for (e, g) in expected.iter().zip(got) {
        let id = format!("{}/{}", e["metadata"]["namespace"], e["metadata"]["name"]);
        assert!(
            e == g,
            "{what}: pod {id} differs\nwebhook:\n{}\n{what}:\n{}",
            serde_json::to_string_pretty(e).unwrap(),
            serde_json::to_string_pretty(g).unwrap()
        );
    }
}

async fn compare_directory(dir: &str) {
    let c = support::kubeconfig_client(&env().kubeconfig).await;
    let (code, yaml, stderr) = export_policy(&["--templates", dir]);
    assert_eq!(code, 0, "{dir}: {stderr}");
    let objects = documents(&yaml);
    let policies: Vec<MutatingAdmissionPolicy> = objects
        .iter()
        .filter(|o| o["kind"] == "MutatingAdmissionPolicy")
        .map(|o| serde_json::from_value(o.clone()).unwrap())
        .collect();
    let bindings: Vec<MutatingAdmissionPolicyBinding> = objects
        .iter()
        .filter(|o| o["kind"] == "MutatingAdmissionPolicyBinding")
        .map(|o| serde_json::from_value(o.clone()).unwrap())
        .collect();
    // Two bindings a policy: the chart's two selections (environment label; managed task pods).
    assert!(!policies.is_empty() && 2 * policies.len() == bindings.len(), "{dir}: {yaml}");

    let names = Names::default();
    let store = DirStore::load(Path::new(dir), &names).unwrap();
    let mut templates: Vec<String> = objects
        .iter()
        .filter_map(|o| o["metadata"]["annotations"][APPLIED].as_str())
        .map(|applied| applied.split('/').nth(2).unwrap().split('@').next().unwrap().to_owned())
        .collect();
    templates.sort();
    templates.dedup();
    let pods = all_pods(&templates);
    // One probe per exported template, in the namespace of its source.
    let probes: Vec<(String, Value)> = objects
        .iter()
        .filter_map(|o| o["metadata"]["annotations"][APPLIED].as_str())
        .map(|applied| {
            let mut parts = applied.split('/');
            let ns = parts.next().unwrap().to_owned();
            let key = parts.nth(1).unwrap().split('@').next().unwrap();
            let index = templates.iter().position(|t| t == key).unwrap();
            (ns, shapes(key, index).remove(0))
        })
        .collect();

    // Through the webhook, serving the same directory.
    let state = AppState::new(Arc::new(store), Policy { names, ..Policy::default() });
    let webhook = support::serve_webhook(state, &env().pki).await;
    let webhooks = Api::<MutatingWebhookConfiguration>::all(c.clone());
    let config = support::chart_mutating_webhook(webhook.port, &env().pki.ca_pem, &[]);
    let config_name = config.metadata.name.clone().unwrap();
    webhooks.create(&PostParams::default(), &config).await.unwrap();
    wait_admission(&c, &probes, true).await;
    let through_webhook = create_all(&c, &pods).await;
    webhooks.delete(&config_name, &DeleteParams::default()).await.unwrap();
    wait_admission(&c, &probes, false).await;
    let mutated = through_webhook.iter().filter(|p| p["metadata"]["annotations"][APPLIED].is_string()).count();
    eprintln!("{dir}: {} policies, {} pods, {mutated} mutated by the webhook", policies.len(), pods.len());
    assert!(
        mutated >= probes.len() * 3,
        "{dir}: only {mutated} pods got a template: the comparison would prove little"
    );

    // Through the exported policies alone.
    let policy_api = Api::<MutatingAdmissionPolicy>::all(c.clone());
    let binding_api = Api::<MutatingAdmissionPolicyBinding>::all(c.clone());
    for p in &policies {
        policy_api
            .create(&PostParams::default(), p)
            .await
            .unwrap_or_else(|e| panic!("{dir}: policy {:?}: {e}", p.metadata.name));
    }
    for b in &bindings {
        binding_api.create(&PostParams::default(), b).await.unwrap();
    }
    wait_admission(&c, &probes, true).await;
    let through_policy = create_all(&c, &pods).await;
    compare(&format!("{dir}: the exported policy"), &through_webhook, &through_policy);

    // Both, as while rolling out: the webhook finds nothing left to do.
    webhooks.create(&PostParams::default(), &config).await.unwrap();
    let reviews_before: usize = NAMESPACES.iter().map(|ns| webhook.reviews_in(ns)).sum();
    let through_both = create_all(&c, &pods).await;
    let reviews_after: usize = NAMESPACES.iter().map(|ns| webhook.reviews_in(ns)).sum();
    assert!(reviews_after > reviews_before, "{dir}: the webhook was not called");
    compare(&format!("{dir}: the policy, then the webhook"), &through_webhook, &through_both);

    webhooks.delete(&config_name, &DeleteParams::default()).await.unwrap();
    for b in &bindings {
        binding_api.delete(b.metadata.name.as_deref().unwrap(), &DeleteParams::default()).await.unwrap();
    }
    for p in &policies {
        policy_api.delete(p.metadata.name.as_deref().unwrap(), &DeleteParams::default()).await.unwrap();
    }
    wait_admission(&c, &probes, false).await;
}

/// Admission configuration is cluster-wide: the directories take turns on the one API server.
#[test]
fn exported_policies_make_the_same_pods_as_the_webhook() {
    let env = env();
    for dir in ["examples/templates", "examples/layers", "tests/export"] {
        let started = Instant::now();
        env.runtime.block_on(compare_directory(dir));
        eprintln!("{dir}: compared in {:?}", started.elapsed());
    }
}

/// A temporary template directory holding `manifests`.
fn template_dir(manifests: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("templates.yaml"), manifests).unwrap();
    dir
}

fn config_map(namespace: &str, name: &str, data: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{flyte.org/pod-templates: \"true\"}}}}\ndata:\n{data}\n---\n"
    )
}

fn exported_names(yaml: &str) -> Vec<String> {
    documents(yaml)
        .iter()
        .filter(|o| o["kind"] == "MutatingAdmissionPolicy")
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_broken_template_is_named_and_the_others_are_still_exported() {
    let dir = template_dir(&config_map(
        "flyte",
        "cm",
        "  fine: 'labels: {a: b}'\n  typo: 'podSpec: {containers: [{name: primary, evn: []}]}'",
    ));
    let (code, yaml, stderr) = export_policy(&["--templates", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("template flyte/typo (ConfigMap flyte/cm key \"typo\"): not exported: does not parse: podSpec.containers[0].evn: unknown field"),
        "{stderr}"
    );
    assert!(!stderr.contains("flyte/fine"), "{stderr}");
    assert_eq!(exported_names(&yaml), ["pod-template.flyte.fine"]);
}

#[test]
fn a_shadowed_template_is_refused_naming_the_one_that_wins() {
    let manifests = config_map("flyte", "b-second", "  t: 'labels: {from: b}'")
        + &config_map("flyte", "a-first", "  t: 'labels: {from: a}'");
    let dir = template_dir(&manifests);
    let (code, yaml, stderr) = export_policy(&["--templates", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("template flyte/t (ConfigMap flyte/b-second key \"t\"): not exported: never applied by the webhook: ConfigMap flyte/a-first key \"t\""),
        "{stderr}"
    );
    let policies: Vec<Value> =
        documents(&yaml).into_iter().filter(|o| o["kind"] == "MutatingAdmissionPolicy").collect();
    assert_eq!(policies.len(), 1);
    assert!(policies[0]["metadata"]["annotations"][APPLIED].as_str().unwrap().starts_with("flyte/a-first/t@sha256:"));
}

#[test]
fn with_a_default_template_nothing_is_exported() {
    let (code, yaml, stderr) = export_policy(&["--templates", "examples/layers", "--default-template", "defaults"]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(yaml, "", "no policy at all");
    for template in ["flyte/defaults", "ml-team/defaults", "flyte/gpu", "flyte/a100"] {
        assert!(
            stderr.contains(&format!("template {template} (")) && stderr.contains("--default-template \"defaults\""),
            "{template}: {stderr}"
        );
    }
    assert!(stderr.contains("4 template(s) not exported"), "{stderr}");
}

#[test]
fn templates_can_be_chosen_by_name_or_namespace_and_name() {
    let (code, yaml, stderr) = export_policy(&["--templates", "examples/layers", "ml-team/defaults", "gpu"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(exported_names(&yaml), ["pod-template.ml-team.defaults", "pod-template.flyte.gpu"]);
    // The platform's `defaults` is not printed, yet its namespace rule still knows ml-team's.
    let (_, all, _) = export_policy(&["--templates", "examples/layers", "flyte/defaults"]);
    let binding = documents(&all).into_iter().find(|o| o["kind"] == "MutatingAdmissionPolicyBinding").unwrap();
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"],
        json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["ml-team"]}]})
    );
    let (code, _, stderr) = export_policy(&["--templates", "examples/layers", "nope"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("no template \"nope\" in examples/layers"), "{stderr}");
}
