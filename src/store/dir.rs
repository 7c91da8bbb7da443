//! The local template source: a directory of ConfigMap and PodTemplate manifests, the same
//! files that `kubectl apply -f DIR` would create (SPEC §3 "Sources", §8).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;

use super::{Catalog, Lookup, ParseProblem, StoreStats, TemplateIndex, TemplateStore};
use crate::names::Names;
use crate::source::SourceObject;
use crate::template::SourceKind;
use crate::yaml::{self, Spanned, YamlError};

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The cause is in the message and is not also a `source` (a field named `source` would be),
    /// so a chain (`{:#}`, logs) prints it once.
    #[error("cannot read {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: document {document}: {message}")]
    Manifest { path: PathBuf, document: usize, message: String },
    #[error("{path}: {error}")]
    Yaml { path: PathBuf, error: YamlError },
}

/// One template source manifest (a ConfigMap or a PodTemplate) found in a file.
#[derive(Debug, Clone)]
pub struct SourceManifest {
    pub path: PathBuf,
    /// 0-based index of the YAML document in the file.
    pub document: usize,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub content: ManifestContent,
    /// 1-based lines in the file, for `validate`: a ConfigMap's data keys (the line of each
    /// value), a PodTemplate's `metadata` and `template` fields. Empty where unknown.
    pub lines: BTreeMap<String, u64>,
}

#[derive(Debug, Clone)]
pub enum ManifestContent {
    /// A ConfigMap's data.
    ConfigMap(BTreeMap<String, String>),
    /// A PodTemplate: the whole object, as JSON.
    PodTemplate(Value),
}

impl SourceManifest {
    pub fn kind(&self) -> SourceKind {
        self.source().kind()
    }

    /// The templates it carries, for [`SourceObject::entries`].
    pub fn source(&self) -> SourceObject<'_> {
        match &self.content {
            ManifestContent::ConfigMap(data) => SourceObject::ConfigMap(data),
            ManifestContent::PodTemplate(object) => SourceObject::PodTemplate { name: &self.name, object },
        }
    }
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
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    data: Option<BTreeMap<String, String>>,
}

/// Where the parts of a manifest are, read from the text (a [`Value`] has no positions): the
/// line of each top-level field, and of each key of `data`. Values are skipped unread, so this
/// fits any kind of manifest.
#[derive(Default)]
struct Positions {
    fields: BTreeMap<String, u64>,
    data: BTreeMap<String, u64>,
}

impl Positions {
    /// `validate` names a ConfigMap key, or a PodTemplate's `metadata` or `template`.
    fn lines(mut self) -> BTreeMap<String, u64> {
        for field in ["metadata", "template"] {
            if let Some(line) = self.fields.remove(field) {
                self.data.insert(field.to_owned(), line);
            }
        }
        self.data
    }
}

impl<'de> Deserialize<'de> for Positions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KeyLines { nested: true })
    }
}

/// Visits a mapping, noting the line of each key; anything else has no keys.
struct KeyLines {
    /// Also look into `data`.
    nested: bool,
}

impl<'de> serde::de::Visitor<'de> for KeyLines {
    type Value = Positions;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Positions, A::Error> {
        let mut found = Positions::default();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            if self.nested && key.value == "data" {
                found.data = map.next_value_seed(KeyLinesSeed)?.fields;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
            found.fields.insert(key.value, key.referenced.line());
        }
        Ok(found)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Positions, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Positions::default())
    }
    fn visit_str<E>(self, _: &str) -> Result<Positions, E> {
        Ok(Positions::default())
    }
    fn visit_unit<E>(self) -> Result<Positions, E> {
        Ok(Positions::default())
    }
}

struct KeyLinesSeed;

impl<'de> serde::de::DeserializeSeed<'de> for KeyLinesSeed {
    type Value = Positions;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Positions, D::Error> {
        d.deserialize_any(KeyLines { nested: false })
    }
}

#[derive(Deserialize, Default)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

/// The manifest files of `path` (a file, or a directory's `*.yaml`, `*.yml`, `*.json`), sorted.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, DirError> {
    let io = |error| DirError::Io { path: path.to_owned(), error };
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

