//! The command line (SPEC §6), run as the real binary: `mutate`, `render`, `validate`, and
//! `serve` answering byte-for-byte what `mutate` prints.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_pod-template-webhook");
const CRATE_DIR: &str = env!("CARGO_MANIFEST_DIR");

fn crate_path(rel: &str) -> PathBuf {
    Path::new(CRATE_DIR).join(rel)
}

struct Run {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn stdout_str(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("stdout is UTF-8")
    }

    fn describe(&self) -> String {
        format!(
            "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        )
    }
}

/// Runs the binary in the crate directory with `args` and optional stdin, for at most 30 s.
fn run_bin(args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(CRATE_DIR)
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let input = stdin.map(<[u8]>::to_vec);
    let mut child_stdin = child.stdin.take();
    let writer = std::thread::spawn(move || {
        if let (Some(mut w), Some(input)) = (child_stdin.take(), input) {
            let _ = w.write_all(&input);
        }
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let status = wait_bounded(&mut child, Duration::from_secs(30)).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("`{}` did not finish within 30 s", args.join(" "));
    });
    writer.join().unwrap();
    Run {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned(),
    }
}

fn wait_bounded(child: &mut Child, bound: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_json(rel: &str) -> Value {
    serde_json::from_slice(&std::fs::read(crate_path(rel)).unwrap()).unwrap()
}

/// The response's `patch`: base64 of the JSON Patch, as Kubernetes encodes `[]byte`.
fn patch_of(response: &Value) -> json_patch::Patch {
    use base64::Engine as _;
    let text = response["patch"].as_str().unwrap_or_else(|| panic!("patch is not a base64 string: {response}"));
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).expect("base64");
    serde_json::from_slice(&bytes).expect("the patch is a JSON Patch")
}

fn without_managed_fields(mut object: Value) -> Value {
    object["metadata"].as_object_mut().unwrap().remove("managedFields");
    object
}

fn remove(object: &mut Value, parent: &str, key: &str) -> Value {
    object
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("{parent} is an object"))
        .remove(key)
        .unwrap_or_else(|| panic!("{parent}/{key} is present"))
}

const FLYTE_REVIEW: &str = "examples/reviews/flyte-task-pod.json";

// ---------------------------------------------------------------------------------------------
// mutate

#[test]
fn mutate_applies_exactly_the_hello_world_template() {
    let run = run_bin(&["mutate", "--templates", "examples/templates", FLYTE_REVIEW], None);
    assert!(run.status.success(), "{}", run.describe());
    assert!(run.stdout.ends_with(b"}\n"), "one JSON document and a newline: {}", run.describe());
    assert!(!run.stdout[..run.stdout.len() - 1].contains(&b'\n'), "the response is one line");
    let answer: Value = serde_json::from_slice(&run.stdout).expect("stdout is JSON");
    let review = read_json(FLYTE_REVIEW);

    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert!(answer.get("request").is_none(), "the response does not carry the request back");
    let response = &answer["response"];
    assert_eq!(response["uid"], review["request"]["uid"], "uid echoed");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");

    let original = review["request"]["object"].clone();
    let mut patched = original.clone();
    json_patch::patch(&mut patched, &patch_of(response))
        .expect("the patch applies to the object as sent (with managedFields)");
    let mut patched = without_managed_fields(patched);
    let expected_unchanged = without_managed_fields(original.clone());

    // The changes the template asks for...
    assert_eq!(remove(&mut patched, "/metadata/labels", "lKeyA"), "lValA");
    assert_eq!(remove(&mut patched, "/metadata/annotations", "aKeyA"), "aValA");
    let applied = remove(&mut patched, "/metadata/annotations", "flyte.org/pod-template-applied");
    let applied = applied.as_str().expect("applied annotation is a string").to_owned();
    let digest = applied.strip_prefix("flyte/platform-pod-templates/hello_world@sha256:").unwrap_or_else(|| {
        panic!("applied annotation names namespace/configmap/key@sha256 of the file content: {applied}")
    });
    assert!(!digest.is_empty() && digest.chars().all(|c| c.is_ascii_hexdigit()), "hex digest: {applied}");
    assert_eq!(response["auditAnnotations"]["applied"], applied.as_str(), "auditAnnotations say what was applied");
    assert_eq!(remove(&mut patched, "/spec", "imagePullSecrets"), json!([{"name": "regcred-test"}]));
    let env = patched["spec"]["containers"][0]["env"].as_array_mut().expect("primary container env");
    assert_eq!(env[0], json!({"name": "hello", "value": "world"}), "the template's env comes first: {env:?}");
    env.remove(0);

    // ...and nothing else: the pod's own env is kept in order, every other field untouched.
    assert_eq!(patched, expected_unchanged, "the patch changed something the template does not ask for");

    // Idempotence through the CLI: reviewing the mutated pod again changes nothing.
    let mut again = review.clone();
    let mut mutated = original;
    json_patch::patch(&mut mutated, &patch_of(response)).unwrap();
    again["request"]["object"] = mutated;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("again.json");
    std::fs::write(&file, serde_json::to_vec(&again).unwrap()).unwrap();
    let run = run_bin(&["mutate", "--templates", "examples/templates", file.to_str().unwrap()], None);
    assert!(run.status.success(), "{}", run.describe());
    let answer: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "a mutated pod needs no further patch: {answer}");
}

