"""Flyte 2 task pods made the way Flyte makes them, for the tests.

Defines tasks with the real SDK (``flyte.TaskEnvironment`` + ``@env.task``), serializes each with
the SDK's own ``translate_task_to_wire`` (the wire ``TaskSpec`` the SDK sends when it runs or
deploys a task), and turns each serialized ``TaskTemplate`` into a Pod as Flyte's executor does
(flyteorg/flyte: executor/pkg/plugin/task_exec_metadata.go, executor/pkg/plugin/k8s/plugin_manager.go,
flyteplugins/go/tasks/plugins/k8s/pod/plugin.go, flyteplugins/.../flytek8s/{pod,container}_helper.go).
Mirrored: the pod's metadata (name, namespace, labels, annotations) and the containers' names and
shape. Not mirrored: the rest of ApplyFlytePodConfiguration (arg templating, FLYTE_INTERNAL_* env,
resource defaults, tolerations, base PodTemplate merge) and owner references (the owner TaskAction
does not exist in a test cluster, whose garbage collector would delete the pod).
Run-time values (run name, attempt, ...) are fixed, so every run writes the same file.
Writes ``OUT_DIR/flyte-pods.json``; prints the versions it ran with as JSON on stdout.

Usage: make_pods.py OUT_DIR
"""

import base64
import json
import os
import pathlib
import re
import sys
from importlib.metadata import version

import flyte
from flyte._internal.runtime.convert import generate_task_identity_hash
from flyte._internal.runtime.task_serde import translate_task_to_wire
from flyte.models import ActionID, SerializationContext
from flyteidl2.core import security_pb2
from google.protobuf import json_format, text_format
from kubernetes.client import V1Container, V1EnvVar, V1PodSpec

PROJECT, DOMAIN = "flytesnacks", "development"
# TaskActions, and so their pods, live in one namespace: actions.kubernetes.namespace (default and
# chart value "flyte"; actions/config/config.go, charts/flyte-binary/values.yaml), not <project>-<domain>.
NAMESPACE = "flyte"
RUN_NAME = "rbx6q2kz7mt4hc9fnw5d"  # runs/service/run_service.go generateRunName: "r" + 19 random chars
ROOT_ACTION = "a0"  # run_service.go RootActionName; every task below is a child action of it
VERSION = "v1"  # the code version the SDK stamps on the tasks (`--version`, TaskTemplate id)
HERE = pathlib.Path(__file__).resolve().parent

# ------------------------------------------------------------------ tasks, with the real SDK
GPU, SMALL = flyte.Resources(cpu=2, memory="8Gi", gpu=1), flyte.Resources(cpu="500m", memory="1Gi")
ml_gpu = flyte.TaskEnvironment("ml-gpu", image="ghcr.io/example/ml-gpu:1.0", resources=GPU, env_vars={"HF_HOME": "/hf"})
etl_batch = flyte.TaskEnvironment("etl_batch", image="ghcr.io/example/etl:2.3", resources=SMALL)
no_template = flyte.TaskEnvironment(name="no-template", image="ghcr.io/example/base:1.0")
# <env>.<function> is longer than 63 characters, the env name is not: the cut label keeps the dot.
backfill = flyte.TaskEnvironment(name="research-team-feature-store-backfill-2026", image="ghcr.io/example/fs:7.1")
# The env name alone is 72 characters: the cut label has no dot (and its 63rd character is '-').
RECONCILIATION = "platform-data-engineering-nightly-warehouse-reconciliation-job-eu-west-1"
reconciliation = flyte.TaskEnvironment(name=RECONCILIATION, image="ghcr.io/example/warehouse:3.0")


PREDICT_ENV = [V1EnvVar(name="FROM_TASK", value="task"), V1EnvVar(name="SHARED", value="from-task")]
PREDICT_TEMPLATE = flyte.PodTemplate(
    primary_container_name="primary",
    labels={"task-own": "yes"},
    annotations={"task-own": "yes"},
    pod_spec=V1PodSpec(containers=[V1Container(name="primary", env=PREDICT_ENV)]),
)


