"""The manifests in deployments/, validated offline.

- dask-kubernetes objects against the CRD ``openAPIV3Schema`` shipped in the dask-kubernetes
  package (jsonschema);
- the pods and services the operator renders from them (its own pure builders) and every
  plain Kubernetes object against the Kubernetes schemas (kubernetes-validate, strict);
- pzscale's policy: no GPU on the scheduler, GPU workers have ``nvidia.com/gpu`` in limits,
  the dashboard never behind a LoadBalancer/NodePort service or an Ingress, every container
  non-root with CPU and memory limits.
Mutated copies of the shipped manifests must be rejected with a message naming the problem.
"""

from __future__ import annotations

import ast
import copy
import importlib.resources
import re
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments"
K8S_VERSION = "1.32.0"
CRD_DIR = "operator/deployment/helm/dask-kubernetes-operator/crds"
DASK_KINDS = ("DaskCluster", "DaskWorkerGroup", "DaskAutoscaler", "DaskJob")
DASHBOARD_PORTS = {8787, "http-dashboard", "dashboard"}


# ---------------------------------------------------------------- the validator


@cache
def crd_schema(kind: str) -> dict:
    """The served version's openAPIV3Schema of a dask-kubernetes CRD, from the installed package."""
    text = (importlib.resources.files("dask_kubernetes") / CRD_DIR / f"{kind.lower()}.yaml").read_text()
    crd = yaml.safe_load(text)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def shipped() -> list[dict]:
    return [doc for path in sorted((DEPLOYMENTS / "kubernetes").glob("*.yaml")) for doc in load(path)]


def rendered(obj: dict) -> list[dict]:
    """The Deployments and Service the operator creates for a DaskCluster or DaskWorkerGroup."""
    from dask_kubernetes.operator.controller.controller import (
        build_scheduler_deployment_spec,
        build_scheduler_service_spec,
        build_worker_deployment_spec,
    )

    name, spec = obj["metadata"]["name"], obj["spec"]
    if obj["kind"] == "DaskCluster":
        return [build_scheduler_deployment_spec(name, spec["scheduler"]["spec"], {}, {}),
                build_scheduler_service_spec(name, spec["scheduler"]["service"], {}, {}),
                build_worker_deployment_spec(f"{name}-default", "default", name, "0a1b2c", spec["worker"]["spec"],
                                             {}, {})]
    if obj["kind"] == "DaskWorkerGroup":
        return [build_worker_deployment_spec(name, "default", spec["cluster"], "0a1b2c", spec["worker"]["spec"],
                                             {}, {})]
    return []


def _pods(obj: dict) -> list[tuple[str, dict]]:
    """(role, pod spec) pairs of a DaskCluster / DaskWorkerGroup."""
    spec = obj["spec"]
    if obj["kind"] == "DaskCluster":
        return [("scheduler", spec["scheduler"]["spec"]), ("worker", spec["worker"]["spec"])]
    if obj["kind"] == "DaskWorkerGroup":
        return [("worker", spec["worker"]["spec"])]
    return []


def _gpu_keys(resources: dict | None) -> set[str]:
    return {key for part in ("requests", "limits") for key in (resources or {}).get(part) or {}
            if key.endswith("/gpu")}


def _is_gpu_worker(container: dict) -> bool:
    words = " ".join(map(str, container.get("command", []) + container.get("args", [])))
    return "cuda" in words.split() or bool(re.search(r"GPU=\d", words)) or bool(_gpu_keys(container.get("resources")))


def _public_service(service_spec: dict) -> bool:
    ports = {p.get(k) for p in service_spec.get("ports", []) for k in ("name", "port", "targetPort")}
    return service_spec.get("type", "ClusterIP") in ("LoadBalancer", "NodePort") and bool(ports & DASHBOARD_PORTS)


