//! Where templates come from (SPEC §3, §8): one trait, two stores — a directory of ConfigMap and
//! PodTemplate manifests (`dir`) and the cluster (`cluster`). Both feed a [`Catalog`], which
//! parses each template once when its source object is seen and publishes an immutable
//! [`TemplateIndex`] that admissions read without locks.

mod catalog;
pub mod cluster;
pub mod dir;
mod index;

use std::sync::Arc;

pub use crate::template::content_hash;
use crate::template::{PodTemplate, TemplateError, TemplateSource};
pub use catalog::{Catalog, ParseProblem};
pub use index::TemplateIndex;

/// The template store an admission consults.
pub trait TemplateStore: Send + Sync {
    /// The template `name` as a pod in `namespace` sees it: its own namespace first, then the
    /// platform namespace; never any other.
    fn lookup(&self, namespace: &str, name: &str) -> Lookup;
    /// The shadow template (§10) `name` that would serve a pod in `namespace` if shadow sources
    /// were enforced; `None` when there is none or an enforced one would still win.
    fn lookup_shadow(&self, namespace: &str, name: &str) -> Option<Arc<TemplateEntry>>;
    /// One consistent view of the templates: an admission takes one and makes every lookup in
    /// it, so a template update in between can never give one pod layers of two versions.
    fn snapshot(&self) -> Snapshot<'_>;
    /// True once the templates have been loaded (the initial list, in a cluster).
    fn is_ready(&self) -> bool;
    /// Counts for metrics and readiness.
    fn stats(&self) -> StoreStats;
}

/// An index an admission reads from start to end: a fixed one borrowed, or the current one of a
/// store that publishes new ones, held for as long as the admission runs.
pub enum Snapshot<'a> {
    Fixed(&'a TemplateIndex),
    Current(Arc<TemplateIndex>),
}

