"""The tokenizer's forked shards (launcher.data.forked): real forks, real signals. What a stop,
a bad row, a crash or a killed parent leaves behind: no process, no zombie, the right error."""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launcher.data.forked import ShardFailed, run_shards
from launcher.driver.stop import Terminated, signals_raise
from launcher.errors import UserInputError
from tests.conftest import ROOT


def _gone(pid: int) -> bool:
    """Ended and reaped: no process, not even a zombie."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_DEAD
    except psutil.NoSuchProcess:
        return True


def _wait_for(paths: list[Path], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        assert time.time() < deadline, f"not written: {[p for p in paths if not p.exists()]}"
        time.sleep(0.02)


class Sleeper:
    """A shard that writes its pid, reports some progress, then sleeps until killed."""

    def __init__(self, pids: Path, index: int):
        self.path = pids / f"{index}.pid"

    def __call__(self, report) -> None:
        report(3)
        self.path.write_text(str(os.getpid()))
        time.sleep(600)


def test_shards_report_progress_and_start_with_default_signal_handling(tmp_path):
    """Under the CLI's raising handlers and with the stop signals blocked in the parent, each
    child still starts with SIGINT and SIGTERM at their default action and nothing blocked;
    every item reported reaches the parent."""

    def shard(report) -> None:
        state = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
                 signal.pthread_sigmask(signal.SIG_BLOCK, []))
        (tmp_path / f"{os.getpid()}.state").write_text(repr(state))
        for _ in range(100):
            report(7)

    counted = []
    with signals_raise():
        installed = signal.getsignal(signal.SIGTERM)
        run_shards([shard] * 3, counted.append)
        assert signal.getsignal(signal.SIGTERM) is installed
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # the parent's, restored
    assert sum(counted) == 3 * 100 * 7
    states = [p.read_text() for p in tmp_path.glob("*.state")]
    assert states == [repr((signal.SIG_DFL, signal.SIG_DFL, set()))] * 3


def test_a_stop_in_the_wait_kills_and_reaps_every_shard_first(tmp_path):
    """SIGTERM while the parent waits (the CLI's handler raises Terminated there): by the time
    the exception reaches the caller, no shard process is left, not even as a zombie."""
    shards = [Sleeper(tmp_path, i) for i in range(2)]
    pids_written = [s.path for s in shards]
    with signals_raise(), pytest.raises(Terminated):
        signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM)
                      if all(p.exists() for p in pids_written) else signal.alarm(1))
        signal.alarm(1)
        try:
            run_shards(shards, lambda n: None)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
    pids = [int(p.read_text()) for p in pids_written]
    assert all(_gone(pid) for pid in pids), pids


def test_a_bad_row_in_one_shard_is_the_users_error_and_ends_the_others(tmp_path):
    sleeper = Sleeper(tmp_path, 1)

    def bad(report) -> None:
        _wait_for([sleeper.path])
        raise UserInputError("data.jsonl:4001", "field 'prompt' is missing")

    with pytest.raises(UserInputError) as raised:
        run_shards([bad, sleeper], lambda n: None)
    assert (raised.value.where, raised.value.message) == ("data.jsonl:4001",
                                                          "field 'prompt' is missing")
    assert _gone(int(sleeper.path.read_text()))


def test_the_first_bad_row_in_file_order_is_reported_whichever_process_fails_first(tmp_path):
    """Shard 1 fails first; shard 0, still running, fails later on an earlier row: the error
    is shard 0's, and shard 2 (whose rows come after the failure) was killed meanwhile."""
    marker = tmp_path / "second failed"
    sleeper = Sleeper(tmp_path, 2)

    def first(report) -> None:
        _wait_for([marker, sleeper.path])
        time.sleep(0.5)  # the parent has seen shard 1 end
        raise UserInputError("f.jsonl:10", "bad")

    def second(report) -> None:
        marker.touch()
        raise UserInputError("f.jsonl:2010", "bad")

    with pytest.raises(UserInputError, match="f.jsonl:10: bad"):
        run_shards([first, second, sleeper], lambda n: None)
    assert _gone(int(sleeper.path.read_text()))


def test_a_crashed_or_killed_shard_is_a_failure_that_says_which_and_why(tmp_path):
    def crash(report) -> None:
        raise ZeroDivisionError("the encoder divided by zero")

    with pytest.raises(ShardFailed, match=r"(?s)process 0 exited 1:.*ZeroDivisionError: the "
                                          r"encoder divided by zero"):
        run_shards([crash], lambda n: None)

    def killed(report) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(ShardFailed, match=r"process 1 was killed by SIGKILL \(out of memory\?"):
        run_shards([lambda report: None, killed], lambda n: None)


def test_a_full_disk_in_a_shard_stays_an_os_error_and_long_failures_arrive_whole(tmp_path):
    """The caller tells a full disk from a crash by errno, so an OSError crosses as one,
    file name included. A failure longer than one atomic pipe write is shortened (a
    traceback keeps its end), never cut into a line that garbles what the others report."""

    def full(report) -> None:
        report(5)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.arrow"))

    with pytest.raises(OSError) as raised:
        run_shards([full], lambda n: None)
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(tmp_path / "x.arrow"))
    assert "in full" in str(raised.value.__cause__)  # the child's traceback

    def chatty(report) -> None:
        for _ in range(2000):
            report(1)

    def long_failure(report) -> None:
        def deep(n: int) -> None:
            if n:
                deep(n - 1)
            raise ValueError("x" * 50_000 + " the end")
        deep(100)

    counted = []
    with pytest.raises(ShardFailed, match=r"(?s)process 2 exited 1:\n\.\.\..*x the end") as raised:
        run_shards([chatty, chatty, long_failure], counted.append)
    assert len(str(raised.value)) < select.PIPE_BUF
    assert sum(counted) <= 4000  # every line read was a whole one


FAILING_AT_ONCE = """
import time
from launcher.data.forked import run_shards
from launcher.driver.stop import signals_raise
from launcher.errors import UserInputError

def bad(report):
    raise UserInputError("f.jsonl:1", "bad")

with signals_raise():
    for _ in range(200):
        try:
            run_shards([bad, lambda report: time.sleep(0.01)], lambda done: None)
        except UserInputError:
            pass
print("all ended")
"""


def test_shards_failing_as_they_start_never_hang(tmp_path):
    """A file whose first row is bad fails one shard while the others start: 200 times in a
    row the parent ends them all and returns (datasets' own pool hung on this, once in ~20).
    Run in a session of its own, so that a hang leaves nothing holding the test's pipes."""
    out = tmp_path / "out.txt"
    with out.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-c", FAILING_AT_ONCE], cwd=ROOT,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert code == 0 and "all ended" in out.read_text(), (code, out.read_text()[-3000:])


KILLED_PARENT = """
import sys, time
from pathlib import Path
from launcher.data.forked import run_shards

def sleeper(index):
    def shard(report):
        (Path(sys.argv[1]) / f"{index}.pid").write_text(str(__import__("os").getpid()))
        time.sleep(600)
    return shard

run_shards([sleeper(0), sleeper(1)], lambda done: None)
"""


def test_a_parent_killed_with_sigkill_leaves_no_shard_running(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PARENT, str(tmp_path)], cwd=ROOT)
    paths = [tmp_path / "0.pid", tmp_path / "1.pid"]
    try:
        _wait_for(paths)
    finally:
        proc.kill()
        proc.wait()
    pids = [int(p.read_text()) for p in paths]
    deadline = time.time() + 30
    while not all(_gone(pid) for pid in pids):
        assert time.time() < deadline, "a shard outlived its parent"
        time.sleep(0.05)
