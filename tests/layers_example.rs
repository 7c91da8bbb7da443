//! The README's "Layers" worked example, executed: the files it shows are the files in
//! `examples/layers/`, and the output it shows is what `render --explain` prints for them.

use std::path::Path;
use std::process::Command;

const README: &str = include_str!("../README.md");

/// The body of the first fenced block after `marker` in the README.
fn block_after(marker: &str) -> &'static str {
    let at = README.find(marker).unwrap_or_else(|| panic!("README has no {marker:?}"));
    let rest = &README[at..];
    let open = rest.find("```").expect("a fenced block follows");
    let body = &rest[open..];
    let body = &body[body.find('\n').unwrap() + 1..];
    &body[..body.find("```").expect("the block is closed")]
}

/// Runs the README's `pod-template-webhook render …` command that starts the block at `marker`
/// with the built binary: (the command, stdout, stderr); it must succeed.
fn run_readme_command(marker: &str) -> (&'static str, String, String) {
    let command = block_after(marker).trim();
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    assert_eq!(args.first(), Some(&"render"), "{command}");
    let out = Command::new(env!("CARGO_BIN_EXE_pod-template-webhook"))
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap());
    assert!(out.status.success(), "{command}: {stderr}");
    (command, stdout, stderr)
}

fn example(file: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/layers").join(file)).unwrap()
}

#[test]
fn the_readme_shows_the_example_files() {
    assert_eq!(block_after("Templates (`examples/layers/templates.yaml`)"), example("templates.yaml"));
    assert_eq!(block_after("A pod of the `ml-team` namespace"), example("pod.yaml"));
}

#[test]
fn render_explain_prints_what_the_readme_shows() {
    let (command, stdout, stderr) =
        run_readme_command("```sh\npod-template-webhook render --templates examples/layers");
    assert_eq!(stdout, block_after("prints the pod as the API server would store it"), "stdout of `{command}`");
    assert_eq!(stderr, block_after("and on stderr the conflict"), "stderr of `{command}`");

    // And the output says what the example claims.
    let pod: serde_json::Value = pod_template_webhook::yaml::from_str(&stdout).unwrap();
    let env: Vec<&str> =
        pod["spec"]["containers"][0]["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(env, ["TZ", "NVIDIA_DRIVER_CAPABILITIES", "NCCL_P2P_LEVEL", "EPOCHS"]);
    assert_eq!(pod["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"], "nvidia-tesla-a100");
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    let applied = pod["metadata"]["annotations"]["flyte.org/pod-template-applied"].as_str().unwrap();
    let layers: Vec<&str> = applied.split(',').map(|l| l.split('@').next().unwrap()).collect();
    assert_eq!(
        layers,
        [
            "flyte/platform-defaults/defaults",
            "ml-team/ml-team-defaults/defaults",
            "flyte/platform-accelerators/gpu",
            "flyte/platform-accelerators/a100"
        ]
    );
}

/// The README's "With Flyte 2" example: `render --explain` on the pod Flyte creates prints the
/// explanation the README shows, and the template reached the pod through its task-name.
#[test]
fn the_flyte_example_renders_as_the_readme_shows() {
    let (command, stdout, _) = run_readme_command("```sh\npod-template-webhook render --templates examples/flyte");
    let explanation = &stdout[stdout.find("# --explain").expect("an explanation")..];
    assert_eq!(explanation, block_after("ends with (the whole pod before it)"), "stdout of `{command}`");

    let pod: serde_json::Value =
        pod_template_webhook::yaml::from_str(&stdout[..stdout.len() - explanation.len()]).unwrap();
    let env: Vec<(&str, &str)> = pod["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
        .collect();
    assert_eq!(env, [("TZ", "UTC"), ("NCCL_DEBUG", "WARN"), ("HF_HOME", "/hf")], "the task's HF_HOME wins");
    let applied = pod["metadata"]["annotations"]["flyte.org/pod-template-applied"].as_str().unwrap();
    assert!(applied.ends_with("; environment from task-name ml-gpu.train"), "{applied}");
}
