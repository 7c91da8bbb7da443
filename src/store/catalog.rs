//! The catalog: the parsed contents of every template source object seen, owned by a store's
//! single writer. Each template is parsed once, when its object is seen; a broken update keeps
//! the last good version; `index()` publishes an immutable [`TemplateIndex`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::Value;

use super::{EntryState, StoreStats, TemplateEntry, TemplateIndex};
use crate::template::SourceObject;
use crate::template::{Mode, SourceKind, TemplateError, TemplateSource};

/// A template that failed to parse while its source object was loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseProblem {
    /// The template as it was read (the version that does not parse).
    pub source: TemplateSource,
    pub error: TemplateError,
    /// True when a last good version keeps serving.
    pub stale: bool,
}

impl std::fmt::Display for ParseProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.source.describe(), self.error)?;
        if self.stale {
            write!(f, " (the last good version keeps serving)")?;
        }
        Ok(())
    }
}

/// A source object of the catalog. Ordered so that within a namespace ConfigMaps come first, by
/// name: the first definer of a template name wins a clash.
type ObjectId = (String, SourceKind, String);

/// A template name defined twice in one namespace, and which definition serves.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Shadowed {
    namespace: String,
    key: String,
    winner: (SourceKind, String),
    ignored: (SourceKind, String),
}

/// The parsed contents of every template source object seen (ConfigMaps and PodTemplates); the
/// single writer of a store owns it.
#[derive(Debug, Default)]
pub struct Catalog {
    platform_namespace: String,
    /// (namespace, kind, object name) → template name → entry.
    objects: BTreeMap<ObjectId, BTreeMap<String, Arc<TemplateEntry>>>,
    /// The clashes the last [`Catalog::index`] found: each is logged when it appears, not on
    /// every watch event.
    shadowed: BTreeSet<Shadowed>,
}

impl Catalog {
    pub fn new(platform_namespace: impl Into<String>) -> Self {
        Catalog { platform_namespace: platform_namespace.into(), ..Catalog::default() }
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
        self.apply_source(namespace, name, version, SourceObject::ConfigMap(data), Ok(Mode::Enforce))
    }

    /// Adds or replaces a PodTemplate object (as JSON); returns it if it did not parse.
    pub fn apply_pod_template(
        &mut self,
        namespace: &str,
        name: &str,
        version: Option<&str>,
        object: &Value,
    ) -> Vec<ParseProblem> {
        self.apply_source(namespace, name, version, SourceObject::PodTemplate { name, object }, Ok(Mode::Enforce))
    }

    /// Adds or replaces a source object named `name`; returns the templates that did not parse.
    /// A template whose version is unchanged is not parsed again; one that no longer parses
    /// keeps serving its last good version. `mode` is the object's (§10); an unreadable mode is
    /// an error of each of its templates.
    pub fn apply_source(
        &mut self,
        namespace: &str,
        name: &str,
        version: Option<&str>,
        object: SourceObject<'_>,
        mode: Result<Mode, TemplateError>,
    ) -> Vec<ParseProblem> {
        let kind = object.kind();
        let id = (namespace.to_owned(), kind, name.to_owned());
        let previous = self.objects.remove(&id).unwrap_or_default();
        let mut problems = Vec::new();
        let mut entries = BTreeMap::new();
        for item in object.entries() {
            let key = item.name;
            let source = TemplateSource {
                mode: *mode.as_ref().unwrap_or(&Mode::Enforce),
                ..item.source(kind, namespace, name, version)
            };
            // A resync or an edit of another key must not parse this one again.
            let seen = |old: &&Arc<TemplateEntry>| match &old.state {
                EntryState::Stale { broken_version, .. } => *broken_version == source.version,
                _ => old.source == source,
            };
            if let Some(old) = previous.get(key).filter(seen) {
                entries.insert(key.to_owned(), old.clone());
                continue;
            }
            let entry = match mode.clone().and_then(|_| item.parse()) {
                Ok(template) => Arc::new(TemplateEntry {
                    source,
                    state: EntryState::Ready(Arc::new(template)),
                    counters: Default::default(),
                }),
                Err(error) => {
                    let last_good = previous.get(key).and_then(|old| match &old.state {
                        EntryState::Ready(t) => Some((old.source.clone(), t.clone())),
                        EntryState::Stale { template, .. } => Some((old.source.clone(), template.clone())),
                        EntryState::Broken(_) => None,
                    });
                    problems.push(ParseProblem {
                        source: source.clone(),
                        error: error.clone(),
                        stale: last_good.is_some(),
                    });
                    Arc::new(match last_good {
                        Some((old_source, template)) => TemplateEntry {
                            source: old_source,
                            state: EntryState::Stale { template, error, broken_version: source.version },
                            counters: Default::default(),
                        },
                        None => {
                            TemplateEntry { source, state: EntryState::Broken(error), counters: Default::default() }
                        }
                    })
                }
            };
            entries.insert(key.to_owned(), entry);
        }
        self.objects.insert(id, entries);
        problems
    }

