"""Ctrl-C and SIGTERM on a real driver process: exit 130/143, the resume command on stderr,
no worker left alive, and (checkpoint.on_preempt) a checkpoint of the step reached that the
printed command resumes from. Then the edges: a second Ctrl-C, a signal during start-up, a
signal during a save, a grace period shorter than a save, and a cluster joined with --address.
Saves are slowed down with the launcher's fault hook (launcher/train/faults.py, ``slow_save``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml
import pytest

from launcher.checkpoint import commit as ckpt
from launcher.train.metrics import read_metrics
from tests.conftest import DATA, ROOT, TINY_LLAMA, deep_update, tiny_recipe, write_recipe
from tests.raynodes import LocalRayCluster, _pids_in_sessions

pytestmark = pytest.mark.e2e
STEPS = 40


def recipe_file(tmp_path: Path, **changes) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    base = {"train": {"max_steps": STEPS}, "logging": {"every_steps": 1},
            "data": {"validation": None}, "resources": {"num_workers": 2}}
    base.update(changes)
    return write_recipe(tmp_path / "r.yaml", tiny_recipe(run_dir, **base)), run_dir


def env(tmp_path: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "FTLAUNCH_CACHE": str(tmp_path / "cache")}


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path)] if path.is_file() else []


def start_and_signal(
    tmp_path: Path, recipe: Path, run_dir: Path, sig: int, group: bool, backend: str = "torchrun"
):
    """Start the CLI in its own session, wait for step 2, send ``sig`` (to the whole process
    group, as a terminal's Ctrl-C does, or to the driver only, as Kubernetes does)."""
    err = tmp_path / "stderr.txt"
    with err.open("w") as f:
        driver = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", str(recipe), "--backend", backend,
             "--no-progress"], cwd=ROOT, env=env(tmp_path), stdout=subprocess.DEVNULL,
            stderr=f, start_new_session=True,
        )
    try:
        deadline = time.time() + 300
        while not any(s >= 2 for s in steps_logged(run_dir)):
            assert driver.poll() is None and time.time() < deadline, err.read_text()[-3000:]
            time.sleep(0.2)
        workers = psutil.Process(driver.pid).children(recursive=True)
        assert len(workers) >= 3  # torchrun and its two workers, or Ray's processes
        (os.killpg if group else os.kill)(driver.pid, sig)
        code = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"left running: {alive}"
    return code, err.read_text()


def resume_command(stderr: str) -> str:
    match = re.search(r"To resume, run:\n  (.+)\n", stderr)
    assert match, stderr[-3000:]
    return match.group(1)


def test_sigterm_commits_the_step_reached_and_the_printed_command_resumes(tmp_path):
    recipe, run_dir = recipe_file(tmp_path)
    code, err = start_and_signal(tmp_path, recipe, run_dir, signal.SIGTERM, group=False)
    assert code == 143, err[-3000:]
    reached = steps_logged(run_dir)[-1]
    assert 2 <= reached < STEPS
    assert [c.step for c in ckpt.committed(run_dir)] == [reached]
    assert not (run_dir / "final").exists()
    done = subprocess.run(["bash", "-c", resume_command(err)], env=env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming at step {reached}" in done.stdout + done.stderr
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))
    assert (run_dir / "final" / "config.json").is_file()


def test_ctrl_c_to_the_group_commits_and_stops(tmp_path):
    recipe, run_dir = recipe_file(tmp_path)
    code, err = start_and_signal(tmp_path, recipe, run_dir, signal.SIGINT, group=True)
    assert code == 130, err[-3000:]
    assert "To resume, run:" in err
    reached = steps_logged(run_dir)[-1]
    assert [c.step for c in ckpt.committed(run_dir)] == [reached]


def test_sigterm_without_on_preempt_stops_without_saving(tmp_path):
    recipe, run_dir = recipe_file(tmp_path, checkpoint={"on_preempt": False})
    code, err = start_and_signal(tmp_path, recipe, run_dir, signal.SIGTERM, group=False)
    assert code == 143, err[-3000:]
    assert ckpt.committed(run_dir) == []


