//! Templates in the Flyte SDK's own form (SPEC §3), made by the real `flyte` package:
//! `tests/flyte_sdk/make_templates.py` builds them with `flyte.PodTemplate(...)` and serializes
//! each with `to_k8s_pod()` to JSON; the built binary then renders pods with them, and the result
//! must be what the same templates in our native YAML form (`examples/templates`) give.
//!
//! The SDK runs in a virtualenv outside git (`tests/flyte_sdk/venv.sh`, pins in
//! `tests/flyte_sdk/requirements.txt`). Without Python 3 and its venv module the tests fail,
//! never skip: `.ci/run` installs them.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{json, Value};
use support::flyte::output_or_panic;

const BIN: &str = env!("CARGO_BIN_EXE_pod-template-webhook");
const CRATE_DIR: &str = env!("CARGO_MANIFEST_DIR");
const APPLIED: &str = "flyte.org/pod-template-applied";

fn crate_path(rel: &str) -> PathBuf {
    Path::new(CRATE_DIR).join(rel)
}

/// The pinned version of a package in requirements.txt.
fn pinned(package: &str) -> String {
    let text = std::fs::read_to_string(crate_path("tests/flyte_sdk/requirements.txt")).unwrap();
    let prefix = format!("{package}==");
    let line = text.lines().find_map(|l| l.trim().strip_prefix(&prefix)).map(str::to_owned);
    line.unwrap_or_else(|| panic!("tests/flyte_sdk/requirements.txt pins no {package}"))
}

/// The SDK's templates, made once per test binary: a directory holding the ConfigMap manifest
/// `sdk-pod-templates.json`, and the versions the script reported.
fn sdk() -> &'static (tempfile::TempDir, Value) {
    static SDK: OnceLock<(tempfile::TempDir, Value)> = OnceLock::new();
    SDK.get_or_init(|| {
        let started = std::time::Instant::now();
        let python = support::flyte::python();
        eprintln!("flyte SDK virtualenv ready in {:?}", started.elapsed());
        let dir = tempfile::tempdir().unwrap();
        let report = output_or_panic(
            Command::new(python).arg(crate_path("tests/flyte_sdk/make_templates.py")).arg(dir.path()),
            "tests/flyte_sdk/make_templates.py",
        );
        let versions: Value = serde_json::from_str(&report).expect("make_templates.py prints its versions as JSON");
        (dir, versions)
    })
}

fn sdk_dir() -> &'static Path {
    sdk().0.path()
}

/// One data key of the SDK's ConfigMap, the `to_k8s_pod()` JSON, parsed.
fn sdk_template(key: &str) -> Value {
    let text = std::fs::read_to_string(sdk_dir().join("sdk-pod-templates.json")).unwrap();
    let manifest: Value = serde_json::from_str(&text).unwrap();
    let data = manifest["data"][key].as_str().unwrap_or_else(|| panic!("no data key {key}: {manifest}"));
    serde_json::from_str(data).expect("the SDK's template is JSON")
}

/// `pod-template-webhook render --templates DIR POD` on `pod` (YAML), its output parsed.
fn render(templates: &Path, pod: &str) -> Value {
    let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(file.path(), pod).unwrap();
    let args = ["render", "--templates", templates.to_str().unwrap(), file.path().to_str().unwrap()];
    let out = Command::new(BIN).args(args).current_dir(CRATE_DIR).env_remove("RUST_LOG").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "render failed ({}):\n{stderr}", out.status);
    assert!(!stderr.contains("warning"), "render warned:\n{stderr}");
    pod_template_webhook::yaml::from_str(std::str::from_utf8(&out.stdout).unwrap()).expect("render prints a YAML pod")
}

/// Removes the applied annotation (it names the ConfigMap and the content hash, which differ
/// between the two forms) and returns it.
fn take_applied(pod: &mut Value) -> String {
    let annotations = pod["metadata"]["annotations"].as_object_mut().expect("annotations");
    let applied = annotations.remove(APPLIED).expect("the applied annotation");
    applied.as_str().unwrap().to_owned()
}

