use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use serde_json::{json, Value};

use super::*;
use crate::store::{Catalog, TemplateIndex};

fn store() -> TemplateIndex {
    let mut c = Catalog::new("flyte");
    let data = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    c.apply("flyte", "platform", Some("7"), &data(&[("defaults", "labels: {platform: \"yes\"}")]));
    c.apply("ml", "ml-templates", Some("12"), &data(&[("gpu", "podSpec: {nodeSelector: {accelerator: nvidia}}")]));
    c.index()
}

fn policy() -> Policy {
    Policy { default_template: Some("defaults".into()), ..Policy::default() }
}

fn configuration() -> MutatingWebhookConfiguration {
    serde_json::from_value(json!({
        "metadata": {"name": "ptw"},
        "webhooks": [{
            "name": "pod-templates.flyte.org", "admissionReviewVersions": ["v1"], "clientConfig": {}, "sideEffects": "None",
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "objectSelector": {"matchExpressions": [{"key": "flyte.org/environment", "operator": "Exists"}]},
            "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"]}]},
        }]
    }))
    .unwrap()
}

fn pod(labels: Value, annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ml", "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}})
}

fn inputs(pod: Value, live: bool) -> Inputs {
    Inputs {
        pod,
        live,
        namespace: "ml".into(),
        namespace_labels: BTreeMap::from([("kubernetes.io/metadata.name".into(), "ml".into())]),
        notes: vec![],
        discovery: "labelled x=y".into(),
        configurations: vec![configuration()],
    }
}

#[test]
fn a_pod_from_a_file_gets_its_layers_paths_and_record() {
    let report =
        report(&inputs(pod(json!({"flyte.org/environment": "gpu"}), json!({})), false), &store(), &policy()).unwrap();
    assert!(report.sent);
    assert_eq!(report.rule, "label flyte.org/environment");
    let layers: Vec<_> =
        report.layers.iter().map(|l| (l.role.as_str(), l.source.as_str(), l.searched.clone())).collect();
    assert_eq!(
        layers,
        [
            ("platform default", "flyte/platform/defaults@7", vec!["flyte".to_owned()]),
            ("template", "ml/ml-templates/gpu@12", vec!["ml".to_owned(), "flyte".to_owned()]),
        ]
    );
    assert_eq!(report.layers[1].kind, "ConfigMap");
    let paths: Vec<_> = report.patch.iter().map(|p| (p.path.as_str(), p.layer.as_str())).collect();
    assert!(paths.contains(&("/metadata/labels/platform", "platform default flyte/platform/defaults@7")), "{paths:?}");
    assert!(paths.contains(&("/spec/nodeSelector", "template ml/ml-templates/gpu@12")), "{paths:?}");
    assert_eq!(report.record.now.as_deref(), Some("flyte/platform/defaults@7,ml/ml-templates/gpu@12"));
    assert_eq!(report.record.state, "new");
    let text = report.to_text();
    for section in ["Webhook configuration", "Templates", "Patch", "Record", "pod-templates.flyte.org: sent"] {
        assert!(text.contains(section), "{section} missing:\n{text}");
    }
}

#[test]
fn records_current_outdated_missed() {
    let now = "flyte/platform/defaults@7,ml/ml-templates/gpu@12";
    let labels = json!({"flyte.org/environment": "gpu"});
    let state = |annotations: Value, live: bool| {
        report(&inputs(pod(labels.clone(), annotations), live), &store(), &policy()).unwrap().record
    };
    assert_eq!(state(json!({"flyte.org/pod-template-applied": now}), true).state, "current");
    let old = state(json!({"flyte.org/pod-template-applied": "ml/ml-templates/gpu@3"}), true);
    assert_eq!(
        (old.state, old.applied.as_deref(), old.now.as_deref()),
        ("outdated", Some("ml/ml-templates/gpu@3"), Some(now))
    );
    assert_eq!(state(json!({}), true).state, "missed");
}

#[test]
fn a_pod_the_selectors_exclude_is_not_sent_and_says_why() {
    let report = report(&inputs(pod(json!({}), json!({})), true), &store(), &policy()).unwrap();
    assert!(!report.sent);
    assert_eq!(report.record.state, "not sent");
    let verdict = &report.configurations[0].webhooks[0].verdict;
    assert_eq!(
        verdict.excluded_by,
        ["objectSelector: matchExpressions[0] flyte.org/environment Exists: pod has no label flyte.org/environment"]
    );
    assert!(report.to_text().contains("Templates (if it were sent)"));
}

#[test]
fn missing_templates_and_no_configuration_are_said() {
    let mut given = inputs(pod(json!({"flyte.org/environment": "cpu"}), json!({})), true);
    given.configurations.clear();
    let report = report(&given, &store(), &Policy::default()).unwrap();
    assert!(!report.sent);
    assert_eq!(report.not_applied, ["template \"cpu\": not found in namespaces [\"ml\", \"flyte\"]"]);
    assert!(report.to_text().contains("it would not be mutated at all"), "{}", report.to_text());
}

#[test]
fn a_denied_pod_names_the_denial() {
    let pod = pod(json!({}), json!({"flyte.org/pod-template": "nope"}));
    let mut given = inputs(pod, true);
    given.configurations.clear();
    let report = report(&given, &store(), &Policy::default()).unwrap();
    assert!(report.denied.as_deref().is_some_and(|d| d.contains("\"nope\"")), "{:?}", report.denied);
    let bad = report_of_bad_list();
    assert_eq!(bad.record.state, "denied");
}

fn report_of_bad_list() -> Report {
    let given = inputs(pod(json!({}), json!({"flyte.org/pod-template": "a,,b"})), true);
    report(&given, &store(), &Policy::default()).unwrap()
}
