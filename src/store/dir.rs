//! The local template source: a directory of ConfigMap manifests, the same files that
//! `kubectl apply -f DIR` would create (SPEC §3 "Sources").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Catalog, Lookup, ParseProblem, StoreStats, TemplateIndex, TemplateStore};
use crate::names::Names;

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: document {document}: {message}")]
    Manifest { path: PathBuf, document: usize, message: String },
}

/// One ConfigMap manifest found in a file.
#[derive(Debug, Clone)]
pub struct ConfigMapManifest {
    pub path: PathBuf,
    /// 0-based index of the YAML document in the file.
    pub document: usize,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub data: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Manifest {
    kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    data: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

/// The manifest files of `path` (a file, or a directory's `*.yaml`, `*.yml`, `*.json`), sorted.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, DirError> {
    let io = |source| DirError::Io { path: path.to_owned(), source };
    if !path.is_dir() {
        std::fs::metadata(path).map_err(io)?;
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let file = entry.map_err(io)?.path();
        let ext = file.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if file.is_file() && matches!(ext, "yaml" | "yml" | "json") {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// Every ConfigMap in `file`; other kinds are skipped. A manifest without a namespace belongs to
/// the platform namespace.
pub fn read_config_maps(file: &Path, platform_namespace: &str) -> Result<Vec<ConfigMapManifest>, DirError> {
    let text = std::fs::read_to_string(file).map_err(|source| DirError::Io { path: file.to_owned(), source })?;
    let mut found = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let error = |message: String| DirError::Manifest { path: file.to_owned(), document: i + 1, message };
        let value = serde_yaml::Value::deserialize(document).map_err(|e| error(e.to_string()))?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        let manifest: Manifest = serde_yaml::from_value(value).map_err(|e| error(e.to_string()))?;
        if manifest.kind.as_deref() != Some("ConfigMap") {
            continue;
        }
        let name = manifest.metadata.name.filter(|n| !n.is_empty()).ok_or_else(|| error("ConfigMap without metadata.name".into()))?;
        found.push(ConfigMapManifest {
            path: file.to_owned(),
            document: i,
            namespace: manifest.metadata.namespace.unwrap_or_else(|| platform_namespace.to_owned()),
            name,
            labels: manifest.metadata.labels.unwrap_or_default(),
            data: manifest.data.unwrap_or_default(),
        });
    }
    Ok(found)
}

/// The template ConfigMaps (those with the source label) under `path`.
pub fn read_template_sources(path: &Path, names: &Names) -> Result<Vec<ConfigMapManifest>, DirError> {
    let mut all = Vec::new();
    for file in manifest_files(path)? {
        all.extend(
            read_config_maps(&file, &names.platform_namespace)?
                .into_iter()
                .filter(|cm| cm.labels.get(&names.source_label).map(String::as_str) == Some("true")),
        );
    }
    Ok(all)
}

/// Templates loaded once from a directory.
#[derive(Debug)]
pub struct DirStore {
    index: TemplateIndex,
    /// Keys that did not parse; they stay in the index as error entries.
    pub problems: Vec<ParseProblem>,
}

impl DirStore {
    pub fn load(path: &Path, names: &Names) -> Result<Self, DirError> {
        let mut catalog = Catalog::new(names.platform_namespace.clone());
        let mut problems = Vec::new();
        for cm in read_template_sources(path, names)? {
            problems.extend(catalog.apply(&cm.namespace, &cm.name, None, &cm.data));
        }
        for p in &problems {
            tracing::error!(problem = %p, "template did not parse");
        }
        let index = catalog.index();
        let stats = index.stats();
        tracing::info!(path = %path.display(), templates = stats.templates, errors = stats.errors, "templates loaded");
        Ok(DirStore { index, problems })
    }
}

impl TemplateStore for DirStore {
    fn lookup(&self, namespace: &str, name: &str) -> Lookup {
        self.index.lookup(namespace, name)
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn stats(&self) -> StoreStats {
        self.index.stats()
    }
}

/// The 1-based line of `file` where data key `key` of YAML document `document` starts (for
/// `validate` messages); `None` when the layout is not the usual block style.
pub fn key_line(file: &Path, document: usize, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(file).ok()?;
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut doc = 0;
    let mut in_data = false;
    let mut child_indent = None;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("---") {
            if i > 0 {
                doc += 1;
            }
            in_data = false;
            continue;
        }
        if doc != document || line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if indent(line) == 0 {
            in_data = line.trim_end() == "data:";
            child_indent = None;
            continue;
        }
        if in_data {
            let level = *child_indent.get_or_insert(indent(line));
            let t = line.trim_start();
            let name = t.strip_prefix('"').and_then(|t| t.strip_prefix(key)).and_then(|t| t.strip_prefix('"'));
            let name = name.or_else(|| t.strip_prefix('\'').and_then(|t| t.strip_prefix(key)).and_then(|t| t.strip_prefix('\'')));
            if indent(line) == level && name.or_else(|| t.strip_prefix(key)).is_some_and(|rest| rest.starts_with(':')) {
                return Some(i + 1);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multi_document_files_with_namespace_and_label_rules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: one, labels: {flyte.org/pod-templates: \"true\"}}\ndata: {t1: '{}'}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {name: two, namespace: team}\ndata: {t2: '{}'}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.json"),
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"three","namespace":"team","labels":{"flyte.org/pod-templates":"true"}},"data":{"t3":"{}"}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let found = read_template_sources(dir.path(), &Names::default()).unwrap();
        let ids: Vec<_> = found.iter().map(|c| format!("{}/{}", c.namespace, c.name)).collect();
        assert_eq!(ids, ["flyte/one", "team/three"], "unlabelled ConfigMaps and other kinds are skipped");

        let store = DirStore::load(dir.path(), &Names::default()).unwrap();
        assert!(store.lookup("team", "t3").entry.is_some());
        assert!(store.lookup("other", "t3").entry.is_none());
        assert!(store.lookup("other", "t1").entry.is_some());
    }

    #[test]
    fn unreadable_manifest_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.yaml"), "kind: ConfigMap\nmetadata: [\n").unwrap();
        let err = DirStore::load(dir.path(), &Names::default()).unwrap_err().to_string();
        assert!(err.contains("x.yaml: document 1"), "{err}");
        let err = DirStore::load(&dir.path().join("missing"), &Names::default()).unwrap_err().to_string();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn finds_the_line_of_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        let text = "kind: ConfigMap\ndata:\n  other: |\n    mine: nested\n  mine: |\n    labels: [\n---\nkind: ConfigMap\ndata:\n  mine: x\n";
        std::fs::write(&file, text).unwrap();
        assert_eq!(key_line(&file, 0, "mine"), Some(5), "a nested field of another key is not the key");
        assert_eq!(key_line(&file, 1, "mine"), Some(10), "the key of the right document");
        assert_eq!(key_line(&file, 0, "absent"), None);
    }
}
