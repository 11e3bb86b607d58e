"""From a YAML file to a validated Recipe: loading that refuses duplicate keys and remembers
where every key was written, ``--set`` overrides, and errors that name file:line and field."""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from launcher.errors import UserInputError
from launcher.recipe.schema import Recipe

KeyPath = tuple[str | int, ...]
MAX_KEYS = 100_000  # far beyond any recipe; a bound on alias expansion ("billion laughs")


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse ``path``; return the data and a map from key path to 1-based line number."""
    text = read_yaml_text(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        lines: dict[KeyPath, int] = {}
        if root is not None:
            _walk(root, (), lines, path, ())
        return yaml.safe_load(text), lines
    except yaml.YAMLError as e:  # syntax, and tags safe YAML does not build (!!python/...)
        raise UserInputError(_error_location(path, text, e), f"invalid YAML: {_problem(e)}") from None
    except RecursionError:
        raise UserInputError(str(path), "invalid YAML: nested too deeply") from None


def read_yaml_text(path: Path) -> str:
    """The file's text: UTF-8 (a BOM is allowed), or UTF-16/32 when a BOM says so, as YAML
    permits. Anything else is an error naming the line of the first undecodable byte."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserInputError(str(path), "file not found") from None
    except IsADirectoryError:
        raise UserInputError(str(path), "is a directory, not a YAML file") from None
    encoding = _bom_encoding(raw)
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserInputError(
            f"{path}:{line}", f"not valid {encoding.removesuffix('-sig').upper()} text "
            f"(byte 0x{raw[e.start]:02x}); save the recipe as UTF-8"
        ) from None


def _bom_encoding(raw: bytes) -> str:
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if raw.startswith(bom):
            return encoding
    return "utf-8-sig"


def _error_location(path: Path, text: str, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        return f"{path}:{mark.line + 1}"
    position = getattr(error, "position", None)  # a ReaderError: a character YAML forbids
    if isinstance(position, int):
        return f"{path}:{text.count(chr(10), 0, position) + 1}"
    return str(path)


def _problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.reader.ReaderError):
        char = error.character
        code = char if isinstance(char, int) else ord(char)
        return f"unacceptable character #x{code:04x} (control characters are not allowed)"
    return str(getattr(error, "problem", None) or error)


def _walk(
    node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int], path: Path,
    enclosing: tuple[int, ...],
) -> None:
    """Record each key's line; refuse duplicate keys and an alias inside its own anchor."""
    line = node.start_mark.line + 1
    if id(node) in enclosing:
        dotted = ".".join(str(p) for p in prefix) or "recipe"
        raise UserInputError(f"{path}:{line}", f"{dotted}: an alias refers to a value that contains it")
    if len(enclosing) > 100:
        raise UserInputError(f"{path}:{line}", "invalid YAML: nested more than 100 levels deep")
    if len(lines) > MAX_KEYS:
        raise UserInputError(
            f"{path}:{line}", f"invalid YAML: more than {MAX_KEYS} values (aliases expanding?)"
        )
    enclosing = (*enclosing, id(node))
    lines.setdefault(prefix, line)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                dotted = ".".join(str(p) for p in prefix) or "recipe"
                raise UserInputError(f"{path}:{line}", f"{dotted}: a key must be a plain name")
            key = key_node.value
            if key in seen:
                dotted = ".".join(str(p) for p in (*prefix, key))
                raise UserInputError(
                    f"{path}:{line}", f"duplicate key '{dotted}' (first set on line {seen[key]})"
                )
            seen[key] = line
            lines[(*prefix, key)] = line
            _walk(value_node, (*prefix, key), lines, path, enclosing)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*prefix, i), lines, path, enclosing)


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


def _field_path(loc: tuple[Any, ...]) -> KeyPath:
    """Pydantic locations include validator names for unions; keep only real keys."""
    return tuple(p for p in loc if isinstance(p, int) or not str(p).startswith(("function-",)))


def validate_recipe(
    data: Any, source: str = "recipe", lines: dict[KeyPath, int] | None = None,
    overrides: Sequence[str] = (), output_dir: str | None = None,
) -> Recipe:
    """Validate plain data into a Recipe, turning the first error into a UserInputError that
    names where the bad value was given: ``--set``, ``--output-dir`` or the file's line."""
    if not isinstance(data, dict):
        raise UserInputError(source, "a recipe must be a YAML mapping of sections")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        path = _field_path(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        named = re.match(r"^([a-z_]+(?:\.[a-z_]+)*): (.*)$", message, re.S)
        if named and err["type"] == "value_error":
            path = (*path, *named.group(1).split(".")[len(path):])
            message = named.group(2)
        dotted = ".".join(str(p) for p in path) or "recipe"
        line = _nearest_line(lines or {}, path)
        where = flag_location(dotted, overrides, output_dir) or (
            f"{source}:{line}: {dotted}" if line else f"{source}: {dotted}"
        )
        if err["type"] == "extra_forbidden":
            message = f"unknown field '{path[-1]}'" + _suggest(path, data)
        raise UserInputError(where, message) from None


def flag_location(field: str, overrides: Sequence[str], output_dir: str | None) -> str | None:
    """``--set KEY`` or ``--output-dir`` when the command line gave ``field`` (a dotted path)
    its value, else None (the recipe file did). The last ``--set`` of a field wins."""
    if field == "output_dir" and output_dir is not None:
        return "--output-dir"
    for item in reversed(list(overrides)):
        key = item.partition("=")[0].strip()
        if field == key or field.startswith((f"{key}.", f"{key}[")) or key.startswith(f"{field}."):
            return f"--set {key}: {field}" if key != field else f"--set {field}"
    return None


def _nearest_line(lines: dict[KeyPath, int], path: KeyPath) -> int | None:
    for end in range(len(path), -1, -1):
        if path[:end] in lines and end > 0:
            return lines[path[:end]]
    return None


def _suggest(path: KeyPath, data: dict[str, Any]) -> str:
    import difflib

    model: type[BaseModel] = Recipe
    for key in path[:-1]:
        info = model.model_fields.get(str(key))
        if info is None:
            return ""
        annotation = info.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if _is_model(a)]
        if not candidates:
            return ""
        model = candidates[0]
    close = difflib.get_close_matches(str(path[-1]), list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def load_recipe(path: str | Path, overrides: list[str] = (), output_dir: str | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides (YAML values) and ``--output-dir``
    (taken literally: a path may hold '#', ': ', spaces), and validate it."""
    path = Path(path)
    data, lines = load_yaml_with_lines(path)
    if data is None:
        raise UserInputError(str(path), "the recipe is empty")
    if not isinstance(data, dict):
        raise UserInputError(str(path), "a recipe must be a YAML mapping of sections")
    data = apply_overrides(data, list(overrides))
    if output_dir is not None:
        data["output_dir"] = output_dir
    return validate_recipe(data, str(path), lines, overrides, output_dir)
