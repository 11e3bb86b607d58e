"""The embedded Ray instance answers Ray's state API itself, whatever cluster the machine's
address file (ray_current_cluster, written by ``ray start``) names, and lives as long as the
launch's session holds it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import ROOT

PROBE = """
import ray
from launcher.driver.orchestrate import start_local_ray

start_local_ray(num_cpus=1)

@ray.remote
def nodes_seen_from_a_task():
    from ray.util.state import list_nodes
    return [n.node_id for n in list_nodes(timeout=10)]

print("NODES", ray.get(nodes_seen_from_a_task.remote()), ray.get_runtime_context().get_node_id())
"""


def test_state_api_in_tasks_reaches_the_embedded_cluster_despite_a_stale_address_file():
    """Ray Train's placement-group cleaner polls this API from a task; asked of a dead cluster
    it blocks for its timeout on every poll and delays the end of each run."""
    tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths
    try:
        (tmp / "ray").mkdir()
        (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens
        done = subprocess.run(
            [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300,
            env=os.environ | {"RAY_TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}, check=False,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("NODES"))
    seen, own = line.split()[1:-1], line.split()[-1]
    assert seen == [f"['{own}']"], line


SESSION_PROBE = """
import time
import psutil
import ray
from launcher.driver.ray_session import RaySession
from launcher.recipe.run_sections import ResourcesSection

with RaySession(None, ResourcesSection(num_workers=1, use_gpu=False)) as session:
    print("HERE", session.wait())
    time.sleep(2)  # a node process killed at the end of ray.init's thread is gone by now

    @ray.remote
    def one():
        return 1

    print("TASK", ray.get(one.remote(), timeout=120))
    nodes = [p for p in psutil.Process().children(recursive=True)
             if p.name() in ("gcs_server", "raylet")]
    print("NODES", len(nodes))
    session.close()
gone, alive = psutil.wait_procs(nodes, timeout=30)
print("AFTER", ray.is_initialized(), len(alive))
"""


def test_the_session_s_ray_outlives_its_start_and_is_shut_down_when_the_block_ends():
    """Ray's node processes die with the thread that started them (PR_SET_PDEATHSIG): the
    session's thread must hold them until ``close``; a Ray opened on a thread that then ended
    loses its GCS and the driver is terminated (exit code != 0 here)."""
    done = subprocess.run(
        [sys.executable, "-c", SESSION_PROBE], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env=os.environ | {"PYTHONPATH": str(ROOT)}, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["HERE"] == "True" and lines["TASK"] == "1", done.stdout
    assert lines["NODES"] == "2", done.stdout
    assert lines["AFTER"] == "False 0", done.stdout
