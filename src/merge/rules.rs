//! The rules of SPEC §4 as data: which lists merge by key and by which fields, which are atomic
//! (every other list is a union); which values are the API server's defaults (they count as
//! unset); the container lists and their reserved template container names. The merge, the conflict report of `compose`, `explain`
//! and `export-policy`'s CEL all read it, so a row added here is merged, reported and exported
//! alike (the `cfg(test)` row below proves it in each of them).

use std::borrow::Cow;

use serde_json::Value;

use crate::doc::Node;

/// A field of a keyed-list entry that is part of the entry's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyField {
    pub name: &'static str,
    /// A number (`containerPort`), compared as its JSON text; otherwise a string.
    pub number: bool,
    /// What the API server fills in when the field is unset (`protocol: TCP`); `None`: an entry
    /// without the field has no key and is compared whole.
    pub default: Option<&'static str>,
}

const fn text(name: &'static str) -> KeyField {
    KeyField { name, number: false, default: None }
}

const NAME: &[KeyField] = &[text("name")];

/// Keyed lists and the fields of their key, in key order.
pub const KEYED: &[(&str, &[KeyField])] = &[
    ("env", NAME),
    ("volumes", NAME),
    ("imagePullSecrets", NAME),
    ("resourceClaims", NAME),
    ("schedulingGates", NAME),
    ("volumeMounts", &[text("mountPath")]),
    ("volumeDevices", &[text("devicePath")]),
    ("hostAliases", &[text("ip")]),
    (
        "ports",
        &[
            KeyField { name: "containerPort", number: true, default: None },
            KeyField { name: "protocol", number: false, default: Some("TCP") },
        ],
    ),
    // Not a PodSpec list: the tests' proof that a row here is all a new keyed list needs.
    #[cfg(test)]
    ("testKeyedList", &[text("id")]),
];

/// Containers (and init containers) are matched by name.
pub const CONTAINER_KEY: EntryKey = EntryKey(NAME);

/// Where in a pod a field sits: decides which API defaults count as unset.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ctx {
    PodSpec,
    Container,
    Probe,
    Other,
}

impl Ctx {
    pub(crate) fn child(self, key: &str) -> Ctx {
        match (self, key) {
            (Ctx::Container, "livenessProbe" | "readinessProbe" | "startupProbe") => Ctx::Probe,
            _ => Ctx::Other,
        }
    }
}

/// The value the API server gives `key` where it is unset (only those the merge counts as unset);
/// `image` is read for `imagePullPolicy` only. Keep `README.md` ("Defaulted fields") in step.
pub(crate) fn api_default(ctx: Ctx, key: &str, image: impl FnOnce() -> String) -> Option<Value> {
    let value: Value = match (ctx, key) {
        (Ctx::PodSpec, "schedulerName") => "default-scheduler".into(),
        (Ctx::PodSpec, "terminationGracePeriodSeconds") => 30.into(),
        (Ctx::PodSpec, "dnsPolicy") => "ClusterFirst".into(),
        (Ctx::PodSpec, "restartPolicy") => "Always".into(),
        (Ctx::PodSpec, "enableServiceLinks") => true.into(),
        (Ctx::PodSpec, "serviceAccountName" | "serviceAccount") => "default".into(),
        (Ctx::PodSpec, "preemptionPolicy") => "PreemptLowerPriority".into(),
        (Ctx::PodSpec, "priority") => 0.into(),
        (Ctx::Container, "terminationMessagePath") => "/dev/termination-log".into(),
        (Ctx::Container, "terminationMessagePolicy") => "File".into(),
        (Ctx::Container, "imagePullPolicy") => default_pull_policy(&image()).into(),
        (Ctx::Probe, "timeoutSeconds" | "successThreshold") => 1.into(),
        (Ctx::Probe, "periodSeconds") => 10.into(),
        (Ctx::Probe, "failureThreshold") => 3.into(),
        _ => return None,
    };
    Some(value)
}

/// The API server's default: `Always` for `:latest` or an untagged image, else `IfNotPresent`.
pub(crate) fn default_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let name = image.rsplit('/').next().unwrap_or(image);
    match name.split_once(':') {
        Some((_, tag)) if tag != "latest" => "IfNotPresent",
        _ => "Always",
    }
}

