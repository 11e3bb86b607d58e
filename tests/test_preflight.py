"""Preflight on a real two-node Ray cluster. The second node runs in its own mount namespace
with a tmpfs over one directory: storage the head does not share, as on two machines whose
run directory is a local disk."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from launcher.driver.preflight import Node, evaluate, inspect_node
from launcher.recipe import validate_recipe
from tests.conftest import tiny_recipe, write_recipe
from tests.raynodes import LocalRayCluster, can_isolate_mounts

TWO_NODES = {"num_workers": 2, "use_gpu": False, "placement_strategy": "STRICT_SPREAD"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("preflight")
    isolated = can_isolate_mounts(base / "probe")
    nodes = LocalRayCluster(base)
    try:
        nodes.start_head(num_cpus=1, resources="node_a")
        nodes.add_node("node_b", num_cpus=1, private_dir=base / "nodelocal" if isolated else None)
        yield nodes
    finally:
        nodes.stop()


def preflight(cluster: LocalRayCluster, name: str, output_dir: Path, *args: str, **changes):
    resources = TWO_NODES | changes.pop("resources", {})
    recipe = tiny_recipe(output_dir, resources=resources, **changes)
    path = write_recipe(cluster.base / f"{name}.yaml", recipe)
    return cluster.run_ftlaunch(*args, path, "--address", cluster.address, timeout=240)


def failed_nodes(text: str) -> set[str]:
    return set(re.findall(r"^FAILED [\d.]+/([0-9a-f]{8})", text, re.MULTILINE))


def short(node_id: str) -> str:
    return node_id[:8]


@pytest.mark.e2e
def test_passes_on_two_nodes_sharing_the_run_directory(cluster):
    run_dir = cluster.base / "shared" / "run"
    result = preflight(cluster, "shared", run_dir, "preflight")
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    assert "preflight passed" in table and "FAILED" not in table
    for node_id in cluster.node_ids().values():
        assert re.search(rf"/{short(node_id)}.*\bok$", table, re.MULTILINE), table
    bandwidth = re.search(r"all-reduce \(gloo, 2 nodes, 16 MiB\): [\d.]+ ms, ([\d.]+) GB/s", table)
    assert bandwidth and float(bandwidth.group(1)) > 0, table
    assert not run_dir.exists() and not run_dir.parent.exists()  # nothing left behind


@pytest.mark.e2e
def test_training_stops_before_it_starts_when_preflight_fails(cluster):
    if "node_b" not in cluster.private_dirs:
        pytest.skip("needs a private mount namespace (unshare --mount) to play a node-local disk")
    run_dir = cluster.base / "nodelocal" / "train"
    result = preflight(cluster, "train_nodelocal", run_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert failed_nodes(result.stderr) == {short(cluster.node_ids()["node_b"])}, result.stderr
    assert "storage: this node cannot read the file the driver wrote" in result.stderr
    assert "training was not started" in result.stderr
    assert not run_dir.exists()


@pytest.mark.e2e
def test_gpu_recipe_on_a_cpu_cluster_fails_on_every_node(cluster):
    """flash_attention_2 needs flash-attn and GPUs; a NIC that does not exist fails the
    all-reduce (the recipe's network settings reach the nodes)."""
    result = preflight(
        cluster,
        "misfit",
        cluster.base / "shared" / "misfit",
        "preflight",
        model={"attention": "flash_attention_2"},
        resources={"use_gpu": True, "network_interface": "nosuchnic0"},
    )
    assert result.returncode == 2
    ids = {short(i) for i in cluster.node_ids().values()}
    assert failed_nodes(result.stdout) == ids
    for node in ids:
        assert re.search(rf"/{node}: flash-attn: not installed; model.attention", result.stdout)
        assert re.search(rf"/{node}: gpus: no GPU visible to torch", result.stdout)
        assert re.search(rf"/{node}: all-reduce: .*nosuchnic0", result.stdout), result.stdout


def test_version_mismatch_names_the_node(tmp_path):
    recipe = validate_recipe(tiny_recipe(tmp_path / "run", resources=TWO_NODES))
    share = Path(recipe.output_dir) / ".preflight"
    share.mkdir(parents=True)
    (share / "driver-t").write_text("t")
    here = inspect_node(str(share), "t", "a-t")
    other = dataclasses.replace(
        here, versions={**here.versions, "peft": "0.0.1", "deepspeed": None}
    )
    nodes = [
        Node("a" * 56, "10.0.0.1", {"CPU": 1}, True),
        Node("b" * 56, "10.0.0.2", {"CPU": 1}, False),
    ]
    failures = evaluate(
        recipe, nodes, {"a" * 56: here, "b" * 56: other}, {"a" * 56: True, "b" * 56: True}, "a" * 56
    )
    assert [(f.node, f.check) for f in failures] == [
        ("10.0.0.2/bbbbbbbb", "deepspeed"),
        ("10.0.0.2/bbbbbbbb", "peft"),
    ]
    assert "0.0.1 here but" in str(failures[1]) and "on 10.0.0.1/aaaaaaaa" in str(failures[1])
