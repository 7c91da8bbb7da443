//! Property tests of the merge core: for generated pods and templates, the returned patch turns
//! the original into the merged pod, merging again changes nothing, and the result is a valid Pod
//! with unique container, volume and env names.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use k8s_openapi::api::core::v1::Pod;
use pod_template_webhook::admission::{mutate, parse_review, Policy};
use pod_template_webhook::merge::{compose, merge_pod, merge_pod_reference, Layer, Role};
use pod_template_webhook::store::Catalog;
use pod_template_webhook::template::PodTemplate;
use proptest::prelude::*;
use serde_json::{json, Value};

const CONTAINER_NAMES: [&str; 5] = ["primary", "main", "side", "default", "extra"];
const ENV_NAMES: [&str; 5] = ["A", "B", "hello", "PATH", "TZ"];
const VOLUMES: [&str; 3] = ["data", "cache", "kube-api-access"];

fn env() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::btree_map(prop::sample::select(&ENV_NAMES[..]), "[a-z]{0,3}", 0..4)
        .prop_map(|m| m.into_iter().map(|(n, v)| json!({"name": n, "value": v})).collect())
}

fn mounts() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::btree_map(
        prop::sample::select(&["/data", "/cache", "/x"][..]),
        prop::sample::select(&VOLUMES[..]),
        0..3,
    )
    .prop_map(|m| m.into_iter().map(|(p, v)| json!({"name": v, "mountPath": p})).collect())
}

fn container(name: &'static str, with_image: bool) -> impl Strategy<Value = Value> {
    (env(), mounts(), prop::option::of(prop::sample::select(&["Always", "IfNotPresent", "Never"][..])), any::<bool>())
        .prop_map(move |(env, mounts, pull, image)| {
            let mut c = json!({"name": name});
            if with_image || image {
                c["image"] = json!("registry.example/img:1");
            }
            if !env.is_empty() {
                c["env"] = json!(env);
            }
            if !mounts.is_empty() {
                c["volumeMounts"] = json!(mounts);
            }
            if let Some(p) = pull {
                c["imagePullPolicy"] = json!(p);
            }
            c
        })
}

fn containers(with_image: bool, min: usize) -> impl Strategy<Value = Vec<Value>> {
    prop::collection::btree_set(prop::sample::select(&CONTAINER_NAMES[..]), min..4).prop_flat_map(
        move |names: BTreeSet<&'static str>| names.into_iter().map(|n| container(n, with_image)).collect::<Vec<_>>(),
    )
}

fn volumes() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::btree_set(prop::sample::select(&VOLUMES[..]), 0..3)
        .prop_map(|s| s.into_iter().map(|v| json!({"name": v, "emptyDir": {}})).collect())
}

fn string_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(&["team", "a/b", "x~y", "example.com/k~/"][..]).prop_map(str::to_owned),
        "[a-z]{1,3}",
        0..3,
    )
}

fn tolerations() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::vec(prop::sample::select(&["gpu", "spot", "node.kubernetes.io/not-ready"][..]), 0..3)
        .prop_map(|keys| keys.into_iter().map(|k| json!({"key": k, "operator": "Exists"})).collect())
}

fn pod() -> impl Strategy<Value = Value> {
    (containers(true, 1), volumes(), string_map(), string_map(), tolerations(), any::<bool>()).prop_map(
        |(containers, volumes, labels, annotations, tolerations, default_dns)| {
            let mut labels: serde_json::Map<String, Value> = labels.into_iter().map(|(k, v)| (k, json!(v))).collect();
            labels.insert("flyte.org/environment".into(), json!("t"));
            let mut pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "main", "namespace": "team", "labels": labels},
                "spec": {"containers": containers, "dnsPolicy": if default_dns { "ClusterFirst" } else { "None" }},
            });
            if !annotations.is_empty() {
                pod["metadata"]["annotations"] = json!(annotations);
            }
            if !volumes.is_empty() {
                pod["spec"]["volumes"] = json!(volumes);
            }
            if !tolerations.is_empty() {
                pod["spec"]["tolerations"] = json!(tolerations);
            }
            pod
        },
    )
}

