//! AdmissionReview in, AdmissionResponse out (SPEC §5): resolves the template, merges, and
//! answers with the JSON Patch between the pod as sent and the merged pod. No HTTP here.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::Value;

use crate::doc::{Document, Node};
use crate::environment::BadList;
pub use crate::environment::Requested;
use crate::merge::{compose, merge, Composition, Layer};
use crate::names::Names;
use crate::store::{TemplateIndex, TemplateStore};

mod plan;
mod review;
mod shadow;
mod validate;
use plan::describe_conflict;
pub use plan::{applied_record, plan, AppliedRecord, Plan, PlannedLayer, ShadowLayer};
pub use review::{parse_review, response_body, BadReview, Decision, GroupVersionResource, Request, Response, Status};
pub use shadow::{shadow_effects, ShadowEffect, ShadowOutcome};
pub use validate::validate_templates;

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

/// Decides one admission request: resolve the template names → look them up → merge → respond.
pub fn mutate(req: Request, store: &dyn TemplateStore, policy: &Policy) -> Result<Decision, BadReview> {
    let mut decision = Decision::unchanged(&req);
    let is_pod = req.resource.group.is_empty() && req.resource.resource == "pods" && req.sub_resource.is_none();
    if !is_pod || req.operation != "CREATE" {
        return Ok(decision);
    }
    let raw = req.object.as_deref().ok_or(BadReview::NoObject)?;
    let document = match req.object_pairs {
        Some(pairs) => Document::with_pairs(raw, pairs),
        None => Document::new(raw),
    };
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
    // Every lookup of this admission in one index (see TemplateStore::snapshot).
    let snapshot = store.snapshot();
    let plan = match plan::plan_found(&decision.namespace, &requested, &*snapshot, policy, &mut decision.found) {
        Ok(plan) => plan,
        Err(refusal) => return Ok(refusal.apply(decision)),
    };
    // Only pods with a shadow template pay for reading the pod into a tree.
    let shadows = match plan.shadows.is_empty() {
        true => Vec::new(),
        false => shadow_effects(&serde_json::from_str(raw.get()).map_err(BadReview::Json)?, &plan),
    };
    let mut decision = if plan.layers.is_empty() {
        decision.response.warnings = Some(plan.warnings).filter(|w| !w.is_empty());
        decision
    } else {
        apply(decision, &document, pod, plan, &snapshot, &requested, policy)
    };
    if !shadows.is_empty() {
        let messages: Vec<String> = shadows.iter().flat_map(|s| s.messages(policy)).collect();
        decision.response.audit_annotations.insert("shadow".to_owned(), messages.join("; "));
        decision.response.warnings.get_or_insert_with(Vec::new).extend(messages);
        decision.shadows = shadows;
    }
    Ok(decision)
}

/// Merges the planned layers into `pod` (the root of `document`) and answers with the patch, the
/// record and the warnings; or refuses on a conflict (`--on-conflict deny`) or a bug of ours.
fn apply(
    mut decision: Decision,
    document: &Document<'_>,
    pod: Node<'_>,
    plan: Plan,
    index: &TemplateIndex,
    requested: &Requested,
    policy: &Policy,
) -> Decision {
    // Moved into a binding whose lifetime ends here (Node is covariant): the templates merged in
    // below are this function's locals.
    let mut pod: Node<'_> = pod;
    let mut warnings = plan.warnings;
    let layers: Vec<Layer<'_>> = plan.layers.iter().map(PlannedLayer::layer).collect();
    // One template is merged as it is; several are composed once per index version.
    let (single, cached);
    let composition: &Composition<'_> = if layers.len() == 1 {
        single = compose(&layers);
        &single
    } else {
        cached = index.composed(&layers);
        &cached
    };
    if !composition.conflicts.is_empty() {
        let described = composition.conflicts.iter().map(|c| describe_conflict(c, &plan.layers));
        match policy.on_conflict {
            OnProblem::Warn => warnings.extend(described),
            OnProblem::Deny => {
                let message = format!("pod templates conflict: {}", described.collect::<Vec<_>>().join("; "));
                return Refusal::new(OnProblem::Deny, 409, "Conflict", message).apply(decision);
            }
        }
    }
    warnings.extend(merge(&mut pod, &composition.template));
    let applied = applied_record(&plan.layers, requested, &policy.names);
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
            return refused;
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
