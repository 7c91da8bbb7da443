//! Layers (SPEC §8): several templates composed into one, lowest first, with the §4 rules — the
//! lower result is the base, the higher layer the overlay. The pod is merged onto the result
//! afterwards by [`super::merge`], so it wins over every layer.
//!
//! Composition is associative for these rules, so "each layer onto the result of the ones below"
//! is one fold. Conflicts are recorded only between named templates: a default exists to be
//! overridden, so a higher layer replacing a default's value is silent.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::rules::CONTAINER_KEY;
use super::{list_rule, ListRule};
use crate::doc::Node;
use crate::template::{PodTemplate, DEFAULT_PRIMARY_CONTAINER_NAME};

/// What a layer is for: decides whether overriding it is a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The platform default or the namespace default: higher layers override it silently.
    Default,
    /// A template the pod names (annotation list or environment label).
    Named,
}

/// One layer, in order: index 0 is the lowest.
#[derive(Debug, Clone, Copy)]
pub struct Layer<'t> {
    pub role: Role,
    pub template: &'t PodTemplate,
}

/// Two named templates setting one field to different values; the higher one won.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The field, e.g. `spec.containers[name=primary].env[name=MODE]` or `metadata.labels["team"]`.
    pub path: String,
    /// Index (into the layers) of the template whose value was overridden.
    pub lower: usize,
    /// Index of the template whose value won.
    pub higher: usize,
}

/// The layers composed into one template.
#[derive(Debug, Clone)]
pub struct Composition<'t> {
    /// Borrowed when there is a single layer: the one-template path does no extra work.
    pub template: Cow<'t, PodTemplate>,
    pub conflicts: Vec<Conflict>,
}

impl Composition<'_> {
    /// The composition owning its template (to be kept beyond the layers' borrow).
    pub fn into_owned(self) -> Composition<'static> {
        Composition { template: Cow::Owned(self.template.into_owned()), conflicts: self.conflicts }
    }
}

/// Composes `layers` (lowest first) into the one template the pod is merged with.
pub fn compose<'t>(layers: &[Layer<'t>]) -> Composition<'t> {
    if let [only] = layers {
        return Composition { template: Cow::Borrowed(only.template), conflicts: Vec::new() };
    }
    // The highest layer that names the primary container decides its name for all layers: each
    // layer's own primary container is that container.
    let named_primary = layers.iter().rev().map(|l| l.template).find(|t| t.primary_container_name_set);
    let primary_container_name =
        named_primary.map_or(DEFAULT_PRIMARY_CONTAINER_NAME, |t| t.primary_container_name.as_str()).to_owned();
    let (mut labels, mut annotations, mut pod_spec) = (BTreeMap::new(), BTreeMap::new(), Map::new());
    let mut c = Composer { track: layers.iter().filter(|l| l.role == Role::Named).count() >= 2, ..Composer::default() };
    let mut named_primary_so_far: Option<(usize, &str)> = None;
    for (i, layer) in layers.iter().enumerate() {
        let t = layer.template;
        c.layer = i;
        c.tracking = c.track && layer.role == Role::Named;
        if c.tracking && t.primary_container_name_set {
            let name = t.primary_container_name.as_str();
            if let Some((lower, _)) = named_primary_so_far.filter(|(_, n)| *n != name) {
                c.conflicts.push(Conflict { path: "primaryContainerName".into(), lower, higher: i });
            }
            named_primary_so_far = Some((i, name));
        }
        c.string_map(&mut labels, &t.labels, "metadata.labels");
        c.string_map(&mut annotations, &t.annotations, "metadata.annotations");
        let spec = with_primary_named(t, &primary_container_name);
        c.push(|p| p.push_str("spec"));
        c.object(&mut pod_spec, &spec);
        c.pop();
    }
    let set = named_primary.is_some();
    let out = PodTemplate::new(primary_container_name, set, labels, annotations, pod_spec);
    Composition { template: Cow::Owned(out), conflicts: c.conflicts }
}

/// The layer's podSpec with its primary container renamed to the composition's primary name.
/// A container already carrying that name is folded under it (the layer's primary wins).
fn with_primary_named(t: &PodTemplate, primary: &str) -> Map<String, Value> {
    let own = t.primary_container_name.as_str();
    let mut spec = t.pod_spec();
    if own == primary || !t.container_names("containers").iter().any(|n| n == own) {
        return spec;
    }
    let list = spec.get_mut("containers").and_then(Value::as_array_mut).expect("checked above");
    let at = list.iter().position(named(own)).expect("checked above");
    let mut renamed = list.remove(at);
    renamed["name"] = Value::String(primary.to_owned());
    if let Some(i) = list.iter().position(named(primary)) {
        let mut folded = list.remove(i);
        if let (Value::Object(base), Value::Object(overlay)) = (&mut folded, &renamed) {
            Composer::default().object(base, overlay);
        }
        renamed = folded;
    }
    list.insert(at.min(list.len()), renamed);
    spec
}

fn named(name: &str) -> impl Fn(&Value) -> bool + '_ {
    move |c| c.get("name").and_then(Value::as_str) == Some(name)
}

#[derive(Default)]
struct Composer {
    /// Conflicts are looked for at all (two named layers or more).
    track: bool,
    /// The current layer is named and `track` is set: record origins, report conflicts.
    tracking: bool,
    layer: usize,
    /// Path → the named layer that set the value there (or the subtree under it).
    origins: HashMap<String, usize>,
    /// The current path in display form, and where each of its segments starts.
    path: String,
    segments: Vec<usize>,
    conflicts: Vec<Conflict>,
}