/// Every ConfigMap and PodTemplate in `file`; other kinds are skipped. A manifest without a
/// namespace belongs to the platform namespace.
pub fn read_manifests(file: &Path, platform_namespace: &str) -> Result<Vec<SourceManifest>, DirError> {
    let text = std::fs::read_to_string(file).map_err(|error| DirError::Io { path: file.to_owned(), error })?;
    let yaml = |error| DirError::Yaml { path: file.to_owned(), error };
    let documents: Vec<Value> = yaml::documents(&text).map_err(yaml)?;
    // Positions are a convenience for messages: a layout they cannot follow only loses lines.
    let mut positions = yaml::documents::<Positions>(&text).unwrap_or_default().into_iter();
    let mut found = Vec::new();
    for (i, value) in documents.into_iter().enumerate() {
        let lines = positions.next().map(Positions::lines).unwrap_or_default();
        let error = |message: String| DirError::Manifest { path: file.to_owned(), document: i + 1, message };
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
        if !matches!(kind.as_str(), "ConfigMap" | "PodTemplate") {
            continue;
        }
        let manifest: Manifest = serde_json::from_value(value.clone()).map_err(|e| error(e.to_string()))?;
        let name = manifest
            .metadata
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| error(format!("{kind} without metadata.name")))?;
        let content = if kind == "ConfigMap" {
            ManifestContent::ConfigMap(manifest.data.unwrap_or_default())
        } else {
            ManifestContent::PodTemplate(value)
        };
        found.push(SourceManifest {
            path: file.to_owned(),
            document: i,
            namespace: manifest.metadata.namespace.unwrap_or_else(|| platform_namespace.to_owned()),
            name,
            labels: manifest.metadata.labels.unwrap_or_default(),
            content,
            lines,
        });
    }
    Ok(found)
}

/// Every ConfigMap in `file`; other kinds are skipped. A manifest without a namespace belongs to
/// the platform namespace.
pub fn read_config_maps(file: &Path, platform_namespace: &str) -> Result<Vec<ConfigMapManifest>, DirError> {
    let manifests = read_manifests(file, platform_namespace)?;
    Ok(manifests
        .into_iter()
        .filter_map(|m| match m.content {
            ManifestContent::ConfigMap(data) => Some(ConfigMapManifest {
                path: m.path,
                document: m.document,
                namespace: m.namespace,
                name: m.name,
                labels: m.labels,
                data,
            }),
            ManifestContent::PodTemplate(_) => None,
        })
        .collect())
}

