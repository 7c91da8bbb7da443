//! `test FILE…` (SPEC §10): template test suites a platform team keeps next to its templates and
//! runs in CI. Each case goes through [`preview::preview`], the code path of `mutate` and `render`,
//! so a suite can never pass on a merge the webhook would not make.
//!
//! The suite format is strict (unknown fields are errors, named with file and line): a typo in a
//! suite must not turn a check into no check.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::admission::Policy;
use crate::manifest::{self, ManifestError};
use crate::preview::{self, PreviewError};
use crate::store::dir::DirStore;
use crate::yaml::{self, Spanned, YamlError};

/// A suite that cannot be run as written (exit 2 of `test`): the file and, when known, the line.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("cannot read {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{}{}: {error}", path.display(), error.line.map(|l| format!(":{l}")).unwrap_or_default())]
    Yaml { path: PathBuf, error: YamlError },
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid { path: PathBuf, line: Option<u64>, message: String },
    #[error("{}:{line}: templates: {error}", path.display())]
    Templates { path: PathBuf, line: u64, error: ManifestError },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSuite {
    templates: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    default_template: Option<String>,
    #[serde(default)]
    platform_namespace: Option<String>,
    cases: Spanned<Vec<Spanned<RawCase>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    pod: Spanned<Value>,
    expect: Spanned<RawExpect>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    #[serde(default)]
    pod: Option<Spanned<Value>>,
    #[serde(default)]
    denied: Option<String>,
    #[serde(default)]
    warnings: Vec<String>,
}

/// A parsed suite: every file it names has been read, so running it only judges.
#[derive(Debug)]
pub struct Suite {
    pub path: PathBuf,
    /// Template paths, resolved against the suite's directory, with the line naming each.
    pub templates: Vec<(PathBuf, u64)>,
    pub default_template: Option<String>,
    pub platform_namespace: Option<String>,
    pub cases: Vec<Case>,
}

#[derive(Debug)]
pub struct Case {
    pub name: String,
    /// 1-based line of the case in the suite file.
    pub line: u64,
    pub namespace: String,
    /// The pod manifest, read from its file or given inline.
    pub pod: Value,
    pub expect: Expect,
}

#[derive(Debug)]
pub struct Expect {
    pub pod: Option<ExpectedPod>,
    pub denied: Option<String>,
    pub warnings: Vec<String>,
}

/// The expected pod: a golden file (which `--update` rewrites) or a mapping in the suite.
#[derive(Debug)]
pub enum ExpectedPod {
    /// The file, resolved against the suite's directory; `None` as content when it does not exist
    /// yet (the case fails, `--update` creates it).
    File {
        path: PathBuf,
        pod: Option<Value>,
    },
    Inline(Value),
}

/// What one case came to.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    /// Why it failed, each reason with its diff; empty when it passed.
    pub failures: Vec<String>,
    /// The golden file `--update` wrote for it.
    pub written: Option<PathBuf>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

fn relative(dir: &Path, path: &str) -> PathBuf {
    dir.join(path)
}

/// Reads a YAML or JSON document from `path`.
fn read_yaml(path: &Path) -> Result<Value, SuiteError> {
    let text = std::fs::read_to_string(path).map_err(|error| SuiteError::Io { path: path.to_owned(), error })?;
    yaml::from_str(&text).map_err(|error| SuiteError::Yaml { path: path.to_owned(), error })
}

/// The path of a message as the suite's author wrote it: `cases.value[0].value.expect.value.x`
/// (each [`Spanned`] adds a `value` segment) becomes `cases[0].expect.x`. No field of the suite
/// format is called `value`; inside a pod (after `pod`) every segment is the author's.
fn without_spans(message: &str) -> String {
    let Some((path, rest)) = message.split_once(": ") else { return message.to_owned() };
    if path.contains(' ') {
        return message.to_owned();
    }
    let mut kept: Vec<String> = Vec::new();
    let mut in_pod = false;
    for segment in path.split('.') {
        let span = segment.strip_prefix("value").filter(|i| i.is_empty() || i.starts_with('['));
        match (span, kept.last_mut()) {
            (Some(index), Some(last)) if !in_pod => {
                // The span of `pod` (in a case or in `expect`): the pod's own fields follow.
                in_pod = last == "pod";
                last.push_str(index);
            }
            _ => kept.push(segment.to_owned()),
        }
    }
    format!("{}: {rest}", kept.join("."))
}