#[test]
fn mutate_from_stdin_prints_the_same_as_from_a_file() {
    let from_file = run_bin(&["mutate", "--templates", "examples/templates", FLYTE_REVIEW], None);
    assert!(from_file.status.success(), "{}", from_file.describe());
    let input = std::fs::read(crate_path(FLYTE_REVIEW)).unwrap();
    let from_stdin = run_bin(&["mutate", "--templates", "examples/templates", "-"], Some(&input));
    assert!(from_stdin.status.success(), "{}", from_stdin.describe());
    assert_eq!(from_stdin.stdout_str(), from_file.stdout_str());
    // `-` is also the default.
    let default = run_bin(&["mutate", "--templates", "examples/templates"], Some(&input));
    assert!(default.status.success(), "{}", default.describe());
    assert_eq!(default.stdout_str(), from_file.stdout_str());
}

#[test]
fn mutate_of_a_missing_explicit_template_is_a_denial_not_an_error() {
    let run = run_bin(&["mutate", "--templates", "examples/templates", "examples/reviews/missing-template.json"], None);
    assert!(run.status.success(), "a denial is an answer, exit 0: {}", run.describe());
    let answer: Value = serde_json::from_slice(&run.stdout).expect("stdout is JSON");
    let review = read_json("examples/reviews/missing-template.json");
    let response = &answer["response"];
    assert_eq!(response["uid"], review["request"]["uid"]);
    assert_eq!(response["allowed"], false, "{answer}");
    assert!(response.get("patch").is_none(), "a denial carries no patch: {answer}");
    let code = response["status"]["code"].as_u64().expect("status.code");
    assert!((400..600).contains(&code), "status.code {code}");
    let message = response["status"]["message"].as_str().expect("status.message");
    assert!(message.contains("does-not-exist"), "names the template: {message}");
    assert!(message.contains("flytesnacks-development"), "names the pod's namespace as searched: {message}");
    assert!(message.contains("\"flyte\""), "names the platform namespace as searched: {message}");
}

