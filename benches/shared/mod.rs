//! The inputs of the instruction and allocation drivers (`profile_driver`, `allocs`): the
//! bundled templates plus an env-heavy one and the §8 defaults, and the named reviews.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use pod_template_webhook::admission::{self, Policy};
use pod_template_webhook::manifest;
use pod_template_webhook::store::{Catalog, TemplateIndex};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

pub fn store() -> TemplateIndex {
    let mut data = BTreeMap::new();
    for file in manifest::manifest_files(&Path::new(ROOT).join("examples/templates")).unwrap() {
        for m in manifest::read_manifests(&file, "flyte").unwrap() {
            if let manifest::ManifestContent::ConfigMap(config_map) = m.content {
                data.extend(config_map);
            }
        }
    }
    let mut env = String::from("primaryContainerName: primary\npodSpec:\n  containers:\n    - name: default\n      env: [{name: TZ, value: UTC}]\n    - name: primary\n      env:\n");
    for i in 0..15 {
        env.push_str(&format!("        - {{name: PLATFORM_{i:02}, value: \"platform value {i}\"}}\n"));
    }
    data.insert("envheavy".into(), env);
    let mut catalog = Catalog::new("flyte");
    assert!(catalog.apply("flyte", "platform-pod-templates", Some("1"), &data).is_empty());
    // The defaults of the `layers` input (the same as the criterion group `layers`).
    let defaults = |text: &str| BTreeMap::from([("defaults".to_owned(), text.to_owned())]);
    let platform = "labels: {platform.example.com/managed: \"true\"}\npodSpec:\n  securityContext: {runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}\n  tolerations: [{key: spot, operator: Exists, effect: NoSchedule}]\n  containers: [{name: default, env: [{name: TZ, value: UTC}]}]\n";
    let tenant = "labels: {team: snacks}\npodSpec: {imagePullSecrets: [{name: snacks-registry}]}\n";
    assert!(catalog.apply("flyte", "platform-defaults", Some("1"), &defaults(platform)).is_empty());
    assert!(catalog.apply("flytesnacks-development", "tenant-defaults", Some("1"), &defaults(tenant)).is_empty());
    catalog.index()
}

pub fn input(name: &str) -> Vec<u8> {
    let read = |rel: &str| std::fs::read(Path::new(ROOT).join(rel)).unwrap();
    match name {
        "flyte" | "log" | "layers" | "rule3-off" => read("examples/reviews/flyte-task-pod.json"),
        "task-name" => {
            let mut review: Value = serde_json::from_slice(&read("examples/reviews/flyte-task-pod.json")).unwrap();
            let labels = review["request"]["object"]["metadata"]["labels"].as_object_mut().unwrap();
            let environment = labels.remove("flyte.org/environment").unwrap();
            labels.insert("flyte.org/managed".into(), json!("true"));
            labels.insert("task-name".into(), json!(format!("{}.train", environment.as_str().unwrap())));
            serde_json::to_vec(&review).unwrap()
        }
        "gpu" => read("examples/reviews/gpu-task-pod.json"),
        "env1500" => {
            let mut review: Value = serde_json::from_slice(&read("examples/reviews/flyte-task-pod.json")).unwrap();
            let pod = &mut review["request"]["object"];
            pod["metadata"]["labels"]["flyte.org/environment"] = json!("envheavy");
            pod["spec"]["containers"][0]["env"] =
                (0..1500).map(|i| json!({"name": format!("POD_ENV_{i:05}"), "value": format!("value-{i}")})).collect();
            serde_json::to_vec(&review).unwrap()
        }
        other => panic!("unknown input {other:?}: flyte, gpu, env1500, log, layers, task-name or rule3-off"),
    }
}

/// The policy an input runs under.
pub fn policy(name: &str) -> Policy {
    match name {
        "layers" => Policy { default_template: Some("defaults".into()), ..Policy::default() },
        "rule3-off" => {
            let mut policy = Policy::default();
            policy.names.task_name_label = String::new();
            policy
        }
        _ => Policy::default(),
    }
}

/// One admission as the server makes it (no HTTP): parse, mutate, response body.
pub fn admit(body: &[u8], store: &TemplateIndex, policy: &Policy) -> admission::Decision {
    let req = admission::parse_review(std::hint::black_box(body)).unwrap();
    admission::mutate(req, store, policy).unwrap()
}