fn template() -> impl Strategy<Value = String> {
    (
        prop::sample::select(&["primary", "main", "side"][..]),
        string_map(),
        string_map(),
        containers(false, 0),
        containers(false, 0),
        volumes(),
        tolerations(),
        prop::option::of(prop::sample::select(&["Default", "ClusterFirst"][..])),
    )
        .prop_map(|(primary, labels, annotations, containers, init, volumes, tolerations, dns)| {
            let init: Vec<Value> = init
                .into_iter()
                .map(|mut c| {
                    if c["name"] == "default" {
                        c["name"] = json!("default-init");
                    }
                    c
                })
                .collect();
            let mut spec = json!({"containers": containers, "initContainers": init, "volumes": volumes, "tolerations": tolerations});
            if let Some(d) = dns {
                spec["dnsPolicy"] = json!(d);
            }
            serde_json::to_string(&json!({
                "primaryContainerName": primary, "labels": labels, "annotations": annotations, "podSpec": spec
            }))
            .unwrap()
        })
}

fn unique<'a>(items: impl Iterator<Item = &'a str>) -> bool {
    let mut seen = HashSet::new();
    items.into_iter().all(|n| seen.insert(n))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn patch_applies_merge_is_idempotent_and_result_is_a_valid_pod(pod in pod(), text in template()) {
        let template = PodTemplate::parse(&text).unwrap();

        // The compact template (canonical JSON text) merges exactly as its value tree: the
        // same pod, the same warnings.
        let compact = merge_pod(&pod, &template);
        let reference = merge_pod_reference(&pod, &template);
        prop_assert_eq!(serde_json::to_string(&compact.pod).unwrap(), serde_json::to_string(&reference.pod).unwrap());
        prop_assert_eq!(&compact.warnings, &reference.warnings);

        // Idempotence of the pure merge.
        let once = merge_pod(&pod, &template).pod;
        let twice = merge_pod(&once, &template).pod;
        prop_assert_eq!(&once, &twice);

        // The patch the admission returns turns the original into the merged pod.
        let mut catalog = Catalog::new("flyte");
        catalog.apply("flyte", "cm", Some("1"), &BTreeMap::from([("t".to_owned(), text.clone())]));
        let store = catalog.index();
        let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u", "operation": "CREATE", "namespace": "team", "name": "main", "userInfo": {},
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"}, "object": pod}});
        let req = parse_review(&serde_json::to_vec(&review).unwrap()).unwrap();
        let decision = mutate(req, &store, &Policy::default()).unwrap();
        let mut patched = pod.clone();
        if let Some(p) = &decision.response.patch {
            let p: json_patch::Patch = serde_json::from_slice(p).unwrap();
            json_patch::patch(&mut patched, &p).unwrap();
        }
        let mut expected = once.clone();
        expected["metadata"]["annotations"]["flyte.org/pod-template-applied"] = json!("flyte/cm/t@1");
        prop_assert_eq!(&patched, &expected);

        // Reinvocation on the patched pod: no patch.
        let review2 = { let mut r = review.clone(); r["request"]["object"] = patched.clone(); r };
        let req2 = parse_review(&serde_json::to_vec(&review2).unwrap()).unwrap();
        prop_assert!(mutate(req2, &store, &Policy::default()).unwrap().response.patch.is_none());

        // A valid Pod with unique names.
        let typed: Pod = serde_json::from_value(patched).unwrap();
        let spec = typed.spec.unwrap();
        let all: Vec<_> = spec.containers.iter().chain(spec.init_containers.iter().flatten()).collect();
        prop_assert!(unique(all.iter().map(|c| c.name.as_str())), "container names repeat");
        prop_assert!(all.iter().all(|c| c.image.as_deref().is_some_and(|i| !i.is_empty())), "a container without image");
        prop_assert!(unique(spec.volumes.iter().flatten().map(|v| v.name.as_str())), "volume names repeat");
        for c in &all {
            prop_assert!(unique(c.env.iter().flatten().map(|e| e.name.as_str())), "env names repeat in {}", c.name);
            prop_assert!(unique(c.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str())), "mount paths repeat");
        }
        // Reserved names are never added: every container the merge added is a named sidecar.
        let before: HashSet<&str> = pod["spec"]["containers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        for c in &spec.containers {
            prop_assert!(before.contains(c.name.as_str()) || !template.is_reserved_name(&c.name), "reserved {} added", c.name);
        }
    }

    /// Several layers (SPEC §8): a default and up to three named templates. The patch gives the pod
    /// merged with the composed template, a reinvocation is clean, merging again changes nothing,
    /// and templates that are all the same never conflict.
    #[test]
    fn layered_admission_is_the_merge_with_the_composition_and_is_idempotent(
        pod in pod(),
        default in prop::option::of(template()),
        named in prop::collection::vec(template(), 1..4),
        same in any::<bool>(),
    ) {
        let named: Vec<String> = if same { vec![named[0].clone(); named.len()] } else { named };
        let mut data = BTreeMap::new();
        if let Some(d) = &default {
            data.insert("d".to_owned(), d.clone());
        }
        let keys: Vec<String> = (0..named.len()).map(|i| format!("t{i}")).collect();
        data.extend(keys.iter().cloned().zip(named.iter().cloned()));
        let mut catalog = Catalog::new("flyte");
        catalog.apply("flyte", "cm", Some("1"), &data);
        let store = catalog.index();
        let policy = Policy { default_template: Some("d".into()), ..Policy::default() };

        let parsed: Vec<(Role, PodTemplate)> = default.iter().map(|d| (Role::Default, d))
            .chain(named.iter().map(|t| (Role::Named, t)))
            .map(|(role, text)| (role, PodTemplate::parse(text).unwrap()))
            .collect();
        let layers: Vec<Layer<'_>> = parsed.iter().map(|(role, template)| Layer { role: *role, template }).collect();
        let composition = compose(&layers);
        let once = merge_pod(&pod, &composition.template).pod;
        prop_assert_eq!(&merge_pod(&once, &composition.template).pod, &once);
        if same {
            prop_assert!(composition.conflicts.is_empty(), "{:?}", composition.conflicts);
        }

        let mut annotated = pod.clone();
        annotated["metadata"]["annotations"]["flyte.org/pod-template"] = json!(keys.join(", "));
        let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u", "operation": "CREATE", "namespace": "team", "name": "main", "userInfo": {},
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"}, "object": annotated}});
        let req = parse_review(&serde_json::to_vec(&review).unwrap()).unwrap();
        let decision = mutate(req, &store, &policy).unwrap();
        prop_assert!(decision.response.allowed);
        prop_assert_eq!(decision.response.warnings.as_ref().map_or(0, Vec::len) >= composition.conflicts.len(), true);
        let mut patched = review["request"]["object"].clone();
        if let Some(p) = &decision.response.patch {
            let p: json_patch::Patch = serde_json::from_slice(p).unwrap();
            json_patch::patch(&mut patched, &p).unwrap();
        }
        let mut expected = merge_pod(&review["request"]["object"], &composition.template).pod;
        let applied: Vec<String> = default.iter().map(|_| "flyte/cm/d@1".to_owned())
            .chain(keys.iter().map(|k| format!("flyte/cm/{k}@1"))).collect();
        expected["metadata"]["annotations"]["flyte.org/pod-template-applied"] = json!(applied.join(","));
        prop_assert_eq!(&patched, &expected);

        let review2 = { let mut r = review.clone(); r["request"]["object"] = patched; r };
        let req2 = parse_review(&serde_json::to_vec(&review2).unwrap()).unwrap();
        prop_assert!(mutate(req2, &store, &policy).unwrap().response.patch.is_none(), "reinvocation patched");
    }
}
