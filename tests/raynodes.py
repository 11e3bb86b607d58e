"""Real Ray clusters of several nodes on one machine, for the multi-node and job tests.

Each node is a ``ray start`` in its own session. Teardown signals only those sessions: SIGTERM
and then SIGKILL to the process group, then SIGKILL to anything left in the session (Ray
workers make their own process group but stay in the session). Never ``ray stop``: it ends
every Ray process on the machine, other people's included.

Token authentication is on, with a token made here (``env`` is what clients need). The nodes
see an ``ftlaunch`` command and the tokenization cache of the test run, as an installed
cluster image would provide.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.driver import ports

ROOT = Path(__file__).resolve().parent.parent
RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


_handed_out: set[int] = set()


def free_port() -> int:
    """A free port never handed out before in this process: two nodes' agents asking for the
    same port would make one of them fail to start."""
    while (port := ports.free_port()) in _handed_out:
        pass
    _handed_out.add(port)
    return port


def can_isolate_mounts(scratch: Path) -> bool:
    """Whether this machine lets a process get its own view of a directory (a private mount
    namespace with a tmpfs on it), to play a node whose disk is not shared."""
    if not shutil.which("unshare"):
        return False
    scratch.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(
        [*_unshare(), "sh", "-c", 'mount -t tmpfs probe "$0"', str(scratch)],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def _unshare() -> list[str]:
    root = os.geteuid() == 0
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        *([] if root else ["--map-root-user"]),
    ]


@dataclass
class LocalRayCluster:
    base: Path
    dashboard: bool = False
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    address: str = ""
    dashboard_url: str | None = None
    sessions: list[int] = field(default_factory=list)
    # Short (socket paths have a length limit), and private: ``ray start`` writes the address
    # file ray_current_cluster there instead of /tmp/ray, where it would outlive the cluster.
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    private_dirs: dict[str, Path] = field(default_factory=dict)
    _node_ids: dict[str, str] | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment of every node, and what a client needs to reach the cluster."""
        bin_dir = self.base / "bin"
        return os.environ | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
            "FTLAUNCH_CACHE": str(self.base / "cache"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_DEDUP_LOGS": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def start_head(self, num_cpus: int = 1, resources: str = "node_a") -> None:
        self._install_ftlaunch()
        port = free_port()
        args = [
            "--head",
            f"--port={port}",
            f"--ray-client-server-port={free_port()}",
            f"--include-dashboard={str(self.dashboard).lower()}",
            f"--temp-dir={self.temp_dir}",
        ]
        if self.dashboard:
            dashboard_port = free_port()
            args.append(f"--dashboard-port={dashboard_port}")
            self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self._start("head", [*args, *self._node_args(num_cpus, resources)], prefix=[])
        self.address = f"127.0.0.1:{port}"

    def add_node(self, name: str, num_cpus: int = 1, private_dir: Path | None = None) -> None:
        """Join a node with custom resource ``name``. With ``private_dir``, the node sees an
        empty, node-local directory there: storage the other nodes do not share."""
        prefix: list[str] = []
        if private_dir is not None:
            private_dir.mkdir(parents=True, exist_ok=True)
            self.private_dirs[name] = private_dir
            prefix = [
                *_unshare(),
                "sh",
                "-c",
                'mount -t tmpfs nodelocal "$0" && shift && exec "$@"',
                str(private_dir),
                "--",
            ]
        args = [f"--address={self.address}", *self._node_args(num_cpus, name)]
        self._start(name, args, prefix)

    def _node_args(self, num_cpus: int, resource: str) -> list[str]:
        return [
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps({resource: 1})}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--disable-usage-stats",
        ]

    def _start(self, name: str, args: list[str], prefix: list[str]) -> None:
        log = self.base / f"{name}.log"
        process = subprocess.Popen(
            [*prefix, RAY, "start", *args],
            env=self.env,
            start_new_session=True,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        self.sessions.append(process.pid)
        if process.wait(timeout=120) != 0:
            raise RuntimeError(
                f"ray start ({name}) failed:\n{log.read_text()[-3000:]}\n{self._ray_logs()}"
            )

    def _ray_logs(self, tail: int = 1500) -> str:
        """The ends of the session's own logs: why a node did not come up is only there (the
        temp dir is removed at teardown)."""
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        wanted = ("gcs_server", "raylet", "dashboard_agent", "runtime_env_agent")
        parts = []
        for path in sorted(logs.glob("*")):
            if path.is_file() and path.name.startswith(wanted) and path.stat().st_size:
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def _install_ftlaunch(self) -> None:
        bin_dir = self.base / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        script = bin_dir / "ftlaunch"
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m launcher.cli "$@"\n')
        script.chmod(0o755)

    def node_ids(self) -> dict[str, str]:
        """Custom resource name (node_a, node_b, ...) -> Ray node id."""
        if self._node_ids is None:
            code = (
                "import json, ray; ray.init(address='auto', logging_level='ERROR');"
                "print(json.dumps({k: n['NodeID'] for n in ray.nodes() if n['Alive']"
                " for k in n['Resources'] if k.startswith('node_')}))"
            )
            out = subprocess.run(
                [sys.executable, "-c", code],
                env=self.env | {"RAY_ADDRESS": self.address},
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            self._node_ids = json.loads(out.stdout.strip().splitlines()[-1])
        return self._node_ids

    def actor_nodes(self, class_name: str) -> list[str]:
        """Node ids of the actors of ``class_name`` the cluster ran, from Ray's state API."""
        assert self.dashboard_url, "the state API needs the dashboard"
        code = (
            "import json; from ray.util.state import list_actors;"
            f"print(json.dumps([a.node_id for a in list_actors(address={self.dashboard_url!r},"
            f" filters=[('class_name', '=', {class_name!r})], limit=10000)]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    def run_ftlaunch(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "launcher.cli", *map(str, args)],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for session in self.sessions:
                try:
                    os.killpg(session, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2 if sig == signal.SIGTERM else 0.5)
        for pid in _pids_in_sessions(set(self.sessions)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pids_in_sessions(sessions: set[int]) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) in sessions:  # after the name: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids
