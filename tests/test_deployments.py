"""The manifests in deployments/, validated offline.

- dask-kubernetes objects against the CRD ``openAPIV3Schema`` shipped in the dask-kubernetes
  package (jsonschema);
- the pods and services the operator renders from them (its own pure builders) and every
  plain Kubernetes object against the Kubernetes schemas (kubernetes-validate, strict);
- pzscale's policy: no GPU on the scheduler, GPU workers have ``nvidia.com/gpu`` in limits,
  the dashboard never behind a LoadBalancer/NodePort service or an Ingress, every container
  non-root with CPU and memory limits.
Mutated copies of the shipped manifests must be rejected with a message naming the problem.
The kustomize overlay, the dask-gateway values, the Dockerfile and the image's dependency locks
are checked the same way (offline; ``kubectl kustomize`` only where kubectl is installed).
"""

from __future__ import annotations

import ast
import copy
import importlib.resources
import json
import re
import shutil
import subprocess
import sys
import tomllib
import types
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def kustomize(directory: Path) -> list[dict]:
    """The objects ``kubectl kustomize directory`` builds, for the features deployments/ uses:
    resources (files or kustomization directories) and patches (JSON 6902 ``add`` operations, or a
    strategic-merge ``$patch: delete`` of a whole object)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects = []
    for resource in kustomization["resources"]:
        path = directory / resource
        objects += kustomize(path) if path.is_dir() else load(path)
    for entry in kustomization.get("patches", []):
        target, patch = entry["target"], yaml.safe_load(entry["patch"])
        (obj,) = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        if isinstance(patch, dict):
            assert patch.pop("$patch") == "delete" and patch["kind"] == obj["kind"], patch
            objects.remove(obj)
            continue
        for op in patch:
            assert op["op"] == "add", op
            *parents, last = op["path"].strip("/").split("/")
            node = obj
            for key in parents:
                node = node[int(key)] if isinstance(node, list) else node[key]
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                node[last] = copy.deepcopy(op["value"])
    return objects


def shipped() -> list[dict]:
    """What ``kubectl apply -k deployments/kubernetes/`` applies."""
    return kustomize(DEPLOYMENTS / "kubernetes")


def rendered(obj: dict) -> list[dict]:
    """The Deployments and Service the operator creates for a DaskCluster or DaskWorkerGroup."""
    from dask_kubernetes.operator.controller.controller import (
        build_scheduler_deployment_spec,
        build_scheduler_service_spec,
        build_worker_deployment_spec,
    )

    name, spec = obj["metadata"]["name"], obj.get("spec", {})
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
    spec = obj.get("spec", {})
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
    assert {o["kind"] for o in objects} >= {"DaskCluster", "DaskWorkerGroup", "DaskAutoscaler", "ServiceAccount",
                                            "PodDisruptionBudget", "NetworkPolicy"}
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


def test_the_kustomization_applies_every_manifest_of_the_directory():
    listed = yaml.safe_load((DEPLOYMENTS / "kubernetes" / "kustomization.yaml").read_text())["resources"]
    files = {p.name for p in (DEPLOYMENTS / "kubernetes").glob("*.y*ml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(files)


def _volumes(deployment: dict) -> tuple[dict, dict]:
    """({name: volume}, {name: mount of the first container}) of a rendered Deployment."""
    pod = deployment["spec"]["template"]["spec"]
    return ({v["name"]: v for v in pod.get("volumes", [])},
            {m["name"]: m for m in pod["containers"][0].get("volumeMounts", [])})


def _claims(deployment: dict) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for v in _volumes(deployment)[0].values()
            if "persistentVolumeClaim" in v}


def _mounts_models_read_only(deployment: dict, claim: str = "pzscale-models") -> bool:
    volumes, mounts = _volumes(deployment)
    (name,) = [n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
    return (volumes[name]["persistentVolumeClaim"].get("readOnly") is True
            and mounts[name]["mountPath"] == "/models" and mounts[name].get("readOnly") is True)


def test_cpu_workers_start_without_the_models_claim_and_gpu_workers_mount_it():
    deployments = {d["metadata"]["name"]: d for o in shipped() for d in rendered(o) if d["kind"] == "Deployment"}
    # a missing claim keeps a pod Pending: the scheduler and the default CPU group need none
    assert _claims(deployments["pzscale-scheduler"]) == _claims(deployments["pzscale-default-worker-0a1b2c"]) == set()
    # the GPU group runs embed/classify: the models, read-only, at the path given to --model
    assert _mounts_models_read_only(deployments["pzscale-gpu-worker-0a1b2c"])


def test_the_cpu_only_overlay_drops_the_gpu_group_and_mounts_the_models_on_cpu_workers():
    objects = kustomize(DEPLOYMENTS / "overlays" / "cpu-only")
    assert validate(objects) == []
    assert "DaskWorkerGroup" not in {o["kind"] for o in objects}
    assert {o["kind"] for o in shipped()} - {o["kind"] for o in objects} == {"DaskWorkerGroup"}
    (worker,) = [d for d in rendered(by_kind(objects, "DaskCluster")) if d["metadata"]["name"].endswith("-0a1b2c")]
    assert _mounts_models_read_only(worker)
    assert _claims(worker) == {"pzscale-models"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) is not installed")
@pytest.mark.parametrize("directory", ["kubernetes", "overlays/cpu-only"])
def test_kubectl_kustomize_builds_what_the_tests_validate(directory):
    try:
        out = subprocess.run(["kubectl", "kustomize", str(DEPLOYMENTS / directory)], capture_output=True,
                             text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"kubectl kustomize does not run here: {e}")

    def key(o):
        return json.dumps(o, sort_keys=True)

    assert sorted(map(key, yaml.safe_load_all(out))) == sorted(map(key, kustomize(DEPLOYMENTS / directory)))


def test_the_disruption_budget_keeps_the_rendered_scheduler_pod_only():
    objects = shipped()
    budget = by_kind(objects, "PodDisruptionBudget")
    assert budget["spec"].get("minAvailable") == 1 or budget["spec"].get("maxUnavailable") == 0, budget["spec"]
    selector = budget["spec"]["selector"]
    assert set(selector) == {"matchLabels"}, selector
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for o in objects for d in rendered(o) if d["kind"] == "Deployment"}
    selected = {name for name, labels in pods.items() if selector["matchLabels"].items() <= labels.items()}
    assert selected == {"pzscale-scheduler"}, pods


def test_scheduler_and_workers_run_as_the_shipped_service_account():
    objects = shipped()
    account = by_kind(objects, "ServiceAccount")
    assert not {"secrets", "imagePullSecrets"} & set(account), "keys stay out of the manifests"
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"]
            for o in objects for d in rendered(o) if d["kind"] == "Deployment"}
    assert len(pods) == 3
    assert {pod.get("serviceAccountName") for pod in pods.values()} == {account["metadata"]["name"]}
    # the keys route stays open: workers read the optional Secret when there is no workload identity
    for name, pod in pods.items():
        if "-worker-" in name:
            assert {"secretRef": {"name": "pzscale-s3", "optional": True}} in pod["containers"][0]["envFrom"]


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


class _GatewayConfig(dict):
    """The ``c`` of dask-gateway's config file: ``c.Section.option = value``."""

    def __getattr__(self, name):
        return self.setdefault(name, _GatewayConfig())

    def __setattr__(self, name, value):
        self[name] = value


