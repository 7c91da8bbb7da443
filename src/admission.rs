//! AdmissionReview in, AdmissionResponse out (SPEC §5): resolves the template, merges, and
//! answers with the JSON Patch between the pod as sent and the merged pod. No HTTP here.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use std::sync::Arc;

use crate::doc::{Document, Node};
use crate::environment::BadList;
pub use crate::environment::Requested;
use crate::merge::{compose, merge, Conflict, Layer, Role};
use crate::names::Names;
use crate::store::{EntryState, Lookup, TemplateEntry, TemplateStore};
use crate::template::PodTemplate;

/// What to do about a problem with a pod's templates: a missing or broken one, a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnProblem {
    /// `allowed: false` with a message.
    Deny,
    /// `allowed: true` with the message in `warnings`; a missing or broken template is skipped,
    /// the other layers still apply.
    Warn,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub names: Names,
    /// An explicitly referenced (annotation) template that does not exist.
    pub on_missing: OnProblem,
    /// A template that applies to the pod (named, or a default) and never parsed.
    pub on_broken: OnProblem,
    /// Two named templates setting one field to different values (the later one wins).
    pub on_conflict: OnProblem,
    /// The template every pod gets first: from the platform namespace, then the pod's own.
    pub default_template: Option<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            names: Names::default(),
            on_missing: OnProblem::Deny,
            on_broken: OnProblem::Deny,
            on_conflict: OnProblem::Warn,
            default_template: None,
        }
    }
}

/// How one admission ended, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Mutated,
    Unchanged,
    Denied,
    /// Refused because of a bug of ours (500), not the pod's fault: counted and logged apart.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Mutated => "mutated",
            Outcome::Unchanged => "unchanged",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
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
    crate::doc::check(body).map_err(BadReview::Unreadable)?;
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

/// Decides one admission request: resolve the template names → look them up → merge → respond.
pub fn mutate(req: Request, store: &dyn TemplateStore, policy: &Policy) -> Result<Decision, BadReview> {
    let mut decision = Decision::unchanged(&req);
    let is_pod = req.resource.group.is_empty() && req.resource.resource == "pods" && req.sub_resource.is_none();
    if !is_pod || req.operation != "CREATE" {
        return Ok(decision);
    }
    let raw = req.object.as_deref().ok_or(BadReview::NoObject)?;
    let document = Document::new(raw);
    let mut pod = document.root();
    let meta = pod.as_object_mut().ok_or(BadReview::NotAnObject)?.get_mut("metadata").and_then(Node::as_object_mut);
    let meta_field = |field: &str| meta.as_ref().and_then(|m| m.get(field)?.as_str());
    if decision.pod.is_empty() {
        decision.pod = meta_field("name").or_else(|| meta_field("generateName")).unwrap_or_default().into_owned();
    }
    if decision.namespace.is_empty() {
        decision.namespace = meta_field("namespace").unwrap_or(Cow::Borrowed("default")).into_owned();
    }
    let meta_map_str = |field: &str, key: &str| meta.as_ref()?.get(field)?.str_field(key);
    let requested = match Requested::read(meta_map_str, &policy.names) {
        Ok(requested) => requested,
        Err(bad) => return Ok(Refusal::from(bad).apply(decision)),
    };
    decision.template = Some(requested.names().join(",")).filter(|n| !n.is_empty());
    let plan = match plan(&decision.namespace, &requested, store, policy) {
        Ok(plan) => plan,
        Err(refusal) => return Ok(refusal.apply(decision)),
    };
    let mut warnings = plan.warnings;
    if plan.layers.is_empty() {
        decision.response.warnings = Some(warnings).filter(|w| !w.is_empty());
        return Ok(decision);
    }

    let layers: Vec<Layer<'_>> = plan.layers.iter().map(PlannedLayer::layer).collect();
    let composition = compose(&layers);
    if !composition.conflicts.is_empty() {
        let described = composition.conflicts.iter().map(|c| describe_conflict(c, &plan.layers));
        match policy.on_conflict {
            OnProblem::Warn => warnings.extend(described),
            OnProblem::Deny => {
                let message = format!("pod templates conflict: {}", described.collect::<Vec<_>>().join("; "));
                return Ok(Refusal::new(OnProblem::Deny, 409, "Conflict", message).apply(decision));
            }
        }
    }
    warnings.extend(merge(&mut pod, &composition.template));
    let applied = applied_record(&plan.layers, &requested, &policy.names);
    if let Some(root) = pod.as_object_mut() {
        let annotations = root.object_entry("metadata").object_entry("annotations");
        annotations
            .insert(policy.names.applied_annotation.as_str(), Node::Value(Cow::Owned(Value::String(applied.clone()))));
    }
    // Parts the merge did not open (managedFields, status, ...) are skipped without a look.
    let (patch, operations) = match crate::patch::diff(&document.root(), &pod) {
        Ok(diff) => diff,
        // A bug, not the request's fault: refused loudly rather than answered with a wrong patch.
        Err(e) => {
            let mut refused = Refusal::new(OnProblem::Deny, 500, "InternalError", e.to_string()).apply(decision);
            refused.outcome = Outcome::Error;
            return Ok(refused);
        }
    };
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

/// A layer found in the store, lowest first.
#[derive(Debug, Clone)]
pub struct PlannedLayer {
    pub role: Role,
    pub entry: Arc<TemplateEntry>,
    /// The version served (the last good one when the entry is stale).
    pub template: Arc<PodTemplate>,
}

impl PlannedLayer {
    pub fn layer(&self) -> Layer<'_> {
        Layer { role: self.role, template: &self.template }
    }

    /// `platform default flyte/…`, `namespace default ml/…`, `template ml/…`: for messages and
    /// `render --explain`.
    pub fn describe(&self, platform_namespace: &str) -> String {
        let what = match self.role {
            Role::Named => "template",
            Role::Default if self.entry.source.namespace == platform_namespace => "platform default",
            Role::Default => "namespace default",
        };
        format!("{what} {}", self.entry.source)
    }
}

