"""ftlaunch k8s and cluster/: manifests checked against the KubeRay CRDs and Kubernetes rules.

The CRD schemas (../shared/kuberay, KubeRay v1.7.0) are Kubernetes-flavoured OpenAPI. They are
validated here the way the API server with strict field validation would: unknown fields are
errors, list-map keys and set items must be unique, int32/int64 must fit, and quantities must
match their pattern. CEL rules are not evaluated, so a manifest that sets a field carrying one
fails instead of passing untested.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.cli.cluster_parsers import add_k8s_arguments
from launcher.cli.commands import cmd_k8s
from launcher.jobs import k8s
from launcher.errors import UserInputError
from launcher.recipe import load_recipe, validate_recipe

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = ROOT.parent / "shared" / "kuberay"
CLUSTER = ROOT / "cluster"
VM_CONFIG = "ray-cluster-vm.yaml"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
PLANTED = "hf_PLANTEDsecretVALUE0123456789"
EXAMPLE_RECIPE = "recipes/llama3/lora_8b_zero2.yaml"
EXAMPLE_ARGS = [
    EXAMPLE_RECIPE,
    "--image", "registry.example.com/ml/ftlaunch:0.1.0",
    "--pvc", "ftlaunch-shared",
    "--secret",
    "--toleration", "nvidia.com/gpu:NoSchedule",
]  # fmt: skip

needs_crds = pytest.mark.skipif(
    not all((CRD_DIR / f).is_file() for f in CRD_FILES.values()),
    reason=f"KubeRay CRD schemas not found in {CRD_DIR} (../shared/kuberay from the repo root)",
)

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


# --- schema validation ------------------------------------------------------------------


def k8s_schema(node: dict[str, Any]) -> dict[str, Any]:
    """Kubernetes OpenAPI -> JSON Schema: objects with listed properties reject unknown fields
    (as ``kubectl apply --validate=strict`` does), ``nullable`` admits null and
    int-or-string fields admit exactly integers and strings."""
    node = dict(node)
    if "properties" in node:
        node["properties"] = {k: k8s_schema(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = k8s_schema(node["additionalProperties"])
    if "items" in node:
        node["items"] = k8s_schema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [k8s_schema(s) for s in node[key]]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.pop("nullable", False):
        return {"anyOf": [{"type": "null"}, node]}
    return node


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Iterator:
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    elif list_type == "map":
        names = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        keys = [
            json.dumps([item.get(n, props.get(n, {}).get("default")) for n in names])
            for item in instance
            if isinstance(item, dict)
        ]
    else:
        return
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        yield jsonschema.ValidationError(f"duplicate {list_type} entries: {duplicates}")


def _cel(validator: Any, rules: list[dict[str, str]], instance: Any, schema: Any) -> Iterator:
    yield jsonschema.ValidationError(
        f"field guarded by CEL rules this test cannot evaluate: {[r['rule'] for r in rules]}"
    )


def _format_checker() -> Any:
    checker = jsonschema.FormatChecker(formats=())
    for name, bits in (("int32", 31), ("int64", 63)):
        checker.checks(name)(
            lambda v, bits=bits: not isinstance(v, int) or -(2**bits) <= v < 2**bits
        )
    return checker


@cache
def crd_validator(kind: str) -> Any:
    text = (CRD_DIR / CRD_FILES[kind]).read_text()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    cls = jsonschema.validators.extend(
        jsonschema.Draft7Validator,
        {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel},
    )
    return cls(k8s_schema(v1["schema"]["openAPIV3Schema"]), format_checker=_format_checker())


def schema_errors(doc: dict[str, Any]) -> list[str]:
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


# --- Kubernetes rules the CRD schema leaves out -------------------------------------------


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    pods = [g["template"]["spec"] for g in groups]
    if "submitterPodTemplate" in spec:
        pods.append(spec["submitterPodTemplate"]["spec"])
    return pods


def metadata_problems(meta: dict[str, Any], max_name: int = 63) -> list[str]:
    problems = []
    name = meta.get("name", "")
    if len(name) > max_name or not DNS1123_LABEL.match(name):
        problems.append(f"metadata.name {name!r} is not a DNS-1123 label of <= {max_name}")
    namespace = meta.get("namespace")
    if namespace is not None and not DNS1123_LABEL.match(namespace):
        problems.append(f"metadata.namespace {namespace!r} is not a DNS-1123 label")
    for key, value in meta.get("labels", {}).items():
        prefix, _, label = key.rpartition("/")
        if (prefix and not DNS1123_SUBDOMAIN.match(prefix)) or not LABEL_NAME.match(label):
            problems.append(f"label key {key!r} is invalid")
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            problems.append(f"label {key}={value!r} has an invalid value")
    return problems


def container_problems(container: dict[str, Any], volumes: set[str]) -> list[str]:
    where = f"container {container.get('name')!r}"
    problems = []
    if not container.get("name") or not DNS1123_LABEL.match(container["name"]):
        problems.append(f"{where}: needs a DNS-1123 name")
    if not container.get("image"):
        problems.append(f"{where}: has no image")
    for mount in container.get("volumeMounts", []):
        if mount["name"] not in volumes:
            problems.append(f"{where}: volumeMount {mount['name']!r} has no volume")
    for env in container.get("env", []):
        if not env.get("name") or ("value" in env) == ("valueFrom" in env):
            problems.append(f"{where}: env {env} needs a name and one of value / valueFrom")
    resources = container.get("resources", {})
    for resource, amount in resources.get("limits", {}).items():
        if "/" in resource and resources.get("requests", {}).get(resource, amount) != amount:
            problems.append(f"{where}: extended resource {resource} requests != limits")
    return problems


def k8s_problems(doc: dict[str, Any]) -> list[str]:
    max_name = k8s.MAX_JOB_NAME if doc["kind"] == "RayJob" else 63
    problems = metadata_problems(doc["metadata"], max_name)
    for pod in pod_specs(doc):
        volumes = [v["name"] for v in pod.get("volumes", [])]
        if len(volumes) != len(set(volumes)):
            problems.append(f"duplicate volume names {volumes}")
        for container in pod["containers"]:
            problems += container_problems(container, set(volumes))
    return problems


def configmap_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    if (doc.get("apiVersion"), doc.get("kind")) != ("v1", "ConfigMap"):
        problems.append("not a v1 ConfigMap")
    if set(doc) - {"apiVersion", "kind", "metadata", "data", "binaryData", "immutable"}:
        problems.append(f"unknown top-level fields {set(doc)}")
    name = doc["metadata"].get("name", "")
    if len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        problems.append(f"name {name!r} is not a DNS-1123 subdomain")
    problems += metadata_problems({**doc["metadata"], "name": "x"})
    data = doc.get("data", {})
    for key, value in data.items():
        if not CONFIGMAP_KEY.match(key) or not isinstance(value, str):
            problems.append(f"data[{key!r}] must be a string under a valid key")
    if sum(len(v.encode()) for v in data.values() if isinstance(v, str)) > 1 << 20:
        problems.append("data exceeds 1 MiB")
    return problems


# --- helpers ------------------------------------------------------------------------------


def write_recipe(
    tmp_path: Path,
    stem: str = "job",
    *,
    num_workers: int = 4,
    use_gpu: bool = True,
    cpus_per_worker: float = 1.0,
    env: dict[str, str] | None = None,
    output_dir: str | None = None,
) -> Path:
    model = (
        {"name_or_path": "meta-llama/Llama-3.1-8B"}
        if use_gpu
        else {"architecture": {"model_type": "llama", "hidden_size": 64}, "tokenizer": "tok"}
    )
    recipe = {
        "output_dir": output_dir or f"runs/{stem}",
        "method": "lora",
        "model": {**model, "dtype": "bf16"},
        "data": {"train": "data/train.jsonl", "format": "instruction"},
        "deepspeed": {"config": "zero2"},
        "resources": {
            "num_workers": num_workers,
            "use_gpu": use_gpu,
            "cpus_per_worker": cpus_per_worker,
            "env": env or {},
        },
    }
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ftlaunch k8s")
    add_k8s_arguments(parser)
    return parser.parse_args(argv)


def render_cli(argv: list[str], out: Path) -> tuple[list[dict[str, Any]], str]:
    """Run ``ftlaunch k8s ARGV --out OUT`` in-process; return the parsed documents and text."""
    assert cmd_k8s(parse_args([*argv, "--out", str(out)])) == 0
    text = out.read_text()
    return list(yaml.safe_load_all(text)), text


def split(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ConfigMap and the RayJob of a closed render, its NetworkPolicy checked."""
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob", "NetworkPolicy"]
    assert networkpolicy_problems(docs[2], docs[1]) == []
    return docs[0], docs[1]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return set(selector) <= {"matchLabels"} and selector.get("matchLabels", {}).items() <= (
        labels.items()
    )