#[test]
fn mutate_of_unreadable_input_fails_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8]); 5] = [
        ("not json", b"not json"),
        ("empty", b""),
        ("no request", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#),
        ("a JSON array", b"[1, 2, 3]"),
        ("truncated", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"#),
    ];
    for (what, input) in cases {
        for via_stdin in [false, true] {
            let file = dir.path().join("review.json");
            std::fs::write(&file, input).unwrap();
            let run = if via_stdin {
                run_bin(&["mutate", "--templates", "examples/templates", "-"], Some(input))
            } else {
                run_bin(&["mutate", "--templates", "examples/templates", file.to_str().unwrap()], None)
            };
            let how = if via_stdin { "stdin" } else { "file" };
            assert!(!run.status.success(), "{what} ({how}): must fail: {}", run.describe());
            assert!(run.stdout.is_empty(), "{what} ({how}): nothing on stdout: {}", run.describe());
            assert!(!run.stderr.contains("panicked"), "{what} ({how}): no panic: {}", run.describe());
            assert!(
                run.stderr.contains("AdmissionReview") || run.stderr.contains("request"),
                "{what} ({how}): stderr explains the problem: {}",
                run.describe()
            );
        }
    }
    let run = run_bin(&["mutate", "--templates", "examples/templates", "does/not/exist.json"], None);
    assert!(!run.status.success());
    assert!(run.stderr.contains("does/not/exist.json"), "names the unreadable file: {}", run.describe());
    assert!(!run.stderr.contains("panicked"));
}

// ---------------------------------------------------------------------------------------------
// render

#[test]
fn render_merges_the_gpu_template_into_the_pod() {
    let run = run_bin(&["render", "--templates", "examples/templates", "examples/pods/gpu-pod.yaml"], None);
    assert!(run.status.success(), "{}", run.describe());
    let pod: Value = pod_template_webhook::yaml::from_str(&run.stdout_str()).expect("stdout is YAML");
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(pod["metadata"]["name"], "train");
    let containers = pod["spec"]["containers"].as_array().expect("containers");
    let names: Vec<&str> = containers.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["trainer", "log-shipper"], "the sidecar comes after the pod's container");
    let trainer = &containers[0];
    let tz: Vec<&Value> = trainer["env"].as_array().unwrap().iter().filter(|e| e["name"] == "TZ").collect();
    assert_eq!(tz, [&json!({"name": "TZ", "value": "Europe/Paris"})], "the pod's TZ wins, once: {trainer}");
    assert!(
        trainer["env"].as_array().unwrap().iter().any(|e| e["name"] == "NVIDIA_VISIBLE_DEVICES" && e["value"] == "all"),
        "the primary container gets the template's primary env: {trainer}"
    );
    assert_eq!(trainer["args"], json!(["--epochs", "10"]));
    assert_eq!(trainer["image"], "ghcr.io/example/trainer:1.4");
    assert_eq!(containers[1]["image"], "fluent/fluent-bit:3.1");
    let tolerations = pod["spec"]["tolerations"].as_array().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t["key"] == "nvidia.com/gpu" && t["operator"] == "Exists" && t["effect"] == "NoSchedule"),
        "{tolerations:?}"
    );
    assert_eq!(pod["spec"]["nodeSelector"]["nvidia.com/gpu.present"], "true");
    assert_eq!(pod["metadata"]["labels"]["accelerator"], "nvidia");
    assert_eq!(pod["metadata"]["labels"]["flyte.org/environment"], "gpu");
    let applied = pod["metadata"]["annotations"]["flyte.org/pod-template-applied"].as_str().unwrap_or_default();
    assert!(applied.starts_with("flyte/gpu-pod-templates/gpu@sha256:"), "{applied}");
    assert!(!run.stderr.contains("panicked"));
}

// ---------------------------------------------------------------------------------------------
// test (template test suites, SPEC §10)

/// A copy of `examples/` (the suites name `../templates`, `../layers`, `../pods`) in a tempdir.
fn examples_copy() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&crate_path("examples"), &dir.path().join("examples"));
    dir
}

const GPU_CASE: &str = "a GPU pod gets the gpu template";

#[test]
fn test_passes_the_bundled_suites() {
    let run = run_bin(&["test", "examples/tests/suite.yaml"], None);
    assert_eq!(run.status.code(), Some(0), "{}", run.describe());
    assert_eq!(
        run.stdout_str(),
        format!(
            "PASS {GPU_CASE}\nPASS an inline pod of the hello_world environment\n\
             PASS a pod without a template is left alone\nPASS a missing explicitly named template is denied\n\
             4 passed, 0 failed\n"
        )
    );
    // Several files: each case is named with its suite; the layers suite checks a conflict warning.
    let run = run_bin(&["test", "examples/tests/suite.yaml", "examples/tests/layers.yaml"], None);
    assert_eq!(run.status.code(), Some(0), "{}", run.describe());
    let out = run.stdout_str();
    assert!(out.contains(&format!("PASS examples/tests/suite.yaml: {GPU_CASE}\n")), "{out}");
    assert!(out.contains("PASS examples/tests/layers.yaml: gpu then a100 on top of both defaults"), "{out}");
    assert!(out.ends_with("\n7 passed, 0 failed\n"), "{out}");
}

