"""Each alive node's GPUs and host memory, read by one zero-CPU Ray task pinned to the node
(the way ftlaunch preflight inspects nodes)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from launcher.errors import UserInputError
from launcher.driver.nodes import alive_nodes, gather, on_node

TIMEOUT_S = 60.0


@dataclass(frozen=True)
class NodeMemory:
    node: str  # ip/short node id, as ftlaunch preflight names nodes
    gpu_names: tuple[str, ...]
    gpu_bytes: tuple[int, ...]  # total memory of each GPU
    host_bytes: int  # MemTotal
    host_available: int  # MemAvailable

    @property
    def gpus(self) -> int:
        return len(self.gpu_bytes)


def read_memory() -> tuple[tuple[str, ...], tuple[int, ...], int, int]:
    """Runs on one node: its GPUs' names and total memory, the host's total and available."""
    import torch

    count = torch.cuda.device_count()
    props = [torch.cuda.get_device_properties(i) for i in range(count)]
    meminfo = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            meminfo[key] = int(value.split()[0]) * 1024  # kB
    total = meminfo.get("MemTotal", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return (
        tuple(p.name for p in props), tuple(p.total_memory for p in props), total,
        meminfo.get("MemAvailable", total),
    )


def cluster_memory(timeout_s: float = TIMEOUT_S) -> list[NodeMemory]:
    """Every alive node of the connected Ray cluster; a node that does not answer is an error
    naming it."""
    import ray

    nodes = alive_nodes()
    task = ray.remote(num_cpus=0)(read_memory)
    refs = {n.node_id: on_node(task, n, {}).remote() for n in nodes}
    answers = gather(refs, timeout_s)
    out = []
    for n in nodes:
        answer = answers[n.node_id]
        if isinstance(answer, str):
            raise UserInputError("--address", f"node {n.name} did not report its memory: {answer}")
        names, gpu_bytes, host, available = answer
        out.append(NodeMemory(n.name, names, gpu_bytes, host, available))
    return out


@dataclass(frozen=True)
class ClusterBudget:
    gpus_per_node: int  # on the smallest GPU node; 0 on a cluster without GPUs
    gpu_nodes: int
    gpu_bytes: int | None  # the smallest GPU's memory
    gpu_name: str | None
    host_bytes: int  # the smallest node's total host memory


def summarize(nodes: list[NodeMemory]) -> ClusterBudget:
    with_gpus = [n for n in nodes if n.gpus]
    host = min(n.host_bytes for n in (with_gpus or nodes))
    if not with_gpus:
        return ClusterBudget(0, 0, None, None, host)
    smallest = min((b, name) for n in with_gpus for b, name in zip(n.gpu_bytes, n.gpu_names))
    return ClusterBudget(
        min(n.gpus for n in with_gpus), len(with_gpus), smallest[0], smallest[1], host
    )
