use serde_json::json;

use super::*;
use crate::merge::{explain, merge_pod};

fn tpl(yaml: &str) -> PodTemplate {
    PodTemplate::parse(yaml).unwrap()
}

fn layers<'t>(templates: &'t [(Role, PodTemplate)]) -> Vec<Layer<'t>> {
    templates.iter().map(|(role, template)| Layer { role: *role, template }).collect()
}

fn composed(templates: &[(Role, PodTemplate)]) -> (PodTemplate, Vec<Conflict>) {
    let c = compose(&layers(templates));
    (c.template.into_owned(), c.conflicts)
}

fn conflict(path: &str, lower: usize, higher: usize) -> Conflict {
    Conflict { path: path.into(), lower, higher }
}

use Role::{Default as D, Named as N};

#[test]
fn one_layer_is_borrowed_unchanged() {
    let t = tpl("labels: {a: b}");
    let c = compose(&[Layer { role: N, template: &t }]);
    assert!(matches!(c.template, Cow::Borrowed(b) if std::ptr::eq(b, &t)));
    assert!(c.conflicts.is_empty());
}

#[test]
fn higher_layer_wins_and_defaults_are_overridden_silently() {
    let (t, conflicts) = composed(&[
        (D, tpl("labels: {team: platform, tier: base}\npodSpec: {nodeSelector: {pool: general}}")),
        (D, tpl("labels: {team: ml}")),
        (N, tpl("labels: {tier: gpu}\npodSpec: {nodeSelector: {pool: gpu, zone: a}}")),
    ]);
    assert_eq!(t.labels, BTreeMap::from([("team".into(), "ml".into()), ("tier".into(), "gpu".into())]));
    assert_eq!(Value::Object(t.pod_spec()), json!({"nodeSelector": {"pool": "gpu", "zone": "a"}}));
    assert!(conflicts.is_empty(), "a default is there to be overridden: {conflicts:?}");
}