/// The golden file is what `render` prints for the same pod: one code path.
#[test]
fn test_golden_file_is_what_render_prints() {
    let run = run_bin(&["render", "--templates", "examples/templates", "examples/pods/gpu-pod.yaml"], None);
    assert!(run.status.success(), "{}", run.describe());
    let golden = std::fs::read_to_string(crate_path("examples/tests/expected/gpu-pod.yaml")).unwrap();
    assert_eq!(run.stdout_str(), golden);
}

#[test]
fn test_fails_a_changed_expectation_with_a_unified_diff_and_the_reasons() {
    let dir = examples_copy();
    let tests = dir.path().join("examples/tests");
    let golden = tests.join("expected/gpu-pod.yaml");
    let text = std::fs::read_to_string(&golden).unwrap();
    std::fs::write(&golden, text.replace("      value: all\n", "      value: \"0\"\n")).unwrap();
    let suite = tests.join("suite.yaml");
    let text = std::fs::read_to_string(&suite).unwrap();
    std::fs::write(&suite, text.replace("denied: \"not found\"", "denied: \"forbidden\"")).unwrap();
    let run = run_bin(&["test", suite.to_str().unwrap()], None);
    assert_eq!(run.status.code(), Some(1), "{}", run.describe());
    let out = run.stdout_str();
    let diff = format!(
        "FAIL {GPU_CASE}\n    the pod differs from {0}:\n    --- {0}\n    +++ actual\n    @@ -16,7 +16,7 @@\n",
        golden.display()
    );
    assert!(out.contains(&diff), "{out}");
    let changed = "     - name: NVIDIA_VISIBLE_DEVICES\n    -      value: \"0\"\n    +      value: all\n";
    assert!(out.contains(changed), "{out}");
    assert!(out.contains("FAIL a missing explicitly named template is denied\n    denied with \""), "{out}");
    assert!(out.contains("which does not contain \"forbidden\""), "{out}");
    assert!(out.ends_with("\n2 passed, 2 failed\n"), "{out}");
}

#[test]
fn test_update_rewrites_the_golden_files_then_the_suite_passes() {
    let dir = examples_copy();
    let tests = dir.path().join("examples/tests");
    let (gpu, hello) = (tests.join("expected/gpu-pod.yaml"), tests.join("expected/hello.yaml"));
    let (gpu_text, hello_text) = (std::fs::read_to_string(&gpu).unwrap(), std::fs::read_to_string(&hello).unwrap());
    // No golden files yet: `--update` creates them and their directory.
    std::fs::remove_dir_all(tests.join("expected")).unwrap();
    let suite = tests.join("suite.yaml");
    let suite_text = std::fs::read_to_string(&suite).unwrap();
    let run = run_bin(&["test", suite.to_str().unwrap()], None);
    assert_eq!(run.status.code(), Some(1), "{}", run.describe());
    assert!(run.stdout_str().contains(&format!("    {} does not exist (--update writes it)\n", hello.display())));

    let run = run_bin(&["test", "--update", suite.to_str().unwrap()], None);
    assert_eq!(run.status.code(), Some(0), "{}", run.describe());
    let out = run.stdout_str();
    assert!(out.contains(&format!("PASS {GPU_CASE}\n    wrote {}\n", gpu.display())), "{out}");
    assert!(out.contains(&format!("    wrote {}\n", hello.display())), "{out}");
    assert_eq!(out.matches("wrote").count(), 2, "inline and denial expectations are not written: {out}");
    assert_eq!(std::fs::read_to_string(&gpu).unwrap(), gpu_text);
    assert_eq!(std::fs::read_to_string(&hello).unwrap(), hello_text);
    assert_eq!(std::fs::read_to_string(&suite).unwrap(), suite_text, "the suite itself is never rewritten");

    let run = run_bin(&["test", suite.to_str().unwrap()], None);
    assert_eq!(run.status.code(), Some(0), "{}", run.describe());
    assert!(!run.stdout_str().contains("wrote"), "{}", run.describe());

    // A stale golden file is rewritten; an up-to-date one is left alone.
    std::fs::write(&gpu, gpu_text.replace("value: all", "value: none")).unwrap();
    let run = run_bin(&["test", "--update", suite.to_str().unwrap()], None);
    assert_eq!(run.status.code(), Some(0), "{}", run.describe());
    assert_eq!(run.stdout_str().matches("wrote").count(), 1, "{}", run.describe());
    assert_eq!(std::fs::read_to_string(&gpu).unwrap(), gpu_text);
}

