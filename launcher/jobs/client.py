"""The Ray job server: connect (saying why it refuses), submit once per id, follow the logs,
wait for the end, and the exit code and listing of jobs."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from launcher.errors import UserInputError
from launcher.jobs.package import JobSpec

STOP_TIMEOUT_S = 60.0


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


def format_jobs(jobs: Sequence[Any]) -> str:
    """Submitted jobs, oldest first (drivers started by hand have no submission id to act on)."""
    rows = [["ID", "STATUS", "STARTED", "ENTRYPOINT"]]
    for job in sorted((j for j in jobs if j.submission_id), key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000))
        rows.append([job.submission_id, job.status.value, started, job.entrypoint])
    widths = [max(len(r[i]) for r in rows) for i in range(3)]  # the entrypoint is not padded
    return "\n".join("  ".join([*(r[i].ljust(widths[i]) for i in range(3)), r[3]]) for r in rows)
