//! Benchmarks of the admission core on realistic inputs (issue #6, docs/performance.md).
//!
//! `cargo bench --bench merge` — about two minutes on 2 cores. Every input is built here from
//! the files under `examples/`; nothing is downloaded. Groups:
//!
//! - `flyte`   the shared sample Flyte task pod (examples/reviews/flyte-task-pod.json) with the
//!   `hello_world` template: the full path (parse + mutate + response body), and each
//!   stage alone (parse, merge, diff, mutate, response body) to see where time goes;
//!   merge and diff run on the raw pod, as in `mutate`;
//!   plus `3_diff_json_patch_crate`, the `json_patch::diff` + `to_vec` that
//!   `patch::diff` replaced, kept as the one comparison that shows the gain.
//! - `gpu`     a multi-container pod (3 containers) with the `gpu` template (adds a sidecar).
//! - `env1500` a pod whose primary container has 1,500 env vars; the template adds 20 env vars
//!   (5 of them clash with the pod's) plus `default` env on every container.
//! - `pod64k`  a ~64 KB pod (6 containers, many env vars, mounts, volumes, annotations) with `gpu`.
//! - `store`   lookup among 1,000 templates; the full flyte path against that store.
//! - `scaling` merge + diff for 100 / 500 / 1,500 / 3,000 env vars; the run ends by printing
//!   the time ratios (linear would be 5x / 15x / 30x).
//! - `layers`  the flyte full path with one layer (`hello_world`) and with three (a platform
//!   default, a namespace default, `hello_world`; SPEC §8), in one run; the summary
//!   prints the ratio (goal: within 2x).
//! - `environment` the flyte full path with the template chosen by the environment label, the
//!   same with SPEC §9's task-name rule off, and the pod as Flyte 2 creates it (no label;
//!   `flyte.org/managed` + `task-name: hello_world.train`), in one run; the summary prints ratios.
//! - `shadow` the flyte full path without and with one shadow template in reach (SPEC §10).
//!
//! Before the benchmarks, each input's size, patch operation count and patch size are printed
//! (with the operation count `json_patch::diff` would give, for comparison), after checking that
//! the response's patch turns the pod into exactly the merged pod.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use serde_json::{json, Value};

use pod_template_webhook::admission::{self, Policy};
use pod_template_webhook::doc::Document;
use pod_template_webhook::manifest;
use pod_template_webhook::merge::{merge, merge_pod};
use pod_template_webhook::patch;
use pod_template_webhook::store::{Catalog, EntryState, TemplateIndex, TemplateStore};
use pod_template_webhook::template::PodTemplate;
use serde_json::value::RawValue;

// The allocator the server uses (src/main.rs), so the figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn example(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

/// The data keys of every template ConfigMap in examples/templates, by key.
fn example_templates() -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    for file in manifest::manifest_files(&example("examples/templates")).unwrap() {
        for m in manifest::read_manifests(&file, "flyte").unwrap() {
            if let manifest::ManifestContent::ConfigMap(data) = m.content {
                all.extend(data);
            }
        }
    }
    all
}

/// A store with the example templates plus `extra` keys, all in the platform namespace.
fn store_with(extra: &[(&str, String)]) -> TemplateIndex {
    let mut catalog = Catalog::new("flyte");
    let data = example_templates();
    assert!(catalog.apply("flyte", "platform-pod-templates", Some("1"), &data).is_empty());
    let extra: BTreeMap<String, String> = extra.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    if !extra.is_empty() {
        assert!(catalog.apply("flyte", "bench-templates", Some("1"), &extra).is_empty());
    }
    catalog.index()
}

