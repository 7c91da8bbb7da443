//! `explain` (SPEC §10): why was, or wasn't, this pod changed. From the live cluster: whether the
//! webhook's MutatingWebhookConfigurations would send the pod at all ([`webhook`]), which rule
//! chose which templates and where each was found, the patch it would get now with the layer
//! behind each path (as `render --explain`), and the pod's applied record next to the one it would
//! get now. Nothing is decided here: the answers come from `admission` and `preview`, the same
//! code `serve` runs.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde::Serialize;
use serde_json::Value;

use crate::admission::{self, Policy, Requested};
use crate::merge::Role;
use crate::preview::{self, PreviewError};
use crate::store::{EntryState, TemplateStore};
use crate::template::SourceKind;

pub mod webhook;

/// The label the chart puts on everything it installs (`_helpers.tpl` `ptw.labels`), fixed
/// whatever `nameOverride` is: how the webhook's configurations are found.
pub const DEFAULT_CONFIGURATION_SELECTOR: &str = "app.kubernetes.io/part-of=pod-template-webhook";

/// The label the API server sets on every namespace: all a pod's namespace is known by when the
/// namespace cannot be read.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("pod {namespace}/{name} not found")]
    PodNotFound { namespace: String, name: String },
    #[error("cannot read {what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Preview(#[from] PreviewError),
}

/// The pod to explain.
#[derive(Debug, Clone)]
pub enum Target {
    /// A pod of the cluster, by name.
    Live(String),
    /// A pod manifest not (necessarily) created yet.
    File(Value),
}

/// How the webhook's configurations are found: by name, else by label selector.
#[derive(Debug, Clone)]
pub struct Discovery {
    pub names: Vec<String>,
    pub selector: String,
}

/// What `explain` reads from the cluster, apart from the templates.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The pod as stored (live) or as given (file).
    pub pod: Value,
    pub live: bool,
    pub namespace: String,
    pub namespace_labels: BTreeMap<String, String>,
    /// Why the namespace's labels are incomplete, or configurations asked for by name are absent.
    pub notes: Vec<String>,
    /// How the configurations were found, in words.
    pub discovery: String,
    pub configurations: Vec<MutatingWebhookConfiguration>,
}

fn kube_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ExplainError {
    let what = what.into();
    move |source| ExplainError::Kube { what, source }
}

/// Reads the pod (for [`Target::Live`]), its namespace's labels and the webhook's configurations.
/// A file's pod is in its own namespace when it names one, else in `namespace`.
pub async fn gather(
    client: &Client,
    namespace: &str,
    target: Target,
    discovery: &Discovery,
) -> Result<Inputs, ExplainError> {
    let (mut pod, live) = match target {
        Target::Live(name) => {
            let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
            let found = pods.get_opt(&name).await.map_err(kube_error(format!("pod {namespace}/{name}")))?;
            let pod = found.ok_or_else(|| ExplainError::PodNotFound { namespace: namespace.into(), name })?;
            (serde_json::to_value(pod).expect("a Pod serializes"), true)
        }
        Target::File(pod) => (pod, false),
    };
    // Bookkeeping of the API server's, never looked at by the webhook: kept out of the output.
    if let Some(meta) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    let namespace = pod.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or(namespace).to_owned();
    let mut notes = Vec::new();
    let namespace_labels = match Api::<Namespace>::all(client.clone()).get_opt(&namespace).await {
        Ok(Some(ns)) => ns.labels().clone(),
        Ok(None) => only_name_label(&namespace, "does not exist", &mut notes),
        Err(kube::Error::Api(status)) if status.code == 403 => {
            only_name_label(&namespace, "cannot be read (forbidden)", &mut notes)
        }
        Err(e) => return Err(kube_error(format!("namespace {namespace}"))(e)),
    };
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let (configurations, how) = if discovery.names.is_empty() {
        let list = api.list(&ListParams::default().labels(&discovery.selector)).await;
        let what = format!("MutatingWebhookConfigurations labelled {}", discovery.selector);
        (list.map_err(kube_error(what))?.items, format!("labelled {}", discovery.selector))
    } else {
        let mut found = Vec::new();
        for name in &discovery.names {
            match api.get_opt(name).await.map_err(kube_error(format!("MutatingWebhookConfiguration {name}")))? {
                Some(c) => found.push(c),
                None => notes.push(format!("MutatingWebhookConfiguration {name} does not exist")),
            }
        }
        (found, format!("named {}", discovery.names.join(", ")))
    };
    Ok(Inputs { pod, live, namespace, namespace_labels, notes, discovery: how, configurations })
}