/// What applies to a pod, and what the user should hear about it.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub layers: Vec<PlannedLayer>,
    pub warnings: Vec<String>,
}

/// The layers for a pod of `namespace` (SPEC §8): the platform default, the namespace default,
/// then the named templates.
pub fn plan(
    namespace: &str,
    requested: &Requested,
    store: &dyn TemplateStore,
    policy: &Policy,
) -> Result<Plan, Refusal> {
    let mut plan = Plan::default();
    let platform = policy.names.platform_namespace.as_str();
    if let Some(default) = &policy.default_template {
        // Only the platform namespace, then only the pod's own: never another tenant's.
        let platform_default = store.lookup(platform, default).entry;
        let namespace_default =
            store.lookup(namespace, default).entry.filter(|e| e.source.namespace == namespace && namespace != platform);
        for entry in [platform_default, namespace_default].into_iter().flatten() {
            let namespace = entry.source.namespace.clone();
            let how = || format!("the default template (--default-template) in namespace {namespace}");
            plan.add(Role::Default, default, entry, how, policy)?;
        }
    }
    // Messages only: formatted when a refusal or warning needs them, not on every admission.
    let how = || requested.rule(&policy.names);
    let required = requested.required();
    for name in requested.names() {
        let Lookup { entry, searched } = store.lookup(namespace, name);
        match entry {
            Some(entry) => {
                let how = || format!("named by {}, namespaces searched {searched:?}", how());
                plan.add(Role::Named, name, entry, how, policy)?
            }
            // An environment without a template: nothing to apply.
            None if !required => {}
            None => {
                let message =
                    format!("pod template {name:?} (named by {}) not found in namespaces {searched:?}", how());
                plan.refuse(Refusal::new(policy.on_missing, 404, "NotFound", message))?;
            }
        }
    }
    Ok(plan)
}

impl Plan {
    fn add(
        &mut self,
        role: Role,
        name: &str,
        entry: Arc<TemplateEntry>,
        how: impl FnOnce() -> String,
        policy: &Policy,
    ) -> Result<(), Refusal> {
        let template = match &entry.state {
            EntryState::Ready(t) => t.clone(),
            EntryState::Stale { template, error, broken_version } => {
                self.warnings.push(format!(
                    "pod template {name:?}: {} at version {broken_version} does not parse ({error}); using its last good version {}",
                    entry.source.describe(),
                    entry.source.version
                ));
                template.clone()
            }
            EntryState::Broken(error) => {
                let message =
                    format!("pod template {name:?} ({}): {} does not parse: {error}", how(), entry.source.describe());
                return self.refuse(Refusal::new(policy.on_broken, 422, "Invalid", message));
            }
        };
        self.layers.push(PlannedLayer { role, entry, template });
        Ok(())
    }