/// 1,000 templates: 90 ConfigMaps of 10 keys in the platform namespace and 10 team namespaces
/// with 10 keys each, plus the examples (which are what the flyte pod uses).
fn store_1000() -> TemplateIndex {
    let mut catalog = Catalog::new("flyte");
    let mut n = 0;
    let mut add = |catalog: &mut Catalog, ns: &str, cm: &str| {
        let data: BTreeMap<String, String> = (0..10)
            .map(|_| {
                n += 1;
                let text = format!(
                    "primaryContainerName: primary\nlabels: {{team: t{n}}}\nannotations: {{cost-center: \"{n}\"}}\n\
                     podSpec:\n  containers:\n  - name: primary\n    env: [{{name: TEMPLATE_ID, value: \"{n}\"}}, {{name: TZ, value: UTC}}]\n\
                     \x20   resources: {{requests: {{cpu: 500m, memory: 1Gi}}}}\n  imagePullSecrets: [{{name: regcred-{n}}}]\n\
                     \x20 nodeSelector: {{pool: p{n}}}\n  tolerations: [{{key: dedicated, operator: Equal, value: t{n}, effect: NoSchedule}}]\n"
                );
                (format!("env-{n:04}"), text)
            })
            .collect();
        assert!(catalog.apply(ns, cm, Some("7"), &data).is_empty());
    };
    for i in 0..90 {
        add(&mut catalog, "flyte", &format!("templates-{i:02}"));
    }
    for i in 0..10 {
        add(&mut catalog, &format!("team-{i}"), "team-templates");
    }
    catalog.apply("flyte", "platform-pod-templates", Some("1"), &example_templates());
    let index = catalog.index();
    assert_eq!(index.stats().templates, 1000 + example_templates().len());
    index
}

fn read_review(rel: &str) -> Value {
    serde_json::from_slice(&std::fs::read(example(rel)).unwrap()).unwrap()
}

/// The flyte review with `pod` as its object, as the bytes the API server sends.
fn review_with(mut review: Value, pod: Value) -> Vec<u8> {
    review["request"]["object"] = pod;
    serde_json::to_vec(&review).unwrap()
}

/// The pod as `admission::mutate` sees it: the object minus managedFields.
/// The pod as the server holds it after `parse_review`: raw JSON.
fn raw_of(pod: &Value) -> Box<RawValue> {
    RawValue::from_string(pod.to_string()).unwrap()
}

/// Merge and diff on a raw pod, as `mutate` does them.
fn merge_and_diff(raw: &RawValue, template: &PodTemplate) -> (Vec<u8>, usize) {
    let document = Document::new(raw);
    let mut doc = document.root();
    merge(&mut doc, template);
    patch::diff(&document.root(), &doc).expect("a request document diffs")
}

fn pod_of(body: &[u8]) -> Value {
    let review: Value = serde_json::from_slice(body).unwrap();
    let mut pod = review["request"]["object"].clone();
    pod["metadata"].as_object_mut().unwrap().remove("managedFields");
    pod
}

fn env_list(prefix: &str, n: usize) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({"name": format!("{prefix}_{i:05}"), "value": format!("value-{i}-of-{prefix}")}))
            .collect(),
    )
}

/// The flyte pod, labelled for `template`, whose primary container has `n` env vars.
fn env_pod(n: usize, template: &str) -> Vec<u8> {
    let review = read_review("examples/reviews/flyte-task-pod.json");
    let mut pod = review["request"]["object"].clone();
    pod["metadata"]["labels"]["flyte.org/environment"] = json!(template);
    pod["spec"]["containers"][0]["env"] = env_list("POD_ENV", n);
    review_with(review, pod)
}

/// The env-heavy template: 20 env vars on the primary (5 clash with the pod's), TZ on all.
fn env_template() -> String {
    let mut env = String::new();
    for i in 0..15 {
        env.push_str(&format!("        - {{name: PLATFORM_{i:02}, value: \"platform value {i}\"}}\n"));
    }
    for i in 0..5 {
        env.push_str(&format!("        - {{name: POD_ENV_{:05}, value: template-loses}}\n", i * 7));
    }
    format!(
        "primaryContainerName: primary\nlabels: {{team: ml}}\npodSpec:\n  containers:\n    - name: default\n      env: [{{name: TZ, value: UTC}}]\n\
         \x20   - name: primary\n      env:\n{env}  imagePullSecrets: [{{name: regcred}}]\n"
    )
}

/// The gpu review's pod with two more containers: a 3-container pod; the template adds a 4th.
fn gpu_multi_pod() -> Vec<u8> {
    let review = read_review("examples/reviews/gpu-task-pod.json");
    let mut pod = review["request"]["object"].clone();
    let containers = pod["spec"]["containers"].as_array_mut().unwrap();
    let mut side = containers[0].clone();
    for name in ["istio-proxy", "vault-agent"] {
        side["name"] = json!(name);
        side["image"] = json!(format!("registry.example.com/{name}:1.2.3"));
        side["args"] = json!(["--config", format!("/etc/{name}/config.yaml")]);
        side["env"] = env_list(&name.to_uppercase().replace('-', "_"), 8);
        containers.push(side.clone());
    }
    review_with(review, pod)
}

