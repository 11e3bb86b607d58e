"""Shards of one piece of work, each in a process forked for it alone, that a stop ends at
once and for good.

``datasets.map(num_proc=N)`` runs its shards on a ``multiprocess`` pool. A KeyboardInterrupt
or SIGTERM raised in the parent while it waits sends that pool through ``Pool.terminate``,
which can wait forever: under load, one SIGTERM in 19 to a driver that was tokenizing hung
there (the pool's task thread blocked on its task queue's lock, the parent joining it). A
child here shares no lock with its parent: it reports progress as lines on a pipe, and how it
ended as its exit status and, when it failed, a JSON file. However the parent leaves its wait
(a stop, a failed shard), it kills the children that are left with SIGKILL and reaps them
before the exception goes on, so nothing can wait on a child that will never answer.

A child starts with SIGINT and SIGTERM at their default action (they are blocked across the
fork, so one sent meanwhile stays pending and then ends it: a Ctrl-C to the process group
ends the children while the parent cleans up) and gets SIGKILL when the thread that forked
it ends (Linux: ``PR_SET_PDEATHSIG``), so a parent killed with SIGKILL leaves none behind.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from launcher.errors import UserInputError

Report = Callable[[int], None]  # a shard calls it with how many more items it has done
Shard = Callable[[Report], None]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1
EXIT_INPUT_ERROR = 2


class ShardFailed(RuntimeError):
    """A shard's process crashed or was killed (not bad input, which is a UserInputError)."""


def run_shards(shards: Sequence[Shard], scratch: Path, progress: Report) -> None:
    """Run each shard in a child of its own and wait for all of them, calling ``progress``
    with what they report. A shard that raised UserInputError raises it here (same place,
    same message); one that crashed or was killed raises ShardFailed. ``scratch`` holds the
    children's failure files."""
    scratch.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    children: dict[int, int] = {}
    try:
        for index, shard in enumerate(shards):
            _fork(shard, index, scratch, (read_fd, write_fd), children)
        os.close(write_fd)
        write_fd = -1
        _wait(children, read_fd, scratch, progress)
    finally:
        for pid in children:
            _kill(pid)
        for pid in children:
            os.waitpid(pid, 0)
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def _wait(children: dict[int, int], read_fd: int, scratch: Path, progress: Report) -> None:
    """Until every child has ended: progress as it comes, each child reaped as it ends (and
    taken out of ``children``); the first that failed raises."""
    unread = b""
    while children:
        if select.select([read_fd], [], [], 0.1)[0]:
            lines = (unread + os.read(read_fd, 65536)).split(b"\n")
            unread = lines.pop()
            if done := sum(int(line) for line in lines):
                progress(done)
        for pid in list(children):
            ended, status = os.waitpid(pid, os.WNOHANG)
            if ended:
                index = children.pop(pid)
                if status:
                    raise _failure(index, status, scratch)
    while chunk := os.read(read_fd, 65536):  # all writers have ended: no wait
        unread += chunk
    if done := sum(int(line) for line in unread.split()):
        progress(done)


def _failure(index: int, status: int, scratch: Path) -> BaseException:
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status))
        hint = " (out of memory? fewer processes, data.num_proc, need less)" \
            if sig == signal.SIGKILL else ""
        return ShardFailed(f"tokenizing process {index} was killed by {sig.name}{hint}")
    report = _failure_file(scratch, index)
    failure = json.loads(report.read_text()) if report.is_file() else {}
    if "where" in failure:
        return UserInputError(failure["where"], failure["message"])
    return ShardFailed(f"tokenizing process {index} exited {os.WEXITSTATUS(status)}:\n"
                       + failure.get("traceback", "(no traceback)"))


def _failure_file(scratch: Path, index: int) -> Path:
    return scratch / f"shard-{index}.failure.json"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _fork(shard: Shard, index: int, scratch: Path, pipe: tuple[int, int],
          children: dict[int, int]) -> None:
    """Fork the shard's child and enter it into ``children`` before a stop signal can be
    handled here, so the clean-up that a stop runs knows every child."""
    parent = os.getpid()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with warnings.catch_warnings():  # 3.12+: fork from a process with threads
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            _child(shard, index, scratch, pipe, parent, mask)
        children[pid] = index
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _child(shard: Shard, index: int, scratch: Path, pipe: tuple[int, int],
           parent: int, mask: set[signal.Signals]) -> NoReturn:
    code = 1
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        _end_with(parent)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        read_fd, write_fd = pipe
        os.close(read_fd)

        def report(done: int) -> None:  # one short write: lines of children never interleave
            os.write(write_fd, b"%d\n" % done)

        shard(report)
        code = 0
    except UserInputError as e:
        _write_failure(scratch, index, {"where": e.where, "message": e.message})
        code = EXIT_INPUT_ERROR
    except BaseException:
        _write_failure(scratch, index, {"traceback": traceback.format_exc()})
    finally:
        os._exit(code)


def _write_failure(scratch: Path, index: int, failure: dict[str, str]) -> None:
    try:
        _failure_file(scratch, index).write_text(json.dumps(failure))
    except OSError:
        pass  # the exit status still says it failed


def _end_with(parent: int) -> None:
    """SIGKILL for this process when the thread that forked it ends (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    if ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0 \
            and os.getppid() != parent:  # the parent ended before the call
        os._exit(1)
