//! `export-policy` (issue 14): a template as a `MutatingAdmissionPolicy` and its binding
//! (`admissionregistration.k8s.io/v1`), so that the API server applies it in-tree, without the
//! webhook. Pure: templates and names in, policy objects (or a refusal) out.
//!
//! The policy reproduces the §4 merge with JSON Patch mutations written in CEL. Whatever the
//! merge decides from the template alone is decided here, at export time; what depends on the
//! pod (is a field set, which container is primary, is a list entry there already) is a CEL
//! condition. Mutations run in order, each on the result of the one before, so the policy follows
//! the merge's steps: metadata, the pod's containers (same-name layer, primary, `default`), the
//! added sidecars, the same for init containers, the other podSpec fields, the applied annotation.
//! Every mutation only fills what is unset, so a reinvocation changes nothing (like the webhook).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::doc::Node;
use crate::merge::rules::{ContainerRule, CONTAINERS, INIT_CONTAINERS};
use crate::merge::{
    api_default, list_rule, merge_pod, Ctx, ListRule, DEFAULT_CONTAINER_ANNOTATION, PRIMARY_CONTAINER_ANNOTATION,
};
use crate::names::Names;
use crate::template::{PodTemplate, TemplateError, TemplateSource};

/// The label every exported object carries: `kubectl get mutatingadmissionpolicies -l ...` lists them.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "pod-template-webhook");

/// A template found in a template directory, as the webhook sees it.
#[derive(Debug, Clone)]
pub struct Found {
    pub source: TemplateSource,
    pub state: FoundState,
}

#[derive(Debug, Clone)]
pub enum FoundState {
    Ready(Arc<PodTemplate>),
    Broken(TemplateError),
    /// Another definition of the same name in the same namespace wins (SPEC §3, §8).
    Shadowed {
        by: TemplateSource,
    },
}

/// A policy and its bindings, ready for `kubectl apply`: one binding per selection of the chart's
/// webhook configuration (the environment label; managed pods with a task-name label and no
/// environment label), so that each pod is bound once.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    pub policy: Value,
    pub bindings: Vec<Value>,
}

/// Why a template is not exported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("does not parse: {0}")]
    Broken(TemplateError),
    #[error("never applied by the webhook: {by} defines the same name in the same namespace and wins")]
    Shadowed { by: String },
    #[error(
        "the webhook runs with --default-template {0:?}: its pods get the default layers below every template, \
         and separate policies apply in no defined order; keep these pods on the webhook"
    )]
    DefaultTemplate(String),
    #[error("cannot be expressed in CEL: {}", .0.join("; "))]
    Inexpressible(Vec<String>),
}

/// Exports every template of `found`: in the order given, each with its policy or its refusal.
/// `default_template` is the webhook's `--default-template`.
pub fn export_all(
    found: &[Found],
    names: &Names,
    default_template: Option<&str>,
) -> Vec<(TemplateSource, Result<Exported, Refusal>)> {
    let default_template = default_template.filter(|d| !d.is_empty());
    found
        .iter()
        .map(|f| {
            let exported = match (&f.state, default_template) {
                (FoundState::Broken(e), _) => Err(Refusal::Broken(e.clone())),
                (FoundState::Shadowed { by }, _) => Err(Refusal::Shadowed { by: by.describe() }),
                (FoundState::Ready(_), Some(default)) => Err(Refusal::DefaultTemplate(default.to_owned())),
                (FoundState::Ready(template), None) => {
                    let own_templates = own_namespaces(found, &f.source, names);
                    export(template, &f.source, names, &own_templates)
                }
            };
            (f.source.clone(), exported)
        })
        .collect()
}

/// For a platform template: the namespaces that define a template of the same name themselves,
/// where the webhook never applies the platform's (SPEC §3 "own namespace, then platform").
fn own_namespaces(found: &[Found], source: &TemplateSource, names: &Names) -> Vec<String> {
    if source.namespace != names.platform_namespace {
        return Vec::new();
    }
    let namespaces: BTreeSet<&str> = found
        .iter()
        .filter(|f| f.source.key == source.key && f.source.namespace != source.namespace)
        .map(|f| f.source.namespace.as_str())
        .collect();
    namespaces.into_iter().map(str::to_owned).collect()
}

