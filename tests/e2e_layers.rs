//! Layers (SPEC §8) end to end against the real kube-apiserver: a platform default, a namespace
//! default and two named templates (one a ConfigMap key, one a PodTemplate object) applied to a
//! pod created through the API server, which calls the webhook over TLS.
//!
//! Its own API server and webhook: the webhook here runs with `--default-template`, which would
//! change every pod of the other end-to-end files.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodTemplate};
use kube::api::{Api, PostParams};
use kube::ResourceExt;
use pod_template_webhook::admission::{OnProblem, Policy};
use pod_template_webhook::names::Names;
use pod_template_webhook::server::AppState;
use pod_template_webhook::store::cluster::ClusterStore;
use pod_template_webhook::store::TemplateStore;
use serde_json::json;
use support::ApiServer;

const PLATFORM: &str = "flyte";
const DEFAULTS: &str = "defaults";

struct Env {
    kubeconfig: std::path::PathBuf,
    state: Arc<AppState>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| support::fixture("e2e-layers", |api, rt| rt.block_on(start_webhook(api))))
}

async fn start_webhook(api: &ApiServer) -> Env {
    let admin = api.client().await;
    support::ensure_namespace(&admin, PLATFORM, json!({})).await;
    let names = Names::default();
    let store = ClusterStore::spawn(admin.clone(), names.clone(), &[], Default::default());
    let policy =
        Policy { names, default_template: Some(DEFAULTS.into()), on_conflict: OnProblem::Warn, ..Policy::default() };
    let state = AppState::new(store.clone(), policy);
    support::wait_for("the store syncs", Duration::from_secs(30), || store.is_ready()).await;

    let pki = support::TestPki::new("ptw-layers-ca");
    let webhook = support::serve_webhook(state.clone(), &pki).await;
    let config = support::mutating_webhook(webhook.port, &pki.ca_pem);
    Api::<MutatingWebhookConfiguration>::all(admin).create(&PostParams::default(), &config).await.unwrap();
    Env { kubeconfig: api.kubeconfig.clone(), state }
}

async fn client() -> kube::Client {
    support::kubeconfig_client(&env().kubeconfig).await
}

/// Creates a template ConfigMap and waits until the webhook serves every key of it.
async fn config_map(c: &kube::Client, ns: &str, name: &str, data: &[(&str, &str)]) {
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"flyte.org/pod-templates": "true"}},
        "data": data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
    }))
    .unwrap();
    let version = Api::<ConfigMap>::namespaced(c.clone(), ns)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap()
        .resource_version()
        .unwrap();
    for (key, _) in data {
        served(ns, key, &version).await;
    }
}

/// Waits until the webhook serves `name` from `ns` at `version`.
async fn served(ns: &str, name: &str, version: &str) {
    let store = &env().state.store;
    support::wait_for("the webhook serves the template", Duration::from_secs(10), || {
        store.lookup(ns, name).entry.is_some_and(|e| e.source.namespace == ns && e.source.version == version)
    })
    .await;
}

