"""GPU work pools (deploy/prefect/docker-gpu-pool.json, k8s-gpu-pool.json): rendered with Prefect's own templating
(`apply_values`) into prefect-docker's and prefect-kubernetes' job configuration classes, the job asks for the GPUs,
image and env it was given. Every declared job variable is referenced by the template: Prefect drops the others
without a word (PrefectHQ/prefect #17588, #18544)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from uuid import uuid4

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prefect"
VALUES = {"image": "registry.example/transferkit:1.2", "gpu_count": 2, "env": {"TRANSFERKIT_RUN": "nightly"}}


def _template(name: str) -> dict:
    return json.loads((DEPLOY / name).read_text())


def _render(cls, template: dict, values: dict):
    """What the worker builds for a flow run: defaults under the deployment's job variables (env merged, as
    Prefect merges it), applied to the template, validated by the worker's job configuration class."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    variables = {k: v["default"] for k, v in props.items() if "default" in v}
    env = {**variables.get("env", {}), **values.get("env", {})}
    variables |= {**values, "env": env}
    return cls(**apply_values(template["job_configuration"], variables))


@pytest.mark.parametrize("name", ["docker-gpu-pool.json", "k8s-gpu-pool.json"])
def test_every_job_variable_is_referenced_by_the_template(name):
    t = _template(name)
    used = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", json.dumps(t["job_configuration"])))
    declared = set(t["variables"]["properties"])
    assert declared - used == set()  # none silently dropped
    assert used - declared == set()  # none left unset
    assert {"gpu_count", "image", "env"} <= used


def test_docker_job_requests_the_gpus_and_docker_py_accepts_them():
    import docker
    from prefect_docker.worker import DockerWorkerJobConfiguration

    t = _template("docker-gpu-pool.json")
    cfg = _render(DockerWorkerJobConfiguration, t, VALUES)
    assert cfg.image == VALUES["image"]
    assert cfg.env["TRANSFERKIT_RUN"] == "nightly" and cfg.env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    # the worker passes container_create_kwargs to docker-py's containers.create: its host config is the API body
    host = docker.types.HostConfig(version="1.44", **cfg.container_create_kwargs)
    (req,) = host["DeviceRequests"]
    assert req["Driver"] == "nvidia" and req["Count"] == 2 and req["Capabilities"] == [["gpu"]]
    assert host["ShmSize"] == 8 * 1024**3
    default = _render(DockerWorkerJobConfiguration, t, {"image": "x"})
    assert default.container_create_kwargs["device_requests"][0]["count"] == 1  # one GPU unless told otherwise


def test_kubernetes_job_requests_the_gpus_with_image_and_env():
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    cfg = _render(KubernetesWorkerJobConfiguration, _template("k8s-gpu-pool.json"), VALUES)
    cfg.prepare_for_flow_run(FlowRun(flow_id=uuid4(), name="nightly"))  # as the worker does before submitting
    pod = cfg.job_manifest["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == VALUES["image"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2 and c["resources"]["requests"]["nvidia.com/gpu"] == 2
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TRANSFERKIT_RUN"] == "nightly" and "PREFECT__FLOW_RUN_ID" in env
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_the_deployments_job_variables_exist_in_the_gpu_templates():
    """prefect.yaml's Docker and Kubernetes deployments move to the GPU pools without losing a setting."""
    spec = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())
    pools = {"transferkit-docker": "docker-gpu-pool.json", "transferkit-k8s": "k8s-gpu-pool.json"}
    seen = set()
    for d in spec["deployments"]:
        pool = d["work_pool"]["name"]
        if pool in pools:
            declared = set(_template(pools[pool])["variables"]["properties"])
            assert set(d["work_pool"].get("job_variables", {})) <= declared, d["name"]
            seen.add(pool)
    assert seen == set(pools)
