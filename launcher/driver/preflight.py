"""Preflight: check a Ray cluster against a recipe before any worker starts training.

One Ray task per alive node (pinned with NodeAffinitySchedulingStrategy, zero CPUs so it runs
beside anything) reports library versions, GPUs and free disk, and proves the run directory is
shared: the driver writes a token file under ``output_dir/.preflight/`` that every node must
read, and every node writes one that the driver must read (workers write checkpoints there and
the driver exports from it). Then one process on each node that can host a worker joins a
gloo group with the recipe's network settings and times an all-reduce: the path the training
collectives take between nodes. Every failed check names its node.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from launcher.errors import UserInputError
from launcher.driver.ports import free_port
from launcher.recipe import Recipe, load_recipe

PACKAGES = ("torch", "transformers", "deepspeed", "peft", "ray")
AGREE = ("python", *PACKAGES, "cuda")
PREFLIGHT_DIR = ".preflight"
MIN_FREE_BYTES = 1 << 30
ALLREDUCE_BYTES = 16 << 20
ALLREDUCE_ROUNDS = 3
TIMEOUT_S = 60.0
COLLECTIVE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Node:
    """An alive Ray node as the GCS describes it."""

    node_id: str
    ip: str
    resources: Mapping[str, float]
    is_head: bool

    @property
    def name(self) -> str:
        return f"{self.ip}/{self.node_id[:8]}"


@dataclass(frozen=True)
class NodeReport:
    """What one node's check task found."""

    versions: Mapping[str, str | None]
    gpus: int
    capability: tuple[int, int] | None
    free_bytes: int
    sees_driver_token: bool
    write_error: str | None
    token_file: str
    created_dirs: tuple[str, ...]
    free_port: int


@dataclass(frozen=True)
class Failure:
    node: str
    check: str
    detail: str

    def __str__(self) -> str:
        return f"{self.node}: {self.check}: {self.detail}"


@dataclass(frozen=True)
class AllReduce:
    nodes: int
    nbytes: int
    seconds: float

    @property
    def bus_gbps(self) -> float:
        """Bus bandwidth in GB/s, as nccl-tests report it: 2(n-1)/n x bytes / time."""
        return 2 * (self.nodes - 1) / self.nodes * self.nbytes / self.seconds / 1e9


@dataclass(frozen=True)
class Preflight:
    nodes: tuple[Node, ...]
    reports: Mapping[str, NodeReport | str]
    allreduce: AllReduce | None
    failures: tuple[Failure, ...]
    share_dir: str

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        return format_table(self)

    def raise_for_failures(self, consequence: str = "") -> None:
        if self.failures:
            lines = "\n  ".join(str(f) for f in self.failures)
            raise UserInputError(
                "preflight", f"{len(self.failures)} check(s) failed{consequence}:\n  {lines}"
            )


# ---------------------------------------------------------------- on every node


def inspect_node(share_dir: str, driver_token: str, node_token: str) -> NodeReport:
    """Runs on one node: versions, GPUs, free disk, and both halves of the storage check."""
    import torch

    versions: dict[str, str | None] = {"python": platform.python_version()}
    versions |= {name: _dist_version(name) for name in PACKAGES}
    versions["cuda"] = torch.version.cuda
    versions["flash-attn"] = _flash_attn_version()
    gpus = torch.cuda.device_count()
    capability = min(torch.cuda.get_device_capability(i) for i in range(gpus)) if gpus else None
    share = Path(share_dir)
    created: list[str] = []
    write_error = None
    node_file = share / f"node-{node_token}"
    try:
        created = _make_dirs(share)
        node_file.write_text(node_token)
    except OSError as e:
        write_error = f"{type(e).__name__}: {e}"
    driver_file = share / f"driver-{driver_token}"
    sees = driver_file.is_file() and driver_file.read_text() == driver_token
    free = shutil.disk_usage(_existing_ancestor(share)).free
    return NodeReport(
        versions,
        gpus,
        capability,
        free,
        sees,
        write_error,
        str(node_file),
        tuple(created),
        free_port(),
    )


def remove_files(paths: Sequence[str], dirs: Sequence[str]) -> None:
    """Runs on one node: remove its token file and the directories it created, if empty."""
    for path in paths:
        Path(path).unlink(missing_ok=True)
    for directory in sorted(dirs, key=len, reverse=True):
        try:
            Path(directory).rmdir()
        except OSError:
            pass


