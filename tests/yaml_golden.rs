//! What the YAML in a template means (src/yaml.rs): the scalars where YAML 1.1 (kubectl) and 1.2
//! disagree, and the error texts with their line numbers, pinned by readable golden files in
//! tests/golden/. `PTW_BLESS=1 cargo test --release --test yaml_golden` rewrites them after an
//! intended change; the diff is then the review.

use pod_template_webhook::template::PodTemplate;
use pod_template_webhook::yaml;
use serde_json::Value;

/// Scalars a template may contain, written plain (unquoted) unless quoted here.
const SCALARS: &[&str] = &[
    "yes",
    "no",
    "on",
    "off",
    "y",
    "true",
    "True",
    "FALSE",
    "~",
    "null",
    "",
    "0755",
    "0o755",
    "0x1F",
    "0b101",
    "1e3",
    "1.0",
    "-0",
    "+1",
    "1_000",
    "123",
    "\"123\"",
    "'yes'",
    "12:30",
    "2001-12-14",
    "1.5e-3",
    ".inf",
    "-.inf",
    ".nan",
];

fn golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var("PTW_BLESS").as_deref() == Ok("1") {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} differs (PTW_BLESS=1 rewrites it):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

fn outcome<T: serde::Serialize, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(v) => serde_json::to_string(&v).unwrap(),
        Err(e) => format!("error: {e}"),
    }
}

#[test]
fn scalars_mean_what_the_golden_table_says() {
    let mut table = String::from(
        "# plain scalar | as a value (a label/annotation is read as text) | as an env value in a podSpec | as a volume's defaultMode\n",
    );
    for s in SCALARS {
        let value = outcome(yaml::from_str::<Value>(&format!("v: {s}\n")).map(|v| v["v"].clone()));
        let template = |field: &str| PodTemplate::parse(&format!("podSpec:\n  {field}\n")).map(|t| t.pod_spec());
        let env = outcome(
            template(&format!("containers: [{{name: primary, env: [{{name: A, value: {s}}}]}}]"))
                .map(|spec| spec["containers"][0]["env"][0]["value"].clone()),
        );
        let mode = outcome(
            template(&format!("volumes: [{{name: v, configMap: {{name: c, defaultMode: {s}}}}}]"))
                .map(|spec| spec["volumes"][0]["configMap"]["defaultMode"].clone()),
        );
        let label = outcome(PodTemplate::parse(&format!("labels: {{a: {s}}}")).map(|t| t.labels["a"].clone()));
        table.push_str(&format!("{s:12} | {value:8} | label {label:12} | env {env:12} | mode {mode}\n"));
    }
    golden("yaml_scalars.txt", &table);
}

#[test]
fn errors_name_their_line_and_column() {
    let cases = [
        ("unclosed flow sequence", "labels:\n  a: [b\n"),
        ("bad indentation", "labels:\n  a: b\n c: d\n"),
        ("duplicate key", "labels:\n  a: b\n  a: c\n"),
        ("tab indentation", "labels:\n\ta: b\n"),
        ("unknown top-level field", "labels: {a: b}\nlables: {c: d}\n"),
        ("podSpec not a mapping", "podSpec: [a]\n"),
        ("unknown podSpec field", "podSpec:\n  containers:\n  - name: primary\n    imagee: x\n"),
        ("wrong podSpec type", "podSpec:\n  hostNetwork: yes\n"),
        ("non-finite number", "podSpec:\n  terminationGracePeriodSeconds: .inf\n"),
        ("unclosed quote", "labels: {a: \"b}\n"),
    ];
    let mut out = String::new();
    for (what, text) in cases {
        let err = PodTemplate::parse(text).map(|_| "parsed").unwrap_err().to_string();
        out.push_str(&format!(
            "## {what}\n{}=> {err}\n\n",
            text.lines().map(|l| format!("    {l}\n")).collect::<String>()
        ));
    }
    golden("yaml_errors.txt", &out);
}

#[test]
fn render_output_reads_back_the_same_under_yaml_1_1_rules() {
    // Strings a YAML 1.1 reader (kubectl) would take for booleans or numbers are quoted.
    let pod = serde_json::json!({"metadata": {"labels": {"a": "yes", "b": "0755", "c": "on", "d": "1e3", "e": "~", "n": "y"}}});
    let text = yaml::to_string(&pod).unwrap();
    for quoted in ["\"yes\"", "\"0755\"", "\"on\"", "\"1e3\"", "\"~\"", "\"y\""] {
        assert!(text.contains(quoted), "{quoted} is quoted in:\n{text}");
    }
    assert_eq!(yaml::from_str::<Value>(&text).unwrap(), pod);
}