/// Reads and checks the suite at `path`, with the pods and expected pods it names (templates are
/// read by [`Suite::run`], with the policy's platform namespace).
pub fn load(path: &Path) -> Result<Suite, SuiteError> {
    let text = std::fs::read_to_string(path).map_err(|error| SuiteError::Io { path: path.to_owned(), error })?;
    let raw: RawSuite = yaml::from_str(&text).map_err(|mut error| {
        error.message = without_spans(&error.message);
        SuiteError::Yaml { path: path.to_owned(), error }
    })?;
    let dir = path.parent().unwrap_or(Path::new(""));
    let invalid = |line: u64, message: String| SuiteError::Invalid { path: path.to_owned(), line: Some(line), message };
    if raw.templates.value.is_empty() {
        return Err(invalid(raw.templates.referenced.line(), "templates: name at least one path".into()));
    }
    if raw.cases.value.is_empty() {
        return Err(invalid(raw.cases.referenced.line(), "cases: the suite has no case".into()));
    }
    let templates = raw.templates.value.iter().map(|t| (relative(dir, &t.value), t.referenced.line())).collect();
    let mut names = BTreeSet::new();
    let mut cases = Vec::new();
    for spanned in raw.cases.value {
        let (raw, line) = (spanned.value, spanned.referenced.line());
        let what = format!("case {:?}", raw.name);
        if raw.name.trim().is_empty() {
            return Err(invalid(line, "case without a name".into()));
        }
        if !names.insert(raw.name.clone()) {
            return Err(invalid(line, format!("{what}: a second case of that name")));
        }
        let pod_line = raw.pod.referenced.line();
        let pod = match raw.pod.value {
            Value::String(file) => {
                read_yaml(&relative(dir, &file)).map_err(|e| invalid(pod_line, format!("{what}: pod: {e}")))?
            }
            pod @ Value::Object(_) => pod,
            _ => return Err(invalid(pod_line, format!("{what}: pod: a file name or a Pod manifest"))),
        };
        if pod.get("kind").and_then(Value::as_str) != Some("Pod") {
            return Err(invalid(pod_line, format!("{what}: pod: not a manifest of kind Pod")));
        }
        let expect_line = raw.expect.referenced.line();
        let expect = raw.expect.value;
        if expect.pod.is_some() && expect.denied.is_some() {
            return Err(invalid(expect_line, format!("{what}: expect: pod and denied exclude each other")));
        }
        let expected_pod = match expect.pod {
            None => None,
            Some(Spanned { value: Value::String(file), referenced, .. }) => {
                let file = relative(dir, &file);
                // A golden file not written yet is a failing case, not a broken suite: `--update`
                // creates it.
                let pod = match read_yaml(&file) {
                    Ok(pod) => Some(pod),
                    Err(SuiteError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(invalid(referenced.line(), format!("{what}: expect.pod: {e}"))),
                };
                Some(ExpectedPod::File { path: file, pod })
            }
            Some(Spanned { value: pod @ Value::Object(_), .. }) => Some(ExpectedPod::Inline(pod)),
            Some(Spanned { referenced, .. }) => {
                return Err(invalid(referenced.line(), format!("{what}: expect.pod: a file name or a Pod manifest")))
            }
        };
        cases.push(Case {
            name: raw.name,
            line,
            namespace: raw.namespace.unwrap_or_else(|| "default".to_owned()),
            pod,
            expect: Expect { pod: expected_pod, denied: expect.denied, warnings: expect.warnings },
        });
    }
    Ok(Suite {
        path: path.to_owned(),
        templates,
        default_template: raw.default_template.filter(|t| !t.is_empty()),
        platform_namespace: raw.platform_namespace.filter(|ns| !ns.is_empty()),
        cases,
    })
}

impl Suite {
    /// `base` (the command line's) with the suite's `defaultTemplate` and `platformNamespace`.
    pub fn policy(&self, base: &Policy) -> Policy {
        let mut policy = base.clone();
        if let Some(t) = &self.default_template {
            policy.default_template = Some(t.clone());
        }
        if let Some(ns) = &self.platform_namespace {
            policy.names.platform_namespace = ns.clone();
        }
        policy
    }

    /// The templates of every path, in one store (as `--templates` would load one path).
    pub fn store(&self, policy: &Policy) -> Result<DirStore, SuiteError> {
        let mut sources = Vec::new();
        for (path, line) in &self.templates {
            let read = manifest::read_template_sources(path, &policy.names);
            sources.extend(read.map_err(|error| SuiteError::Templates {
                path: self.path.clone(),
                line: *line,
                error,
            })?);
        }
        Ok(DirStore::from_sources(&sources, &policy.names))
    }

    /// Runs every case; with `update`, first writes each golden file (`expect.pod` naming a file)
    /// from an allowed pod's result.
    pub fn run(&self, base: &Policy, update: bool) -> Result<Vec<CaseResult>, SuiteError> {
        let policy = self.policy(base);
        let store = self.store(&policy)?;
        let mut results = Vec::new();
        for case in &self.cases {
            let preview = preview::preview(&case.pod, &case.namespace, &store, &policy).map_err(|e| match e {
                // A pod the webhook cannot read at all is the suite's mistake, not the templates'.
                PreviewError::NotAPod | PreviewError::Review(_) | PreviewError::BadList(_) => SuiteError::Invalid {
                    path: self.path.clone(),
                    line: Some(case.line),
                    message: format!("case {:?}: {e}", case.name),
                },
                PreviewError::Patch(_) => SuiteError::Invalid {
                    path: self.path.clone(),
                    line: Some(case.line),
                    message: format!("case {:?}: {e} (a bug of the webhook)", case.name),
                },
            })?;
            results.push(judge(case, &preview, update)?);
        }
        Ok(results)
    }
}

/// The pod as `render` prints it.
fn rendered(pod: &Value) -> String {
    yaml::to_string(pod).expect("a JSON value serializes as YAML")
}

fn judge(case: &Case, preview: &preview::Preview, update: bool) -> Result<CaseResult, SuiteError> {
    let mut failures = Vec::new();
    let mut written = None;
    let message = &preview.decision.response.result.message;
    let denied = preview.denied();
    match (&case.expect.denied, denied) {
        (Some(want), true) if !message.contains(want.as_str()) => {
            failures.push(format!("denied with {message:?}, which does not contain {want:?}"))
        }
        (Some(want), false) => failures.push(format!("allowed, expected a denial containing {want:?}")),
        (None, true) => failures.push(format!("denied: {message}")),
        _ => {}
    }
    for want in &case.expect.warnings {
        if !preview.warnings().iter().any(|w| w.contains(want.as_str())) {
            let got = if preview.warnings().is_empty() {
                "no warnings".to_owned()
            } else {
                format!("warnings: {}", preview.warnings().join("; "))
            };
            failures.push(format!("no warning contains {want:?} ({got})"));
        }
    }
    let actual = rendered(&preview.pod);
    match &case.expect.pod {
        _ if denied => {}
        None => {}
        // An up-to-date file (by value: its comments stay) is left alone, and compared below.
        Some(ExpectedPod::File { path, pod }) if update && pod.as_ref().map(rendered).as_deref() != Some(&actual) => {
            write_golden(path, &actual)?;
            written = Some(path.clone());
        }
        Some(ExpectedPod::File { path, pod: None }) => {
            failures.push(format!("{} does not exist (--update writes it)", path.display()))
        }
        Some(ExpectedPod::File { path, pod: Some(expected) }) => {
            compare(&mut failures, &path.display().to_string(), expected, &preview.pod, &actual)
        }
        Some(ExpectedPod::Inline(expected)) => compare(&mut failures, "expect.pod", expected, &preview.pod, &actual),
    }
    Ok(CaseResult { name: case.name.clone(), failures, written })
}

/// Pods are compared as values (comments, key order and quoting of the expected file do not
/// matter); a difference is shown as a diff of both rendered the same way.
fn compare(failures: &mut Vec<String>, label: &str, expected: &Value, actual: &Value, actual_text: &str) {
    if expected != actual {
        let diff = unified_diff(&rendered(expected), actual_text, label, "actual", 3);
        failures.push(format!("the pod differs from {label}:\n{diff}"));
    }
}

fn write_golden(path: &Path, text: &str) -> Result<(), SuiteError> {
    let io = |error| SuiteError::Io { path: path.to_owned(), error };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    std::fs::write(path, text).map_err(io)
}

/// A unified diff (`diff -u` style, `context` lines around each change) from `old` to `new`, by
/// a longest common subsequence of lines; empty when they are equal. Pods are small: the
/// quadratic table is a few hundred lines squared at most.
pub fn unified_diff(old: &str, new: &str, old_label: &str, new_label: &str, context: usize) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // lcs[i][j]: length of the LCS of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    // The edit script: (tag, old index, new index) per line.
    let mut ops = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', i, j));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            // Deletions first, as `diff -u` shows a changed line.
            ops.push(('-', i, j));
            i += 1;
        } else {
            ops.push(('+', i, j));
            j += 1;
        }
    }
    let changed: Vec<usize> = (0..ops.len()).filter(|&k| ops[k].0 != ' ').collect();
    if changed.is_empty() {
        return String::new();
    }
    // Hunks: changes closer than twice the context share one.
    let mut hunks: Vec<(usize, usize)> = Vec::new();
    for &k in &changed {
        let (start, end) = (k.saturating_sub(context), (k + context + 1).min(ops.len()));
        match hunks.last_mut() {
            Some(last) if start <= last.1 => last.1 = end,
            _ => hunks.push((start, end)),
        }
    }
    let mut out = format!("--- {old_label}\n+++ {new_label}\n");
    for (start, end) in hunks {
        let ops = &ops[start..end];
        let old_len = ops.iter().filter(|o| o.0 != '+').count();
        let new_len = ops.iter().filter(|o| o.0 != '-').count();
        // `diff -u` numbers an empty side by the line before it.
        let old_start = if old_len == 0 { ops[0].1 } else { ops[0].1 + 1 };
        let new_start = if new_len == 0 { ops[0].2 } else { ops[0].2 + 1 };
        out.push_str(&format!("@@ -{} +{} @@\n", range(old_start, old_len), range(new_start, new_len)));
        for &(tag, i, j) in ops {
            let line = if tag == '+' { b[j] } else { a[i] };
            out.push_str(&format!("{tag}{line}\n"));
        }
    }
    out
}