/// The policy and binding for one template, from `source`, applied by the webhook to pods that
/// name it alone (annotation, else environment label) in its namespace — or, for a platform
/// template, in every namespace but `own_templates`.
pub fn export(
    template: &PodTemplate,
    source: &TemplateSource,
    names: &Names,
    own_templates: &[String],
) -> Result<Exported, Refusal> {
    let mut g = Gen::default();
    let mutations = g.mutations(template, &source.to_string(), names);
    if !g.problems.is_empty() {
        return Err(Refusal::Inexpressible(g.problems));
    }
    let name = object_name(source);
    let namespace_selector = if source.namespace == names.platform_namespace {
        if own_templates.is_empty() {
            json!({})
        } else {
            json!({"matchExpressions": [{"key": NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": own_templates}]})
        }
    } else {
        json!({"matchLabels": {NAMESPACE_NAME_LABEL: source.namespace}})
    };
    let metadata = json!({
        "name": name,
        "labels": {MANAGED_BY.0: MANAGED_BY.1},
        "annotations": {names.applied_annotation.as_str(): source.to_string()},
    });
    let policy = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicy",
        "metadata": metadata,
        "spec": {
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"],
            }]},
            "matchConditions": [{"name": "names-this-template", "expression": names_this_template(&source.key, names)}],
            "failurePolicy": "Fail",
            "reinvocationPolicy": "IfNeeded",
            "mutations": mutations.into_iter().map(|expression| json!({
                "patchType": "JSONPatch", "jsonPatch": {"expression": expression},
            })).collect::<Vec<_>>(),
        }
    });
    let bindings = object_selectors(names)
        .into_iter()
        .map(|(suffix, object_selector)| {
            json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingAdmissionPolicyBinding",
                "metadata": {"name": format!("{name}{suffix}"), "labels": {MANAGED_BY.0: MANAGED_BY.1}},
                "spec": {
                    "policyName": name,
                    "matchResources": {"namespaceSelector": namespace_selector, "objectSelector": object_selector},
                }
            })
        })
        .collect();
    Ok(Exported { policy, bindings })
}

/// The chart's objectSelectors (binding name suffix, selector), exclusive so that a pod is bound
/// once: pods with the environment label; managed pods with a task-name label and none (SPEC §9,
/// unless the task-name rule is off).
pub fn object_selectors(names: &Names) -> Vec<(&'static str, Value)> {
    let mut selectors =
        vec![("", json!({"matchExpressions": [{"key": names.environment_label, "operator": "Exists"}]}))];
    if !names.task_name_label.is_empty() {
        selectors.push((
            ".task-name",
            json!({"matchExpressions": [
                {"key": names.environment_label, "operator": "DoesNotExist"},
                {"key": names.managed_label, "operator": "In", "values": [names.managed_value]},
                {"key": names.task_name_label, "operator": "Exists"},
            ]}),
        ));
    }
    selectors
}

/// Set by the API server on every namespace: the only way a selector can name one.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// `pod-template.<namespace>.<name>`; a template name that is not a DNS label (`hello_world`)
/// is made one, with a hash of the original so that two such names never meet.
pub fn object_name(source: &TemplateSource) -> String {
    let mut label: String = source
        .key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect();
    label = label.trim_matches('-').to_owned();
    if label != source.key {
        let hash = Sha256::digest(source.key.as_bytes());
        let hex: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
        label = if label.is_empty() { hex } else { format!("{label}-{hex}") };
    }
    format!("pod-template.{}.{label}", source.namespace)
}

/// The pods that name exactly this template (`environment::Requested`, SPEC §8 layer 3, §9): the
/// annotation if it is not blank (a list of one name, spaces trimmed), else the environment label
/// if it is not blank, else for a managed pod its task-name label up to the first `.`.
fn names_this_template(key: &str, names: &Names) -> String {
    let rules = Rules::new(names);
    let key_cel = cel_string(key);
    let by_task_name = match &rules.task_name {
        // A name rule 3 never chooses: the environment ends at the first dot.
        Some((managed, task)) if !key.contains('.') => {
            format!("{managed} && {task}.startsWith({})", cel_string(&format!("{key}.")))
        }
        _ => "false".to_owned(),
    };
    let Rules { annotated, annotation, labelled, label, .. } = rules;
    format!("{annotated} ? {annotation}.trim() == {key_cel} : {labelled} ? {label} == {key_cel} : {by_task_name}")
}