#[test]
fn test_of_an_invalid_suite_exits_2_naming_file_and_line() {
    let dir = examples_copy();
    let tests = dir.path().join("examples/tests");
    let suite = tests.join("suite.yaml");
    let text = std::fs::read_to_string(&suite).unwrap();
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let broken = [
        // A typo of `pod` under `expect`: an unknown field, never a silently empty expectation.
        (
            "unknown field",
            text.replace("    pod: expected/gpu-pod.yaml", "    pods: expected/gpu-pod.yaml"),
            line_of("pod: expected/gpu-pod.yaml"),
            "cases[0].expect.pods: unknown field `pods`",
        ),
        (
            "bad YAML",
            text.replace("  namespace: ml-team\n  pod:", "  namespace: ml-team\n   pod:"),
            line_of("  namespace: ml-team") + 1,
            "cases[1]: ",
        ),
        (
            "missing pod file",
            text.replace("../pods/gpu-pod.yaml", "../pods/nope.yaml"),
            line_of("../pods/gpu-pod.yaml"),
            "case \"a GPU pod gets the gpu template\": pod: cannot read",
        ),
        (
            "missing templates",
            text.replace("[../templates/]", "[../nope/]"),
            line_of("templates:"),
            "templates: cannot read",
        ),
    ];
    for (what, text, line, message) in broken {
        std::fs::write(&suite, text).unwrap();
        let run = run_bin(&["test", suite.to_str().unwrap()], None);
        assert_eq!(run.status.code(), Some(2), "{what}: {}", run.describe());
        let want = format!("error: {}:{line}: {message}", suite.display());
        assert!(run.stderr.starts_with(&want), "{what}: expected {want:?}\n{}", run.describe());
        assert_eq!(run.stdout_str(), "0 passed, 0 failed, 1 invalid suite(s)\n", "{what}");
    }
    // An invalid suite next to a valid one: the valid one still runs, the exit code is 2.
    let run = run_bin(&["test", suite.to_str().unwrap(), "examples/tests/layers.yaml"], None);
    assert_eq!(run.status.code(), Some(2), "{}", run.describe());
    assert!(run.stdout_str().ends_with("\n3 passed, 0 failed, 1 invalid suite(s)\n"), "{}", run.describe());
}

// ---------------------------------------------------------------------------------------------
// validate

#[test]
fn validate_accepts_the_examples() {
    let run = run_bin(&["validate", "examples/templates"], None);
    assert!(run.status.success(), "{}", run.describe());
    assert!(!run.stderr.contains("error:"), "{}", run.describe());
    // Files are accepted as well as directories.
    let run = run_bin(&["validate", "examples/templates/gpu.yaml", "examples/templates/hello-world.yaml"], None);
    assert!(run.status.success(), "{}", run.describe());
}

const BROKEN_HEADER: &str = "\
# a template ConfigMap with one good and one broken key
apiVersion: v1
kind: ConfigMap
metadata:
  name: team-templates
  namespace: ml-team
  labels:
    flyte.org/pod-templates: \"true\"
