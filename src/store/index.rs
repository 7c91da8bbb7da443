//! The immutable snapshot admissions read, without locks: every template by namespace and name,
//! looked up in the pod's namespace, then the platform namespace.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Lookup, StoreStats, TemplateEntry, TemplateStore};

/// An immutable snapshot of all templates, keyed by namespace then template name.
#[derive(Debug, Default)]
pub struct TemplateIndex {
    pub(super) platform_namespace: String,
    pub(super) by_namespace: HashMap<String, HashMap<String, Arc<TemplateEntry>>>,
    pub(super) stats: StoreStats,
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
