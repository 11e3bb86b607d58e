"""What ``ftlaunch k8s`` is told, as typed options (``K8sOptions``, ``SecretRef``), and the checks
that refuse a value Kubernetes would reject, naming the flag."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, NamedTuple

from launcher.errors import UserInputError
from launcher.jobs.k8s.names import RECIPE_DIR, DNS1123_LABEL, DNS1123_SUBDOMAIN

DEFAULT_SECRET = "HF_TOKEN=hf-token/token"
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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


def cpu_cores(quantity: str, flag: str) -> float:
    match = _CPU.match(quantity)
    if not match:
        raise UserInputError(flag, f"'{quantity}' is not a CPU quantity such as 8, 1.5 or 500m")
    cores = float(match.group(1)) / (1000 if match.group(2) else 1)
    if cores <= 0:
        raise UserInputError(flag, "must be more than 0")
    return cores


def check_quantity(quantity: str, flag: str) -> None:
    if not _QUANTITY.match(quantity):
        raise UserInputError(flag, f"'{quantity}' is not a Kubernetes quantity such as 64Gi")


def check_options(options: K8sOptions) -> None:
    checks = [
        ("--namespace", options.namespace, DNS1123_LABEL, 63),
        ("--pvc", options.pvc, DNS1123_SUBDOMAIN, 253),
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
    cpu_cores(options.head_cpu, "--head-cpu")
    for flag, quantity in (
        ("--head-memory", options.head_memory),
        ("--shm-size", options.shm_size),
    ):
        check_quantity(quantity, flag)
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
    if not ENV_NAME.match(ref.env):
        raise UserInputError(where, f"'{ref.env}' is not an environment variable name")
    if len(ref.secret) > 253 or not DNS1123_SUBDOMAIN.match(ref.secret):
        raise UserInputError(where, f"'{ref.secret}' is not a valid Secret name")
    if not _SECRET_KEY.match(ref.key):
        raise UserInputError(where, f"'{ref.key}' is not a valid Secret key")


def pairs(items: Sequence[str], flag: str) -> dict[str, str]:
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
