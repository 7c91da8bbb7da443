//! The merge rules (SPEC §4), pure: no I/O, no async. [`merge`] edits a pod document
//! ([`crate::doc`]) in place, opening only what the template touches; [`merge_pod`] is the same
//! as a function `(pod, template) -> pod` on values.
//!
//! The template is the base, the pod the overlay: what the pod sets explicitly wins. The merge
//! works on the pod's JSON as the API server sent it, so fields newer than our typed model pass
//! through untouched. Every rule is written so that merging a merged pod again changes nothing.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use serde_json::value::RawValue;
use serde_json::Value;

use crate::doc::{Document, Kind, Node, Object};
use crate::template::PodTemplate;

mod compose;
mod explain;
pub(crate) mod rules;
pub use compose::{compose, Composition, Conflict, Layer, Role};
pub use explain::{differences, explain, Change};
pub(crate) use rules::{api_default, list_rule, ContainerRule, Ctx, ListRule};

/// Annotations that name a pod's primary container, most specific first (§4).
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";
pub const PRIMARY_CONTAINER_ANNOTATION: &str = "primary_container_name";

/// The result of a merge: the new pod, and what the user should hear about.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub pod: Value,
    pub warnings: Vec<String>,
}

/// Merges `template` into `pod` (a core/v1 Pod as JSON): [`merge`] on a `Value`, for tools and
/// tests. The pod goes through the same raw-JSON path as a request's.
pub fn merge_pod(pod: &Value, template: &PodTemplate) -> Merged {
    let raw = RawValue::from_string(pod.to_string()).expect("a Value serializes to valid JSON");
    let document = Document::new(&raw);
    let mut doc = document.root();
    let warnings = merge(&mut doc, template);
    Merged { pod: doc.to_value(), warnings }
}

/// [`merge_pod`] with the template's podSpec read as a `serde_json::Value` tree, as templates
/// were kept before they became canonical JSON text: the oracle of the differential tests
/// (`tests/merge_props.rs`, the `merge_patch` fuzz target) that the compact form merges the same.
pub fn merge_pod_reference(pod: &Value, template: &PodTemplate) -> Merged {
    let spec = Value::Object(template.pod_spec());
    let raw = RawValue::from_string(pod.to_string()).expect("a Value serializes to valid JSON");
    let document = Document::new(&raw);
    let mut doc = document.root();
    let warnings = merge_spec(&mut doc, template, &Node::Value(Cow::Borrowed(&spec)));
    Merged { pod: doc.to_value(), warnings }
}

/// Merges `template` into the pod document `pod`, in place; returns the warnings. Only the
/// parts of the pod the template touches are opened; values are borrowed from the template.
pub fn merge<'a>(pod: &mut Node<'a>, template: &'a PodTemplate) -> Vec<String> {
    merge_spec(pod, template, &template.spec())
}

/// [`merge`] with the template's podSpec given as `pod_spec`.
fn merge_spec<'a>(pod: &mut Node<'a>, template: &'a PodTemplate, pod_spec: &Node<'a>) -> Vec<String> {
    let mut warnings = Vec::new();
    let Some(root) = pod.as_object_mut() else {
        return warnings;
    };

    let meta = root.object_entry("metadata");
    fill_string_map(meta, "labels", &template.labels);
    fill_string_map(meta, "annotations", &template.annotations);
    let pod_name = meta.get("name").and_then(Node::as_str).map(Cow::into_owned).unwrap_or_default();
    // Resolved on the merged annotations, so a template that sets the default-container
    // annotation picks the same primary on the first pass and on any reinvocation.
    let annotations = meta.get("annotations");
    let named = [DEFAULT_CONTAINER_ANNOTATION, PRIMARY_CONTAINER_ANNOTATION].map(|k| annotations?.str_field(k));

    if template.has_pod_spec() {
        let spec = root.object_entry("spec");
        // Opened once here: names are read several times below, and most containers get filled.
        for field in ["containers", "initContainers"] {
            for c in spec.get_mut(field).and_then(Node::as_array_mut).into_iter().flatten() {
                c.as_object_mut();
            }
        }
        let template_spec = entries(pod_spec);
        let primary = primary_container(spec, &named, &pod_name, template);
        ContainerList::containers(primary.as_deref()).merge(spec, template, &template_spec, &mut warnings);
        let primary_init = primary_init_container(spec, template);
        ContainerList::init_containers(primary_init.as_deref()).merge(spec, template, &template_spec, &mut warnings);

        for (key, base) in template_spec {
            if matches!(&*key, "containers" | "initContainers") {
                continue;
            }
            fill_field(spec, key, &base, Ctx::PodSpec);
        }
    }
    warnings
}

