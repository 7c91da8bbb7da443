//! The merge rules (SPEC §4) as a pure function: `(pod, template) -> pod`. No I/O, no async.
//!
//! The template is the base, the pod the overlay: what the pod sets explicitly wins. The merge
//! works on the pod's JSON as the API server sent it, so fields newer than our typed model pass
//! through untouched. Every rule is written so that merging a merged pod again changes nothing.

use std::collections::{BTreeMap, HashSet};

use serde_json::{Map, Value};

use crate::template::PodTemplate;

/// Annotations that name a pod's primary container, most specific first (§4).
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";
pub const PRIMARY_CONTAINER_ANNOTATION: &str = "primary_container_name";

/// The result of a merge: the new pod, and what the user should hear about.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub pod: Value,
    pub warnings: Vec<String>,
}

/// Merges `template` into `pod` (a core/v1 Pod as JSON).
pub fn merge_pod(pod: &Value, template: &PodTemplate) -> Merged {
    let mut out = pod.clone();
    let mut warnings = Vec::new();
    let Some(root) = out.as_object_mut() else {
        return Merged { pod: out, warnings };
    };

    let meta = object_entry(root, "metadata");
    fill_string_map(meta, "labels", &template.labels);
    fill_string_map(meta, "annotations", &template.annotations);
    let pod_name = meta.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
    // Resolved on the merged annotations, so a template that sets the default-container
    // annotation picks the same primary on the first pass and on any reinvocation.
    let annotation = |key: &str| meta.get("annotations")?.get(key)?.as_str().map(str::to_owned);
    let named = [annotation(DEFAULT_CONTAINER_ANNOTATION), annotation(PRIMARY_CONTAINER_ANNOTATION)];

    if !template.pod_spec.is_empty() {
        let spec = object_entry(root, "spec");
        let primary = primary_container(spec, &named, &pod_name, template);
        ContainerList::containers(template, primary.as_deref()).merge(spec, template, &mut warnings);
        let primary_init = primary_init_container(spec, template);
        ContainerList::init_containers(primary_init.as_deref()).merge(spec, template, &mut warnings);

        for (key, base) in &template.pod_spec {
            if matches!(key.as_str(), "containers" | "initContainers") {
                continue;
            }
            fill_field(spec, key, base, Ctx::PodSpec);
        }
    }
    Merged { pod: out, warnings }
}

/// Where in a pod a field sits: decides which API defaults count as unset.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    PodSpec,
    Container,
    Probe,
    Other,
}

impl Ctx {
    fn child(self, key: &str) -> Ctx {
        match (self, key) {
            (Ctx::Container, "livenessProbe" | "readinessProbe" | "startupProbe") => Ctx::Probe,
            _ => Ctx::Other,
        }
    }
}

/// True when the pod's value is what the API server fills in by itself: such a value was most
/// likely not chosen by the pod's author, so the template may replace it (§4 "Scalars").
/// Keep `README.md` ("Defaulted fields") in step with this list.
fn is_api_default(ctx: Ctx, key: &str, value: &Value, owner: &Map<String, Value>) -> bool {
    match ctx {
        Ctx::PodSpec => match key {
            "schedulerName" => value == "default-scheduler",
            "terminationGracePeriodSeconds" => value == 30,
            "dnsPolicy" => value == "ClusterFirst",
            "restartPolicy" => value == "Always",
            "enableServiceLinks" => value == true,
            "serviceAccountName" | "serviceAccount" => value == "default",
            "preemptionPolicy" => value == "PreemptLowerPriority",
            "priority" => value == 0,
            _ => false,
        },
        Ctx::Container => match key {
            "terminationMessagePath" => value == "/dev/termination-log",
            "terminationMessagePolicy" => value == "File",
            "imagePullPolicy" => {
                let image = owner.get("image").and_then(Value::as_str).unwrap_or_default();
                value == default_pull_policy(image)
            }
            _ => false,
        },
        Ctx::Probe => match key {
            "timeoutSeconds" | "successThreshold" => value == 1,
            "periodSeconds" => value == 10,
            "failureThreshold" => value == 3,
            _ => false,
        },
        Ctx::Other => false,
    }
}