@ml_gpu.task
def train() -> None: ...


@ml_gpu.task(pod_template=PREDICT_TEMPLATE)
def predict() -> None: ...


@ml_gpu.task
def with_secret() -> None: ...


@etl_batch.task
def load() -> None: ...


@no_template.task
def noop() -> None: ...


@backfill.task
def recompute_embeddings_for_all_customers() -> None: ...


@reconciliation.task
def reconcile() -> None: ...


# `@env.task` takes no `secrets=` (only the environment does); the SDK's per-task way is
# `task.override(secrets=...)`, which keeps the task's name.
TASKS = [
    train,
    predict,
    with_secret.override(secrets=flyte.Secret(key="hf-token", as_env_var="HF_TOKEN")),
    load,
    noop,
    recompute_embeddings_for_all_customers,
    reconcile,
]


# ------------------------------------------------------------------ the executor, ported from Go
def sanitize_label_value(value: str) -> str:
    """utils.SanitizeLabelValue (flyteplugins/go/tasks/pluginmachinery/utils/labels.go)."""
    if value == "":
        return ""
    sanitized = re.sub(r"[^a-zA-Z0-9._-]", "-", value)
    sanitized = sanitized[:63]  # validation.LabelValueMaxLength
    if re.match(r"[^a-zA-Z0-9]", sanitized):
        sanitized = "x" + sanitized[1:]
    if re.search(r"[^a-zA-Z0-9]\Z", sanitized):
        sanitized = sanitized[:-1] + "x"
    return sanitized


def marshal_secrets(secrets) -> dict:
    """secrets.MarshalSecretsToMapStrings (flyteplugins/.../utils/secrets/marshaler.go): the text proto
    of each Secret, base32 with encoding.Base32Encoder's alphabet and no padding, as flyte.secrets/s<i>."""
    std, special = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", "abcdefghijklmnopqrstuvwxyz123456"
    out = {}
    for i, secret in enumerate(secrets):
        b32 = base64.b32encode(text_format.MessageToString(secret).encode()).decode().rstrip("=")
        out[f"flyte.secrets/s{i}"] = b32.translate(str.maketrans(std, special))
    return out


def task_action_name(action: ActionID) -> str:
    """buildTaskActionName (actions/k8s/client.go): <run>-a0 for the root action, else <run>-<action>."""
    return f"{action.run_name}-a0" if action.name == action.run_name else f"{action.run_name}-{action.name}"


def task_execution_metadata(tt, action: ActionID, attempts: int = 1):
    """NewTaskExecutionMetadata (executor/pkg/plugin/task_exec_metadata.go): the labels and annotations
    every task pod gets, and the generated name <TaskAction name>-<retry>."""
    # newTaskActionCR (actions/k8s/client.go): the TaskAction's own labels, unioned in below
    ta_labels = {"flyte.org/project": action.project, "flyte.org/domain": action.domain}
    ta_labels |= {"flyte.org/run": action.run_name, "flyte.org/action": action.name}
    ta_labels |= {"flyte.org/action-type": "task", "flyte.org/is-root": "false"}  # children of a0
    # secret.OrganizationLabel: secret.DefaultOrganization; ProjectLabel; DomainLabel; flytek8s.ManagedLabelKey
    inject = {"organization": "flyte", "project": action.project, "domain": action.domain, "flyte.org/managed": "true"}
    annotations = {}
    if tt.security_context.secrets:
        annotations = marshal_secrets(tt.security_context.secrets)
        inject["inject-flyte-secrets"] = "true"  # secrets.PodLabel/PodLabelValue
    retry = 0 if attempts <= 1 else attempts - 1  # attemptToRetry
    for key, value in (("run", action.run_name), ("action", action.name), ("task-name", tt.id.name)):
        if sanitize_label_value(value):  # setSanitizedLabel
            inject[key] = sanitize_label_value(value)
    inject["attempt"] = str(retry + 1)
    return {**ta_labels, **inject}, annotations, f"{task_action_name(action)}-{retry}"  # UnionMaps, buildGeneratedName