#[test]
fn named_templates_conflict_on_scalars_map_keys_entries_and_atomic_lists() {
    let (t, conflicts) = composed(&[
        (
            N,
            tpl(r#"
labels: {team: a, same: x}
podSpec:
  priorityClassName: low
  nodeSelector: {pool: a}
  containers: [{name: primary, command: [a], env: [{name: MODE, value: a}, {name: SAME, value: x}]}]
"#),
        ),
        (
            N,
            tpl(r#"
labels: {team: b, same: x}
podSpec:
  priorityClassName: high
  nodeSelector: {pool: b}
  containers: [{name: primary, command: [b], env: [{name: MODE, value: b}, {name: SAME, value: x}]}]
"#),
        ),
    ]);
    assert_eq!(
        conflicts,
        [
            conflict("metadata.labels.team", 0, 1),
            conflict("spec.containers[name=primary].command", 0, 1),
            conflict("spec.containers[name=primary].env[name=MODE]", 0, 1),
            conflict("spec.nodeSelector.pool", 0, 1),
            conflict("spec.priorityClassName", 0, 1),
        ],
        "identical values (label `same`, env SAME) are no conflict"
    );
    let primary = &t.pod_spec()["containers"][0];
    assert_eq!(primary["command"], json!(["b"]), "the later template wins");
    assert_eq!(primary["env"], json!([{"name": "MODE", "value": "b"}, {"name": "SAME", "value": "x"}]));
    assert_eq!(t.labels["team"], "b");
}

#[test]
fn a_value_inside_a_subtree_another_template_added_is_a_conflict() {
    let (_, conflicts) = composed(&[
        (N, tpl("podSpec: {securityContext: {runAsUser: 1000, runAsNonRoot: true}}")),
        (N, tpl("podSpec: {securityContext: {runAsUser: 0, fsGroup: 2}}")),
    ]);
    assert_eq!(conflicts, [conflict("spec.securityContext.runAsUser", 0, 1)]);
}

#[test]
fn each_override_is_one_conflict_naming_the_template_that_set_the_value() {
    let (t, conflicts) = composed(&[
        (D, tpl("podSpec: {schedulerName: d}")),
        (N, tpl("podSpec: {schedulerName: a}")),
        (N, tpl("podSpec: {schedulerName: b}")),
        (N, tpl("podSpec: {schedulerName: c}")),
    ]);
    assert_eq!(t.pod_spec()["schedulerName"], "c");
    assert_eq!(conflicts, [conflict("spec.schedulerName", 1, 2), conflict("spec.schedulerName", 2, 3)]);
}

#[test]
fn keys_with_dots_and_slashes_are_quoted_in_paths() {
    let (_, conflicts) = composed(&[
        (N, tpl("annotations: {example.com/owner: a}\npodSpec: {containers: [{name: p, resources: {limits: {nvidia.com/gpu: 1}}}]}")),
        (N, tpl("annotations: {example.com/owner: b}\npodSpec: {containers: [{name: p, resources: {limits: {nvidia.com/gpu: 2}}}]}")),
    ]);
    assert_eq!(
        conflicts,
        [
            conflict(r#"metadata.annotations["example.com/owner"]"#, 0, 1),
            conflict(r#"spec.containers[name=p].resources.limits["nvidia.com/gpu"]"#, 0, 1),
        ]
    );
}

#[test]
fn lists_keep_lower_entries_first_without_duplicates() {
    let (t, conflicts) = composed(&[
        (D, tpl("podSpec: {tolerations: [{key: a}, {key: b}], imagePullSecrets: [{name: x}], containers: [{name: default, envFrom: [{configMapRef: {name: c}}]}]}")),
        (N, tpl("podSpec: {tolerations: [{key: b}, {key: c}], imagePullSecrets: [{name: y}, {name: x}], containers: [{name: default, envFrom: [{configMapRef: {name: c}}]}]}")),
    ]);
    assert!(conflicts.is_empty());
    assert_eq!(t.pod_spec()["tolerations"], json!([{"key": "a"}, {"key": "b"}, {"key": "c"}]));
    assert_eq!(t.pod_spec()["imagePullSecrets"], json!([{"name": "y"}, {"name": "x"}]));
    assert_eq!(t.pod_spec()["containers"][0]["envFrom"], json!([{"configMapRef": {"name": "c"}}]));
}

#[test]
fn the_highest_named_primary_wins_and_every_layers_primary_is_that_container() {
    let (t, conflicts) = composed(&[
        (D, tpl("podSpec: {containers: [{name: primary, env: [{name: FROM_DEFAULT, value: '1'}]}]}")),
        (N, tpl("primaryContainerName: main\npodSpec: {containers: [{name: main, env: [{name: FROM_MAIN, value: '1'}]}]}")),
        (N, tpl("podSpec: {containers: [{name: primary, env: [{name: FROM_LAST, value: '1'}]}]}")),
    ]);
    assert!(t.primary_container_name_set);
    assert_eq!(t.primary_container_name, "main", "the last layer does not name its primary: `main` stays");
    let spec = t.pod_spec();
    let names: Vec<&str> = spec["containers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["main"], "each layer's primary container is the one primary");
    let env: Vec<&str> =
        spec["containers"][0]["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(env, ["FROM_DEFAULT", "FROM_MAIN", "FROM_LAST"]);
    assert!(conflicts.is_empty());

    let (_, conflicts) = composed(&[(N, tpl("primaryContainerName: a")), (N, tpl("primaryContainerName: b"))]);
    assert_eq!(conflicts, [conflict("primaryContainerName", 0, 1)]);
}

#[test]
fn composition_is_the_fold_of_pairwise_compositions() {
    let ts = [
        (D, tpl("labels: {a: '1'}\npodSpec: {tolerations: [{key: t1}], containers: [{name: default, env: [{name: A, value: '1'}]}]}")),
        (N, tpl("labels: {a: '2'}\npodSpec: {tolerations: [{key: t2}, {key: t1}], containers: [{name: primary, env: [{name: A, value: '2'}]}]}")),
        (N, tpl("podSpec: {tolerations: [{key: t3}], containers: [{name: default, env: [{name: B, value: '3'}]}, {name: side, image: s}]}")),
    ];
    let (all, _) = composed(&ts);
    let (first_two, _) = composed(&ts[..2]);
    let (folded, _) = composed(&[(D, first_two), (N, ts[2].1.clone())]);
    assert_eq!(all, folded);
}

#[test]
fn the_pod_wins_over_every_layer_and_a_second_merge_changes_nothing() {
    let ts = [
        (D, tpl("podSpec: {securityContext: {runAsNonRoot: true}, containers: [{name: default, env: [{name: TZ, value: UTC}]}]}")),
        (N, tpl("podSpec: {containers: [{name: primary, env: [{name: TZ, value: Europe/Paris}, {name: GPU, value: '1'}]}]}")),
    ];
    let t = compose(&layers(&ts)).template;
    let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "primary", "image": "i", "env": [{"name": "GPU", "value": "0"}]}]}});
    let once = merge_pod(&pod, &t).pod;
    assert_eq!(
        once["spec"]["containers"][0]["env"],
        json!([{"name": "TZ", "value": "Europe/Paris"}, {"name": "GPU", "value": "0"}])
    );
    assert_eq!(once["spec"]["securityContext"], json!({"runAsNonRoot": true}));
    assert_eq!(merge_pod(&once, &t).pod, once);
}

#[test]
fn explain_names_the_layer_that_set_each_changed_path() {
    let ts = [
        (D, tpl("labels: {team: platform}\npodSpec: {tolerations: [{key: spot}], containers: [{name: default, env: [{name: TZ, value: UTC}]}]}")),
        (N, tpl("labels: {team: ml, gpu: 'yes'}\npodSpec: {containers: [{name: primary, env: [{name: CUDA, value: '12'}]}]}")),
        (N, tpl("podSpec: {tolerations: [{key: gpu}], containers: [{name: primary, env: [{name: TZ, value: Asia/Tokyo}]}]}")),
    ];
    let pod = json!({"metadata": {"name": "p", "labels": {"own": "x"}},
        "spec": {"tolerations": [{"key": "node"}], "containers": [{"name": "primary", "image": "i"}]}});
    let (merged, changes) = explain(&pod, &layers(&ts));
    assert_eq!(merged, merge_pod(&pod, &compose(&layers(&ts)).template).pod);
    let by_path: BTreeMap<&str, usize> = changes.iter().map(|c| (c.path.as_str(), c.layer)).collect();
    assert_eq!(
        by_path,
        BTreeMap::from([
            ("/metadata/labels/gpu", 1),
            ("/metadata/labels/team", 1),
            ("/spec/containers/0/env/0", 1),
            ("/spec/containers/0/env/1", 2),
            ("/spec/tolerations/0", 0),
            ("/spec/tolerations/1", 2),
        ]),
        "{changes:?} for {merged:#}"
    );
}
