//! Where templates come from (SPEC §3): one trait, two sources — a directory of ConfigMap
//! manifests (`dir`) and the cluster (`cluster`). Both feed a [`Catalog`], which parses each
//! template once when its ConfigMap is seen and publishes an immutable [`TemplateIndex`] that
//! admissions read without locks.

pub mod cluster;
pub mod dir;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::template::{PodTemplate, TemplateError, TemplateSource};

/// The template store an admission consults.
pub trait TemplateStore: Send + Sync {
    /// The template `name` as a pod in `namespace` sees it: its own namespace first, then the
    /// platform namespace; never any other.
    fn lookup(&self, namespace: &str, name: &str) -> Lookup;
    /// True once the templates have been loaded (the initial list, in a cluster).
    fn is_ready(&self) -> bool;
    /// Counts for metrics and readiness.
    fn stats(&self) -> StoreStats;
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Keys that serve a template (fresh or stale).
    pub templates: usize,
    /// Keys that never parsed, plus keys serving a stale version.
    pub errors: usize,
}

/// One data key of a template ConfigMap, as loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateEntry {
    /// For a stale entry, the source of the version being served.
    pub source: TemplateSource,
    pub state: EntryState,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EntryState {
    Ready(Arc<PodTemplate>),
    /// Never parsed: pods that name it are denied (or warned, by policy).
    Broken(TemplateError),
    /// Parsed before; the current value does not. The last good version keeps serving.
    Stale { template: Arc<PodTemplate>, error: TemplateError, broken_version: String },
}

#[derive(Debug, Clone)]
pub struct Lookup {
    pub entry: Option<Arc<TemplateEntry>>,
    /// The namespaces searched, in order: for messages that say where we looked.
    pub searched: Vec<String>,
}

/// A template key that failed to parse while its ConfigMap was loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseProblem {
    pub namespace: String,
    pub config_map: String,
    pub key: String,
    pub error: TemplateError,
    /// True when a last good version keeps serving.
    pub stale: bool,
}

impl std::fmt::Display for ParseProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConfigMap {}/{} key {:?}: {}", self.namespace, self.config_map, self.key, self.error)?;
        if self.stale {
            write!(f, " (the last good version keeps serving)")?;
        }
        Ok(())
    }
}

/// The parsed contents of every template ConfigMap seen; the single writer of a store owns it.
#[derive(Debug, Default)]
pub struct Catalog {
    platform_namespace: String,
    /// (namespace, ConfigMap name) → key → entry. Ordered: the first ConfigMap name wins a clash.
    config_maps: BTreeMap<(String, String), BTreeMap<String, Arc<TemplateEntry>>>,
}

impl Catalog {
    pub fn new(platform_namespace: impl Into<String>) -> Self {
        Catalog { platform_namespace: platform_namespace.into(), config_maps: BTreeMap::new() }
    }

    /// Adds or replaces a ConfigMap; returns the keys that did not parse.
    /// `version` is the resourceVersion, or `None` to use a content hash per key (files).
    pub fn apply(
        &mut self,
        namespace: &str,
        name: &str,
        version: Option<&str>,
        data: &BTreeMap<String, String>,
    ) -> Vec<ParseProblem> {
        let id = (namespace.to_owned(), name.to_owned());
        let previous = self.config_maps.remove(&id).unwrap_or_default();
        let mut problems = Vec::new();
        let mut entries = BTreeMap::new();
        for (key, text) in data {
            let source = TemplateSource {
                namespace: namespace.to_owned(),
                config_map: name.to_owned(),
                key: key.clone(),
                version: version.map_or_else(|| content_hash(text), str::to_owned),
            };
            // A resync or an edit of another key must not parse this one again.
            let seen = |old: &&Arc<TemplateEntry>| match &old.state {
                EntryState::Stale { broken_version, .. } => *broken_version == source.version,
                _ => old.source == source,
            };
            if let Some(old) = previous.get(key).filter(seen) {
                entries.insert(key.clone(), old.clone());
                continue;
            }
            let entry = match PodTemplate::parse(text) {
                Ok(template) => Arc::new(TemplateEntry { source, state: EntryState::Ready(Arc::new(template)) }),
                Err(error) => {
                    let last_good = previous.get(key).and_then(|old| match &old.state {
                        EntryState::Ready(t) => Some((old.source.clone(), t.clone())),
                        EntryState::Stale { template, .. } => Some((old.source.clone(), template.clone())),
                        EntryState::Broken(_) => None,
                    });
                    problems.push(ParseProblem {
                        namespace: namespace.to_owned(),
                        config_map: name.to_owned(),
                        key: key.clone(),
                        error: error.clone(),
                        stale: last_good.is_some(),
                    });
                    Arc::new(match last_good {
                        Some((old_source, template)) => TemplateEntry {
                            source: old_source,
                            state: EntryState::Stale { template, error, broken_version: source.version },
                        },
                        None => TemplateEntry { source, state: EntryState::Broken(error) },
                    })
                }
            };
            entries.insert(key.clone(), entry);
        }
        self.config_maps.insert(id, entries);
        problems
    }