/// `environment::Requested::read` in CEL, on `object`: each rule's condition and value.
struct Rules {
    /// The template annotation is there and not blank; its value.
    annotated: String,
    annotation: String,
    /// The environment label is there and not blank; its value.
    labelled: String,
    label: String,
    /// Unless rule 3 is off: the pod is managed and has a task-name label; that label's value.
    task_name: Option<(String, String)>,
}

impl Rules {
    fn new(names: &Names) -> Self {
        let labels = "object.metadata.labels";
        let (has_annotation, annotation) = map_entry("object.metadata.annotations", &names.template_annotation);
        let (has_label, label) = map_entry(labels, &names.environment_label);
        let task_name = (!names.task_name_label.is_empty()).then(|| {
            let (has_managed, managed) = map_entry(labels, &names.managed_label);
            let (has_task, task) = map_entry(labels, &names.task_name_label);
            let value = cel_string(&names.managed_value);
            (format!("{has_managed} && {managed} == {value} && {has_task}"), task)
        });
        Rules {
            annotated: format!("{has_annotation} && {annotation}.trim() != \"\""),
            annotation,
            labelled: format!("{has_label} && {label}.trim() != \"\""),
            label,
            task_name,
        }
    }

    /// The applied record's rule suffix as a CEL string expression: for a pod whose environment
    /// came from its task-name (SPEC §9), what `environment::Requested::recorded_rule` writes.
    fn recorded(&self, names: &Names) -> Option<String> {
        let (_, task) = self.task_name.as_ref()?;
        let prefix = cel_string(&crate::environment::recorded_task_name_prefix(names));
        Some(format!("({} || {} ? \"\" : {prefix} + {task})", self.annotated, self.labelled))
    }
}

/// `(is it there, its value)` for a key of a map field of the pod's metadata.
fn map_entry(map: &str, key: &str) -> (String, String) {
    let field = map.rsplit('.').next().unwrap_or(map);
    let parent = &map[..map.len() - field.len() - 1];
    let key = cel_string(key);
    (format!("(has({parent}.{field}) && {key} in {map})"), format!("{map}[{key}]"))
}

/// Fields of the pod that are maps (string keys, addressed `m["key"]`); every other object is a
/// struct (fields addressed `s.field`).
fn is_map_field(key: &str) -> bool {
    // `options`: flexVolume's map (dnsConfig's `options` is a list, never addressed as an owner).
    matches!(
        key,
        "labels"
            | "annotations"
            | "nodeSelector"
            | "limits"
            | "requests"
            | "overhead"
            | "volumeAttributes"
            | "matchLabels"
            | "options"
    )
}

/// A place in the pod: the CEL expression of the value there, its JSON Pointer (as a CEL string
/// expression), and whether it is a map.
#[derive(Debug, Clone)]
struct At {
    cel: String,
    path: Pointer,
    map: bool,
}

/// A JSON Pointer: a CEL prefix computed per pod (`"/spec/containers/" + string(i)`) and a fixed rest.
#[derive(Debug, Clone)]
struct Pointer {
    dynamic: Option<String>,
    fixed: String,
}

impl Pointer {
    fn fixed(path: &str) -> Self {
        Pointer { dynamic: None, fixed: path.to_owned() }
    }

    fn child(&self, key: &str) -> Self {
        let escaped = key.replace('~', "~0").replace('/', "~1");
        Pointer { dynamic: self.dynamic.clone(), fixed: format!("{}/{escaped}", self.fixed) }
    }

    fn cel(&self) -> String {
        match &self.dynamic {
            Some(d) if self.fixed.is_empty() => d.clone(),
            Some(d) => format!("{d} + {}", cel_string(&self.fixed)),
            None => cel_string(&self.fixed),
        }
    }
}