/// The template sources (ConfigMaps and PodTemplates with the source label) under `path`.
pub fn read_template_sources(path: &Path, names: &Names) -> Result<Vec<SourceManifest>, DirError> {
    let mut all = Vec::new();
    for file in manifest_files(path)? {
        all.extend(
            read_manifests(&file, &names.platform_namespace)?
                .into_iter()
                .filter(|m| m.labels.get(&names.source_label).map(String::as_str) == Some("true")),
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
        for m in read_template_sources(path, names)? {
            problems.extend(catalog.apply_source(&m.namespace, &m.name, None, m.source()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EntryState;

    #[test]
    fn an_unreadable_path_names_its_cause_once() {
        let err = DirStore::load(Path::new("/nonexistent/templates"), &Names::default()).unwrap_err();
        assert!(std::error::Error::source(&err).is_none(), "the cause is in the message, not also a source");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(chain.matches("No such file or directory").count(), 1, "{chain}");
        assert!(chain.starts_with("cannot read /nonexistent/templates: "), "{chain}");
    }

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
    fn reads_pod_template_manifests_like_config_maps() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("podtemplates.yaml"),
            "apiVersion: v1\nkind: PodTemplate\nmetadata:\n  name: gpu\n  labels: {flyte.org/pod-templates: \"true\"}\n  \
             annotations: {flyte.org/primary-container-name: main}\ntemplate:\n  metadata:\n    labels: {team: ml}\n  spec:\n    \
             containers:\n    - name: main\n      image: docker.io/rwgrim/docker-noop\n      env: [{name: A, value: b}]\n---\n\
             apiVersion: v1\nkind: PodTemplate\nmetadata: {name: unlabelled}\ntemplate: {spec: {containers: [{name: x, image: y}]}}\n---\n\
             apiVersion: v1\nkind: PodTemplate\nmetadata: {name: broken, namespace: team, labels: {flyte.org/pod-templates: \"true\"}}\n\
             template: {spec: {containers: [{name: x, image: y, evn: []}]}}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("pt.json"),
            r#"{"apiVersion":"v1","kind":"PodTemplate","metadata":{"name":"tenant","namespace":"team","labels":{"flyte.org/pod-templates":"true"}},"template":{"metadata":{"labels":{"from":"json"}}}}"#,
        )
        .unwrap();
        let found = read_template_sources(dir.path(), &Names::default()).unwrap();
        let ids: Vec<_> = found.iter().map(|m| format!("{:?} {}/{}", m.kind(), m.namespace, m.name)).collect();
        assert_eq!(
            ids,
            ["PodTemplate flyte/gpu", "PodTemplate team/broken", "PodTemplate team/tenant"],
            "unlabelled ones are skipped"
        );

        let store = DirStore::load(dir.path(), &Names::default()).unwrap();
        let entry = store.lookup("other", "gpu").entry.expect("a platform PodTemplate serves every namespace");
        assert!(entry.source.to_string().starts_with("flyte/podtemplate:gpu/gpu@sha256:"), "{}", entry.source);
        let EntryState::Ready(t) = &entry.state else { panic!("{entry:?}") };
        assert_eq!((t.primary_container_name.as_str(), t.labels["team"].as_str()), ("main", "ml"));
        assert_eq!(t.pod_spec["containers"][0]["env"][0]["name"], "A");
        assert!(store.lookup("other", "tenant").entry.is_none());
        assert!(matches!(store.lookup("team", "tenant").entry.unwrap().state, EntryState::Ready(_)));
        assert!(matches!(store.lookup("team", "broken").entry.unwrap().state, EntryState::Broken(_)), "an error entry");
        assert_eq!(store.problems.len(), 1);
        assert_eq!(
            store.problems[0].to_string(),
            "PodTemplate team/broken: template.spec.containers[0].evn: unknown field"
        );
        assert!(store.lookup("flyte", "unlabelled").entry.is_none());
        assert_eq!(store.stats(), StoreStats { templates: 2, errors: 1, stale: 0 });
    }

    #[test]
    fn a_config_map_key_wins_over_a_pod_template_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "kind: PodTemplate\nmetadata: {name: t, labels: {flyte.org/pod-templates: \"true\"}}\ntemplate: {metadata: {labels: {from: podtemplate}}}\n---\n\
             kind: ConfigMap\nmetadata: {name: z, labels: {flyte.org/pod-templates: \"true\"}}\ndata: {t: 'labels: {from: configmap}'}\n",
        )
        .unwrap();
        let store = DirStore::load(dir.path(), &Names::default()).unwrap();
        let entry = store.lookup("flyte", "t").entry.unwrap();
        assert_eq!(entry.source.object, "z");
        assert!(store.problems.is_empty());
    }

    #[test]
    fn a_pod_template_without_a_name_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.yaml"), "kind: PodTemplate\nmetadata: {labels: {a: b}}\ntemplate: {}\n")
            .unwrap();
        let err = DirStore::load(dir.path(), &Names::default()).unwrap_err().to_string();
        assert!(err.contains("x.yaml: document 1: PodTemplate without metadata.name"), "{err}");
    }

    #[test]
    fn unreadable_manifest_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.yaml"), "kind: ConfigMap\nmetadata: [\n").unwrap();
        let err = DirStore::load(dir.path(), &Names::default()).unwrap_err().to_string();
        assert!(err.ends_with("x.yaml: unclosed bracket '[' at line 2, column 11"), "{err}");
        let err = DirStore::load(&dir.path().join("missing"), &Names::default()).unwrap_err().to_string();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn knows_the_lines_of_data_keys_and_pod_template_fields() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        let label = "labels: {flyte.org/pod-templates: \"true\"}";
        let text = format!(
            "kind: ConfigMap\nmetadata: {{name: a, {label}}}\ndata:\n  other: |\n    mine: nested\n  mine: |\n    labels: [\n\
             ---\n# a comment\nkind: Secret\ndata: [not, a, map]\n---\n\
             kind: PodTemplate\nmetadata:\n  name: t\n  {label}\ntemplate:\n  spec: {{}}\n"
        );
        std::fs::write(&file, text).unwrap();
        let found = read_manifests(&file, "flyte").unwrap();
        let lines: Vec<_> = found.iter().map(|m| m.lines.clone().into_iter().collect::<Vec<_>>()).collect();
        assert_eq!(
            lines,
            [
                vec![("metadata".to_owned(), 2), ("mine".to_owned(), 6), ("other".to_owned(), 4)],
                vec![("metadata".to_owned(), 14), ("template".to_owned(), 17)],
            ],
            "a nested `mine:` is not the key; the Secret between them does not shift the lines"
        );
    }
}