def allreduce(
    master: str, rank: int, world: int, nbytes: int, rounds: int, timeout_s: float
) -> float:
    """Runs on one node per rank: seconds per all-reduce of ``nbytes`` over gloo."""
    import datetime

    import torch
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{master}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        data = torch.ones(nbytes // 4)
        dist.all_reduce(data)
        if data[0].item() != world:
            raise RuntimeError(f"all-reduce of ones returned {data[0].item()}, expected {world}")
        start = time.perf_counter()
        for _ in range(rounds):
            dist.all_reduce(data)
        return (time.perf_counter() - start) / rounds
    finally:
        dist.destroy_process_group()


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _flash_attn_version() -> str | None:
    """The flash-attn version if it imports, 'broken (...)' if installed but not importable."""
    version = _dist_version("flash_attn")
    if version is None:
        return None
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # noqa: BLE001 (an ABI mismatch raises anything, ImportError to OSError)
        return f"broken ({type(e).__name__})"
    return version


def _make_dirs(path: Path) -> list[str]:
    """mkdir -p that returns the directories it created."""
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    path.mkdir(parents=True, exist_ok=True)
    return [str(p) for p in missing]


def _existing_ancestor(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


# ---------------------------------------------------------------- on the driver


def alive_nodes() -> list[Node]:
    import ray

    nodes = [
        Node(
            n["NodeID"],
            n["NodeManagerAddress"],
            dict(n["Resources"]),
            "node:__internal_head__" in n["Resources"],
        )
        for n in ray.nodes()
        if n["Alive"]
    ]
    return sorted(nodes, key=lambda n: (not n.is_head, n.ip, n.node_id))


def worker_hosts(recipe: Recipe, nodes: Sequence[Node]) -> list[Node]:
    """Nodes Ray can place a worker on. A GPU recipe on a cluster without GPUs gets the nodes
    with enough CPUs, so that the GPU checks fail there, naming them."""
    res = recipe.resources
    fits = [n for n in nodes if n.resources.get("CPU", 0) >= res.cpus_per_worker]
    if res.use_gpu:
        return [n for n in fits if n.resources.get("GPU", 0) >= 1] or fits
    return fits


def check_cluster(recipe: Recipe, timeout_s: float = TIMEOUT_S) -> Preflight:
    """Run every check on the connected Ray cluster. ``recipe.output_dir`` must be absolute."""
    import ray

    nodes = tuple(alive_nodes())
    share = Path(recipe.output_dir) / PREFLIGHT_DIR
    token = uuid.uuid4().hex
    runtime_env = {"env_vars": recipe.resources.worker_env()}
    driver_file = share / f"driver-{token}"
    try:
        created = _make_dirs(share)
        driver_file.write_text(token)
    except OSError as e:
        raise UserInputError("output_dir", f"cannot write in {share}: {e}") from None
    reports: dict[str, NodeReport | str] = {}
    try:
        inspect = ray.remote(num_cpus=0)(inspect_node)
        refs = {
            n.node_id: _on(inspect, n, runtime_env).remote(
                str(share), token, f"{n.node_id}-{token}"
            )
            for n in nodes
        }
        reports = _gather(refs, timeout_s)
        seen = {
            node_id: Path(r.token_file).is_file()
            for node_id, r in reports.items()
            if isinstance(r, NodeReport)
        }
        hosts = [
            n for n in worker_hosts(recipe, nodes) if isinstance(reports[n.node_id], NodeReport)
        ]
        allreduce_result, allreduce_failures = _run_allreduce(hosts, reports, runtime_env)
    finally:
        _cleanup(nodes, reports, runtime_env)
        remove_files([str(driver_file)], created)
    driver_node = ray.get_runtime_context().get_node_id()
    failures = evaluate(recipe, nodes, reports, seen, driver_node) + allreduce_failures
    return Preflight(nodes, reports, allreduce_result, tuple(failures), str(share))


def _on(remote_fn: Any, node: Node, runtime_env: Mapping[str, Any]) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return remote_fn.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        runtime_env=dict(runtime_env),
    )


def _gather(refs: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    """node id -> the task's result, or a one-line error for a task that failed or hung."""
    import ray

    _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    out: dict[str, Any] = {}
    for node_id, ref in refs.items():
        if ref in pending:
            ray.cancel(ref, force=True)
            out[node_id] = f"no answer within {timeout_s:g} s"
            continue
        try:
            out[node_id] = ray.get(ref)
        except ray.exceptions.RayError as e:
            out[node_id] = _one_line(e)
    return out


def _one_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


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
        n.node_id: _on(task, n, runtime_env).remote(
            master, rank, len(hosts), ALLREDUCE_BYTES, ALLREDUCE_ROUNDS, COLLECTIVE_TIMEOUT_S
        )
        for rank, n in enumerate(hosts)
    }
    results = _gather(refs, COLLECTIVE_TIMEOUT_S + 30)
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
        n.node_id: _on(remove, n, runtime_env).remote([r.token_file], list(r.created_dirs))
        for n in nodes
        if isinstance(r := reports.get(n.node_id), NodeReport)
    }
    _gather(refs, timeout_s=30)