/// A pod's list of containers and the template containers that fill it (§4 "Containers"): read
/// by the merge and by `export-policy`, which must choose the same template containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerRule {
    pub field: &'static str,
    /// The other list: container names are unique across both.
    pub other: &'static str,
    /// The template container every container of the list gets.
    pub default_name: &'static str,
    /// The template container the list's primary gets; `None`: the template's
    /// `primaryContainerName`.
    pub primary_template: Option<&'static str>,
    /// Template containers the pod lacks go before the pod's (init containers: they run first),
    /// else after them (sidecars: the pod's first container stays first).
    pub add_first: bool,
}

/// Template container names with a meaning of their own, never added to a pod as containers
/// (§4): the lists' `default` containers, `primary-init`, and the template's primary container.
pub fn is_reserved_container_name(name: &str, primary_container_name: &str) -> bool {
    let special = [CONTAINERS.default_name, INIT_CONTAINERS.default_name];
    special.contains(&name) || INIT_CONTAINERS.primary_template == Some(name) || name == primary_container_name
}

impl ContainerRule {
    /// The name of the template container that goes onto the primary container of this list.
    pub fn primary_template<'t>(&self, t: &'t crate::template::PodTemplate) -> &'t str {
        self.primary_template.unwrap_or(&t.primary_container_name)
    }
}

pub const CONTAINERS: ContainerRule = ContainerRule {
    field: "containers",
    other: "initContainers",
    default_name: "default",
    primary_template: None,
    add_first: false,
};

pub const INIT_CONTAINERS: ContainerRule = ContainerRule {
    field: "initContainers",
    other: "containers",
    default_name: "default-init",
    primary_template: Some("primary-init"),
    add_first: true,
};

/// Lists the template gives only to a pod that has none (`command`, `args`).
pub const ATOMIC: &[&str] = &["command", "args"];

/// How entries of a list are matched (§4 "Keyed lists").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListRule {
    /// The pod's entry with the same key stays; the template's other entries are added first.
    Keyed(EntryKey),
    /// The pod's list, if not empty, is kept as a whole.
    Atomic,
    /// Union without duplicates, template entries first.
    Union,
}

/// The rule for the list under `key`.
pub fn list_rule(key: &str) -> ListRule {
    if let Some((_, fields)) = KEYED.iter().find(|(list, _)| *list == key) {
        return ListRule::Keyed(EntryKey(fields));
    }
    match ATOMIC.contains(&key) {
        true => ListRule::Atomic,
        false => ListRule::Union,
    }
}

/// The key of the entries of one keyed list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryKey(&'static [KeyField]);

impl EntryKey {
    /// The key of `entry` (its fields' values joined by `/`), or `None` when a field without a
    /// default is missing (or a string field is not a string).
    pub fn of(&self, entry: &Node<'_>) -> Option<String> {
        let mut parts = Vec::with_capacity(self.0.len());
        for f in self.0 {
            let value = match (entry.field(f.name), f.default) {
                (Some(v), _) if f.number => v.to_value().to_string(),
                (Some(v), _) => v.as_str()?.into_owned(),
                (None, Some(default)) => default.to_owned(),
                (None, None) => return None,
            };
            parts.push(value);
        }
        Some(parts.join("/"))
    }

