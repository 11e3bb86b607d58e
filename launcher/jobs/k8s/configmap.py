"""The ConfigMap that carries the recipe into every pod, and the YAML the manifests are printed as."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from launcher.recipe import Recipe
from launcher.jobs.k8s.names import RECIPE_FILE, labels, configmap_name


def render_configmap(name: str, namespace: str, recipe_text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": configmap_name(name), "namespace": namespace, "labels": labels(name)},
        "data": {RECIPE_FILE: recipe_text},
    }


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
