use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::store::{Catalog, TemplateIndex};

const SAMPLE: &str = include_str!("../../examples/reviews/flyte-task-pod.json");

fn catalog(entries: &[(&str, &str, &str, &str)]) -> Catalog {
    // One ConfigMap per (namespace, name), holding all its keys.
    let mut config_maps: BTreeMap<(&str, &str), BTreeMap<String, String>> = BTreeMap::new();
    for (ns, cm, key, text) in entries {
        config_maps.entry((ns, cm)).or_default().insert(key.to_string(), text.to_string());
    }
    let mut c = Catalog::new("flyte");
    for ((ns, cm), data) in config_maps {
        c.apply(ns, cm, Some("7"), &data);
    }
    c
}

fn index(entries: &[(&str, &str, &str, &str)]) -> TemplateIndex {
    catalog(entries).index()
}

fn hello() -> TemplateIndex {
    index(&[(
        "flyte",
        "platform",
        "hello_world",
        "labels: {lKeyA: lValA}\npodSpec: {containers: [{name: primary, env: [{name: hello, value: world}]}]}",
    )])
}

fn review(edit: impl FnOnce(&mut Value)) -> Value {
    let mut r: Value = serde_json::from_str(SAMPLE).unwrap();
    edit(&mut r);
    r
}

fn decide(r: &Value, store: &TemplateIndex, policy: &Policy) -> Decision {
    let req = parse_review(&serde_json::to_vec(r).unwrap()).unwrap();
    mutate(req, store, policy).unwrap()
}

fn patched(r: &Value, d: &Decision) -> Value {
    let mut obj = r["request"]["object"].clone();
    let patch: json_patch::Patch = serde_json::from_slice(d.response.patch.as_ref().expect("a patch")).unwrap();
    json_patch::patch(&mut obj, &patch).expect("the patch applies to the object the API server sent");
    obj
}

fn body(d: &Decision) -> Value {
    serde_json::from_slice(&response_body(d)).unwrap()
}