/// The code generator; records what it cannot express instead of failing at the first.
#[derive(Default)]
struct Gen {
    problems: Vec<String>,
}

/// The two container lists of a pod and their template names (§4 "Containers").
struct ContainerList {
    /// The list, its default and primary template containers: the merge's own rule.
    rule: &'static ContainerRule,
    /// CEL: the name of the pod's primary container of this list, "" for none.
    primary: String,
}

impl Gen {
    /// The mutations' CEL expressions, in order; none is empty.
    fn mutations(&mut self, t: &PodTemplate, applied: &str, names: &Names) -> Vec<String> {
        let metadata = At { cel: "object.metadata".into(), path: Pointer::fixed("/metadata"), map: false };
        let meta_terms: Vec<String> = [("labels", &t.labels), ("annotations", &t.annotations)]
            .into_iter()
            .filter(|(_, map)| !map.is_empty())
            .map(|(field, map)| {
                let base = Value::Object(map.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect());
                self.fill_field(&metadata, field, &base, Ctx::Other)
            })
            .collect();
        let mut mutations = vec![concat(&meta_terms)];
        if t.has_pod_spec() {
            for list in [containers(t), init_containers(t)] {
                mutations.extend(self.container_list(t, &list));
            }
            let spec = At { cel: "object.spec".into(), path: Pointer::fixed("/spec"), map: false };
            let terms: Vec<String> = t
                .pod_spec()
                .iter()
                .filter(|(key, _)| !matches!(key.as_str(), "containers" | "initContainers"))
                .map(|(key, base)| self.fill_field(&spec, key, base, Ctx::PodSpec))
                .collect();
            mutations.push(concat(&terms));
        }
        // Information, overwritten like the webhook does, after everything else.
        let annotation = Pointer::fixed("/metadata/annotations").child(&names.applied_annotation);
        let mut record = cel_string(applied);
        if let Some(rule) = Rules::new(names).recorded(names) {
            record = format!("{record} + {rule}");
        }
        mutations.push(format!(
            "has(object.metadata.annotations) ? [{}] : [{}]",
            add(&annotation, &record),
            add(
                &Pointer::fixed("/metadata/annotations"),
                &format!("{{{}: {record}}}", cel_string(&names.applied_annotation))
            )
        ));
        mutations.retain(|m| m != "[]");
        mutations
    }

    /// Fills the pod's containers of one list from the template's, then adds the template's others.
    fn container_list(&mut self, t: &PodTemplate, list: &ContainerList) -> Vec<String> {
        let spec = t.pod_spec();
        let templates: &[Value] =
            spec.get(list.rule.field).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        if templates.is_empty() {
            return Vec::new();
        }
        let name_of = |c: &Value| c.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
        let find = |name: &str| templates.iter().find(|c| name_of(c) == name);
        let pod_list = format!("object.spec.{}", list.rule.field);
        let each = |guard: &str, fill: String| {
            format!("(has({pod_list}) ? {pod_list}.transformList(i, c, {guard}, {fill}).flatten() : [])",)
        };
        let mut mutations = Vec::new();
        // The most specific layer first: each only fills what the ones before left unset.
        let same_name: Vec<String> = templates
            .iter()
            .filter(|c| !t.is_reserved_name(&name_of(c)))
            .filter_map(|c| {
                let fill = self.fill_container(list.rule.field, c)?;
                Some(each(&format!("c.name == {}", cel_string(&name_of(c))), fill))
            })
            .collect();
        mutations.push(concat(&same_name));
        if let Some(fill) = find(list.rule.primary_template(t)).and_then(|c| self.fill_container(list.rule.field, c)) {
            mutations.push(bind("primary", &list.primary, &each("c.name == primary", fill)));
        }
        let default = find(list.rule.default_name);
        if let Some(fill) = default.and_then(|c| self.fill_container(list.rule.field, c)) {
            mutations.push(each("true", fill));
        }

        mutations.extend(added_containers(t, list, templates, default));
        mutations
    }

