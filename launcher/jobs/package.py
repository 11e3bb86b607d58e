"""What a Ray job carries: the recipe and the local files it names in a staged working_dir, the
entrypoint, the environment (never a secret) and a submission id derived from the recipe."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from launcher.errors import UserInputError
from launcher.recipe import Recipe
from launcher.recipe.secrets import SECRETS_HELP, is_secret_name
from launcher.jobs.address import ENV_NAME


@dataclass(frozen=True)
class JobSpec:
    """What is sent to the job server, apart from the working_dir's contents."""

    submission_id: str
    entrypoint: str
    runtime_env: Mapping[str, Any]
    metadata: Mapping[str, str]


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``--env KEY=VALUE`` pairs; secret names are refused."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not ENV_NAME.match(name):
            raise UserInputError(f"--env {name}" if name else "--env", "expected KEY=VALUE")
        if is_secret_name(name):
            raise UserInputError(
                f"--env {name}",
                "looks like a secret and is not sent with the job (a job's runtime_env is "
                f"stored in plain text and shown by the dashboard); {SECRETS_HELP}",
            )
        env[name] = value
    return env


def submission_id(recipe: Recipe) -> str:
    """Stable for one recipe (overrides and output_dir included): a resubmission is no-op."""
    text = json.dumps(recipe.model_dump(mode="json"), sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", PurePath(recipe.output_dir).name.lower()).strip("-")
    return f"ftlaunch-{slug[:40] or 'run'}-{digest}"


def local_files(recipe: Recipe) -> dict[str, Path]:
    """Recipe field -> relative path of a local file or directory it references, to ship.

    Absolute paths stay as they are (storage on the cluster); values that name nothing here
    are hub ids or presets. A relative path outside the current directory cannot keep its
    meaning in the working_dir, so it is refused.
    """
    fields = {
        "model.name_or_path": recipe.model.name_or_path,
        "model.tokenizer": recipe.model.tokenizer,
        "data.train.path": recipe.data.train.path,
        "data.validation.path": recipe.data.validation.path if recipe.data.validation else None,
        "data.chat_template": recipe.data.chat_template,
        "deepspeed.config": recipe.deepspeed.config,
    }
    files: dict[str, Path] = {}
    for field, value in fields.items():
        if not value or value.startswith(("/", "~")) or not _exists(value):
            continue
        path = PurePath(value)
        if ".." in path.parts:
            raise UserInputError(
                field,
                f"'{value}' lies outside the current directory, so the job's working_dir "
                "cannot hold it; run ftlaunch submit from a directory that contains it, or use "
                "an absolute path on storage the cluster mounts",
            )
        files[field] = Path(path)
    return files


def refuse_shipped_secrets(recipe: Recipe, files: Mapping[str, Path]) -> None:
    """A DeepSpeed JSON file is shipped in the working_dir, which the cluster stores: one that
    holds a secret-looking key is refused here, before it leaves this machine."""
    if "deepspeed.config" in files:
        from launcher.recipe.ds_config import load_base_config, refuse_secrets

        refuse_secrets(*load_base_config(recipe.deepspeed.config))


def _exists(value: str) -> bool:
    try:
        return Path(value).exists()
    except OSError:  # inline text (a chat template) too long to be a path
        return False


def recipe_in_working_dir(recipe_path: Path) -> Path:
    """Where the recipe lies in the working_dir: its path here if under the current
    directory, else its file name."""
    try:
        return recipe_path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return Path(recipe_path.name)


def entrypoint(recipe_rel: Path, overrides: Sequence[str], output_dir: str | None) -> str:
    command = ["ftlaunch", str(recipe_rel)]
    for item in overrides:
        command += ["--set", item]
    if output_dir:
        command.append(f"--output-dir={output_dir}")  # a leading '-' stays a value
    return shlex.join(command)


@contextmanager
def staged_working_dir(
    recipe_path: Path, recipe_rel: Path, files: Mapping[str, Path]
) -> Iterator[Path]:
    """A temporary directory with the recipe and ``files`` at their relative paths."""
    with tempfile.TemporaryDirectory(prefix="ftlaunch-job-") as tmp:
        root = Path(tmp)
        for source, rel in [(recipe_path, recipe_rel), *((p, p) for p in files.values())]:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(source).is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                shutil.copy2(source, target)
        yield root


def build_job(
    recipe: Recipe,
    recipe_rel: Path,
    overrides: Sequence[str],
    output_dir: str | None,
    working_dir: Path,
    pip: Sequence[str],
    env: Mapping[str, str],
    submission: str | None,
) -> JobSpec:
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir)}
    if pip:
        runtime_env["pip"] = list(pip)
    if env:
        runtime_env["env_vars"] = dict(env)
    return JobSpec(
        submission_id=submission or submission_id(recipe),
        entrypoint=entrypoint(recipe_rel, overrides, output_dir),
        runtime_env=runtime_env,
        metadata={"ftlaunch_recipe": str(recipe_rel), "ftlaunch_output_dir": recipe.output_dir},
    )