/// A ~64 KB pod for the gpu template: 6 containers with 80 env vars and 12 mounts each, 60
/// volumes, 40 annotations, 20 tolerations.
fn pod_64k() -> Vec<u8> {
    let review = read_review("examples/reviews/gpu-task-pod.json");
    let mut pod = review["request"]["object"].clone();
    let base = pod["spec"]["containers"][0].clone();
    let mut containers = Vec::new();
    for c in 0..6 {
        let mut ctr = base.clone();
        let name = if c == 0 { "primary".to_owned() } else { format!("worker-{c}") };
        ctr["name"] = json!(name);
        ctr["env"] = env_list(&format!("C{c}_SETTING"), 80);
        ctr["volumeMounts"] = Value::Array(
            (0..12).map(|m| json!({"name": format!("vol-{m:02}"), "mountPath": format!("/mnt/c{c}/data-{m:02}"), "readOnly": m % 2 == 0})).collect(),
        );
        containers.push(ctr);
    }
    pod["spec"]["containers"] = Value::Array(containers);
    let volumes = pod["spec"]["volumes"].as_array_mut().unwrap();
    for m in 0..60 {
        volumes.push(json!({"name": format!("vol-{m:02}"), "configMap": {"name": format!("config-map-number-{m:02}"), "defaultMode": 420}}));
    }
    let annotations = pod["metadata"]["annotations"].as_object_mut().unwrap();
    for a in 0..40 {
        annotations.insert(
            format!("example.com/annotation-{a:02}"),
            json!(format!("annotation value number {a} with some text")),
        );
    }
    let tolerations = pod["spec"]["tolerations"].as_array_mut().unwrap();
    for t in 0..20 {
        tolerations.push(
            json!({"key": format!("dedicated-{t}"), "operator": "Equal", "value": "batch", "effect": "NoSchedule"}),
        );
    }
    review_with(review, pod)
}

fn template_of(store: &TemplateIndex, name: &str) -> std::sync::Arc<PodTemplate> {
    match &store.lookup("flyte", name).entry.expect("template").state {
        EntryState::Ready(t) => t.clone(),
        other => panic!("{other:?}"),
    }
}

/// The full admission path, as the server runs it (minus HTTP): body in, body out.
fn full_path(body: &[u8], store: &dyn TemplateStore, policy: &Policy) -> Vec<u8> {
    let req = admission::parse_review(body).unwrap();
    let decision = admission::mutate(req, store, policy).unwrap();
    admission::response_body(&decision)
}

/// Prints what one input looks like: sizes and patch operations, once. Checks on the way that
/// the response's patch turns the pod into the merged pod (plus the `applied` annotation).
fn describe(label: &str, body: &[u8], store: &TemplateIndex, template: &PodTemplate) {
    let policy = Policy::default();
    let req = admission::parse_review(body).unwrap();
    let decision = admission::mutate(req, store, &policy).unwrap();
    let out = admission::response_body(&decision);
    let pod = pod_of(body);
    let merged = merge_pod(&pod, template);
    let mut expected = merged.pod.clone();
    if let Some(applied) = &decision.applied {
        expected["metadata"]["annotations"][&policy.names.applied_annotation] = json!(applied);
    }
    assert_eq!(patched(&pod, &out), expected, "{label}: the response's patch does not give the merged pod");
    let old_ops = json_patch::diff(&pod, &merged.pod).0.len();
    let pod_bytes = serde_json::to_vec(&pod).unwrap().len();
    let patch = decision.response.patch.as_ref().map_or(0, Vec::len);
    eprintln!(
        "input {label:<10} review {:>7} B  pod {:>7} B  merged {:>7} B  outcome {:<9} patch {:>5} ops {:>7} B  response {:>7} B  (json_patch::diff: {old_ops} ops)",
        body.len(),
        pod_bytes,
        serde_json::to_vec(&merged.pod).unwrap().len(),
        decision.outcome.as_str(),
        decision.patch_operations,
        patch,
        out.len()
    );
}