def _gateway_config(monkeypatch) -> _GatewayConfig:
    """Runs the values' extraConfig code blocks in order, with dask_gateway_server's options stubbed."""
    options = types.ModuleType("dask_gateway_server.options")
    options.Bool = options.Float = options.Integer = lambda *args, **kwargs: (args, kwargs)
    options.Options = lambda *fields, handler: types.SimpleNamespace(fields=fields, handler=handler)
    monkeypatch.setitem(sys.modules, "dask_gateway_server", types.ModuleType("dask_gateway_server"))
    monkeypatch.setitem(sys.modules, "dask_gateway_server.options", options)
    config = _GatewayConfig()
    extra = yaml.safe_load((DEPLOYMENTS / "gateway" / "values.yaml").read_text())["gateway"]["extraConfig"]
    for name in sorted(extra):
        exec(compile(extra[name], f"gateway.extraConfig.{name}", "exec"), {"c": config})
    return config


def _merge(a, b):
    """dask-gateway's merge_json_objects: dicts merged, b's values win, lists appended."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {**a, **{k: _merge(a[k], v) if k in a else v for k, v in b.items()}}
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    return b


def _gateway_worker_pod(extra_pod: dict, extra_container: dict) -> dict:
    """The worker pod dask-gateway's controller makes (its make_pod, reduced to what it always sets)."""
    container = {"name": "dask-worker", "image": "ghcr.io/pzscale/pzscale:0.1.0-cpu", "args": ["dask", "worker"],
                 "resources": {"limits": {"cpu": "1.0", "memory": "4294967296"}},
                 "volumeMounts": [{"name": "dask-credentials", "mountPath": "/etc/dask-credentials/",
                                   "readOnly": True}]}
    spec = {"containers": [_merge(container, extra_container)],
            "volumes": [{"name": "dask-credentials", "secret": {"secretName": "dask-credentials-x"}}],
            "restartPolicy": "OnFailure", "automountServiceAccountToken": False}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dask-worker-x"}, "spec": _merge(spec, extra_pod)}