    /// The key's field names joined by `/`, for paths in messages (`[containerPort/protocol=80/TCP]`).
    pub fn fields(&self) -> Cow<'static, str> {
        match self.0 {
            [one] => Cow::Borrowed(one.name),
            many => Cow::Owned(many.iter().map(|f| f.name).collect::<Vec<_>>().join("/")),
        }
    }

    /// The key as a CEL string expression on the entry `x`, `"\u0000"` (no key a real entry has)
    /// when a field without a default is missing: the same key as [`EntryKey::of`].
    pub fn cel(&self) -> String {
        let required: Vec<String> =
            self.0.iter().filter(|f| f.default.is_none()).map(|f| format!("has(x.{})", f.name)).collect();
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|f| {
                let value = if f.number { format!("string(x.{})", f.name) } else { format!("x.{}", f.name) };
                match f.default {
                    Some(default) => format!("(has(x.{}) ? {value} : {})", f.name, serde_json::json!(default)),
                    None => value,
                }
            })
            .collect();
        format!("({} ? {} : \"\\u0000\")", required.join(" && "), parts.join(" + \"/\" + "))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn key_of(list: &str, entry: Value) -> Option<String> {
        let ListRule::Keyed(key) = list_rule(list) else { panic!("{list} is keyed") };
        key.of(&Node::Value(Cow::Owned(entry)))
    }

    #[test]
    fn keys_join_their_fields_with_defaults() {
        assert_eq!(key_of("env", json!({"name": "A", "value": "x"})).as_deref(), Some("A"));
        assert_eq!(key_of("ports", json!({"containerPort": 80})).as_deref(), Some("80/TCP"));
        assert_eq!(key_of("ports", json!({"containerPort": 53, "protocol": "UDP"})).as_deref(), Some("53/UDP"));
        assert_eq!(key_of("ports", json!({"protocol": "UDP"})), None, "no port: compared whole");
        assert_eq!(key_of("env", json!({"name": 5})), None, "a name that is not a string");
        assert_eq!(list_rule("command"), ListRule::Atomic);
        assert_eq!(list_rule("tolerations"), ListRule::Union);
    }

    #[test]
    fn the_cel_key_is_the_same_key() {
        let ListRule::Keyed(ports) = list_rule("ports") else { unreachable!() };
        assert_eq!(
            ports.cel(),
            r#"(has(x.containerPort) ? string(x.containerPort) + "/" + (has(x.protocol) ? x.protocol : "TCP") : "\u0000")"#
        );
        assert_eq!(ports.fields(), "containerPort/protocol");
        let ListRule::Keyed(env) = list_rule("env") else { unreachable!() };
        assert_eq!(env.cel(), r#"(has(x.name) ? x.name : "\u0000")"#);
    }
}

/// The `cfg(test)` row of [`KEYED`], `testKeyedList` keyed by `id`, through every reader of the
/// table: a keyed list needs that row and nothing else. (Templates are built directly: the
/// parser validates podSpec against the real PodSpec, which has no such list.)
#[cfg(test)]
mod a_new_row {
    use serde_json::{json, Map, Value};

    use crate::merge::{compose, explain, merge_pod, Layer, Role};
    use crate::template::PodTemplate;

    fn template(entries: Value) -> PodTemplate {
        let pod_spec: Map<String, Value> = [("testKeyedList".to_owned(), entries)].into_iter().collect();
        PodTemplate::new("primary".into(), false, Default::default(), Default::default(), pod_spec)
    }

    #[test]
    fn is_merged_by_its_key() {
        let pod =
            json!({"metadata": {"name": "p"}, "spec": {"containers": [], "testKeyedList": [{"id": "a", "v": "pod"}]}});
        let t = template(json!([{"id": "a", "v": "template"}, {"id": "b", "v": "template"}]));
        let merged = merge_pod(&pod, &t).pod;
        assert_eq!(merged["spec"]["testKeyedList"], json!([{"id": "b", "v": "template"}, {"id": "a", "v": "pod"}]));
        let (_, changes) = explain(&pod, &[Layer { role: Role::Named, template: &t }]);
        assert_eq!(changes.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(), ["/spec/testKeyedList/0"]);
    }

    #[test]
    fn is_reported_in_conflicts() {
        let (lower, higher) = (template(json!([{"id": "a", "v": 1}])), template(json!([{"id": "a", "v": 2}])));
        let layers = [Layer { role: Role::Named, template: &lower }, Layer { role: Role::Named, template: &higher }];
        let paths: Vec<String> = compose(&layers).conflicts.into_iter().map(|c| c.path).collect();
        assert_eq!(paths, ["spec.testKeyedList[id=a]"]);
    }

    #[test]
    fn is_exported_with_its_key_in_cel() {
        let source = crate::template::TemplateSource {
            kind: crate::template::SourceKind::ConfigMap,
            namespace: "flyte".into(),
            object: "cm".into(),
            key: "t".into(),
            version: "1".into(),
            mode: Default::default(),
        };
        let t = template(json!([{"id": "a", "v": 1}]));
        let exported = crate::export::export(&t, &source, &crate::names::Names::default(), &[]).unwrap();
        let text = exported.policy.to_string();
        assert!(text.contains(r#"(has(x.id) ? x.id : \"\\u0000\") == \"a\""#), "{text}");
    }
}