#[test]
fn mutates_the_sample_and_echoes_the_review() {
    let r = review(|_| {});
    let d = decide(&r, &hello(), &Policy::default());
    assert_eq!(d.outcome, Outcome::Mutated);
    let b = body(&d);
    assert_eq!(b["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(b["kind"], "AdmissionReview");
    assert_eq!(b["response"]["uid"], r["request"]["uid"]);
    assert_eq!(b["response"]["allowed"], true);
    assert_eq!(b["response"]["patchType"], "JSONPatch");
    assert_eq!(b["response"]["auditAnnotations"]["applied"], "flyte/platform/hello_world@7");
    let pod = patched(&r, &d);
    assert_eq!(pod["spec"]["containers"][0]["env"][0], json!({"name": "hello", "value": "world"}));
    assert_eq!(pod["metadata"]["annotations"]["flyte.org/pod-template-applied"], "flyte/platform/hello_world@7");
    assert_eq!(
        pod["metadata"]["managedFields"], r["request"]["object"]["metadata"]["managedFields"],
        "managedFields untouched"
    );
    let ops =
        serde_json::to_string(&serde_json::from_slice::<Value>(d.response.patch.as_ref().unwrap()).unwrap()).unwrap();
    assert!(!ops.contains("managedFields"), "{ops}");
}

#[test]
fn reinvocation_changes_nothing() {
    let r = review(|_| {});
    let first = decide(&r, &hello(), &Policy::default());
    let pod = patched(&r, &first);
    let again = review(|r| r["request"]["object"] = pod);
    let second = decide(&again, &hello(), &Policy::default());
    assert_eq!(second.outcome, Outcome::Unchanged);
    assert!(second.response.patch.is_none());
    assert!(second.response.allowed);
}

#[test]
fn label_keys_with_slash_and_tilde_are_escaped_in_the_patch() {
    let store = index(&[("flyte", "platform", "hello_world", "labels: {example.com/a~b: v}\nannotations: {x/~: y}")]);
    let r = review(|r| {
        r["request"]["object"]["metadata"].as_object_mut().unwrap().remove("annotations").map(|_| ()).unwrap()
    });
    let d = decide(&r, &store, &Policy::default());
    let patch: Value = serde_json::from_slice(d.response.patch.as_ref().unwrap()).unwrap();
    let paths: Vec<&str> = patch.as_array().unwrap().iter().map(|op| op["path"].as_str().unwrap()).collect();
    assert!(paths.contains(&"/metadata/labels/example.com~1a~0b"), "{paths:?}");
    let pod = patched(&r, &d);
    assert_eq!(pod["metadata"]["labels"]["example.com/a~b"], "v");
    assert_eq!(pod["metadata"]["annotations"]["x/~"], "y", "a pod without annotations gets them");
}

#[test]
fn only_pod_creates_are_mutated() {
    for edit in [
        (|r: &mut Value| r["request"]["operation"] = json!("UPDATE")) as fn(&mut Value),
        |r| r["request"]["resource"]["resource"] = json!("configmaps"),
        |r| r["request"]["subResource"] = json!("status"),
        |r| r["request"]["resource"]["group"] = json!("apps"),
    ] {
        let r = review(edit);
        let d = decide(&r, &hello(), &Policy::default());
        assert_eq!((d.outcome, d.response.allowed), (Outcome::Unchanged, true));
        assert!(d.response.patch.is_none());
    }
}

#[test]
fn dry_run_is_answered_byte_for_byte_like_a_real_request() {
    // Denied, unchanged and mutated answers alike; a dry run must never skip the mutation (the
    // API server shows the user the dry-run pod) nor be refused.
    let deny =
        |r: &mut Value| r["request"]["object"]["metadata"]["annotations"]["flyte.org/pod-template"] = json!("nope");
    let unlabelled = |r: &mut Value| {
        r["request"]["object"]["metadata"]["labels"].as_object_mut().unwrap().remove("flyte.org/environment");
    };
    for (what, edit) in
        [("mutated", &(|_: &mut Value| {}) as &dyn Fn(&mut Value)), ("denied", &deny), ("unchanged", &unlabelled)]
    {
        let real = decide(&review(edit), &hello(), &Policy::default());
        let dry = decide(
            &review(|r| {
                edit(r);
                r["request"]["dryRun"] = json!(true);
            }),
            &hello(),
            &Policy::default(),
        );
        assert_eq!(real.outcome.as_str(), what);
        assert_eq!(response_body(&real), response_body(&dry), "{what}");
    }
}

#[test]
fn a_pod_without_label_or_annotation_is_untouched() {
    let r = review(|r| r["request"]["object"]["metadata"]["labels"].as_object_mut().unwrap().clear());
    let d = decide(&r, &hello(), &Policy::default());
    assert_eq!(d.outcome, Outcome::Unchanged);
    assert!(d.template.is_none());
}

#[test]
fn an_environment_without_template_is_allowed_unchanged() {
    let r = review(|r| r["request"]["object"]["metadata"]["labels"]["flyte.org/environment"] = json!("nothing-here"));
    let d = decide(&r, &hello(), &Policy::default());
    assert_eq!((d.outcome, d.response.allowed), (Outcome::Unchanged, true));
    assert!(d.response.warnings.is_none());
}

#[test]
fn the_annotation_wins_over_the_label() {
    let store = index(&[
        ("flyte", "platform", "hello_world", "labels: {from: label}"),
        ("flyte", "platform", "special", "labels: {from: annotation}"),
    ]);
    let r = review(|r| r["request"]["object"]["metadata"]["annotations"]["flyte.org/pod-template"] = json!("special"));
    assert_eq!(patched(&r, &decide(&r, &store, &Policy::default()))["metadata"]["labels"]["from"], "annotation");
}

#[test]
fn a_missing_explicit_template_is_denied_naming_it_and_the_namespaces() {
    let r = review(|r| r["request"]["object"]["metadata"]["annotations"]["flyte.org/pod-template"] = json!("nope"));
    let d = decide(&r, &hello(), &Policy::default());
    assert_eq!(d.outcome, Outcome::Denied);
    let b = body(&d);
    assert_eq!(b["response"]["allowed"], false);
    assert!(b["response"]["status"]["code"].as_u64().unwrap() >= 400);
    let msg = b["response"]["status"]["message"].as_str().unwrap();
    assert!(msg.contains("\"nope\"") && msg.contains("flytesnacks-development") && msg.contains("flyte"), "{msg}");
    assert!(msg.contains("flyte.org/pod-template"), "says how it was named: {msg}");

    let warn = Policy { on_missing: OnProblem::Warn, ..Policy::default() };
    let d = decide(&r, &hello(), &warn);
    assert_eq!((d.outcome, d.response.allowed), (Outcome::Unchanged, true));
    assert!(d.response.warnings.as_ref().unwrap()[0].contains("\"nope\""));
}

#[test]
fn a_broken_template_is_denied_with_configmap_key_and_error() {
    let store = index(&[("flyte", "platform", "hello_world", "podSpec: {containers: [{name: primary, evn: []}]}")]);
    let d = decide(&review(|_| {}), &store, &Policy::default());
    assert_eq!(d.outcome, Outcome::Denied);
    let msg = &d.response.result.message;
    assert!(
        msg.contains("flyte/platform")
            && msg.contains("\"hello_world\"")
            && msg.contains("containers[0].evn: unknown field"),
        "{msg}"
    );
    assert!(d.response.result.code >= 400);

    let warn = Policy { on_broken: OnProblem::Warn, ..Policy::default() };
    let d = decide(&review(|_| {}), &store, &warn);
    assert_eq!((d.outcome, d.response.allowed), (Outcome::Unchanged, true));
    assert!(d.response.warnings.as_ref().unwrap()[0].contains("unknown field"));
}

#[test]
fn a_stale_template_still_applies_with_a_warning() {
    let mut c = catalog(&[("flyte", "platform", "hello_world", "labels: {v: good}")]);
    c.apply("flyte", "platform", Some("8"), &BTreeMap::from([("hello_world".into(), "labels: [".into())]));
    let r = review(|_| {});
    let d = decide(&r, &c.index(), &Policy::default());
    assert_eq!(d.outcome, Outcome::Mutated);
    assert_eq!(patched(&r, &d)["metadata"]["labels"]["v"], "good");
    assert_eq!(d.applied.as_deref(), Some("flyte/platform/hello_world@7"));
    let w = &d.response.warnings.as_ref().unwrap()[0];
    assert!(w.contains("version 8") && w.contains("last good version 7"), "{w}");
}

#[test]
fn a_pod_never_sees_another_namespaces_template() {
    let store = index(&[("team-a", "mine", "hello_world", "labels: {secret: team-a}")]);
    let d = decide(&review(|_| {}), &store, &Policy::default());
    assert_eq!(d.outcome, Outcome::Unchanged, "flytesnacks-development must not get team-a's template");
}

#[test]
fn custom_names_are_honoured() {
    let mut policy = Policy::default();
    policy.names.environment_label = "example.com/env".into();
    policy.names.applied_annotation = "example.com/applied".into();
    let r = review(|r| {
        let labels = r["request"]["object"]["metadata"]["labels"].as_object_mut().unwrap();
        labels.remove("flyte.org/environment");
        labels.insert("example.com/env".into(), json!("hello_world"));
    });
    let d = decide(&r, &hello(), &policy);
    assert_eq!(patched(&r, &d)["metadata"]["annotations"]["example.com/applied"], "flyte/platform/hello_world@7");
}

#[test]
fn malformed_reviews_are_clear_errors() {
    for (body, needle) in [
        (&b"not json"[..], "not a valid admission.k8s.io/v1 AdmissionReview"),
        (b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}", "has no request"),
        (b"[1,2]", "AdmissionReview"),
        (b"{\"request\": {\"uid\": 5}}", "AdmissionReview"),
    ] {
        let err = parse_review(body).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
    let r = review(|r| r["request"].as_object_mut().unwrap().remove("object").map(|_| ()).unwrap());
    let req = parse_review(&serde_json::to_vec(&r).unwrap()).unwrap();
    assert!(matches!(mutate(req, &hello(), &Policy::default()), Err(BadReview::NoObject)));
    // An object that is there but not an object says so, not "has no object".
    for object in ["[1]", "\"pod\"", "7"] {
        let req = parse_review(review_text(object).as_bytes()).unwrap();
        let err = mutate(req, &hello(), &Policy::default()).unwrap_err();
        assert!(matches!(err, BadReview::NotAnObject), "{object}: {err}");
        assert!(err.to_string().contains("request.object is not a JSON object"), "{err}");
    }
}

/// A pod CREATE review whose object is `pod` (JSON text), as the API server frames it.
fn review_text(pod: &str) -> String {
    format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u1","resource":{{"group":"","version":"v1","resource":"pods"}},"operation":"CREATE","namespace":"flyte","object":{pod}}}}}"#
    )
}

#[test]
fn bodies_serde_json_only_skips_are_refused_at_the_door() {
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    let deep_pod =
        format!(r#"{{"metadata":{{"labels":{{"flyte.org/environment":"hello_world"}}}},"spec":{{"x":{deep}}}}}"#);
    let cases = [
        (deep_pod, "nested deeper than 128 levels"),
        (
            r#"{"metadata":{"labels":{"flyte.org/environment":"hello_world"}},"spec":{"priority":1e400}}"#.to_owned(),
            "number out of range",
        ),
        (
            r#"{"metadata":{"labels":{"flyte.org/environment":"hello_world","\ud800":"x"}}}"#.to_owned(),
            "lone surrogate",
        ),
    ];
    for (pod, needle) in cases {
        let err = parse_review(review_text(&pod).as_bytes()).unwrap_err();
        assert!(matches!(err, BadReview::Unreadable(_)), "{err}");
        let text = err.to_string();
        assert!(text.contains(needle) && text.contains("AdmissionReview"), "{text}");
    }
    // 126 levels inside the pod (128 in the body) still pass, and are merged.
    let deepest = format!("{}{}", "[".repeat(124), "]".repeat(124));
    let pod =
        format!(r#"{{"metadata":{{"labels":{{"flyte.org/environment":"hello_world"}}}},"spec":{{"x":{deepest}}}}}"#);
    let req = parse_review(review_text(&pod).as_bytes()).unwrap();
    assert_eq!(mutate(req, &hello(), &Policy::default()).unwrap().outcome, Outcome::Mutated);
}

// ---- Layers (SPEC §8) ----

/// The sample pod runs in `flytesnacks-development`; these templates stack on it.
fn layered() -> TemplateIndex {
    index(&[
        (
            "flyte",
            "platform",
            "defaults",
            "labels: {team: platform, tier: default}\npodSpec: {tolerations: [{key: spot}]}",
        ),
        ("flytesnacks-development", "tenant", "defaults", "labels: {team: snacks}"),
        ("team-b", "other", "defaults", "labels: {secret: team-b}"),
        ("flyte", "platform", "base", "podSpec: {containers: [{name: primary, env: [{name: MODE, value: base}]}]}"),
        (
            "flytesnacks-development",
            "tenant",
            "gpu",
            "podSpec: {containers: [{name: primary, env: [{name: MODE, value: gpu}]}]}",
        ),
        ("flyte", "platform", "hello_world", "labels: {lKeyA: lValA}"),
    ])
}

fn with_defaults() -> Policy {
    Policy { default_template: Some("defaults".into()), ..Policy::default() }
}

fn annotated(list: &str) -> Value {
    review(|r| r["request"]["object"]["metadata"]["annotations"]["flyte.org/pod-template"] = json!(list))
}

fn env_of(pod: &Value) -> &Value {
    &pod["spec"]["containers"][0]["env"]
}

#[test]
fn defaults_stack_platform_then_namespace_then_the_named_template() {
    let r = review(|_| {});
    let d = decide(&r, &layered(), &with_defaults());
    assert_eq!(d.outcome, Outcome::Mutated);
    let pod = patched(&r, &d);
    let labels = &pod["metadata"]["labels"];
    assert_eq!(
        (&labels["team"], &labels["tier"], &labels["lKeyA"]),
        (&json!("snacks"), &json!("default"), &json!("lValA"))
    );
    assert_eq!(labels.get("secret"), None, "another tenant's default never applies");
    let applied = "flyte/platform/defaults@7,flytesnacks-development/tenant/defaults@7,flyte/platform/hello_world@7";
    assert_eq!(d.applied.as_deref(), Some(applied), "every layer, lowest first");
    assert_eq!(pod["metadata"]["annotations"]["flyte.org/pod-template-applied"], applied);
    assert_eq!(d.response.audit_annotations["applied"], applied);
    assert!(d.response.warnings.is_none(), "defaults are overridden silently: {:?}", d.response.warnings);
}

#[test]
fn layers_are_composed_once_per_index_version_and_answer_the_same() {
    let (index, policy) = (layered(), with_defaults());
    let (gpu, base) = (annotated("base, gpu"), annotated("gpu, base"));
    let first = decide(&gpu, &index, &policy);
    assert_eq!(index.compositions_cached(), 1);
    let again = decide(&gpu, &index, &policy);
    assert_eq!(index.compositions_cached(), 1, "the second pod reuses the composition");
    assert_eq!((body(&first), patched(&gpu, &first)), (body(&again), patched(&gpu, &again)));
    assert_eq!(env_of(&patched(&gpu, &again))[0]["value"], "gpu");
    // Another order is another composition, with its own answer.
    let other = decide(&base, &index, &policy);
    assert_eq!(index.compositions_cached(), 2);
    assert_eq!(env_of(&patched(&base, &other))[0]["value"], "base");
    // One template is merged as it is, never cached.
    decide(&review(|_| {}), &hello(), &Policy::default());
    let single = hello();
    decide(&review(|_| {}), &single, &Policy::default());
    assert_eq!(single.compositions_cached(), 0);
}

#[test]
fn a_new_index_version_never_serves_an_old_composition() {
    let policy = with_defaults();
    let r = annotated("base, gpu");
    let mut c = catalog(&[
        ("flyte", "platform", "defaults", "labels: {team: platform}"),
        ("flyte", "platform", "base", "podSpec: {containers: [{name: primary, env: [{name: MODE, value: base}]}]}"),
        ("flyte", "gpu", "gpu", "podSpec: {containers: [{name: primary, env: [{name: MODE, value: gpu}]}]}"),
    ]);
    let before = c.index();
    assert_eq!(env_of(&patched(&r, &decide(&r, &before, &policy)))[0]["value"], "gpu");
    assert_eq!(before.compositions_cached(), 1);
    // The same catalog, one key updated: the next index composes again.
    let gpu = "podSpec: {containers: [{name: primary, env: [{name: MODE, value: gpu-v8}]}]}";
    c.apply("flyte", "gpu", Some("8"), &BTreeMap::from([("gpu".to_owned(), gpu.to_owned())]));
    let after = c.index();
    assert_eq!(after.compositions_cached(), 0, "a new index starts without compositions");
    let d = decide(&r, &after, &policy);
    assert_eq!(env_of(&patched(&r, &d))[0]["value"], "gpu-v8");
    assert!(d.applied.unwrap().ends_with("flyte/gpu/gpu@8"));
}

#[test]
fn the_composition_cache_is_bounded() {
    let texts: Vec<String> = (0..40).map(|i| format!("labels: {{t{i}: x}}")).collect();
    let entries: Vec<(&str, &str, String, &str)> =
        texts.iter().enumerate().map(|(i, t)| ("flyte", "platform", format!("t{i}"), t.as_str())).collect();
    let borrowed: Vec<(&str, &str, &str, &str)> = entries.iter().map(|(a, b, k, t)| (*a, *b, k.as_str(), *t)).collect();
    let index = index(&borrowed);
    let policy = Policy::default();
    for i in 0..40 {
        for j in 0..40 {
            if i != j {
                let d = decide(&annotated(&format!("t{i}, t{j}")), &index, &policy);
                assert_eq!(d.outcome, Outcome::Mutated);
            }
        }
    }
    assert_eq!(index.compositions_cached(), 1024, "1,560 combinations asked, the first 1,024 kept");
}

#[test]
fn defaults_apply_to_pods_whose_environment_has_no_template() {
    let r = review(|r| r["request"]["object"]["metadata"]["labels"]["flyte.org/environment"] = json!("nothing-here"));
    let d = decide(&r, &layered(), &with_defaults());
    assert_eq!(d.outcome, Outcome::Mutated);
    assert_eq!(patched(&r, &d)["metadata"]["labels"]["team"], "snacks");
    assert!(decide(&r, &layered(), &Policy::default()).response.patch.is_none(), "no default configured");
}

#[test]
fn a_default_missing_from_the_store_is_no_error() {
    let policy = Policy { default_template: Some("absent".into()), ..Policy::default() };
    let d = decide(&review(|_| {}), &layered(), &policy);
    assert_eq!(d.applied.as_deref(), Some("flyte/platform/hello_world@7"));
    assert!(d.response.warnings.is_none());
}

#[test]
fn a_broken_default_follows_the_broken_template_policy() {
    let store = index(&[
        ("flyte", "platform", "defaults", "podSpec: {nodeSelectr: {}}"),
        ("flyte", "platform", "hello_world", "{}"),
    ]);
    let d = decide(&review(|_| {}), &store, &with_defaults());
    assert_eq!(d.outcome, Outcome::Denied);
    let msg = &d.response.result.message;
    assert!(msg.contains("--default-template") && msg.contains("ConfigMap flyte/platform key \"defaults\""), "{msg}");
    let warn = Policy { on_broken: OnProblem::Warn, ..with_defaults() };
    let d = decide(&review(|_| {}), &store, &warn);
    assert!(d.response.allowed);
    assert_eq!(
        d.applied.as_deref(),
        Some("flyte/platform/hello_world@7"),
        "the broken layer is skipped, the rest applies"
    );
    assert!(d.response.warnings.unwrap()[0].contains("nodeSelectr"));
}

#[test]
fn the_annotation_lists_templates_applied_left_to_right_with_a_conflict_warning() {
    let r = annotated("base, gpu");
    let d = decide(&r, &layered(), &Policy::default());
    let pod = patched(&r, &d);
    assert!(env_of(&pod).as_array().unwrap().contains(&json!({"name": "MODE", "value": "gpu"})), "{pod:#}");
    assert_eq!(d.applied.as_deref(), Some("flyte/platform/base@7,flytesnacks-development/tenant/gpu@7"));
    let warnings = d.response.warnings.expect("a conflict warning");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = &warnings[0];
    assert!(
        w.contains("spec.containers[name=primary].env[name=MODE]")
            && w.contains("flyte/platform/base@7")
            && w.contains("flytesnacks-development/tenant/gpu@7"),
        "names the path and both templates: {w}"
    );

    let d = decide(&annotated("gpu,base"), &layered(), &Policy::default());
    assert!(env_of(&patched(&annotated("gpu,base"), &d))
        .as_array()
        .unwrap()
        .contains(&json!({"name": "MODE", "value": "base"})));
}

#[test]
fn on_conflict_deny_refuses_the_pod_with_the_same_text() {
    let policy = Policy { on_conflict: OnProblem::Deny, ..Policy::default() };
    let d = decide(&annotated("base,gpu"), &layered(), &policy);
    assert_eq!(d.outcome, Outcome::Denied);
    assert_eq!(d.response.result.code, 409);
    assert!(d.response.result.message.contains("env[name=MODE]"), "{}", d.response.result.message);
    // Without a conflict, deny mode changes nothing.
    assert_eq!(decide(&annotated("base,hello_world"), &layered(), &policy).outcome, Outcome::Mutated);
}

#[test]
fn empty_or_repeated_items_are_denied() {
    for list in ["base,,gpu", "base,", " , base", "base, gpu, base"] {
        let d = decide(&annotated(list), &layered(), &Policy { on_missing: OnProblem::Warn, ..Policy::default() });
        assert_eq!((d.outcome, d.response.result.code), (Outcome::Denied, 400), "{list:?}");
        assert!(d.response.result.message.contains(list), "quotes the annotation: {}", d.response.result.message);
    }
}

#[test]
fn a_missing_item_of_the_list_is_denied_naming_it() {
    let d = decide(&annotated("base,nope"), &layered(), &Policy::default());
    assert_eq!(d.outcome, Outcome::Denied);
    assert!(d.response.result.message.contains("\"nope\""), "{}", d.response.result.message);
    let warn = Policy { on_missing: OnProblem::Warn, ..Policy::default() };
    let d = decide(&annotated("base,nope"), &layered(), &warn);
    assert_eq!(d.applied.as_deref(), Some("flyte/platform/base@7"), "the other layers still apply");
}

#[test]
fn reinvocation_with_layers_changes_nothing() {
    let r = annotated("base,gpu");
    let first = decide(&r, &layered(), &with_defaults());
    let again = review(|x| x["request"]["object"] = patched(&r, &first));
    let second = decide(&again, &layered(), &with_defaults());
    assert_eq!(second.outcome, Outcome::Unchanged, "{:?}", second.response);
}

/// The sample as Flyte 2's executor makes it (SPEC §9): no environment label, the environment in
/// the managed pod's task-name label.
fn flyte_managed(task_name: &str) -> Value {
    review(|r| {
        let labels = r["request"]["object"]["metadata"]["labels"].as_object_mut().unwrap();
        labels.remove("flyte.org/environment");
        labels.insert("flyte.org/managed".into(), json!("true"));
        labels.insert("task-name".into(), json!(task_name));
    })
}

#[test]
fn a_managed_pod_gets_its_task_names_environment_and_the_record_says_so() {
    let r = flyte_managed("hello_world.train");
    let d = decide(&r, &hello(), &Policy::default());
    assert_eq!(d.outcome, Outcome::Mutated);
    assert_eq!(d.template.as_deref(), Some("hello_world"));
    let record = "flyte/platform/hello_world@7; environment from task-name hello_world.train";
    assert_eq!(d.response.audit_annotations["applied"], record);
    let pod = patched(&r, &d);
    assert_eq!(pod["metadata"]["annotations"]["flyte.org/pod-template-applied"], record);
    assert_eq!(pod["spec"]["containers"][0]["env"][0], json!({"name": "hello", "value": "world"}));
    // Idempotent: the record is information, and applying again changes nothing.
    let again = review(|again| again["request"]["object"] = pod.clone());
    assert!(decide(&again, &hello(), &Policy::default()).response.patch.is_none());
}

#[test]
fn a_managed_pod_without_a_template_is_left_alone_but_a_broken_one_is_denied() {
    let d = decide(&flyte_managed("nothing-here.train"), &hello(), &Policy::default());
    assert_eq!((d.outcome, d.response.allowed, &d.response.warnings), (Outcome::Unchanged, true, &None));
    let broken = index(&[("flyte", "platform", "etl", "podspec: {}")]);
    let d = decide(&flyte_managed("etl.load"), &broken, &Policy::default());
    assert_eq!(d.outcome, Outcome::Denied);
    assert!(d.response.result.message.contains("named by task-name etl.load"), "{}", d.response.result.message);
}

#[test]
fn the_task_name_rule_can_be_turned_off() {
    let mut policy = Policy::default();
    policy.names.task_name_label = String::new();
    let d = decide(&flyte_managed("hello_world.train"), &hello(), &policy);
    assert_eq!(d.outcome, Outcome::Unchanged);
}

// Shadow templates (SPEC §10).

const TEAM: &str = "flytesnacks-development";

/// `entries` as enforced ConfigMaps, plus `shadows` as ConfigMaps annotated `shadow`.
fn with_shadows(entries: &[(&str, &str, &str, &str)], shadows: &[(&str, &str, &str, &str)]) -> TemplateIndex {
    let mut c = catalog(entries);
    for (ns, cm, key, text) in shadows {
        let data = BTreeMap::from([(key.to_string(), text.to_string())]);
        let object = crate::template::SourceObject::ConfigMap(&data);
        c.apply_source(ns, cm, Some("9"), object, Ok(crate::template::Mode::Shadow));
    }
    c.index()
}

const GPU: &str =
    "podSpec: {nodeSelector: {gpu: a100}, containers: [{name: primary, env: [{name: hello, value: gpu}]}]}";

#[test]
fn a_shadow_template_is_reported_and_never_applied() {
    let store = with_shadows(&[], &[("flyte", "next", "hello_world", GPU)]);
    let d = decide(&review(|_| {}), &store, &Policy::default());
    assert_eq!(d.outcome, Outcome::Unchanged, "{:?}", d.response);
    assert!(d.response.patch.is_none());
    let expected = "shadow: flyte/next/hello_world would change 2 fields: /spec/containers/0/env/0, /spec/nodeSelector";
    assert_eq!(d.response.warnings.as_deref(), Some(&[expected.to_owned()][..]));
    assert_eq!(d.response.audit_annotations["shadow"], expected);
    assert!(!d.response.audit_annotations.contains_key("applied"), "nothing applied, nothing recorded");
    assert_eq!(
        d.shadows.iter().map(|s| (s.key.as_str(), s.result())).collect::<Vec<_>>(),
        [("hello_world", "would_change")]
    );
}

#[test]
fn a_shadow_evaluated_in_place_of_the_enforced_template_it_would_hide() {
    // The platform's template applies; the team's shadow of the same name would replace it.
    let enforced = [("flyte", "platform", "hello_world", "podSpec: {nodeSelector: {gpu: a100}}")];
    let alone = decide(&review(|_| {}), &index(&enforced), &Policy::default());
    let store = with_shadows(&enforced, &[(TEAM, "next", "hello_world", GPU)]);
    let d = decide(&review(|_| {}), &store, &Policy::default());
    assert_eq!(d.outcome, Outcome::Mutated);
    assert_eq!(d.response.patch, alone.response.patch, "the shadow changes nothing of what is applied");
    assert_eq!(d.response.audit_annotations["applied"], "flyte/platform/hello_world@7");
    let warnings = d.response.warnings.unwrap();
    assert_eq!(
        warnings,
        [format!("shadow: {TEAM}/next/hello_world would change 1 fields: /spec/containers/0/env/0")],
        "only the difference: the node selector is the same with and without it"
    );
}

#[test]
fn an_identical_shadow_changes_nothing() {
    let enforced = [("flyte", "platform", "hello_world", GPU)];
    let store = with_shadows(&enforced, &[(TEAM, "same", "hello_world", GPU)]);
    let d = decide(&review(|_| {}), &store, &Policy::default());
    assert_eq!(d.outcome, Outcome::Mutated);
    assert_eq!(d.response.warnings.unwrap(), [format!("shadow: {TEAM}/same/hello_world would change 0 fields")]);
    assert_eq!(d.shadows[0].result(), "no_change");
}

#[test]
fn a_broken_or_conflicting_shadow_never_denies() {
    let policy = Policy { on_conflict: OnProblem::Deny, on_broken: OnProblem::Deny, ..Policy::default() };
    let broken = with_shadows(&[], &[("flyte", "next", "hello_world", "podSpec: [")]);
    let d = decide(&review(|_| {}), &broken, &policy);
    assert_eq!(d.outcome, Outcome::Unchanged);
    let warning = &d.response.warnings.unwrap()[0];
    assert!(
        warning.starts_with("shadow: flyte/next/hello_world does not parse: ConfigMap flyte/next key"),
        "{warning}"
    );
    assert_eq!(d.shadows[0].result(), "broken");

    let two = |r: &mut Value| {
        r["request"]["object"]["metadata"]["annotations"]["flyte.org/pod-template"] = json!("a, b");
    };
    // The pod names a and b; b's shadow in the pod's namespace would hide the platform's b.
    let enforced =
        [("flyte", "platform", "a", "podSpec: {nodeSelector: {gpu: a100}}"), ("flyte", "platform", "b", "{}")];
    let store = with_shadows(&enforced, &[(TEAM, "next", "b", "podSpec: {nodeSelector: {gpu: h100}}")]);
    let d = decide(&review(two), &store, &policy);
    assert_eq!(d.outcome, Outcome::Mutated, "{:?}", d.response.result);
    let warnings = d.response.warnings.unwrap();
    assert_eq!(warnings[0], format!("shadow: {TEAM}/next/b would change 1 fields: /spec/nodeSelector/gpu"));
    assert_eq!(
        warnings[1],
        format!(
            "shadow: {TEAM}/next/b would conflict: templates flyte/platform/a@7 and {TEAM}/next/b@9 both set \
             spec.nodeSelector.gpu; the later one, b, wins (--on-conflict deny: the pod would be denied)"
        )
    );
}

#[test]
fn a_shadow_default_template_is_evaluated_at_its_place() {
    let policy = Policy { default_template: Some("defaults".into()), ..Policy::default() };
    let store = with_shadows(&[], &[("flyte", "next", "defaults", "labels: {tier: platform}")]);
    let d = decide(&review(|_| {}), &store, &policy);
    assert_eq!(d.outcome, Outcome::Unchanged);
    assert_eq!(
        d.response.warnings.unwrap(),
        ["shadow: flyte/next/defaults would change 1 fields: /metadata/labels/tier"]
    );
}

#[test]
fn an_unknown_mode_is_an_error_of_the_source() {
    let mut c = Catalog::new("flyte");
    let data = BTreeMap::from([("hello_world".to_owned(), "{}".to_owned())]);
    let mode = crate::template::Mode::read("flyte.org/pod-template-mode", Some("shadw"));
    let problems = c.apply_source("flyte", "cm", Some("1"), crate::template::SourceObject::ConfigMap(&data), mode);
    assert_eq!(
        problems[0].to_string(),
        "ConfigMap flyte/cm key \"hello_world\": metadata.annotations[flyte.org/pod-template-mode]: \"shadw\" is not a mode (shadow or enforce)"
    );
    let d = decide(&review(|_| {}), &c.index(), &Policy::default());
    assert_eq!(d.outcome, Outcome::Denied, "a typo never decides silently whether a template applies");
}

#[test]
fn a_shadow_that_sets_less_reports_what_would_be_gone() {
    let enforced = [("flyte", "platform", "hello_world", GPU)];
    let store = with_shadows(&enforced, &[(TEAM, "next", "hello_world", "podSpec: {nodeSelector: {gpu: a100}}")]);
    let d = decide(&review(|_| {}), &store, &Policy::default());
    assert_eq!(
        d.response.warnings.unwrap(),
        [format!("shadow: {TEAM}/next/hello_world would change 1 fields: /spec/containers/0/env/0")],
        "the platform's env var would be gone (a pointer into the pod as it is now)"
    );
}

#[test]
fn an_applied_record_reads_back_into_its_layers_and_rule() {
    let policy = Policy { default_template: Some("defaults".into()), ..Policy::default() };
    let store = index(&[("flyte", "platform", "defaults", "{}"), ("flyte", "platform", "say", "{}")]);
    let task_named = |r: &mut Value| {
        let labels = &mut r["request"]["object"]["metadata"]["labels"];
        labels.as_object_mut().unwrap().remove("flyte.org/environment");
        labels["task-name"] = json!("say.hello");
    };
    let d = decide(&review(task_named), &store, &policy);
    let record = d.applied.unwrap();
    assert_eq!(
        AppliedRecord::parse(&record),
        AppliedRecord {
            layers: vec!["flyte/platform/defaults@7", "flyte/platform/say@7"],
            rule: "; environment from task-name say.hello"
        }
    );
    assert_eq!(AppliedRecord::parse(""), AppliedRecord { layers: vec![], rule: "" });
}

/// A store publishing a new index on every read, like a cluster store under template churn.
struct Churning {
    versions: std::sync::Mutex<Vec<Arc<TemplateIndex>>>,
    snapshots: std::sync::atomic::AtomicUsize,
}

impl crate::store::TemplateStore for Churning {
    fn lookup(&self, _: &str, _: &str) -> crate::store::Lookup {
        panic!("an admission looks up in its snapshot only")
    }

    fn lookup_shadow(&self, _: &str, _: &str) -> Option<Arc<crate::store::TemplateEntry>> {
        panic!("an admission looks up in its snapshot only")
    }

    fn snapshot(&self) -> crate::store::Snapshot<'_> {
        let n = self.snapshots.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        crate::store::Snapshot::Current(self.versions.lock().unwrap()[n % 2].clone())
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn stats(&self) -> crate::store::StoreStats {
        Default::default()
    }
}

#[test]
fn one_admission_reads_one_index_version() {
    let version = |v: &str| {
        let mut c = Catalog::new("flyte");
        let data = BTreeMap::from([
            ("defaults".to_owned(), format!("labels: {{defaults: '{v}'}}")),
            ("hello_world".to_owned(), format!("labels: {{named: '{v}'}}")),
        ]);
        c.apply("flyte", "platform", Some(v), &data);
        Arc::new(c.index())
    };
    let store = Churning { versions: std::sync::Mutex::new(vec![version("1"), version("2")]), snapshots: 0.into() };
    let policy = Policy { default_template: Some("defaults".into()), ..Policy::default() };
    for expected in ["1", "2", "1"] {
        let d = decide_with(&review(|_| {}), &store, &policy);
        assert_eq!(
            d.applied.as_deref(),
            Some(&*format!("flyte/platform/defaults@{expected},flyte/platform/hello_world@{expected}"))
        );
    }
    assert_eq!(store.snapshots.load(std::sync::atomic::Ordering::SeqCst), 3, "one snapshot per admission");
}

fn decide_with(r: &Value, store: &dyn crate::store::TemplateStore, policy: &Policy) -> Decision {
    mutate(parse_review(&serde_json::to_vec(r).unwrap()).unwrap(), store, policy).unwrap()
}