    /// The ops that fill container `c` (at index `i` of `field`) from a template container;
    /// `None` when the template container sets nothing but its name.
    fn fill_container(&mut self, field: &str, template: &Value) -> Option<String> {
        let at = At {
            cel: "c".into(),
            path: Pointer { dynamic: Some(format!("\"/spec/{field}/\" + string(i)")), fixed: String::new() },
            map: false,
        };
        let terms: Vec<String> = template
            .as_object()?
            .iter()
            .filter(|(k, _)| k.as_str() != "name")
            .map(|(k, v)| self.fill_field(&at, k, v, Ctx::Container))
            .collect();
        (!terms.is_empty()).then(|| concat(&terms))
    }

    /// §4 for one field: `owner[key]` filled from the template's `base`, the pod's value winning.
    /// A CEL expression of a list of JSON Patch operations.
    fn fill_field(&mut self, owner: &At, key: &str, base: &Value, ctx: Ctx) -> String {
        let Some(present) = self.present(owner, key) else {
            return "[]".into();
        };
        let at = At { cel: self.access(owner, key), path: owner.path.child(key), map: is_map_field(key) };
        let replace = add(&at.path, &lit(base));
        let when_present = match base {
            Value::Object(fields) => {
                let child = ctx.child(key);
                let terms: Vec<String> = fields.iter().map(|(k, v)| self.fill_field(&at, k, v, child)).collect();
                concat(&terms)
            }
            Value::Array(entries) if entries.is_empty() => "[]".into(),
            Value::Array(entries) => self.merge_list(&at, key, entries),
            scalar => match self.replaceable_default(owner, key, &at, scalar, ctx) {
                Some(is_default) => format!("({is_default} ? [{replace}] : [])"),
                None => "[]".into(),
            },
        };
        format!("(!({present}) ? [{replace}] : {when_present})")
    }

    /// CEL: the pod's value is the API default, which counts as unset (§4 "Scalars").
    fn replaceable_default(&mut self, owner: &At, key: &str, at: &At, base: &Value, ctx: Ctx) -> Option<String> {
        if ctx == Ctx::Container && key == "imagePullPolicy" {
            let image = format!("(has({0}.image) ? {0}.image : \"\")", owner.cel);
            let default = default_pull_policy(&image);
            return Some(format!("({} == {default} && {default} != {})", at.cel, lit(base)));
        }
        let default = api_default(ctx, key, String::new)?;
        (default != *base).then(|| format!("{} == {}", at.cel, lit(&default)))
    }

    /// §4 "Keyed lists" and unions: the template's entries the pod lacks, first, then the pod's.
    fn merge_list(&mut self, at: &At, key: &str, entries: &[Value]) -> String {
        let whole_entry_missing = |b: &Value| format!("!{}.exists(x, dyn(x) == {})", at.cel, lit(b));
        let missing: Vec<(String, &Value)> = match list_rule(key) {
            ListRule::Atomic => {
                return format!(
                    "(size({}) == 0 ? [{}] : [])",
                    at.cel,
                    add(&at.path, &lit(&Value::Array(entries.to_vec())))
                )
            }
            ListRule::Keyed(entry_key) => {
                let key_cel = entry_key.cel();
                let mut seen = BTreeSet::new();
                entries
                    .iter()
                    .filter_map(|b| match entry_key.of(&Node::Value(Cow::Borrowed(b))) {
                        Some(k) if seen.insert(k.clone()) => {
                            Some((format!("!{}.exists(x, {key_cel} == {})", at.cel, cel_string(&k)), b))
                        }
                        Some(_) => None,
                        None => Some((whole_entry_missing(b), b)),
                    })
                    .collect()
            }
            ListRule::Union => {
                let mut unique: Vec<&Value> = Vec::new();
                for b in entries {
                    if !unique.contains(&b) {
                        unique.push(b);
                    }
                }
                unique.into_iter().map(|b| (whole_entry_missing(b), b)).collect()
            }
        };
        // Inserted one by one at the front, last first: the pod's own entries are never copied
        // into a patch (the API server cannot marshal its typed values back into one).
        let first = at.path.child("0");
        let inserts: Vec<String> =
            missing.iter().rev().map(|(cond, b)| format!("({cond} ? [{}] : [])", add(&first, &lit(b)))).collect();
        concat(&inserts)
    }