def evaluate(
    recipe: Recipe,
    nodes: Sequence[Node],
    reports: Mapping[str, NodeReport | str],
    driver_sees: Mapping[str, bool],
    reference_node: str | None = None,
) -> list[Failure]:
    """The checks, from what the nodes reported. Versions are compared with the reference
    node's (the driver's node when it is part of the cluster, else the first that answered)."""
    failures: list[Failure] = []
    ok = {n.node_id: r for n in nodes if isinstance(r := reports.get(n.node_id), NodeReport)}
    for n in nodes:
        if n.node_id not in ok:
            failures.append(
                Failure(n.name, "node", f"the check task failed: {reports.get(n.node_id)}")
            )
    if not ok:
        return failures
    ref_id = reference_node if reference_node in ok else next(iter(ok))
    ref_node = next(n for n in nodes if n.node_id == ref_id)
    hosts = {n.node_id for n in worker_hosts(recipe, nodes)}
    share = Path(recipe.output_dir) / PREFLIGHT_DIR
    for n in nodes:
        report = ok.get(n.node_id)
        if report is None:
            continue
        failures += _version_failures(n, report, ok[ref_id], ref_node, n.node_id in hosts, recipe)
        failures += _storage_failures(n, report, driver_sees.get(n.node_id, False), share)
        if n.node_id in hosts:
            failures += _host_failures(n, report, recipe)
    failures += _placement_failures(recipe, hosts)
    return failures


def _version_failures(
    node: Node, report: NodeReport, ref: NodeReport, ref_node: Node, host: bool, recipe: Recipe
) -> list[Failure]:
    out = [
        Failure(node.name, name, "not installed") for name in PACKAGES if not report.versions[name]
    ]
    compare = list(AGREE)
    if (
        host
        and recipe.resources.use_gpu
        and recipe.model.attention in ("auto", "flash_attention_2")
    ):
        compare.append("flash-attn")  # auto would pick a different kernel on different nodes
    for name in compare:
        mine, theirs = report.versions[name], ref.versions[name]
        if (
            node.node_id != ref_node.node_id
            and mine != theirs
            and (name not in PACKAGES or (mine and theirs))
        ):
            out.append(
                Failure(
                    node.name,
                    name,
                    f"{mine or 'none'} here but {theirs or 'none'} on {ref_node.name}",
                )
            )
    return out


def _storage_failures(
    node: Node, report: NodeReport, driver_sees: bool, share: Path
) -> list[Failure]:
    if report.write_error:
        return [Failure(node.name, "storage", f"cannot write in {share}: {report.write_error}")]
    if report.sees_driver_token and driver_sees:
        return []
    missing = "the driver cannot read the file this node wrote"
    if not report.sees_driver_token:
        missing = "this node cannot read the file the driver wrote"
    return [
        Failure(
            node.name,
            "storage",
            f"{missing} in {share}: output_dir is not on storage shared by the driver and every "
            "node (workers write checkpoints there and the driver exports from it); put "
            "output_dir on a shared filesystem (NFS, a ReadWriteMany volume) mounted at the same "
            "path everywhere",
        )
    ]


