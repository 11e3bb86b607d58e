"""Render a KubeRay RayJob, and the ConfigMap that carries its recipe, for ``ftlaunch k8s``.

The job runs the same ``ftlaunch RECIPE`` entrypoint as a local run, on a Ray cluster that
KubeRay creates for the job and deletes after it. A RayJob cannot carry local files, so the
resolved recipe travels in a ConfigMap mounted at ``/etc/ftlaunch`` in every pod. With a PVC the
run directory lives on shared storage, so a retried job (``backoffLimit``) resumes from the last
checkpoint: running ftlaunch again on the same output_dir resumes.

The package: ``names`` (object names and labels), ``options`` (the typed flags and their
checks), ``rayjob`` (pods sized from ``resources``), ``network`` (the NetworkPolicy),
``configmap`` (the recipe's ConfigMap and the YAML output); this module puts them together.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launcher.recipe import Recipe, load_recipe
from launcher.jobs.k8s.configmap import recipe_yaml, render_configmap, to_yaml
from launcher.jobs.k8s.names import MAX_JOB_NAME, RECIPE_DIR, RECIPE_FILE, job_name
from launcher.jobs.k8s.network import (
    DASHBOARD_PORT, JOB_NAME_LABEL, OPERATOR_LABELS, render_networkpolicy,
)
from launcher.jobs.k8s.options import (
    DEFAULT_SECRET, K8sOptions, SecretRef, pairs, parse_toleration,
)
from launcher.jobs.k8s.rayjob import GPU_RESOURCE, WorkerLayout, render_rayjob, worker_layout

__all__ = [
    "DASHBOARD_PORT", "DEFAULT_SECRET", "GPU_RESOURCE", "JOB_NAME_LABEL", "MAX_JOB_NAME",
    "OPERATOR_LABELS", "RECIPE_DIR", "RECIPE_FILE", "K8sOptions", "SecretRef", "WorkerLayout",
    "job_name", "pairs", "parse_toleration", "recipe_yaml", "render_configmap",
    "render_manifests", "render_networkpolicy", "render_rayjob", "run", "to_yaml",
    "worker_layout",
]


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


def run(
    recipe_path: str, overrides: Sequence[str], options: K8sOptions, out: str | None = None
) -> int:
    """``ftlaunch k8s``: print (or write to ``out``) the ConfigMap and RayJob for a recipe."""
    recipe = load_recipe(recipe_path, overrides)
    docs = render_manifests(recipe, recipe_path, recipe_yaml(recipe, recipe_path), options)
    text = to_yaml(docs)
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}: kubectl apply -f {out}", file=sys.stderr)
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
