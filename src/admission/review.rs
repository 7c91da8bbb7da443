//! The AdmissionReview as the API server sends and reads it: the request (parsed, the object
//! kept raw), the response, the decision the handlers log, and the errors of a body that is no review.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

use super::Outcome;

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
    /// The bracket pairs of `object`, found by the pass that checked the body
    /// ([`crate::doc::check_and_pair`]), so that the object's document is not scanned again.
    #[serde(skip)]
    pub object_pairs: Option<Vec<(u32, u32)>>,
    // `dryRun` is not read: a dry run is answered exactly like a real request (the webhook has
    // no side effects), which `dry_run_is_answered_byte_for_byte_like_a_real_request` checks.
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
    pub(super) fn allow(uid: &str) -> Self {
        Response { uid: uid.to_owned(), allowed: true, ..Response::default() }
    }

    pub(super) fn with_patch(&mut self, patch: Vec<u8>) {
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
    /// What the pod's shadow templates would change (§10), for the metric.
    pub shadows: Vec<super::ShadowEffect>,
    /// For each name of `template`, in order, the template of that name found for the pod in the
    /// admission's snapshot (`None`: no such template): the per-template metric counts through
    /// these, with no lookup of its own.
    pub found: Vec<Option<std::sync::Arc<crate::store::TemplateEntry>>>,
}

impl Decision {
    pub(super) fn unchanged(req: &Request) -> Self {
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
            shadows: Vec::new(),
            found: Vec::new(),
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
    #[error("AdmissionReview for a pod CREATE: request.object is not a JSON object")]
    NotAnObject,
    /// Syntax serde_json accepts when it skips a value but not when it reads one (too deep, a
    /// number out of range, a lone surrogate): refused for the whole body.
    #[error("request body is not a valid admission.k8s.io/v1 AdmissionReview: {0}")]
    Unreadable(crate::doc::Unreadable),
}

/// Parses a review body (JSON).
pub fn parse_review(body: &[u8]) -> Result<Request, BadReview> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(BadReview::Json)?;
    let pairs = crate::doc::check_and_pair(body).map_err(BadReview::Unreadable)?;
    let mut req = envelope.request.ok_or(BadReview::NoRequest)?;
    req.object_pairs = req.object.as_ref().and_then(|o| crate::doc::pairs_within(o.get(), body, &pairs));
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
