//! Would the API server send a pod's CREATE to a mutating webhook entry? The API server's own
//! checks, in its order (namespaceSelector, objectSelector, rules), over the pod's labels and its
//! namespace's labels. Pure: no cluster here. `matchConditions` are CEL, which this crate does not
//! evaluate: they are listed, never guessed.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, RuleWithOperations};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use serde::Serialize;

/// What the API server would do with a pod CREATE for one webhook entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// No clause excludes the pod (its matchConditions, if any, still decide: not evaluated).
    pub sent: bool,
    /// Every clause that excludes the pod, in the API server's order of checking; the first is
    /// the one the API server stops at.
    pub excluded_by: Vec<String>,
    /// The entry's matchConditions (`name: expression`), not evaluated.
    pub match_conditions: Vec<String>,
}

/// Evaluates `webhook` for the CREATE of a pod labelled `pod_labels` in a namespace labelled
/// `namespace_labels`.
pub fn evaluate(
    webhook: &MutatingWebhook,
    pod_labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
) -> Verdict {
    let mut excluded_by = Vec::new();
    if let Some(why) = selector_excludes(webhook.namespace_selector.as_ref(), namespace_labels, "namespace") {
        excluded_by.push(format!("namespaceSelector: {why}"));
    }
    if let Some(why) = selector_excludes(webhook.object_selector.as_ref(), pod_labels, "pod") {
        excluded_by.push(format!("objectSelector: {why}"));
    }
    if let Some(why) = rules_exclude(webhook.rules.as_deref().unwrap_or_default()) {
        excluded_by.push(why);
    }
    let conditions = webhook.match_conditions.as_deref().unwrap_or_default();
    Verdict {
        sent: excluded_by.is_empty(),
        excluded_by,
        match_conditions: conditions.iter().map(|c| format!("{}: {}", c.name, c.expression)).collect(),
    }
}

/// The first requirement of `selector` that `labels` (of the `whose` object) fail, in words; none
/// when the selector matches. A missing selector and an empty one match everything, as for
/// webhooks (not as for a Service).
pub fn selector_excludes(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
    whose: &str,
) -> Option<String> {
    let selector = selector?;
    let has = |key: &str| match labels.get(key) {
        Some(value) => format!("{whose} label {key}={value}"),
        None => format!("{whose} has no label {key}"),
    };
    for (key, value) in selector.match_labels.iter().flatten() {
        if labels.get(key) != Some(value) {
            return Some(format!("matchLabels {key}={value}: {}", has(key)));
        }
    }
    for (i, requirement) in selector.match_expressions.iter().flatten().enumerate() {
        if !requirement_matches(requirement, labels) {
            return Some(format!(
                "matchExpressions[{i}] {}: {}",
                describe_requirement(requirement),
                has(&requirement.key)
            ));
        }
    }
    None
}

fn requirement_matches(r: &LabelSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&r.key);
    let listed = || value.is_some_and(|v| r.values.iter().flatten().any(|w| w == v));
    match r.operator.as_str() {
        "In" => listed(),
        "NotIn" => !listed(),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        // The API server refuses such a configuration; if one is read anyway, it selects nothing.
        _ => false,
    }
}

/// `key NotIn [a, b]`, `key Exists`.
fn describe_requirement(r: &LabelSelectorRequirement) -> String {
    match r.operator.as_str() {
        "In" | "NotIn" => format!("{} {} [{}]", r.key, r.operator, r.values.as_deref().unwrap_or_default().join(", ")),
        _ => format!("{} {}", r.key, r.operator),
    }
}

/// None when some rule covers CREATE of core/v1 pods; else why each rule does not.
fn rules_exclude(rules: &[RuleWithOperations]) -> Option<String> {
    if rules.is_empty() {
        return Some("rules: none (the entry is sent nothing)".to_owned());
    }
    let mut misses = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        match rule_misses(rule) {
            None => return None,
            Some(why) => misses.push(format!("rules[{i}] {why}")),
        }
    }
    Some(format!("rules: none covers CREATE of v1 pods: {}", misses.join("; ")))
}

