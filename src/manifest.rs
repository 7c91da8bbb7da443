//! Template source manifests in files: the ConfigMap and PodTemplate manifests that `kubectl
//! apply -f DIR` would create (SPEC §3 "Sources", §8), read once for the directory store,
//! `validate` and `export-policy` alike, with the lines of their keys for messages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;

use crate::names::Names;
use crate::template::SourceKind;
use crate::template::{Mode, SourceObject, TemplateError};
use crate::yaml::{self, Spanned, YamlError};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
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
    pub annotations: BTreeMap<String, String>,
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

    /// Whether its templates apply or only shadow (§10), from its mode annotation.
    pub fn mode(&self, names: &Names) -> Result<Mode, TemplateError> {
        Mode::read(&names.mode_annotation, self.annotations.get(&names.mode_annotation).map(String::as_str))
    }

    /// The templates it carries, for [`SourceObject::entries`].
    pub fn source(&self) -> SourceObject<'_> {
        match &self.content {
            ManifestContent::ConfigMap(data) => SourceObject::ConfigMap(data),
            ManifestContent::PodTemplate(object) => SourceObject::PodTemplate { name: &self.name, object },
        }
    }
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
    annotations: Option<BTreeMap<String, String>>,
}

/// The manifest files of `path` (a file, or a directory's `*.yaml`, `*.yml`, `*.json`), sorted.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let io = |error| ManifestError::Io { path: path.to_owned(), error };
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
pub fn read_manifests(file: &Path, platform_namespace: &str) -> Result<Vec<SourceManifest>, ManifestError> {
    let text = std::fs::read_to_string(file).map_err(|error| ManifestError::Io { path: file.to_owned(), error })?;
    let yaml = |error| ManifestError::Yaml { path: file.to_owned(), error };
    let documents: Vec<Value> = yaml::documents(&text).map_err(yaml)?;
    // Positions are a convenience for messages: a layout they cannot follow only loses lines.
    let mut positions = yaml::documents::<Positions>(&text).unwrap_or_default().into_iter();
    let mut found = Vec::new();
    for (i, value) in documents.into_iter().enumerate() {
        let lines = positions.next().map(Positions::lines).unwrap_or_default();
        let error = |message: String| ManifestError::Manifest { path: file.to_owned(), document: i + 1, message };
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
            annotations: manifest.metadata.annotations.unwrap_or_default(),
            content,
            lines,
        });
    }
    Ok(found)
}

/// The template sources (ConfigMaps and PodTemplates with the source label) under `path`.
pub fn read_template_sources(path: &Path, names: &Names) -> Result<Vec<SourceManifest>, ManifestError> {
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