def policy_problems(obj: dict) -> list[str]:
    """pzscale's rules for one object, as one-line messages naming the object and the rule."""
    where = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
    problems = []
    for role, pod in _pods(obj):
        pod_non_root = (pod.get("securityContext") or {}).get("runAsNonRoot") is True
        for c in pod.get("containers", []):
            at = f"{where}: {role} container {c.get('name')}"
            limits = (c.get("resources") or {}).get("limits") or {}
            if not {"cpu", "memory"} <= set(limits):
                problems.append(f"{at} has no cpu and memory limits")
            if not (pod_non_root or (c.get("securityContext") or {}).get("runAsNonRoot") is True):
                problems.append(f"{at} may run as root (set securityContext.runAsNonRoot: true)")
            gpus = _gpu_keys(c.get("resources"))
            if role == "scheduler" and gpus:
                problems.append(f"{at} asks for a GPU ({', '.join(sorted(gpus))}); the scheduler does no GPU work")
            if role == "worker" and _is_gpu_worker(c) and not any(k.endswith("/gpu") for k in limits):
                problems.append(f"{at} is a GPU worker without nvidia.com/gpu in its resource limits")
    if obj.get("kind") == "DaskCluster" and _public_service(obj["spec"]["scheduler"]["service"]):
        problems.append(f"{where}: the scheduler service is {obj['spec']['scheduler']['service']['type']}; "
                        "the dashboard must stay inside the cluster (type ClusterIP, kubectl port-forward)")
    if obj.get("kind") == "Service" and _public_service(obj.get("spec", {})):
        problems.append(f"{where}: a {obj['spec']['type']} service exposes the dashboard outside the cluster")
    if obj.get("kind") == "Ingress":
        backends = re.findall(r"'(?:number|name)': '?([\w-]+)", str(obj.get("spec", {})))
        if {int(b) if b.isdigit() else b for b in backends} & DASHBOARD_PORTS:
            problems.append(f"{where}: an Ingress routes to the dashboard")
    return problems


def validate(objects: list[dict]) -> list[str]:
    """Every problem of a set of manifests: CRD schema, Kubernetes schema of rendered objects, policy."""
    problems = []
    for obj in objects:
        where = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
        if obj.get("kind") in DASK_KINDS:
            for error in jsonschema.Draft7Validator(crd_schema(obj["kind"])).iter_errors(obj):
                problems.append(f"{where}: CRD schema: {'.'.join(map(str, error.absolute_path))}: {error.message}")
            if problems:
                continue
            checked = rendered(obj)
        else:
            checked = [obj]
        for item in checked:
            try:
                kubernetes_validate.validate(item, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{where}: rendered {item['kind']} {item['metadata']['name']}: "
                                f"{'.'.join(map(str, e.path))}: {e.message}")
        problems += policy_problems(obj)
    return problems


def by_kind(objects: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


# ---------------------------------------------------------------- the shipped manifests


def test_shipped_manifests_pass_schemas_and_policy():
    objects = shipped()
    assert {o["kind"] for o in objects} >= {"DaskCluster", "DaskWorkerGroup", "DaskAutoscaler"}
    assert validate(objects) == []
    cluster, gpu = by_kind(objects, "DaskCluster"), by_kind(objects, "DaskWorkerGroup")
    assert gpu["spec"]["cluster"] == by_kind(objects, "DaskAutoscaler")["spec"]["cluster"] == \
        cluster["metadata"]["name"]
    worker = gpu["spec"]["worker"]["spec"]["containers"][0]
    assert worker["args"][:3] == ["dask", "cuda", "worker"] and "GPU=1" in worker["args"]
    # distributed >= 2026.6 ships no dask-scheduler / dask-worker scripts (the operator's defaults)
    for _, pod in _pods(cluster) + _pods(gpu):
        assert pod["containers"][0]["args"][0] == "dask"


def test_rendered_pods_keep_the_gpu_on_gpu_workers_only():
    objects = shipped()
    deployments = [d for o in objects for d in rendered(o) if d["kind"] == "Deployment"]
    gpu_pods = {d["metadata"]["name"]: _gpu_keys(d["spec"]["template"]["spec"]["containers"][0]["resources"])
                for d in deployments}
    assert gpu_pods == {"pzscale-scheduler": set(), "pzscale-default-worker-0a1b2c": set(),
                        "pzscale-gpu-worker-0a1b2c": {"nvidia.com/gpu"}}
    env = {e["name"] for d in deployments if "worker" in d["metadata"]["name"]
           for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"DASK_WORKER_NAME", "DASK_SCHEDULER_ADDRESS"} <= env


# ---------------------------------------------------------------- mutations are rejected


def _mutated(change) -> list[dict]:
    objects = copy.deepcopy(shipped())
    change(objects)
    return objects


def _scheduler(objects):
    return by_kind(objects, "DaskCluster")["spec"]["scheduler"]


def _gpu_container(objects):
    return by_kind(objects, "DaskWorkerGroup")["spec"]["worker"]["spec"]["containers"][0]


def test_a_gpu_on_the_scheduler_is_rejected():
    def change(objects):
        _scheduler(objects)["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "1"

    (problem,) = validate(_mutated(change))
    assert problem == ("DaskCluster pzscale: scheduler container scheduler asks for a GPU (nvidia.com/gpu); "
                       "the scheduler does no GPU work")


def test_a_gpu_worker_without_a_gpu_limit_is_rejected():
    def change(objects):
        resources = _gpu_container(objects)["resources"]
        del resources["limits"]["nvidia.com/gpu"], resources["requests"]["nvidia.com/gpu"]

    (problem,) = validate(_mutated(change))
    assert problem == ("DaskWorkerGroup pzscale-gpu: worker container worker is a GPU worker without "
                       "nvidia.com/gpu in its resource limits")


@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort"])
def test_a_public_dashboard_service_is_rejected(service_type):
    def on_the_scheduler(objects):
        _scheduler(objects)["service"]["type"] = service_type

    (problem,) = validate(_mutated(on_the_scheduler))
    assert f"the scheduler service is {service_type}; the dashboard must stay inside the cluster" in problem

    def extra_service(objects):
        objects.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dashboard"}, "spec": {
            "type": service_type, "selector": {"dask.org/component": "scheduler"},
            "ports": [{"name": "http-dashboard", "port": 8787, "targetPort": 8787}]}})

    assert validate(_mutated(extra_service)) == [
        f"Service dashboard: a {service_type} service exposes the dashboard outside the cluster"]