fn pod(name: &str, environment: &str, containers: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: flytesnacks-development\n  \
         labels:\n    flyte.org/environment: {environment}\nspec:\n  containers:\n{containers}"
    )
}

const HELLO_POD_CONTAINERS: &str = "  - name: a0\n    image: ghcr.io/example/task:1\n    args: [pyflyte-execute]\n";

#[test]
fn sdk_is_the_pinned_version_and_its_json_has_the_k8s_pod_shape() {
    let versions = &sdk().1;
    assert_eq!(versions["flyte"], pinned("flyte"), "the virtualenv runs the pinned flyte");
    assert_eq!(versions["kubernetes"], pinned("kubernetes"));
    // K8sPod as MessageToJson writes it: camelCase names, labels/annotations under metadata.
    let hello = sdk_template("hello_world");
    assert_eq!(
        hello,
        json!({
            "metadata": {"labels": {"lKeyA": "lValA"}, "annotations": {"aKeyA": "aValA"}},
            "podSpec": {
                "containers": [{"name": "primary", "env": [{"name": "hello", "value": "world"}]}],
                "imagePullSecrets": [{"name": "regcred-test"}],
            },
            "primaryContainerName": "primary",
        })
    );
    // No labels or annotations: still an (empty) metadata. The Struct's numbers are doubles.
    let grace = sdk_template("grace");
    assert_eq!(grace["metadata"], json!({}));
    assert!(grace["podSpec"]["terminationGracePeriodSeconds"].is_f64(), "{grace}");
    assert_eq!(grace["podSpec"]["terminationGracePeriodSeconds"], json!(600.0));
    for key in ["hello_world", "gpu", "grace"] {
        let t = sdk_template(key);
        let fields: Vec<&str> = t.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(fields, ["metadata", "podSpec", "primaryContainerName"], "{key}: {t}");
    }
    // `validate` accepts the SDK's ConfigMap as it is.
    let out = Command::new(BIN).arg("validate").arg(sdk_dir()).output().unwrap();
    assert!(out.status.success(), "validate: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn sdk_hello_world_adds_exactly_what_the_template_says() {
    let mut rendered = render(sdk_dir(), &pod("hello", "hello_world", HELLO_POD_CONTAINERS));
    let applied = take_applied(&mut rendered);
    assert!(applied.starts_with("flyte/sdk-pod-templates/hello_world@sha256:"), "{applied}");
    let expected = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "hello",
            "namespace": "flytesnacks-development",
            "labels": {"flyte.org/environment": "hello_world", "lKeyA": "lValA"},
            "annotations": {"aKeyA": "aValA"},
        },
        "spec": {
            "containers": [{
                "name": "a0",
                "image": "ghcr.io/example/task:1",
                "args": ["pyflyte-execute"],
                "env": [{"name": "hello", "value": "world"}],
            }],
            "imagePullSecrets": [{"name": "regcred-test"}],
        },
    });
    assert_eq!(rendered, expected);
}

#[test]
fn sdk_hello_world_renders_like_the_native_yaml() {
    // examples/templates/hello-world.yaml is the docs example in our form (the same file as
    // samples/templates/hello-world.yaml of the shared specification).
    let containers = "  - name: a0\n    image: ghcr.io/example/task:1\n    env:\n    - {name: hello, value: pod}\n  \
                      - name: helper\n    image: busybox\n";
    let pod = pod("hello", "hello_world", containers);
    let mut sdk = render(sdk_dir(), &pod);
    let mut native = render(&crate_path("examples/templates"), &pod);
    assert!(take_applied(&mut sdk).starts_with("flyte/sdk-pod-templates/hello_world@"));
    assert!(take_applied(&mut native).starts_with("flyte/platform-pod-templates/hello_world@"));
    assert_eq!(sdk, native);
    assert_eq!(sdk["spec"]["containers"][0]["env"], json!([{"name": "hello", "value": "pod"}]), "the pod's value wins");
}