    /// CEL: `owner` has `key`.
    fn present(&mut self, owner: &At, key: &str) -> Option<String> {
        if owner.map {
            return Some(format!("{} in {}", cel_string(key), owner.cel));
        }
        Some(format!("has({}.{})", owner.cel, self.field(owner, key)?))
    }

    fn access(&mut self, owner: &At, key: &str) -> String {
        if owner.map {
            return format!("{}[{}]", owner.cel, cel_string(key));
        }
        format!("{}.{}", owner.cel, self.field(owner, key).unwrap_or_default())
    }

    /// A struct field as CEL names it: Kubernetes escapes CEL's reserved words as `__word__`.
    fn field(&mut self, owner: &At, key: &str) -> Option<String> {
        let identifier = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !key.contains("__");
        if !identifier {
            self.problems.push(format!("{}/{key}: not a field name CEL can address", owner.path.fixed));
            return None;
        }
        Some(if CEL_RESERVED.contains(&key) { format!("__{key}__") } else { key.to_owned() })
    }
}

const CEL_RESERVED: &[&str] = &[
    "true",
    "false",
    "null",
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
];

/// The mutation that adds the template containers of `list` that match no container of the pod,
/// `default` filled in by the merge itself (decided now: it depends on the template only).
fn added_containers(
    t: &PodTemplate,
    list: &ContainerList,
    templates: &[Value],
    default: Option<&Value>,
) -> Option<String> {
    let name_of = |c: &Value| c.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
    let pod_list = format!("object.spec.{}", list.rule.field);
    let added: Vec<(String, Value)> = templates
        .iter()
        .filter(|c| !t.is_reserved_name(&name_of(c)))
        .filter(|c| c.get("image").and_then(Value::as_str).is_some_and(|i| !i.is_empty()))
        .map(|c| (name_of(c), with_default(t, list, c, default)))
        .collect();
    if added.is_empty() {
        return None;
    }
    let absent = |name: &str| {
        let name = cel_string(name);
        let in_list =
            |field: &str| format!("(has(object.spec.{field}) && object.spec.{field}.exists(x, x.name == {name}))");
        format!("!{} && !{}", in_list(list.rule.field), in_list(list.rule.other))
    };
    if !list.rule.add_first {
        // Sidecars go after the pod's containers.
        let path = Pointer::fixed("/spec/containers/-");
        let terms: Vec<String> =
            added.iter().map(|(name, c)| format!("({} ? [{}] : [])", absent(name), add(&path, &lit(c)))).collect();
        Some(concat(&terms))
    } else {
        // Init containers go before the pod's (they run first), inserted last first.
        let path = Pointer::fixed(&format!("/spec/{}", list.rule.field));
        let first = path.child("0");
        let inserts: Vec<String> = added
            .iter()
            .rev()
            .map(|(name, c)| format!("({} ? [{}] : [])", absent(name), add(&first, &lit(c))))
            .collect();
        let whole: Vec<String> =
            added.iter().map(|(name, c)| format!("({} ? [dyn({})] : [])", absent(name), lit(c))).collect();
        let create = format!("size(added) == 0 ? [] : [{}]", add(&path, "added"));
        Some(format!("has({pod_list}) ? {} : {}", concat(&inserts), bind("added", &whole.join(" + "), &create)))
    }
}

/// CEL for `merge::default_pull_policy` of the image expression `image`.
fn default_pull_policy(image: &str) -> String {
    let name = format!("{image}.substring({image}.lastIndexOf(\"/\") + 1)");
    let tagged = "n.contains(\":\") && n.substring(n.indexOf(\":\") + 1) != \"latest\" ? \"IfNotPresent\" : \"Always\"";
    format!("({image}.contains(\"@\") ? \"IfNotPresent\" : {})", bind("n", &name, tagged))
}

