"""The ``ftlaunch`` command: argument parsing and exit codes, nothing else.

Exit codes: 0 success, 1 training failure, 2 invalid recipe, data or arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from launcher.errors import ExportError, UserInputError

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
    export.add_argument("run_dir", type=Path)
    export.add_argument("--checkpoint", type=int, metavar="STEP", help="default: newest")
    export.add_argument("--merge-lora", action="store_true", help="merge the adapter into the base")
    export.add_argument("--out", type=Path, help="default: RUN_DIR/final")
    add_plan_arguments(
        sub.add_parser("plan", help="per-GPU memory of each ZeRO choice, before launch")
    )
    _report_parsers(sub)
    from launcher.jobs import k8s
    from launcher.driver import preflight
    from launcher.jobs import submit

    k8s.add_arguments(sub.add_parser("k8s", help="print a KubeRay RayJob manifest"))
    preflight.add_arguments(
        sub.add_parser("preflight", help="check every node of a Ray cluster against a recipe")
    )
    submit.add_arguments(sub.add_parser("submit", help="submit a recipe as a Ray job"))
    submit.add_jobs_arguments(sub.add_parser("jobs", help="list, follow or stop Ray jobs"))
    return parser


def _report_parsers(sub: Any) -> None:
    plot = sub.add_parser("plot", help="draw a run's metrics (or several runs', overlaid) as PNGs")
    plot.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", type=Path, help="default: RUN_DIR/plots (required for several runs)")
    runs = sub.add_parser("runs", help="list the runs under a directory and their status")
    runs.add_argument("root", type=Path, metavar="DIR")
    runs.add_argument("--json", action="store_true", help="one JSON object per run")
    chat = sub.add_parser("chat", help="talk to a run's exported model (final/)")
    chat.add_argument("run_dir", type=Path)
    chat.add_argument("--prompt", help="answer this one prompt and exit (default: read stdin lines)")
    chat.add_argument("--max-new-tokens", type=int, default=128)


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


def load(args: argparse.Namespace):  # -> Recipe
    from launcher.recipe import load_recipe

    return load_recipe(args.recipe, args.set, args.output_dir)


def cmd_check(args: argparse.Namespace) -> int:
    import yaml

    from launcher.driver.trackers import require
    from launcher.driver.prepare import prepare, prepare_offline, recipe_locations
    from launcher.driver.show import show

    if args.show and args.offline:
        raise UserInputError("--show", "needs the tokenizer and the data; drop --offline")
    with recipe_locations(args.recipe, args.set, args.output_dir):
        recipe = load(args)
        require(recipe, args.recipe)
        if args.offline:
            recipe, ds_config = prepare_offline(recipe)
        else:
            prepared = prepare(recipe)
            recipe, ds_config = prepared.recipe, prepared.ds_config
    if not args.offline:
        for name, stats in prepared.data.stats.items():
            print(f"# {stats.summary(name)}", file=sys.stderr)
    print("# resolved recipe")
    print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    print("# DeepSpeed config")
    print(json.dumps(ds_config, indent=2))
    if args.show:
        show(recipe, prepared.data, args.show)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Exit 0 when a choice fits, 1 when none does, 2 on bad input."""
    from launcher.plan.command import PlanRequest, run

    request = PlanRequest(args.gpus, args.nodes, args.gpu_mem, args.address, args.json, args.mfu)
    return run(load(args), request)


def cmd_train(args: argparse.Namespace) -> int:
    from launcher.driver import console, stop
    from launcher.driver.hang import HangWatcher
    from launcher.driver.trackers import require
    from launcher.driver.prepare import prepare, recipe_locations
    from launcher.report import liveness
    from launcher.run.rundir import check_resumable
    from launcher.jobs.submit import check_cluster_address

    if args.backend == "torchrun" and args.address:
        raise UserInputError("--address", "the torchrun backend runs on this machine only; "
                             "drop --address, or use --backend ray to join a cluster")
    if args.backend == "ray":
        check_cluster_address(args.address, args.insecure, os.environ)
    with recipe_locations(args.recipe, args.set, args.output_dir):
        recipe = load(args)
        require(recipe, args.recipe)  # before anything starts
        prepared = prepare(recipe)
    recipe = prepared.recipe
    run_dir = Path(recipe.output_dir)
    resuming = check_resumable(run_dir, recipe, args.allow_recipe_change)
    stop.clear(run_dir)
    cp = recipe.checkpoint
    with liveness.Driver(run_dir) as driver, console.routed(), \
            HangWatcher(run_dir, recipe.resources):
        with stop.Signals(run_dir, cp.on_preempt, cp.preempt_grace_s) as signals:
            if args.backend == "torchrun":
                progress = not args.no_progress and recipe.logging.progress
                code = train_torchrun(prepared, run_dir, signals, driver, progress)
            else:
                code = train_ray(args, prepared, run_dir, resuming, signals, driver)
        if signals.stopping:
            return report_stop(signals, run_dir, args.argv)
        if code != 0:
            driver.fail("training failed")
            return code
        from launcher.run.export import export_run
        print(f"[ftlaunch] model exported and verified: {export_run(run_dir)}", file=sys.stderr)
    return code