def networkpolicy_problems(policy: dict[str, Any], rayjob: dict[str, Any]) -> list[str]:
    """A networking.k8s.io/v1 NetworkPolicy that selects every pod of the RayJob and admits
    ingress only from the job's own pods, its submitter Job and the KubeRay operator."""
    problems = metadata_problems(policy["metadata"])
    if (policy["apiVersion"], policy["kind"]) != ("networking.k8s.io/v1", "NetworkPolicy"):
        problems.append("not a networking.k8s.io/v1 NetworkPolicy")
    if policy["metadata"]["namespace"] != rayjob["metadata"]["namespace"]:
        problems.append("not in the RayJob's namespace")
    spec = policy["spec"]
    if set(spec) - {"podSelector", "policyTypes", "ingress", "egress"}:
        problems.append(f"unknown spec fields {set(spec)}")
    if spec.get("policyTypes") != ["Ingress"]:
        problems.append("must restrict Ingress")
    own_labels = [pod_template["metadata"]["labels"] for pod_template in pod_templates(rayjob)]
    if not all(selects(spec["podSelector"], labels) for labels in own_labels):
        problems.append("podSelector misses some of the RayJob's pods")
    if not spec["podSelector"].get("matchLabels"):
        problems.append("podSelector selects every pod in the namespace")
    name = rayjob["metadata"]["name"]
    submitter = {k8s.JOB_NAME_LABEL: name}
    for rule in spec.get("ingress", []):
        if set(rule) - {"from", "ports"} or not rule.get("from"):
            problems.append(f"ingress rule {rule} admits everyone")
            continue
        for peer in rule["from"]:
            if "ipBlock" in peer:
                problems.append(f"ingress from an ipBlock {peer}")
            pods = peer.get("podSelector", {})
            if not pods.get("matchLabels"):
                problems.append(f"ingress peer {peer} selects every pod")
            elif "namespaceSelector" in peer:
                if pods["matchLabels"] != k8s.OPERATOR_LABELS or rule.get("ports") != [
                    {"protocol": "TCP", "port": k8s.DASHBOARD_PORT}
                ]:
                    problems.append(f"peer {peer} from other namespaces beyond the dashboard")
            elif not (
                all(selects(pods, labels) for labels in own_labels)
                or pods["matchLabels"] == submitter
            ):
                problems.append(f"ingress peer {peer} is not the job's own pods or submitter")
    return problems


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = doc["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]


def groups(rayjob: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    (worker,) = cluster["workerGroupSpecs"]
    return cluster["headGroupSpec"], worker


def container(group: dict[str, Any]) -> dict[str, Any]:
    (only,) = group["template"]["spec"]["containers"]
    return only


def cluster_docs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}#{i}", doc)
        for path in sorted(CLUSTER.glob("*.yaml"))
        if path.name != VM_CONFIG
        for i, doc in enumerate(yaml.safe_load_all(path.read_text()))
        if doc is not None
    ]