data:
  fine: |
    labels:
      a: b
";

#[test]
fn validate_names_file_line_configmap_and_key_of_a_broken_template() {
    let cases = [
        // An unknown field (a typo of podSpec): line 13 is the `broken: |` line.
        ("unknown field", "  broken: |\n    podspec:\n      containers: []\n", 13, "podspec"),
        // A YAML syntax error inside the template.
        ("syntax error", "  broken: |\n    labels: {a: b\n", 13, "at line"),
        // Valid YAML of the wrong shape.
        ("wrong type", "  broken: |\n    labels: [a, b]\n", 13, "labels"),
    ];
    for (what, tail, line, mention) in cases {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("team.yaml");
        std::fs::write(&file, format!("{BROKEN_HEADER}{tail}")).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap().lines().nth(line - 1).unwrap(), "  broken: |", "test setup");
        let run = run_bin(&["validate", dir.path().to_str().unwrap()], None);
        assert_eq!(run.status.code(), Some(1), "{what}: {}", run.describe());
        assert!(!run.stderr.contains("panicked"), "{what}: {}", run.describe());
        let expected = format!("error: {}:{line}: ConfigMap ml-team/team-templates key \"broken\": ", file.display());
        let error_line = run
            .stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("{what}: an error line: {}", run.describe()));
        assert!(
            error_line.starts_with(&expected),
            "{what}: expected a line starting with {expected:?}\n{}",
            run.describe()
        );
        assert!(error_line.contains(mention), "{what}: the error explains itself: {error_line}");
        assert_eq!(
            run.stderr.lines().filter(|l| l.starts_with("error: ")).count(),
            1,
            "{what}: only the broken key: {}",
            run.describe()
        );

        // The same file named directly.
        let direct = run_bin(&["validate", file.to_str().unwrap()], None);
        assert_eq!(direct.status.code(), Some(1), "{what}: {}", direct.describe());
        assert!(direct.stderr.contains(&expected), "{what}: {}", direct.describe());

        // A broken key alongside the valid examples still fails the whole run.
        let mixed = run_bin(&["validate", "examples/templates", file.to_str().unwrap()], None);
        assert_eq!(mixed.status.code(), Some(1), "{what}: {}", mixed.describe());
    }
}

// ---------------------------------------------------------------------------------------------
// serve answers exactly what mutate prints

/// Accepts any server certificate: `serve` without --tls-cert generates a self-signed one.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Status and body of one HTTP/1.1 exchange (`Connection: close`) over `stream`.
fn http_exchange(
    mut stream: impl Read + Write,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A TLS peer closing without close_notify: what arrived is the answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        if let Some(done) = complete_response(&buf) {
            return Ok(done);
        }
    }
    complete_response(&buf)
        .ok_or_else(|| std::io::Error::other(format!("incomplete response: {}", String::from_utf8_lossy(&buf))))
}

/// Parses a full HTTP/1.1 response (Content-Length or chunked) once all of it is in `buf`.
fn complete_response(buf: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let body = &buf[end + 4..];
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    if let Some(len) = header("content-length") {
        let len: usize = len.parse().ok()?;
        return (body.len() >= len).then(|| (status, body[..len].to_vec()));
    }
    if header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        let (mut out, mut rest) = (Vec::new(), body);
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).ok()?.split(';').next()?.trim(), 16)
                    .ok()?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                return Some((status, out));
            }
            if rest.len() < size + 2 {
                return None;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    }
    None
}

fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    http_exchange(stream, "GET", path, b"")
}

fn webhook_post(addr: SocketAddr, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    http_exchange(rustls::StreamOwned::new(conn, tcp), "POST", path, body)
}

