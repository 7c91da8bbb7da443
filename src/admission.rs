//! AdmissionReview in, AdmissionResponse out (SPEC §5): resolves the template, merges, and
//! answers with the JSON Patch between the pod as sent and the merged pod. No HTTP here.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::doc::{Document, Node};
use crate::merge::merge;
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

/// The parts of an `admission.k8s.io/v1` AdmissionReview request the webhook reads; everything
/// else is ignored. The object stays raw JSON: the merge opens only what it touches, and the
/// patch works on exactly what was sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// Echoed from the review envelope.
    #[serde(skip)]
    pub api_version: String,
    #[serde(skip)]
    pub kind: String,
    pub uid: String,
    pub resource: GroupVersionResource,
    #[serde(default)]
    pub sub_resource: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: String,
    #[serde(default)]
    pub object: Option<Box<RawValue>>,
    /// Handled exactly like a real request: the webhook has no side effects.
    #[serde(default)]
    pub dry_run: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GroupVersionResource {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    pub resource: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    request: Option<Request>,
}

/// The AdmissionResponse, in the shape the API server reads.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub uid: String,
    pub allowed: bool,
    #[serde(rename = "status", skip_serializing_if = "Status::is_empty")]
    pub result: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    /// The RFC 6902 patch as JSON bytes; sent base64-encoded, as the API server expects `[]byte`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "base64_bytes")]
    pub patch: Option<Vec<u8>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub audit_annotations: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warnings: Option<Vec<String>>,
}

impl Response {
    fn allow(uid: &str) -> Self {
        Response { uid: uid.to_owned(), allowed: true, ..Response::default() }
    }

    fn with_patch(&mut self, patch: Vec<u8>) {
        self.patch = Some(patch);
        self.patch_type = Some("JSONPatch");
    }
}

fn base64_bytes<S: serde::Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    use base64::Engine as _;
    match bytes {
        Some(b) => s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b)),
        None => s.serialize_none(),
    }
}

/// `status` of a refusal (metav1.Status, the fields the API server shows the user).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Status {
    #[serde(skip_serializing_if = "is_zero")]
    pub code: u16,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Status {
    fn is_empty(&self) -> bool {
        *self == Status::default()
    }
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

/// The answer to one review, and what the log line says about it.
#[derive(Debug)]
pub struct Decision {
    pub api_version: String,
    pub kind: String,
    pub response: Response,
    pub outcome: Outcome,
    pub namespace: String,
    /// The pod's name, or its generateName prefix.
    pub pod: String,
    /// The template name the pod asked for, if any.
    pub template: Option<String>,
    /// `namespace/configmap/key@version` of the template applied.
    pub applied: Option<String>,
    pub patch_operations: usize,
}

impl Decision {
    fn unchanged(req: &Request) -> Self {
        Decision {
            api_version: req.api_version.clone(),
            kind: req.kind.clone(),
            response: Response::allow(&req.uid),
            outcome: Outcome::Unchanged,
            namespace: req.namespace.clone().unwrap_or_default(),
            pod: req.name.clone(),
            template: None,
            applied: None,
            patch_operations: 0,
        }
    }
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
pub fn parse_review(body: &[u8]) -> Result<Request, BadReview> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(BadReview::Json)?;
    let mut req = envelope.request.ok_or(BadReview::NoRequest)?;
    req.api_version = envelope.api_version.unwrap_or_else(|| "admission.k8s.io/v1".to_owned());
    req.kind = envelope.kind.unwrap_or_else(|| "AdmissionReview".to_owned());
    Ok(req)
}

/// The response body for a decision: exactly what `serve` sends and `mutate` prints.
pub fn response_body(decision: &Decision) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Review<'a> {
        api_version: &'a str,
        kind: &'a str,
        response: &'a Response,
    }
    let review = Review { api_version: &decision.api_version, kind: &decision.kind, response: &decision.response };
    serde_json::to_vec(&review).expect("an AdmissionReview always serializes")
}

/// A string at `object.metadata.<field>.<key>`.
fn meta_str<'a>(object: &'a Value, field: &str, key: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.get(key)?.as_str()
}

