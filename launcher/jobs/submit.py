"""Ray Jobs: ``ftlaunch submit`` sends ``ftlaunch RECIPE`` to a cluster's job server, and
``ftlaunch jobs`` lists, follows and stops jobs.

The job's working_dir holds the recipe and the local files it references, at the same relative
paths, so the entrypoint resolves them as it would here. Absolute paths are not shipped: they
name storage on the cluster. Secrets are never shipped: a runtime_env and job metadata are
stored in plain text and shown by the dashboard, so secrets come from the environment of the
Ray nodes. The submission id defaults to a hash of the validated recipe, so submitting the
same recipe twice gives one job.

The parts: ``address`` (where the job server is, and whether talking to it is safe),
``package`` (what a job carries), ``client`` (the job server's calls); this module holds the
two commands.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path, PurePath

from launcher.errors import UserInputError
from launcher.recipe.output_dir import is_uri
from launcher.recipe import load_recipe
from launcher.jobs.address import check_cluster_address, check_transport, job_server_address
from launcher.jobs.client import (
    STOP_TIMEOUT_S, connect, follow, format_jobs, job_info, outcome, submit_job, wait_terminal,
)
from launcher.jobs.package import (
    build_job, local_files, parse_env, recipe_in_working_dir, refuse_shipped_secrets,
    staged_working_dir, submission_id,
)

__all__ = [
    "build_job", "check_cluster_address", "check_transport", "local_files", "parse_env",
    "recipe_in_working_dir", "run", "run_jobs", "SubmitRequest", "staged_working_dir", "submission_id",
]


@dataclass(frozen=True)
class SubmitRequest:
    """What ``ftlaunch submit`` was asked, as parsed."""

    recipe: str
    overrides: tuple[str, ...] = ()
    output_dir: str | None = None
    address: str | None = None
    insecure: bool = False
    wait: bool = False
    submission_id: str | None = None
    pip: tuple[str, ...] = ()
    env: tuple[str, ...] = ()


def run(req: SubmitRequest) -> int:
    """``ftlaunch submit``: 0 once submitted (or with --wait: the job's outcome), 2 on bad input."""
    address = job_server_address(req.address)
    check_transport(address, req.insecure, os.environ)
    env = parse_env(req.env)
    recipe = load_recipe(req.recipe, req.overrides, req.output_dir)
    if not is_uri(recipe.output_dir) and not PurePath(recipe.output_dir).is_absolute():
        raise UserInputError(
            "output_dir",
            f"'{recipe.output_dir}' is relative: in a job it would land in the job's temporary "
            "working_dir on the head node; pass --output-dir with an absolute path on storage "
            "every node mounts",
        )
    recipe_path = Path(req.recipe)
    recipe_rel = recipe_in_working_dir(recipe_path)
    files = local_files(recipe)
    refuse_shipped_secrets(recipe, files)
    client = connect(address)
    with staged_working_dir(recipe_path, recipe_rel, files) as working_dir:
        job = build_job(
            recipe,
            recipe_rel,
            req.overrides,
            req.output_dir,
            working_dir,
            req.pip,
            env,
            req.submission_id,
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
    if not req.wait:
        print(
            f"[ftlaunch] follow it: ftlaunch jobs logs {job_id} --follow --address {address}"
            + (" --insecure" if req.insecure else ""),
            file=sys.stderr,
        )
        return 0
    return outcome(client, job_id, follow(client, job_id))


def run_jobs(
    command: str, job_id: str | None, address: str | None, insecure: bool, follow_logs: bool
) -> int:
    """``ftlaunch jobs list|status|logs|stop``."""
    address = job_server_address(address)
    check_transport(address, insecure, os.environ)
    client = connect(address)
    if command == "list":
        print(format_jobs(client.list_jobs()))
        return 0
    info = job_info(client, job_id)
    if info is None:
        raise UserInputError(job_id, f"no such job at {address}")
    if command == "status":
        message = f": {info.message}" if info.message else ""
        print(f"{job_id}: {info.status.value}{message}")
        return 0
    if command == "logs":
        if follow_logs:
            return outcome(client, job_id, follow(client, job_id))
        sys.stdout.write(client.get_job_logs(job_id))
        return 0
    if not info.status.is_terminal():
        client.stop_job(job_id)
    status = wait_terminal(client, job_id, STOP_TIMEOUT_S)
    print(f"{job_id}: {status}")
    return 0 if status in ("STOPPED", "SUCCEEDED", "FAILED") else 1