#[tokio::test]
async fn platform_default_namespace_default_and_two_named_templates_through_the_api_server() {
    let c = client().await;
    let tenant = "ml-team";
    support::ensure_namespace(&c, tenant, json!({})).await;
    support::ensure_namespace(&c, "other-team", json!({})).await;

    config_map(
        &c,
        PLATFORM,
        "platform-defaults",
        &[(
            DEFAULTS,
            "labels: {platform.example.com/managed: \"true\", tier: platform}\n\
             podSpec:\n  securityContext: {runAsNonRoot: true}\n  tolerations: [{key: spot, operator: Exists, effect: NoSchedule}]\n\
             \x20 containers: [{name: default, env: [{name: TZ, value: UTC}, {name: MODE, value: default}]}]\n",
        )],
    )
    .await;
    config_map(&c, tenant, "tenant-defaults", &[(DEFAULTS, "labels: {tier: tenant, team: ml}")]).await;
    config_map(&c, "other-team", "tenant-defaults", &[(DEFAULTS, "labels: {leak: other-team}")]).await;
    config_map(
        &c,
        PLATFORM,
        "accelerators",
        &[("gpu", "podSpec:\n  nodeSelector: {accelerator: t4}\n  containers: [{name: primary, env: [{name: MODE, value: gpu}]}]\n")],
    )
    .await;
    // The second named template is a PodTemplate object in the tenant's namespace.
    let pt: PodTemplate = serde_json::from_value(json!({
        "metadata": {"name": "a100", "labels": {"flyte.org/pod-templates": "true"}},
        "template": {
            "metadata": {"annotations": {"accelerator.example.com/model": "a100"}},
            "spec": {"nodeSelector": {"accelerator": "a100"},
                     "containers": [{"name": "primary", "image": "unused", "env": [{"name": "NCCL_P2P_LEVEL", "value": "NVL"}]}]}
        }
    }))
    .unwrap();
    let pt = Api::<PodTemplate>::namespaced(c.clone(), tenant).create(&PostParams::default(), &pt).await.unwrap();
    served(tenant, "a100", &pt.resource_version().unwrap()).await;

    let pods = Api::<Pod>::namespaced(c.clone(), tenant);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "train", "labels": {"flyte.org/environment": "training"},
                     "annotations": {"flyte.org/pod-template": "gpu, a100"}},
        "spec": {"containers": [{"name": "primary", "image": "registry.example/train:1",
                                  "env": [{"name": "EPOCHS", "value": "10"}]}]}
    }))
    .unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let stored = serde_json::to_value(pods.get("train").await.unwrap()).unwrap();
    assert_eq!(serde_json::to_value(&created.spec).unwrap(), stored["spec"]);

    let labels = &stored["metadata"]["labels"];
    assert_eq!(labels["platform.example.com/managed"], "true", "platform default");
    assert_eq!((&labels["tier"], &labels["team"]), (&json!("tenant"), &json!("ml")), "the namespace default on top");
    assert_eq!(labels.get("leak"), None, "another namespace's default never applies");
    assert_eq!(stored["metadata"]["annotations"]["accelerator.example.com/model"], "a100");
    let spec = &stored["spec"];
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(spec["nodeSelector"], json!({"accelerator": "a100"}), "the later named template wins the conflict");
    let env: Vec<(&str, &str)> = spec["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
        .collect();
    assert_eq!(
        env,
        [("TZ", "UTC"), ("MODE", "gpu"), ("NCCL_P2P_LEVEL", "NVL"), ("EPOCHS", "10")],
        "MODE from the later layer over the default's; template entries first, the pod's own kept"
    );
    assert_eq!(spec["tolerations"].as_array().unwrap().iter().filter(|t| t["key"] == "spot").count(), 1);
    let applied: Vec<&str> = stored["metadata"]["annotations"]["flyte.org/pod-template-applied"]
        .as_str()
        .unwrap()
        .split(',')
        .map(|l| l.split('@').next().unwrap())
        .collect();
    assert_eq!(
        applied,
        [
            "flyte/platform-defaults/defaults",
            "ml-team/tenant-defaults/defaults",
            "flyte/accelerators/gpu",
            "ml-team/podtemplate:a100/a100"
        ],
        "every layer, lowest first"
    );

    // Defaults apply to every labelled pod, also one whose environment has no template.
    let plain: Pod = serde_json::from_value(json!({
        "metadata": {"name": "plain", "labels": {"flyte.org/environment": "no-such-template"}},
        "spec": {"containers": [{"name": "main", "image": "registry.example/x:1"}]}
    }))
    .unwrap();
    let plain = serde_json::to_value(pods.create(&PostParams::default(), &plain).await.unwrap()).unwrap();
    assert_eq!(plain["metadata"]["labels"]["tier"], "tenant");
    assert_eq!(
        plain["spec"]["containers"][0]["env"],
        json!([{"name": "TZ", "value": "UTC"}, {"name": "MODE", "value": "default"}])
    );

    // A listed template that does not exist: the API server refuses the pod with our message.
    let mut missing = pod.clone();
    missing.metadata.name = Some("missing".into());
    missing.annotations_mut().insert("flyte.org/pod-template".into(), "gpu,nope".into());
    let err = pods.create(&PostParams::default(), &missing).await.unwrap_err().to_string();
    assert!(err.contains("\"nope\"") && err.contains("not found"), "{err}");
    // A repeated item: refused too.
    missing.annotations_mut().insert("flyte.org/pod-template".into(), "gpu,gpu".into());
    let err = pods.create(&PostParams::default(), &missing).await.unwrap_err().to_string();
    assert!(err.contains("\"gpu\" twice"), "{err}");
}
