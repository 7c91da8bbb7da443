//! A template as a ConfigMap data key (SPEC §3): YAML or JSON text, in the native form
//! (`primaryContainerName`, `labels`, `annotations`, `podSpec`) or the Flyte SDK's
//! (`to_k8s_pod()`: labels and annotations under `metadata`).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    integral_floats_as_integers, kind_of, validate_pod_spec, PodTemplate, TemplateError, DEFAULT_PRIMARY_CONTAINER_NAME,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    #[serde(rename = "primaryContainerName", alias = "primary_container_name")]
    primary_container_name: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(rename = "podSpec", alias = "pod_spec")]
    pod_spec: Option<Value>,
    /// The Flyte SDK's form (`PodTemplate.to_k8s_pod()`, the `K8sPod` message as JSON): labels
    /// and annotations under `metadata`. Its other field, `dataConfig`, is not accepted: the SDK
    /// never sets it in a pod template, and dropping it silently would lose what it asks for.
    metadata: Option<RawMetadata>,
}

/// `K8sObjectMetadata`: only labels and annotations; anything else (`name`, ...) is an error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
}

impl PodTemplate {
    /// Parses one ConfigMap value (YAML, or JSON which is YAML too).
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let raw: RawTemplate = crate::yaml::from_str(text).map_err(|e| TemplateError::Syntax(e.message))?;
        let named_primary = raw.primary_container_name.filter(|n| !n.is_empty());
        let primary_container_name_set = named_primary.is_some();
        let primary_container_name = named_primary.unwrap_or_else(|| DEFAULT_PRIMARY_CONTAINER_NAME.to_owned());
        let (labels, annotations) = match raw.metadata {
            Some(RawMetadata { labels, annotations }) if labels.is_some() || annotations.is_some() => {
                if raw.labels.is_some() || raw.annotations.is_some() {
                    return Err(TemplateError::Syntax(
                        "labels/annotations are given both at the top level and under metadata \
                         (the Flyte SDK's form); use one form or the other"
                            .into(),
                    ));
                }
                (labels, annotations)
            }
            _ => (raw.labels, raw.annotations),
        };
        let pod_spec = match raw.pod_spec {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(mut spec)) => {
                spec.values_mut().for_each(integral_floats_as_integers);
                validate_pod_spec(spec)?
            }
            Some(other) => {
                return Err(TemplateError::Syntax(format!("podSpec must be a mapping, found {}", kind_of(&other))))
            }
        };
        Ok(PodTemplate::new(
            primary_container_name,
            primary_container_name_set,
            labels.unwrap_or_default(),
            annotations.unwrap_or_default(),
            pod_spec,
        ))
    }
}
