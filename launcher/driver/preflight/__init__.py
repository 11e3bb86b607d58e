"""Preflight: check a Ray cluster against a recipe before any worker starts training.

One Ray task per alive node (pinned with NodeAffinitySchedulingStrategy, zero CPUs so it runs
beside anything) reports library versions, GPUs and free disk, and proves the run directory is
shared: the driver writes a token file under ``output_dir/.preflight/`` that every node must
read, and every node writes one that the driver must read (workers write checkpoints there and
the driver exports from it). Then one process on each node that can host a worker joins a
gloo group with the recipe's network settings and times an all-reduce: the path the training
collectives take between nodes. Every failed check names its node.

The parts: ``node`` (the task each node runs), ``verdict`` (the failed checks and the table),
``launcher.driver.nodes`` (pinning a task on a node, gathering the answers); this module runs
them on the connected cluster.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from launcher.errors import UserInputError
from launcher.recipe import Recipe, load_recipe
from launcher.recipe.output_dir import is_uri
from launcher.driver.nodes import Node, alive_nodes, gather, on_node
from launcher.driver.preflight.node import (
    NodeReport, allreduce, inspect_node, read_token, remove_files, share_of, token_path,
    write_token,
)
from launcher.driver.preflight.verdict import AllReduce, Failure, Preflight, evaluate, worker_hosts

__all__ = ["Node", "NodeReport", "Preflight", "check_cluster", "check_multi_node", "evaluate",
           "inspect_node", "run"]

ALLREDUCE_BYTES = 16 << 20
ALLREDUCE_ROUNDS = 3
TIMEOUT_S = 60.0
COLLECTIVE_TIMEOUT_S = 30.0


def check_cluster(recipe: Recipe, timeout_s: float = TIMEOUT_S) -> Preflight:
    """Run every check on the connected Ray cluster. ``recipe.output_dir`` must be absolute."""
    import ray

    nodes = tuple(alive_nodes())
    share = share_of(recipe.output_dir)
    token = uuid.uuid4().hex
    runtime_env = {"env_vars": recipe.resources.worker_env()}
    driver_file = token_path(share, f"driver-{token}")
    try:
        created = write_token(share, f"driver-{token}", token)
    except OSError as e:
        raise UserInputError("output_dir", f"cannot write in {share}: {e}") from None
    reports: dict[str, NodeReport | str] = {}
    try:
        inspect = ray.remote(num_cpus=0)(inspect_node)
        refs = {
            n.node_id: on_node(inspect, n, runtime_env).remote(
                str(share), token, f"{n.node_id}-{token}"
            )
            for n in nodes
        }
        reports = gather(refs, timeout_s)
        seen = {
            node_id: read_token(share, r.token_file.rpartition("/")[2]) is not None
            for node_id, r in reports.items()
            if isinstance(r, NodeReport)
        }
        hosts = [
            n for n in worker_hosts(recipe.resources, nodes) if isinstance(reports[n.node_id], NodeReport)
        ]
        allreduce_result, allreduce_failures = _run_allreduce(hosts, reports, runtime_env)
    finally:
        _cleanup(nodes, reports, runtime_env)
        remove_files([driver_file], created)
    driver_node = ray.get_runtime_context().get_node_id()
    failures = evaluate(recipe, nodes, reports, seen, driver_node) + allreduce_failures
    return Preflight(nodes, reports, allreduce_result, tuple(failures), str(share))


def _run_allreduce(
    hosts: Sequence[Node], reports: Mapping[str, NodeReport | str], runtime_env: Mapping[str, Any]
) -> tuple[AllReduce | None, list[Failure]]:
    import ray

    if len(hosts) < 2:
        return None, []
    first = reports[hosts[0].node_id]
    assert isinstance(first, NodeReport)
    master = f"{hosts[0].ip}:{first.free_port}"
    task = ray.remote(num_cpus=0)(allreduce)
    refs = {
        n.node_id: on_node(task, n, runtime_env).remote(
            master, rank, len(hosts), ALLREDUCE_BYTES, ALLREDUCE_ROUNDS, COLLECTIVE_TIMEOUT_S
        )
        for rank, n in enumerate(hosts)
    }
    results = gather(refs, COLLECTIVE_TIMEOUT_S + 30)
    failures = [
        Failure(n.name, "all-reduce", str(results[n.node_id]))
        for n in hosts
        if isinstance(results[n.node_id], str)
    ]
    if failures:
        return None, failures
    return AllReduce(len(hosts), ALLREDUCE_BYTES, results[hosts[0].node_id]), []


def _cleanup(
    nodes: Sequence[Node], reports: Mapping[str, NodeReport | str], runtime_env: Mapping[str, Any]
) -> None:
    import ray

    remove = ray.remote(num_cpus=0)(remove_files)
    refs = {
        n.node_id: on_node(remove, n, runtime_env).remote([r.token_file], list(r.created_dirs))
        for n in nodes
        if isinstance(r := reports.get(n.node_id), NodeReport)
    }
    gather(refs, timeout_s=30)


def check_multi_node(recipe: Recipe) -> None:
    """Before training on a connected cluster of more than one node: run the checks, print
    the table to stderr, and raise UserInputError if one failed. One node: nothing to do."""
    if len(alive_nodes()) < 2:
        return
    result = check_cluster(recipe)
    print(result.table(), file=sys.stderr)
    result.raise_for_failures("; training was not started")


def run(
    recipe_path: str,
    overrides: Sequence[str],
    output_dir: str | None,
    address: str | None,
    insecure: bool,
) -> int:
    """``ftlaunch preflight``: print the table; exit 0 when every check passed, else 2."""
    import ray

    from launcher.driver import orchestrate
    from launcher.jobs.address import check_cluster_address

    check_cluster_address(address, insecure, os.environ)
    recipe = load_recipe(recipe_path, overrides, output_dir)
    if not is_uri(recipe.output_dir):
        output_dir = Path(recipe.output_dir).expanduser().resolve()
        recipe = recipe.model_copy(update={"output_dir": str(output_dir)})
    started_here = orchestrate.connect(address, recipe.resources)
    try:
        result = check_cluster(recipe)
    finally:
        if started_here:
            ray.shutdown()
    print(result.table())
    result.raise_for_failures()
    return 0