fn containers(t: &PodTemplate) -> ContainerList {
    // §4 "Primary container of the pod", on the merged annotations (the metadata mutation ran).
    let sidecars: Vec<String> =
        t.container_names("containers").iter().filter(|n| !t.is_reserved_name(n)).cloned().collect();
    let sidecars = cel_list(&sidecars);
    let annotation = |key: &str| {
        let (has, value) = map_entry("object.metadata.annotations", key);
        (format!("{has} && {value} in names"), value)
    };
    let (default_set, default_value) = annotation(DEFAULT_CONTAINER_ANNOTATION);
    let (primary_set, primary_value) = annotation(PRIMARY_CONTAINER_ANNOTATION);
    let template_primary = cel_string(&t.primary_container_name);
    let primary = bind(
        "names",
        "object.spec.containers.map(x, x.name)",
        &format!(
            "{default_set} ? {default_value} : {primary_set} ? {primary_value} : \
         {template_primary} in names ? {template_primary} : \
         has(object.metadata.name) && object.metadata.name != \"\" && object.metadata.name in names && !(object.metadata.name in {sidecars}) ? object.metadata.name : \
         names.exists(n, !(n in {sidecars})) ? names.filter(n, !(n in {sidecars}))[0] : \"\""
        ),
    );
    ContainerList { rule: &CONTAINERS, primary }
}

fn init_containers(t: &PodTemplate) -> ContainerList {
    // The pod's first init container the template does not define by name.
    let defined = cel_list(t.container_names("initContainers"));
    let primary = format!(
        "(has(object.spec.initContainers) && object.spec.initContainers.exists(x, !(x.name in {defined})) ? \
         object.spec.initContainers.filter(x, !(x.name in {defined}))[0].name : \"\")"
    );
    ContainerList { rule: &INIT_CONTAINERS, primary }
}

/// An added container as the merge makes it: the template's, filled from the list's default
/// container. Computed by the merge itself on a pod holding only that container.
fn with_default(t: &PodTemplate, list: &ContainerList, container: &Value, default: Option<&Value>) -> Value {
    let Some(default) = default else {
        return container.clone();
    };
    let only_default = PodTemplate::new(
        t.primary_container_name.clone(),
        t.primary_container_name_set,
        BTreeMap::new(),
        BTreeMap::new(),
        Map::from_iter([(list.rule.field.to_owned(), json!([default]))]),
    );
    let pod = json!({"metadata": {}, "spec": {list.rule.field: [container]}});
    merge_pod(&pod, &only_default).pod["spec"][list.rule.field][0].clone()
}

/// `expr` with `var` bound to `value`. The policies' CEL has no `cel.bind`: a one-item `map` binds.
fn bind(var: &str, value: &str, expr: &str) -> String {
    format!("[{value}].map({var}, {expr})[0]")
}

/// `JSONPatch{op: "add", ...}`: adds a member, or replaces it when it is there.
fn add(path: &Pointer, value: &str) -> String {
    format!("JSONPatch{{op: \"add\", path: {}, value: {value}}}", path.cel())
}

/// Concatenates CEL lists; `[]` for none.
fn concat(terms: &[String]) -> String {
    let terms: Vec<&String> = terms.iter().filter(|t| *t != "[]").collect();
    match terms.as_slice() {
        [] => "[]".into(),
        [one] => (*one).clone(),
        _ => terms.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(" + "),
    }
}

fn cel_string(s: &str) -> String {
    // A JSON string is a CEL string literal: same quotes, same escapes for what serde_json writes.
    Value::String(s.to_owned()).to_string()
}

fn cel_list(items: &[String]) -> String {
    format!("[{}]", items.iter().map(|s| cel_string(s)).collect::<Vec<_>>().join(", "))
}

/// A JSON value as a CEL literal. Members and items are `dyn`: CEL's literals are homogeneous,
/// a container is not.
fn lit(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) | Value::Number(_) => v.to_string(),
        Value::String(s) => cel_string(s),
        Value::Array(items) => {
            format!("[{}]", items.iter().map(|i| format!("dyn({})", lit(i))).collect::<Vec<_>>().join(", "))
        }
        Value::Object(members) => format!(
            "{{{}}}",
            members.iter().map(|(k, v)| format!("{}: dyn({})", cel_string(k), lit(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

#[cfg(test)]
mod tests;
