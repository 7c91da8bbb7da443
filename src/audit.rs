//! `pod-template-webhook audit` (SPEC §10): which running pods are out of date. Read-only: the
//! templates are read once ([`cluster::load_once`]), the pods the webhook selects (§9) are listed
//! in pages, and each pod's applied record is compared with the record `serve` would write for it
//! now ([`Requested`] → [`admission::plan`] → [`admission::applied_record`]: no lookup of our own).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams};
use kube::Client;
use serde::Serialize;

use crate::admission::{self, AppliedRecord, Policy, Requested};
use crate::names::Names;
use crate::store::cluster;
use crate::store::TemplateStore;

/// How a pod stands against what the webhook would apply now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// The record names the layers, at the versions, that would be applied now.
    Current,
    /// The record differs: a version changed, a layer was added or removed, or the pod would be
    /// denied now.
    Outdated,
    /// No record, yet templates apply now: created while the webhook was off or failing open.
    Missed,
    /// No record and nothing applies.
    Untouched,
}

impl Class {
    pub const ALL: [Class; 4] = [Class::Current, Class::Outdated, Class::Missed, Class::Untouched];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Current => "current",
            Class::Outdated => "outdated",
            Class::Missed => "missed",
            Class::Untouched => "untouched",
        }
    }
}

/// One pod's class and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Classified {
    pub class: Class,
    /// The layers of the pod's applied record (`ns/source/key@version`); `None`: no record.
    pub recorded: Option<Vec<String>>,
    /// The layers `serve` would record now; empty when nothing applies or the pod would be denied.
    pub now: Vec<String>,
    /// A short reason; empty for a current pod.
    pub reason: String,
}

/// `ns/source/key` of a recorded layer, without its version.
fn identity(layer: &str) -> &str {
    layer.rsplit_once('@').map_or(layer, |(id, _)| id)
}

/// Classifies a pod by its metadata (labels, annotations, namespace: `&pod.metadata` of a `Pod`,
/// or a metadata-only list item) against `store` and `policy`,
/// exactly as `serve` would record it if the pod were created now.
pub fn classify(meta: &ObjectMeta, store: &dyn TemplateStore, policy: &Policy) -> Classified {
    let names = &policy.names;
    let namespace = meta.namespace.as_deref().unwrap_or("default");
    let record = meta.annotations.as_ref().and_then(|a| a.get(&names.applied_annotation)).filter(|r| !r.is_empty());
    let now = would_record(meta, namespace, store, policy);
    let now_layers = |now: Option<&str>| -> Vec<String> {
        AppliedRecord::parse(now.unwrap_or_default()).layers.into_iter().map(str::to_owned).collect()
    };
    let Some(record) = record else {
        return match now {
            Ok(Some(now)) => {
                let layers = now_layers(Some(&now));
                let reason = format!("no record; would apply {}", layers.join(", "));
                Classified { class: Class::Missed, recorded: None, now: layers, reason }
            }
            Ok(None) => {
                let reason = match requested(meta, names) {
                    Ok(Requested::Nothing) | Err(_) => "the pod names no template".to_owned(),
                    Ok(requested) => {
                        format!("no template {:?} ({})", requested.names().join(","), requested.rule(names))
                    }
                };
                Classified { class: Class::Untouched, recorded: None, now: vec![], reason }
            }
            // It would not be created now; there is nothing to bring up to date.
            Err(denied) => Classified {
                class: Class::Untouched,
                recorded: None,
                now: vec![],
                reason: format!("would be denied now: {denied}"),
            },
        };
    };
    let recorded = AppliedRecord::parse(record);
    let recorded_layers: Vec<String> = recorded.layers.iter().map(|l| (*l).to_owned()).collect();
    let (class, now, reason) = match now {
        Ok(Some(now)) if now == *record => (Class::Current, now_layers(Some(&now)), String::new()),
        Ok(now) => {
            let reason = differences(&recorded, &AppliedRecord::parse(now.as_deref().unwrap_or_default()));
            (Class::Outdated, now_layers(now.as_deref()), reason)
        }
        Err(denied) => (Class::Outdated, vec![], format!("would be denied now: {denied}")),
    };
    Classified { class, recorded: Some(recorded_layers), now, reason }
}