fn bench_case(
    c: &mut Criterion,
    group: &str,
    body: &[u8],
    store: &TemplateIndex,
    template: &PodTemplate,
    stages: bool,
) {
    let policy = Policy::default();
    let pod = pod_of(body);
    let raw = raw_of(&pod);
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("full_path", |b| b.iter(|| full_path(black_box(body), store, &policy)));
    g.bench_function("merge_and_diff", |b| b.iter(|| merge_and_diff(black_box(&raw), template)));
    if stages {
        let req = admission::parse_review(body).unwrap();
        let merged = merge_pod(&pod, template).pod;
        let document = Document::new(&raw);
        let mut doc = document.root();
        merge(&mut doc, template);
        let decision = admission::mutate(req.clone(), store, &policy).unwrap();
        g.bench_function("1_parse_review", |b| b.iter(|| admission::parse_review(black_box(body)).unwrap()));
        g.bench_function("2_merge", |b| b.iter(|| merge(&mut Document::new(black_box(&raw)).root(), template)));
        g.bench_function("3_diff", |b| b.iter(|| patch::diff(&document.root(), black_box(&doc)).unwrap()));
        // What `patch::diff` replaced: json_patch's diff, then the patch to bytes.
        g.bench_function("3_diff_json_patch_crate", |b| {
            b.iter(|| serde_json::to_vec(&json_patch::diff(black_box(&pod), &merged)).unwrap())
        });
        // `mutate` takes the request by value: each iteration gets a clone, made outside the timing.
        g.bench_function("4_mutate", |b| {
            b.iter_batched(|| req.clone(), |r| admission::mutate(r, store, &policy).unwrap(), BatchSize::SmallInput)
        });
        g.bench_function("5_response_body", |b| b.iter(|| admission::response_body(black_box(&decision))));
    }
    g.finish();
}

/// The pod the API server would store: `pod` with the response's (base64) patch applied.
fn patched(pod: &Value, response: &[u8]) -> Value {
    use base64::Engine as _;
    let review: Value = serde_json::from_slice(response).unwrap();
    let Some(b64) = review["response"]["patch"].as_str() else { return pod.clone() };
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

fn benches(c: &mut Criterion) {
    let env_tpl = env_template();
    let store = store_with(&[("envheavy", env_tpl)]);
    let hello = template_of(&store, "hello_world");
    let gpu = template_of(&store, "gpu");
    let envheavy = template_of(&store, "envheavy");

    let flyte = std::fs::read(example("examples/reviews/flyte-task-pod.json")).unwrap();
    let gpu_pod = gpu_multi_pod();
    let env1500 = env_pod(1500, "envheavy");
    let big = pod_64k();
    describe("flyte", &flyte, &store, &hello);
    describe("gpu", &gpu_pod, &store, &gpu);
    describe("env1500", &env1500, &store, &envheavy);
    describe("pod64k", &big, &store, &gpu);

    bench_case(c, "flyte", &flyte, &store, &hello, true);
    bench_case(c, "gpu", &gpu_pod, &store, &gpu, false);
    bench_case(c, "env1500", &env1500, &store, &envheavy, false);
    bench_case(c, "pod64k", &big, &store, &gpu, false);

    let big_store = store_1000();
    let policy = Policy::default();
    let mut g = c.benchmark_group("store");
    g.bench_function("lookup_1000_platform_hit", |b| {
        b.iter(|| big_store.lookup(black_box("flytesnacks-development"), black_box("env-0500")))
    });
    g.bench_function("lookup_1000_own_namespace_hit", |b| {
        b.iter(|| big_store.lookup(black_box("team-3"), black_box("env-0935")))
    });
    g.bench_function("lookup_1000_miss", |b| {
        b.iter(|| big_store.lookup(black_box("team-3"), black_box("no-such-template")))
    });
    g.bench_function("flyte_full_path_1000_templates", |b| {
        b.iter(|| full_path(black_box(&flyte), &big_store, &policy))
    });
    g.finish();

    bench_layers(c, &flyte);
    bench_environment(c, &flyte, &store);
    bench_shadow(c, &flyte);

    let mut g = c.benchmark_group("scaling");
    for n in SCALING {
        let body = env_pod(n, "envheavy");
        let raw = raw_of(&pod_of(&body));
        describe(&format!("env{n}"), &body, &store, &envheavy);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("merge_and_diff", n), &raw, |b, raw| {
            b.iter(|| merge_and_diff(black_box(raw), &envheavy))
        });
        g.bench_with_input(BenchmarkId::new("full_path", n), &body, |b, body| {
            b.iter(|| full_path(black_box(body), &store, &policy))
        });
    }
    g.finish();
}