/// The API server's default: `Always` for `:latest` or an untagged image, else `IfNotPresent`.
fn default_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let name = image.rsplit('/').next().unwrap_or(image);
    match name.split_once(':') {
        Some((_, tag)) if tag != "latest" => "IfNotPresent",
        _ => "Always",
    }
}

/// How entries of a list are matched (§4 "Keyed lists").
enum ListRule {
    /// The pod's entry with the same key stays; the template's other entries are added first.
    Keyed(fn(&Value) -> Option<String>),
    /// The pod's list, if not empty, is kept as a whole.
    Atomic,
    /// Union without duplicates, template entries first.
    Union,
}

fn list_rule(key: &str) -> ListRule {
    fn by(v: &Value, field: &str) -> Option<String> {
        v.get(field).and_then(Value::as_str).map(str::to_owned)
    }
    match key {
        "env" | "volumes" | "imagePullSecrets" | "resourceClaims" | "schedulingGates" => {
            ListRule::Keyed(|v| by(v, "name"))
        }
        "volumeMounts" => ListRule::Keyed(|v| by(v, "mountPath")),
        "volumeDevices" => ListRule::Keyed(|v| by(v, "devicePath")),
        "hostAliases" => ListRule::Keyed(|v| by(v, "ip")),
        "ports" => ListRule::Keyed(|v| {
            let port = v.get("containerPort")?;
            let protocol = v.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            Some(format!("{port}/{protocol}"))
        }),
        "command" | "args" => ListRule::Atomic,
        _ => ListRule::Union,
    }
}

/// Fills `owner[key]` from the template's `base`, the pod's value winning.
fn fill_field(owner: &mut Map<String, Value>, key: &str, base: &Value, ctx: Ctx) {
    let replace = match owner.get(key) {
        None | Some(Value::Null) => true,
        Some(v) if !v.is_object() && !v.is_array() => is_api_default(ctx, key, v, owner) && v != base,
        Some(_) => false,
    };
    if replace {
        owner.insert(key.to_owned(), base.clone());
        return;
    }
    let Some(overlay) = owner.get_mut(key) else { return };
    match (overlay, base) {
        (Value::Object(o), Value::Object(b)) => {
            let child = ctx.child(key);
            for (k, bv) in b {
                fill_field(o, k, bv, child);
            }
        }
        (Value::Array(o), Value::Array(b)) => merge_list(o, b, list_rule(key)),
        _ => {}
    }
}