    /// A refusal the policy turns into a warning skips the layer; otherwise the pod is denied.
    fn refuse(&mut self, refusal: Refusal) -> Result<(), Refusal> {
        match refusal.on {
            OnProblem::Warn => {
                self.warnings.push(refusal.message);
                Ok(())
            }
            OnProblem::Deny => Err(refusal),
        }
    }
}

/// The applied record (annotation and `auditAnnotations`): every layer lowest first, and the rule
/// that chose the environment when the pod does not name it itself (SPEC §9).
fn applied_record(layers: &[PlannedLayer], requested: &Requested, names: &Names) -> String {
    let mut record = layers.iter().map(|l| l.entry.source.to_string()).collect::<Vec<_>>().join(",");
    if let Some(rule) = requested.recorded_rule(names) {
        record.push_str(&rule);
    }
    record
}

fn describe_conflict(c: &Conflict, layers: &[PlannedLayer]) -> String {
    let source = |i: usize| &layers[i].entry.source;
    format!(
        "templates {} and {} both set {}; the later one, {}, wins",
        source(c.lower),
        source(c.higher),
        c.path,
        source(c.higher).key
    )
}

/// The validating webhook for template sources (`POST /validate`): a labelled ConfigMap or
/// PodTemplate whose templates do not parse is refused at apply time, naming each template and
/// its error.
pub fn validate_templates(req: &Request, names: &Names) -> Decision {
    use crate::source::SourceObject;
    use crate::template::SourceKind;
    let mut decision = Decision::unchanged(req);
    let kind = match (req.resource.group.as_str(), req.resource.resource.as_str(), &req.sub_resource) {
        ("", "configmaps", None) => SourceKind::ConfigMap,
        ("", "podtemplates", None) => SourceKind::PodTemplate,
        _ => return decision,
    };
    let Some(raw) = req.object.as_ref() else {
        return decision;
    };
    // parse_review already checked the body; an object that still cannot be read is refused,
    // never waved through unvalidated.
    let object = match serde_json::from_str::<Value>(raw.get()) {
        Ok(object) => object,
        Err(e) => {
            let message = format!("cannot read the {} object: {e}", req.resource.resource);
            return Refusal::new(OnProblem::Deny, 400, "BadRequest", message).apply(decision);
        }
    };
    let labelled = meta_str(&object, "labels", &names.source_label) == Some("true");
    if !labelled || !matches!(req.operation.as_str(), "CREATE" | "UPDATE") {
        return decision;
    }
    let name = object.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or(&req.name);
    let data: BTreeMap<String, String>;
    let source = match kind {
        SourceKind::ConfigMap => {
            let pairs = object.get("data").and_then(Value::as_object).into_iter().flatten();
            data = pairs.map(|(key, text)| (key.clone(), text.as_str().unwrap_or_default().to_owned())).collect();
            SourceObject::ConfigMap(&data)
        }
        SourceKind::PodTemplate => SourceObject::PodTemplate { name, object: &object },
    };
    let errors: Vec<String> = source
        .parse_all()
        .into_iter()
        .filter_map(|(key, parsed)| match kind {
            SourceKind::ConfigMap => parsed.err().map(|e| format!("key {key:?}: {e}")),
            SourceKind::PodTemplate => parsed.err().map(|e| e.to_string()),
        })
        .collect();
    if !errors.is_empty() {
        let what = match kind {
            SourceKind::ConfigMap => "ConfigMap",
            SourceKind::PodTemplate => "PodTemplate",
        };
        let message = format!("template {what} {}/{name} does not parse: {}", decision.namespace, errors.join("; "));
        decision = Refusal::new(OnProblem::Deny, 422, "Invalid", message).apply(decision);
    }
    decision
}

/// Why a pod is not mutated as asked, and what the policy says to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub on: OnProblem,
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl From<BadList> for Refusal {
    fn from(bad: BadList) -> Self {
        Refusal::new(OnProblem::Deny, 400, "BadRequest", bad.to_string())
    }
}

impl Refusal {
    fn new(on: OnProblem, code: u16, reason: &'static str, message: String) -> Self {
        Refusal { on, code, reason, message }
    }

    fn apply(self, mut decision: Decision) -> Decision {
        match self.on {
            OnProblem::Deny => {
                decision.response.allowed = false;
                decision.response.result =
                    Status { code: self.code, reason: self.reason.to_owned(), message: self.message };
                decision.outcome = Outcome::Denied;
            }
            OnProblem::Warn => decision.response.warnings = Some(vec![self.message]),
        }
        decision
    }
}

#[cfg(test)]
mod tests;
