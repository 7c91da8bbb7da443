//! The immutable snapshot admissions read, without locks: every template by namespace and name,
//! looked up in the pod's namespace, then the platform namespace.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::{Lookup, Snapshot, StoreStats, TemplateEntry, TemplateStore};
use crate::merge::{compose, Composition, Layer, Role};
use crate::template::PodTemplate;

/// At most this many layer combinations are kept composed per index version: pods can name any
/// combination of templates, and memory must stay bounded by what exists, not by what is asked.
const COMPOSITIONS_MAX: usize = 1024;

/// The layers of a composition, by identity: the templates this index holds, and their roles.
type LayersKey = Vec<(usize, Role)>;

/// An immutable snapshot of all templates, keyed by namespace then template name.
#[derive(Debug, Default)]
pub struct TemplateIndex {
    pub(super) platform_namespace: String,
    pub(super) by_namespace: HashMap<String, HashMap<String, Arc<TemplateEntry>>>,
    /// Shadow templates (§10), kept apart so that they can never serve an admission: by
    /// namespace and name, each the entry that would serve if its source were enforced.
    pub(super) shadows: HashMap<String, HashMap<String, Arc<TemplateEntry>>>,
    pub(super) stats: StoreStats,
    /// Layers composed once per index version (§8): pods naming the same templates share one
    /// composition instead of composing it again; a new index starts empty, so a template
    /// update is never served from an old composition.
    pub(super) compositions: RwLock<HashMap<LayersKey, Arc<Composition<'static>>>>,
}

/// Equal when every template (source and parsed content) is; what was composed from them is not
/// part of the index's content.
impl PartialEq for TemplateIndex {
    fn eq(&self, other: &Self) -> bool {
        (&self.platform_namespace, &self.by_namespace, &self.shadows, self.stats)
            == (&other.platform_namespace, &other.by_namespace, &other.shadows, other.stats)
    }
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

    /// The shadow template `name` that a pod in `namespace` would get if shadow sources were
    /// enforced: own namespace first, then the platform namespace — unless an enforced
    /// template nearer to the pod would still win.
    pub fn lookup_shadow(&self, namespace: &str, name: &str) -> Option<Arc<TemplateEntry>> {
        if self.shadows.is_empty() {
            return None;
        }
        for ns in [namespace, self.platform_namespace.as_str()] {
            if let Some(shadow) = self.shadows.get(ns).and_then(|s| s.get(name)) {
                return Some(shadow.clone());
            }
            if self.by_namespace.get(ns).is_some_and(|n| n.contains_key(name)) {
                return None;
            }
        }
        None
    }

    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// How many layer combinations this index keeps composed.
    pub fn compositions_cached(&self) -> usize {
        self.compositions.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The composition of `layers` (two or more, templates of this index), composed on first use.
    pub fn composed(&self, layers: &[Layer<'_>]) -> Arc<Composition<'static>> {
        let key: LayersKey =
            layers.iter().map(|l| (std::ptr::from_ref::<PodTemplate>(l.template) as usize, l.role)).collect();
        if let Some(found) = self.compositions.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return found.clone();
        }
        let composition = Arc::new(compose(layers).into_owned());
        let mut cache = self.compositions.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() < COMPOSITIONS_MAX {
            cache.insert(key, composition.clone());
        }
        composition
    }
}

/// A fixed index is a store too (tests, and the directory store's contents).
impl TemplateStore for TemplateIndex {
    fn lookup(&self, namespace: &str, name: &str) -> Lookup {
        TemplateIndex::lookup(self, namespace, name)
    }

    fn lookup_shadow(&self, namespace: &str, name: &str) -> Option<Arc<TemplateEntry>> {
        TemplateIndex::lookup_shadow(self, namespace, name)
    }

    fn snapshot(&self) -> Snapshot<'_> {
        Snapshot::Fixed(self)
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn stats(&self) -> StoreStats {
        self.stats
    }
}