def test_gateway_workers_mount_the_models_read_only_cpu_and_gpu(monkeypatch):
    worker = yaml.safe_load((DEPLOYMENTS / "gateway" / "values.yaml").read_text())["gateway"]["backend"]["worker"]
    handler = _gateway_config(monkeypatch)["Backend"]["cluster_options"].handler
    chosen = types.SimpleNamespace(worker_cores=2, worker_memory=8.0, gpu=False)
    cpu = handler(chosen, "user")
    gpu = handler(types.SimpleNamespace(**{**vars(chosen), "gpu": True}), "user")
    # CPU clusters keep the chart's extra configs; GPU clusters replace them with their own
    assert not {"worker_extra_pod_config", "worker_extra_container_config"} & set(cpu)
    pods = {"cpu": _gateway_worker_pod(worker["extraPodConfig"], worker["extraContainerConfig"]),
            "gpu": _gateway_worker_pod(gpu["worker_extra_pod_config"], gpu["worker_extra_container_config"])}
    # the claim of the operator's workers
    (claim,) = {c for o in shipped() for d in rendered(o) if d["kind"] == "Deployment" for c in _claims(d)}
    for variant, pod in pods.items():
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        assert _mounts_models_read_only({"spec": {"template": pod}}, claim=claim), variant
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, variant
    assert pods["gpu"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


# ---------------------------------------------------------------- reproducible images

DOCKER = DEPLOYMENTS / "docker"
LOCK_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)(?: \\)?$")


def _dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def test_base_image_is_pinned_by_digest_in_every_stage():
    text = _dockerfile()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    froms = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert len(froms) == 2, froms
    for image in froms:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", resolved), resolved
    assert "docker buildx imagetools inspect python:3.11-slim-bookworm" in text  # how to refresh it


def test_the_image_build_checks_the_dashboards_bokeh():
    build = re.search(r"^RUN case .*?(?=^\S)", _dockerfile(), flags=re.M | re.S).group(0)
    assert "dask --version" in build
    assert re.search(r'python -c "import bokeh\b', build), build
    assert "distributed.dashboard.core" in build  # raises ImportError unless bokeh satisfies distributed
    assert "pip check" in build


def _extras(requirement_text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"--extra (\w+)", requirement_text))


def _lock_commands() -> dict[str, str]:
    """{lock file name: its uv pip compile arguments} from lock.sh."""
    text = (DOCKER / "lock.sh").read_text().replace("\\\n", " ")
    return {m.group(1): line for line in text.splitlines() if line.lstrip().startswith(("compile ", "echo "))
            for m in [re.search(r"-o deployments/docker/(requirements-\w+\.lock)", line)] if m}


