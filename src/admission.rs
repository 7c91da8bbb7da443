//! AdmissionReview in, AdmissionResponse out (SPEC §5): resolves the template, merges, and
//! answers with the JSON Patch between the pod as sent and the merged pod. No HTTP here.

use std::collections::HashMap;

use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::DynamicObject;
use serde_json::Value;

use crate::merge::merge_pod;
use crate::names::Names;
use crate::store::{EntryState, Lookup, TemplateStore};

/// What to do when a pod names a template that is missing, or that never parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnProblem {
    /// `allowed: false` with a message (the default).
    Deny,
    /// `allowed: true`, unchanged, with the message in `warnings`.
    Warn,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub names: Names,
    /// An explicitly referenced (annotation) template that does not exist.
    pub on_missing: OnProblem,
    /// A referenced template whose ConfigMap key never parsed.
    pub on_broken: OnProblem,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { names: Names::default(), on_missing: OnProblem::Deny, on_broken: OnProblem::Deny }
    }
}

/// How one admission ended, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Mutated,
    Unchanged,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Mutated => "mutated",
            Outcome::Unchanged => "unchanged",
            Outcome::Denied => "denied",
        }
    }
}

/// The answer to one review, and what the log line says about it.
#[derive(Debug)]
pub struct Decision {
    pub response: AdmissionResponse,
    pub outcome: Outcome,
    /// The template name the pod asked for, if any.
    pub template: Option<String>,
    /// `namespace/configmap/key@version` of the template applied.
    pub applied: Option<String>,
    pub patch_operations: usize,
}

/// A request body that is not an AdmissionReview we can answer: the server says 400.
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    // Not `#[source]`: the message already carries the cause, and chains would print it twice.
    #[error("request body is not a valid admission.k8s.io/v1 AdmissionReview: {0}")]
    Json(serde_json::Error),
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("AdmissionReview for a pod CREATE has no object")]
    NoObject,
}

/// Parses a review body (JSON).
pub fn parse_review(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, BadReview> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body).map_err(BadReview::Json)?;
    review.try_into().map_err(|_| BadReview::NoRequest)
}

/// The response body for a decision: exactly what `serve` sends and `mutate` prints.
pub fn response_body(decision: &Decision) -> Vec<u8> {
    serde_json::to_vec(&decision.response.clone().into_review()).expect("an AdmissionReview always serializes")
}

