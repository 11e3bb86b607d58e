"""Where a recipe's things are: its local paths made absolute once on the driver, and the place
in the recipe file (or the command line) that set the field a UserInputError names.

Kept apart from prepare.py, which imports torch and transformers: the launch needs these before
it starts Ray, and the rest only after."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from launcher.errors import UserInputError
from launcher.recipe import Recipe
from launcher.recipe.load import flag_location, load_yaml_with_lines
from launcher.recipe.output_dir import is_uri
from launcher.recipe.sections import DataSource


def _absolute(value: str | None) -> str | None:
    """A path that exists locally becomes absolute; anything else (a hub id) is kept."""
    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        exists = path.exists()
    except OSError:  # not a usable path at all, e.g. an inline chat template
        exists = False
    return str(path.resolve()) if exists else value


def _absolute_source(source: DataSource | None) -> DataSource | None:
    if source is None:
        return None
    path = Path(source.path).expanduser()
    if not path.exists() and path.suffix in (".jsonl", ".json", ".parquet", ".csv"):
        return source
    return source.model_copy(update={"path": _absolute(source.path)})


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """Resolve relative local paths against the current directory, once, on the driver, so
    workers in other directories (or on other nodes with shared storage) see the same files."""
    model = recipe.model.model_copy(
        update={
            "name_or_path": _absolute(recipe.model.name_or_path),
            "tokenizer": _absolute(recipe.model.tokenizer),
        }
    )
    data = recipe.data.model_copy(
        update={
            "train": _absolute_source(recipe.data.train),
            "validation": _absolute_source(recipe.data.validation),
            "chat_template": _absolute(recipe.data.chat_template),
            "cache_dir": _absolute_dir(recipe.data.cache_dir),
        }
    )
    deepspeed = recipe.deepspeed.model_copy(update={"config": _absolute(recipe.deepspeed.config)})
    distill = recipe.distill and recipe.distill.model_copy(
        update={"teacher": _absolute(recipe.distill.teacher)}
    )
    return recipe.model_copy(
        update={
            "model": model,
            "data": data,
            "deepspeed": deepspeed,
            "distill": distill,
            "output_dir": _absolute_output(recipe.output_dir),
        }
    )


def _absolute_output(value: str) -> str:
    """A path made absolute; an object-store prefix as given, without a trailing '/'."""
    return value.rstrip("/") if is_uri(value) else str(Path(value).expanduser().resolve())


def _absolute_dir(value: str | None) -> str | None:
    return None if value is None else str(Path(value).expanduser().resolve())


FIELD_PATH = re.compile(r"^[a-z_]+(?:\.[A-Za-z0-9_]+|\[\d+\])*$")


@contextmanager
def recipe_locations(
    recipe_path: str | Path, overrides: Sequence[str] = (), output_dir: str | None = None
) -> Iterator[None]:
    """Give a UserInputError raised inside (naming a field path, as prepare's checks do) the
    place the user set that field: ``recipe.yaml:LINE: field``, ``--set field`` or
    ``--output-dir``, as the schema errors of load_recipe name it."""
    try:
        yield
    except UserInputError as e:
        where = field_location(e.where, Path(recipe_path), overrides, output_dir)
        if where is None:
            raise
        raise UserInputError(where, e.message) from None


def field_location(
    field: str, recipe_path: Path, overrides: Sequence[str], output_dir: str | None
) -> str | None:
    if not FIELD_PATH.match(field) or field.split(".")[0].split("[")[0] not in Recipe.model_fields:
        return None
    flag = flag_location(field, overrides, output_dir)
    if flag is not None:
        return flag
    path: tuple[str | int, ...] = tuple(
        int(part) if part.isdigit() else part
        for part in re.split(r"\.|\[|\]\.?", field) if part != ""
    )
    try:
        _, lines = load_yaml_with_lines(recipe_path)
    except UserInputError:
        return None
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return f"{recipe_path}:{lines[path[:end]]}: {field}"
    return f"{recipe_path}: {field}"
