//! Flyte 2 task pods as Flyte makes them (SPEC §9): `tests/flyte_sdk/make_pods.py` defines tasks
//! with the real SDK (the pinned `flyte` from PyPI, in the virtualenv of `tests/flyte_sdk/venv.sh`),
//! serializes them with the SDK's own serializer and turns them into pods the way Flyte's executor
//! does. Without Python 3 and its venv module this fails, never skips: `.ci/run` installs them.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

fn crate_path(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Runs `cmd` and returns its stdout; panics naming `what` with its stderr on failure.
pub fn output_or_panic(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed ({}):\n{stderr}", out.status);
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The virtualenv's python, made (or reused) by `tests/flyte_sdk/venv.sh`.
pub fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = output_or_panic(
            Command::new("bash").arg(crate_path("tests/flyte_sdk/venv.sh")),
            "tests/flyte_sdk/venv.sh (the Flyte SDK virtualenv; needs python3 with venv, see .ci/run)",
        );
        out.trim().to_owned()
    })
}

/// One pod of the generator: the task it runs and the Pod manifest.
#[derive(Debug, Clone)]
pub struct TaskPod {
    pub environment: String,
    pub function: String,
    /// `container` or `k8sPod`: the serialized task's target.
    pub target: String,
    pub task_name: String,
    /// The `task-name` label as the executor sanitized it.
    pub task_name_label: String,
    pub secrets: bool,
    pub pod: Value,
}

/// Every pod `make_pods.py` makes, generated once per test binary.
pub fn task_pods() -> &'static [TaskPod] {
    static PODS: OnceLock<Vec<TaskPod>> = OnceLock::new();
    PODS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        output_or_panic(
            Command::new(python()).arg(crate_path("tests/flyte_sdk/make_pods.py")).arg(dir.path()),
            "tests/flyte_sdk/make_pods.py",
        );
        let file: Value = serde_json::from_slice(&std::fs::read(dir.path().join("flyte-pods.json")).unwrap()).unwrap();
        let text = |p: &Value, k: &str| p[k].as_str().unwrap_or_else(|| panic!("{k} in {p}")).to_owned();
        let pods = file["pods"].as_array().expect("pods").iter();
        pods.map(|p| TaskPod {
            environment: text(p, "environment"),
            function: text(p, "function"),
            target: text(p, "target"),
            task_name: text(p, "taskName"),
            task_name_label: text(p, "taskNameLabel"),
            secrets: p["secrets"].as_bool().unwrap(),
            pod: p["pod"].clone(),
        })
        .collect()
    })
}

/// The pod of `environment`'s task `function`.
pub fn task_pod(environment: &str, function: &str) -> &'static TaskPod {
    task_pods()
        .iter()
        .find(|p| p.environment == environment && p.function == function)
        .unwrap_or_else(|| panic!("make_pods.py makes no pod for {environment}.{function}"))
}