#[test]
fn sdk_gpu_template_renders_like_the_native_gpu_example() {
    let pod = std::fs::read_to_string(crate_path("examples/pods/gpu-pod.yaml")).unwrap();
    let mut sdk = render(sdk_dir(), &pod);
    let mut native = render(&crate_path("examples/templates"), &pod);
    assert!(take_applied(&mut sdk).starts_with("flyte/sdk-pod-templates/gpu@"));
    assert!(take_applied(&mut native).starts_with("flyte/gpu-pod-templates/gpu@"));
    assert_eq!(sdk, native);
    // The template did apply: the primary container's GPU limit and the sidecar.
    let containers = sdk["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers[0]["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(containers[1]["name"], "log-shipper");
    assert_eq!(sdk["metadata"]["labels"]["accelerator"], "nvidia");
}

#[test]
fn sdk_doubles_render_as_integers() {
    let mut rendered = render(sdk_dir(), &pod("grace", "grace", HELLO_POD_CONTAINERS));
    take_applied(&mut rendered);
    let spec = &rendered["spec"];
    assert_eq!(spec["terminationGracePeriodSeconds"], json!(600));
    assert!(spec["terminationGracePeriodSeconds"].is_u64(), "{spec}");
    assert!(spec["tolerations"][0]["tolerationSeconds"].is_u64(), "{spec}");
    assert_eq!(spec["tolerations"][0]["tolerationSeconds"], json!(300));
    // Nothing else: an empty metadata adds no labels or annotations.
    assert_eq!(rendered["metadata"]["labels"], json!({"flyte.org/environment": "grace"}));
    assert_eq!(rendered["metadata"]["annotations"], json!({}));
}

/// `examples/flyte/pod.yaml` (the README's "With Flyte 2" example) is the pod the generator makes
/// for `ml-gpu.train` from the pinned SDK: the example stays what Flyte really creates.
#[test]
fn the_readme_flyte_pod_is_the_generated_one() {
    let text = std::fs::read_to_string(crate_path("examples/flyte/pod.yaml")).unwrap();
    let example: Value = pod_template_webhook::yaml::from_str(&text).unwrap();
    let generated = support::flyte::task_pod("ml-gpu", "train");
    assert_eq!(example, generated.pod, "regenerate examples/flyte/pod.yaml from make_pods.py's ml-gpu.train");
}

/// The generator's pods are what SPEC §9 says Flyte creates: managed, a task-name label that is
/// `SanitizeLabelValue(<environment>.<function>)`, no environment label; the container task's one
/// container named like the pod, the k8sPod task's primary named by `primary_container_name`.
#[test]
fn generated_flyte_pods_have_the_executors_shape() {
    let pods = support::flyte::task_pods();
    assert!(pods.len() >= 6, "{}", pods.len());
    for p in pods {
        let labels = &p.pod["metadata"]["labels"];
        let what = &p.task_name;
        assert_eq!(labels["flyte.org/managed"], "true", "{what}");
        assert_eq!(labels["task-name"], p.task_name_label.as_str(), "{what}");
        assert!(labels.get("flyte.org/environment").is_none(), "{what}: Flyte 2 sets no environment label");
        assert_eq!(p.task_name, format!("{}.{}", p.environment, p.function), "{what}: the SDK's task name");
        assert!(p.task_name_label.len() <= 63, "{what}");
        assert_eq!(labels.get("inject-flyte-secrets").is_some(), p.secrets, "{what}");
        let containers = p.pod["spec"]["containers"].as_array().unwrap();
        let primary = p.pod["metadata"]["annotations"]["primary_container_name"].as_str().unwrap();
        assert!(containers.iter().any(|c| c["name"] == primary), "{what}: the annotation names a container");
        if p.target == "container" {
            assert_eq!((containers.len(), primary), (1, p.pod["metadata"]["name"].as_str().unwrap()), "{what}");
        }
    }
    // A task name Flyte cut at 63 characters, with and without its dot.
    assert!(pods.iter().any(|p| p.task_name.len() > 63 && p.task_name_label.contains('.')));
    assert!(pods.iter().any(|p| p.task_name.len() > 63 && !p.task_name_label.contains('.')));
    assert!(pods.iter().any(|p| p.target == "k8sPod"));
}
