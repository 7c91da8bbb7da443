//! The template model (SPEC §3): one Flyte `PodTemplate`, parsed and validated once, when the
//! object that carries it is loaded — nothing here runs per admission. `configmap` parses a
//! ConfigMap key's text, `podtemplate` a PodTemplate object, `source` turns either kind of object
//! into its entries; the podSpec checks both share are here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::core::v1::PodSpec;
use serde_json::{Map, Value};

use crate::doc::{Document, Node};

mod configmap;
mod podtemplate;
mod source;

pub use podtemplate::PRIMARY_CONTAINER_ANNOTATION;
pub use source::{content_hash, SourceEntry, SourceObject};

/// The primary container name Flyte assumes when a template does not say.
pub const DEFAULT_PRIMARY_CONTAINER_NAME: &str = "primary";

/// A parsed, validated pod template.
#[derive(Debug, Clone, PartialEq)]
pub struct PodTemplate {
    pub primary_container_name: String,
    /// True when the source named the primary container; of several layers, the highest that
    /// names it decides (SPEC §8).
    pub primary_container_name_set: bool,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// A (possibly partial) core/v1 PodSpec, validated against the typed model and kept as
    /// canonical JSON (keys sorted, no whitespace) with its bracket pairs: the merge reads it
    /// as it reads the pod ([`crate::doc`]), and a template costs about its own size in memory
    /// instead of the ~15x of a `serde_json::Value` tree (a B-tree node per object).
    spec: Document<'static>,
    /// The names of the template's `containers` and `initContainers`, in order: read once here,
    /// asked for several times by every merge.
    container_names: [Vec<String>; 2],
}

/// Whether a source's templates are applied (SPEC §10): the source object's mode annotation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Applied (the annotation absent, or `enforce`).
    #[default]
    Enforce,
    /// Evaluated at its place among the layers and reported, never applied, never denying.
    Shadow,
}

impl Mode {
    /// The mode a source object's annotation `annotation` (with `value`) asks for. Another value
    /// is an error of every template of the object: a typo must not decide silently whether a
    /// template applies.
    pub fn read(annotation: &str, value: Option<&str>) -> Result<Mode, TemplateError> {
        match value {
            None | Some("enforce") => Ok(Mode::Enforce),
            Some("shadow") => Ok(Mode::Shadow),
            Some(other) => Err(TemplateError::Field {
                path: format!("metadata.annotations[{annotation}]"),
                message: format!("{other:?} is not a mode (shadow or enforce)"),
            }),
        }
    }
}

/// The kind of object a template comes from (SPEC §3, §8). A ConfigMap sorts first: its key
/// wins over a PodTemplate of the same name in one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceKind {
    /// A data key of a ConfigMap carrying the source label.
    ConfigMap,
    /// A core/v1 PodTemplate carrying the source label: one template, named after the object.
    PodTemplate,
}

/// Where a template came from; its `Display` is the value of the applied annotation:
/// `namespace/configmap/key@version`, or `namespace/podtemplate:name/name@version`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TemplateSource {
    pub kind: SourceKind,
    pub namespace: String,
    /// The name of the ConfigMap or of the PodTemplate object.
    pub object: String,
    /// The template name: the ConfigMap data key, or the PodTemplate's name.
    pub key: String,
    /// The object's resourceVersion in a cluster, a content hash for files.
    pub version: String,
    /// Not part of the record: a shadow template is never applied, so never recorded.
    pub mode: Mode,
}

impl TemplateSource {
    /// The object and key in words, for messages: `ConfigMap ns/cm key "k"`, `PodTemplate ns/name`.
    pub fn describe(&self) -> String {
        match self.kind {
            SourceKind::ConfigMap => format!("ConfigMap {}/{} key {:?}", self.namespace, self.object, self.key),
            SourceKind::PodTemplate => format!("PodTemplate {}/{}", self.namespace, self.object),
        }
    }
}