def _required(extras: tuple[str, ...]) -> list[Requirement]:
    """pyproject's requirements for the base dependencies plus these extras (pzscale[...] expanded)."""
    project = tomllib.loads((DEPLOYMENTS.parent / "pyproject.toml").read_text())["project"]
    env = {"python_version": "3.11", "python_full_version": "3.11.16", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    todo, seen, out = list(project["dependencies"]), set(extras), []
    for extra in extras:
        todo += project["optional-dependencies"][extra]
    while todo:
        req = Requirement(todo.pop())
        if req.marker and not req.marker.evaluate(env):
            continue
        if canonicalize_name(req.name) == canonicalize_name(project["name"]):
            for extra in req.extras - seen:
                seen.add(extra)
                todo += project["optional-dependencies"][extra]
            continue
        out.append(req)
    return out


def _lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, hashes)} of a lock; every requirement line must be an exact pin."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in (DOCKER / name).read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith((" ", "\t")):
            hashed = re.match(r"\s+--hash=(sha256:[0-9a-f]{64})", line)
            assert hashed and current, f"{name}: unexpected line {line!r}"
            pins[current][1].append(hashed.group(1))
            continue
        match = LOCK_LINE.match(line)
        assert match, f"{name}: {line!r} is not an exact pin (name==version)"
        current = canonicalize_name(match["name"])
        assert current not in pins, f"{name}: {current} pinned twice"
        pins[current] = (match["version"], [])
    return pins


@pytest.mark.parametrize("lock", ["requirements-cpu.lock", "requirements-cuda.lock"])
def test_the_locks_pin_exact_versions_that_satisfy_pyproject(lock):
    pins = _lock(lock)
    assert {"dask", "distributed", "bokeh", "torch", "torchvision", "s3fs", "dask-kubernetes"} <= set(pins)
    extras = _extras(_lock_commands()[lock])
    stale = [f"{req} (locked: {pins.get(canonicalize_name(req.name), ('missing',))[0]})" for req in _required(extras)
             if canonicalize_name(req.name) not in pins
             or not req.specifier.contains(pins[canonicalize_name(req.name)][0], prereleases=True)]
    assert not stale, f"{lock} is stale; regenerate it with `sh deployments/docker/lock.sh`: {stale}"
    for name in ("dask", "distributed", "torch"):  # spelled out: the bounds the cluster code relies on
        (req,) = [r for r in _required(extras) if canonicalize_name(r.name) == name]
        assert req.specifier and req.specifier.contains(pins[name][0]), (name, str(req.specifier), pins[name][0])


def test_the_dockerfile_installs_each_variant_from_its_lock():
    text = _dockerfile()
    commands = _lock_commands()
    assert set(commands) == {"requirements-cpu.lock", "requirements-cuda.lock"}
    copied = " ".join(re.findall(r"^COPY (?!--from)(.*)$", text, flags=re.M))
    assert all(f"deployments/docker/{lock}" in copied for lock in commands), copied
    cpu = re.search(r"^\s+cpu\) (.*?);;", text, flags=re.M | re.S).group(1)
    cuda = re.search(r"^\s+cuda\) (.*?);;", text, flags=re.M | re.S).group(1)
    # cpu: the lock as constraints on the extras it was compiled for
    assert "-c requirements-cpu.lock" in cpu
    (extras,) = re.findall(r'"\.\[([\w,]+)\]"', cpu)
    assert tuple(extras.split(",")) == _extras(commands["requirements-cpu.lock"])
    # cuda: only what the hash-checked lock names, then pzscale itself without dependencies
    assert "--require-hashes --no-deps -r requirements-cuda.lock" in cuda and "--no-deps" in cuda.split("&&")[-1]
    assert all(hashes for _, hashes in _lock("requirements-cuda.lock").values())
    assert "dask-cuda" in _lock("requirements-cuda.lock")


def test_the_build_context_holds_what_the_dockerfile_copies():
    patterns = [line for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if line and not line.startswith("#")]
    assert patterns[0] == "*"  # an allow-list
    allowed = [p[1:] for p in patterns if p.startswith("!")]
    for line in re.findall(r"^COPY (?!--from)(.*)$", _dockerfile(), flags=re.M):
        for source in line.split()[:-1]:
            assert any(Path(source).match(p) or source == p for p in allowed), f"{source} is not in the build context"