/// The platform default and the namespace default of the `layers` group.
const PLATFORM_DEFAULT: &str = "labels: {platform.example.com/managed: \"true\"}\npodSpec:\n  securityContext: {runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}\n  tolerations: [{key: spot, operator: Exists, effect: NoSchedule}]\n  containers: [{name: default, env: [{name: TZ, value: UTC}]}]\n";
const NAMESPACE_DEFAULT: &str = "labels: {team: snacks}\npodSpec: {imagePullSecrets: [{name: snacks-registry}]}\n";

fn bench_layers(c: &mut Criterion, flyte: &[u8]) {
    let mut catalog = Catalog::new("flyte");
    catalog.apply("flyte", "platform-pod-templates", Some("1"), &example_templates());
    let defaults = |text: &str| BTreeMap::from([("defaults".to_owned(), text.to_owned())]);
    assert!(catalog.apply("flyte", "platform-defaults", Some("1"), &defaults(PLATFORM_DEFAULT)).is_empty());
    assert!(catalog
        .apply("flytesnacks-development", "tenant-defaults", Some("1"), &defaults(NAMESPACE_DEFAULT))
        .is_empty());
    let store = catalog.index();
    let one = Policy::default();
    let three = Policy { default_template: Some("defaults".into()), ..Policy::default() };
    let decision = admission::mutate(admission::parse_review(flyte).unwrap(), &store, &three).unwrap();
    assert_eq!(decision.applied.as_deref().map(|a| a.split(',').count()), Some(3), "three layers apply");
    let mut g = c.benchmark_group("layers");
    g.bench_function("full_path_1_layer", |b| b.iter(|| full_path(black_box(flyte), &store, &one)));
    g.bench_function("full_path_3_layers", |b| b.iter(|| full_path(black_box(flyte), &store, &three)));
    g.finish();
}

/// What choosing the environment costs (SPEC §9): by label with the task-name rule on and off, and
/// by task-name, on the same pod and template.
fn bench_environment(c: &mut Criterion, flyte: &[u8], store: &TemplateIndex) {
    let mut review: Value = serde_json::from_slice(flyte).unwrap();
    let labels = review["request"]["object"]["metadata"]["labels"].as_object_mut().unwrap();
    let environment = labels.remove("flyte.org/environment").unwrap();
    labels.insert("flyte.org/managed".into(), "true".into());
    labels.insert("task-name".into(), format!("{}.train", environment.as_str().unwrap()).into());
    let managed = serde_json::to_vec(&review).unwrap();
    let on = Policy::default();
    let mut off = Policy::default();
    off.names.task_name_label = String::new();
    let decision = admission::mutate(admission::parse_review(&managed).unwrap(), store, &on).unwrap();
    assert!(decision.applied.as_deref().is_some_and(|a| a.ends_with("task-name hello_world.train")), "{decision:?}");
    let mut g = c.benchmark_group("environment");
    g.bench_function("by_label", |b| b.iter(|| full_path(black_box(flyte), store, &on)));
    g.bench_function("by_label_rule3_off", |b| b.iter(|| full_path(black_box(flyte), store, &off)));
    g.bench_function("by_task_name", |b| b.iter(|| full_path(black_box(&managed), store, &on)));
    g.finish();
}

/// What a shadow template costs the pods it reaches (SPEC §10): the flyte pod with its template,
/// and the same with a shadow of that template in the pod's namespace (evaluated, not applied).
fn bench_shadow(c: &mut Criterion, flyte: &[u8]) {
    use pod_template_webhook::template::{Mode, SourceObject};
    let mut catalog = Catalog::new("flyte");
    assert!(catalog.apply("flyte", "platform-pod-templates", Some("1"), &example_templates()).is_empty());
    let plain = catalog.index();
    let next = BTreeMap::from([(
        "hello_world".to_owned(),
        "podSpec: {nodeSelector: {gpu: a100}, containers: [{name: primary, env: [{name: hello, value: next}]}]}"
            .to_owned(),
    )]);
    let object = SourceObject::ConfigMap(&next);
    assert!(catalog.apply_source("flytesnacks-development", "next", Some("2"), object, Ok(Mode::Shadow)).is_empty());
    let shadowed = catalog.index();
    let policy = Policy::default();
    let decision = admission::mutate(admission::parse_review(flyte).unwrap(), &shadowed, &policy).unwrap();
    assert_eq!(decision.shadows.iter().map(|s| s.result()).collect::<Vec<_>>(), ["would_change"]);
    let mut g = c.benchmark_group("shadow");
    g.bench_function("without", |b| b.iter(|| full_path(black_box(flyte), &plain, &policy)));
    g.bench_function("with_one_shadow", |b| b.iter(|| full_path(black_box(flyte), &shadowed, &policy)));
    g.finish();
}