/// True when the pod's value is what the API server fills in by itself: such a value was most
/// likely not chosen by the pod's author, so the template may replace it (§4 "Scalars").
fn is_api_default(ctx: Ctx, key: &str, value: &Value, owner: &Object<'_>) -> bool {
    let image = || owner.get("image").and_then(Node::as_str).unwrap_or_default().into_owned();
    api_default(ctx, key, image).is_some_and(|default| *value == default)
}

/// The entries of a template object (one level of its text, split), or none.
fn entries<'a>(node: &Node<'a>) -> Object<'a> {
    node.entries().map(Cow::into_owned).unwrap_or_default()
}

/// The elements of a template array (one level of its text, split), or none.
fn elements<'a>(node: &Node<'a>) -> Vec<Node<'a>> {
    node.elements().map(Cow::into_owned).unwrap_or_default()
}

/// Fills `owner[key]` from the template's `base`, the pod's value winning.
fn fill_field<'a>(owner: &mut Object<'a>, key: Cow<'a, str>, base: &Node<'a>, ctx: Ctx) {
    let replace = match owner.get(&key) {
        None => true,
        Some(v) => match v.kind() {
            Kind::Null => true,
            Kind::Object | Kind::Array => false,
            _ => {
                let v = v.to_value();
                is_api_default(ctx, &key, &v, owner) && *base != v
            }
        },
    };
    if replace {
        owner.insert(key, base.clone());
        return;
    }
    let Some(overlay) = owner.get_mut(&key) else {
        return;
    };
    match base.kind() {
        Kind::Object => {
            let b = entries(base);
            if let (false, Some(o)) = (b.is_empty(), overlay.as_object_mut()) {
                let child = ctx.child(&key);
                for (k, bv) in b {
                    fill_field(o, k, &bv, child);
                }
            }
        }
        Kind::Array => {
            let b = elements(base);
            if let (false, Some(o)) = (b.is_empty(), overlay.as_array_mut()) {
                merge_list(o, b, list_rule(&key));
            }
        }
        _ => {}
    }
}

fn merge_list<'a>(overlay: &mut Vec<Node<'a>>, base: Vec<Node<'a>>, rule: ListRule) {
    // The pod's entries as values, for the (rare) comparisons of whole entries.
    let mut existing: Option<Vec<Value>> = None;
    let mut contains =
        |b: &Value| existing.get_or_insert_with(|| overlay.iter().map(Node::to_value).collect()).contains(b);
    let added: Vec<Node<'a>> = match rule {
        ListRule::Atomic if overlay.is_empty() => base,
        ListRule::Atomic => return,
        ListRule::Keyed(key) => {
            let mut seen: HashSet<String> = overlay.iter().filter_map(|o| key.of(o)).collect();
            base.into_iter()
                .filter(|b| match key.of(b) {
                    Some(k) => seen.insert(k),
                    None => !contains(&b.to_value()),
                })
                .collect()
        }
        ListRule::Union => {
            let (mut added, mut added_values) = (Vec::new(), Vec::new());
            for b in base {
                let value = b.to_value();
                if !contains(&value) && !added_values.contains(&value) {
                    added.push(b);
                    added_values.push(value);
                }
            }
            added
        }
    };
    if !added.is_empty() {
        overlay.splice(0..0, added);
    }
}

/// Unions `meta[field]` with the template's map; the pod's value stays on a clash.
fn fill_string_map<'a>(meta: &mut Object<'a>, field: &'static str, base: &'a BTreeMap<String, String>) {
    if base.is_empty() {
        return;
    }
    let target = meta.object_entry(field);
    for (k, v) in base {
        if target.get(k).is_none_or(|existing| existing.kind() == Kind::Null) {
            target.insert(k.as_str(), Node::Value(Cow::Owned(Value::String(v.clone()))));
        }
    }
}

/// The names of the containers in the pod's `spec[field]`.
fn container_names(spec: &Object<'_>, field: &str) -> Vec<String> {
    let elements = spec.get(field).and_then(Node::elements);
    elements.iter().flat_map(|e| e.iter()).filter_map(|c| c.str_field("name")).collect()
}

/// The pod's primary container, first rule that matches (§4).
/// `named`: the values of the default-container and primary_container_name annotations.
fn primary_container(
    spec: &Object<'_>,
    named: &[Option<String>; 2],
    pod_name: &str,
    template: &PodTemplate,
) -> Option<String> {
    let names = container_names(spec, "containers");
    let exists = |n: &str| names.iter().any(|c| c == n);
    named
        .iter()
        .flatten()
        .map(String::as_str)
        .find(|n| exists(n))
        .or_else(|| Some(template.primary_container_name.as_str()).filter(|n| exists(n)))
        .or_else(|| Some(pod_name).filter(|n| !n.is_empty() && exists(n) && !defined_by_template(template, n)))
        .map(str::to_owned)
        .or_else(|| names.iter().find(|n| !defined_by_template(template, n)).cloned())
}

