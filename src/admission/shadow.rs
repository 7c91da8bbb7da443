//! Shadow templates (SPEC §10): what each would change if its source were enforced — the
//! difference between the pod merged with it at its place among the layers and without it.
//! Evaluated only for pods that have one; never applied, never denying.

use serde_json::Value;

use super::plan::{describe_conflict, Plan, PlannedLayer, ShadowLayer};
use super::{OnProblem, Policy};
use crate::merge::{compose, differences, merge_pod, Layer};
use crate::store::EntryState;

/// At most this many paths in a warning; `render --explain` lists them all.
const LISTED_PATHS: usize = 10;

/// What one shadow template would do to the pod.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShadowEffect {
    /// `namespace/source/key`, as in the record but without the version.
    pub template: String,
    /// The template name: the metric's label.
    pub key: String,
    pub outcome: ShadowOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShadowOutcome {
    /// The JSON paths of the pod it would change, and the conflicts it would cause (§8).
    Evaluated { paths: Vec<String>, conflicts: Vec<String> },
    /// It never parsed: there is nothing to evaluate.
    Broken(String),
}

impl ShadowEffect {
    /// The metric's `result`.
    pub fn result(&self) -> &'static str {
        match &self.outcome {
            ShadowOutcome::Evaluated { paths, .. } if paths.is_empty() => "no_change",
            ShadowOutcome::Evaluated { .. } => "would_change",
            ShadowOutcome::Broken(_) => "broken",
        }
    }

    /// The `warnings` entries (and `auditAnnotations` text) for this shadow template.
    pub fn messages(&self, policy: &Policy) -> Vec<String> {
        let template = &self.template;
        match &self.outcome {
            ShadowOutcome::Broken(error) => vec![format!("shadow: {template} does not parse: {error}")],
            ShadowOutcome::Evaluated { paths, conflicts } => {
                let mut listed = paths.iter().take(LISTED_PATHS).cloned().collect::<Vec<_>>().join(", ");
                if paths.len() > LISTED_PATHS {
                    listed.push_str(", …");
                }
                let n = paths.len();
                let mut messages = vec![match n {
                    0 => format!("shadow: {template} would change 0 fields"),
                    _ => format!("shadow: {template} would change {n} fields: {listed}"),
                }];
                let deny = if policy.on_conflict == OnProblem::Deny {
                    " (--on-conflict deny: the pod would be denied)"
                } else {
                    ""
                };
                messages.extend(conflicts.iter().map(|c| format!("shadow: {template} would conflict: {c}{deny}")));
                messages
            }
        }
    }
}

/// What each shadow template of `plan` would change on `pod`, in the plan's order.
pub fn shadow_effects(pod: &Value, plan: &Plan) -> Vec<ShadowEffect> {
    if plan.shadows.is_empty() {
        return Vec::new();
    }
    let layers: Vec<Layer<'_>> = plan.layers.iter().map(PlannedLayer::layer).collect();
    let without = merge_pod(pod, &compose(&layers).template).pod;
    plan.shadows.iter().map(|shadow| effect(pod, &without, plan, shadow)).collect()
}

fn effect(pod: &Value, without: &Value, plan: &Plan, shadow: &ShadowLayer) -> ShadowEffect {
    let source = &shadow.entry.source;
    let (template, key) = (source.location(), source.key.clone());
    let served = match &shadow.entry.state {
        EntryState::Ready(t) | EntryState::Stale { template: t, .. } => t.clone(),
        EntryState::Broken(error) => {
            let error = format!("{}: {error}", source.describe());
            return ShadowEffect { template, key, outcome: ShadowOutcome::Broken(error) };
        }
    };
    let mut with = plan.layers.clone();
    let layer = PlannedLayer { role: shadow.role, entry: shadow.entry.clone(), template: served };
    if shadow.replaces {
        with[shadow.at] = layer;
    } else {
        with.insert(shadow.at, layer);
    }
    let layers: Vec<Layer<'_>> = with.iter().map(PlannedLayer::layer).collect();
    let composition = compose(&layers);
    let merged = merge_pod(pod, &composition.template).pod;
    let paths = differences(without, &merged);
    let conflicts = composition
        .conflicts
        .iter()
        .filter(|c| c.lower == shadow.at || c.higher == shadow.at)
        .map(|c| describe_conflict(c, &with))
        .collect();
    ShadowEffect { template, key, outcome: ShadowOutcome::Evaluated { paths, conflicts } }
}
