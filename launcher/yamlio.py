"""YAML loading that refuses duplicate keys and remembers where every key was written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UserInputError

KeyPath = tuple[str | int, ...]


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse ``path``; return the data and a map from key path to 1-based line number."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserInputError(str(path), "file not found") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserInputError(where, f"invalid YAML: {getattr(e, 'problem', e)}") from None
    lines: dict[KeyPath, int] = {}
    if root is not None:
        _walk(root, (), lines, path)
    return yaml.safe_load(text), lines


def _walk(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int], path: Path) -> None:
    lines.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(p) for p in (*prefix, key))
                raise UserInputError(
                    f"{path}:{line}", f"duplicate key '{dotted}' (first set on line {seen[key]})"
                )
            seen[key] = line
            lines[(*prefix, key)] = line
            _walk(value_node, (*prefix, key), lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*prefix, i), lines, path)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides; values are parsed as YAML so types coerce naturally."""
    for item in overrides:
        if "=" not in item:
            key = re.split(r"[:\s]", item.strip(), maxsplit=1)[0]  # not what may follow: a value
            raise UserInputError(f"--set {key}", "expected KEY=VALUE, e.g. train.lr=1e-4")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            raise UserInputError(f"--set {dotted}", "empty key in dotted path")
        target = data
        for key in keys[:-1]:
            child = target.get(key)
            if child is None:
                child = target[key] = {}
            if not isinstance(child, dict):
                raise UserInputError(f"--set {dotted}", f"'{key}' is not a section")
            target = child
        target[keys[-1]] = _override_value(dotted, raw)
    return data


def _override_value(dotted: str, raw: str) -> Any:
    """The YAML value of ``--set dotted=raw``; the error names the key, never the value
    (which may be a secret on its way to being refused)."""
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        column = f" at column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise UserInputError(
            f"--set {dotted}", f"the value is not valid YAML{column} ({problem}); quote it"
        ) from None