/// The record `serve` would write on this pod now: `Ok(None)` when no layer applies (no record is
/// written), `Err` with the denial message when the pod would be refused.
fn would_record(
    meta: &ObjectMeta,
    namespace: &str,
    store: &dyn TemplateStore,
    policy: &Policy,
) -> Result<Option<String>, String> {
    let requested = requested(meta, &policy.names).map_err(|e| e.to_string())?;
    let plan = admission::plan(namespace, &requested, store, policy).map_err(|refusal| refusal.message)?;
    Ok(Some(admission::applied_record(&plan.layers, &requested, &policy.names)).filter(|_| !plan.layers.is_empty()))
}

/// What changed between a recorded and a current record, layer by layer.
fn differences(recorded: &AppliedRecord<'_>, now: &AppliedRecord<'_>) -> String {
    let mut out = Vec::new();
    for layer in &recorded.layers {
        match now.layers.iter().find(|n| identity(n) == identity(layer)) {
            Some(n) if n != layer => out.push(format!("{} changed: {layer} -> {n}", identity(layer))),
            Some(_) => {}
            None => out.push(format!("layer removed: {layer}")),
        }
    }
    for layer in now.layers.iter().filter(|n| !recorded.layers.iter().any(|l| identity(l) == identity(n))) {
        out.push(format!("layer added: {layer}"));
    }
    if out.is_empty() && recorded.layers != now.layers {
        out.push("layer order changed".to_owned());
    }
    if recorded.rule != now.rule {
        let rule = |r: &str| if r.is_empty() { "none".to_owned() } else { format!("{:?}", r.trim_start_matches("; ")) };
        out.push(format!("rule changed: {} -> {}", rule(recorded.rule), rule(now.rule)));
    }
    out.join("; ")
}

/// [`Requested::read`] from a pod's metadata (a metadata-only list has no more).
fn requested(meta: &ObjectMeta, names: &Names) -> Result<Requested, crate::environment::BadList> {
    let get = |field: &str, key: &str| {
        let map = match field {
            "labels" => meta.labels.as_ref(),
            "annotations" => meta.annotations.as_ref(),
            _ => None,
        };
        map?.get(key).cloned()
    };
    Requested::read(get, names)
}

/// Where to list pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Namespace(String),
    AllNamespaces,
}

/// The label selectors of the pods the webhook selects (SPEC §9), like the chart's webhook
/// entries: the environment label; and, unless the task-name rule is off, managed pods with a
/// task-name label and without the environment label (exclusive: no pod is listed twice).
pub fn selectors(names: &Names) -> Vec<String> {
    let mut out = vec![names.environment_label.clone()];
    if !names.task_name_label.is_empty() {
        out.push(format!(
            "!{},{}={},{}",
            names.environment_label, names.managed_label, names.managed_value, names.task_name_label
        ));
    }
    out
}

/// Only pods that may still run: Pending and Running (and Unknown, which a field selector cannot
/// tell from Running without listing it).
pub const FIELD_SELECTOR: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// One pod in the report.
#[derive(Debug, Clone, Serialize)]
pub struct PodAudit {
    pub namespace: String,
    pub name: String,
    #[serde(flatten)]
    pub classified: Classified,
}

/// The LIST calls made for one label selector.
#[derive(Debug, Clone, Serialize)]
pub struct SelectorStats {
    pub selector: String,
    /// LIST requests (pages) made for it; every page is one request.
    pub pages: usize,
    pub pods: usize,
}

/// What `audit` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub pods: Vec<PodAudit>,
    pub selectors: Vec<SelectorStats>,
    /// Wall time of the run: templates, listing and classification.
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot read the templates: {0}")]
    Templates(#[source] kube::Error),
    #[error("cannot list pods ({selector}): {source}")]
    List { selector: String, source: kube::Error },
}