def k8s_resources(res) -> dict:
    """ToK8sResourceRequirements (flytek8s/utils.go), with the GPU entry renamed as
    SanitizeGPUResourceRequirements (container_helper.go) does with the default GpuResourceName."""
    names = {"CPU": "cpu", "MEMORY": "memory", "GPU": "nvidia.com/gpu", "EPHEMERAL_STORAGE": "ephemeral-storage"}
    name = type(res).ResourceName.Name
    out = {f: {names[name(e.name)]: e.value for e in getattr(res, f)} for f in ("limits", "requests")}
    return {field: entries for field, entries in out.items() if entries}  # omitempty


def apply_resource_overrides(resources: dict) -> dict:
    """ApplyResourceOverrides(resources, platform, assignIfUnset=true) (flytek8s/container_helper.go)
    as AddFlyteCustomizationsToContainer calls it for a container task and a pod's primary container,
    with the plugin's default platform requests (cpu 1000m, memory 1024Mi; flytek8s/config/config.go)
    and no platform limits: a missing request takes the limit or the default, a missing limit the
    request (AdjustOrDefaultResource); ephemeral storage and accelerators only when set. Without it
    the API server refuses a GPU request that has no limit."""
    requests, limits = dict(resources.get("requests", {})), dict(resources.get("limits", {}))
    defaults = {"cpu": "1000m", "memory": "1024Mi"}
    optional = [n for n in ("ephemeral-storage", "nvidia.com/gpu") if n in requests or n in limits]
    for name in ["cpu", "memory", *optional]:
        requests[name] = requests.get(name) or limits.get(name) or defaults[name]
        limits[name] = limits.get(name) or requests[name]
    return {"limits": limits, "requests": requests}


