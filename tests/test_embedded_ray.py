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


def _libc_signal():
    import ctypes

    libc = ctypes.CDLL(None)
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal.restype = ctypes.c_void_p
    return libc.signal


def test_sigterm_is_given_back_to_python_s_handler_after_a_library_took_it_on_a_thread():
    """What Ray's core worker does when it connects (a C-level SIGTERM handler of its own,
    which Python does not see) is undone when ``kept_sigterm`` ends, on the thread that
    connected: the driver's Python handler gets the signal again."""
    import signal
    import threading
    import time

    from launcher.driver.ray_session import kept_sigterm

    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        def connect_like_ray() -> None:
            with kept_sigterm():
                _libc_signal()(signal.SIGTERM, 1)  # SIG_IGN, behind Python's back

        thread = threading.Thread(target=connect_like_ray)
        thread.start()
        thread.join()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not got and time.time() < deadline:
            time.sleep(0.01)
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


DEFAULT_PROBE = """
import os, signal, threading
from tests.test_embedded_ray import _libc_signal
from launcher.driver.ray_session import kept_sigterm

signal.signal(signal.SIGTERM, lambda signum, frame: print("HANDLED", flush=True))
inside, done = threading.Event(), threading.Event()

def connect_like_ray():
    with kept_sigterm():
        inside.set()
        done.wait()
        _libc_signal()(signal.SIGTERM, 1)

thread = threading.Thread(target=connect_like_ray)
thread.start()
inside.wait()
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the command ended meanwhile
done.set()
thread.join()
os.kill(os.getpid(), signal.SIGTERM)
print("SURVIVED", flush=True)
"""


def test_sigterm_kills_once_the_driver_gave_its_handler_up_while_ray_was_connecting():
    """A launch that ended while Ray connected has put SIGTERM back to the default: what
    ``kept_sigterm`` restores then is that default, not the handler it saw at the start
    (which Python no longer runs: the signal would be lost)."""
    import signal

    done = subprocess.run(
        [sys.executable, "-c", DEFAULT_PROBE], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env=os.environ | {"PYTHONPATH": str(ROOT)}, check=False,
    )
    assert done.returncode == -signal.SIGTERM, done.stdout + done.stderr[-3000:]
    assert "HANDLED" not in done.stdout and "SURVIVED" not in done.stdout


SIGTERM_PROBE = """
import os, signal, time
from launcher.driver.ray_session import RaySession
from launcher.recipe.run_sections import ResourcesSection

got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
with RaySession(None, ResourcesSection(num_workers=1, use_gpu=False)) as session:
    session.open()
    session.wait()
    os.kill(os.getpid(), signal.SIGTERM)  # no reclaim on the main thread first
    deadline = time.time() + 10
    while not got and time.time() < deadline:
        time.sleep(0.05)
    print("HANDLED", got, flush=True)
    session.close()
"""


def test_sigterm_after_ray_connected_reaches_the_driver_s_handler_not_ray_s():
    """Ray's core worker, once connected, puts a C++ failure handler on SIGTERM (it prints
    '*** SIGTERM received' and a stack); the session's thread takes it off again, so the
    driver's own handler sees the signal while the main thread is still busy validating."""
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_PROBE], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env=os.environ | {"PYTHONPATH": str(ROOT)}, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HANDLED [15]" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "SIGTERM received" not in done.stderr, done.stderr[-3000:]


def test_a_recipe_error_found_while_ray_starts_is_all_the_command_says(tmp_path):
    """The launch starts Ray before it validates the data. A bad row found meanwhile is the
    command's last word (no Ray start-up line after it), the exit code is 2, no run directory
    is left, and the command returns only after the Ray it started is gone."""
    import json
    import time

    from tests.conftest import tiny_recipe, write_recipe
    from tests.raynodes import _pids_in_sessions

    row = json.dumps({"instruction": "add", "input": "1 2", "output": "three"})
    bad = tmp_path / "bad rows #1.jsonl"
    bad.write_text(f"{row}\n{row}\n{{\"instruction\": \n")
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        run_dir, data={"train": str(bad), "validation": None}))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", str(recipe), "--no-progress"], cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp),
                              "FTLAUNCH_CACHE": str(tmp_path / "cache")},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        _, err = proc.communicate(timeout=300)
        ray_started = list(ray_tmp.glob("**/session_2*"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2, err[-3000:]
    assert lines[-1].startswith("ftlaunch: error: ") and "bad rows #1.jsonl:3" in lines[-1], err
    assert not [line for line in lines if "ray" in line.lower()], err
    assert ray_started, "Ray was not started before the error: nothing overlapped"
    assert not run_dir.exists()
    deadline = time.time() + 90  # Ray's agents leave once they see their raylet gone
    while (left := _pids_in_sessions({proc.pid})) and time.time() < deadline:
        time.sleep(0.2)
    assert not left


IN_PROCESS_PROBE = """
import sys, threading
import ray
from launcher.cli import main

for attempt in (1, 2):
    code = main([sys.argv[1], "--no-progress"])
    left = [t.name for t in threading.enumerate() if t.name == "ftlaunch-ray" and t.is_alive()]
    print("ATTEMPT", attempt, code, ray.is_initialized(), left, flush=True)
"""


def test_an_in_process_caller_gets_main_back_only_once_the_ray_it_started_is_down(tmp_path):
    """``main`` returns after the Ray that a failed launch started beside its validation has
    been shut down (``settle``), so an in-process caller (a notebook, a test) can launch again
    at once: twice in a row, exit 2, no Ray connected, no session thread left."""
    import json

    from tests.conftest import tiny_recipe, write_recipe

    row = json.dumps({"instruction": "add", "input": "1 2", "output": "three"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{row}\n{{\"instruction\": \n")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        tmp_path / "run", data={"train": str(bad), "validation": None}))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths
    try:
        done = subprocess.run(
            [sys.executable, "-c", IN_PROCESS_PROBE, str(recipe)], cwd=ROOT, capture_output=True,
            text=True, timeout=300, check=False,
            env=os.environ | {"PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp),
                              "FTLAUNCH_CACHE": str(tmp_path / "cache")},
        )
        sessions = list(ray_tmp.glob("**/session_2*"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    attempts = [line for line in done.stdout.splitlines() if line.startswith("ATTEMPT")]
    assert attempts == ["ATTEMPT 1 2 False []", "ATTEMPT 2 2 False []"], done.stdout
    assert len(sessions) == 2  # each launch did start a Ray beside its validation