impl TemplateSource {
    /// The record without the version: `namespace/configmap/key`, `namespace/podtemplate:name/name`.
    pub fn location(&self) -> String {
        match self.kind {
            SourceKind::ConfigMap => format!("{}/{}/{}", self.namespace, self.object, self.key),
            SourceKind::PodTemplate => format!("{}/podtemplate:{}/{}", self.namespace, self.object, self.key),
        }
    }
}

impl fmt::Display for TemplateSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.location(), self.version)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// YAML/JSON syntax, or a top-level field that is unknown or of the wrong type.
    #[error("{0}")]
    Syntax(String),
    /// The podSpec does not fit the core/v1 PodSpec model.
    #[error("podSpec.{path}: {message}")]
    PodSpec { path: String, message: String },
    /// A field of a PodTemplate object (SPEC §8), named by its path in the object.
    #[error("{path}: {message}")]
    Field { path: String, message: String },
}

impl PodTemplate {
    /// A template from its parts; `pod_spec` must be validated already ([`validate_pod_spec`]).
    pub fn new(
        primary_container_name: String,
        primary_container_name_set: bool,
        labels: BTreeMap<String, String>,
        annotations: BTreeMap<String, String>,
        pod_spec: Map<String, Value>,
    ) -> Self {
        let names = |field: &str| {
            let list = pod_spec.get(field).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
            list.iter().filter_map(|c| c.get("name")?.as_str().map(str::to_owned)).collect()
        };
        let container_names = [names("containers"), names("initContainers")];
        // Exactly as long as the text: templates are kept for as long as they serve.
        let text = String::from(Value::Object(pod_spec).to_string().into_boxed_str());
        PodTemplate {
            primary_container_name,
            primary_container_name_set,
            labels,
            annotations,
            spec: Document::owned(text),
            container_names,
        }
    }

    /// The podSpec as a document node, for the merge.
    pub fn spec(&self) -> Node<'_> {
        self.spec.root()
    }

    /// The podSpec as a value: for tools, tests and composing layers, not the one-template path.
    pub fn pod_spec(&self) -> Map<String, Value> {
        match serde_json::from_str(self.spec.text()) {
            Ok(Value::Object(map)) => map,
            _ => unreachable!("the spec is the JSON text of a map, written by serde_json"),
        }
    }

    /// True when the template has a podSpec with any field.
    pub fn has_pod_spec(&self) -> bool {
        self.spec.text() != "{}"
    }

    /// The names of the template's containers in `field` (`containers`, `initContainers`), in
    /// the order of the list.
    pub fn container_names(&self, field: &str) -> &[String] {
        match field {
            "containers" => &self.container_names[0],
            "initContainers" => &self.container_names[1],
            _ => &[],
        }
    }

    /// Container names with a meaning of their own; never added to a pod as containers (§4).
    pub fn is_reserved_name(&self, name: &str) -> bool {
        crate::merge::rules::is_reserved_container_name(name, &self.primary_container_name)
    }
}

pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Checks the podSpec against the typed core/v1 model and returns it cleaned of nulls.
///
/// Typing catches wrong types; comparing the typed round trip with the input catches unknown
/// fields (a typo such as `evn` would otherwise be dropped silently, like `kubectl
/// --validate=strict` refuses it).
pub(crate) fn validate_pod_spec(mut spec: Map<String, Value>) -> Result<Map<String, Value>, TemplateError> {
    remove_nulls_in_map(&mut spec);
    quantities_as_strings(&mut spec);
    let value = Value::Object(spec);
    let typed: PodSpec = serde_path_to_error::deserialize(&value)
        .map_err(|e| TemplateError::PodSpec { path: e.path().to_string(), message: e.inner().to_string() })?;
    let round_trip = serde_json::to_value(&typed).expect("a PodSpec always serializes");
    if let Some(path) = first_unknown_field(&value, &round_trip, String::new()) {
        return Err(TemplateError::PodSpec { path, message: "unknown field".into() });
    }
    let Value::Object(spec) = value else { unreachable!() };
    validate_containers(&spec)?;
    Ok(spec)
}