/// Decides one admission request.
pub fn mutate(req: &AdmissionRequest<DynamicObject>, store: &dyn TemplateStore, policy: &Policy) -> Result<Decision, BadReview> {
    let mut decision = Decision {
        response: AdmissionResponse::from(req),
        outcome: Outcome::Unchanged,
        template: None,
        applied: None,
        patch_operations: 0,
    };
    let is_pod = req.resource.group.is_empty() && req.resource.resource == "pods" && req.sub_resource.is_none();
    if !is_pod || req.operation != Operation::Create {
        return Ok(decision);
    }
    let object = req.object.as_ref().ok_or(BadReview::NoObject)?;
    let names = &policy.names;
    let annotation = object.metadata.annotations.as_ref().and_then(|a| a.get(&names.template_annotation));
    let label = object.metadata.labels.as_ref().and_then(|l| l.get(&names.environment_label));
    let (name, explicit) = match (annotation.filter(|a| !a.is_empty()), label.filter(|l| !l.is_empty())) {
        (Some(a), _) => (a.clone(), true),
        (None, Some(l)) => (l.clone(), false),
        (None, None) => return Ok(decision),
    };
    decision.template = Some(name.clone());
    let namespace = req.namespace.as_deref().or(object.metadata.namespace.as_deref()).unwrap_or("default");
    let how = if explicit {
        format!("annotation {}", names.template_annotation)
    } else {
        format!("label {}", names.environment_label)
    };

    let Lookup { entry, searched } = store.lookup(namespace, &name);
    let Some(entry) = entry else {
        if !explicit {
            return Ok(decision); // an environment without a template: nothing to apply
        }
        let message = format!("pod template {name:?} (named by {how}) not found in namespaces {searched:?}");
        return Ok(refuse(decision, policy.on_missing, 404, "NotFound", message));
    };
    let mut warnings = Vec::new();
    let template = match &entry.state {
        EntryState::Ready(t) => t,
        EntryState::Stale { template, error, broken_version } => {
            warnings.push(format!(
                "pod template {name:?}: ConfigMap {}/{} key {:?} at version {broken_version} does not parse ({error}); using its last good version {}",
                entry.source.namespace, entry.source.config_map, entry.source.key, entry.source.version
            ));
            template
        }
        EntryState::Broken(error) => {
            let s = &entry.source;
            let message = format!(
                "pod template {name:?} (named by {how}, namespaces searched {searched:?}): ConfigMap {}/{} key {:?} does not parse: {error}",
                s.namespace, s.config_map, s.key
            );
            return Ok(refuse(decision, policy.on_broken, 422, "Invalid", message));
        }
    };

    let mut before = serde_json::to_value(object).map_err(BadReview::Json)?;
    if let Some(meta) = before.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    let merged = merge_pod(&before, template);
    warnings.extend(merged.warnings);
    let mut after = merged.pod;
    let applied = entry.source.to_string();
    if let Some(meta) = after.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = meta.entry("annotations").or_insert_with(|| Value::Object(Default::default()));
        if let Some(annotations) = annotations.as_object_mut() {
            annotations.insert(names.applied_annotation.clone(), Value::String(applied.clone()));
        }
    }
    let patch = json_patch::diff(&before, &after);
    decision.applied = Some(applied.clone());
    decision.response.audit_annotations = HashMap::from([("applied".to_owned(), applied)]);
    if !warnings.is_empty() {
        decision.response.warnings = Some(warnings);
    }
    if !patch.0.is_empty() {
        decision.patch_operations = patch.0.len();
        decision.outcome = Outcome::Mutated;
        decision.response = decision.response.with_patch(patch).expect("a JSON patch always serializes");
    }
    Ok(decision)
}

/// The validating webhook for template ConfigMaps (`POST /validate`): a labelled ConfigMap
/// whose templates do not parse is refused at apply time, naming each key and its error.
pub fn validate_templates(req: &AdmissionRequest<DynamicObject>, names: &Names) -> Decision {
    let mut decision = Decision {
        response: AdmissionResponse::from(req),
        outcome: Outcome::Unchanged,
        template: None,
        applied: None,
        patch_operations: 0,
    };
    let is_config_map = req.resource.group.is_empty() && req.resource.resource == "configmaps";
    let Some(object) = req.object.as_ref().filter(|_| is_config_map) else { return decision };
    let labelled = object.metadata.labels.as_ref().and_then(|l| l.get(&names.source_label)).is_some_and(|v| v == "true");
    if !labelled || !matches!(req.operation, Operation::Create | Operation::Update) {
        return decision;
    }
    let name = object.metadata.name.as_deref().unwrap_or(&req.name);
    let namespace = req.namespace.as_deref().unwrap_or_default();
    let data = object.data.get("data").and_then(Value::as_object);
    let errors: Vec<String> = data
        .into_iter()
        .flatten()
        .filter_map(|(key, text)| {
            let text = text.as_str().unwrap_or_default();
            crate::template::PodTemplate::parse(text).err().map(|e| format!("key {key:?}: {e}"))
        })
        .collect();
    if !errors.is_empty() {
        let message = format!("template ConfigMap {namespace}/{name} does not parse: {}", errors.join("; "));
        decision = refuse(decision, OnProblem::Deny, 422, "Invalid", message);
    }
    decision
}

fn refuse(mut decision: Decision, on: OnProblem, code: u16, reason: &str, message: String) -> Decision {
    match on {
        OnProblem::Deny => {
            decision.response = decision.response.deny(message);
            decision.response.result.code = code;
            decision.response.result.reason = reason.to_owned();
            decision.outcome = Outcome::Denied;
        }
        OnProblem::Warn => decision.response.warnings = Some(vec![message]),
    }
    decision
}

#[cfg(test)]
mod tests;
