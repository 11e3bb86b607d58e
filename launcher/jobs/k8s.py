"""Render a KubeRay RayJob, and the ConfigMap that carries its recipe, for ``ftlaunch k8s``.

The job runs the same ``ftlaunch RECIPE`` entrypoint as a local run, on a Ray cluster that
KubeRay creates for the job and deletes after it. A RayJob cannot carry local files, so the
resolved recipe travels in a ConfigMap mounted at ``/etc/ftlaunch`` in every pod. With a PVC the
run directory lives on shared storage, so a retried job (``backoffLimit``) resumes from the last
checkpoint: running ftlaunch again on the same output_dir resumes.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import yaml

from launcher.errors import UserInputError
from launcher.recipe import Recipe, load_recipe
from launcher.recipe.secrets import SECRETS_HELP, is_secret_name

RECIPE_DIR = "/etc/ftlaunch"
RECIPE_FILE = "recipe.yaml"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_SECRET = "HF_TOKEN=hf-token/token"
# KubeRay names the RayCluster "<job>-xxxxx" and caps cluster names at 53 characters.
MAX_JOB_NAME = 47
CPUS_PER_GPU = 8
MEMORY_GIB_PER_GPU = 32
MEMORY_GIB_PER_CPU = 4
HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001))
DASHBOARD_PORT = 8265
# KubeRay's submitter is a Kubernetes Job named after the RayJob; the Job controller labels its
# pods with this. The operator polls the job's status through the dashboard.
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}
RAY_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
_QUANTITY = re.compile(rf"^{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUMBER}))?$")
_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")


class SecretRef(NamedTuple):
    """An environment variable read from a Kubernetes Secret; the value never enters a manifest."""

    env: str
    secret: str
    key: str

    @classmethod
    def parse(cls, spec: str) -> SecretRef:
        """Parse ``ENV=secret/key``."""
        env, sep, ref = spec.partition("=")
        secret, slash, key = ref.partition("/")
        if not (sep and slash and env and secret and key):
            raise UserInputError(
                f"--secret {spec}", "expected ENV=SECRET/KEY, e.g. " + DEFAULT_SECRET
            )
        return cls(env, secret, key)


@dataclass(frozen=True)
class K8sOptions:
    """How the job runs on Kubernetes. ``None`` sizes are derived from the recipe.

    ``gpus_per_node`` is the number of training workers per worker pod: GPUs per pod on GPU
    recipes (default 8, or resources.num_workers if smaller), CPU workers per pod otherwise.
    ``nodes`` defaults to ceil(resources.num_workers / gpus_per_node). Worker pods get
    8 CPUs and 32Gi per GPU, or resources.cpus_per_worker per worker and 4Gi per CPU on CPU
    recipes, unless ``worker_cpu`` / ``worker_memory`` say otherwise.
    """

    image: str = "ftlaunch:latest"
    namespace: str = "default"
    name: str | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    pvc: str | None = None
    pvc_mount: str = "/mnt/shared"
    queue: str | None = None
    secrets: tuple[SecretRef, ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int = 3600
    backoff_limit: int = 2
    head_cpu: str = "4"
    head_memory: str = "16Gi"
    worker_cpu: str | None = None
    worker_memory: str | None = None
    shm_size: str = "64Gi"
    nccl_env: Mapping[str, str] = field(default_factory=dict)
    open_dashboard: bool = False


@dataclass(frozen=True)
class WorkerLayout:
    """Worker pods and what each one requests."""

    nodes: int
    workers_per_pod: int
    gpus: int
    cpu: str
    memory: str


def job_name(recipe: Recipe, recipe_path: str | Path, name: str | None = None) -> str:
    """The RayJob name: ``name`` if given (checked), else derived from output_dir or the file."""
    if name is not None:
        if len(name) > MAX_JOB_NAME or not _DNS1035_LABEL.match(name):
            raise UserInputError(
                "--name",
                f"'{name}' must be at most {MAX_JOB_NAME} lowercase letters, digits or '-', "
                "starting with a letter and ending with a letter or digit",
            )
        return name
    for source in (PurePosixPath(recipe.output_dir).name, Path(recipe_path).stem):
        candidate = _sanitize(source)
        if candidate:
            return candidate
    return "ftlaunch"


def _sanitize(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if slug and not slug[0].isalpha():
        slug = f"ft-{slug}"
    return slug[:MAX_JOB_NAME].rstrip("-")


def worker_layout(recipe: Recipe, options: K8sOptions) -> WorkerLayout:
    """Size the worker pods and check that they hold resources.num_workers training workers."""
    res = recipe.resources
    per_pod = options.gpus_per_node or min(8, res.num_workers)
    nodes = options.nodes or math.ceil(res.num_workers / per_pod)
    gpus = per_pod if res.use_gpu else 0
    cpu = options.worker_cpu or _default_worker_cpu(recipe, per_pod)
    cores = _cpu_cores(cpu, "--worker-cpu")
    memory = options.worker_memory or _default_worker_memory(gpus, cores)
    _check_quantity(memory, "--worker-memory")
    if nodes * per_pod < res.num_workers:
        unit = "GPUs" if res.use_gpu else "worker slots"
        raise UserInputError(
            "--nodes",
            f"{nodes} pod(s) x {per_pod} {unit} = {nodes * per_pod} < resources.num_workers "
            f"({res.num_workers}); use --nodes {math.ceil(res.num_workers / per_pod)}",
        )
    if (nodes - 1) * per_pod >= res.num_workers:
        raise UserInputError(
            "--nodes",
            f"{nodes} pods of {per_pod} would leave at least one pod idle for "
            f"resources.num_workers {res.num_workers}",
        )
    fits = math.floor(cores / res.cpus_per_worker + 1e-9)
    if fits < per_pod:
        raise UserInputError(
            "--worker-cpu",
            f"{cpu} CPUs per pod fit {fits} worker(s) of resources.cpus_per_worker "
            f"{res.cpus_per_worker}, but each pod runs {per_pod}",
        )
    return WorkerLayout(nodes, per_pod, gpus, cpu, memory)


def _default_worker_cpu(recipe: Recipe, per_pod: int) -> str:
    reserved = math.ceil(recipe.resources.cpus_per_worker * per_pod)
    if recipe.resources.use_gpu:
        reserved = max(reserved, CPUS_PER_GPU * per_pod)
    return str(reserved)


def _default_worker_memory(gpus: int, cores: float) -> str:
    if gpus:
        return f"{MEMORY_GIB_PER_GPU * gpus}Gi"
    return f"{MEMORY_GIB_PER_CPU * max(1, math.ceil(cores))}Gi"


def _cpu_cores(quantity: str, flag: str) -> float:
    match = _CPU.match(quantity)
    if not match:
        raise UserInputError(flag, f"'{quantity}' is not a CPU quantity such as 8, 1.5 or 500m")
    cores = float(match.group(1)) / (1000 if match.group(2) else 1)
    if cores <= 0:
        raise UserInputError(flag, "must be more than 0")
    return cores


def _check_quantity(quantity: str, flag: str) -> None:
    if not _QUANTITY.match(quantity):
        raise UserInputError(flag, f"'{quantity}' is not a Kubernetes quantity such as 64Gi")


def _check_options(options: K8sOptions) -> None:
    checks = [
        ("--namespace", options.namespace, _DNS1123_LABEL, 63),
        ("--pvc", options.pvc, _DNS1123_SUBDOMAIN, 253),
        ("--queue", options.queue, _LABEL_VALUE, 63),
    ]
    for flag, value, pattern, limit in checks:
        if value is not None and (not value or len(value) > limit or not pattern.match(value)):
            raise UserInputError(flag, f"'{value}' is not a valid Kubernetes name")
    if not options.image.strip():
        raise UserInputError("--image", "must not be empty")
    mount = PurePosixPath(options.pvc_mount)
    if not mount.is_absolute() or mount in (PurePosixPath(RECIPE_DIR), PurePosixPath("/dev/shm")):
        raise UserInputError(
            "--pvc-mount",
            f"'{options.pvc_mount}' must be an absolute path other than {RECIPE_DIR} and /dev/shm",
        )
    _cpu_cores(options.head_cpu, "--head-cpu")
    for flag, quantity in (
        ("--head-memory", options.head_memory),
        ("--shm-size", options.shm_size),
    ):
        _check_quantity(quantity, flag)
    for flag, value in (
        ("--ttl", options.ttl_seconds_after_finished),
        ("--backoff-limit", options.backoff_limit),
    ):
        if value < 0:
            raise UserInputError(flag, "must be 0 or more")
    if options.active_deadline_seconds is not None and options.active_deadline_seconds <= 0:
        raise UserInputError("--active-deadline", "must be more than 0 seconds")
    for ref in options.secrets:
        _check_secret(ref)
    for key, value in options.node_selector.items():
        if not key or not _LABEL_VALUE.match(value) or len(value) > 63:
            raise UserInputError(f"--node-selector {key}={value}", "not a valid node label")


def _check_secret(ref: SecretRef) -> None:
    where = f"--secret {ref.env}={ref.secret}/{ref.key}"
    if not _ENV_NAME.match(ref.env):
        raise UserInputError(where, f"'{ref.env}' is not an environment variable name")
    if len(ref.secret) > 253 or not _DNS1123_SUBDOMAIN.match(ref.secret):
        raise UserInputError(where, f"'{ref.secret}' is not a valid Secret name")
    if not _SECRET_KEY.match(ref.key):
        raise UserInputError(where, f"'{ref.key}' is not a valid Secret key")


def container_env(recipe: Recipe, options: K8sOptions) -> list[dict[str, Any]]:
    """Recipe env, NCCL env and Secret references; a name may be set only once, and a
    secret-looking name only by a Secret reference (a plain value would sit in the manifest)."""
    env: list[dict[str, Any]] = []
    sources = [
        ("resources.env", [(k, {"value": v}) for k, v in recipe.resources.env.items()]),
        ("--nccl-env", [(k, {"value": v}) for k, v in options.nccl_env.items()]),
        (
            "--secret",
            [
                (s.env, {"valueFrom": {"secretKeyRef": {"name": s.secret, "key": s.key}}})
                for s in options.secrets
            ],
        ),
    ]
    seen: dict[str, str] = {}
    for where, entries in sources:
        for name, value in entries:
            if not _ENV_NAME.match(name):
                raise UserInputError(where, f"'{name}' is not an environment variable name")
            if "value" in value and is_secret_name(name):
                raise UserInputError(
                    f"{where} {name}",
                    "looks like a secret, and its value would be written into the RayJob in "
                    f"plain text: create a Kubernetes Secret and pass --secret {name}=SECRET/KEY; "
                    + SECRETS_HELP,
                )
            if name in RAY_AUTH_ENV and not options.open_dashboard:
                raise UserInputError(
                    f"{where} {name}",
                    "is set by KubeRay's token authentication (authOptions) in every Ray "
                    "container; setting it here could turn authentication off or fight the "
                    "operator's token",
                )
            if name in seen:
                raise UserInputError(where, f"{name} is already set by {seen[name]}")
            seen[name] = where
            env.append({"name": name, **value})
    return env


def pod_output_dir(recipe: Recipe, name: str, options: K8sOptions) -> str | None:
    """The run directory in the pods with a PVC: output_dir if it is already on the PVC,
    else ``<pvc_mount>/<name>``. None without a PVC (the recipe's output_dir stands)."""
    if not options.pvc:
        return None
    mount = PurePosixPath(options.pvc_mount)
    current = PurePosixPath(recipe.output_dir)
    if current.is_absolute() and current.is_relative_to(mount) and ".." not in current.parts:
        return str(current)
    return str(mount / name)


def entrypoint(output_dir: str | None) -> str:
    """``ftlaunch`` on the mounted recipe, with the run directory the pods share."""
    command = ["ftlaunch", f"{RECIPE_DIR}/{RECIPE_FILE}"]
    if output_dir:
        command += ["--output-dir", output_dir]
    return shlex.join(command)


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "ftlaunch", "app.kubernetes.io/instance": name}


