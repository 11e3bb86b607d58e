"""Ray Jobs: ``ftlaunch submit`` sends ``ftlaunch RECIPE`` to a cluster's job server, and
``ftlaunch jobs`` lists, follows and stops jobs.

The job's working_dir holds the recipe and the local files it references, at the same relative
paths, so the entrypoint resolves them as it would here. Absolute paths are not shipped: they
name storage on the cluster. Secrets are never shipped: a runtime_env and job metadata are
stored in plain text and shown by the dashboard, so secrets come from the environment of the
Ray nodes. The submission id defaults to a hash of the validated recipe, so submitting the
same recipe twice gives one job.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import urlparse

from launcher.errors import UserInputError
from launcher.recipe import Recipe, load_recipe
from launcher.recipe.secrets import SECRETS_HELP, is_secret_name

ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
STOP_TIMEOUT_S = 60.0
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class JobSpec:
    """What is sent to the job server, apart from the working_dir's contents."""

    submission_id: str
    entrypoint: str
    runtime_env: Mapping[str, Any]
    metadata: Mapping[str, str]


# ---------------------------------------------------------------- where and how safely


def job_server_address(address: str | None) -> str:
    """``--address``, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, as an http(s) URL."""
    address = address or next((os.environ[k] for k in ADDRESS_ENV if os.environ.get(k)), None)
    if not address:
        raise UserInputError(
            "--address", "the Ray job server to use, e.g. http://HEAD:8265 (or set RAY_ADDRESS)"
        )
    if "://" not in address:
        address = f"http://{address}"
    url = urlparse(address)
    if url.username is not None or url.password is not None:
        raise UserInputError(
            "--address",
            "has credentials in the URL, which would be printed and logged; give the address "
            "alone and the token in RAY_AUTH_TOKEN",
        )
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserInputError(
            "--address", f"'{address}' is not a job server URL such as http://HEAD:8265"
        )
    return address