fn only_name_label(namespace: &str, why: &str, notes: &mut Vec<String>) -> BTreeMap<String, String> {
    notes.push(format!(
        "namespace {namespace} {why}: its selectors are evaluated with only the label {NAMESPACE_NAME_LABEL}, which the API server sets on every namespace"
    ));
    BTreeMap::from([(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned())])
}

/// The answer, for text and JSON output.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pod: String,
    pub namespace: String,
    /// `live` (read from the cluster) or `file` (as given).
    pub from: &'static str,
    pub namespace_labels: BTreeMap<String, String>,
    pub notes: Vec<String>,
    pub discovery: String,
    pub configurations: Vec<ConfigurationReport>,
    /// Some entry of some configuration sends the pod.
    pub sent: bool,
    /// The rule that chose the templates (`label flyte.org/environment`, `task-name ml.train`).
    pub rule: String,
    pub templates: Vec<String>,
    pub layers: Vec<LayerReport>,
    /// Templates named or configured that apply nothing, and why.
    pub not_applied: Vec<String>,
    pub denied: Option<String>,
    pub warnings: Vec<String>,
    pub patch_operations: usize,
    /// Every path the patch changes and the layer that set it.
    pub patch: Vec<PatchPath>,
    /// What each shadow template (§10) would change: never applied.
    pub shadows: Vec<admission::ShadowEffect>,
    /// What `render --explain` prints for the pod, verbatim.
    pub explanation: String,
    pub record: RecordReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigurationReport {
    pub name: String,
    pub webhooks: Vec<EntryReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EntryReport {
    pub name: String,
    #[serde(flatten)]
    pub verdict: webhook::Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// `platform default`, `namespace default` or `template`.
    pub role: String,
    pub name: String,
    /// `namespace/object/key@version` as in the applied record.
    pub source: String,
    /// `ConfigMap` or `PodTemplate`.
    pub kind: &'static str,
    /// `ConfigMap ns/cm key "k"`, `PodTemplate ns/name`.
    pub object: String,
    pub version: String,
    /// The namespaces searched for it, in order.
    pub searched: Vec<String>,
    /// `ready`, or why the last good version serves.
    pub state: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PatchPath {
    pub path: String,
    pub layer: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecordReport {
    /// The pod's applied record (annotation), if it has one.
    pub applied: Option<String>,
    /// The record the webhook would write now.
    pub now: Option<String>,
    /// `current`, `outdated`, `missed` (no record, yet templates apply), `untouched` (nothing
    /// applies), `new` (a pod from a file that templates apply to), `denied`, or `not sent`.
    pub state: &'static str,
    /// What differs, as `audit` says it.
    pub reason: String,
}

/// Explains `inputs.pod` against `store` as `serve` with `policy` would see it.
pub fn report(inputs: &Inputs, store: &dyn TemplateStore, policy: &Policy) -> Result<Report, ExplainError> {
    let names = &policy.names;
    let pod = &inputs.pod;
    let meta_map = |field: &str| -> BTreeMap<String, String> {
        let map = pod.get("metadata").and_then(|m| m.get(field)).and_then(Value::as_object);
        map.into_iter().flatten().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect()
    };
    let pod_labels = meta_map("labels");
    let configurations: Vec<ConfigurationReport> = inputs
        .configurations
        .iter()
        .map(|c| ConfigurationReport {
            name: c.name_any(),
            webhooks: c
                .webhooks
                .iter()
                .flatten()
                .map(|w| EntryReport {
                    name: w.name.clone(),
                    verdict: webhook::evaluate(w, &pod_labels, &inputs.namespace_labels),
                })
                .collect(),
        })
        .collect();
    let sent = configurations.iter().flat_map(|c| &c.webhooks).any(|w| w.verdict.sent);
    let name = ["name", "generateName"].iter().find_map(|f| pod.pointer(&format!("/metadata/{f}"))?.as_str());
    let mut report = Report {
        pod: name.unwrap_or("(unnamed)").to_owned(),
        namespace: inputs.namespace.clone(),
        from: if inputs.live { "live" } else { "file" },
        namespace_labels: inputs.namespace_labels.clone(),
        notes: inputs.notes.clone(),
        discovery: inputs.discovery.clone(),
        configurations,
        sent,
        rule: String::new(),
        templates: Vec::new(),
        layers: Vec::new(),
        not_applied: Vec::new(),
        denied: None,
        warnings: Vec::new(),
        patch_operations: 0,
        patch: Vec::new(),
        shadows: Vec::new(),
        explanation: String::new(),
        record: RecordReport {
            applied: meta_map("annotations").remove(&names.applied_annotation),
            now: None,
            state: "",
            reason: String::new(),
        },
    };
    let preview = preview::preview(pod, &inputs.namespace, store, policy)?;
    report.warnings = preview.warnings().to_vec();
    report.patch_operations = preview.decision.patch_operations;
    if preview.denied() {
        report.denied = Some(preview.decision.response.result.message.clone());
    }
    let requested = match Requested::from_pod(pod, names) {
        Ok(requested) => requested,
        Err(bad) => {
            report.record.state = "denied";
            report.rule = bad.to_string();
            return Ok(report);
        }
    };
    report.rule = requested.rule(names);
    report.templates = requested.names().to_vec();
    let explained = preview::explain(&preview, store, policy)?;
    report.explanation = explained.to_comments();
    report.patch =
        explained.changes.iter().map(|(path, layer)| PatchPath { path: path.clone(), layer: layer.clone() }).collect();
    report.shadows = explained.shadows;
    let plan = match admission::plan(&inputs.namespace, &requested, store, policy) {
        Ok(plan) => plan,
        Err(_) => {
            report.record.state = if sent { "denied" } else { "not sent" };
            return Ok(report);
        }
    };
    for layer in &plan.layers {
        report.layers.push(layer_report(layer, &inputs.namespace, store, policy));
    }
    report.not_applied = not_applied(&plan.layers, &requested, &inputs.namespace, store, policy);
    if !plan.layers.is_empty() {
        report.record.now = Some(admission::applied_record(&plan.layers, &requested, names));
    }
    // A live pod is classified exactly as `audit` classifies it.
    let classified = match inputs.live {
        true => {
            let mut meta: ObjectMeta = serde_json::from_value(pod["metadata"].clone()).unwrap_or_default();
            meta.namespace.get_or_insert_with(|| inputs.namespace.clone());
            Some(crate::audit::classify(&meta, store, policy))
        }
        false => None,
    };
    report.record.state = match &classified {
        _ if !sent => "not sent",
        _ if report.denied.is_some() => "denied",
        Some(c) => c.class.as_str(),
        None if report.record.now.is_some() => "new",
        None => "untouched",
    };
    report.record.reason = classified.map(|c| c.reason).unwrap_or_default();
    Ok(report)
}

fn layer_report(
    layer: &admission::PlannedLayer,
    namespace: &str,
    store: &dyn TemplateStore,
    policy: &Policy,
) -> LayerReport {
    let source = &layer.entry.source;
    let platform = policy.names.platform_namespace.as_str();
    // The lookup the plan made for this layer, asked again for the namespaces it searched.
    let looked_in = match layer.role {
        Role::Default if source.namespace == platform => platform,
        _ => namespace,
    };
    let described = layer.describe(platform);
    let role = described.strip_suffix(&format!(" {source}")).unwrap_or(&described).to_owned();
    let state = match &layer.entry.state {
        EntryState::Stale { error, broken_version, .. } => {
            format!("stale: version {broken_version} does not parse ({error}); its last good version serves")
        }
        _ => "ready".to_owned(),
    };
    LayerReport {
        role,
        name: source.key.clone(),
        source: source.to_string(),
        kind: match source.kind {
            SourceKind::ConfigMap => "ConfigMap",
            SourceKind::PodTemplate => "PodTemplate",
        },
        object: source.describe(),
        version: source.version.clone(),
        searched: store.lookup(looked_in, &source.key).searched,
        state,
    }
}

/// The templates a pod names, and the default, that give it no layer: missing, or skipped by
/// policy (the plan's warnings say why).
fn not_applied(
    layers: &[admission::PlannedLayer],
    requested: &Requested,
    namespace: &str,
    store: &dyn TemplateStore,
    policy: &Policy,
) -> Vec<String> {
    let mut out = Vec::new();
    let has = |role: Role, name: &str| layers.iter().any(|l| l.role == role && l.entry.source.key == name);
    if let Some(default) = &policy.default_template {
        if !has(Role::Default, default) {
            let platform = &policy.names.platform_namespace;
            out.push(format!(
                "default template {default:?} (--default-template): none in the platform namespace {platform} nor in {namespace}"
            ));
        }
    }
    for name in requested.names() {
        if has(Role::Named, name) {
            continue;
        }
        let lookup = store.lookup(namespace, name);
        out.push(match lookup.entry {
            None => format!("template {name:?}: not found in namespaces {:?}", lookup.searched),
            Some(entry) => format!("template {name:?}: {} is not applied (see the warnings)", entry.source.describe()),
        });
    }
    out
}

impl Report {
    /// The report in sections: `Pod`, `Webhook configuration`, `Templates`, `Patch`, `Record`.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!("Pod {}/{} ({})", self.namespace, self.pod, self.from));
        let labels: Vec<String> = self.namespace_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line(format!("  namespace labels: {}", labels.join(", ")));
        for note in &self.notes {
            line(format!("  note: {note}"));
        }
        line(String::new());
        line("Webhook configuration".into());
        if self.configurations.is_empty() {
            line(format!(
                "  no MutatingWebhookConfiguration {}: the API server sends this pod to no pod-template-webhook, it would not be mutated at all",
                self.discovery
            ));
        }
        for c in &self.configurations {
            line(format!("  {} ({})", c.name, self.discovery));
            for w in &c.webhooks {
                match w.verdict.excluded_by.as_slice() {
                    [] => line(format!("    {}: sent", w.name)),
                    [first, rest @ ..] => {
                        line(format!("    {}: not sent: {first}", w.name));
                        for r in rest {
                            line(format!("      also {r}"));
                        }
                    }
                }
                for c in &w.verdict.match_conditions {
                    line(format!("      matchCondition (CEL, not evaluated here: it decides too) {c}"));
                }
            }
        }
        if !self.configurations.is_empty() {
            let sent =
                if self.sent { "sent to the webhook" } else { "not sent to the webhook by any entry: not mutated" };
            line(format!("  => {sent}"));
        }
        line(String::new());
        line(if self.sent { "Templates".into() } else { "Templates (if it were sent)".into() });
        line(format!("  rule: {}", self.rule));
        if !self.templates.is_empty() {
            line(format!("  templates named: {}", self.templates.join(", ")));
        }
        for l in &self.layers {
            line(format!("  {} {:?}: {} ({})", l.role, l.name, l.object, l.source));
            line(format!("    version {}, namespaces searched {}, {}", l.version, l.searched.join(" → "), l.state));
        }
        for s in &self.shadows {
            let what = match &s.outcome {
                admission::ShadowOutcome::Evaluated { paths, .. } => format!("would change {}", paths.join(", ")),
                admission::ShadowOutcome::Broken(error) => error.clone(),
            };
            line(format!("  shadow {:?}: {} (never applied): {}: {what}", s.key, s.template, s.result()));
        }
        for n in &self.not_applied {
            line(format!("  {n}"));
        }
        if let Some(denied) = &self.denied {
            line(format!("  denied: {denied}"));
        }
        for w in &self.warnings {
            line(format!("  warning: {w}"));
        }
        line(String::new());
        let on = if self.from == "live" { "the pod as stored" } else { "the pod as given" };
        line(format!("Patch (what the webhook would change now on {on}: {} operation(s))", self.patch_operations));
        if self.patch.is_empty() {
            line("  nothing".into());
        }
        let width = self.patch.iter().map(|p| p.path.len()).max().unwrap_or(0);
        for p in &self.patch {
            line(format!("  {:width$}  <- {}", p.path, p.layer));
        }
        line(String::new());
        line("Record".into());
        line(format!("  applied: {}", self.record.applied.as_deref().unwrap_or("(none)")));
        line(format!("  now:     {}", self.record.now.as_deref().unwrap_or("(none)")));
        match self.record.reason.as_str() {
            "" => line(format!("  => {}", self.record.state)),
            reason => line(format!("  => {}: {reason}", self.record.state)),
        }
        out
    }
}

#[cfg(test)]
mod tests;