    pub fn remove(&mut self, namespace: &str, name: &str) -> bool {
        self.config_maps.remove(&(namespace.to_owned(), name.to_owned())).is_some()
    }

    /// Keeps, within `scope` (one namespace, or all when `None`), only the ConfigMaps `keep` names.
    pub fn retain(&mut self, scope: Option<&str>, keep: impl Fn(&str, &str) -> bool) {
        self.config_maps.retain(|(ns, name), _| scope.is_some_and(|s| s != ns) || keep(ns, name));
    }

    /// The lookup table admissions read. Logs each key defined by two ConfigMaps of a namespace.
    pub fn index(&self) -> TemplateIndex {
        let mut by_namespace: HashMap<String, HashMap<String, Arc<TemplateEntry>>> = HashMap::new();
        let mut stats = StoreStats::default();
        for ((namespace, config_map), entries) in &self.config_maps {
            let keys = by_namespace.entry(namespace.clone()).or_default();
            for (key, entry) in entries {
                match &entry.state {
                    EntryState::Ready(_) => stats.templates += 1,
                    EntryState::Stale { .. } => {
                        stats.templates += 1;
                        stats.errors += 1;
                    }
                    EntryState::Broken(_) => stats.errors += 1,
                }
                if let Some(winner) = keys.get(key) {
                    tracing::warn!(
                        namespace, key, winner = %winner.source.config_map, ignored = %config_map,
                        "template key defined by two ConfigMaps; the first by name wins"
                    );
                    continue;
                }
                keys.insert(key.clone(), entry.clone());
            }
        }
        TemplateIndex { platform_namespace: self.platform_namespace.clone(), by_namespace, stats }
    }
}

/// A short, stable content hash: the version of a template read from a file.
pub fn content_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// An immutable snapshot of all templates, keyed by namespace then template name.
#[derive(Debug, Default)]
pub struct TemplateIndex {
    platform_namespace: String,
    by_namespace: HashMap<String, HashMap<String, Arc<TemplateEntry>>>,
    stats: StoreStats,
}

impl TemplateIndex {
    pub fn lookup(&self, namespace: &str, name: &str) -> Lookup {
        let mut searched = vec![namespace.to_owned()];
        if namespace != self.platform_namespace {
            searched.push(self.platform_namespace.clone());
        }
        let entry = searched.iter().find_map(|ns| self.by_namespace.get(ns)?.get(name).cloned());
        Lookup { entry, searched }
    }

    pub fn stats(&self) -> StoreStats {
        self.stats
    }
}

/// A fixed index is a store too (tests, and the directory store's contents).
impl TemplateStore for TemplateIndex {
    fn lookup(&self, namespace: &str, name: &str) -> Lookup {
        TemplateIndex::lookup(self, namespace, name)
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn stats(&self) -> StoreStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.index().lookup("flyte", "a").entry.unwrap().source.config_map, "aa");
    }

    #[test]
    fn bad_key_never_stops_the_others_and_stays_as_an_error() {
        let mut c = Catalog::new("flyte");
        let problems = c.apply("flyte", "cm", Some("1"), &data(&[("bad", "podspec: {}"), ("good", "{}")]));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "bad");
        assert!(!problems[0].stale);
        let idx = c.index();
        assert!(matches!(idx.lookup("flyte", "good").entry.unwrap().state, EntryState::Ready(_)));
        assert!(matches!(idx.lookup("flyte", "bad").entry.unwrap().state, EntryState::Broken(_)));
        assert_eq!(idx.stats(), StoreStats { templates: 1, errors: 1 });
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
}
