//! A small driver for instruction-level profiling of the admission path (docs/performance.md):
//!
//!   cargo bench --bench profile_driver --no-run        # prints the binary's path
//!   valgrind --tool=callgrind --callgrind-out-file=cg.out target/release/deps/profile_driver-HASH flyte 2000
//!   callgrind_annotate --inclusive=yes cg.out | head -60
//!
//! Arguments: the input (`flyte`, `gpu`, `env1500`, `log`, `layers`, `task-name`, `rule3-off`) and
//! an iteration count. `task-name` is the flyte review as Flyte 2 creates the pod (no environment
//! label; `flyte.org/managed` and `task-name: hello_world.train`, SPEC §9); `rule3-off` is the
//! flyte review with the task-name rule turned off (`--task-name-label ""`).
//! `layers` is the flyte review with three layers (a platform default, a namespace default,
//! `hello_world`; SPEC §8), to compare with `flyte` (one layer). `flyte`, `gpu`
//! and `env1500` run `parse_review` + `mutate` + `response_body` as the server does (no HTTP, no
//! log line). `log` runs the flyte path and also emits the server's per-admission line
//! (`server::log_decision`, at `debug` for a mutation, enabled here) through a `tracing_subscriber`
//! fmt layer writing to a sink, to count what the line costs when it is on.
//! Under `cargo bench` (an argument `--bench`), it runs each input a few times and exits.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use pod_template_webhook::admission::{self, Policy};
use pod_template_webhook::manifest;
use pod_template_webhook::store::{Catalog, TemplateIndex};

// The allocator the server uses (src/main.rs), so the figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn store() -> TemplateIndex {
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

fn input(name: &str) -> Vec<u8> {
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

fn run(name: &str, iterations: usize) -> usize {
    let store = store();
    let policy = match name {
        "layers" => Policy { default_template: Some("defaults".into()), ..Policy::default() },
        "rule3-off" => {
            let mut policy = Policy::default();
            policy.names.task_name_label = String::new();
            policy
        }
        _ => Policy::default(),
    };
    let body = input(name);
    let mut bytes = 0;
    for _ in 0..iterations {
        let started = std::time::Instant::now();
        let req = admission::parse_review(std::hint::black_box(&body)).unwrap();
        let decision = admission::mutate(req, &store, &policy).unwrap();
        bytes += admission::response_body(&decision).len();
        if name == "log" {
            pod_template_webhook::server::log_decision(&decision, started.elapsed());
        }
    }
    bytes
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--bench" || a == "--test") || args.is_empty() {
        for name in ["flyte", "gpu", "env1500", "layers", "task-name", "rule3-off"] {
            std::hint::black_box(run(name, 3));
        }
        return;
    }
    if args[0] == "log" {
        // As the server logs (text format, EnvFilter at info), into a sink instead of stderr.
        tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .init();
    }
    let iterations = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1000);
    let bytes = run(&args[0], iterations);
    eprintln!("{} x {iterations}: {bytes} response bytes", args[0]);
}
