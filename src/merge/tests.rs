use serde_json::json;

use super::*;
use crate::merge::rules::default_pull_policy;

fn tpl(yaml: &str) -> PodTemplate {
    PodTemplate::parse(yaml).unwrap()
}

fn merged(pod: &Value, yaml: &str) -> Value {
    let t = tpl(yaml);
    let once = merge_pod(pod, &t);
    let twice = merge_pod(&once.pod, &t);
    assert_eq!(once.pod, twice.pod, "merging a merged pod again must change nothing");
    once.pod
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect()
}

fn simple_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "labels": {"flyte.org/environment": "e"}},
        "spec": {"containers": [{"name": "primary", "image": "img:1"}]}
    })
}

#[test]
fn labels_and_annotations_union_with_pod_winning() {
    let pod = json!({"metadata": {"labels": {"team": "pod", "a": "1"}}, "spec": {}});
    let out = merged(&pod, "labels: {team: template, b: '2'}\nannotations: {x/y~z: v}");
    assert_eq!(out["metadata"]["labels"], json!({"team": "pod", "a": "1", "b": "2"}));
    assert_eq!(out["metadata"]["annotations"], json!({"x/y~z": "v"}), "a pod without annotations gets the map");
}

#[test]
fn empty_template_changes_nothing() {
    let pod = simple_pod();
    assert_eq!(merged(&pod, "{}"), pod);
}

#[test]
fn duplicate_env_keeps_the_pods_entry_once() {
    let mut pod = simple_pod();
    pod["spec"]["containers"][0]["env"] = json!([{"name": "hello", "value": "pod"}, {"name": "mine", "value": "1"}]);
    let out = merged(
        &pod,
        "podSpec: {containers: [{name: primary, env: [{name: hello, value: world}, {name: extra, value: x}]}]}",
    );
    assert_eq!(
        out["spec"]["containers"][0]["env"],
        json!([{"name": "extra", "value": "x"}, {"name": "hello", "value": "pod"}, {"name": "mine", "value": "1"}]),
        "template entries the pod lacks come first; the pod's own entries keep their order and values"
    );
}

