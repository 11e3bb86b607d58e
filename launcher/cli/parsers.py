"""Every parser of ``ftlaunch``: the subcommands, their flags and the argument types."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.cli.cluster_parsers import (
    add_jobs_arguments, add_k8s_arguments, add_preflight_arguments, add_submit_arguments,
)

SUBCOMMANDS = (
    "train", "check", "export", "plan", "k8s", "preflight", "submit", "jobs", "plot", "runs",
    "chat",
)
SIZE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="the YAML recipe")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set train.lr=1e-4 (repeatable)",
    )
    parser.add_argument("--output-dir", help="override output_dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftlaunch",
        description="Fine-tune a model from one YAML recipe with DeepSpeed ZeRO on Ray Train. "
        "'ftlaunch RECIPE.yaml' is short for 'ftlaunch train RECIPE.yaml'.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (resumes an unfinished run in output_dir)")
    _recipe_args(train)
    train.add_argument(
        "--address",
        help="Ray cluster to join: HEAD:6379 on a node of it, ray://HEAD:10001 "
        "(default: RAY_ADDRESS, else a private local Ray)",
    )
    train.add_argument(
        "--insecure", action="store_true",
        help="join another machine over ray:// without Ray's TLS",
    )
    train.add_argument(
        "--allow-recipe-change", action="store_true",
        help="resume even though fields that matter changed since the run started",
    )
    train.add_argument("--no-progress", action="store_true", help="no live progress line")
    train.add_argument(
        "--backend", choices=("ray", "torchrun"), default="ray",
        help="ray: Ray Train on a Ray cluster (default); torchrun: this machine only, no Ray",
    )
    check = sub.add_parser("check", help="validate and print the resolved recipe and DeepSpeed config")
    _recipe_args(check)
    check.add_argument(
        "--offline", action="store_true",
        help="skip the checks that need the model, tokenizer and data (hub-hosted recipes)",
    )
    check.add_argument("--show", type=positive_int, metavar="N",
                       help="also print N encoded training examples (trained tokens marked)")
    export = sub.add_parser("export", help="write a Hugging Face model directory from a run")
    export.add_argument("run_dir", type=run_location, help="a run directory or s3://, gs:// prefix")
    export.add_argument("--checkpoint", type=int, metavar="STEP", help="default: newest")
    export.add_argument("--merge-lora", action="store_true", help="merge the adapter into the base")
    export.add_argument("--out", type=Path, help="default: RUN_DIR/final")
    add_plan_arguments(
        sub.add_parser("plan", help="per-GPU memory of each ZeRO choice, before launch")
    )
    _report_parsers(sub)
    add_k8s_arguments(sub.add_parser("k8s", help="print a KubeRay RayJob manifest"))
    add_preflight_arguments(
        sub.add_parser("preflight", help="check every node of a Ray cluster against a recipe")
    )
    add_submit_arguments(sub.add_parser("submit", help="submit a recipe as a Ray job"))
    add_jobs_arguments(sub.add_parser("jobs", help="list, follow or stop Ray jobs"))
    return parser


def _report_parsers(sub: Any) -> None:
    plot = sub.add_parser("plot", help="draw a run's metrics (or several runs', overlaid) as PNGs")
    plot.add_argument("run_dirs", type=run_location, nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", type=Path, help="default: RUN_DIR/plots (required for several runs)")
    runs = sub.add_parser("runs", help="list the runs under a directory and their status")
    runs.add_argument("root", type=on_disk("lists run directories on a filesystem"), metavar="DIR")
    runs.add_argument("--json", action="store_true", help="one JSON object per run")
    chat = sub.add_parser("chat", help="talk to a run's exported model (final/)")
    chat.add_argument("run_dir", type=on_disk("loads final/ from a run directory on disk"))
    chat.add_argument("--prompt", help="answer this one prompt and exit (default: read stdin lines)")
    chat.add_argument("--max-new-tokens", type=int, default=128)


def run_location(value: str) -> Path | str:
    """A run directory, or an object-store prefix (kept as text: a Path would fold '//')."""
    from launcher.recipe.output_dir import is_uri, uri_problem

    if not is_uri(value):
        return Path(value)
    problem = uri_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def on_disk(what: str) -> Callable[[str], Path]:
    def parse(value: str) -> Path:
        from launcher.recipe.output_dir import is_uri

        if is_uri(value):
            raise argparse.ArgumentTypeError(
                f"'{value}' is in object storage; this command {what} (copy the run, or its "
                "final/, to a local directory first)"
            )
        return Path(value)

    return parse


def memory_size(text: str) -> int:
    """'80GiB', '24GB', '512MiB' -> bytes (GiB/MiB: powers of 2; GB/MB: powers of 10)."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*", text)
    unit = match and SIZE_UNITS.get(match.group(2).upper())
    if not unit or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a memory size; write a positive number and a unit, e.g. 80GiB, "
            f"24GB ({', '.join(u.replace('I', 'i') for u in SIZE_UNITS)})"
        )
    return int(float(match.group(1)) * unit)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
    return int(text)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a fraction in (0, 1], e.g. 0.4")
    return value


def add_plan_arguments(plan: argparse.ArgumentParser) -> None:
    _recipe_args(plan)
    plan.add_argument(
        "--gpus", type=positive_int,
        help="GPUs per node (default: resources.num_workers on one node)",
    )
    plan.add_argument("--nodes", type=positive_int, help="nodes (default: as many as --gpus needs)")
    plan.add_argument("--gpu-mem", type=memory_size, metavar="SIZE",
                      help="memory of one GPU, e.g. 80GiB (default: the cluster's with "
                      "--address, else 80GiB)")
    plan.add_argument(
        "--address", help="read each node's GPUs and host memory from this Ray cluster"
    )
    plan.add_argument("--mfu", type=fraction, default=0.4,
                      help="assumed model FLOPs utilisation for the time estimate (default 0.4)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of the table")