def train_torchrun(prepared, run_dir: Path, signals, driver, progress: bool = False) -> int:
    from launcher.driver import orchestrate
    from launcher.driver.trackers import tracking
    from launcher.run.rundir import write_run_files
    from launcher.plan.command import warn_before_launch

    warn_before_launch(prepared.recipe, on_ray=False)
    write_run_files(run_dir, prepared.recipe, prepared.ds_config)
    driver.claim()
    if signals.stopping:
        return 0
    with tracking(prepared.recipe, run_dir) as trackers:
        code = orchestrate.run_torchrun(prepared.recipe, run_dir, signals, [trackers], progress)
        if trackers:
            trackers.status = "killed" if signals.stopping else "failed" if code else "finished"
    if code != 0 and not signals.stopping:
        print(f"ftlaunch: training failed (the workers' output is in {run_dir / 'driver.log'})",
              file=sys.stderr)
        return 1
    return 0


def train_ray(
    args: argparse.Namespace, prepared, run_dir: Path, resuming: bool, signals, driver
) -> int:
    from launcher.driver import orchestrate, preflight
    from launcher.driver.trackers import tracking
    from launcher.plan.command import warn_before_launch
    from launcher.run.rundir import write_run_files

    recipe = prepared.recipe
    try:
        connected_here = orchestrate.connect(args.address, recipe)
    except SystemExit as raised:
        # ray.init installs, for its whole start-up, a SIGTERM handler that exits 15.
        if raised.code != signal.SIGTERM:
            raise
        import ray

        signals.deliver(signal.SIGTERM)
        ray.shutdown()
        return 0
    signals.reclaim()
    try:
        if signals.stopping:
            return 0
        orchestrate.check_capacity(recipe)
        preflight.check_multi_node(recipe)
        warn_before_launch(recipe, on_ray=True)
        write_run_files(run_dir, recipe, prepared.ds_config)
        driver.claim()
        if signals.stopping:
            return 0
        print(f"[ftlaunch] {'resuming' if resuming else 'starting'} run in {run_dir}", file=sys.stderr)
        trainer = orchestrate.make_trainer(recipe, prepared.ds_config, run_dir)
        with tracking(recipe, run_dir) as trackers:
            orchestrate.fit(
                trainer, run_dir, not args.no_progress and recipe.logging.progress,
                recipe.checkpoint.max_failures, signals, [trackers],
            )
            if trackers:
                trackers.status = "killed" if signals.stopping else "finished"
    except orchestrate.TrainingFailed as e:
        print(f"ftlaunch: training failed: {e}", file=sys.stderr)
        return 1
    finally:
        if connected_here:
            import ray

            ray.shutdown()
    return 0


def report_stop(signals, run_dir: Path, argv: list[str]) -> int:
    """After a signal: say what was kept and the command that continues the run."""
    from launcher.checkpoint.commit import committed
    from launcher.driver.stop import resume_command

    done = committed(run_dir) if run_dir.is_dir() else []
    kept = f"newest committed checkpoint: step {done[0].step}" if done else "no checkpoint yet"
    print(f"ftlaunch: {signals.how()}; {kept}. To resume, run:\n  {resume_command(argv)}",
          file=sys.stderr)
    return signals.exit_code()


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.run.export import export_run

    out = args.out.expanduser() if args.out is not None else None  # '~/x' quoted, as a shell would
    out = export_run(args.run_dir.expanduser(), out, args.checkpoint, args.merge_lora)
    print(out)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from launcher.report import plot

    out = plot.default_out(args.run_dirs, args.out)
    for path in plot.save(plot.figures(args.run_dirs), out):
        print(path)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from launcher.report import runs

    print(runs.run(args.root, args.json))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from launcher.report import chat

    return chat.run(args.run_dir, args.prompt, args.max_new_tokens)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "train")
    args = build_parser().parse_args(argv)
    args.argv = argv
    commands = {
        "train": cmd_train, "check": cmd_check, "export": cmd_export, "plan": cmd_plan,
        "plot": cmd_plot, "runs": cmd_runs, "chat": cmd_chat,
    }
    from launcher.driver.stop import Terminated, resume_command, sigterm_raises

    try:
        with sigterm_raises():
            return dispatch(args, commands)
    except UserInputError as e:
        print(f"ftlaunch: error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"ftlaunch: export failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ftlaunch: interrupted; to resume, run:\n  {resume_command(argv)}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"ftlaunch: terminated (SIGTERM); to resume, run:\n  {resume_command(argv)}",
              file=sys.stderr)
        return 143


def dispatch(args: argparse.Namespace, commands: dict) -> int:
    if args.command == "k8s":
        from launcher.jobs import k8s

        return k8s.run(args)
    if args.command in ("preflight", "submit", "jobs"):
        from launcher.driver import preflight
        from launcher.jobs import submit

        run = {"preflight": preflight.run, "submit": submit.run, "jobs": submit.run_jobs}
        return run[args.command](args)
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
