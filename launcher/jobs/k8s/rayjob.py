"""The RayJob: worker pods sized from the recipe's resources, the containers' environment
(secrets by reference only), the head and worker groups, token auth unless the dashboard is open."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any

from launcher.errors import UserInputError
from launcher.recipe import Recipe
from launcher.recipe.output_dir import is_uri
from launcher.recipe.run_sections import ResourcesSection
from launcher.recipe.secrets import SECRETS_HELP, is_secret_name
from launcher.jobs.k8s.names import RECIPE_DIR, RECIPE_FILE, labels, configmap_name, job_name
from launcher.jobs.k8s.options import K8sOptions, ENV_NAME, check_options, check_quantity, cpu_cores

GPU_RESOURCE = "nvidia.com/gpu"
CPUS_PER_GPU = 8
MEMORY_GIB_PER_GPU = 32
MEMORY_GIB_PER_CPU = 4
HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001))
RAY_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@dataclass(frozen=True)
class WorkerLayout:
    """Worker pods and what each one requests."""

    nodes: int
    workers_per_pod: int
    gpus: int
    cpu: str
    memory: str


def worker_layout(res: ResourcesSection, options: K8sOptions) -> WorkerLayout:
    """Size the worker pods and check that they hold resources.num_workers training workers."""
    per_pod = options.gpus_per_node or min(8, res.num_workers)
    nodes = options.nodes or math.ceil(res.num_workers / per_pod)
    gpus = per_pod if res.use_gpu else 0
    cpu = options.worker_cpu or _default_worker_cpu(res, per_pod)
    cores = cpu_cores(cpu, "--worker-cpu")
    memory = options.worker_memory or _default_worker_memory(gpus, cores)
    check_quantity(memory, "--worker-memory")
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


def _default_worker_cpu(res: ResourcesSection, per_pod: int) -> str:
    reserved = math.ceil(res.cpus_per_worker * per_pod)
    if res.use_gpu:
        reserved = max(reserved, CPUS_PER_GPU * per_pod)
    return str(reserved)


def _default_worker_memory(gpus: int, cores: float) -> str:
    if gpus:
        return f"{MEMORY_GIB_PER_GPU * gpus}Gi"
    return f"{MEMORY_GIB_PER_CPU * max(1, math.ceil(cores))}Gi"


def container_env(resources: ResourcesSection, options: K8sOptions) -> list[dict[str, Any]]:
    """Recipe env, NCCL env and Secret references; a name may be set only once, and a
    secret-looking name only by a Secret reference (a plain value would sit in the manifest)."""
    env: list[dict[str, Any]] = []
    sources = [
        ("resources.env", [(k, {"value": v}) for k, v in resources.env.items()]),
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
            if not ENV_NAME.match(name):
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


def pod_output_dir(output_dir: str, name: str, options: K8sOptions) -> str | None:
    """The run directory in the pods with a PVC: output_dir if it is already on the PVC,
    else ``<pvc_mount>/<name>``. None without a PVC (the recipe's output_dir stands)."""
    if not options.pvc or is_uri(output_dir):  # object storage: every pod reaches it
        return None
    mount = PurePosixPath(options.pvc_mount)
    current = PurePosixPath(output_dir)
    if current.is_absolute() and current.is_relative_to(mount) and ".." not in current.parts:
        return str(current)
    return str(mount / name)


def entrypoint(output_dir: str | None) -> str:
    """``ftlaunch`` on the mounted recipe, with the run directory the pods share."""
    command = ["ftlaunch", f"{RECIPE_DIR}/{RECIPE_FILE}"]
    if output_dir:
        command += ["--output-dir", output_dir]
    return shlex.join(command)


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
    return {"metadata": {"labels": labels(name)}, "spec": spec}


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


def render_rayjob(recipe: Recipe, recipe_path: str | Path, options: K8sOptions) -> dict[str, Any]:
    """The RayJob (apiVersion ray.io/v1) for ``recipe`` as a plain dict."""
    check_options(options)
    name = job_name(recipe.output_dir, recipe_path, options.name)
    layout = worker_layout(recipe.resources, options)
    pod_local = not (is_uri(recipe.output_dir) or PurePosixPath(recipe.output_dir).is_absolute())
    if not options.pvc and pod_local:
        raise UserInputError(
            "--pvc",
            f"output_dir '{recipe.output_dir}' would be pod-local, so the head pod (the driver, "
            "which exports the final model) would not see the checkpoints the worker pods write: "
            "pass --pvc NAME (a ReadWriteMany PersistentVolumeClaim), or make output_dir an "
            "absolute path on shared storage you mount into every pod yourself",
        )
    env = container_env(recipe.resources, options)
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": options.namespace,
        "labels": labels(name),
    }
    spec: dict[str, Any] = {
        "entrypoint": entrypoint(pod_output_dir(recipe.output_dir, name, options)),
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
