"""Pod templates made by the real Flyte SDK, for tests/flyte_sdk.rs.

Builds templates with ``flyte.PodTemplate`` from kubernetes client models, serializes each with
``to_k8s_pod()`` (the ``K8sPod`` message) as JSON, exactly as ``json_format.MessageToJson`` writes
it, and writes them as one template-source ConfigMap manifest: ``OUT_DIR/sdk-pod-templates.json``.
Prints the versions it ran with as JSON on stdout.

Usage: make_templates.py OUT_DIR
"""

import json
import os
import sys
from datetime import timedelta
from importlib.metadata import version

import flyte
from google.protobuf import json_format
from kubernetes.client import (
    V1Container,
    V1EmptyDirVolumeSource,
    V1EnvVar,
    V1LocalObjectReference,
    V1PodSpec,
    V1ResourceRequirements,
    V1Toleration,
    V1Volume,
    V1VolumeMount,
)


def hello_world() -> flyte.PodTemplate:
    """The example of the Flyte "Pod templates" docs page (examples/templates/hello-world.yaml)."""
    return flyte.PodTemplate(
        primary_container_name="primary",
        labels={"lKeyA": "lValA"},
        annotations={"aKeyA": "aValA"},
        pod_spec=V1PodSpec(
            containers=[
                V1Container(
                    name="primary",
                    env=[V1EnvVar(name="hello", value="world")],
                ),
            ],
            image_pull_secrets=[V1LocalObjectReference(name="regcred-test")],
        ),
    )


def gpu() -> flyte.PodTemplate:
    """examples/templates/gpu.yaml, made with PodTemplate.from_spec (it finds `primary` itself)."""
    cache = V1Volume(name="dataset-cache", empty_dir=V1EmptyDirVolumeSource(size_limit="50Gi"))
    return flyte.PodTemplate.from_spec(
        V1PodSpec(
            node_selector={"nvidia.com/gpu.present": "true"},
            tolerations=[V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
            volumes=[cache],
            containers=[
                V1Container(name="default", env=[V1EnvVar(name="TZ", value="UTC")]),
                V1Container(
                    name="primary",
                    resources=V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}),
                    env=[V1EnvVar(name="NVIDIA_VISIBLE_DEVICES", value="all")],
                    volume_mounts=[V1VolumeMount(name="dataset-cache", mount_path="/cache")],
                ),
                V1Container(
                    name="log-shipper",
                    image="fluent/fluent-bit:3.1",
                    volume_mounts=[V1VolumeMount(name="dataset-cache", mount_path="/cache", read_only=True)],
                ),
            ],
        ),
        labels={"accelerator": "nvidia"},
        annotations={"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
    )


def grace() -> flyte.PodTemplate:
    """Integer fields: the K8sPod podSpec is a protobuf Struct, so they come out as doubles (600.0).
    No labels or annotations: the SDK still writes an empty `metadata`."""
    return flyte.PodTemplate(
        pod_spec=V1PodSpec(
            containers=[V1Container(name="primary")],
            tolerations=[
                V1Toleration(
                    key="node.kubernetes.io/not-ready",
                    operator="Exists",
                    effect="NoExecute",
                    toleration_seconds=300,
                )
            ],
        ),
    ).with_termination_grace_period(timedelta(minutes=10))


TEMPLATES = {"hello_world": hello_world, "gpu": gpu, "grace": grace}


def main() -> None:
    out_dir = sys.argv[1]
    data = {name: json_format.MessageToJson(make().to_k8s_pod()) for name, make in TEMPLATES.items()}
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "sdk-pod-templates",
            "namespace": "flyte",
            "labels": {"flyte.org/pod-templates": "true"},
        },
        "data": data,
    }
    with open(os.path.join(out_dir, "sdk-pod-templates.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    json.dump({"flyte": version("flyte"), "kubernetes": version("kubernetes")}, sys.stdout)


if __name__ == "__main__":
    main()
