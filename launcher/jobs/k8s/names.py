"""The names a job's Kubernetes objects carry: the RayJob (checked against Kubernetes' rules), its
ConfigMap and NetworkPolicy, their labels, and where the recipe is mounted."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from launcher.errors import UserInputError

RECIPE_DIR = "/etc/ftlaunch"
RECIPE_FILE = "recipe.yaml"
# KubeRay names the RayCluster "<job>-xxxxx" and caps cluster names at 53 characters.
MAX_JOB_NAME = 47
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


def job_name(output_dir: str, recipe_path: str | Path, name: str | None = None) -> str:
    """The RayJob name: ``name`` if given (checked), else derived from output_dir or the file."""
    if name is not None:
        if len(name) > MAX_JOB_NAME or not DNS1035_LABEL.match(name):
            raise UserInputError(
                "--name",
                f"'{name}' must be at most {MAX_JOB_NAME} lowercase letters, digits or '-', "
                "starting with a letter and ending with a letter or digit",
            )
        return name
    for source in (PurePosixPath(output_dir).name, Path(recipe_path).stem):
        candidate = _sanitize(source)
        if candidate:
            return candidate
    return "ftlaunch"


def _sanitize(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if slug and not slug[0].isalpha():
        slug = f"ft-{slug}"
    return slug[:MAX_JOB_NAME].rstrip("-")


def labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "ftlaunch", "app.kubernetes.io/instance": name}


def configmap_name(name: str) -> str:
    return f"{name}-recipe"


def networkpolicy_name(name: str) -> str:
    return f"{name}-ray"