/// Kills the child on drop unless it was reaped (a failing assertion must not leak a server).
struct ServerProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl ServerProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn serve_answers_byte_for_byte_what_mutate_prints_and_shuts_down_gracefully() {
    let printed = run_bin(&["mutate", "--templates", "examples/templates", FLYTE_REVIEW], None);
    assert!(printed.status.success(), "{}", printed.describe());
    let expected = printed.stdout.strip_suffix(b"\n").expect("mutate ends its output with a newline").to_vec();

    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("serve.log");
    let (mut server, listen, admin) = {
        // A port picked here could be taken before the server binds it; retry a few times.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let child = Command::new(BIN)
                .args(["serve", "--templates", "examples/templates"])
                .args(["--listen", &listen.to_string(), "--admin-listen", &admin.to_string()])
                .current_dir(CRATE_DIR)
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(logs.path().join("serve.out")).unwrap())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("serve starts");
            let mut server = ServerProcess { child: Some(child), log: log.clone() };
            // Wait (bounded) for readiness on the admin port.
            let until = Instant::now() + Duration::from_secs(20);
            let ready = loop {
                if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                    break Err(format!("serve exited early with {status:?}:\n{}", server.log()));
                }
                if let Ok((200, _)) = admin_get(admin, "/readyz") {
                    break Ok(());
                }
                if Instant::now() > until {
                    break Err(format!("/readyz did not answer 200 within 20 s:\n{}", server.log()));
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            match ready {
                Ok(()) => break (server, listen, admin),
                Err(e) if attempt < 3 && e.contains("cannot listen") => continue,
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert!(
        server.log().to_lowercase().contains("self-signed"),
        "serve says it uses a generated certificate:\n{}",
        server.log()
    );
    let (status, body) = admin_get(admin, "/healthz").unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let review = std::fs::read(crate_path(FLYTE_REVIEW)).unwrap();
    let (status, body) =
        webhook_post(listen, "/mutate", &review).unwrap_or_else(|e| panic!("POST /mutate: {e}\n{}", server.log()));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&expected),
        "serve's answer differs from what `mutate` printed"
    );
    assert_eq!(body, expected);

    // A malformed body over the real listener: 400 and a clear message.
    let (status, body) = webhook_post(listen, "/mutate", b"not json").unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("AdmissionReview"), "{}", String::from_utf8_lossy(&body));

    let (status, metrics) = admin_get(admin, "/metrics").unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.lines().any(|l| l == r#"pod_template_webhook_admissions_total{result="mutated"} 1"#),
        "one mutation counted:\n{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == r#"pod_template_webhook_admissions_total{result="error"} 1"#),
        "one bad request counted:\n{metrics}"
    );

    // SIGTERM: graceful shutdown, exit 0 within 10 s.
    let pid = server.child.as_ref().unwrap().id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
    assert!(killed.success());
    let status = wait_bounded(server.child.as_mut().unwrap(), Duration::from_secs(10))
        .unwrap_or_else(|| panic!("serve did not exit within 10 s of SIGTERM:\n{}", server.log()));
    server.child = None;
    assert!(status.success(), "serve exits 0 after SIGTERM, got {status:?}:\n{}", server.log());
    assert!(!server.log().contains("panicked"), "{}", server.log());
    assert!(TcpStream::connect_timeout(&listen, Duration::from_secs(1)).is_err(), "the webhook port is closed");
}

/// The reported line must be the one of *this* ConfigMap's key, not the first line anywhere in
/// the file that looks like `  <key>:` (another document of a multi-document file, or a nested
/// field of an earlier template).
#[test]
fn validate_reports_the_line_of_the_right_configmap_in_a_multi_document_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("multi.yaml");
    let text = "\
apiVersion: v1
kind: ConfigMap
metadata:
  name: team-a
  namespace: team-a
  labels:
    flyte.org/pod-templates: \"true\"
data:
  gpu: |
    labels:
      broken: \"no, this is a label\"
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: team-b
  namespace: team-b
  labels:
    flyte.org/pod-templates: \"true\"
data:
  gpu: |
    podspec: {}
  broken: |
    podspec: {}