def _volumes(name: str, options: K8sOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "recipe", "configMap": {"name": configmap_name(name)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if options.pvc:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": options.pvc}})
        mounts.append({"name": "shared", "mountPath": options.pvc_mount})
    return volumes, mounts


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        amounts[GPU_RESOURCE] = gpus
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod_template(
    name: str, container: dict[str, Any], options: K8sOptions, worker: bool
) -> dict[str, Any]:
    volumes, mounts = _volumes(name, options)
    spec: dict[str, Any] = {
        "containers": [{**container, "volumeMounts": mounts}],
        "volumes": volumes,
    }
    if worker and options.node_selector:
        spec["nodeSelector"] = dict(options.node_selector)
    if worker and options.tolerations:
        spec["tolerations"] = [dict(t) for t in options.tolerations]
    return {"metadata": {"labels": _labels(name)}, "spec": spec}


def _head_group(name: str, env: list[dict[str, Any]], options: K8sOptions) -> dict[str, Any]:
    """The head hosts the GCS, the dashboard and the driver; zero CPUs/GPUs keep training off it."""
    container = {
        "name": "ray-head",
        "image": options.image,
        "ports": [{"name": port, "containerPort": number} for port, number in HEAD_PORTS],
        "resources": _resources(options.head_cpu, options.head_memory),
        "env": [dict(e) for e in env],
    }
    return {
        # 0.0.0.0: the submitter pod and the operator reach the dashboard through the head's
        # Service; token auth and the NetworkPolicy keep everyone else out.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"},
        "template": _pod_template(name, container, options, worker=False),
    }


def _worker_group(
    name: str, env: list[dict[str, Any]], layout: WorkerLayout, options: K8sOptions
) -> dict[str, Any]:
    container = {
        "name": "ray-worker",
        "image": options.image,
        "resources": _resources(layout.cpu, layout.memory, layout.gpus),
        "env": [dict(e) for e in env],
    }
    return {
        "groupName": "gpu-workers" if layout.gpus else "cpu-workers",
        "replicas": layout.nodes,
        "minReplicas": layout.nodes,
        "maxReplicas": layout.nodes,
        "rayStartParams": {},
        "template": _pod_template(name, container, options, worker=True),
    }


def configmap_name(name: str) -> str:
    return f"{name}-recipe"


def render_rayjob(recipe: Recipe, recipe_path: str | Path, options: K8sOptions) -> dict[str, Any]:
    """The RayJob (apiVersion ray.io/v1) for ``recipe`` as a plain dict."""
    _check_options(options)
    name = job_name(recipe, recipe_path, options.name)
    layout = worker_layout(recipe, options)
    if not options.pvc and not PurePosixPath(recipe.output_dir).is_absolute():
        raise UserInputError(
            "--pvc",
            f"output_dir '{recipe.output_dir}' would be pod-local, so the head pod (the driver, "
            "which exports the final model) would not see the checkpoints the worker pods write: "
            "pass --pvc NAME (a ReadWriteMany PersistentVolumeClaim), or make output_dir an "
            "absolute path on shared storage you mount into every pod yourself",
        )
    env = container_env(recipe, options)
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": options.namespace,
        "labels": _labels(name),
    }
    spec: dict[str, Any] = {
        "entrypoint": entrypoint(pod_output_dir(recipe, name, options)),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": options.ttl_seconds_after_finished,
        "backoffLimit": options.backoff_limit,
    }
    if options.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = options.active_deadline_seconds
    if options.queue:
        metadata["labels"]["kueue.x-k8s.io/queue-name"] = options.queue
        spec["suspend"] = True
    spec["rayClusterSpec"] = {
        "rayVersion": version("ray"),
        "headGroupSpec": _head_group(name, env, options),
        "workerGroupSpecs": [_worker_group(name, env, layout, options)],
    }
    if not options.open_dashboard:
        # KubeRay (1.5.1+) creates a Secret with a random token and sets RAY_AUTH_MODE=token
        # and RAY_AUTH_TOKEN in every Ray container; Ray then refuses unauthenticated requests
        # to the dashboard, the job API and the GCS.
        spec["rayClusterSpec"]["authOptions"] = {"mode": "token"}
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": metadata, "spec": spec}


def render_configmap(name: str, namespace: str, recipe_text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": configmap_name(name), "namespace": namespace, "labels": _labels(name)},
        "data": {RECIPE_FILE: recipe_text},
    }


def networkpolicy_name(name: str) -> str:
    return f"{name}-ray"


def render_networkpolicy(name: str, namespace: str) -> dict[str, Any]:
    """Ingress to the job's Ray pods only from each other, from its submitter (any port), and
    from the KubeRay operator (the dashboard port, where it polls the job)."""
    own = {"podSelector": {"matchLabels": _labels(name)}}
    submitter = {"podSelector": {"matchLabels": {JOB_NAME_LABEL: name}}}
    operator = {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(OPERATOR_LABELS)}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": networkpolicy_name(name),
            "namespace": namespace,
            "labels": _labels(name),
        },
        "spec": {
            "podSelector": {"matchLabels": _labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [own, submitter]},
                {"from": [operator], "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
            ],
        },
    }


