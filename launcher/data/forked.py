"""Shards of one piece of work, each in a process forked for it alone, that a stop ends at
once and for good.

``datasets.map(num_proc=N)`` runs its shards on a ``multiprocess`` pool. A KeyboardInterrupt
or SIGTERM raised in the parent while it waits sends that pool through ``Pool.terminate``,
which can wait forever: under load, one SIGTERM in 19 to a driver that was tokenizing hung
there (the pool's task thread blocked on its task queue's lock, the parent joining it). A
child here shares no lock with its parent: it reports progress, and what failed in it, as
lines on a pipe (each one write of at most PIPE_BUF bytes, so lines of different children never
interleave; nothing goes through the disk, which may be the thing that is full), and how it
ended as its exit status. However the parent leaves its wait
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
from typing import Any, NoReturn

from launcher.errors import UserInputError

Report = Callable[[int], None]  # a shard calls it with how many more items it has done
Shard = Callable[[Report], None]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1
EXIT_INPUT_ERROR = 2


class ShardFailed(RuntimeError):
    """A shard's process crashed or was killed (not bad input, which is a UserInputError)."""


def run_shards(shards: Sequence[Shard], progress: Report) -> None:
    """Run each shard in a child of its own and wait for all of them, calling ``progress``
    with what they report. A shard that raised UserInputError raises it here (same place,
    same message), OSError likewise (same errno and file: a full disk stays one); one that
    crashed otherwise or was killed raises ShardFailed. When shards fail, the error raised is
    the first shard's in order (the first bad row of a file, whichever process reaches its
    own first): the shards after a failed one are killed at once, those before it finish."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    children: dict[int, int] = {}
    lines = _Lines(progress)
    try:
        for index, shard in enumerate(shards):
            _fork(shard, index, (read_fd, write_fd), children)
        os.close(write_fd)
        write_fd = -1
        _wait(children, read_fd, lines)
    finally:
        for pid in children:
            _kill(pid)
        for pid in children:
            os.waitpid(pid, 0)
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def _wait(children: dict[int, int], read_fd: int, lines: _Lines) -> None:
    """Reap the children as they end (taking them out of ``children``) and read what they
    report, until all have ended or the first failed shard in order is known."""
    errors: dict[int, BaseException] = {}
    while children:
        select.select([read_fd], [], [], 0.1)
        lines.read(read_fd)
        for pid, index in list(children.items()):
            ended, status = os.waitpid(pid, os.WNOHANG)
            if not ended:
                continue
            del children[pid]
            if status:
                lines.read(read_fd)  # what it wrote before it ended
                errors[index] = _failure(index, status, lines.failures.get(index, {}))
                for later, other in children.items():
                    if other > index:
                        _kill(later)
        if errors and all(index > min(errors) for index in children.values()):
            raise errors[min(errors)]
    lines.read(read_fd)


class _Lines:
    """What the children wrote: a number is progress, a JSON object one child's failure."""

    def __init__(self, progress: Report):
        self.progress = progress
        self.failures: dict[int, dict[str, Any]] = {}
        self.unread = b""

    def read(self, fd: int) -> None:
        """Whatever is in the pipe now (non-blocking)."""
        chunks = [self.unread]
        try:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        *lines, self.unread = b"".join(chunks).split(b"\n")
        done = 0
        for line in lines:
            if line.startswith(b"{"):
                failure = json.loads(line)
                self.failures[failure["index"]] = failure
            else:
                done += int(line)
        if done:
            self.progress(done)


def _failure(index: int, status: int, failure: dict[str, Any]) -> BaseException:
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status))
        hint = " (out of memory? fewer processes, data.num_proc, need less)" \
            if sig == signal.SIGKILL else ""
        return ShardFailed(f"tokenizing process {index} was killed by {sig.name}{hint}")
    if "where" in failure:
        return UserInputError(failure["where"], failure["message"])
    crash = ShardFailed(f"tokenizing process {index} exited {os.WEXITSTATUS(status)}:\n"
                        + failure.get("traceback", "(no traceback)"))
    if "errno" in failure:
        error = OSError(failure["errno"], failure["strerror"], failure["filename"])
        error.__cause__ = crash
        return error
    return crash


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _fork(shard: Shard, index: int, pipe: tuple[int, int], children: dict[int, int]) -> None:
    """Fork the shard's child and enter it into ``children`` before a stop signal can be
    handled here, so the clean-up that a stop runs knows every child."""
    parent = os.getpid()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with warnings.catch_warnings():  # 3.12+: fork from a process with threads
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            _child(shard, index, pipe, parent, mask)
        children[pid] = index
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _child(shard: Shard, index: int, pipe: tuple[int, int], parent: int,
           mask: set[signal.Signals]) -> NoReturn:
    code = 1
    read_fd, write_fd = pipe
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        _end_with(parent)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(read_fd)

        def report(done: int) -> None:
            os.write(write_fd, b"%d\n" % done)

        shard(report)
        code = 0
    except UserInputError as e:
        _send(write_fd, {"index": index, "where": e.where, "message": e.message})
        code = EXIT_INPUT_ERROR
    except OSError as e:
        _send(write_fd, {"index": index, "errno": e.errno, "strerror": e.strerror,
                         "filename": e.filename, "traceback": traceback.format_exc()})
    except BaseException:
        _send(write_fd, {"index": index, "traceback": traceback.format_exc()})
    finally:
        os._exit(code)


def _send(fd: int, failure: dict[str, Any]) -> None:
    """One line in one write of at most PIPE_BUF bytes: while it is longer, the longest text
    in it is halved (a traceback keeps its end, any other text its start)."""
    line = json.dumps(failure).encode() + b"\n"
    while len(line) > select.PIPE_BUF:
        name = max((k for k, v in failure.items() if isinstance(v, str)),
                   key=lambda k: len(failure[k]))
        text = failure[name]
        half = len(text) // 2
        failure[name] = "..." + text[len(text) - half:] if name == "traceback" else text[:half] + "..."
        line = json.dumps(failure).encode() + b"\n"
    try:
        os.write(fd, line)
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