fn validate_containers(spec: &Map<String, Value>) -> Result<(), TemplateError> {
    for field in ["containers", "initContainers"] {
        let mut seen = BTreeSet::new();
        let list = spec.get(field).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for (i, c) in list.iter().enumerate() {
            let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
            let path = format!("{field}[{i}].name");
            if name.is_empty() {
                return Err(TemplateError::PodSpec { path, message: "a template container needs a name".into() });
            }
            if !seen.insert(name) {
                return Err(TemplateError::PodSpec { path, message: format!("duplicate container name {name:?}") });
            }
        }
    }
    Ok(())
}

fn remove_nulls_in_map(map: &mut Map<String, Value>) {
    map.retain(|_, v| !v.is_null());
    map.values_mut().for_each(remove_nulls);
}

fn remove_nulls(v: &mut Value) {
    match v {
        Value::Object(map) => remove_nulls_in_map(map),
        Value::Array(items) => items.iter_mut().for_each(remove_nulls),
        _ => {}
    }
}

/// The Flyte SDK carries the podSpec in a protobuf `Struct`, whose numbers are doubles: Python's
/// `json_format` writes `terminationGracePeriodSeconds: 30.0`. Flyte's Go side reads it back as
/// `30`, and kubectl turns YAML's `30.0` into `30` too; so an integral number becomes the integer
/// it is (the PodSpec has no floating-point field). `30.5` stays, and the typed check refuses it.
pub(crate) fn integral_floats_as_integers(v: &mut Value) {
    match v {
        // Up to 2^53, every integer is exactly a double.
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 {
                *v = Value::from(f as i64);
            }
        }
        Value::Object(map) => map.values_mut().for_each(integral_floats_as_integers),
        Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        _ => {}
    }
}

/// YAML authors write `cpu: 1` and `nvidia.com/gpu: 1`; Kubernetes accepts numbers for
/// quantities, so do we.
fn quantities_as_strings(v: &mut Map<String, Value>) {
    for (key, value) in v.iter_mut() {
        match value {
            Value::Object(map) if matches!(key.as_str(), "limits" | "requests" | "overhead") => {
                for q in map.values_mut() {
                    if let Value::Number(n) = q {
                        *q = Value::String(n.to_string());
                    }
                }
            }
            Value::Object(map) => quantities_as_strings(map),
            Value::Array(items) => items.iter_mut().filter_map(Value::as_object_mut).for_each(quantities_as_strings),
            _ => {}
        }
    }
}