fn merge_list(overlay: &mut Vec<Value>, base: &[Value], rule: ListRule) {
    let added: Vec<Value> = match rule {
        ListRule::Atomic if overlay.is_empty() => base.to_vec(),
        ListRule::Atomic => return,
        ListRule::Keyed(key_of) => {
            let mut seen: HashSet<String> = overlay.iter().filter_map(key_of).collect();
            base.iter()
                .filter(|b| match key_of(b) {
                    Some(k) => seen.insert(k),
                    None => !overlay.contains(b),
                })
                .cloned()
                .collect()
        }
        ListRule::Union => {
            let mut added: Vec<Value> = Vec::new();
            for b in base {
                if !overlay.contains(b) && !added.contains(b) {
                    added.push(b.clone());
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
fn fill_string_map(meta: &mut Map<String, Value>, field: &str, base: &BTreeMap<String, String>) {
    if base.is_empty() {
        return;
    }
    let target = object_entry(meta, field);
    for (k, v) in base {
        match target.get(k) {
            Some(existing) if !existing.is_null() => {}
            _ => {
                target.insert(k.clone(), Value::String(v.clone()));
            }
        }
    }
}

/// `map[key]` as an object, created (or replacing a null) when missing.
fn object_entry<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let slot = map.entry(key.to_owned()).or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut().expect("just made an object")
}

fn container_names(spec: &Map<String, Value>, field: &str) -> Vec<String> {
    spec.get(field)
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(|c| c.get("name")?.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// The pod's primary container, first rule that matches (§4).
/// `named`: the values of the default-container and primary_container_name annotations.
fn primary_container(
    spec: &Map<String, Value>,
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
    !template.is_reserved_name(name) && container_names(&template.pod_spec, "containers").iter().any(|n| n == name)
}

/// The init container that gets the template's `primary-init`: the pod's first init container
/// that the template does not define by name. Init containers the template adds come first in the
/// merged pod, so skipping them keeps the choice stable on reinvocation.
fn primary_init_container(spec: &Map<String, Value>, template: &PodTemplate) -> Option<String> {
    let defined = container_names(&template.pod_spec, "initContainers");
    container_names(spec, "initContainers").into_iter().find(|n| !defined.contains(n))
}

/// One of the two container lists and its template names.
struct ContainerList<'a> {
    field: &'static str,
    default_name: &'static str,
    /// The template container that goes onto the primary one (`primaryContainerName` or `primary-init`).
    primary_template: &'a str,
    primary: Option<&'a str>,
    /// Sidecars go after the pod's containers; template init containers before the pod's.
    add_first: bool,
}

impl<'a> ContainerList<'a> {
    fn containers(t: &'a PodTemplate, primary: Option<&'a str>) -> Self {
        ContainerList {
            field: "containers",
            default_name: "default",
            primary_template: &t.primary_container_name,
            primary,
            add_first: false,
        }
    }

    fn init_containers(primary: Option<&'a str>) -> Self {
        ContainerList {
            field: "initContainers",
            default_name: "default-init",
            primary_template: "primary-init",
            primary,
            add_first: true,
        }
    }

    fn other_field(&self) -> &'static str {
        if self.field == "containers" { "initContainers" } else { "containers" }
    }

    fn merge(&self, spec: &mut Map<String, Value>, t: &PodTemplate, warnings: &mut Vec<String>) {
        let templates: &[Value] = t.pod_spec.get(self.field).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        if templates.is_empty() {
            return;
        }
        let find = |name: &str| templates.iter().find(|c| c.get("name").and_then(Value::as_str) == Some(name));
        let default = find(self.default_name);
        let primary_template = find(self.primary_template);

        let own_names = container_names(spec, self.field);
        // Container names are unique across both lists of a pod.
        let other_names = container_names(spec, self.other_field());
        let mut added = Vec::new();
        for tc in templates {
            let name = tc.get("name").and_then(Value::as_str).unwrap_or_default();
            if t.is_reserved_name(name) || own_names.iter().any(|n| n == name) {
                continue;
            }
            if other_names.iter().any(|n| n == name) {
                warnings.push(format!(
                    "template container {name:?} not added to {}: the pod has a container of that name in {}",
                    self.field,
                    self.other_field()
                ));
                continue;
            }
            if tc.get("image").and_then(Value::as_str).is_none_or(str::is_empty) {
                warnings.push(format!(
                    "template container {name:?} matches no container of the pod and has no image: not added"
                ));
                continue;
            }
            added.push(overlay_value(tc.clone(), default));
        }

        let list = spec.entry(self.field).or_insert_with(|| Value::Array(Vec::new()));
        let Some(list) = list.as_array_mut() else { return };
        for c in list.iter_mut() {
            let name = c.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
            let is_primary = self.primary == Some(name.as_str());
            let same_name = if t.is_reserved_name(&name) { None } else { find(&name) };
            let base = [default, is_primary.then_some(primary_template).flatten(), same_name]
                .into_iter()
                .flatten()
                .fold(None, |acc: Option<Value>, next| Some(overlay_value(next.clone(), acc.as_ref())));
            if let (Some(base), Some(c)) = (base, c.as_object_mut()) {
                fill_object(c, &base, Ctx::Container);
            }
        }
        if self.add_first {
            list.splice(0..0, added);
        } else {
            list.extend(added);
        }
        if list.is_empty() {
            spec.remove(self.field);
        }
    }
}

/// `overlay` filled from `base` with the container rules.
fn overlay_value(mut overlay: Value, base: Option<&Value>) -> Value {
    if let (Some(o), Some(b)) = (overlay.as_object_mut(), base) {
        fill_object(o, b, Ctx::Container);
    }
    overlay
}

fn fill_object(overlay: &mut Map<String, Value>, base: &Value, ctx: Ctx) {
    if let Some(b) = base.as_object() {
        for (k, bv) in b {
            if k != "name" {
                fill_field(overlay, k, bv, ctx);
            }
        }
    }
}

#[cfg(test)]
mod tests;