class Driver:
    """``ftlaunch`` as a real process in a session of its own, stdout and stderr in files."""

    def __init__(self, tmp_path: Path, recipe: Path | None, *extra: str,
                 backend: str = "torchrun", environ: dict[str, str] | None = None,
                 name: str = "driver", command: str | None = None):
        """``command``: a shell command line (a printed resume command) instead of the CLI on
        ``recipe``; its shell leads the session, so signal it with ``group=True``."""
        self.out, self.err = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
        argv = ["bash", "-c", command] if command else [
            sys.executable, "-m", "launcher.cli", str(recipe), "--backend", backend,
            "--no-progress", *extra]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=environ or env(tmp_path), stdout=out, stderr=err,
                start_new_session=True,
            )

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        assert_session_empty(self.proc.pid)

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_until(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not condition():
            code = self.proc.poll()
            assert code is None, f"exited {code} before {what}:\n{self.output()[-3000:]}"
            assert time.time() < deadline, f"no {what} in {timeout} s"
            time.sleep(0.1)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def torchrun_workers(self) -> int:
        """How many workers torchrun has started (0 before torchrun runs: the tokenizer's
        worker processes are descendants too, so a plain count of them would mislead)."""
        for proc in self.descendants():
            try:
                if "torch.distributed.run" in proc.cmdline():
                    return len(proc.children())
            except psutil.NoSuchProcess:
                pass
        return 0

    def names(self) -> str:
        names = []
        for proc in self.descendants():
            try:
                names.append(proc.name())
            except psutil.NoSuchProcess:
                pass
        return " ".join(names)

    def send(self, sig: int, group: bool = False) -> None:
        (os.killpg if group else os.kill)(self.proc.pid, sig)

    def finish(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)


def assert_session_empty(session: int, timeout: float = 90) -> None:
    """Nothing the driver started is left: not its workers, nor Ray's processes (Ray's agents
    leave once they see their raylet gone, which on a loaded box takes tens of seconds)."""
    deadline = time.time() + timeout
    while (left := _pids_in_sessions({session})) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, f"left running: {[psutil.Process(p).cmdline()[:3] for p in left]}"


SAVED_STEPS = 8
SLOW = "slow_save:3+"  # the first save from step 3 on: the periodic one of step 4
SLOW_MARKER = ".fault_slow_save_3+"


def saving_recipe(tmp_path: Path, slow_s: float | None = None, **changes) -> tuple[Path, Path]:
    """Checkpoints every 2 steps with dropout on (so exact resume needs the RNG state), as in
    the resilience tests; ``slow_s`` makes the save of step 4 take that long."""
    run_dir = tmp_path / "run"
    base = {
        "model": {"architecture": {"attention_dropout": 0.1}},
        "train": {"max_steps": SAVED_STEPS, "micro_batch_size": 4, "lr": 3e-3,
                  "warmup_steps": 2, "seed": 5},
        "resources": {"num_workers": 2},
        "checkpoint": {"every_steps": 2, "keep_last": 3},
        "data": {"validation": None},
        "logging": {"every_steps": 1},
    }
    if slow_s is not None:
        fault = {"FTLAUNCH_TEST_FAULT": SLOW, "FTLAUNCH_TEST_SLOW_SAVE_S": str(slow_s)}
        base["resources"]["env"] = fault
    recipe = tiny_recipe(run_dir, **deep_update(base, changes))
    return write_recipe(tmp_path / "r.yaml", recipe), run_dir


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def resume(tmp_path: Path, stderr: str, environ: dict[str, str] | None = None):
    done = subprocess.run(["bash", "-c", resume_command(stderr)], env=environ or env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def assert_resumed_exactly(tmp_path: Path, err: str, run_dir: Path, at: int,
                           reference: Path) -> str:
    """The printed command resumes at step ``at`` and the run ends as the uninterrupted one."""
    out = resume(tmp_path, err)
    assert f"resuming at step {at}" in out, out[-3000:]
    assert steps_logged(run_dir) == list(range(1, SAVED_STEPS + 1))
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-6, abs=1e-6)
    assert [c.step for c in ckpt.committed(run_dir)] == [8, 6, 4]
    assert (run_dir / "final" / "config.json").is_file()
    return out


@pytest.fixture(scope="module")
def startup_stop(tmp_path_factory):
    """SIGTERM while the torchrun workers initialise (before step 1), then the printed
    command run to the end: that rerun is also the uninterrupted reference run. The workers
    stop at step 0 or, still initialising after the 3 s of grace, are killed."""
    tmp = tmp_path_factory.mktemp("startup")
    recipe, run_dir = saving_recipe(tmp, checkpoint={"preempt_grace_s": 3})
    with Driver(tmp, recipe) as driver:
        driver.wait_until(lambda: driver.torchrun_workers() >= 2, "torchrun and 2 workers")
        signalled_before_step_1 = steps_logged(run_dir) == []
        driver.send(signal.SIGTERM)
        code = driver.finish()
    stopped = {
        "code": code, "err": driver.err.read_text(), "early": signalled_before_step_1,
        "steps": steps_logged(run_dir), "checkpoints": sorted(
            p.name for p in (run_dir / "checkpoints").glob("*")),
    }
    return stopped, resume(tmp, stopped["err"]), run_dir


def test_sigterm_during_startup_stops_cleanly_and_the_rerun_trains(startup_stop):
    stopped, rerun, run_dir = startup_stop
    assert stopped["early"]
    assert stopped["code"] == 143, stopped["err"][-3000:]
    assert re.search(r"stopped by SIGTERM(; the grace period ran out \(checkpoint"
                     r"\.preempt_grace_s=3 s\))?; no checkpoint yet\. To resume, run:",
                     stopped["err"]), stopped["err"][-3000:]
    assert stopped["steps"] == [] and stopped["checkpoints"] == []
    assert "resuming at step 0" in rerun
    assert steps_logged(run_dir) == list(range(1, SAVED_STEPS + 1))
    assert [c.step for c in ckpt.committed(run_dir)] == [8, 6, 4]


def test_second_ctrl_c_stops_at_once_and_the_save_it_cut_is_skipped(startup_stop, tmp_path):
    """First Ctrl-C: stop after a save; the second: now. The save of step 4 (slowed to 600 s,
    with 120 s of grace) is abandoned before its commit marker."""
    recipe, run_dir = saving_recipe(tmp_path, slow_s=600, checkpoint={"preempt_grace_s": 120})
    with Driver(tmp_path, recipe) as driver:
        driver.wait_until((run_dir / SLOW_MARKER).exists, "the slow save of step 4")
        driver.send(signal.SIGINT, group=True)
        driver.wait_until((run_dir / "STOP.json").exists, "the stop request")
        time.sleep(1)
        assert driver.proc.poll() is None  # the first Ctrl-C waits for the save
        began = time.monotonic()
        driver.send(signal.SIGINT, group=True)
        code = driver.finish()
        took = time.monotonic() - began
    err = driver.err.read_text()
    assert code == 130, err[-3000:]
    assert took < 15, took
    assert ("stopped at once by a second signal (SIGINT, then SIGINT); a save in progress was "
            "dropped; newest committed checkpoint: step 2") in err
    assert (run_dir / "checkpoints" / ckpt.tag_for(4)).is_dir()
    assert [c.step for c in ckpt.committed(run_dir)] == [2]
    out = assert_resumed_exactly(tmp_path, err, run_dir, 2, startup_stop[2])
    assert f"{ckpt.tag_for(4)}: not committed" in out


def test_sigterm_during_a_save_lets_it_commit_then_stops(startup_stop, tmp_path):
    recipe, run_dir = saving_recipe(tmp_path, slow_s=4)
    with Driver(tmp_path, recipe) as driver:
        driver.wait_until((run_dir / SLOW_MARKER).exists, "the slow save of step 4")
        driver.send(signal.SIGTERM)
        code = driver.finish()
    err = driver.err.read_text()
    assert code == 143, err[-3000:]
    assert "stopped by SIGTERM; newest committed checkpoint: step 4" in err
    assert steps_logged(run_dir) == [1, 2, 3, 4]
    assert [c.step for c in ckpt.committed(run_dir)] == [4, 2]
    assert_resumed_exactly(tmp_path, err, run_dir, 4, startup_stop[2])


def test_grace_shorter_than_the_save_kills_it_uncommitted(startup_stop, tmp_path):
    recipe, run_dir = saving_recipe(tmp_path, slow_s=600, checkpoint={"preempt_grace_s": 2})
    with Driver(tmp_path, recipe) as driver:
        driver.wait_until((run_dir / SLOW_MARKER).exists, "the slow save of step 4")
        began = time.monotonic()
        driver.send(signal.SIGTERM)
        code = driver.finish()
        took = time.monotonic() - began
    err = driver.err.read_text()
    assert code == 143, err[-3000:]
    assert 2 <= took < 15, took
    assert ("stopped by SIGTERM; the grace period ran out (checkpoint.preempt_grace_s=2 s); "
            "newest committed checkpoint: step 2") in err
    assert [c.step for c in ckpt.committed(run_dir)] == [2]
    out = assert_resumed_exactly(tmp_path, err, run_dir, 2, startup_stop[2])
    assert f"{ckpt.tag_for(4)}: not committed" in out


def test_a_stop_while_the_driver_tokenizes_leaves_no_cache_and_the_command_resumes(tmp_path):
    """Stopped in data preparation, before any worker: SIGTERM to the driver, then, in the
    printed command's own data preparation, Ctrl-C to its whole process group (tokenizer
    processes included). Each time the tokenizer's processes end, no scratch directory or
    partial entry stays in the cache, and the printed command (the same form as for a stop
    mid-training) prepares the data afresh; the last one trains."""
    import json
    import random

    from launcher.data.synthetic import make_example

    rng = random.Random(0)
    data = tmp_path / "many rows #1.jsonl"  # ~4 s of tokenizing on 2 idle cores
    data.write_text("".join(json.dumps(make_example(rng)) + "\n" for _ in range(200_000)))
    recipe, run_dir = recipe_file(
        tmp_path, train={"max_steps": 2}, data={"train": str(data), "validation": None})
    cache = tmp_path / "cache" / "tokenized"
    command = None
    for sig, group, code in ((signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)):
        with Driver(tmp_path, recipe, command=command, name=sig.name) as driver:
            driver.wait_until(lambda: re.search(r"\b[1-9]\d*000/200000", driver.err.read_text()),
                              "tokenizing under way")
            pool = driver.descendants()
            driver.send(sig, group=group)
            exit_code = driver.finish()
        err = driver.err.read_text()
        assert exit_code == code, err[-3000:]
        assert f"ftlaunch: stopped by {sig.name}. To resume, run:" in err, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert "examples kept" not in err  # it stopped before the data was ready
        assert pool and not [p for p in pool if p.is_running()]
        assert list(cache.iterdir()) == []
        assert not run_dir.exists() or not (run_dir / "checkpoints").exists()
        command = resume_command(err)
    out = resume(tmp_path, err)
    assert "200000 examples kept" in out, out[-3000:]
    assert steps_logged(run_dir) == [1, 2]
    assert len(list(cache.iterdir())) == 1


SWALLOWING_CONFIG = """import os
import signal
import time

from transformers import LlamaConfig

# The first process to import this sends itself SIGTERM and swallows what its handler raises,
# as a library with a bare ``except`` would.
try:
    os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL))
except FileExistsError:
    pass
else:
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    except BaseException:
        pass

SwallowingConfig = LlamaConfig
"""


def test_a_stop_that_the_validation_swallowed_still_stops_the_command(tmp_path):
    """SIGTERM while the driver validates becomes an exception in whatever code runs then;
    code that catches it without re-raising (here a model directory's remote config code) must
    not turn the stop into a full training run: the command stops before the run directory is
    made, exit 143, with the command that resumes."""
    from transformers import LlamaConfig

    model = tmp_path / "model"
    LlamaConfig(**TINY_LLAMA).save_pretrained(str(model))
    marker = tmp_path / "signalled"
    (model / "configuration_swallowing.py").write_text(
        f"MARKER = {str(marker)!r}\n" + SWALLOWING_CONFIG)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_swallowing.SwallowingConfig"}
    (model / "config.json").write_text(json.dumps(config))
    recipe, run_dir = recipe_file(tmp_path, model={
        "name_or_path": str(model), "architecture": None, "revision": "local",
        "trust_remote_code": True, "tokenizer": str(DATA / "tokenizer")})
    with Driver(tmp_path, recipe) as driver:
        code = driver.finish(timeout=300)
    err = driver.err.read_text()
    assert marker.exists(), err[-3000:]  # the signal was sent and swallowed
    assert code == 143, err[-3000:]
    assert "ftlaunch: stopped by SIGTERM. To resume, run:" in err, err[-3000:]
    assert not run_dir.exists()


def test_ray_stops_in_startup_mid_run_and_mid_resume_then_resumes(tmp_path):
    """The embedded Ray, stopped three ways: SIGTERM while Ray starts (on the session's
    thread, beside the driver's validation, so the driver's handler, not Ray's exit-15 one,
    takes it); SIGTERM to the driver
    alone mid-run, as Kubernetes sends it (the step reached is committed, Ray stopped; the
    driver's handler reclaimed from the core worker's aborting one); then the printed
    command, stopped in its turn by Ctrl-C to its whole process group, as a terminal sends it.
    The command printed then trains to the end. Steps are slowed to 0.1 s so that each
    signal lands well before the last step."""
    recipe, run_dir = recipe_file(tmp_path, resources={"num_workers": 2, "env": {
        "FTLAUNCH_TEST_FAULT": "slow_step:1+", "FTLAUNCH_TEST_SLOW_STEP_S": "0.1"}})
    with Driver(tmp_path, recipe, backend="ray", name="startup") as driver:
        driver.wait_until(lambda: "gcs_server" in driver.names(), "Ray's processes")
        driver.send(signal.SIGTERM)
        code = driver.finish()
    err = driver.err.read_text()
    assert code == 143, err[-3000:]
    # Ray starts while the driver validates: the signal may land in the validation (the
    # command's own stop message) or after it (the launch's, which names the checkpoint)
    assert re.search(r"stopped by SIGTERM((; the grace period ran out \(.*\))?; no checkpoint "
                     r"yet)?\. To resume, run:", err), err[-3000:]
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]
    assert steps_logged(run_dir) == []

    with Driver(tmp_path, recipe, backend="ray", name="interrupted") as driver:
        driver.wait_until(lambda: any(s >= 2 for s in steps_logged(run_dir)), "step 2")
        driver.send(signal.SIGTERM)
        code = driver.finish()
    err = driver.err.read_text()
    assert code == 143, driver.output()[-3000:]
    reached = steps_logged(run_dir)[-1]
    assert 2 <= reached < STEPS
    assert [c.step for c in ckpt.committed(run_dir)] == [reached]
    assert f"stopped by SIGTERM; newest committed checkpoint: step {reached}" in err

    with Driver(tmp_path, None, command=resume_command(err), name="resumed") as driver:
        driver.wait_until(lambda: any(s >= reached + 2 for s in steps_logged(run_dir)),
                          f"step {reached + 2}")
        driver.send(signal.SIGINT, group=True)
        code = driver.finish()
    out, err = driver.output(), driver.err.read_text()
    assert code == 130, out[-3000:]
    assert f"resuming at step {reached}" in out
    again = steps_logged(run_dir)[-1]
    assert reached + 2 <= again < STEPS
    assert [c.step for c in ckpt.committed(run_dir)] == [again, reached]
    assert f"stopped by SIGINT; newest committed checkpoint: step {again}" in err
    assert f"resuming at step {again}" in resume(tmp_path, err)
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))