def is_loopback(address: str) -> bool:
    host = urlparse(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_auth_problem(env: Mapping[str, str]) -> str | None:
    """Why this client would not use Ray token authentication, or None when it would."""
    if env.get("RAY_AUTH_MODE", "").lower() != "token":
        return "RAY_AUTH_MODE is not 'token'"
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return None
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if path.is_file() and path.read_text().strip():
        return None
    return f"no token was found (RAY_AUTH_TOKEN is unset and {path} holds none)"


def check_transport(address: str, insecure: bool, env: Mapping[str, str]) -> None:
    """Refuse, before any connection, to talk to another machine's job server over plain
    http:// (the token and the job would cross the network readable by anyone on the path) or
    without token auth. ``--insecure`` allows both."""
    if insecure or is_loopback(address):
        return
    if urlparse(address).scheme != "https":
        raise UserInputError(
            "--address",
            f"{address} is another machine over plain http://: the Ray token in every request, "
            "the recipe and the logs would cross the network unencrypted. Use an SSH tunnel "
            "(ssh -L 8265:localhost:8265 HEAD, then --address http://127.0.0.1:8265) or an "
            "https:// proxy in front of the job server; see 'Submitting from your laptop' in "
            "README.md. On a network you trust, --insecure connects anyway.",
        )
    problem = token_auth_problem(env)
    if problem:
        raise UserInputError(
            "--address",
            f"{address} is another machine and {problem}. Ray's job server runs any command "
            "it is sent for whoever reaches it, so ftlaunch submits to a remote cluster only "
            "with token authentication: export RAY_AUTH_MODE=token and the cluster's token in "
            "RAY_AUTH_TOKEN (or ~/.ray/auth_token); see 'Submitting from your laptop' in "
            "README.md. On a network you trust, --insecure submits anyway.",
        )


def check_cluster_address(address: str | None, insecure: bool, env: Mapping[str, str]) -> None:
    """``train``/``preflight --address`` (else RAY_ADDRESS): a Ray cluster to join, checked
    before any connection. Credentials in it are refused (it is printed and logged), as is a
    job server URL (http://, https://: that is ``ftlaunch submit``'s). ``ray://`` (Ray Client)
    to another machine is plain gRPC carrying the token, the job and its data, so it needs
    Ray's TLS (RAY_USE_TLS=1) or ``--insecure``. ``HOST:PORT`` (the GCS) and ``auto`` join
    the cluster as one of its nodes would, from a machine inside its network."""
    where = "--address" if address else "RAY_ADDRESS"
    address = address or env.get("RAY_ADDRESS") or ""
    if address in ("", "auto", "local"):
        return
    scheme, sep, _ = address.partition("://")
    url = urlparse(address if sep else f"gcs://{address}")
    if "@" in url.netloc:
        raise UserInputError(
            where, "has credentials in the address, which would be printed and logged; give "
            "the address alone and the token in RAY_AUTH_TOKEN",
        )  # fmt: skip
    if sep and scheme.lower() in ("http", "https"):
        raise UserInputError(
            where, f"'{address}' is a job server URL; to train on that cluster from here use "
            f"'ftlaunch submit RECIPE --address {address}', or give the cluster's own address "
            "(HEAD:6379 on a node of the cluster, or ray://HEAD:10001)",
        )  # fmt: skip
    try:
        port = url.port
    except ValueError:
        port = None
    if (sep and scheme != "ray") or not url.hostname or port is None:
        raise UserInputError(
            where, f"'{address}' is not a Ray cluster address such as HEAD:6379, "
            "ray://HEAD:10001 or auto",
        )  # fmt: skip
    tls = env.get("RAY_USE_TLS", "").lower() in ("1", "true")
    if scheme == "ray" and not (insecure or tls or is_loopback(address)):
        raise UserInputError(
            where, f"{address} is another machine over Ray Client without TLS: the Ray token, "
            "the recipe and the logs would cross the network unencrypted. Use an SSH tunnel "
            "(ssh -L 10001:localhost:10001 HEAD, then --address ray://127.0.0.1:10001), Ray's "
            "TLS (RAY_USE_TLS=1), or 'ftlaunch submit'; on a network you trust, --insecure "
            "connects anyway.",
        )  # fmt: skip


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``--env KEY=VALUE`` pairs; secret names are refused."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise UserInputError(f"--env {name}" if name else "--env", "expected KEY=VALUE")
        if is_secret_name(name):
            raise UserInputError(
                f"--env {name}",
                "looks like a secret and is not sent with the job (a job's runtime_env is "
                f"stored in plain text and shown by the dashboard); {SECRETS_HELP}",
            )
        env[name] = value
    return env


# ---------------------------------------------------------------- what is sent


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


# ---------------------------------------------------------------- the job server


def connect(address: str) -> Any:
    """A JobSubmissionClient, with the reason in the message when the server refuses us."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        first = str(e).strip().splitlines()[0]
        raise UserInputError(
            "--address",
            f"{address} refused the request ({first}): export RAY_AUTH_MODE=token and the "
            "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token",
        ) from None
    except ConnectionError as e:
        raise UserInputError("--address", f"cannot reach a Ray job server: {e}") from None


def job_info(client: Any, job_id: str) -> Any | None:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            return None
        raise


def submit_job(client: Any, job: JobSpec) -> bool:
    """Submit; False when a job with this submission id already exists (Ray answers a
    repeated id with an HTTP 500, so the id is looked up rather than the error parsed)."""
    try:
        client.submit_job(
            entrypoint=job.entrypoint,
            submission_id=job.submission_id,
            runtime_env=dict(job.runtime_env),
            metadata=dict(job.metadata),
            entrypoint_num_cpus=0,
        )
        return True
    except RuntimeError:
        if job_info(client, job.submission_id) is not None:
            return False
        raise


def follow(client: Any, job_id: str) -> str:
    """Print the job's logs as they come until it ends; its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    return wait_terminal(client, job_id, timeout_s=STOP_TIMEOUT_S)


def wait_terminal(client: Any, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal() or time.monotonic() > deadline:
            return str(status.value)
        time.sleep(0.5)


def outcome(client: Any, job_id: str, status: str) -> int:
    """Exit code for a finished job: 0 SUCCEEDED, 1 otherwise (with Ray's message)."""
    if status == "SUCCEEDED":
        print(f"[ftlaunch] job {job_id} SUCCEEDED", file=sys.stderr)
        return 0
    message = getattr(job_info(client, job_id), "message", "") or ""
    print(f"ftlaunch: job {job_id} {status}: {message}".rstrip(": "), file=sys.stderr)
    return 1


# ---------------------------------------------------------------- commands


def _address_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="job server URL: http://127.0.0.1:8265 through an SSH tunnel, or https://HEAD "
        "(default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="talk to another machine over plain http:// or without Ray token authentication",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ftlaunch submit``."""
    add = parser.add_argument
    add("recipe", help="the YAML recipe (relative paths in it are relative to this directory)")
    add(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field; passed on to the job's ftlaunch (repeatable)",
    )
    add(
        "--output-dir", help="override output_dir: an absolute path on the cluster's shared storage"
    )
    _address_args(parser)
    add(
        "--wait",
        action="store_true",
        help="follow the job's logs and exit with its outcome (0 SUCCEEDED, 1 FAILED or STOPPED)",
    )
    add(
        "--submission-id",
        metavar="ID",
        help="job id (default: derived from the recipe, so a resubmission is a no-op)",
    )
    add(
        "--pip",
        action="append",
        default=[],
        metavar="REQ",
        help="pip requirement installed for the job (runtime_env pip; repeatable)",
    )
    add(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the job (not secrets; repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    """``ftlaunch submit``: 0 once submitted (or with --wait: the job's outcome), 2 on bad input."""
    address = job_server_address(args.address)
    check_transport(address, args.insecure, os.environ)
    env = parse_env(args.env)
    recipe = load_recipe(args.recipe, args.set, args.output_dir)
    if not PurePath(recipe.output_dir).is_absolute():
        raise UserInputError(
            "output_dir",
            f"'{recipe.output_dir}' is relative: in a job it would land in the job's temporary "
            "working_dir on the head node; pass --output-dir with an absolute path on storage "
            "every node mounts",
        )
    recipe_path = Path(args.recipe)
    recipe_rel = recipe_in_working_dir(recipe_path)
    files = local_files(recipe)
    refuse_shipped_secrets(recipe, files)
    client = connect(address)
    with staged_working_dir(recipe_path, recipe_rel, files) as working_dir:
        job = build_job(
            recipe,
            recipe_rel,
            args.set,
            args.output_dir,
            working_dir,
            args.pip,
            env,
            args.submission_id,
        )
        created = submit_job(client, job)
    job_id = job.submission_id
    if created:
        shipped = ", ".join(str(p) for p in [recipe_rel, *files.values()])
        print(f"[ftlaunch] submitted {job.entrypoint} (working_dir: {shipped})", file=sys.stderr)
    else:
        status = client.get_job_status(job_id).value
        print(
            f"[ftlaunch] job {job_id} was already submitted ({status}); not submitting it again "
            "(to run again, resuming from its last checkpoint: --submission-id NEW_ID)",
            file=sys.stderr,
        )
    print(job_id)
    if not args.wait:
        print(
            f"[ftlaunch] follow it: ftlaunch jobs logs {job_id} --follow --address {address}"
            + (" --insecure" if args.insecure else ""),
            file=sys.stderr,
        )
        return 0
    return outcome(client, job_id, follow(client, job_id))


def add_jobs_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ftlaunch jobs list|status|logs|stop``."""
    sub = parser.add_subparsers(dest="jobs_command", required=True)
    _address_args(sub.add_parser("list", help="all jobs on the cluster"))
    for name, text in (
        ("status", "a job's status"),
        ("logs", "a job's logs"),
        ("stop", "stop a job"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("job_id", metavar="ID", help="the submission id")
        _address_args(command)
        if name == "logs":
            command.add_argument("--follow", action="store_true", help="follow until the job ends")


def run_jobs(args: argparse.Namespace) -> int:
    address = job_server_address(args.address)
    check_transport(address, args.insecure, os.environ)
    client = connect(address)
    if args.jobs_command == "list":
        print(format_jobs(client.list_jobs()))
        return 0
    info = job_info(client, args.job_id)
    if info is None:
        raise UserInputError(args.job_id, f"no such job at {address}")
    if args.jobs_command == "status":
        message = f": {info.message}" if info.message else ""
        print(f"{args.job_id}: {info.status.value}{message}")
        return 0
    if args.jobs_command == "logs":
        if args.follow:
            return outcome(client, args.job_id, follow(client, args.job_id))
        sys.stdout.write(client.get_job_logs(args.job_id))
        return 0
    if not info.status.is_terminal():
        client.stop_job(args.job_id)
    status = wait_terminal(client, args.job_id, STOP_TIMEOUT_S)
    print(f"{args.job_id}: {status}")
    return 0 if status in ("STOPPED", "SUCCEEDED", "FAILED") else 1


def format_jobs(jobs: Sequence[Any]) -> str:
    """Submitted jobs, oldest first (drivers started by hand have no submission id to act on)."""
    rows = [["ID", "STATUS", "STARTED", "ENTRYPOINT"]]
    for job in sorted((j for j in jobs if j.submission_id), key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000))
        rows.append([job.submission_id, job.status.value, started, job.entrypoint])
    widths = [max(len(r[i]) for r in rows) for i in range(3)]  # the entrypoint is not padded
    return "\n".join("  ".join([*(r[i].ljust(widths[i]) for i in range(3)), r[3]]) for r in rows)