# --- the validator itself -----------------------------------------------------------------


@pytest.fixture
def good_rayjob(tmp_path: Path) -> dict[str, Any]:
    recipe = write_recipe(tmp_path, num_workers=16)
    docs, _ = render_cli([str(recipe), "--pvc", "shared", "--secret"], tmp_path / "out.yaml")
    return split(docs)[1]


def _set_worker(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0][field] = value

    return mutate


def _worker_container(doc: dict[str, Any]) -> dict[str, Any]:
    return container(groups(doc)[1])


BAD_MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "replicas-not-int": (_set_worker("replicas", "two"), "is not of type 'integer'"),
    "unknown-group-field": (_set_worker("replica", 2), "'replica' was unexpected"),
    "unknown-spec-field": (
        lambda d: d["spec"].update(entryPoint="x"),
        "'entryPoint' was unexpected",
    ),
    "missing-group-name": (
        lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
        "'groupName' is a required property",
    ),
    "bad-quantity": (
        lambda d: _worker_container(d)["resources"]["limits"].update(memory="lots"),
        "does not match",
    ),
    "quantity-list": (
        lambda d: _worker_container(d)["resources"]["limits"].update(cpu=[8]),
        "is not valid under any of the given schemas",
    ),
    "duplicate-env": (
        lambda d: _worker_container(d)["env"].append({"name": "HF_TOKEN", "value": "x"}),
        "duplicate map entries",
    ),
    "int32-overflow": (
        lambda d: d["spec"].update(ttlSecondsAfterFinished=2**40),
        "is not a 'int32'",
    ),
    "cel-guarded-field": (
        lambda d: d["spec"].update(managedBy="ray.io/kuberay-operator"),
        "CEL rules",
    ),
}


@needs_crds
def test_crd_validator_accepts_a_rendered_rayjob(good_rayjob: dict[str, Any]) -> None:
    assert schema_errors(good_rayjob) == []


@needs_crds
@pytest.mark.parametrize("case", list(BAD_MUTATIONS))
def test_crd_validator_rejects_a_bad_rayjob(good_rayjob: dict[str, Any], case: str) -> None:
    mutate, expected = BAD_MUTATIONS[case]
    bad = copy.deepcopy(good_rayjob)
    mutate(bad)
    errors = schema_errors(bad)
    assert any(expected in e for e in errors), errors


@needs_crds
def test_int_or_string_fields_take_exactly_ints_and_strings() -> None:
    schema = crd_validator("RayJob").schema
    spec = schema["properties"]["spec"]["properties"]["rayClusterSpec"]["properties"]
    pod = spec["headGroupSpec"]["properties"]["template"]["properties"]["spec"]
    size_limit = pod["properties"]["volumes"]["items"]["properties"]["emptyDir"]["properties"][
        "sizeLimit"
    ]
    check = jsonschema.Draft7Validator(size_limit)
    assert check.is_valid(8) and check.is_valid("64Gi")
    assert not check.is_valid([8]) and not check.is_valid("64 gigs")


def test_k8s_problems_catch_a_dangling_mount_and_a_bare_env(good_rayjob: dict[str, Any]) -> None:
    assert k8s_problems(good_rayjob) == []
    bad = copy.deepcopy(good_rayjob)
    worker = _worker_container(bad)
    worker["volumeMounts"].append({"name": "nowhere", "mountPath": "/x"})
    worker["env"].append({"name": "EMPTY"})
    bad["metadata"]["name"] = "Bad_Name"
    problems = " | ".join(k8s_problems(bad))
    assert "'nowhere' has no volume" in problems
    assert "EMPTY" in problems
    assert "'Bad_Name'" in problems


# --- rendered manifests -------------------------------------------------------------------

