use super::*;

fn source(namespace: &str, key: &str) -> TemplateSource {
    TemplateSource {
        kind: crate::template::SourceKind::ConfigMap,
        namespace: namespace.into(),
        object: "cm".into(),
        key: key.into(),
        version: "sha256:0".into(),
        mode: Default::default(),
    }
}

fn ready(namespace: &str, key: &str, text: &str) -> Found {
    Found { source: source(namespace, key), state: FoundState::Ready(Arc::new(PodTemplate::parse(text).unwrap())) }
}

#[test]
fn object_names_are_dns_names_and_never_collide() {
    assert_eq!(object_name(&source("flyte", "gpu")), "pod-template.flyte.gpu");
    let underscore = object_name(&source("flyte", "hello_world"));
    let dash = object_name(&source("flyte", "hello-world"));
    assert!(underscore.starts_with("pod-template.flyte.hello-world-") && underscore.len() == dash.len() + 9);
    assert_ne!(underscore, dash);
    assert!(object_name(&source("flyte", "GPU")).starts_with("pod-template.flyte.gpu-"));
    assert!(
        object_name(&source("flyte", "_")).starts_with("pod-template.flyte."),
        "a name of no DNS character: the hash"
    );
}

#[test]
fn namespace_rules_are_made_explicit() {
    let names = Names::default();
    let found = [
        ready("flyte", "t", "labels: {a: b}"),
        ready("team-b", "t", "labels: {a: c}"),
        ready("team-a", "t", "labels: {a: d}"),
        ready("team-a", "other", "{}"),
    ];
    let exported = export_all(&found, &names, None);
    let selector =
        |i: usize| exported[i].1.as_ref().unwrap().bindings[0]["spec"]["matchResources"]["namespaceSelector"].clone();
    assert_eq!(
        selector(0),
        json!({"matchExpressions": [{"key": NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": ["team-a", "team-b"]}]}),
        "a platform template: every namespace but those with their own"
    );
    assert_eq!(selector(1), json!({"matchLabels": {NAMESPACE_NAME_LABEL: "team-b"}}));
    assert_eq!(selector(3), json!({"matchLabels": {NAMESPACE_NAME_LABEL: "team-a"}}));
    let alone = export_all(&[ready("flyte", "only", "{}")], &names, None);
    assert_eq!(alone[0].1.as_ref().unwrap().bindings[0]["spec"]["matchResources"]["namespaceSelector"], json!({}));
}

#[test]
fn the_configured_names_are_used() {
    let names = Names {
        environment_label: "example.com/env".into(),
        template_annotation: "example.com/template".into(),
        applied_annotation: "example.com/applied".into(),
        platform_namespace: "platform".into(),
        ..Names::default()
    };
    let e = export(&PodTemplate::parse("{}").unwrap(), &source("platform", "t"), &names, &[]).unwrap();
    let condition = e.policy["spec"]["matchConditions"][0]["expression"].as_str().unwrap();
    assert!(condition.contains(r#"object.metadata.annotations["example.com/template"].trim() == "t""#), "{condition}");
    assert!(condition.contains(r#"object.metadata.labels["example.com/env"] == "t""#), "{condition}");
    assert_eq!(
        e.bindings[0]["spec"]["matchResources"]["objectSelector"],
        json!({"matchExpressions": [{"key": "example.com/env", "operator": "Exists"}]})
    );
    assert_eq!(
        e.bindings[1]["spec"]["matchResources"]["objectSelector"]["matchExpressions"][0],
        json!({"key": "example.com/env", "operator": "DoesNotExist"}),
        "the task-name binding excludes the pods of the first: each pod is bound once"
    );
    let record = e.policy["spec"]["mutations"].as_array().unwrap().last().unwrap()["jsonPatch"]["expression"].clone();
    assert!(record.as_str().unwrap().contains("/metadata/annotations/example.com~1applied"), "{record}");
    assert_eq!(e.policy["metadata"]["annotations"]["example.com/applied"], "platform/cm/t@sha256:0");
}

#[test]
fn the_task_name_rule_is_expressed_with_its_own_binding() {
    let e = export(&PodTemplate::parse("{}").unwrap(), &source("flyte", "ml-gpu"), &Names::default(), &[]).unwrap();
    let condition = e.policy["spec"]["matchConditions"][0]["expression"].as_str().unwrap();
    assert!(
        condition.ends_with(
            r#"object.metadata.labels["flyte.org/managed"] == "true" && (has(object.metadata.labels) && "task-name" in object.metadata.labels) && object.metadata.labels["task-name"].startsWith("ml-gpu.")"#
        ),
        "{condition}"
    );
    let names: Vec<_> = e.bindings.iter().map(|b| b["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["pod-template.flyte.ml-gpu", "pod-template.flyte.ml-gpu.task-name"]);
    assert_eq!(
        e.bindings[1]["spec"]["matchResources"]["objectSelector"],
        json!({"matchExpressions": [
            {"key": "flyte.org/environment", "operator": "DoesNotExist"},
            {"key": "flyte.org/managed", "operator": "In", "values": ["true"]},
            {"key": "task-name", "operator": "Exists"},
        ]})
    );
    // A key with a dot is never an environment of rule 3; rule 3 off: one binding, no clause.
    let dotted = export(&PodTemplate::parse("{}").unwrap(), &source("flyte", "gpu.a100"), &Names::default(), &[]);
    let condition = dotted.unwrap().policy["spec"]["matchConditions"][0]["expression"].as_str().unwrap().to_owned();
    assert!(condition.ends_with(": false") && !condition.contains("task-name"), "{condition}");
    let off = Names { task_name_label: String::new(), ..Names::default() };
    let e = export(&PodTemplate::parse("{}").unwrap(), &source("flyte", "ml-gpu"), &off, &[]).unwrap();
    assert_eq!(e.bindings.len(), 1);
    assert!(e.policy["spec"]["matchConditions"][0]["expression"].as_str().unwrap().ends_with(": false"));
}

#[test]
fn an_empty_template_only_records_itself() {
    let e = export(&PodTemplate::parse("{}").unwrap(), &source("flyte", "t"), &Names::default(), &[]).unwrap();
    assert_eq!(e.policy["spec"]["mutations"].as_array().unwrap().len(), 1);
}

#[test]
fn refusals_name_their_reason() {
    let names = Names::default();
    let shadowed = Found { source: source("flyte", "s"), state: FoundState::Shadowed { by: source("flyte", "s") } };
    let broken = Found {
        source: source("flyte", "b"),
        state: FoundState::Broken(PodTemplate::parse("podspec: {}").unwrap_err()),
    };
    let found = [ready("flyte", "t", "{}"), shadowed, broken];
    let plain = export_all(&found, &names, None);
    assert!(plain[0].1.is_ok());
    assert!(matches!(&plain[1].1, Err(Refusal::Shadowed { by }) if by == "ConfigMap flyte/cm key \"s\""));
    assert!(matches!(&plain[2].1, Err(Refusal::Broken(_))));
    let defaults = export_all(&found, &names, Some("base"));
    assert_eq!(defaults[0].1, Err(Refusal::DefaultTemplate("base".into())));
    assert!(defaults[0].1.as_ref().unwrap_err().to_string().contains("--default-template \"base\""));
    // A broken template stays a broken one, defaults or not.
    assert!(matches!(&defaults[2].1, Err(Refusal::Broken(_))));
    assert!(export_all(&found, &names, Some("")).first().unwrap().1.is_ok(), "an empty default is no default");
}

#[test]
fn a_field_cel_cannot_address_is_refused_not_guessed() {
    let mut g = Gen::default();
    let owner = At { cel: "object.spec".into(), path: Pointer::fixed("/spec"), map: false };
    assert_eq!(g.fill_field(&owner, "example.com/odd", &json!("x"), Ctx::PodSpec), "[]");
    assert_eq!(g.problems, ["/spec/example.com/odd: not a field name CEL can address"]);
    // CEL's reserved words are escaped the way Kubernetes does.
    assert_eq!(g.field(&owner, "namespace").as_deref(), Some("__namespace__"));
    assert_eq!(g.field(&owner, "nodeName").as_deref(), Some("nodeName"));
}

#[test]
fn literals_are_cel() {
    assert_eq!(
        lit(&json!({"a": [1, "x", true], "b\"": null})),
        r#"{"a": dyn([dyn(1), dyn("x"), dyn(true)]), "b\"": dyn(null)}"#
    );
    assert_eq!(Pointer::fixed("/metadata/labels").child("a/b~c").cel(), r#""/metadata/labels/a~1b~0c""#);
}

#[test]
fn api_defaults_count_as_unset() {
    let mut g = Gen::default();
    let owner = At { cel: "object.spec".into(), path: Pointer::fixed("/spec"), map: false };
    let term = g.fill_field(&owner, "terminationGracePeriodSeconds", &json!(60), Ctx::PodSpec);
    assert!(term.contains("object.spec.terminationGracePeriodSeconds == 30"), "{term}");
    let term = g.fill_field(&owner, "hostname", &json!("h"), Ctx::PodSpec);
    assert!(!term.contains("=="), "no API default: only an absent value is filled: {term}");
}