def render_manifests(
    recipe: Recipe, recipe_path: str | Path, recipe_text: str, options: K8sOptions
) -> list[dict[str, Any]]:
    """[ConfigMap holding ``recipe_text`` as recipe.yaml, RayJob whose pods mount it, and
    (unless ``open_dashboard``) the NetworkPolicy that closes its pods to other traffic]."""
    rayjob = render_rayjob(recipe, recipe_path, options)
    meta = rayjob["metadata"]
    docs = [render_configmap(meta["name"], meta["namespace"], recipe_text), rayjob]
    if not options.open_dashboard:
        docs.append(render_networkpolicy(meta["name"], meta["namespace"]))
    return docs


def recipe_yaml(recipe: Recipe, source: str | Path) -> str:
    """The recipe as given, with ``--set`` overrides applied; defaults stay implicit."""
    body = yaml.dump(
        recipe.model_dump(mode="json", exclude_unset=True), Dumper=_Dumper, sort_keys=False
    )
    return f"# From {source} (ftlaunch k8s).\n{body}"


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)


def to_yaml(docs: Sequence[Mapping[str, Any]]) -> str:
    """A multi-document YAML stream; multi-line strings as literal blocks."""
    return yaml.dump_all(
        [dict(d) for d in docs], Dumper=_Dumper, sort_keys=False, default_flow_style=False
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ftlaunch k8s``."""
    add = parser.add_argument
    add("recipe", help="Recipe YAML file.")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a recipe field.")
    add(
        "--image",
        metavar="IMAGE",
        help="Training image (default ftlaunch:latest); see cluster/Dockerfile.",
    )
    add("--namespace", metavar="NS", help="Kubernetes namespace (default: default).")
    add("--name", help="RayJob name (default: derived from output_dir or the recipe file).")
    add(
        "--nodes",
        type=_positive_int,
        metavar="N",
        help="Worker pods (default: what num_workers needs).",
    )
    add(
        "--gpus-per-node",
        type=_positive_int,
        metavar="N",
        help="GPUs per worker pod (CPU recipes: workers per pod); default min(8, num_workers).",
    )
    add(
        "--pvc",
        metavar="NAME",
        help="ReadWriteMany PersistentVolumeClaim for the run directory, mounted in every pod "
        "(required unless output_dir is an absolute path on storage you mount yourself).",
    )
    add("--pvc-mount", metavar="PATH", help="Where the PVC is mounted (default /mnt/shared).")
    add(
        "--queue",
        metavar="NAME",
        help="Kueue LocalQueue: the job is created suspended and Kueue admits it.",
    )
    add(
        "--secret",
        action="append",
        nargs="?",
        const=DEFAULT_SECRET,
        metavar="ENV=SECRET/KEY",
        help=f"Env var from a Kubernetes Secret; bare --secret means {DEFAULT_SECRET}.",
    )
    add(
        "--nccl-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Extra environment for every pod, e.g. NCCL_SOCKET_IFNAME=eth0.",
    )
    add(
        "--node-selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Node label worker pods require.",
    )
    add(
        "--toleration",
        action="append",
        default=[],
        metavar="KEY[=VALUE][:EFFECT]",
        help="Taint worker pods tolerate, e.g. nvidia.com/gpu:NoSchedule.",
    )
    add("--head-cpu", metavar="CPU", help="Head pod CPUs (default 4).")
    add("--head-memory", metavar="MEM", help="Head pod memory (default 16Gi).")
    add(
        "--worker-cpu",
        metavar="CPU",
        help="CPUs per worker pod (default 8 per GPU, or cpus_per_worker each).",
    )
    add(
        "--worker-memory",
        metavar="MEM",
        help="Memory per worker pod (default 32Gi per GPU, 4Gi per CPU).",
    )
    add("--shm-size", metavar="MEM", help="Size limit of the in-memory /dev/shm (default 64Gi).")
    add(
        "--backoff-limit",
        type=int,
        metavar="N",
        help="Retries of a failed job; each resumes (default 2).",
    )
    add(
        "--ttl",
        dest="ttl_seconds_after_finished",
        type=int,
        metavar="SECONDS",
        help="Seconds a finished job's cluster is kept (default 3600).",
    )
    add(
        "--active-deadline",
        dest="active_deadline_seconds",
        type=_positive_int,
        metavar="SECONDS",
        help="Seconds before the job is stopped.",
    )
    add(
        "--open-dashboard",
        action="store_true",
        default=None,
        help="Render the Ray cluster without token authentication and without the "
        "NetworkPolicy: anyone who reaches the head can run code in the pods and read their "
        "secrets. Default: closed.",
    )
    add("--out", metavar="FILE", help="Write the manifests here instead of stdout.")


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"{flag} {key}" if key else flag, "expected KEY=VALUE")
        if key in pairs:
            raise UserInputError(f"{flag} {key}", "given twice")
        pairs[key] = value
    return pairs


def parse_toleration(spec: str) -> dict[str, str]:
    """``KEY[=VALUE][:EFFECT]`` -> a Kubernetes toleration."""
    body, _, effect = spec.rpartition(":") if ":" in spec else (spec, "", "")
    key, sep, value = body.partition("=")
    if not key or (effect and effect not in TOLERATION_EFFECTS):
        raise UserInputError(
            f"--toleration {spec}",
            f"expected KEY[=VALUE][:EFFECT], EFFECT one of {TOLERATION_EFFECTS}",
        )
    toleration = {"key": key, "operator": "Equal" if sep else "Exists"}
    if sep:
        toleration["value"] = value
    if effect:
        toleration["effect"] = effect
    return toleration


_STRUCTURED = {"secrets", "nccl_env", "node_selector", "tolerations"}


def options_from_args(args: argparse.Namespace) -> K8sOptions:
    """K8sOptions from parsed arguments; flags left out keep the K8sOptions defaults."""
    given = {
        f.name: getattr(args, f.name)
        for f in fields(K8sOptions)
        if f.name not in _STRUCTURED and getattr(args, f.name, None) is not None
    }
    return K8sOptions(
        **given,
        secrets=tuple(SecretRef.parse(s) for s in args.secret or ()),
        nccl_env=_pairs(args.nccl_env, "--nccl-env"),
        node_selector=_pairs(args.node_selector, "--node-selector"),
        tolerations=tuple(parse_toleration(t) for t in args.toleration),
    )


def run(args: argparse.Namespace) -> int:
    """``ftlaunch k8s``: print (or write to --out) the ConfigMap and RayJob for a recipe."""
    recipe = load_recipe(args.recipe, args.set)
    options = options_from_args(args)
    docs = render_manifests(recipe, args.recipe, recipe_yaml(recipe, args.recipe), options)
    text = to_yaml(docs)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}: kubectl apply -f {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if options.open_dashboard:
        print(
            "warning: --open-dashboard: the Ray head accepts unauthenticated requests from "
            "anywhere in the cluster network, and its jobs see the pods' secrets",
            file=sys.stderr,
        )
    if not options.pvc:
        print(
            f"note: no --pvc: output_dir {recipe.output_dir} must be on shared storage that you "
            "mount into every pod; this manifest mounts none",
            file=sys.stderr,
        )
    return 0