/// The first path present in `input` but absent from the typed round trip.
fn first_unknown_field(input: &Value, typed: &Value, path: String) -> Option<String> {
    match (input, typed) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| {
            let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
            match b.get(k) {
                Some(t) => first_unknown_field(v, t, sub),
                None => Some(sub),
            }
        }),
        (Value::Array(a), Value::Array(b)) => {
            a.iter().zip(b).enumerate().find_map(|(i, (v, t))| first_unknown_field(v, t, format!("{path}[{i}]")))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_camel_and_snake_case() {
        let camel = PodTemplate::parse("primaryContainerName: main\npodSpec: {containers: [{name: main}]}").unwrap();
        let snake = PodTemplate::parse("primary_container_name: main\npod_spec: {containers: [{name: main}]}").unwrap();
        assert_eq!(camel, snake);
        assert_eq!(camel.primary_container_name, "main");
    }

    #[test]
    fn json_is_accepted_and_primary_defaults() {
        let t = PodTemplate::parse(r#"{"labels": {"a": "b"}, "podSpec": {"nodeSelector": {"gpu": "true"}}}"#).unwrap();
        assert_eq!(t.primary_container_name, "primary");
        assert_eq!(t.labels["a"], "b");
        assert_eq!(t.pod_spec()["nodeSelector"]["gpu"], "true");
    }

    #[test]
    fn empty_known_fields_are_not_unknown() {
        let t = PodTemplate::parse("podSpec: {securityContext: {}, containers: [{name: p, env: [], resources: {}}]}")
            .unwrap();
        assert_eq!(t.pod_spec()["containers"][0]["env"], serde_json::json!([]));
    }

    #[test]
    fn empty_template_is_valid() {
        let t = PodTemplate::parse("{}").unwrap();
        assert!(t.pod_spec().is_empty() && t.labels.is_empty());
    }

    #[test]
    fn unknown_top_level_field_is_named() {
        let err = PodTemplate::parse("podspec: {}").unwrap_err().to_string();
        assert!(err.contains("unknown field `podspec`"), "{err}");
    }

    #[test]
    fn unknown_nested_field_is_named_with_its_path() {
        let err = PodTemplate::parse("podSpec: {containers: [{name: primary, evn: []}]}").unwrap_err();
        assert_eq!(err.to_string(), "podSpec.containers[0].evn: unknown field");
    }

    #[test]
    fn wrong_type_names_the_path() {
        let err = PodTemplate::parse("podSpec: {containers: [{name: p, env: {a: b}}]}").unwrap_err().to_string();
        assert!(err.starts_with("podSpec.containers[0].env:"), "{err}");
    }

    #[test]
    fn yaml_syntax_error_has_a_line() {
        let err = PodTemplate::parse("labels:\n  a: [b\n").unwrap_err().to_string();
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn numeric_quantities_become_strings() {
        let t = PodTemplate::parse(
            "podSpec: {containers: [{name: p, resources: {limits: {nvidia.com/gpu: 1, cpu: 0.5}}}]}",
        )
        .unwrap();
        assert_eq!(t.pod_spec()["containers"][0]["resources"]["limits"]["nvidia.com/gpu"], "1");
        assert_eq!(t.pod_spec()["containers"][0]["resources"]["limits"]["cpu"], "0.5");
    }

    #[test]
    fn containers_need_unique_names() {
        let err = PodTemplate::parse("podSpec: {containers: [{image: x}]}").unwrap_err().to_string();
        assert!(err.contains("containers[0].name"), "{err}");
        let err = PodTemplate::parse("podSpec: {initContainers: [{name: a}, {name: a}]}").unwrap_err().to_string();
        assert!(err.contains("duplicate container name"), "{err}");
    }

    #[test]
    fn pod_spec_must_be_a_mapping() {
        let err = PodTemplate::parse("podSpec: [1]").unwrap_err().to_string();
        assert!(err.contains("podSpec must be a mapping"), "{err}");
    }

    /// What `flyte.PodTemplate(...).to_k8s_pod()` gives through `json_format.MessageToJson` (flyte
    /// 2.12.1): labels and annotations under `metadata`, podSpec numbers as doubles.
    const SDK_HELLO_WORLD: &str = r#"{
      "metadata": {"labels": {"lKeyA": "lValA"}, "annotations": {"aKeyA": "aValA"}},
      "podSpec": {
        "terminationGracePeriodSeconds": 30.0,
        "containers": [{"name": "primary", "env": [{"value": "world", "name": "hello"}]}],
        "imagePullSecrets": [{"name": "regcred-test"}]
      },
      "primaryContainerName": "primary"
    }"#;

    #[test]
    fn sdk_form_reads_labels_and_annotations_from_metadata() {
        let sdk = PodTemplate::parse(SDK_HELLO_WORLD).unwrap();
        let native = PodTemplate::parse(
            "primaryContainerName: primary\nlabels: {lKeyA: lValA}\nannotations: {aKeyA: aValA}\n\
             podSpec: {terminationGracePeriodSeconds: 30, containers: [{name: primary, env: [{name: hello, value: world}]}],\
             imagePullSecrets: [{name: regcred-test}]}",
        )
        .unwrap();
        assert_eq!(sdk, native);
        // The protobuf form's snake_case names (preserving_proto_field_name) are the same template.
        let snake =
            SDK_HELLO_WORLD.replace("podSpec", "pod_spec").replace("primaryContainerName", "primary_container_name");
        assert_eq!(PodTemplate::parse(&snake).unwrap(), sdk);
    }

    #[test]
    fn sdk_form_with_empty_metadata() {
        // Without labels or annotations the SDK still writes `metadata: {}`; with
        // always_print_fields_with_no_presence, empty maps and an empty primaryContainerName.
        let t = PodTemplate::parse(r#"{"metadata": {}, "podSpec": {"containers": [{"name": "primary"}]}}"#).unwrap();
        assert!(t.labels.is_empty() && t.annotations.is_empty());
        let t = PodTemplate::parse(
            r#"{"metadata": {"labels": {}, "annotations": {}}, "podSpec": {}, "primaryContainerName": ""}"#,
        )
        .unwrap();
        assert!(t.labels.is_empty() && t.annotations.is_empty());
        assert_eq!(t.primary_container_name, "primary");
        // An empty metadata sets nothing, so top-level labels beside it are one form only.
        let t = PodTemplate::parse("metadata: {}\nlabels: {a: b}").unwrap();
        assert_eq!(t.labels["a"], "b");
    }

    #[test]
    fn labels_in_both_forms_are_an_error() {
        for text in [
            "labels: {a: b}\nmetadata: {labels: {c: d}}",
            "annotations: {a: b}\nmetadata: {labels: {c: d}}",
            "labels: {a: b}\nmetadata: {annotations: {}}",
        ] {
            let err = PodTemplate::parse(text).unwrap_err().to_string();
            assert!(err.contains("both at the top level and under metadata"), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_key_in_metadata_is_an_error() {
        let err = PodTemplate::parse("metadata: {name: x, labels: {a: b}}").unwrap_err().to_string();
        assert!(err.contains("unknown field `name`"), "{err}");
        let err = PodTemplate::parse("metadata: {label: {a: b}}").unwrap_err().to_string();
        assert!(err.contains("unknown field `label`"), "{err}");
        // K8sPod's other field is not silently dropped either.
        let err = PodTemplate::parse(r#"{"metadata": {}, "dataConfig": {"enabled": true}}"#).unwrap_err().to_string();
        assert!(err.contains("unknown field `dataConfig`"), "{err}");
    }

    #[test]
    fn integral_doubles_are_integers_and_fractions_are_refused() {
        let t = PodTemplate::parse(
            "podSpec: {activeDeadlineSeconds: 3600.0, tolerations: [{key: k, operator: Exists, tolerationSeconds: 300.0}],\
             containers: [{name: p, ports: [{containerPort: 8080.0}], resources: {limits: {cpu: 2.0, memory: 0.5}}}]}",
        )
        .unwrap();
        assert_eq!(t.pod_spec()["activeDeadlineSeconds"], serde_json::json!(3600));
        assert_eq!(t.pod_spec()["tolerations"][0]["tolerationSeconds"], serde_json::json!(300));
        assert_eq!(t.pod_spec()["containers"][0]["ports"][0]["containerPort"], serde_json::json!(8080));
        assert_eq!(
            t.pod_spec()["containers"][0]["resources"]["limits"],
            serde_json::json!({"cpu": "2", "memory": "0.5"})
        );
        let err = PodTemplate::parse("podSpec: {terminationGracePeriodSeconds: 30.5}").unwrap_err().to_string();
        assert!(err.starts_with("podSpec.terminationGracePeriodSeconds:"), "{err}");
    }

    #[test]
    fn reserved_names() {
        let t = PodTemplate::parse("primaryContainerName: main").unwrap();
        for n in ["default", "default-init", "primary-init", "main"] {
            assert!(t.is_reserved_name(n));
        }
        assert!(!t.is_reserved_name("primary"));
    }
}
