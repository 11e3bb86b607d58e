"""Multi-node training on one machine: a real Ray cluster of two nodes (two ``ray start``
processes, each with its own custom resource), one worker on each with STRICT_SPREAD."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from launcher.checkpoint.commit import committed
from launcher.train.metrics import read_metrics
from launcher.driver.orchestrate import make_trainer
from launcher.recipe import validate_recipe
from tests.conftest import tiny_recipe, write_recipe
from tests.raynodes import LocalRayCluster

TWO_NODES = {"num_workers": 2, "use_gpu": False, "placement_strategy": "STRICT_SPREAD"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = LocalRayCluster(tmp_path_factory.mktemp("multinode"), dashboard=True)
    try:
        nodes.start_head(num_cpus=1, resources="node_a")
        nodes.add_node("node_b", num_cpus=1)
        yield nodes
    finally:
        nodes.stop()


@pytest.mark.e2e
def test_two_workers_train_on_two_nodes_into_shared_storage(cluster):
    run_dir = cluster.base / "shared" / "run"
    recipe = tiny_recipe(
        run_dir,
        resources=TWO_NODES | {"collective_timeout_s": 300},
        checkpoint={"every_steps": 2},
    )
    result = cluster.run_ftlaunch(
        write_recipe(cluster.base / "two_nodes.yaml", recipe), "--address", cluster.address
    )
    assert result.returncode == 0, result.stderr[-4000:]

    assert "preflight passed" in result.stderr
    assert "all-reduce (gloo, 2 nodes" in result.stderr
    assert json.loads((run_dir / "run_info.json").read_text())["world_size"] == 2
    assert [c.step for c in committed(run_dir)] == [4, 2]
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert not (run_dir / ".preflight").exists()

    workers = cluster.actor_nodes("RayTrainWorker")
    assert sorted(workers) == sorted(cluster.node_ids().values()), workers


def test_network_settings_reach_the_trainer(tmp_path):
    recipe = validate_recipe(
        tiny_recipe(
            tmp_path / "run",
            resources=TWO_NODES
            | {
                "network_interface": "eth1",
                "infiniband": False,
                "collective_timeout_s": 90,
                "env": {"NCCL_DEBUG": "INFO"},
            },
        )
    )
    trainer = make_trainer(recipe, {}, tmp_path / "run")
    env = trainer.run_config.worker_runtime_env["env_vars"]
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth1"
    assert env["NCCL_IB_DISABLE"] == "1" and env["NCCL_DEBUG"] == "INFO"
    assert trainer.backend_config.timeout_s == 90