impl std::ops::Deref for Snapshot<'_> {
    type Target = TemplateIndex;

    fn deref(&self) -> &TemplateIndex {
        match self {
            Snapshot::Fixed(index) => index,
            Snapshot::Current(index) => index,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Keys that serve a template (fresh or stale).
    pub templates: usize,
    /// Keys that never parsed, plus keys serving a stale version.
    pub errors: usize,
    /// Of those errors, the keys serving a stale (last good) version.
    pub stale: usize,
}

/// One template (a ConfigMap data key, or a PodTemplate object), as loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateEntry {
    /// For a stale entry, the source of the version being served.
    pub source: TemplateSource,
    pub state: EntryState,
    /// The per-template admission counters of its name, bound at its first admission: the
    /// handler counts through the entry the admission found, with no lookup and no lock.
    pub counters: crate::metrics::AdmissionSlot,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EntryState {
    Ready(Arc<PodTemplate>),
    /// Never parsed: pods that name it are denied (or warned, by policy).
    Broken(TemplateError),
    /// Parsed before; the current value does not. The last good version keeps serving.
    Stale {
        template: Arc<PodTemplate>,
        error: TemplateError,
        broken_version: String,
    },
}

#[derive(Debug, Clone)]
pub struct Lookup {
    pub entry: Option<Arc<TemplateEntry>>,
    /// The namespaces searched, in order: for messages that say where we looked.
    pub searched: Vec<String>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::Value;

    use super::*;
    use crate::template::SourceKind;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn own_namespace_first_then_platform_never_another() {
        let mut c = Catalog::new("flyte");
        c.apply("flyte", "platform", Some("1"), &data(&[("a", "labels: {from: platform}"), ("b", "{}")]));
        c.apply("team-a", "mine", Some("2"), &data(&[("a", "labels: {from: team-a}"), ("c", "{}")]));
        let idx = c.index();
        let source = |ns, name| idx.lookup(ns, name).entry.map(|e| e.source.to_string());
        assert_eq!(source("team-a", "a").as_deref(), Some("team-a/mine/a@2"));
        assert_eq!(source("team-b", "a").as_deref(), Some("flyte/platform/a@1"));
        assert_eq!(source("team-a", "b").as_deref(), Some("flyte/platform/b@1"));
        assert_eq!(source("team-b", "c"), None, "another tenant's template must stay invisible");
        assert_eq!(idx.lookup("team-b", "c").searched, ["team-b", "flyte"]);
        assert_eq!(idx.lookup("flyte", "c").searched, ["flyte"]);
    }

    #[test]
    fn first_config_map_name_wins_a_duplicate_key() {
        let mut c = Catalog::new("flyte");
        c.apply("flyte", "zz", Some("1"), &data(&[("a", "labels: {from: zz}")]));
        c.apply("flyte", "aa", Some("2"), &data(&[("a", "labels: {from: aa}")]));
        assert_eq!(c.index().lookup("flyte", "a").entry.unwrap().source.object, "aa");
    }

    #[test]
    fn bad_key_never_stops_the_others_and_stays_as_an_error() {
        let mut c = Catalog::new("flyte");
        let problems = c.apply("flyte", "cm", Some("1"), &data(&[("bad", "podspec: {}"), ("good", "{}")]));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].source.key, "bad");
        let message = problems[0].to_string();
        assert!(message.starts_with("ConfigMap flyte/cm key \"bad\": unknown field `podspec`"), "{message}");
        assert!(!problems[0].stale);
        let idx = c.index();
        assert!(matches!(idx.lookup("flyte", "good").entry.unwrap().state, EntryState::Ready(_)));
        assert!(matches!(idx.lookup("flyte", "bad").entry.unwrap().state, EntryState::Broken(_)));
        assert_eq!(idx.stats(), StoreStats { templates: 1, errors: 1, stale: 0 });
    }

    #[test]
    fn broken_update_keeps_the_last_good_version() {
        let mut c = Catalog::new("flyte");
        c.apply("flyte", "cm", Some("1"), &data(&[("t", "labels: {v: one}")]));
        let problems = c.apply("flyte", "cm", Some("2"), &data(&[("t", "labels: [")]));
        assert!(problems[0].stale);
        let entry = c.index().lookup("flyte", "t").entry.unwrap();
        assert_eq!(entry.source.version, "1", "the applied annotation names the version in use");
        let EntryState::Stale { template, broken_version, .. } = &entry.state else { panic!("{entry:?}") };
        assert_eq!(template.labels["v"], "one");
        assert_eq!(broken_version, "2");
        assert_eq!(c.index().stats(), StoreStats { templates: 1, errors: 1, stale: 1 });
        // Still broken at a later version: still the same good version.
        c.apply("flyte", "cm", Some("3"), &data(&[("t", "labels: [")]));
        assert_eq!(c.index().lookup("flyte", "t").entry.unwrap().source.version, "1");
        // Fixed: the new version serves.
        c.apply("flyte", "cm", Some("4"), &data(&[("t", "labels: {v: four}")]));
        let entry = c.index().lookup("flyte", "t").entry.unwrap();
        assert!(matches!(&entry.state, EntryState::Ready(t) if t.labels["v"] == "four"));
    }

    #[test]
    fn deleting_removes_templates() {
        let mut c = Catalog::new("flyte");
        c.apply("flyte", "cm", Some("1"), &data(&[("t", "{}")]));
        assert!(c.remove("flyte", "cm"));
        assert!(c.index().lookup("flyte", "t").entry.is_none());
    }

    #[test]
    fn unchanged_entries_are_not_parsed_again() {
        let mut c = Catalog::new("flyte");
        c.apply("flyte", "cm", None, &data(&[("t", "{}")]));
        let first = c.index().lookup("flyte", "t").entry.unwrap();
        c.apply("flyte", "cm", None, &data(&[("t", "{}")]));
        let second = c.index().lookup("flyte", "t").entry.unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert!(first.source.version.starts_with("sha256:"));
    }

    fn pod_template_object(annotations: Value, template: Value) -> Value {
        serde_json::json!({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"annotations": annotations}, "template": template})
    }

    fn labelled(v: &str) -> Value {
        pod_template_object(serde_json::json!({}), serde_json::json!({"metadata": {"labels": {"v": v}}}))
    }

    fn served_label(idx: &TemplateIndex, ns: &str, name: &str) -> Option<String> {
        let entry = idx.lookup(ns, name).entry?;
        match &entry.state {
            EntryState::Ready(t) | EntryState::Stale { template: t, .. } => t.labels.get("v").cloned(),
            EntryState::Broken(_) => None,
        }
    }

    #[test]
    fn a_pod_template_object_is_a_template_named_after_it() {
        let mut c = Catalog::new("flyte");
        let object = pod_template_object(
            serde_json::json!({"flyte.org/primary-container-name": "main"}),
            serde_json::json!({"metadata": {"labels": {"v": "pt"}}, "spec": {"containers": [{"name": "main", "image": "x:1"}]}}),
        );
        assert!(c.apply_pod_template("team-a", "gpu", Some("12"), &object).is_empty());
        let idx = c.index();
        let entry = idx.lookup("team-a", "gpu").entry.unwrap();
        assert_eq!(entry.source.to_string(), "team-a/podtemplate:gpu/gpu@12");
        assert_eq!(entry.source.describe(), "PodTemplate team-a/gpu");
        let EntryState::Ready(t) = &entry.state else { panic!("{entry:?}") };
        assert_eq!((t.primary_container_name.as_str(), t.primary_container_name_set), ("main", true));
        assert_eq!(t.labels["v"], "pt");
        assert!(idx.lookup("team-b", "gpu").entry.is_none(), "same namespace rules as ConfigMaps");
        assert_eq!(idx.stats(), StoreStats { templates: 1, errors: 0, stale: 0 });
        assert!(c.remove_source(SourceKind::PodTemplate, "team-a", "gpu"));
        assert!(!c.remove("team-a", "gpu"), "a ConfigMap of that name is another object");
        assert!(c.index().lookup("team-a", "gpu").entry.is_none());
    }

    #[test]
    fn a_platform_pod_template_serves_every_namespace() {
        let mut c = Catalog::new("flyte");
        c.apply_pod_template("flyte", "shared", Some("1"), &labelled("platform"));
        assert_eq!(served_label(&c.index(), "team-a", "shared").as_deref(), Some("platform"));
    }

    #[test]
    fn a_pod_template_keeps_its_last_good_version_and_is_parsed_once() {
        let mut c = Catalog::new("flyte");
        let good = labelled("one");
        let broken = pod_template_object(
            serde_json::json!({}),
            serde_json::json!({"spec": {"containers": [{"name": "p", "evn": []}]}}),
        );
        // Never parsed: an error entry.
        let problems = c.apply_pod_template("flyte", "t", Some("1"), &broken);
        assert_eq!(problems.len(), 1);
        assert!(!problems[0].stale);
        assert_eq!(problems[0].to_string(), "PodTemplate flyte/t: template.spec.containers[0].evn: unknown field");
        assert!(matches!(c.index().lookup("flyte", "t").entry.unwrap().state, EntryState::Broken(_)));
        // Fixed, then broken again: the last good version serves.
        assert!(c.apply_pod_template("flyte", "t", Some("2"), &good).is_empty());
        let first = c.index().lookup("flyte", "t").entry.unwrap();
        let problems = c.apply_pod_template("flyte", "t", Some("3"), &broken);
        assert!(problems[0].stale);
        assert_eq!(problems[0].source.version, "3");
        let entry = c.index().lookup("flyte", "t").entry.unwrap();
        assert_eq!(entry.source.to_string(), "flyte/podtemplate:t/t@2");
        let EntryState::Stale { template, broken_version, error } = &entry.state else { panic!("{entry:?}") };
        assert_eq!((template.labels["v"].as_str(), broken_version.as_str()), ("one", "3"));
        assert!(error.to_string().contains("evn"));
        // A resync of the same broken version reports nothing again.
        assert!(c.apply_pod_template("flyte", "t", Some("3"), &broken).is_empty());
        assert!(Arc::ptr_eq(&entry, &c.index().lookup("flyte", "t").entry.unwrap()));
        // A resync of a good version is not parsed again either.
        c.apply_pod_template("flyte", "t", Some("4"), &good);
        let fourth = c.index().lookup("flyte", "t").entry.unwrap();
        assert!(!Arc::ptr_eq(&first, &fourth));
        c.apply_pod_template("flyte", "t", Some("4"), &good);
        assert!(Arc::ptr_eq(&fourth, &c.index().lookup("flyte", "t").entry.unwrap()));
    }

    #[test]
    fn pod_templates_from_files_are_versioned_by_content() {
        let mut c = Catalog::new("flyte");
        c.apply_pod_template("flyte", "t", None, &labelled("one"));
        let first = c.index().lookup("flyte", "t").entry.unwrap();
        assert!(first.source.version.starts_with("sha256:"), "{}", first.source);
        c.apply_pod_template("flyte", "t", None, &labelled("one"));
        assert!(Arc::ptr_eq(&first, &c.index().lookup("flyte", "t").entry.unwrap()));
        c.apply_pod_template("flyte", "t", None, &labelled("two"));
        let second = c.index().lookup("flyte", "t").entry.unwrap();
        assert_ne!(first.source.version, second.source.version);
    }

    #[test]
    fn a_config_map_key_wins_over_a_pod_template_of_the_same_name() {
        for pod_template_first in [true, false] {
            let mut c = Catalog::new("flyte");
            if pod_template_first {
                c.apply_pod_template("team", "t", Some("1"), &labelled("podtemplate"));
            }
            // The kind decides, not the order of events or the object names.
            c.apply("team", "zz", Some("2"), &data(&[("t", "labels: {v: configmap}")]));
            if !pod_template_first {
                c.apply_pod_template("team", "t", Some("1"), &labelled("podtemplate"));
            }
            let idx = c.index();
            assert_eq!(served_label(&idx, "team", "t").as_deref(), Some("configmap"));
            assert_eq!(idx.lookup("team", "t").entry.unwrap().source.to_string(), "team/zz/t@2");
            // ...in that namespace only: the platform namespace's PodTemplate still loses to a
            // tenant's own ConfigMap key, and a tenant's PodTemplate wins over a platform ConfigMap.
            c.remove("team", "zz");
            assert_eq!(
                served_label(&c.index(), "team", "t").as_deref(),
                Some("podtemplate"),
                "the PodTemplate serves once the key is gone"
            );
            c.apply("flyte", "platform", Some("3"), &data(&[("t", "labels: {v: platform}")]));
            assert_eq!(
                served_label(&c.index(), "team", "t").as_deref(),
                Some("podtemplate"),
                "own namespace first, whatever the kind"
            );
        }
    }

    #[test]
    fn a_broken_config_map_key_still_shadows_a_pod_template() {
        let mut c = Catalog::new("flyte");
        c.apply_pod_template("team", "t", Some("1"), &labelled("podtemplate"));
        c.apply("team", "cm", Some("2"), &data(&[("t", "labels: [")]));
        let entry = c.index().lookup("team", "t").entry.unwrap();
        assert!(
            matches!(entry.state, EntryState::Broken(_)),
            "the ConfigMap key names the template, broken or not: {entry:?}"
        );
    }

    #[test]
    fn retain_keeps_the_other_kind_and_other_namespaces() {
        let mut c = Catalog::new("flyte");
        c.apply("a", "cm", Some("1"), &data(&[("x", "{}")]));
        c.apply_pod_template("a", "pt", Some("1"), &labelled("1"));
        c.apply_pod_template("b", "pt", Some("1"), &labelled("1"));
        c.retain(SourceKind::PodTemplate, Some("a"), |_, _| false);
        let idx = c.index();
        assert!(idx.lookup("a", "x").entry.is_some(), "ConfigMaps are not touched");
        assert!(idx.lookup("a", "pt").entry.is_none());
        assert!(idx.lookup("b", "pt").entry.is_some(), "other namespaces are not touched");
        c.retain(SourceKind::PodTemplate, None, |ns, name| ns == "b" && name == "pt");
        c.retain(SourceKind::ConfigMap, None, |_, _| false);
        let idx = c.index();
        assert!(idx.lookup("a", "x").entry.is_none());
        assert!(idx.lookup("b", "pt").entry.is_some());
    }

    /// Runs `f` with this thread's log lines captured.
    fn logs_of(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn a_clash_is_logged_once_per_change_not_per_event() {
        let mut c = Catalog::new("flyte");
        let logs = logs_of(|| {
            c.apply_pod_template("team", "t", Some("1"), &labelled("podtemplate"));
            c.apply("team", "cm", Some("2"), &data(&[("t", "{}"), ("u", "{}")]));
            for v in 3..10 {
                // Watch events and index rebuilds, the clash unchanged.
                c.apply(
                    "team",
                    "cm",
                    Some(&v.to_string()),
                    &data(&[("t", "{}"), ("u", &format!("labels: {{n: '{v}'}}"))]),
                );
                c.apply_pod_template("team", "t", Some(&v.to_string()), &labelled("podtemplate"));
                c.index();
            }
        });
        assert_eq!(logs.matches("the ConfigMap key wins").count(), 1, "{logs}");
        assert!(logs.contains("winner=ConfigMap team/cm") && logs.contains("ignored=PodTemplate team/t"), "{logs}");
        let logs = logs_of(|| {
            c.remove("team", "cm");
            c.index();
            c.index();
        });
        assert_eq!(logs.matches("no longer defined twice").count(), 1, "{logs}");
        // Back again: a change of the situation, logged again. Two ConfigMaps: their own message.
        let logs = logs_of(|| {
            c.apply("team", "cm", Some("20"), &data(&[("t", "{}")]));
            c.apply("team", "other", Some("21"), &data(&[("t", "{}")]));
            c.index();
            c.index();
        });
        assert_eq!(logs.matches("the ConfigMap key wins").count(), 1, "{logs}");
        assert_eq!(logs.matches("defined by two ConfigMaps").count(), 1, "{logs}");
    }
}
