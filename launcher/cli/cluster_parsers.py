"""The parsers of the cluster commands: ``ftlaunch k8s`` (KubeRay manifests), ``preflight``,
``submit`` and ``jobs`` (Ray Jobs)."""

from __future__ import annotations

import argparse

from launcher.jobs.k8s.options import DEFAULT_SECRET


def _more_than_zero(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return value


def add_k8s_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ftlaunch k8s``: the recipe, the image and where the job runs; then the
    pods' environment, their sizes and the output."""
    add = parser.add_argument
    add("recipe", help="Recipe YAML file.")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a recipe field.")
    add(
        "--image",
        metavar="IMAGE",
        help="Training image (default ftlaunch:latest); see cluster/Dockerfile.",
    )
    add("--namespace", metavar="NS", help="Kubernetes namespace (default: default).")
    add("--name", help="RayJob name (default: derived from output_dir or the recipe file).")
    add(
        "--nodes",
        type=_more_than_zero,
        metavar="N",
        help="Worker pods (default: what num_workers needs).",
    )
    add(
        "--gpus-per-node",
        type=_more_than_zero,
        metavar="N",
        help="GPUs per worker pod (CPU recipes: workers per pod); default min(8, num_workers).",
    )
    add(
        "--pvc",
        metavar="NAME",
        help="ReadWriteMany PersistentVolumeClaim for the run directory, mounted in every pod "
        "(required unless output_dir is an absolute path on storage you mount yourself).",
    )
    add("--pvc-mount", metavar="PATH", help="Where the PVC is mounted (default /mnt/shared).")
    add(
        "--queue",
        metavar="NAME",
        help="Kueue LocalQueue: the job is created suspended and Kueue admits it.",
    )
    _k8s_env_arguments(parser)
    _k8s_pod_arguments(parser)


def _k8s_env_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--secret",
        action="append",
        nargs="?",
        const=DEFAULT_SECRET,
        metavar="ENV=SECRET/KEY",
        help=f"Env var from a Kubernetes Secret; bare --secret means {DEFAULT_SECRET}.",
    )
    add(
        "--nccl-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Extra environment for every pod, e.g. NCCL_SOCKET_IFNAME=eth0.",
    )
    add(
        "--node-selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Node label worker pods require.",
    )
    add(
        "--toleration",
        action="append",
        default=[],
        metavar="KEY[=VALUE][:EFFECT]",
        help="Taint worker pods tolerate, e.g. nvidia.com/gpu:NoSchedule.",
    )


def _k8s_pod_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--head-cpu", metavar="CPU", help="Head pod CPUs (default 4).")
    add("--head-memory", metavar="MEM", help="Head pod memory (default 16Gi).")
    add(
        "--worker-cpu",
        metavar="CPU",
        help="CPUs per worker pod (default 8 per GPU, or cpus_per_worker each).",
    )
    add(
        "--worker-memory",
        metavar="MEM",
        help="Memory per worker pod (default 32Gi per GPU, 4Gi per CPU).",
    )
    add("--shm-size", metavar="MEM", help="Size limit of the in-memory /dev/shm (default 64Gi).")
    add(
        "--backoff-limit",
        type=int,
        metavar="N",
        help="Retries of a failed job; each resumes (default 2).",
    )
    add(
        "--ttl",
        dest="ttl_seconds_after_finished",
        type=int,
        metavar="SECONDS",
        help="Seconds a finished job's cluster is kept (default 3600).",
    )
    add(
        "--active-deadline",
        dest="active_deadline_seconds",
        type=_more_than_zero,
        metavar="SECONDS",
        help="Seconds before the job is stopped.",
    )
    add(
        "--open-dashboard",
        action="store_true",
        default=None,
        help="Render the Ray cluster without token authentication and without the "
        "NetworkPolicy: anyone who reaches the head can run code in the pods and read their "
        "secrets. Default: closed.",
    )
    add("--out", metavar="FILE", help="Write the manifests here instead of stdout.")


def add_preflight_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ftlaunch preflight``."""
    parser.add_argument("recipe", help="the YAML recipe")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set resources.num_workers=16 (repeatable)",
    )
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument(
        "--address",
        help="Ray cluster to join: HEAD:6379 on a node of it, ray://HEAD:10001 "
        "(default: RAY_ADDRESS, else a private local Ray)",
    )
    parser.add_argument(
        "--insecure", action="store_true",
        help="join another machine over ray:// without Ray's TLS",
    )


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


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
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