/// Reads the templates once, lists the selected pods in pages of `page_size` and classifies each.
pub async fn audit(
    client: &Client,
    watch_namespaces: &[String],
    policy: &Policy,
    scope: &Scope,
    page_size: u32,
) -> Result<Report, AuditError> {
    let started = Instant::now();
    let store = cluster::load_once(client, &policy.names, watch_namespaces).await.map_err(AuditError::Templates)?;
    let api: Api<Pod> = match scope {
        Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
        Scope::AllNamespaces => Api::all(client.clone()),
    };
    let mut report = Report::default();
    for selector in selectors(&policy.names) {
        let mut stats = SelectorStats { selector: selector.clone(), pages: 0, pods: 0 };
        let mut params = ListParams::default().labels(&selector).fields(FIELD_SELECTOR).limit(page_size);
        loop {
            // Metadata only: labels and annotations are all a classification reads.
            let page = api
                .list_metadata(&params)
                .await
                .map_err(|source| AuditError::List { selector: selector.clone(), source })?;
            stats.pages += 1;
            stats.pods += page.items.len();
            for pod in &page.items {
                let meta = &pod.metadata;
                report.pods.push(PodAudit {
                    namespace: meta.namespace.clone().unwrap_or_default(),
                    name: meta.name.clone().unwrap_or_default(),
                    classified: classify(meta, &store, policy),
                });
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        report.selectors.push(stats);
    }
    report.pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

impl Report {
    /// Every LIST request made for pods.
    pub fn list_calls(&self) -> usize {
        self.selectors.iter().map(|s| s.pages).sum()
    }

    pub fn count(&self, class: Class) -> usize {
        self.pods.iter().filter(|p| p.classified.class == class).count()
    }

    /// The pods in any of `classes`.
    pub fn in_classes<'a>(&'a self, classes: &'a [Class]) -> impl Iterator<Item = &'a PodAudit> + 'a {
        self.pods.iter().filter(|p| classes.contains(&p.classified.class))
    }

    /// Counts by class for each template (`ns/source/key`, recorded or applying now); pods with
    /// no layer either way under `(no template)`.
    pub fn by_template(&self) -> BTreeMap<String, [usize; 4]> {
        let mut table: BTreeMap<String, [usize; 4]> = BTreeMap::new();
        for pod in &self.pods {
            let c = &pod.classified;
            let mut keys: Vec<&str> = c.recorded.iter().flatten().chain(&c.now).map(|l| identity(l)).collect();
            keys.sort_unstable();
            keys.dedup();
            if keys.is_empty() {
                keys.push("(no template)");
            }
            let column = Class::ALL.iter().position(|k| *k == c.class).expect("every class is a column");
            for key in keys {
                table.entry(key.to_owned()).or_default()[column] += 1;
            }
        }
        table
    }

    fn summary(&self) -> String {
        let counts: Vec<String> = Class::ALL.iter().map(|c| format!("{} {}", self.count(*c), c.as_str())).collect();
        let pages: Vec<String> = self.selectors.iter().map(|s| format!("{} for {:?}", s.pages, s.selector)).collect();
        format!(
            "{} pods: {}; {} list calls (pages: {}); {:.2}s",
            self.pods.len(),
            counts.join(", "),
            self.list_calls(),
            pages.join(", "),
            self.seconds
        )
    }

    /// `-o text`: a table per template, the pods that are not current, a summary line.
    pub fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let table = self.by_template();
        let width = table.keys().map(String::len).chain([8]).max().unwrap_or(8);
        writeln!(out, "{:width$}  {:>8} {:>8} {:>8} {:>9}", "TEMPLATE", "CURRENT", "OUTDATED", "MISSED", "UNTOUCHED")?;
        for (key, [current, outdated, missed, untouched]) in &table {
            writeln!(out, "{key:width$}  {current:>8} {outdated:>8} {missed:>8} {untouched:>9}")?;
        }
        let stale: Vec<&PodAudit> = self.pods.iter().filter(|p| p.classified.class != Class::Current).collect();
        if !stale.is_empty() {
            writeln!(out)?;
            let names: Vec<String> = stale.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect();
            let width = names.iter().map(String::len).chain([3]).max().unwrap_or(3);
            writeln!(out, "{:width$}  {:9}  REASON", "POD", "CLASS")?;
            for (pod, name) in stale.iter().zip(&names) {
                writeln!(out, "{name:width$}  {:9}  {}", pod.classified.class.as_str(), pod.classified.reason)?;
            }
        }
        writeln!(out)?;
        writeln!(out, "{}", self.summary())
    }

    /// `-o json`: one object per pod per line, then one line `{"summary": {…}}`.
    pub fn write_json(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for pod in &self.pods {
            serde_json::to_writer(&mut *out, pod)?;
            writeln!(out)?;
        }
        let mut summary = serde_json::json!({
            "pods": self.pods.len(),
            "list_calls": self.list_calls(),
            "selectors": self.selectors,
            "field_selector": FIELD_SELECTOR,
            "seconds": self.seconds,
        });
        for class in Class::ALL {
            summary[class.as_str()] = self.count(class).into();
        }
        serde_json::to_writer(&mut *out, &serde_json::json!({ "summary": summary }))?;
        writeln!(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::Catalog;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn meta(ns: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> ObjectMeta {
        let map = |pairs: &[(&str, &str)]| Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        ObjectMeta {
            name: Some("p".into()),
            namespace: Some(ns.into()),
            labels: map(labels),
            annotations: map(annotations),
            ..ObjectMeta::default()
        }
    }

    const APPLIED: &str = "flyte.org/pod-template-applied";
    const ENV: &str = "flyte.org/environment";

    fn store(version: &str) -> crate::store::TemplateIndex {
        let mut c = Catalog::new("flyte");
        c.apply("flyte", "tpl", Some(version), &data(&[("gpu", "labels: {a: b}"), ("bad", "podspec: {}")]));
        c.apply("flyte", "defaults", Some("7"), &data(&[("defaults", "labels: {d: e}")]));
        c.index()
    }

    #[test]
    fn current_outdated_missed_untouched() {
        let policy = Policy::default();
        let idx = store("2");
        let env = [(ENV, "gpu")];
        let got = classify(&meta("ml", &env, &[(APPLIED, "flyte/tpl/gpu@2")]), &idx, &policy);
        assert_eq!(got.class, Class::Current, "{got:?}");
        assert_eq!(got.now, ["flyte/tpl/gpu@2"]);

        let got = classify(&meta("ml", &env, &[(APPLIED, "flyte/tpl/gpu@1")]), &idx, &policy);
        assert_eq!(got.class, Class::Outdated);
        assert_eq!(got.reason, "flyte/tpl/gpu changed: flyte/tpl/gpu@1 -> flyte/tpl/gpu@2");
        assert_eq!(got.recorded.as_deref(), Some(&["flyte/tpl/gpu@1".to_owned()][..]));

        let got = classify(&meta("ml", &env, &[]), &idx, &policy);
        assert_eq!((got.class, got.reason.as_str()), (Class::Missed, "no record; would apply flyte/tpl/gpu@2"));

        let got = classify(&meta("ml", &[(ENV, "none")], &[]), &idx, &policy);
        assert_eq!(got.class, Class::Untouched);
        assert!(got.reason.contains("no template \"none\" (label flyte.org/environment)"), "{}", got.reason);
    }

    #[test]
    fn layers_added_and_removed_are_named() {
        let idx = store("2");
        let policy = Policy { default_template: Some("defaults".into()), ..Policy::default() };
        let env = [(ENV, "gpu")];
        let got = classify(&meta("ml", &env, &[(APPLIED, "flyte/tpl/gpu@2")]), &idx, &policy);
        assert_eq!((got.class, got.reason.as_str()), (Class::Outdated, "layer added: flyte/defaults/defaults@7"));
        // Nothing applies now (the environment lost its template): its layer was removed.
        let got = classify(&meta("ml", &[(ENV, "none")], &[(APPLIED, "flyte/tpl/none@1")]), &idx, &Policy::default());
        assert_eq!((got.class, got.reason.as_str()), (Class::Outdated, "layer removed: flyte/tpl/none@1"));
        assert!(got.now.is_empty());
    }

    #[test]
    fn the_task_name_rule_is_part_of_the_record() {
        let idx = store("2");
        let policy = Policy::default();
        let labels = [("flyte.org/managed", "true"), ("task-name", "gpu.train")];
        let record = "flyte/tpl/gpu@2; environment from task-name gpu.train";
        assert_eq!(classify(&meta("ml", &labels, &[(APPLIED, record)]), &idx, &policy).class, Class::Current);
        // Recorded by a webhook that read the label, now the task-name rule: same layer, other rule.
        let got = classify(&meta("ml", &labels, &[(APPLIED, "flyte/tpl/gpu@2")]), &idx, &policy);
        assert_eq!(got.class, Class::Outdated);
        assert_eq!(got.reason, "rule changed: none -> \"environment from task-name gpu.train\"");
    }

    #[test]
    fn a_pod_that_would_be_denied_now() {
        let idx = store("2");
        let policy = Policy::default();
        let broken = [(ENV, "bad")];
        let got = classify(&meta("ml", &broken, &[(APPLIED, "flyte/tpl/bad@1")]), &idx, &policy);
        assert_eq!(got.class, Class::Outdated);
        assert!(got.reason.starts_with("would be denied now: pod template \"bad\""), "{}", got.reason);
        let got = classify(&meta("ml", &[], &[("flyte.org/pod-template", "missing")]), &idx, &policy);
        assert_eq!(got.class, Class::Untouched);
        assert!(got.reason.contains("not found"), "{}", got.reason);
    }

    #[test]
    fn the_command_line_requires_a_scope_and_reads_the_classes() {
        use clap::Parser;

        use crate::cli::{Cli, Command, PodClass};
        let parse = |args: &[&str]| Cli::try_parse_from(["ptw", "audit"].iter().chain(args));
        let Command::Audit(args) = parse(&["-A", "--fail-on", "outdated,missed"]).unwrap().command else {
            panic!("not audit");
        };
        assert!(args.all_namespaces && args.namespace.is_none());
        assert_eq!(args.fail_on, [PodClass::Outdated, PodClass::Missed]);
        assert_eq!(args.page_size, 500);
        assert!(parse(&[]).is_err(), "-n or -A is required");
        assert!(parse(&["-n", "a", "-A"]).is_err(), "not both");
        assert!(parse(&["-A", "--fail-on", "stale"]).is_err());
        assert!(parse(&["-A", "--page-size", "0"]).is_err());
    }

    #[test]
    fn selectors_follow_the_names_and_the_rule() {
        assert_eq!(
            selectors(&Names::default()),
            ["flyte.org/environment", "!flyte.org/environment,flyte.org/managed=true,task-name"]
        );
        assert_eq!(selectors(&Names { task_name_label: String::new(), ..Names::default() }), ["flyte.org/environment"]);
    }

    #[test]
    fn the_table_counts_each_template() {
        let idx = store("2");
        let policy = Policy::default();
        let pod = |name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]| PodAudit {
            namespace: "ml".into(),
            name: name.into(),
            classified: classify(&meta("ml", labels, annotations), &idx, &policy),
        };
        let report = Report {
            pods: vec![
                pod("a", &[(ENV, "gpu")], &[(APPLIED, "flyte/tpl/gpu@2")]),
                pod("b", &[(ENV, "gpu")], &[(APPLIED, "flyte/tpl/gpu@1")]),
                pod("c", &[(ENV, "gpu")], &[]),
                pod("d", &[(ENV, "none")], &[]),
            ],
            selectors: vec![SelectorStats { selector: ENV.into(), pages: 1, pods: 4 }],
            seconds: 0.0,
        };
        assert_eq!(
            report.by_template(),
            BTreeMap::from([("(no template)".to_owned(), [0, 0, 0, 1]), ("flyte/tpl/gpu".to_owned(), [1, 1, 1, 0])])
        );
        let mut text = Vec::new();
        report.write_text(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("ml/b  outdated"), "{text}");
        assert!(!text.contains("ml/a "), "current pods are not listed: {text}");
        assert!(text.ends_with("4 pods: 1 current, 1 outdated, 1 missed, 1 untouched; 1 list calls (pages: 1 for \"flyte.org/environment\"); 0.00s\n"), "{text}");
        let mut json = Vec::new();
        report.write_json(&mut json).unwrap();
        let lines: Vec<serde_json::Value> =
            String::from_utf8(json).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[2]["class"], "missed");
        assert_eq!(lines[2]["recorded"], serde_json::Value::Null);
        assert_eq!(lines[4]["summary"]["outdated"], 1);
        assert_eq!(lines[4]["summary"]["list_calls"], 1);
    }
}
