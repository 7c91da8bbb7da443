//! A core/v1 `PodTemplate` object as a template (SPEC §8): `template.metadata` labels and
//! annotations, `template.spec` as the podSpec, the primary container from an annotation.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{validate_pod_spec, PodTemplate, TemplateError, DEFAULT_PRIMARY_CONTAINER_NAME};
use crate::merge::{self, Ctx};

/// The annotation of a PodTemplate object that names its primary container (SPEC §8).
pub const PRIMARY_CONTAINER_ANNOTATION: &str = "flyte.org/primary-container-name";

/// `template.metadata` of a PodTemplate: labels and annotations are the template's; the other
/// ObjectMeta fields mean nothing on a pod template but are valid there, so they are accepted
/// and ignored. Anything else is a typo and an error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)] // the ignored fields are named only to be accepted
struct TemplateMetadata {
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
    name: Option<Value>,
    generate_name: Option<Value>,
    namespace: Option<Value>,
    uid: Option<Value>,
    resource_version: Option<Value>,
    generation: Option<Value>,
    creation_timestamp: Option<Value>,
    deletion_timestamp: Option<Value>,
    deletion_grace_period_seconds: Option<Value>,
    owner_references: Option<Value>,
    finalizers: Option<Value>,
    managed_fields: Option<Value>,
    self_link: Option<Value>,
}

fn field_error(path: impl Into<String>, message: impl Into<String>) -> TemplateError {
    TemplateError::Field { path: path.into(), message: message.into() }
}

/// A core/v1 PodTemplate object as a template (SPEC §8): `template.metadata.labels` and
/// `.annotations`, `template.spec` as the podSpec (validated like a ConfigMap template's), and
/// the primary container name from the object's annotation.
pub(super) fn parse_pod_template_object(object: &Value) -> Result<PodTemplate, TemplateError> {
    let annotation = object.pointer("/metadata/annotations").and_then(|a| a.get(PRIMARY_CONTAINER_ANNOTATION));
    let annotation_path = || format!("metadata.annotations[{PRIMARY_CONTAINER_ANNOTATION}]");
    let named_primary = match annotation {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) if name.is_empty() => None,
        Some(Value::String(name)) => {
            if !is_dns_label(name) {
                return Err(field_error(
                    annotation_path(),
                    format!("{name:?} is not a valid container name (lower case letters, digits and '-', at most 63)"),
                ));
            }
            Some(name.clone())
        }
        Some(_) => return Err(field_error(annotation_path(), "must be a string")),
    };
    let template = match object.get("template") {
        Some(Value::Object(template)) => template,
        None | Some(Value::Null) => {
            return Err(field_error("template", "missing: a PodTemplate carries its pod template here"))
        }
        Some(_) => return Err(field_error("template", "must be a mapping")),
    };
    if let Some(unknown) = template.keys().find(|k| !matches!(k.as_str(), "metadata" | "spec")) {
        return Err(field_error(format!("template.{unknown}"), "unknown field"));
    }
    let (labels, annotations) = match template.get("metadata") {
        None | Some(Value::Null) => (None, None),
        Some(meta) => {
            let meta: TemplateMetadata = serde_path_to_error::deserialize(meta).map_err(|e| {
                let inner = e.path().to_string();
                let path =
                    if inner == "." { "template.metadata".to_owned() } else { format!("template.metadata.{inner}") };
                // serde_path_to_error's path ends at the unknown field itself.
                field_error(path, e.inner().to_string())
            })?;
            (meta.labels, meta.annotations)
        }
    };
    let pod_spec = match template.get("spec") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(spec)) => {
            let spec = validate_pod_spec(spec.clone()).map_err(|e| match e {
                TemplateError::PodSpec { path, message } => field_error(format!("template.spec.{path}"), message),
                other => other,
            })?;
            without_api_defaults(spec)
        }
        Some(_) => return Err(field_error("template.spec", "must be a mapping")),
    };
    Ok(PodTemplate::new(
        named_primary.as_deref().unwrap_or(DEFAULT_PRIMARY_CONTAINER_NAME).to_owned(),
        named_primary.is_some(),
        labels.unwrap_or_default(),
        annotations.unwrap_or_default(),
        pod_spec,
    ))
}

/// An RFC 1123 label: what a container name must be.
pub(super) fn is_dns_label(s: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    s.len() <= 63 && s.chars().all(ok_char) && !s.starts_with('-') && !s.ends_with('-')
}

/// Drops the values the API server fills into every stored PodTemplate (`SetDefaults_PodSpec`,
/// `_Container`, `_Probe`) and that the merge counts as unset on a pod (SPEC §4 "Scalars",
/// [`merge::api_default`]).
///
/// Kept, a defaulted value would act as if the template's author had chosen it: a Flyte
/// PodTemplate's `default` container with an untagged image (`docker.io/rwgrim/docker-noop`)
/// would force `imagePullPolicy: Always` on every task container, and a PodTemplate layered above
/// another template would reset its `restartPolicy` to `Always`. Dropped from files too, so that
/// the same manifest means the same in both modes: a PodTemplate cannot set a field to its API
/// default.
pub(super) fn without_api_defaults(mut spec: Map<String, Value>) -> Map<String, Value> {
    let drop_defaults = |map: &mut Map<String, Value>, ctx: Ctx| {
        let image = map.get("image").and_then(Value::as_str).unwrap_or_default().to_owned();
        map.retain(|key, value| merge::api_default(ctx, key, || image.clone()).is_none_or(|d| *value != d));
    };
    drop_defaults(&mut spec, Ctx::PodSpec);
    if spec.get("securityContext").is_some_and(|s| s.as_object().is_some_and(Map::is_empty)) {
        spec.remove("securityContext");
    }
    for field in ["containers", "initContainers"] {
        let containers = spec.get_mut(field).and_then(Value::as_array_mut).into_iter().flatten();
        for container in containers.filter_map(Value::as_object_mut) {
            drop_defaults(container, Ctx::Container);
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                if let Some(probe) = container.get_mut(probe).and_then(Value::as_object_mut) {
                    drop_defaults(probe, Ctx::Probe);
                }
            }
        }
    }
    spec
}