/// A container the template could add as a sidecar: never chosen as primary by the fallback
/// rules, or the choice would change once it has been added.
fn defined_by_template(template: &PodTemplate, name: &str) -> bool {
    !template.is_reserved_name(name) && template.container_names("containers").iter().any(|n| n == name)
}

/// The init container that gets the template's `primary-init`: the pod's first init container
/// that the template does not define by name. Init containers the template adds come first in the
/// merged pod, so skipping them keeps the choice stable on reinvocation.
fn primary_init_container(spec: &Object<'_>, template: &PodTemplate) -> Option<String> {
    let defined = template.container_names("initContainers");
    container_names(spec, "initContainers").into_iter().find(|n| !defined.contains(n))
}

/// One of the two container lists and its template names.
struct ContainerList<'a> {
    rule: &'static ContainerRule,
    primary: Option<&'a str>,
}

impl<'a> ContainerList<'a> {
    fn containers(primary: Option<&'a str>) -> Self {
        ContainerList { rule: &rules::CONTAINERS, primary }
    }

    fn init_containers(primary: Option<&'a str>) -> Self {
        ContainerList { rule: &rules::INIT_CONTAINERS, primary }
    }

    fn merge<'t>(
        &self,
        spec: &mut Object<'t>,
        t: &'t PodTemplate,
        template_spec: &Object<'t>,
        warnings: &mut Vec<String>,
    ) {
        let field = self.rule.field;
        let templates = template_spec.get(field).map(elements).unwrap_or_default();
        if templates.is_empty() {
            return;
        }
        // Every template container has a name (validated), so the names match the list.
        let names = t.container_names(field);
        let find = |name: &str| names.iter().position(|n| n == name).map(|i| &templates[i]);
        let default = find(self.rule.default_name);
        let primary_template = find(self.rule.primary_template(t));

        let added = self.to_add(spec, t, &templates, default, warnings);
        if !spec.contains_key(field) {
            spec.insert(field, Node::empty_array());
        }
        let Some(list) = spec.get_mut(field).and_then(Node::as_array_mut) else {
            return;
        };
        for c in list.iter_mut() {
            let name = c.str_field("name").unwrap_or_default();
            let is_primary = self.primary == Some(name.as_str());
            let same_name = if t.is_reserved_name(&name) { None } else { find(&name) };
            // The most specific first: each layer only fills what the ones before left unset.
            let layers = [same_name, is_primary.then_some(primary_template).flatten(), default];
            if layers.iter().all(Option::is_none) {
                continue;
            }
            if let Some(c) = c.as_object_mut() {
                for layer in layers.into_iter().flatten() {
                    fill_object(c, layer);
                }
            }
        }
        if self.rule.add_first {
            list.splice(0..0, added);
        } else {
            list.extend(added);
        }
        if list.is_empty() {
            spec.remove(field);
        }
    }

    /// The template's containers of this list that the pod lacks, `default` filled in: added
    /// unless reserved, named like a container of the other list, or without an image (warned).
    fn to_add<'t>(
        &self,
        spec: &Object<'t>,
        t: &'t PodTemplate,
        templates: &[Node<'t>],
        default: Option<&Node<'t>>,
        warnings: &mut Vec<String>,
    ) -> Vec<Node<'t>> {
        let (field, other) = (self.rule.field, self.rule.other);
        let own_names = container_names(spec, field);
        // Container names are unique across both lists of a pod.
        let other_names = container_names(spec, other);
        let mut added = Vec::new();
        for (tc, name) in templates.iter().zip(t.container_names(field)) {
            if t.is_reserved_name(name) || own_names.contains(name) {
                continue;
            }
            if other_names.contains(name) {
                warnings.push(format!(
                    "template container {name:?} not added to {field}: the pod has a container of that name in {other}"
                ));
                continue;
            }
            if tc.str_field("image").is_none_or(|image| image.is_empty()) {
                warnings.push(format!(
                    "template container {name:?} matches no container of the pod and has no image: not added"
                ));
                continue;
            }
            let mut sidecar = tc.clone();
            if let (Some(c), Some(default)) = (sidecar.as_object_mut(), default) {
                fill_object(c, default);
            }
            added.push(sidecar);
        }
        added
    }
}

/// Fills a container from a template container (all fields but `name`).
fn fill_object<'a>(overlay: &mut Object<'a>, base: &Node<'a>) {
    for (k, bv) in entries(base) {
        if k != "name" {
            fill_field(overlay, k, &bv, Ctx::Container);
        }
    }
}

#[cfg(test)]
mod tests;