COMBINATIONS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "one-gpu-pod": ({"num_workers": 4, "output_dir": "/nfs/runs/one"}, []),
    "multi-node-pvc-secrets": (
        {"num_workers": 16, "env": {"NCCL_DEBUG": "WARN"}},
        [
            "--pvc", "ftlaunch-shared", "--secret", "--secret", "WANDB_API_KEY=wandb/api-key",
            "--nccl-env", "NCCL_SOCKET_IFNAME=eth0", "--node-selector", "gpu=h100",
            "--toleration", "nvidia.com/gpu:NoSchedule",
        ],
    ),
    "kueue": (
        {"num_workers": 8, "output_dir": "/nfs/runs/kueue"},
        ["--queue", "team-a", "--active-deadline", "86400", "--namespace", "ml"],
    ),
    "cpu": (
        {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 2, "env": {"A": "1"},
         "output_dir": "/nfs/runs/cpu"},
        [],
    ),
    "cpu-multi-node": (
        {"num_workers": 4, "use_gpu": False},
        ["--gpus-per-node", "2", "--pvc", "shared", "--pvc-mount", "/data"],
    ),
    "custom-sizes": (
        {"num_workers": 12},
        [
            "--gpus-per-node", "4", "--pvc", "shared", "--worker-cpu", "48",
            "--worker-memory", "900Gi", "--head-cpu", "500m", "--head-memory", "8Gi",
            "--shm-size", "128Gi", "--ttl", "0", "--backoff-limit", "5", "--name", "custom",
        ],
    ),
}  # fmt: skip


@pytest.fixture(params=list(COMBINATIONS))
def rendered(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    recipe_kwargs, argv = COMBINATIONS[request.param]
    recipe_path = write_recipe(tmp_path, request.param, **recipe_kwargs)
    docs, text = render_cli([str(recipe_path), *argv], tmp_path / "out.yaml")
    configmap, rayjob = split(docs)
    return {
        "recipe": load_recipe(recipe_path),
        "argv": argv,
        "configmap": configmap,
        "rayjob": rayjob,
        "text": text,
    }


@needs_crds
def test_rendered_rayjob_matches_the_crd(rendered: dict[str, Any]) -> None:
    assert schema_errors(rendered["rayjob"]) == []


def test_rendered_manifests_are_valid_kubernetes(rendered: dict[str, Any]) -> None:
    assert k8s_problems(rendered["rayjob"]) == []
    assert configmap_problems(rendered["configmap"]) == []


def test_configmap_carries_the_recipe_the_pods_run(rendered: dict[str, Any]) -> None:
    configmap, rayjob = rendered["configmap"], rendered["rayjob"]
    assert configmap["metadata"]["namespace"] == rayjob["metadata"]["namespace"]
    text = configmap["data"][k8s.RECIPE_FILE]
    assert validate_recipe(yaml.safe_load(text)) == rendered["recipe"]
    assert rayjob["spec"]["entrypoint"].startswith(f"ftlaunch {k8s.RECIPE_DIR}/{k8s.RECIPE_FILE}")
    for pod in pod_specs(rayjob):
        (volume,) = [v for v in pod["volumes"] if "configMap" in v]
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]
        mounts = pod["containers"][0]["volumeMounts"]
        assert {"name": volume["name"], "mountPath": k8s.RECIPE_DIR, "readOnly": True} in mounts


