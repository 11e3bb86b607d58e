"""The alive nodes of the connected Ray cluster, a task pinned on one node, and their answers
gathered with a deadline (a failed or silent node becomes a one-line reason)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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


def on_node(remote_fn: Any, node: Node, runtime_env: Mapping[str, Any]) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return remote_fn.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        runtime_env=dict(runtime_env),
    )


def gather(refs: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
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
            out[node_id] = one_line(e)
    return out


def one_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