/// Decides one admission request.
pub fn mutate(req: Request, store: &dyn TemplateStore, policy: &Policy) -> Result<Decision, BadReview> {
    let mut decision = Decision::unchanged(&req);
    let is_pod = req.resource.group.is_empty() && req.resource.resource == "pods" && req.sub_resource.is_none();
    if !is_pod || req.operation != "CREATE" {
        return Ok(decision);
    }
    let raw = req.object.as_deref().ok_or(BadReview::NoObject)?;
    let document = Document::new(raw);
    let mut pod = document.root();
    let meta = pod.as_object_mut().ok_or(BadReview::NoObject)?.get_mut("metadata").and_then(Node::as_object_mut);
    let meta_field = |field: &str| meta.as_ref().and_then(|m| m.get(field)?.as_str());
    if decision.pod.is_empty() {
        decision.pod = meta_field("name").or_else(|| meta_field("generateName")).unwrap_or_default().into_owned();
    }
    if decision.namespace.is_empty() {
        decision.namespace = meta_field("namespace").unwrap_or(Cow::Borrowed("default")).into_owned();
    }
    let names = &policy.names;
    let meta_map_str = |field: &str, key: &str| {
        let value = meta.as_ref()?.get(field)?.str_field(key);
        value.filter(|v| !v.is_empty())
    };
    let (name, explicit) = match meta_map_str("annotations", &names.template_annotation) {
        Some(a) => (a, true),
        None => match meta_map_str("labels", &names.environment_label) {
            Some(l) => (l, false),
            None => return Ok(decision),
        },
    };
    decision.template = Some(name.clone());
    let how = if explicit {
        format!("annotation {}", names.template_annotation)
    } else {
        format!("label {}", names.environment_label)
    };

    let Lookup { entry, searched } = store.lookup(&decision.namespace, &name);
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

    warnings.extend(merge(&mut pod, template));
    let applied = entry.source.to_string();
    if let Some(root) = pod.as_object_mut() {
        let annotations = root.object_entry("metadata").object_entry("annotations");
        annotations.insert(names.applied_annotation.as_str(), Node::Value(Cow::Owned(Value::String(applied.clone()))));
    }
    // Parts the merge did not open (managedFields, status, ...) are skipped without a look.
    let (patch, operations) = crate::patch::diff(&document.root(), &pod);
    decision.applied = Some(applied.clone());
    decision.response.audit_annotations = BTreeMap::from([("applied".to_owned(), applied)]);
    if !warnings.is_empty() {
        decision.response.warnings = Some(warnings);
    }
    if operations > 0 {
        decision.patch_operations = operations;
        decision.outcome = Outcome::Mutated;
        decision.response.with_patch(patch);
    }
    Ok(decision)
}

/// The validating webhook for template ConfigMaps (`POST /validate`): a labelled ConfigMap
/// whose templates do not parse is refused at apply time, naming each key and its error.
pub fn validate_templates(req: &Request, names: &Names) -> Decision {
    let mut decision = Decision::unchanged(req);
    let is_config_map = req.resource.group.is_empty() && req.resource.resource == "configmaps";
    let Some(raw) = req.object.as_ref().filter(|_| is_config_map) else { return decision };
    let Ok(object) = serde_json::from_str::<Value>(raw.get()) else { return decision };
    let labelled = meta_str(&object, "labels", &names.source_label) == Some("true");
    if !labelled || !matches!(req.operation.as_str(), "CREATE" | "UPDATE") {
        return decision;
    }
    let name = object.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or(&req.name);
    let errors: Vec<String> = object
        .get("data")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(key, text)| {
            let text = text.as_str().unwrap_or_default();
            crate::template::PodTemplate::parse(text).err().map(|e| format!("key {key:?}: {e}"))
        })
        .collect();
    if !errors.is_empty() {
        let message = format!("template ConfigMap {}/{name} does not parse: {}", decision.namespace, errors.join("; "));
        decision = refuse(decision, OnProblem::Deny, 422, "Invalid", message);
    }
    decision
}

fn refuse(mut decision: Decision, on: OnProblem, code: u16, reason: &str, message: String) -> Decision {
    match on {
        OnProblem::Deny => {
            decision.response.allowed = false;
            decision.response.result = Status { code, reason: reason.to_owned(), message };
            decision.outcome = Outcome::Denied;
        }
        OnProblem::Warn => decision.response.warnings = Some(vec![message]),
    }
    decision
}

#[cfg(test)]
mod tests;