impl Composer {
    fn push(&mut self, segment: impl FnOnce(&mut String)) {
        self.segments.push(self.path.len());
        segment(&mut self.path);
    }

    fn pop(&mut self) {
        let start = self.segments.pop().expect("balanced push/pop");
        self.path.truncate(start);
    }

    /// The overlay's value is now at the current path. If it replaced a different value a named
    /// layer had set, that is a conflict. Either way the current layer is its origin from now on.
    fn took(&mut self, replaced_a_different_value: bool) {
        if self.tracking {
            self.conflict_if(replaced_a_different_value);
            self.origins.insert(self.path.clone(), self.layer);
        }
    }

    fn conflict_if(&mut self, replaced_a_different_value: bool) {
        if !(self.tracking && replaced_a_different_value) {
            return;
        }
        // The value at the path, or the subtree it belongs to, as set by a named layer.
        let lower = std::iter::once(self.path.len())
            .chain(self.segments.iter().rev().copied())
            .find_map(|end| self.origins.get(&self.path[..end]).copied());
        if let Some(lower) = lower {
            self.conflicts.push(Conflict { path: self.path.clone(), lower, higher: self.layer });
        }
    }

    fn string_map(&mut self, base: &mut BTreeMap<String, String>, overlay: &BTreeMap<String, String>, field: &str) {
        for (k, v) in overlay {
            let previous = base.insert(k.clone(), v.clone());
            if self.tracking {
                self.push(|p| p.push_str(field));
                self.push(|p| push_key(p, k));
                self.took(previous.is_some_and(|p| p != *v));
                self.pop();
                self.pop();
            }
        }
    }

    fn object(&mut self, base: &mut Map<String, Value>, overlay: &Map<String, Value>) {
        for (k, ov) in overlay {
            self.push(|p| push_key(p, k));
            match (k.as_str(), base.get_mut(k)) {
                (_, None) => {
                    base.insert(k.clone(), ov.clone());
                    self.took(false);
                }
                ("containers" | "initContainers", Some(Value::Array(b))) if ov.is_array() => self.containers(b, ov),
                (_, Some(b)) => self.value(k, b, ov),
            }
            self.pop();
        }
    }

    fn value(&mut self, key: &str, base: &mut Value, overlay: &Value) {
        match (base, overlay) {
            (Value::Object(b), Value::Object(o)) => self.object(b, o),
            (Value::Array(b), Value::Array(o)) => self.list(key, b, o),
            (b, o) => {
                let differs = b != o;
                *b = o.clone();
                self.took(differs);
            }
        }
    }

    /// The base's entries the overlay lacks first, then the overlay's: the order the pod merge
    /// gives (template entries first), which keeps the fold associative.
    fn list(&mut self, key: &str, base: &mut Vec<Value>, overlay: &[Value]) {
        let keyed = match list_rule(key) {
            ListRule::Atomic => {
                if !overlay.is_empty() {
                    let differs = !base.is_empty() && base.as_slice() != overlay;
                    *base = overlay.to_vec();
                    self.took(differs);
                }
                return;
            }
            ListRule::Keyed(entry_key) => Some(entry_key),
            ListRule::Union => None,
        };
        let fields = keyed.map(|k| k.fields()).unwrap_or_default();
        let key_of = |v: &Value| keyed.and_then(|entry_key| entry_key.of(&Node::Value(Cow::Borrowed(v))));
        let overlay_keys: Vec<Option<String>> = overlay.iter().map(key_of).collect();
        let mut kept: Vec<Value> = Vec::with_capacity(base.len() + overlay.len());
        for b in base.drain(..) {
            let Some(k) = key_of(&b) else {
                if !overlay.contains(&b) && !kept.contains(&b) {
                    kept.push(b);
                }
                continue;
            };
            match overlay_keys.iter().position(|o| o.as_deref() == Some(k.as_str())) {
                None => kept.push(b),
                Some(i) if self.tracking => {
                    self.push(|p| push_entry(p, &fields, &k));
                    self.conflict_if(b != overlay[i]);
                    self.pop();
                }
                Some(_) => {}
            }
        }
        if self.tracking {
            for k in overlay_keys.iter().flatten() {
                self.push(|p| push_entry(p, &fields, k));
                self.took(false);
                self.pop();
            }
        }
        kept.extend(overlay.iter().cloned());
        *base = kept;
    }

    /// Containers by name, merged field by field; new ones appended.
    fn containers(&mut self, base: &mut Vec<Value>, overlay: &Value) {
        for oc in overlay.as_array().into_iter().flatten() {
            let name = oc.get("name").and_then(Value::as_str).unwrap_or_default();
            self.push(|p| push_entry(p, &CONTAINER_KEY.fields(), name));
            match (base.iter_mut().find(|b| b.get("name").and_then(Value::as_str) == Some(name)), oc) {
                (Some(Value::Object(b)), Value::Object(o)) => self.object(b, o),
                _ => {
                    base.push(oc.clone());
                    self.took(false);
                }
            }
            self.pop();
        }
    }
}

/// Appends `.key`, or `["key"]` when the key has characters that would make the path ambiguous.
fn push_key(path: &mut String, key: &str) {
    if !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        let _ = write!(path, "[{key:?}]");
    }
}

/// Appends `[fields=key]` for an entry of a keyed list (`fields`: `EntryKey::fields`).
fn push_entry(path: &mut String, fields: &str, key: &str) {
    let _ = write!(path, "[{fields}={key}]");
}

#[cfg(test)]
mod tests;