def test_an_ingress_to_the_dashboard_is_rejected():
    def change(objects):
        objects.append({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "dash"},
                        "spec": {"rules": [{"http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
                            "service": {"name": "pzscale-scheduler", "port": {"number": 8787}}}}]}}]}})

    assert validate(_mutated(change)) == ["Ingress dash: an Ingress routes to the dashboard"]


def test_root_containers_and_missing_limits_are_rejected():
    def change(objects):
        pod = by_kind(objects, "DaskCluster")["spec"]["worker"]["spec"]
        del pod["securityContext"]["runAsNonRoot"]
        del pod["containers"][0]["resources"]["limits"]["memory"]

    assert sorted(validate(_mutated(change))) == [
        "DaskCluster pzscale: worker container worker has no cpu and memory limits",
        "DaskCluster pzscale: worker container worker may run as root (set securityContext.runAsNonRoot: true)"]


def test_schema_errors_are_reported_from_the_crd_and_the_pod_schema():
    def bad_replicas(objects):
        by_kind(objects, "DaskCluster")["spec"]["worker"]["replicas"] = "two"
        del by_kind(objects, "DaskCluster")["spec"]["scheduler"]["service"]

    problems = validate(_mutated(bad_replicas))
    assert any("CRD schema: spec.worker.replicas: 'two' is not of type 'integer'" in p for p in problems), problems
    assert any("CRD schema: spec.scheduler: 'service' is a required property" in p for p in problems), problems

    def bad_gpu_quantity(objects):
        _gpu_container(objects)["resources"]["limits"]["nvidia.com/gpu"] = 1  # the CRD wants "1"

    assert validate(_mutated(bad_gpu_quantity)) == [
        "DaskWorkerGroup pzscale-gpu: CRD schema: spec.worker.spec.containers.0.resources.limits.nvidia.com/gpu: "
        "1 is not of type 'string'"]

    def unknown_field(objects):  # the API server would prune it silently; the strict pod schema does not
        _gpu_container(objects)["gpus"] = "1"

    (problem,) = validate(_mutated(unknown_field))
    assert problem.startswith("DaskWorkerGroup pzscale-gpu: rendered Deployment pzscale-gpu-worker-0a1b2c: ")
    assert "'gpus' was unexpected" in problem


# ---------------------------------------------------------------- gateway and images


def test_gateway_values_keep_the_dashboard_internal_and_limit_every_pod():
    values = yaml.safe_load((DEPLOYMENTS / "gateway" / "values.yaml").read_text())
    assert values["traefik"]["service"]["type"] == "ClusterIP"
    backend = values["gateway"]["backend"]
    for role in ("scheduler", "worker"):
        assert backend[role]["cores"]["limit"] and backend[role]["memory"]["limit"], role
        assert backend[role]["extraPodConfig"]["securityContext"]["runAsNonRoot"] is True, role
    assert not _gpu_keys(backend["scheduler"].get("extraContainerConfig", {}).get("resources"))
    for name, code in values["gateway"]["extraConfig"].items():
        ast.parse(code, filename=f"gateway.extraConfig.{name}")
    code = "\n".join(values["gateway"]["extraConfig"].values())
    # a GPU cluster option puts the GPU in the worker limits and advertises GPU=1
    assert '"nvidia.com/gpu"' in code and "DASK_DISTRIBUTED__WORKER__RESOURCES__GPU" in code


def test_dockerfile_runs_as_a_non_root_user_with_both_variants():
    text = (DEPLOYMENTS / "docker" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0"), users
    assert re.search(r"^ARG VARIANT=cpu", text, flags=re.M)
    assert "cuda)" in text and "cpu)" in text
    extras = set(re.findall(r"\"\.\[([\w,]+)\]\"", text))
    pyproject = (DEPLOYMENTS.parent / "pyproject.toml").read_text()
    for extra in {e for group in extras for e in group.split(",")}:
        assert re.search(rf"^{extra} = \[", pyproject, flags=re.M), f"extra {extra} is not in pyproject.toml"