@pytest.fixture
def external_cluster(tmp_path):
    cluster = LocalRayCluster(tmp_path / "cluster")
    try:
        cluster.start_head(num_cpus=2)
        yield cluster
    finally:
        cluster.stop()


def cluster_cpus(cluster: LocalRayCluster) -> tuple[float, float]:
    """(available, total) CPUs, from a new client; available once released (30 s at most)."""
    code = (
        "import ray, time; ray.init(address=%r, logging_level='ERROR'); end = time.time() + 30\n"
        "while ray.available_resources().get('CPU', 0) < 2 and time.time() < end:"
        " time.sleep(0.5)\n"
        "print(ray.available_resources().get('CPU', 0), ray.cluster_resources()['CPU'])"
    ) % cluster.address
    out = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True,
                         text=True, timeout=120, check=True)
    available, total = out.stdout.split()[-2:]
    return float(available), float(total)


def test_sigterm_on_an_external_cluster_ends_the_job_not_the_cluster(external_cluster, tmp_path):
    recipe, run_dir = recipe_file(tmp_path)
    address = ("--address", external_cluster.address)
    with Driver(tmp_path, recipe, *address, backend="ray", environ=external_cluster.env) as driver:
        driver.wait_until(lambda: any(s >= 2 for s in steps_logged(run_dir)), "step 2")
        driver.send(signal.SIGTERM)
        code = driver.finish()
    err = driver.err.read_text()
    assert code == 143, driver.output()[-3000:]
    reached = steps_logged(run_dir)[-1]
    assert [c.step for c in ckpt.committed(run_dir)] == [reached]
    log = (run_dir / "driver.log").read_text()
    assert f"[ftlaunch] Ray joined at {external_cluster.address}: GCS at " in log
    assert cluster_cpus(external_cluster) == (2.0, 2.0)  # alive, the job's workers gone
    out = resume(tmp_path, err, external_cluster.env)
    assert f"resuming at step {reached}" in out
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("path", ["runs/exp #3", "runs/a: b", "runs/-x", "runs/ spaced "])
def test_output_dir_is_taken_literally(cli, tmp_path, path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    target = str(tmp_path / path)
    code, out, err = cli("check", recipe, "--offline", f"--output-dir={target}")
    assert code == 0, err
    assert yaml.safe_load(out.split("# DeepSpeed config")[0])["output_dir"] == target


def test_sigterm_while_ray_starts_and_the_driver_tokenizes_stops_cleanly(tmp_path):
    """On the Ray backend the launch starts Ray while it prepares the data, so the tokenizer's
    processes are forked after Ray's threads started. A SIGTERM to the driver then ends the
    command with 143 and the resume command, no crash report from Ray's failure handler, and
    nothing left running (Driver's exit checks): tokenizer processes, Ray's processes."""
    import json
    import random

    from launcher.data.synthetic import make_example

    rng = random.Random(0)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(make_example(rng)) + "\n" for _ in range(200_000)))
    recipe, run_dir = recipe_file(
        tmp_path, train={"max_steps": 2}, data={"train": str(data), "validation": None})
    with Driver(tmp_path, recipe, backend="ray") as driver:
        driver.wait_until(
            lambda: re.search(r"\b[1-9]\d*000/200000", driver.err.read_text())
            and "raylet" in driver.names(), "tokenizing with Ray's raylet up")
        driver.send(signal.SIGTERM)
        exit_code = driver.finish()
    err = driver.err.read_text()
    assert exit_code == 143, err[-3000:]
    assert "ftlaunch: stopped by SIGTERM. To resume, run:" in err, err[-3000:]
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]
    assert not (run_dir / "checkpoints").exists()


def test_kill_9_of_the_driver_while_it_tokenizes_leaves_no_tokenizer_process(tmp_path):
    """SIGKILL to the driver alone (the OOM killer's way), mid-tokenizing: the pool's
    processes end with it instead of waiting on the pool's queue for good (Driver's exit
    checks that nothing of the session is left)."""
    import json
    import random

    from launcher.data.synthetic import make_example

    rng = random.Random(0)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(make_example(rng)) + "\n" for _ in range(200_000)))
    recipe, _ = recipe_file(
        tmp_path, train={"max_steps": 2}, data={"train": str(data), "validation": None})
    with Driver(tmp_path, recipe) as driver:
        driver.wait_until(lambda: re.search(r"\b[1-9]\d*000/200000", driver.err.read_text()),
                          "tokenizing under way")
        pool = driver.descendants()
        driver.send(signal.SIGKILL)
        assert driver.finish() == -signal.SIGKILL
        _, alive = psutil.wait_procs(pool, timeout=30)
        assert pool and not alive, f"left running: {alive}"