def test_rayjob_spec(rendered: dict[str, Any]) -> None:
    recipe, rayjob = rendered["recipe"], rendered["rayjob"]
    spec = rayjob["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["rayVersion"] == version("ray")
    head, worker = groups(rayjob)
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"]
    limits = container(worker)["resources"]["limits"]
    if recipe.resources.use_gpu:
        assert worker["groupName"] == "gpu-workers"
        assert worker["replicas"] * limits[k8s.GPU_RESOURCE] >= recipe.resources.num_workers
    else:
        assert k8s.GPU_RESOURCE not in rendered["text"]
        slots = float(limits["cpu"]) // recipe.resources.cpus_per_worker
        assert worker["replicas"] * slots >= recipe.resources.num_workers
    for pod in pod_specs(rayjob):
        (shm,) = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert {"name": shm["name"], "mountPath": "/dev/shm"} in pod["containers"][0][
            "volumeMounts"
        ]


def test_env_reaches_every_container_and_secrets_are_references(
    rendered: dict[str, Any],
) -> None:
    recipe, rayjob, argv = rendered["recipe"], rendered["rayjob"], rendered["argv"]
    secret_envs = {
        (
            k8s.DEFAULT_SECRET
            if i + 1 == len(argv) or argv[i + 1].startswith("--")
            else argv[i + 1]
        ).split("=")[0]
        for i, a in enumerate(argv)
        if a == "--secret"
    }
    for pod in pod_specs(rayjob):
        env = {e["name"]: e for e in pod["containers"][0].get("env", [])}
        for name, value in recipe.resources.env.items():
            assert env[name] == {"name": name, "value": value}
        for name in secret_envs:
            assert set(env[name]) == {"name", "valueFrom"}
            assert set(env[name]["valueFrom"]["secretKeyRef"]) == {"name", "key"}


def test_pvc_puts_the_run_directory_on_shared_storage(rendered: dict[str, Any]) -> None:
    rayjob, argv = rendered["rayjob"], rendered["argv"]
    name = rayjob["metadata"]["name"]
    if "--pvc" not in argv:
        assert rayjob["spec"]["entrypoint"] == f"ftlaunch {k8s.RECIPE_DIR}/{k8s.RECIPE_FILE}"
        assert "persistentVolumeClaim" not in rendered["text"]
        return
    claim = argv[argv.index("--pvc") + 1]
    mount = argv[argv.index("--pvc-mount") + 1] if "--pvc-mount" in argv else "/mnt/shared"
    assert rayjob["spec"]["entrypoint"].endswith(f"--output-dir {mount}/{name}")
    for pod in pod_specs(rayjob):
        (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"] == {"claimName": claim}
        assert {"name": volume["name"], "mountPath": mount} in pod["containers"][0]["volumeMounts"]


@pytest.mark.parametrize(
    ("output_dir", "expected"),
    [
        ("/mnt/shared/runs/llama", "/mnt/shared/runs/llama"),
        ("runs/llama", "/mnt/shared/llama"),
        ("/elsewhere/llama", "/mnt/shared/llama"),
        ("/mnt/shared/../llama", "/mnt/shared/llama"),
    ],
)
def test_run_directory_with_a_pvc(tmp_path: Path, output_dir: str, expected: str) -> None:
    recipe = load_recipe(write_recipe(tmp_path, output_dir=output_dir))
    rayjob = k8s.render_rayjob(recipe, "job.yaml", k8s.K8sOptions(pvc="shared"))
    assert rayjob["spec"]["entrypoint"].split() == [
        "ftlaunch", f"{k8s.RECIPE_DIR}/{k8s.RECIPE_FILE}", "--output-dir", expected
    ]  # fmt: skip


@pytest.mark.parametrize("pvc", [None, "shared"])
def test_object_store_output_dir_stands_in_the_pods(tmp_path: Path, pvc: str | None) -> None:
    """s3:// is reached from every pod: no --pvc needed, and a PVC does not replace it."""
    recipe = load_recipe(write_recipe(tmp_path, output_dir="s3://bkt/runs/llama"))
    rayjob = k8s.render_rayjob(recipe, "job.yaml", k8s.K8sOptions(pvc=pvc))
    assert rayjob["spec"]["entrypoint"].split() == [
        "ftlaunch", f"{k8s.RECIPE_DIR}/{k8s.RECIPE_FILE}"
    ]  # fmt: skip


def test_kueue_and_scheduling_options(rendered: dict[str, Any]) -> None:
    rayjob, argv = rendered["rayjob"], rendered["argv"]
    labels = rayjob["metadata"]["labels"]
    if "--queue" in argv:
        assert labels["kueue.x-k8s.io/queue-name"] == argv[argv.index("--queue") + 1]
        assert rayjob["spec"]["suspend"] is True
    else:
        assert "kueue.x-k8s.io/queue-name" not in labels and "suspend" not in rayjob["spec"]
    head, worker = groups(rayjob)
    assert "nodeSelector" not in head["template"]["spec"]
    assert "tolerations" not in head["template"]["spec"]
    if "--node-selector" in argv:
        assert worker["template"]["spec"]["nodeSelector"] == {"gpu": "h100"}
        assert worker["template"]["spec"]["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]


def test_a_local_secret_value_never_reaches_the_manifests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "RAY_AUTH_TOKEN"):
        monkeypatch.setenv(name, PLANTED)
    recipe = write_recipe(tmp_path, num_workers=16)
    argv = [str(recipe), "--pvc", "s", "--secret", "--secret", "WANDB_API_KEY=wandb/key"]
    _, text = render_cli(argv, tmp_path / "out.yaml")
    assert PLANTED not in text
    assert "secretKeyRef" in text


SECRET_SPELLINGS = ["HF_TOKEN", "hf_token", "WANDB_API_KEY", "Api_Key", "MY_PASSWORD"]


@pytest.mark.parametrize("name", SECRET_SPELLINGS)
def test_a_secret_given_as_nccl_env_is_refused_and_never_written(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--nccl-env would write the value into the RayJob in plain text: only --secret may set
    a secret-looking name, and the refusal does not echo the value."""
    recipe = write_recipe(tmp_path, output_dir="/nfs/runs/job")
    out = tmp_path / "out.yaml"
    argv = [str(recipe), "--nccl-env", f"{name}={PLANTED}=\n'\"é", "--out", str(out)]
    with pytest.raises(UserInputError) as info:
        cmd_k8s(parse_args(argv))
    assert info.value.where == f"--nccl-env {name}"
    assert f"--secret {name}=SECRET/KEY" in str(info.value)
    assert PLANTED not in str(info.value) + "".join(capsys.readouterr())
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides",
    [
        {"comet": {"enabled": True, "api_key": PLANTED}},
        {"wandb": {"Api-Key": PLANTED}},
        {"monitors": [{"name": "x", "hf_token": PLANTED}]},
    ],
    ids=["nested", "dashed-case", "in-a-list"],
)
def test_secret_looking_overrides_never_reach_the_configmap(
    tmp_path: Path, overrides: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path, output_dir="/nfs/runs/job")
    raw = yaml.safe_load(recipe.read_text())
    raw["deepspeed"] = {"config": "zero2", "overrides": overrides}
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out.yaml"
    with pytest.raises(UserInputError) as info:
        cmd_k8s(parse_args([str(recipe), "--out", str(out)]))
    assert "deepspeed.overrides." in str(info.value) and "looks like a secret" in str(info.value)
    assert PLANTED not in str(info.value) + "".join(capsys.readouterr())
    assert not out.exists()
    flag = ["--set", f"deepspeed.overrides.comet.api_key={PLANTED}", "--out", str(out)]
    with pytest.raises(UserInputError, match="deepspeed.overrides.comet.api_key"):
        cmd_k8s(parse_args([str(write_recipe(tmp_path, "b", output_dir="/nfs/b")), *flag]))
    assert not out.exists()


def test_nccl_env_given_twice_is_refused(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, output_dir="/nfs/runs/job")
    argv = [str(recipe), "--nccl-env", "NCCL_DEBUG=INFO", "--nccl-env", "NCCL_DEBUG=WARN"]
    with pytest.raises(UserInputError, match="given twice"):
        cmd_k8s(parse_args(argv))
    with pytest.raises(UserInputError) as info:
        cmd_k8s(parse_args([str(recipe), "--nccl-env", f"={PLANTED}"]))
    assert PLANTED not in str(info.value)


def test_nccl_env_values_with_odd_characters_survive_the_manifest(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, output_dir="/nfs/runs/job")
    value = "a=b c\n'\"#é"
    docs, _ = render_cli([str(recipe), "--nccl-env", f"NCCL_X={value}"], tmp_path / "o.yaml")
    _, rayjob = split(docs)
    for pod in pod_specs(rayjob):
        assert {"name": "NCCL_X", "value": value} in pod["containers"][0]["env"]


def test_the_ray_cluster_is_closed_by_default_and_opened_only_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Token auth (KubeRay authOptions) and a NetworkPolicy; --open-dashboard drops both."""
    recipe = write_recipe(tmp_path, output_dir="/nfs/runs/job")
    docs, _ = render_cli([str(recipe), "--secret"], tmp_path / "closed.yaml")
    _, rayjob = split(docs)
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    policy = docs[2]
    assert policy["spec"]["podSelector"]["matchLabels"] == rayjob["metadata"]["labels"]
    capsys.readouterr()
    docs, _ = render_cli([str(recipe), "--secret", "--open-dashboard"], tmp_path / "open.yaml")
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert "authOptions" not in docs[1]["spec"]["rayClusterSpec"]
    assert "--open-dashboard" in capsys.readouterr().err
    if CRD_DIR.is_dir():
        assert schema_errors(docs[1]) == []


def test_networkpolicy_check_catches_an_open_policy(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, output_dir="/nfs/runs/job")
    docs, _ = render_cli([str(recipe)], tmp_path / "o.yaml")
    rayjob, policy = docs[1], docs[2]
    assert networkpolicy_problems(policy, rayjob) == []
    for mutate in (
        lambda p: p["spec"]["ingress"].append({}),
        lambda p: p["spec"]["ingress"][0]["from"].append({"podSelector": {}}),
        lambda p: p["spec"]["podSelector"]["matchLabels"].update({"extra": "x"}),
        lambda p: p["spec"]["ingress"][1].pop("ports"),
    ):
        bad = copy.deepcopy(policy)
        mutate(bad)
        assert networkpolicy_problems(bad, rayjob) != []


def test_override_reaches_the_configmap(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path)
    argv = [str(recipe), "--pvc", "s", "--set", "train.lr=0.000123"]
    docs, _ = render_cli(argv, tmp_path / "out.yaml")
    configmap, _ = split(docs)
    assert yaml.safe_load(configmap["data"]["recipe.yaml"])["train"]["lr"] == 0.000123


def test_stdout_without_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path, output_dir="/nfs/runs/job")
    assert cmd_k8s(parse_args([str(recipe)])) == 0
    captured = capsys.readouterr()
    split(list(yaml.safe_load_all(captured.out)))
    assert "--pvc" in captured.err


# --- names and sizes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output_dir", "stem", "expected"),
    [
        ("runs/My_Run.v2", "x", "my-run-v2"),
        ("runs/2024-sweep", "x", "ft-2024-sweep"),
        ("/abs/path/Llama3 8B LoRA/", "x", "llama3-8b-lora"),
        (".", "Quick_Start", "quick-start"),
        ("runs/" + "a" * 80, "x", "a" * k8s.MAX_JOB_NAME),
        ("___", "___", "ftlaunch"),
    ],
)
def test_job_name_is_derived_and_sanitised(
    tmp_path: Path, output_dir: str, stem: str, expected: str
) -> None:
    recipe = load_recipe(write_recipe(tmp_path, stem, output_dir=output_dir))
    name = k8s.job_name(recipe.output_dir, tmp_path / f"{stem}.yaml")
    assert name == expected
    assert len(name) <= k8s.MAX_JOB_NAME and re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name)