def _host_failures(node: Node, report: NodeReport, recipe: Recipe) -> list[Failure]:
    """Checks on a node a worker can land on: free disk, GPUs, flash-attn."""
    res, model = recipe.resources, recipe.model
    problems: list[tuple[str, str]] = []
    if report.free_bytes < MIN_FREE_BYTES:
        free, needed = _gib(report.free_bytes), _gib(MIN_FREE_BYTES)
        problems.append(("disk", f"{free} free at output_dir; checkpoints need {needed}"))
    advertised = int(node.resources.get("GPU", 0))
    if res.use_gpu and report.gpus == 0:
        problems.append(("gpus", "no GPU visible to torch; resources.use_gpu needs one per worker"))
    elif res.use_gpu and report.gpus < advertised:
        problems.append(("gpus", f"Ray advertises {advertised} GPUs but torch sees {report.gpus}"))
    sm80_for = [
        why
        for why, needed in (
            ("model.attention: flash_attention_2", model.attention == "flash_attention_2"),
            ("model.dtype: bf16", model.dtype == "bf16"),
        )
        if needed
    ]
    if res.use_gpu and report.capability and report.capability < (8, 0) and sm80_for:
        problems.append(
            (
                "gpus",
                f"compute capability {_sm(report.capability)}; {' and '.join(sm80_for)} need sm80+",
            )
        )
    flash = report.versions["flash-attn"]
    if model.attention == "flash_attention_2" and (flash is None or flash.startswith("broken")):
        problems.append(
            (
                "flash-attn",
                f"{flash or 'not installed'}; model.attention: flash_attention_2 needs it",
            )
        )
    return [Failure(node.name, check, detail) for check, detail in problems]


def _placement_failures(recipe: Recipe, hosts: set[str]) -> list[Failure]:
    res = recipe.resources
    if not hosts:
        need = f"{res.cpus_per_worker:g} CPUs" + (" and a GPU" if res.use_gpu else "")
        return [Failure("cluster", "placement", f"no node has {need} for a worker")]
    if res.placement_strategy == "STRICT_SPREAD" and len(hosts) < res.num_workers:
        return [
            Failure(
                "cluster",
                "placement",
                f"STRICT_SPREAD puts each of {res.num_workers} workers "
                f"on its own node, but {len(hosts)} node(s) can host one",
            )
        ]
    return []


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _sm(capability: tuple[int, int]) -> str:
    return f"sm{capability[0]}{capability[1]}"


def format_table(result: Preflight) -> str:
    failed = {f.node: f for f in result.failures}
    header = ["node", *AGREE, "flash-attn", "gpus", "free disk", "result"]
    rows = [header]
    for n in result.nodes:
        report = result.reports.get(n.node_id)
        label = n.name + (" (head)" if n.is_head else "")
        status = "FAILED" if n.name in failed else "ok"
        if not isinstance(report, NodeReport):
            rows.append([label, *["?"] * (len(header) - 2), status])
            continue
        gpus = f"{report.gpus}" + (f" x {_sm(report.capability)}" if report.capability else "")
        versions = [report.versions[k] or "-" for k in (*AGREE, "flash-attn")]
        rows.append([label, *versions, gpus, _gib(report.free_bytes), status])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if result.allreduce:
        a = result.allreduce
        lines.append(
            f"all-reduce (gloo, {a.nodes} nodes, {a.nbytes >> 20} MiB): "
            f"{a.seconds * 1e3:.1f} ms, {a.bus_gbps:.2f} GB/s bus bandwidth"
        )
    lines.append(f"storage: token files in {result.share_dir}")
    lines += [f"FAILED {f}" for f in result.failures]
    lines.append(
        "preflight passed" if result.ok else f"preflight failed: {len(result.failures)} check(s)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- entry points


def check_multi_node(recipe: Recipe) -> None:
    """Before training on a connected cluster of more than one node: run the checks, print
    the table to stderr, and raise UserInputError if one failed. One node: nothing to do."""
    if len(alive_nodes()) < 2:
        return
    result = check_cluster(recipe)
    print(result.table(), file=sys.stderr)
    result.raise_for_failures("; training was not started")


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
    """``ftlaunch preflight``: print the table; exit 0 when every check passed, else 2."""
    import ray

    from launcher.driver import orchestrate
    from launcher.jobs.submit import check_cluster_address

    check_cluster_address(args.address, args.insecure, os.environ)
    recipe = load_recipe(args.recipe, args.set, args.output_dir)
    output_dir = Path(recipe.output_dir).expanduser().resolve()
    recipe = recipe.model_copy(update={"output_dir": str(output_dir)})
    started_here = orchestrate.connect(args.address, recipe)
    try:
        result = check_cluster(recipe)
    finally:
        if started_here:
            ray.shutdown()
    print(result.table())
    result.raise_for_failures()
    return 0
