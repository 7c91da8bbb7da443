//! A pod as the webhook would leave it, without a cluster: the one function behind `render`,
//! `test` and `explain` (SPEC §6, §10). It asks [`admission::mutate`] exactly as `serve` does
//! and applies the answer's patch, so a preview can never disagree with an admission.

use serde_json::{json, Value};

use crate::admission::{self, BadReview, Decision, Outcome, Policy, Requested, ShadowEffect, ShadowOutcome};
use crate::environment::BadList;
use crate::store::TemplateStore;

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("expected a manifest of kind Pod")]
    NotAPod,
    #[error(transparent)]
    Review(#[from] BadReview),
    #[error(transparent)]
    BadList(#[from] BadList),
    /// A bug of ours: the webhook's own patch does not apply to the pod it was computed for.
    #[error("the patch does not apply to the pod: {0}")]
    Patch(String),
}

/// What the webhook would answer for a pod, and the pod after it.
#[derive(Debug)]
pub struct Preview {
    /// The pod as given.
    pub original: Value,
    /// Its namespace: its own, else the one it was previewed in.
    pub namespace: String,
    /// The pod with the answer's patch applied (the original when denied or unchanged).
    pub pod: Value,
    pub decision: Decision,
}

impl Preview {
    pub fn denied(&self) -> bool {
        matches!(self.decision.outcome, Outcome::Denied | Outcome::Error)
    }

    pub fn warnings(&self) -> &[String] {
        self.decision.response.warnings.as_deref().unwrap_or_default()
    }
}

fn pod_namespace<'a>(pod: &'a Value, namespace: &'a str) -> &'a str {
    pod.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or(namespace)
}

/// `pod` (a manifest of kind Pod, or a pod as the API server holds it) created in `namespace`
/// unless it names its own: what the webhook would answer and the pod it would leave.
pub fn preview(
    pod: &Value,
    namespace: &str,
    store: &dyn TemplateStore,
    policy: &Policy,
) -> Result<Preview, PreviewError> {
    if pod.get("kind").and_then(Value::as_str) != Some("Pod") {
        return Err(PreviewError::NotAPod);
    }
    let namespace = pod_namespace(pod, namespace).to_owned();
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "preview", "operation": "CREATE", "namespace": namespace,
            "name": pod.pointer("/metadata/name").cloned().unwrap_or_default(),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {}, "object": pod,
        }
    });
    let body = serde_json::to_vec(&review).expect("a JSON value serializes");
    let decision = admission::mutate(admission::parse_review(&body)?, store, policy)?;
    let mut mutated = pod.clone();
    if let Some(patch) = &decision.response.patch {
        let patch: json_patch::Patch = serde_json::from_slice(patch).map_err(|e| PreviewError::Patch(e.to_string()))?;
        json_patch::patch(&mut mutated, &patch).map_err(|e| PreviewError::Patch(e.to_string()))?;
    }
    Ok(Preview { original: pod.clone(), namespace, pod: mutated, decision })
}

/// Where every change of a preview came from (SPEC §8 "Seeing it", §10): for `render
/// --explain` (as YAML comments) and `explain` (as data).
#[derive(Debug, Clone, Default)]
pub struct Explained {
    /// Which rule chose the templates, in words.
    pub rule: String,
    /// The plan's refusal: nothing else is known then.
    pub denied: Option<String>,
    /// Some template applies to the pod (it may already have all it sets).
    pub applies: bool,
    /// Every JSON path the webhook changes and the layer that set it (or the webhook itself, for
    /// the record), in the merged pod's order.
    pub changes: Vec<(String, String)>,
    /// What each shadow template would change.
    pub shadows: Vec<ShadowEffect>,
}

/// Where every change of `preview` came from: the rule, the layer behind each path, the shadows.
pub fn explain(preview: &Preview, store: &dyn TemplateStore, policy: &Policy) -> Result<Explained, PreviewError> {
    let names = &policy.names;
    let requested = Requested::from_pod(&preview.original, names)?;
    let rule = match &requested {
        Requested::Nothing => "no template named by the pod (annotation, label or task-name)".to_owned(),
        Requested::Annotation(list) => format!("templates from {}: {}", requested.rule(names), list.join(", ")),
        _ => format!("environment from {}: {}", requested.rule(names), requested.names().join(", ")),
    };
    let plan = match admission::plan(&preview.namespace, &requested, store, policy) {
        Ok(plan) => plan,
        Err(refusal) => return Ok(Explained { rule, denied: Some(refusal.message), ..Explained::default() }),
    };
    let layers: Vec<_> = plan.layers.iter().map(admission::PlannedLayer::layer).collect();
    let (merged, changes) = crate::merge::explain(&preview.original, &layers);
    let mut changes: Vec<(String, String)> =
        changes.into_iter().map(|c| (c.path, plan.layers[c.layer].describe(&names.platform_namespace))).collect();
    let record = format!("/metadata/annotations/{}", names.applied_annotation.replace('~', "~0").replace('/', "~1"));
    if preview.pod.pointer(&record).is_some() && merged.pointer(&record) != preview.pod.pointer(&record) {
        changes.push((record, "the webhook: the record of the layers applied".to_owned()));
    }
    let shadows = admission::shadow_effects(&preview.original, &plan);
    Ok(Explained { rule, denied: None, applies: !plan.layers.is_empty(), changes, shadows })
}

impl Explained {
    /// `render --explain`: the same as YAML comments, after the pod.
    pub fn to_comments(&self) -> String {
        let mut out = format!("# --explain: JSON path changed <- the layer that set it\n# {}\n", self.rule);
        if let Some(denied) = &self.denied {
            out.push_str(&format!("# denied: {denied}\n"));
            return out;
        }
        if !self.applies {
            out.push_str("# (no template applies to this pod)\n");
        }
        let width = self.changes.iter().map(|(path, _)| path.len()).max().unwrap_or(0);
        for (path, by) in &self.changes {
            out.push_str(&format!("# {path:width$}  <- {by}\n"));
        }
        for effect in &self.shadows {
            let template = &effect.template;
            match &effect.outcome {
                ShadowOutcome::Broken(error) => out.push_str(&format!("# shadow {template} (not applied): {error}\n")),
                ShadowOutcome::Evaluated { paths, conflicts } => {
                    out.push_str(&format!("# shadow {template} (not applied) would change {} fields\n", paths.len()));
                    for path in paths {
                        out.push_str(&format!("#   {path}\n"));
                    }
                    for conflict in conflicts {
                        out.push_str(&format!("#   would conflict: {conflict}\n"));
                    }
                }
            }
        }
        out
    }
}