/// A hunk's side as `diff -u` writes it: the length is left out when it is 1.
fn range(start: usize, len: usize) -> String {
    if len == 1 {
        start.to_string()
    } else {
        format!("{start},{len}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, image: i}]\n";

    #[test]
    fn a_suite_reads_paths_relative_to_its_file_inline_pods_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "pods/p.yaml", POD);
        let suite = write(
            dir.path(),
            "s/suite.yaml",
            "templates: [../templates/]\ndefaultTemplate: base\ncases:\n- name: from a file\n  pod: ../pods/p.yaml\n  expect:\n    pod: out/p.yaml\n- name: inline\n  namespace: ml\n  pod:\n    apiVersion: v1\n    kind: Pod\n    metadata: {name: q}\n  expect:\n    denied: not found\n    warnings: [a, b]\n",
        );
        let suite = load(&suite).unwrap();
        assert_eq!(suite.templates, vec![(dir.path().join("s/../templates/"), 1)]);
        assert_eq!(suite.default_template.as_deref(), Some("base"));
        assert_eq!(suite.platform_namespace, None);
        let [file, inline] = &suite.cases[..] else { panic!("two cases") };
        assert_eq!((file.name.as_str(), file.line, file.namespace.as_str()), ("from a file", 4, "default"));
        assert_eq!(file.pod["metadata"]["name"], "p");
        assert!(
            matches!(&file.expect.pod, Some(ExpectedPod::File { path, pod: None }) if *path == dir.path().join("s/out/p.yaml"))
        );
        assert_eq!((inline.line, inline.namespace.as_str()), (8, "ml"));
        assert_eq!(inline.pod["metadata"]["name"], "q");
        assert_eq!(inline.expect.denied.as_deref(), Some("not found"));
        assert_eq!(inline.expect.warnings, ["a", "b"]);
    }

    fn load_error(text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "p.yaml", POD);
        load(&write(dir.path(), "suite.yaml", text))
            .unwrap_err()
            .to_string()
            .replace(&dir.path().display().to_string(), "DIR")
    }

    #[test]
    fn an_invalid_suite_is_named_with_file_and_line() {
        let head = "templates: [t/]\ncases:\n- name: a\n  pod: p.yaml\n";
        let unknown = load_error(&format!("{head}  expect: {{pods: x.yaml}}\n"));
        assert!(unknown.starts_with("DIR/suite.yaml:5: cases[0].expect.pods: unknown field `pods`"), "{unknown}");
        let top = load_error(&format!("templatess: [t/]\n{head}"));
        assert!(top.starts_with("DIR/suite.yaml:1: unknown field `templatess`"), "{top}");
        let bad = load_error(&format!("{head}   expect: {{}}\n"));
        assert!(bad.starts_with("DIR/suite.yaml:5: cases[0]: "), "{bad}");
        let missing = load_error("templates: [t/]\ncases:\n- name: a\n  pod: nope.yaml\n  expect: {}\n");
        assert!(missing.starts_with("DIR/suite.yaml:4: case \"a\": pod: cannot read DIR/nope.yaml"), "{missing}");
        let both = load_error(&format!("{head}  expect: {{pod: x.yaml, denied: x}}\n"));
        assert_eq!(both, "DIR/suite.yaml:5: case \"a\": expect: pod and denied exclude each other");
        let twice = load_error(&format!("{head}  expect: {{}}\n- name: a\n  pod: p.yaml\n  expect: {{}}\n"));
        assert_eq!(twice, "DIR/suite.yaml:6: case \"a\": a second case of that name");
        let not_pod = load_error("templates: [t/]\ncases:\n- name: a\n  pod: {kind: Job}\n  expect: {}\n");
        assert_eq!(not_pod, "DIR/suite.yaml:4: case \"a\": pod: not a manifest of kind Pod");
        let no_cases = load_error("templates: [t/]\ncases: []\n");
        assert_eq!(no_cases, "DIR/suite.yaml:2: cases: the suite has no case");
    }

    #[test]
    fn paths_in_messages_are_the_authors_not_the_spans() {
        let cases = "cases.value[0].value.expect.value.warning: unknown field `warning` at line 5, column 25";
        assert_eq!(without_spans(cases), "cases[0].expect.warning: unknown field `warning` at line 5, column 25");
        let pod = "cases.value[1].value.pod.value.spec.containers[0].env[0].value: duplicate key";
        assert_eq!(without_spans(pod), "cases[1].pod.spec.containers[0].env[0].value: duplicate key");
        let top = "unknown field `x`, expected one of a: b";
        assert_eq!(without_spans(top), top);
    }

    #[test]
    fn the_diff_is_unified_with_context_and_separate_hunks() {
        let old: String = (1..=20).map(|i| format!("l{i}\n")).collect();
        let new = old.replace("l3\n", "l3x\n").replace("l18\n", "").replace("l20\n", "l20\nl21\n");
        let diff = unified_diff(&old, &new, "expected", "actual", 3);
        let want = "--- expected\n+++ actual\n\
            @@ -1,6 +1,6 @@\n l1\n l2\n-l3\n+l3x\n l4\n l5\n l6\n\
            @@ -15,6 +15,6 @@\n l15\n l16\n l17\n-l18\n l19\n l20\n+l21\n";
        assert_eq!(diff, want);
        assert_eq!(unified_diff(&old, &old, "a", "b", 3), "");
        assert_eq!(unified_diff("", "a\n", "a", "b", 3), "--- a\n+++ b\n@@ -0,0 +1 @@\n+a\n");
        assert_eq!(unified_diff("a\nb\n", "b\n", "a", "b", 0), "--- a\n+++ b\n@@ -1 +0,0 @@\n-a\n");
    }
}