/// The first field of `rule` that leaves out a pod CREATE, in words.
fn rule_misses(rule: &RuleWithOperations) -> Option<String> {
    // "*" is every resource but no subresource; "*/*" is both; "pods/*" only pods' subresources.
    let checks = [
        ("operations", &rule.operations, &["CREATE", "*"][..]),
        ("apiGroups", &rule.api_groups, &["", "*"][..]),
        ("apiVersions", &rule.api_versions, &["v1", "*"][..]),
        ("resources", &rule.resources, &["pods", "*", "*/*"][..]),
    ];
    for (name, field, wanted) in checks {
        let values = field.as_deref().unwrap_or_default();
        if !values.iter().any(|v| wanted.contains(&v.as_str())) {
            let shown: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
            return Some(format!("{name} [{}] has none of {wanted:?}", shown.join(", ")));
        }
    }
    match rule.scope.as_deref() {
        None | Some("*") | Some("Namespaced") => None,
        Some(scope) => Some(format!("scope {scope:?} leaves out namespaced pods")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn selector(v: Value) -> LabelSelector {
        serde_json::from_value(v).unwrap()
    }

    fn excludes(v: Value, pairs: &[(&str, &str)]) -> Option<String> {
        selector_excludes(Some(&selector(v)), &labels(pairs), "pod")
    }

    fn expression(operator: &str, values: &[&str]) -> Value {
        json!({"matchExpressions": [{"key": "k", "operator": operator, "values": values}]})
    }

    #[test]
    fn every_operator() {
        let (with_a, with_b, without) = (&[("k", "a")][..], &[("k", "b")][..], &[("other", "a")][..]);
        let in_a = expression("In", &["a", "c"]);
        assert_eq!(excludes(in_a.clone(), with_a), None);
        assert_eq!(excludes(in_a.clone(), with_b).unwrap(), "matchExpressions[0] k In [a, c]: pod label k=b");
        assert_eq!(excludes(in_a, without).unwrap(), "matchExpressions[0] k In [a, c]: pod has no label k");
        let not_in = expression("NotIn", &["a"]);
        assert_eq!(excludes(not_in.clone(), with_a).unwrap(), "matchExpressions[0] k NotIn [a]: pod label k=a");
        assert_eq!(excludes(not_in.clone(), with_b), None);
        assert_eq!(excludes(not_in, without), None, "NotIn holds for a missing label");
        let exists = json!({"matchExpressions": [{"key": "k", "operator": "Exists"}]});
        assert_eq!(excludes(exists.clone(), with_a), None);
        assert_eq!(excludes(exists, without).unwrap(), "matchExpressions[0] k Exists: pod has no label k");
        let absent = json!({"matchExpressions": [{"key": "k", "operator": "DoesNotExist"}]});
        assert_eq!(excludes(absent.clone(), without), None);
        assert_eq!(excludes(absent, with_a).unwrap(), "matchExpressions[0] k DoesNotExist: pod label k=a");
        assert!(excludes(expression("Gt", &["1"]), &[("k", "2")]).is_some(), "an unknown operator selects nothing");
    }

    #[test]
    fn match_labels_and_the_first_failing_requirement() {
        let both = json!({
            "matchLabels": {"team": "ml"},
            "matchExpressions": [{"key": "a", "operator": "Exists"}, {"key": "b", "operator": "In", "values": ["x"]}],
        });
        assert_eq!(excludes(both.clone(), &[("team", "ml"), ("a", ""), ("b", "x")]), None);
        assert_eq!(excludes(both.clone(), &[("team", "data")]).unwrap(), "matchLabels team=ml: pod label team=data");
        assert_eq!(excludes(both.clone(), &[]).unwrap(), "matchLabels team=ml: pod has no label team");
        let second = excludes(both, &[("team", "ml"), ("a", "1")]).unwrap();
        assert_eq!(second, "matchExpressions[1] b In [x]: pod has no label b");
    }

    #[test]
    fn empty_and_missing_selectors_match_everything() {
        assert_eq!(excludes(json!({}), &[]), None);
        assert_eq!(excludes(json!({"matchLabels": {}, "matchExpressions": []}), &[]), None);
        assert_eq!(selector_excludes(None, &labels(&[]), "pod"), None);
    }

    fn webhook(v: Value) -> MutatingWebhook {
        let mut base = json!({
            "name": "w.example.com", "admissionReviewVersions": ["v1"], "clientConfig": {}, "sideEffects": "None",
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
        });
        base.as_object_mut().unwrap().extend(v.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    fn rules(rules: Value) -> Verdict {
        evaluate(&webhook(json!({ "rules": rules })), &labels(&[]), &labels(&[]))
    }

    #[test]
    fn rules_cover_pod_creation_or_say_which_field_does_not() {
        let rule = |ops: &[&str], groups: &[&str], versions: &[&str], resources: &[&str]| json!({"operations": ops, "apiGroups": groups, "apiVersions": versions, "resources": resources});
        for covering in [
            rule(&["CREATE"], &[""], &["v1"], &["pods"]),
            rule(&["*"], &["*"], &["*"], &["*"]),
            rule(&["UPDATE", "CREATE"], &["apps", ""], &["v1"], &["*/*"]),
        ] {
            assert!(rules(json!([covering])).sent, "{covering}");
        }
        let cases = [
            (
                rule(&["UPDATE"], &[""], &["v1"], &["pods"]),
                "rules[0] operations [\"UPDATE\"] has none of [\"CREATE\", \"*\"]",
            ),
            (rule(&["CREATE"], &["apps"], &["v1"], &["pods"]), "rules[0] apiGroups [\"apps\"]"),
            (rule(&["CREATE"], &[""], &["v2"], &["pods"]), "rules[0] apiVersions [\"v2\"]"),
            (rule(&["CREATE"], &[""], &["v1"], &["pods/*"]), "rules[0] resources [\"pods/*\"]"),
        ];
        for (r, want) in cases {
            let verdict = rules(json!([r]));
            assert!(!verdict.sent);
            assert!(verdict.excluded_by[0].contains(want), "{:?} lacks {want}", verdict.excluded_by);
        }
        let mut cluster = rule(&["CREATE"], &[""], &["v1"], &["pods"]);
        cluster["scope"] = json!("Cluster");
        assert!(
            rules(json!([cluster])).excluded_by[0].ends_with("rules[0] scope \"Cluster\" leaves out namespaced pods")
        );
        let mut any_scope = rule(&["CREATE"], &[""], &["v1"], &["pods"]);
        any_scope["scope"] = json!("*");
        assert!(rules(json!([any_scope])).sent);
        // One covering rule among others is enough.
        assert!(
            rules(json!([rule(&["DELETE"], &[""], &["v1"], &["pods"]), rule(&["CREATE"], &[""], &["v1"], &["pods"])]))
                .sent
        );
        assert!(!rules(json!([])).sent);
    }

    /// The chart's two entries (`helm template`, default values: the e2e test reads the rendered
    /// chart itself) and its namespaceSelector.
    fn chart_entries() -> [MutatingWebhook; 2] {
        let namespaces = json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
            "values": ["kube-system", "kube-public", "kube-node-lease"]}]});
        let by_label = webhook(json!({
            "name": "pod-templates.flyte.org",
            "objectSelector": {"matchExpressions": [{"key": "flyte.org/environment", "operator": "Exists"}]},
            "namespaceSelector": namespaces,
        }));
        let by_task = webhook(json!({
            "name": "task-name.pod-templates.flyte.org",
            "objectSelector": {"matchExpressions": [
                {"key": "flyte.org/environment", "operator": "DoesNotExist"},
                {"key": "flyte.org/managed", "operator": "In", "values": ["true"]},
                {"key": "task-name", "operator": "Exists"}]},
            "namespaceSelector": namespaces,
            "matchConditions": [{"name": "environment-not-exported", "expression": "!has(object.metadata.labels)"}],
        }));
        [by_label, by_task]
    }

    fn chart(pod: &[(&str, &str)], namespace: &str) -> [Verdict; 2] {
        let ns = labels(&[("kubernetes.io/metadata.name", namespace)]);
        chart_entries().map(|w| evaluate(&w, &labels(pod), &ns))
    }

    #[test]
    fn the_charts_entries_send_each_pod_once_or_never() {
        let [label, task] = chart(&[("flyte.org/environment", "ml")], "ml-team");
        assert!(label.sent && label.match_conditions.is_empty());
        assert_eq!(task.excluded_by, ["objectSelector: matchExpressions[0] flyte.org/environment DoesNotExist: pod label flyte.org/environment=ml"]);

        let [label, task] = chart(&[("flyte.org/managed", "true"), ("task-name", "ml.train")], "ml-team");
        assert_eq!(label.excluded_by, ["objectSelector: matchExpressions[0] flyte.org/environment Exists: pod has no label flyte.org/environment"]);
        assert!(task.sent);
        assert_eq!(task.match_conditions, ["environment-not-exported: !has(object.metadata.labels)"]);

        let [label, task] = chart(&[("app", "web")], "ml-team");
        assert!(!label.sent && !task.sent);
        assert_eq!(
            task.excluded_by,
            ["objectSelector: matchExpressions[1] flyte.org/managed In [true]: pod has no label flyte.org/managed"]
        );

        // Both selectors fail in kube-system: each is named, the namespace first.
        let [label, _] = chart(&[], "kube-system");
        assert_eq!(
            label.excluded_by,
            [
                "namespaceSelector: matchExpressions[0] kubernetes.io/metadata.name NotIn [kube-system, kube-public, kube-node-lease]: namespace label kubernetes.io/metadata.name=kube-system",
                "objectSelector: matchExpressions[0] flyte.org/environment Exists: pod has no label flyte.org/environment",
            ]
        );
    }
}