def build_raw_container(tt, generated_name: str) -> dict:
    """BuildRawContainer (flytek8s/container_helper.go): one container named like the pod."""
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", generated_name) and len(generated_name) <= 63, (
        "not a DNS-1123 label: Go would name the container rand.String(4)"
    )
    c = tt.container
    container = {
        "name": generated_name,
        "image": c.image,
        "command": list(c.command),
        "args": list(c.args),
        "env": [{"name": kv.key, "value": kv.value} for kv in c.env],  # ToK8sEnvVar
        "resources": apply_resource_overrides(k8s_resources(c.resources)),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {k: v for k, v in container.items() if v != []}  # omitempty


def _as_go(value):
    """A K8sPod podSpec is a protobuf Struct; Go unmarshals it into a v1.PodSpec (utils.UnmarshalStructToObj),
    so integral doubles are integers again and empty lists and maps (omitempty) are gone; a struct
    field such as `resources` stays even when empty."""
    if isinstance(value, dict):
        out = {k: _as_go(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in ([], {}) or k == "resources"}
    if isinstance(value, list):
        return [_as_go(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def build_raw_pod(tt, generated_name: str):
    """BuildRawPod (flytek8s/pod_helper.go): the pod spec, the task's own labels and annotations, and
    the primary container's name, for a container or a k8s_pod target."""
    labels, annotations = {}, {}
    if tt.WhichOneof("target") == "container":
        container = build_raw_container(tt, generated_name)
        spec, primary = {"containers": [container]}, container["name"]
    else:  # k8s_pod
        spec = _as_go(json_format.MessageToDict(tt.k8s_pod.pod_spec))
        for c in spec.get("containers", []):  # SanitizeGPUResourceRequirements, as above
            for field in c.get("resources", {}).values():
                if "gpu" in field:
                    field["nvidia.com/gpu"] = field.pop("gpu")
        primary = tt.config["primary_container_name"]  # flytek8s.PrimaryContainerKey
        for c in spec.get("containers", []):  # ApplyFlytePodConfiguration: the primary's resources
            if c["name"] == primary:
                c["resources"] = apply_resource_overrides(c.get("resources", {}))
        labels.update(tt.k8s_pod.metadata.labels)
        annotations.update(tt.k8s_pod.metadata.annotations)
    spec["enableServiceLinks"] = False
    return spec, labels, annotations, primary


def build_pod(tt, action: ActionID) -> dict:
    """pod plugin BuildResource (flyteplugins/go/tasks/plugins/k8s/pod/plugin.go) and then
    PluginManager.addObjectMetadata (executor/pkg/plugin/k8s/plugin_manager.go)."""
    tm_labels, tm_annotations, generated_name = task_execution_metadata(tt, action)
    spec, labels, annotations, primary = build_raw_pod(tt, generated_name)
    spec.setdefault("restartPolicy", "Never")  # UpdatePod (pod_helper.go)
    if tt.type == "sidecar" or (len(spec["containers"]) == 1 and tt.type != "raw-container"):
        annotations["primary_container_name"] = primary
    default_annotations = {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}  # K8sPluginConfig default
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", generated_name) and len(generated_name) <= 253
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": generated_name,
            "namespace": NAMESPACE,
            "labels": {**labels, **tm_labels},  # UnionMaps(DefaultLabels, o.labels, taskCtx labels)
            "annotations": {**default_annotations, **annotations, **tm_annotations},
        },
        "spec": spec,
    }


def main() -> None:
    out_dir = sys.argv[1]
    ctx = SerializationContext(version=VERSION, project=PROJECT, domain=DOMAIN, root_dir=HERE)
    root = ActionID(name=ROOT_ACTION, run_name=RUN_NAME, project=PROJECT, domain=DOMAIN)
    pods = []
    for seq, task in enumerate(TASKS, start=1):
        tt = translate_task_to_wire(task, ctx).task_template
        # The child action's name, as the SDK's controller names the actions a parent task launches.
        # (input_hash: what convert.generate_inputs_hash_from_proto gives a task without inputs)
        task_hash = generate_task_identity_hash(tt)
        action = root.new_sub_action_from(task_call_seq=seq, task_hash=task_hash, input_hash="", group=None)
        pod = build_pod(tt, action)
        pods.append({
            "environment": task.parent_env_name,
            "function": task.func.__name__,
            "target": {"container": "container", "k8s_pod": "k8sPod"}[tt.WhichOneof("target")],
            "taskName": tt.id.name,
            "taskNameLabel": pod["metadata"]["labels"]["task-name"],
            "secrets": pod["metadata"]["labels"].get("inject-flyte-secrets") == "true",
            "pod": pod,
        })
    self_check(pods)
    with open(os.path.join(out_dir, "flyte-pods.json"), "w") as f:
        json.dump({"pods": pods}, f, indent=2, sort_keys=True)
        f.write("\n")
    json.dump({"flyte": version("flyte"), "kubernetes": version("kubernetes")}, sys.stdout)


def self_check(pods) -> None:
    label_value = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
    for p in pods:
        assert p["taskName"] == f'{p["environment"]}.{p["function"]}', p["taskName"]
        assert p["taskNameLabel"] == sanitize_label_value(p["taskName"]), p
        assert label_value.fullmatch(p["taskNameLabel"]) and len(p["taskNameLabel"]) <= 63, p["taskNameLabel"]
        for value in p["pod"]["metadata"]["labels"].values():
            assert label_value.fullmatch(value) and len(value) <= 63, value
    # The Go tests' own cases: utils/labels_test.go (TestSanitizeLabelValue) and
    # utils/secrets/marshaler_test.go (TestMarshalSecretsToMapStrings, "Without group").
    for value, expected in [
        ("", ""), ("my-run.name_1", "my-run.name_1"), ("my_module.my task/v2", "my_module.my-task-v2"),
        ("-leading", "xleading"), ("trailing-", "trailingx"), ("täsk", "t-sk"),
        ("a" * 70, "a" * 63), ("a" * 62 + "-b", "a" * 62 + "x"),
    ]:  # fmt: skip
        assert sanitize_label_value(value) == expected, (value, sanitize_label_value(value))
    assert marshal_secrets([security_pb2.Secret(key="my_key")]) == {"flyte.secrets/s0": "nnsxsoraejwxsx2lmv3secq"}


if __name__ == "__main__":
    main()