const SCALING: [usize; 4] = [100, 500, 1500, 3000];

/// Reads criterion's point estimate (mean, ns) for `group/function[/param]`.
fn estimate(parts: &[&str]) -> Option<f64> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| Path::new(ROOT).join("target"), PathBuf::from);
    let mut path = target.join("criterion");
    for p in parts {
        path.push(p);
    }
    let text = std::fs::read_to_string(path.join("new/estimates.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

/// Prints the goal table rows measurable here, and the scaling ratios.
fn summary() {
    eprintln!("\n== summary (mean per admission; goals from issue #6) ==");
    for (group, goal) in [("flyte", 20_000.0), ("gpu", 2_000_000.0), ("env1500", 2_000_000.0), ("pod64k", 2_000_000.0)]
    {
        for f in ["full_path", "merge_and_diff"] {
            if let Some(ns) = estimate(&[group, f]) {
                let verdict = if ns <= goal { "ok" } else { "OVER GOAL" };
                eprintln!("{group:>8}/{f:<15} {:>10.2} us   goal <= {:>7.0} us  {verdict}", ns / 1e3, goal / 1e3);
            }
        }
    }
    if let (Some(new), Some(old)) = (estimate(&["flyte", "3_diff"]), estimate(&["flyte", "3_diff_json_patch_crate"])) {
        eprintln!(
            "flyte diff: patch::diff {:.2} us, json_patch::diff + to_vec {:.2} us (x{:.1})",
            new / 1e3,
            old / 1e3,
            old / new
        );
    }
    if let (Some(one), Some(three)) =
        (estimate(&["layers", "full_path_1_layer"]), estimate(&["layers", "full_path_3_layers"]))
    {
        let verdict = if three <= 2.0 * one { "ok" } else { "OVER GOAL" };
        eprintln!(
            "layers: 1 layer {:.2} us, 3 layers {:.2} us (x{:.2}, goal <= x2) {verdict}",
            one / 1e3,
            three / 1e3,
            three / one
        );
    }
    let environment = |f: &str| estimate(&["environment", f]);
    if let (Some(label), Some(off), Some(task)) =
        (environment("by_label"), environment("by_label_rule3_off"), environment("by_task_name"))
    {
        eprintln!(
            "environment: by label {:.2} us (rule 3 off: x{:.3}), by task-name x{:.3}",
            label / 1e3,
            off / label,
            task / label
        );
    }
    if let (Some(without), Some(with)) = (estimate(&["shadow", "without"]), estimate(&["shadow", "with_one_shadow"])) {
        eprintln!(
            "shadow: without {:.2} us, with one shadow {:.2} us (x{:.2})",
            without / 1e3,
            with / 1e3,
            with / without
        );
    }
    let stages: Vec<String> = ["1_parse_review", "2_merge", "3_diff", "4_mutate", "5_response_body"]
        .iter()
        .filter_map(|f| estimate(&["flyte", f]).map(|ns| format!("{f} {:.2} us", ns / 1e3)))
        .collect();
    eprintln!("flyte stages: {}", stages.join("; "));
    for f in ["merge_and_diff", "full_path"] {
        let times: Vec<Option<f64>> = SCALING.iter().map(|n| estimate(&["scaling", f, &n.to_string()])).collect();
        if let Some(base) = times[0] {
            let row: Vec<String> = SCALING
                .iter()
                .zip(&times)
                .map(|(n, t)| match t {
                    Some(t) => format!(
                        "{n}: {:.1} us (x{:.1}, linear x{:.0})",
                        t / 1e3,
                        t / base,
                        *n as f64 / SCALING[0] as f64
                    ),
                    None => format!("{n}: ?"),
                })
                .collect();
            eprintln!("scaling {f}: {}", row.join("; "));
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
        .configure_from_args();
    benches(&mut c);
    c.final_summary();
    summary();
}
