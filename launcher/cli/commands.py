"""One function per subcommand: the parsed arguments handed to the layer that does the work."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any


def load(args: argparse.Namespace):  # -> Recipe
    from launcher.recipe import load_recipe

    return load_recipe(args.recipe, args.set, args.output_dir)


def cmd_check(args: argparse.Namespace) -> int:
    import yaml

    from launcher.driver.trackers import require
    from launcher.driver.locations import recipe_locations
    from launcher.driver.prepare import prepare, prepare_offline
    from launcher.driver.show import show
    from launcher.errors import UserInputError

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
    from launcher.driver.launch import TrainRequest, train

    def fit_warning(recipe, on_ray: bool) -> None:
        from launcher.plan.command import warn_before_launch  # imports torch: not before Ray

        warn_before_launch(recipe, on_ray)

    request = TrainRequest(
        args.recipe, tuple(args.set), args.output_dir, args.backend, args.address,
        args.insecure, args.allow_recipe_change, not args.no_progress, tuple(args.argv),
    )
    return train(request, fit_warning)


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.run.export import export_run, export_stored

    out = args.out.expanduser() if args.out is not None else None  # '~/x' quoted, as a shell would
    if isinstance(args.run_dir, str):  # s3:// or gs://
        print(export_stored(args.run_dir, out, args.checkpoint, args.merge_lora))
        return 0
    out = export_run(args.run_dir.expanduser(), out, args.checkpoint, args.merge_lora)
    print(out)
    return 0


def local_copy(run_dir: Any) -> Any:  # Path | str -> Path
    """A run directory on disk; an object-store run's small files pulled into its mirror."""
    from launcher.run import sync
    from launcher.run.store import mirror_dir, store_for

    if not isinstance(run_dir, str):
        return run_dir
    mirror = mirror_dir(run_dir)
    sync.pull(store_for(run_dir), mirror, sync.run_files(mirror))
    return mirror


def cmd_plot(args: argparse.Namespace) -> int:
    from launcher.report import plot

    run_dirs = [local_copy(run_dir) for run_dir in args.run_dirs]
    out = plot.default_out(run_dirs, args.out)
    for path in plot.save(plot.figures(run_dirs), out):
        print(path)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from launcher.report import runs

    print(runs.run(args.root, args.json))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from launcher.report import chat

    return chat.run(args.run_dir, args.prompt, args.max_new_tokens)


def k8s_options(args: argparse.Namespace) -> Any:  # -> K8sOptions
    """K8sOptions from the ``ftlaunch k8s`` flags; flags left out keep the K8sOptions defaults."""
    from launcher.jobs.k8s import K8sOptions, SecretRef, pairs, parse_toleration

    structured = {"secrets", "nccl_env", "node_selector", "tolerations"}
    given = {
        f.name: getattr(args, f.name)
        for f in fields(K8sOptions)
        if f.name not in structured and getattr(args, f.name, None) is not None
    }
    return K8sOptions(
        **given,
        secrets=tuple(SecretRef.parse(s) for s in args.secret or ()),
        nccl_env=pairs(args.nccl_env, "--nccl-env"),
        node_selector=pairs(args.node_selector, "--node-selector"),
        tolerations=tuple(parse_toleration(t) for t in args.toleration),
    )


def cmd_k8s(args: argparse.Namespace) -> int:
    from launcher.jobs import k8s

    return k8s.run(args.recipe, args.set, k8s_options(args), args.out)


def cmd_preflight(args: argparse.Namespace) -> int:
    from launcher.driver import preflight

    return preflight.run(args.recipe, args.set, args.output_dir, args.address, args.insecure)


def cmd_submit(args: argparse.Namespace) -> int:
    from launcher.jobs import submit

    request = submit.SubmitRequest(
        args.recipe, tuple(args.set), args.output_dir, args.address, args.insecure, args.wait,
        args.submission_id, tuple(args.pip), tuple(args.env),
    )
    return submit.run(request)


def cmd_jobs(args: argparse.Namespace) -> int:
    from launcher.jobs import submit

    return submit.run_jobs(
        args.jobs_command, getattr(args, "job_id", None), args.address, args.insecure,
        getattr(args, "follow", False),
    )


COMMANDS = {
    "train": cmd_train, "check": cmd_check, "export": cmd_export, "plan": cmd_plan,
    "k8s": cmd_k8s, "preflight": cmd_preflight, "submit": cmd_submit, "jobs": cmd_jobs,
    "plot": cmd_plot, "runs": cmd_runs, "chat": cmd_chat,
}