";
    std::fs::write(&file, text).unwrap();
    let line_of =
        |needle: &str, nth: usize| text.lines().enumerate().filter(|(_, l)| *l == needle).nth(nth).unwrap().0 + 1;
    let run = run_bin(&["validate", file.to_str().unwrap()], None);
    assert_eq!(run.status.code(), Some(1), "{}", run.describe());
    let gpu = format!("error: {}:{}: ConfigMap team-b/team-b key \"gpu\": ", file.display(), line_of("  gpu: |", 1));
    let broken =
        format!("error: {}:{}: ConfigMap team-b/team-b key \"broken\": ", file.display(), line_of("  broken: |", 0));
    assert!(run.stderr.lines().any(|l| l.starts_with(&gpu)), "expected {gpu:?}\n{}", run.describe());
    assert!(run.stderr.lines().any(|l| l.starts_with(&broken)), "expected {broken:?}\n{}", run.describe());
}

/// The load test's baseline handler is not in the default build (cargo feature `noop-handler`).
#[cfg(not(feature = "noop-handler"))]
#[test]
fn the_default_build_has_no_noop_handler() {
    let run = run_bin(&["serve", "--noop-handler", "--templates", "examples/templates"], None);
    assert!(!run.status.success(), "{}", run.describe());
    assert!(run.stderr.contains("unexpected argument '--noop-handler'"), "{}", run.describe());
}

// shadow templates (SPEC §10)

const SHADOW_TEMPLATES: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: base, labels: {flyte.org/pod-templates: "true"}}
data:
  gpu: "labels: {team: ml}"
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: gpu-next
  namespace: ml
  labels: {flyte.org/pod-templates: "true"}
  annotations: {flyte.org/pod-template-mode: shadow}
data:
  gpu: |
    labels: {team: ml}
    podSpec: {nodeSelector: {gpu: a100}}
"#;

const SHADOW_POD: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: ml, labels: {flyte.org/environment: gpu}}
spec: {containers: [{name: primary, image: busybox}]}
";

#[test]
fn render_explain_shows_what_a_shadow_template_would_change_without_applying_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("templates.yaml"), SHADOW_TEMPLATES).unwrap();
    let pod = dir.path().join("pod.yaml");
    std::fs::write(&pod, SHADOW_POD).unwrap();
    let templates = dir.path().to_str().unwrap();
    let run = run_bin(&["render", "--explain", "--templates", templates, pod.to_str().unwrap()], None);
    assert!(run.status.success(), "{}", run.stderr);
    let stdout = String::from_utf8(run.stdout).unwrap();
    assert!(!stdout.contains("nodeSelector:"), "never applied: {stdout}");
    assert!(stdout.contains("flyte.org/pod-template-applied: flyte/base/gpu@sha256:"), "{stdout}");
    assert!(
        stdout.contains("# shadow ml/gpu-next/gpu (not applied) would change 1 fields\n#   /spec/nodeSelector\n"),
        "{stdout}"
    );
    assert!(
        run.stderr.contains("warning: shadow: ml/gpu-next/gpu would change 1 fields: /spec/nodeSelector"),
        "{}",
        run.stderr
    );

    // Enforced: the same files without the annotation apply it.
    std::fs::write(dir.path().join("templates.yaml"), SHADOW_TEMPLATES.replace("shadow}", "enforce}")).unwrap();
    let run = run_bin(&["render", "--templates", templates, pod.to_str().unwrap()], None);
    let stdout = String::from_utf8(run.stdout).unwrap();
    assert!(stdout.contains("gpu: a100") && stdout.contains("ml/gpu-next/gpu@sha256:"), "{stdout}");
    assert!(!run.stderr.contains("shadow"), "{}", run.stderr);
}

#[test]
fn validate_names_an_unknown_mode() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("templates.yaml");
    std::fs::write(&file, SHADOW_TEMPLATES.replace("shadow}", "shadw}")).unwrap();
    let run = run_bin(&["validate", file.to_str().unwrap()], None);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    let expected = format!(
        "error: {}:10: ConfigMap ml/gpu-next: metadata.annotations[flyte.org/pod-template-mode]: \"shadw\" is not a mode (shadow or enforce)",
        file.display()
    );
    assert!(run.stderr.contains(&expected), "{}", run.stderr);
}