def test_default_layout(tmp_path: Path) -> None:
    gpu = load_recipe(write_recipe(tmp_path, "gpu", num_workers=12))
    layout = k8s.worker_layout(gpu.resources, k8s.K8sOptions(pvc="s"))
    assert (layout.nodes, layout.workers_per_pod, layout.gpus) == (2, 8, 8)
    cpu = load_recipe(
        write_recipe(tmp_path, "cpu", num_workers=3, use_gpu=False, cpus_per_worker=1.5)
    )
    layout = k8s.worker_layout(cpu.resources, k8s.K8sOptions())
    assert (layout.nodes, layout.gpus, layout.cpu) == (1, 0, str(math.ceil(3 * 1.5)))


def test_render_manifests_api(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, num_workers=2))
    docs = k8s.render_manifests(recipe, "r.yaml", "output_dir: x\n", k8s.K8sOptions(pvc="s"))
    split(docs)
    assert docs[0]["data"] == {"recipe.yaml": "output_dir: x\n"}
    assert list(yaml.safe_load_all(k8s.to_yaml(docs))) == docs
    assert "&id" not in k8s.to_yaml(docs), "shared objects must not become YAML anchors"


# --- bad input ----------------------------------------------------------------------------

BAD_INPUT: dict[str, tuple[dict[str, Any], list[str], str]] = {
    "too-few-gpus": ({"num_workers": 4}, ["--nodes", "1", "--gpus-per-node", "1"], "--nodes"),
    "idle-pod": ({"num_workers": 8}, ["--nodes", "3", "--pvc", "s"], "--nodes"),
    "relative-output-dir-without-pvc": ({"output_dir": "runs/x"}, [], "--pvc"),
    "cpu-too-few-slots": (
        {"num_workers": 4, "use_gpu": False, "cpus_per_worker": 4},
        ["--nodes", "1", "--gpus-per-node", "4", "--worker-cpu", "8"],
        "--worker-cpu",
    ),
    "bad-name": ({}, ["--name", "Bad_Name"], "--name"),
    "name-too-long": ({}, ["--name", "a" * 48], "--name"),
    "bad-namespace": ({}, ["--namespace", "ML"], "--namespace"),
    "bad-pvc": ({}, ["--pvc", "my_claim"], "--pvc"),
    "bad-secret-spec": ({}, ["--secret", "HF_TOKEN"], "--secret"),
    "bad-secret-name": ({}, ["--secret", "HF_TOKEN=Hf_Token/token"], "--secret"),
    "secret-shadows-env": (
        {"env": {"HF_ENDPOINT": "x"}}, ["--secret", "HF_ENDPOINT=hf-endpoint/url"], "--secret"
    ),
    "nccl-env-shadows-env": (
        {"env": {"NCCL_DEBUG": "INFO"}}, ["--nccl-env", "NCCL_DEBUG=WARN"], "--nccl-env"
    ),
    "secret-twice": (
        {}, ["--secret", "HF_TOKEN=a/token", "--secret", "HF_TOKEN=b/token"], "--secret"
    ),
    "secret-as-nccl-env-and-secret": (
        {}, ["--nccl-env", "HF_TOKEN=x", "--secret", "HF_TOKEN=a/token"], "--nccl-env HF_TOKEN"
    ),
    "auth-turned-off-by-nccl-env": (
        {}, ["--nccl-env", "RAY_AUTH_MODE=disabled"], "--nccl-env RAY_AUTH_MODE"
    ),
    "auth-token-from-own-secret": (
        {}, ["--secret", "RAY_AUTH_TOKEN=mine/token"], "--secret RAY_AUTH_TOKEN"
    ),
    "auth-turned-off-by-recipe-env": (
        {"env": {"RAY_AUTH_MODE": "disabled"}}, [], "resources.env RAY_AUTH_MODE"
    ),
    "bad-memory": ({}, ["--worker-memory", "lots"], "--worker-memory"),
    "bad-cpu": ({}, ["--head-cpu", "four"], "--head-cpu"),
    "bad-toleration": ({}, ["--toleration", "gpu:Sometimes"], "--toleration"),
    "relative-mount": ({}, ["--pvc", "s", "--pvc-mount", "mnt"], "--pvc-mount"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_names_the_flag(tmp_path: Path, case: str) -> None:
    recipe_kwargs, argv, flag = BAD_INPUT[case]
    recipe = write_recipe(tmp_path, **{"output_dir": "/nfs/runs/job", **recipe_kwargs})
    out = tmp_path / "out.yaml"
    with pytest.raises(UserInputError) as info:
        cmd_k8s(parse_args([str(recipe), *argv, "--out", str(out)]))
    assert info.value.where.startswith(flag), info.value
    assert not out.exists()


def test_invalid_recipe_is_a_user_error(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path)
    with pytest.raises(UserInputError, match="resources.num_workers"):
        cmd_k8s(parse_args([str(recipe), "--set", "resources.num_workers=0"]))


# --- the CLI ------------------------------------------------------------------------------


def _ftlaunch(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "launcher.cli", *args]
    return subprocess.run(
        command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def _cli_has_k8s() -> bool:
    if not (ROOT / "launcher" / "cli" / "__init__.py").is_file():
        return False
    result = _ftlaunch("--help")
    return result.returncode == 0 and re.search(r"\bk8s\b", result.stdout) is not None


def test_cli_end_to_end(tmp_path: Path) -> None:
    if not _cli_has_k8s():
        pytest.skip("launcher/cli/ has no k8s subcommand yet")
    quickstart = ROOT / "recipes" / "quickstart.yaml"
    recipe = quickstart if quickstart.is_file() else write_recipe(tmp_path, "quickstart")
    ok = _ftlaunch("k8s", str(recipe), "--nodes", "1", "--pvc", "shared")
    assert ok.returncode == 0, ok.stderr
    configmap, rayjob = split(list(yaml.safe_load_all(ok.stdout)))
    assert k8s_problems(rayjob) == [] and configmap_problems(configmap) == []
    assert validate_recipe(yaml.safe_load(configmap["data"]["recipe.yaml"])) == load_recipe(recipe)
    if CRD_DIR.is_dir():
        assert schema_errors(rayjob) == []
    bad = _ftlaunch("k8s", str(recipe), "--nodes", "1", "--gpus-per-node", "1",
                    "--set", "resources.num_workers=4")  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert "--nodes" in bad.stderr and bad.stdout == ""


SHIPPED_RECIPES = sorted(p.relative_to(ROOT) for p in (ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", SHIPPED_RECIPES, ids=str)
def test_every_shipped_recipe_renders(recipe: Path, tmp_path: Path) -> None:
    argv = [str(ROOT / recipe), "--pvc", "shared", "--secret"]
    configmap, rayjob = split(render_cli(argv, tmp_path / "out.yaml")[0])
    assert k8s_problems(rayjob) == [] and configmap_problems(configmap) == []
    if CRD_DIR.is_dir():
        assert schema_errors(rayjob) == []


# --- cluster/ -----------------------------------------------------------------------------


def test_cluster_holds_a_rayjob_and_a_raycluster() -> None:
    kinds = {doc["kind"] for _, doc in cluster_docs()}
    assert {"RayJob", "RayCluster", "ConfigMap", "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize(("where", "doc"), cluster_docs(), ids=[w for w, _ in cluster_docs()])
def test_cluster_manifest(where: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in CRD_FILES:
        assert doc["apiVersion"] == "ray.io/v1"
        assert k8s_problems(doc) == []
        if CRD_DIR.is_dir():
            assert schema_errors(doc) == []
    elif doc["kind"] == "ConfigMap":
        assert configmap_problems(doc) == []
    elif doc["kind"] == "NetworkPolicy":
        (rayjob,) = [d for w, d in cluster_docs() if w.split("#")[0] == where.split("#")[0]
                     and d["kind"] == "RayJob"]  # fmt: skip
        assert networkpolicy_problems(doc, rayjob) == []
    else:
        assert (doc["apiVersion"], doc["kind"]) == ("v1", "PersistentVolumeClaim")
        assert metadata_problems(doc["metadata"]) == []
        assert "ReadWriteMany" in doc["spec"]["accessModes"]


def _render_example(cwd: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> list:
    monkeypatch.chdir(cwd)
    return render_cli(EXAMPLE_ARGS, out)[0]


def test_rayjob_example_is_what_the_renderer_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-render the example from the recipe inside its own ConfigMap."""
    example = list(yaml.safe_load_all((CLUSTER / "rayjob-example.yaml").read_text()))
    recipe = tmp_path / EXAMPLE_RECIPE
    recipe.parent.mkdir(parents=True)
    recipe.write_text(split(example)[0]["data"][k8s.RECIPE_FILE])
    assert _render_example(tmp_path, tmp_path / "out.yaml", monkeypatch) == example


def test_rayjob_example_matches_the_shipped_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (ROOT / EXAMPLE_RECIPE).is_file():
        pytest.skip(f"{EXAMPLE_RECIPE} does not exist")
    example = list(yaml.safe_load_all((CLUSTER / "rayjob-example.yaml").read_text()))
    assert _render_example(ROOT, tmp_path / "out.yaml", monkeypatch) == example, (
        "cluster/rayjob-example.yaml is stale; regenerate it with: ftlaunch k8s "
        + " ".join(EXAMPLE_ARGS)
        + " --out cluster/rayjob-example.yaml (and keep its header comment)"
    )


def test_ray_versions_agree() -> None:
    installed = version("ray")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={installed}\n" in dockerfile
    vm = yaml.safe_load((CLUSTER / VM_CONFIG).read_text())
    assert any(f"ray[default,train]=={installed}" in c for c in vm["setup_commands"])
    for where, doc in cluster_docs():
        if doc["kind"] in CRD_FILES:
            cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
            assert cluster["rayVersion"] == installed, where


def test_dockerfile_installs_the_project_and_bakes_in_no_secret() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r'pip install .*-e "\.\[gpu\]"', text)
    assert re.search(r"^FROM ", text, re.MULTILINE)
    assert not re.search(
        r"^\s*(ENV|ARG)\s+\S*(TOKEN|SECRET|PASSWORD|KEY)", text, re.IGNORECASE | re.MULTILINE
    )


def test_vm_cluster_config_matches_rays_schema() -> None:
    ray_spec = importlib.util.find_spec("ray")
    assert ray_spec is not None and ray_spec.origin is not None
    ray_schema = Path(ray_spec.origin).parent / "autoscaler" / "ray-schema.json"
    if not ray_schema.is_file():
        pytest.skip("this Ray has no autoscaler/ray-schema.json")
    config = yaml.safe_load((CLUSTER / VM_CONFIG).read_text())
    jsonschema.validate(config, json.loads(ray_schema.read_text()))
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
