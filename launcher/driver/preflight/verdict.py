"""The verdict from what the nodes reported: each failed check naming its node (versions,
storage, disk, GPUs, flash-attn, placement), and the table ``ftlaunch preflight`` prints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from launcher.errors import UserInputError
from launcher.recipe import Recipe
from launcher.recipe.run_sections import ResourcesSection
from launcher.recipe.sections import ModelSection
from launcher.driver.nodes import Node
from launcher.driver.preflight.node import PACKAGES, NodeReport, share_of
from launcher.recipe.output_dir import is_uri

AGREE = ("python", *PACKAGES, "cuda")
MIN_FREE_BYTES = 1 << 30


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


def worker_hosts(res: ResourcesSection, nodes: Sequence[Node]) -> list[Node]:
    """Nodes Ray can place a worker on. A GPU recipe on a cluster without GPUs gets the nodes
    with enough CPUs, so that the GPU checks fail there, naming them."""
    fits = [n for n in nodes if n.resources.get("CPU", 0) >= res.cpus_per_worker]
    if res.use_gpu:
        return [n for n in fits if n.resources.get("GPU", 0) >= 1] or fits
    return fits


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
    hosts = {n.node_id for n in worker_hosts(recipe.resources, nodes)}
    share = share_of(recipe.output_dir)
    for n in nodes:
        report = ok.get(n.node_id)
        if report is None:
            continue
        failures += _version_failures(
            n, report, ok[ref_id], ref_node, n.node_id in hosts, recipe.resources, recipe.model
        )
        failures += _storage_failures(n, report, driver_sees.get(n.node_id, False), share)
        if n.node_id in hosts:
            failures += _host_failures(n, report, recipe.resources, recipe.model)
    failures += _placement_failures(recipe.resources, hosts)
    return failures


def _version_failures(
    node: Node,
    report: NodeReport,
    ref: NodeReport,
    ref_node: Node,
    host: bool,
    res: ResourcesSection,
    model: ModelSection,
) -> list[Failure]:
    out = [
        Failure(node.name, name, "not installed") for name in PACKAGES if not report.versions[name]
    ]
    compare = list(AGREE)
    if (
        host
        and res.use_gpu
        and model.attention in ("auto", "flash_attention_2")
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
    node: Node, report: NodeReport, driver_sees: bool, share: str
) -> list[Failure]:
    if report.write_error:
        return [Failure(node.name, "storage", f"cannot write in {share}: {report.write_error}")]
    if report.sees_driver_token and driver_sees:
        return []
    missing = "the driver cannot read the file this node wrote"
    if not report.sees_driver_token:
        missing = "this node cannot read the file the driver wrote"
    if is_uri(share):
        return [Failure(node.name, "storage", f"{missing} in {share}: every node reaches the "
                        "object store with the credentials and endpoint of its own environment")]
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


def _host_failures(
    node: Node, report: NodeReport, res: ResourcesSection, model: ModelSection
) -> list[Failure]:
    """Checks on a node a worker can land on: free disk, GPUs, flash-attn."""
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


def _placement_failures(res: ResourcesSection, hosts: set[str]) -> list[Failure]:
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
