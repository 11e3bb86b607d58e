"""``ftlaunch plan`` from parsed flags, the fit warning before ``ftlaunch train``, and the
prediction a run records in run_info.json."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

from launcher.errors import UserInputError
from launcher.plan.cluster import ClusterBudget, cluster_memory, summarize
from launcher.plan.estimate import DEFAULT_MFU, Budget, Plan, fit_warning, make_plan
from launcher.plan.estimate import predicted_peak_bytes
from launcher.plan.memory import Hardware
from launcher.plan.model import model_facts
from launcher.plan.predict import plan_on, predicted_peak_gb  # noqa: F401
from launcher.plan.report import render, to_json
from launcher.recipe import Recipe

DEFAULT_GPU_BYTES = 80 * 2**30
NO_FIT_EXIT = 1  # the plan ran, and no ZeRO stage or offload fits


@dataclass(frozen=True)
class PlanRequest:
    gpus: int | None  # per node
    nodes: int | None
    gpu_bytes: int | None
    address: str | None
    as_json: bool
    mfu: float = DEFAULT_MFU


def hardware_for(recipe: Recipe, gpus: int | None, nodes: int | None) -> Hardware:
    """--gpus (per node) and --nodes; what is left out follows resources.num_workers."""
    workers = recipe.resources.num_workers
    if gpus is None and nodes is None:
        return Hardware(workers, 1)
    if gpus is None:
        return Hardware(math.ceil(workers / nodes), nodes)
    return Hardware(gpus, nodes or math.ceil(workers / gpus))


def read_cluster(address: str, recipe: Recipe) -> ClusterBudget:
    import ray

    from launcher.driver import orchestrate

    started = orchestrate.connect(address, recipe.resources)
    try:
        return summarize(cluster_memory())
    finally:
        if started:
            ray.shutdown()


def budget_for(req: PlanRequest, cluster: ClusterBudget | None) -> Budget:
    gpu_bytes = req.gpu_bytes
    if gpu_bytes is None and cluster is not None:
        gpu_bytes = cluster.gpu_bytes
    return Budget(
        gpu_bytes=gpu_bytes or DEFAULT_GPU_BYTES,
        host_bytes=cluster.host_bytes if cluster else None,
        gpu_name=cluster.gpu_name if cluster else None,
        mfu=req.mfu,
    )


def cluster_hardware(req: PlanRequest, recipe: Recipe, cluster: ClusterBudget | None) -> Hardware:
    if cluster is None or not cluster.gpus_per_node:
        return hardware_for(recipe, req.gpus, req.nodes)
    return hardware_for(recipe, req.gpus or cluster.gpus_per_node, req.nodes or cluster.gpu_nodes)


def cluster_note(cluster: ClusterBudget | None, req: PlanRequest) -> str | None:
    if cluster is None:
        return None if req.gpu_bytes else "GPU memory: assumed 80 GiB (--gpu-mem sets it)"
    if cluster.gpus_per_node:
        return (f"cluster at {req.address}: {cluster.gpu_nodes} GPU node(s), "
                f"{cluster.gpus_per_node} x {cluster.gpu_name} each (smallest), {cluster.host_bytes / 2**30:.1f} GiB host")
    assumed = "" if req.gpu_bytes else "; GPU memory assumed 80 GiB (--gpu-mem sets it)"
    return (f"cluster at {req.address}: no GPUs on any node (host memory "
            f"{cluster.host_bytes / 2**30:.1f} GiB per node){assumed}")


def run(recipe: Recipe, req: PlanRequest) -> int:
    facts = model_facts(recipe)
    cluster = read_cluster(req.address, recipe) if req.address else None
    plan = make_plan(
        recipe, facts, cluster_hardware(req, recipe, cluster), budget_for(req, cluster)
    )
    if req.as_json:
        out = to_json(recipe, facts, plan)
        out["cluster"] = None if cluster is None else cluster.__dict__
        print(json.dumps(out, indent=1))
    else:
        note = cluster_note(cluster, req)
        sys.stdout.write((f"{note}\n" if note else "") + render(recipe, facts, plan))
        if not recipe.resources.use_gpu:
            print("note: this recipe trains on CPU (resources.use_gpu: false); the figures are "
                  "per worker process")
    return 0 if plan.recommended else NO_FIT_EXIT


def warn_if_unfit(recipe: Recipe, gpu_bytes: int | None, gpus_per_node: int, nodes: int) -> None:
    """Before training: warn (never stop) when the recipe's choice will not fit its GPUs. No
    warning without GPUs to compare with (a CPU run, or GPUs whose memory is unknown)."""
    if not recipe.resources.use_gpu or not gpu_bytes or not gpus_per_node:
        return
    try:
        message = fit_warning(plan_on(recipe, gpu_bytes, gpus_per_node, nodes))
    except UserInputError:
        return  # the model's config is checked (with a proper error) by prepare()
    if message:
        print(f"ftlaunch: warning: {message}", file=sys.stderr)


def local_gpus() -> tuple[int, int | None]:
    """This machine's GPU count and the smallest one's memory (torchrun trains here)."""
    import torch

    count = torch.cuda.device_count()
    if not count:
        return 0, None
    return count, min(torch.cuda.get_device_properties(i).total_memory for i in range(count))


def warn_before_launch(recipe: Recipe, on_ray: bool) -> None:
    """The fit warning against the GPUs the run will get: every Ray node's (through one task
    per node) or this machine's. Runs without GPUs (CPU recipes) are never warned."""
    if not recipe.resources.use_gpu:
        return
    if on_ray:
        try:
            cluster = summarize(cluster_memory())
        except UserInputError as e:  # a node that does not answer: say so, never stop the run
            print(f"ftlaunch: warning: no fit check: {e}", file=sys.stderr)
            return
        per_node, memory = cluster.gpus_per_node, cluster.gpu_bytes
    else:
        per_node, memory = local_gpus()
    if not per_node:
        return
    workers = recipe.resources.num_workers
    gpus = min(per_node, workers)
    warn_if_unfit(recipe, memory, gpus, math.ceil(workers / gpus))