#[test]
fn env_value_from_entries_are_kept_whole() {
    let mut pod = simple_pod();
    let pod_entry =
        json!({"name": "NODE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}});
    pod["spec"]["containers"][0]["env"] = json!([pod_entry]);
    let out = merged(
        &pod,
        "podSpec: {containers: [{name: primary, env: [{name: NODE, value: static}, {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]}]}",
    );
    let env = &out["spec"]["containers"][0]["env"];
    assert_eq!(env[1], pod_entry, "the pod's valueFrom entry is not mixed with the template's value");
    assert_eq!(env[0]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    assert_eq!(env.as_array().unwrap().len(), 2);
}

#[test]
fn template_env_from_is_kept_and_unioned() {
    let mut pod = simple_pod();
    pod["spec"]["containers"][0]["envFrom"] = json!([{"configMapRef": {"name": "pod-cm"}}]);
    let out = merged(
        &pod,
        "podSpec: {containers: [{name: primary, envFrom: [{secretRef: {name: s}}, {configMapRef: {name: pod-cm}}]}]}",
    );
    assert_eq!(
        out["spec"]["containers"][0]["envFrom"],
        json!([{"secretRef": {"name": "s"}}, {"configMapRef": {"name": "pod-cm"}}])
    );
}

#[test]
fn keyed_lists_match_on_their_keys() {
    let mut pod = simple_pod();
    pod["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    pod["spec"]["imagePullSecrets"] = json!([{"name": "mine"}]);
    pod["spec"]["hostAliases"] = json!([{"ip": "10.0.0.1", "hostnames": ["pod"]}]);
    let c = &mut pod["spec"]["containers"][0];
    c["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
    c["ports"] = json!([{"containerPort": 8080, "protocol": "TCP"}]);
    let out = merged(
        &pod,
        r#"podSpec:
  volumes: [{name: data, configMap: {name: x}}, {name: cache, emptyDir: {}}]
  imagePullSecrets: [{name: mine}, {name: regcred}]
  hostAliases: [{ip: 10.0.0.1, hostnames: [template]}, {ip: 10.0.0.2, hostnames: [b]}]
  containers:
  - name: primary
    volumeMounts: [{name: other, mountPath: /data}, {name: cache, mountPath: /cache}]
    ports: [{containerPort: 8080}, {containerPort: 8080, protocol: UDP}]
"#,
    );
    let spec = &out["spec"];
    assert_eq!(spec["volumes"], json!([{"name": "cache", "emptyDir": {}}, {"name": "data", "emptyDir": {}}]));
    assert_eq!(names(&spec["imagePullSecrets"]), ["regcred", "mine"]);
    assert_eq!(spec["hostAliases"][1], json!({"ip": "10.0.0.1", "hostnames": ["pod"]}));
    assert_eq!(spec["hostAliases"].as_array().unwrap().len(), 2);
    let c = &spec["containers"][0];
    assert_eq!(
        c["volumeMounts"],
        json!([{"name": "cache", "mountPath": "/cache"}, {"name": "data", "mountPath": "/data"}]),
        "volume mounts are keyed by mountPath"
    );
    assert_eq!(
        c["ports"],
        json!([{"containerPort": 8080, "protocol": "UDP"}, {"containerPort": 8080, "protocol": "TCP"}]),
        "a port without protocol is TCP"
    );
}

#[test]
fn unkeyed_lists_union_without_duplicates() {
    let mut pod = simple_pod();
    let defaulted = json!({"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300});
    pod["spec"]["tolerations"] = json!([defaulted]);
    let out = merged(
        &pod,
        "podSpec: {tolerations: [{key: gpu, operator: Exists}, {key: gpu, operator: Exists}, {key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 300}]}",
    );
    assert_eq!(out["spec"]["tolerations"], json!([{"key": "gpu", "operator": "Exists"}, defaulted]));
}

#[test]
fn command_and_args_are_atomic() {
    let mut pod = simple_pod();
    pod["spec"]["containers"][0]["args"] = json!(["pod"]);
    let out = merged(&pod, "podSpec: {containers: [{name: primary, args: [template, x], command: [/bin/run]}]}");
    let c = &out["spec"]["containers"][0];
    assert_eq!(c["args"], json!(["pod"]), "the pod's args are not extended");
    assert_eq!(c["command"], json!(["/bin/run"]), "the template's command fills a pod without one");
}

#[test]
fn maps_union_per_key_and_objects_merge_field_by_field() {
    let mut pod = simple_pod();
    pod["spec"]["nodeSelector"] = json!({"zone": "pod"});
    pod["spec"]["securityContext"] = json!({"runAsUser": 1000});
    pod["spec"]["containers"][0]["resources"] = json!({"requests": {"cpu": "1"}, "limits": {"cpu": "1"}});
    let out = merged(
        &pod,
        r#"podSpec:
  nodeSelector: {zone: template, pool: gpu}
  securityContext: {runAsUser: 0, runAsNonRoot: true, fsGroup: 2000}
  containers: [{name: primary, resources: {requests: {cpu: "2", memory: 1Gi}, limits: {nvidia.com/gpu: 1}}}]
"#,
    );
    assert_eq!(out["spec"]["nodeSelector"], json!({"zone": "pod", "pool": "gpu"}));
    assert_eq!(out["spec"]["securityContext"], json!({"runAsUser": 1000, "runAsNonRoot": true, "fsGroup": 2000}));
    assert_eq!(
        out["spec"]["containers"][0]["resources"],
        json!({"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "nvidia.com/gpu": "1"}})
    );
}

#[test]
fn api_defaulted_scalars_count_as_unset() {
    let mut pod = simple_pod();
    let spec = &mut pod["spec"];
    spec["dnsPolicy"] = json!("ClusterFirst");
    spec["schedulerName"] = json!("default-scheduler");
    spec["terminationGracePeriodSeconds"] = json!(30);
    spec["restartPolicy"] = json!("Never"); // explicit, not the default: stays
    spec["enableServiceLinks"] = json!(true);
    let c = &mut spec["containers"][0];
    c["imagePullPolicy"] = json!("IfNotPresent"); // the default for a tagged image
    c["terminationMessagePath"] = json!("/dev/termination-log");
    c["readinessProbe"] = json!({"exec": {"command": ["true"]}, "periodSeconds": 10, "timeoutSeconds": 1});
    let out = merged(
        &pod,
        r#"podSpec:
  dnsPolicy: Default
  schedulerName: gang
  terminationGracePeriodSeconds: 120
  restartPolicy: OnFailure
  enableServiceLinks: false
  containers:
  - name: primary
    imagePullPolicy: Always
    terminationMessagePath: /tmp/msg
    readinessProbe: {periodSeconds: 5}
"#,
    );
    let spec = &out["spec"];
    assert_eq!(spec["dnsPolicy"], "Default");
    assert_eq!(spec["schedulerName"], "gang");
    assert_eq!(spec["terminationGracePeriodSeconds"], 120);
    assert_eq!(spec["restartPolicy"], "Never");
    assert_eq!(spec["enableServiceLinks"], false);
    let c = &spec["containers"][0];
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(c["terminationMessagePath"], "/tmp/msg");
    assert_eq!(c["readinessProbe"]["periodSeconds"], 5);
    assert_eq!(c["readinessProbe"]["timeoutSeconds"], 1);
}

#[test]
fn pull_policy_default_depends_on_the_image() {
    assert_eq!(default_pull_policy("nginx"), "Always");
    assert_eq!(default_pull_policy("nginx:latest"), "Always");
    assert_eq!(default_pull_policy("registry:5000/nginx"), "Always");
    assert_eq!(default_pull_policy("registry:5000/nginx:1.2"), "IfNotPresent");
    assert_eq!(default_pull_policy("nginx@sha256:abc"), "IfNotPresent");
    // An untagged image defaults to Always: a pod's explicit IfNotPresent is the author's choice.
    let mut pod = simple_pod();
    pod["spec"]["containers"][0]["image"] = json!("nginx");
    pod["spec"]["containers"][0]["imagePullPolicy"] = json!("IfNotPresent");
    let out = merged(&pod, "podSpec: {containers: [{name: primary, imagePullPolicy: Never}]}");
    assert_eq!(out["spec"]["containers"][0]["imagePullPolicy"], "IfNotPresent");
}

fn three_containers(annotations: Value, pod_name: &str) -> Value {
    json!({
        "metadata": {"name": pod_name, "annotations": annotations},
        "spec": {"containers": [
            {"name": "first", "image": "i:1"},
            {"name": "main", "image": "i:1"},
            {"name": "other", "image": "i:1"},
        ]}
    })
}

fn primary_of(pod: &Value, primary_name: &str) -> String {
    let yaml = format!("primaryContainerName: {primary_name}\npodSpec: {{containers: [{{name: {primary_name}, env: [{{name: PRIMARY, value: 'yes'}}]}}]}}");
    let out = merged(pod, &yaml);
    let marked: Vec<_> =
        out["spec"]["containers"].as_array().unwrap().iter().filter(|c| c.get("env").is_some()).collect();
    assert_eq!(marked.len(), 1, "exactly one container is primary: {out}");
    marked[0]["name"].as_str().unwrap().to_owned()
}

#[test]
fn primary_container_resolution_order() {
    let both = json!({DEFAULT_CONTAINER_ANNOTATION: "other", PRIMARY_CONTAINER_ANNOTATION: "main"});
    assert_eq!(primary_of(&three_containers(both, "p"), "primary"), "other", "kubectl default-container first");
    let flyte = json!({PRIMARY_CONTAINER_ANNOTATION: "main"});
    assert_eq!(primary_of(&three_containers(flyte, "p"), "primary"), "main", "then Flyte's primary_container_name");
    let stale = json!({DEFAULT_CONTAINER_ANNOTATION: "gone"});
    assert_eq!(
        primary_of(&three_containers(stale.clone(), "p"), "other"),
        "other",
        "then the template's primaryContainerName"
    );
    assert_eq!(
        primary_of(&three_containers(stale.clone(), "main"), "primary"),
        "main",
        "then a container named like the pod"
    );
    assert_eq!(primary_of(&three_containers(stale, "p"), "primary"), "first", "else the first container");
}

#[test]
fn template_may_set_the_default_container_annotation() {
    let pod = three_containers(json!({}), "p");
    let out = merged(
        &pod,
        "annotations: {kubectl.kubernetes.io/default-container: other}\npodSpec: {containers: [{name: primary, env: [{name: P, value: x}]}]}",
    );
    assert!(out["spec"]["containers"][2].get("env").is_some(), "resolved on the merged annotations: {out}");
}

#[test]
fn default_primary_and_same_name_layer_in_order() {
    let pod = json!({"metadata": {}, "spec": {"containers": [
        {"name": "main", "image": "i:1"},
        {"name": "helper", "image": "i:1"},
    ]}});
    let out = merged(
        &pod,
        r#"primaryContainerName: main
podSpec:
  containers:
  - {name: default, env: [{name: LEVEL, value: default}, {name: D, value: d}], workingDir: /default}
  - {name: main, env: [{name: LEVEL, value: primary}], workingDir: /primary}
  - {name: helper, env: [{name: LEVEL, value: helper}]}
"#,
    );
    let [main, helper] = [&out["spec"]["containers"][0], &out["spec"]["containers"][1]];
    assert_eq!(main["env"], json!([{"name": "D", "value": "d"}, {"name": "LEVEL", "value": "primary"}]));
    assert_eq!(main["workingDir"], "/primary");
    assert_eq!(helper["env"], json!([{"name": "D", "value": "d"}, {"name": "LEVEL", "value": "helper"}]));
    assert_eq!(helper["workingDir"], "/default", "default applies to every container");
    assert_eq!(out["spec"]["containers"].as_array().unwrap().len(), 2, "no template container is added");
}

#[test]
fn reserved_names_are_never_added_as_containers() {
    let pod = simple_pod();
    let out = merged(
        &pod,
        r#"primaryContainerName: main
podSpec:
  containers: [{name: default, image: a}, {name: main, image: b}, {name: primary-init, image: c}, {name: default-init, image: d}]
  initContainers: [{name: default-init, image: a}, {name: primary-init, image: b}, {name: default, image: c}, {name: main, image: d}]
"#,
    );
    assert_eq!(names(&out["spec"]["containers"]), ["primary"]);
    assert!(out["spec"].get("initContainers").is_none(), "{out}");
}

#[test]
fn sidecars_go_after_and_init_containers_before() {
    let mut pod = simple_pod();
    pod["spec"]["initContainers"] = json!([{"name": "setup", "image": "s:1"}]);
    let out = merged(
        &pod,
        r#"podSpec:
  containers:
  - {name: default, env: [{name: ALL, value: x}]}
  - {name: shipper, image: fluent:1}
  initContainers:
  - {name: default-init, env: [{name: INIT, value: x}]}
  - {name: fetch, image: fetch:1}
"#,
    );
    assert_eq!(names(&out["spec"]["containers"]), ["primary", "shipper"], "the pod's first container stays first");
    assert_eq!(
        out["spec"]["containers"][1]["env"],
        json!([{"name": "ALL", "value": "x"}]),
        "default applies to sidecars"
    );
    assert_eq!(names(&out["spec"]["initContainers"]), ["fetch", "setup"]);
    assert_eq!(out["spec"]["initContainers"][0]["env"], json!([{"name": "INIT", "value": "x"}]));
    assert_eq!(out["spec"]["initContainers"][1]["env"], json!([{"name": "INIT", "value": "x"}]));
}

#[test]
fn a_sidecar_without_image_is_not_added_and_said() {
    let t = tpl("podSpec: {containers: [{name: ghost, env: [{name: A, value: b}]}]}");
    let m = merge_pod(&simple_pod(), &t);
    assert_eq!(names(&m.pod["spec"]["containers"]), ["primary"]);
    assert_eq!(m.warnings.len(), 1);
    assert!(m.warnings[0].contains("\"ghost\""), "{:?}", m.warnings);
}

#[test]
fn primary_init_goes_to_the_first_init_container_the_template_does_not_define() {
    let mut pod = simple_pod();
    pod["spec"]["initContainers"] = json!([{"name": "a", "image": "i:1"}, {"name": "b", "image": "i:1"}]);
    let out =
        merged(&pod, "podSpec: {initContainers: [{name: primary-init, workingDir: /p}, {name: pre, image: pre:1}]}");
    let init = &out["spec"]["initContainers"];
    assert_eq!(names(init), ["pre", "a", "b"]);
    assert!(init[0].get("workingDir").is_none());
    assert_eq!(init[1]["workingDir"], "/p");
    assert!(init[2].get("workingDir").is_none());
}

#[test]
fn containers_added_by_another_webhook_still_get_the_template() {
    let t = tpl("podSpec: {containers: [{name: default, env: [{name: ALL, value: x}]}]}");
    let mut once = merge_pod(&simple_pod(), &t).pod;
    // Another webhook adds a sidecar before our reinvocation.
    once["spec"]["containers"].as_array_mut().unwrap().push(json!({"name": "istio-proxy", "image": "proxy:1"}));
    let again = merge_pod(&once, &t).pod;
    assert_eq!(again["spec"]["containers"][1]["env"], json!([{"name": "ALL", "value": "x"}]));
}

#[test]
fn the_shared_flyte_sample_gets_exactly_the_documented_changes() {
    let review: Value = serde_json::from_str(include_str!("../../examples/reviews/flyte-task-pod.json")).unwrap();
    let pod = review["request"]["object"].clone();
    let cm: Value = crate::yaml::from_str(include_str!("../../examples/templates/hello-world.yaml")).unwrap();
    let out = merged(&pod, cm["data"]["hello_world"].as_str().unwrap());
    let mut expected = pod.clone();
    expected["metadata"]["labels"]["lKeyA"] = json!("lValA");
    expected["metadata"]["annotations"]["aKeyA"] = json!("aValA");
    expected["spec"]["imagePullSecrets"] = json!([{"name": "regcred-test"}]);
    let env = expected["spec"]["containers"][0]["env"].as_array_mut().unwrap();
    env.insert(0, json!({"name": "hello", "value": "world"}));
    assert_eq!(out, expected);
}

#[test]
fn a_template_container_never_reuses_a_name_from_the_other_list() {
    let t = tpl("podSpec: {initContainers: [{name: primary, image: x:1}]}\nprimaryContainerName: main");
    let m = merge_pod(&simple_pod(), &t);
    assert!(m.pod["spec"].get("initContainers").is_none(), "{}", m.pod);
    assert!(m.warnings[0].contains("\"primary\""), "{:?}", m.warnings);
}

#[test]
fn a_sidecar_named_like_the_pod_does_not_become_primary_on_reinvocation() {
    // Found by the property test: the pod is named "main", the template adds a sidecar "main".
    let pod = json!({"metadata": {"name": "main"}, "spec": {"containers": [{"name": "side", "image": "i:1"}]}});
    let out = merged(&pod, "podSpec: {containers: [{name: main, image: m:1}, {name: primary, workingDir: /p}]}");
    assert_eq!(out["spec"]["containers"][0]["workingDir"], "/p");
    assert!(out["spec"]["containers"][1].get("workingDir").is_none());
}

#[test]
fn a_pod_without_containers_does_not_make_an_added_sidecar_primary() {
    // Found by fuzzing (fuzz/corpus/merge_patch/no-containers): the only container is the one the
    // template added, and the first-container rule must not pick it on reinvocation.
    let pod = json!({"metadata": {"name": "p"}, "spec": {}});
    let out = merged(&pod, "podSpec: {containers: [{name: primary, workingDir: /p}, {name: shipper, image: s:1}]}");
    assert_eq!(names(&out["spec"]["containers"]), ["shipper"]);
    assert!(out["spec"]["containers"][0].get("workingDir").is_none());
}