    /// Removes a ConfigMap.
    pub fn remove(&mut self, namespace: &str, name: &str) -> bool {
        self.remove_source(SourceKind::ConfigMap, namespace, name)
    }

    /// Removes a source object of `kind`.
    pub fn remove_source(&mut self, kind: SourceKind, namespace: &str, name: &str) -> bool {
        self.objects.remove(&(namespace.to_owned(), kind, name.to_owned())).is_some()
    }

    /// Keeps, among the objects of `kind` within `scope` (one namespace, or all when `None`),
    /// only those `keep` names (namespace, name).
    pub fn retain(&mut self, kind: SourceKind, scope: Option<&str>, keep: impl Fn(&str, &str) -> bool) {
        self.objects.retain(|(ns, k, name), _| *k != kind || scope.is_some_and(|s| s != ns) || keep(ns, name));
    }

    /// The lookup table admissions read. A template name defined twice in one namespace is
    /// served by the first definer: a ConfigMap key before a PodTemplate, and of two ConfigMaps
    /// the one whose name sorts first. Each such clash is logged once, when it appears (and
    /// again, at info, when it is gone), not on every rebuild.
    pub fn index(&mut self) -> TemplateIndex {
        let mut by_namespace: HashMap<String, HashMap<String, Arc<TemplateEntry>>> = HashMap::new();
        let mut shadows: HashMap<String, HashMap<String, Arc<TemplateEntry>>> = HashMap::new();
        let mut stats = StoreStats::default();
        let mut shadowed = BTreeSet::new();
        for ((namespace, kind, name), entries) in &self.objects {
            let keys = by_namespace.entry(namespace.clone()).or_default();
            for (key, entry) in entries {
                match &entry.state {
                    EntryState::Ready(_) => stats.templates += 1,
                    EntryState::Stale { .. } => {
                        stats.templates += 1;
                        stats.errors += 1;
                        stats.stale += 1;
                    }
                    EntryState::Broken(_) => stats.errors += 1,
                }
                if entry.source.mode == Mode::Shadow {
                    // What would serve if this source were enforced: only the first definer, and
                    // only if no enforced source before it defines the name (the clash rule).
                    if !keys.contains_key(key) {
                        shadows
                            .entry(namespace.clone())
                            .or_default()
                            .entry(key.clone())
                            .or_insert_with(|| entry.clone());
                    }
                    continue;
                }
                if let Some(winner) = keys.get(key) {
                    shadowed.insert(Shadowed {
                        namespace: namespace.clone(),
                        key: key.clone(),
                        winner: (winner.source.kind, winner.source.object.clone()),
                        ignored: (*kind, name.clone()),
                    });
                    continue;
                }
                keys.insert(key.clone(), entry.clone());
            }
        }
        for s in shadowed.difference(&self.shadowed) {
            let (winner, ignored) =
                (describe_object(&s.namespace, &s.winner), describe_object(&s.namespace, &s.ignored));
            match s.ignored.0 {
                SourceKind::ConfigMap => tracing::warn!(
                    namespace = %s.namespace, key = %s.key, %winner, %ignored,
                    "template key defined by two ConfigMaps; the first by name wins"
                ),
                SourceKind::PodTemplate => tracing::warn!(
                    namespace = %s.namespace, key = %s.key, %winner, %ignored,
                    "template defined by a ConfigMap key and by a PodTemplate of the same name; the ConfigMap key wins"
                ),
            }
        }
        for s in self.shadowed.difference(&shadowed) {
            let (winner, ignored) =
                (describe_object(&s.namespace, &s.winner), describe_object(&s.namespace, &s.ignored));
            tracing::info!(namespace = %s.namespace, key = %s.key, %winner, %ignored, "template name no longer defined twice");
        }
        self.shadowed = shadowed;
        TemplateIndex {
            platform_namespace: self.platform_namespace.clone(),
            by_namespace,
            shadows,
            stats,
            compositions: Default::default(),
        }
    }
}

fn describe_object(namespace: &str, (kind, name): &(SourceKind, String)) -> String {
    match kind {
        SourceKind::ConfigMap => format!("ConfigMap {namespace}/{name}"),
        SourceKind::PodTemplate => format!("PodTemplate {namespace}/{name}"),
    }
}
