"""Where a Ray cluster is and whether it is safe to talk to: the job server's URL, the refusal
of a plain-text or unauthenticated connection to another machine (``ftlaunch submit``, ``jobs``,
``train --address``, ``preflight``), and whether anything answers at a cluster address."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from launcher.errors import UserInputError

ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def job_server_address(address: str | None) -> str:
    """``--address``, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, as an http(s) URL."""
    address = address or next((os.environ[k] for k in ADDRESS_ENV if os.environ.get(k)), None)
    if not address:
        raise UserInputError(
            "--address", "the Ray job server to use, e.g. http://HEAD:8265 (or set RAY_ADDRESS)"
        )
    if "://" not in address:
        address = f"http://{address}"
    url = urlparse(address)
    if url.username is not None or url.password is not None:
        raise UserInputError(
            "--address",
            "has credentials in the URL, which would be printed and logged; give the address "
            "alone and the token in RAY_AUTH_TOKEN",
        )
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserInputError(
            "--address", f"'{address}' is not a job server URL such as http://HEAD:8265"
        )
    return address


def is_loopback(address: str) -> bool:
    host = urlparse(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_auth_problem(env: Mapping[str, str]) -> str | None:
    """Why this client would not use Ray token authentication, or None when it would."""
    if env.get("RAY_AUTH_MODE", "").lower() != "token":
        return "RAY_AUTH_MODE is not 'token'"
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return None
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if path.is_file() and path.read_text().strip():
        return None
    return f"no token was found (RAY_AUTH_TOKEN is unset and {path} holds none)"


def check_transport(address: str, insecure: bool, env: Mapping[str, str]) -> None:
    """Refuse, before any connection, to talk to another machine's job server over plain
    http:// (the token and the job would cross the network readable by anyone on the path) or
    without token auth. ``--insecure`` allows both."""
    if insecure or is_loopback(address):
        return
    if urlparse(address).scheme != "https":
        raise UserInputError(
            "--address",
            f"{address} is another machine over plain http://: the Ray token in every request, "
            "the recipe and the logs would cross the network unencrypted. Use an SSH tunnel "
            "(ssh -L 8265:localhost:8265 HEAD, then --address http://127.0.0.1:8265) or an "
            "https:// proxy in front of the job server; see 'Submitting from your laptop' in "
            "README.md. On a network you trust, --insecure connects anyway.",
        )
    problem = token_auth_problem(env)
    if problem:
        raise UserInputError(
            "--address",
            f"{address} is another machine and {problem}. Ray's job server runs any command "
            "it is sent for whoever reaches it, so ftlaunch submits to a remote cluster only "
            "with token authentication: export RAY_AUTH_MODE=token and the cluster's token in "
            "RAY_AUTH_TOKEN (or ~/.ray/auth_token); see 'Submitting from your laptop' in "
            "README.md. On a network you trust, --insecure submits anyway.",
        )


def check_cluster_address(address: str | None, insecure: bool, env: Mapping[str, str]) -> None:
    """``train``/``preflight --address`` (else RAY_ADDRESS): a Ray cluster to join, checked
    before any connection. Credentials in it are refused (it is printed and logged), as is a
    job server URL (http://, https://: that is ``ftlaunch submit``'s). ``ray://`` (Ray Client)
    to another machine is plain gRPC carrying the token, the job and its data, so it needs
    Ray's TLS (RAY_USE_TLS=1) or ``--insecure``. ``HOST:PORT`` (the GCS) and ``auto`` join
    the cluster as one of its nodes would, from a machine inside its network."""
    where = "--address" if address else "RAY_ADDRESS"
    address = address or env.get("RAY_ADDRESS") or ""
    if address in ("", "auto", "local"):
        return
    scheme, sep, _ = address.partition("://")
    url = urlparse(address if sep else f"gcs://{address}")
    if "@" in url.netloc:
        raise UserInputError(
            where, "has credentials in the address, which would be printed and logged; give "
            "the address alone and the token in RAY_AUTH_TOKEN",
        )  # fmt: skip
    if sep and scheme.lower() in ("http", "https"):
        raise UserInputError(
            where, f"'{address}' is a job server URL; to train on that cluster from here use "
            f"'ftlaunch submit RECIPE --address {address}', or give the cluster's own address "
            "(HEAD:6379 on a node of the cluster, or ray://HEAD:10001)",
        )  # fmt: skip
    try:
        port = url.port
    except ValueError:
        port = None
    if (sep and scheme != "ray") or not url.hostname or port is None:
        raise UserInputError(
            where, f"'{address}' is not a Ray cluster address such as HEAD:6379, "
            "ray://HEAD:10001 or auto",
        )  # fmt: skip
    tls = env.get("RAY_USE_TLS", "").lower() in ("1", "true")
    if scheme == "ray" and not (insecure or tls or is_loopback(address)):
        raise UserInputError(
            where, f"{address} is another machine over Ray Client without TLS: the Ray token, "
            "the recipe and the logs would cross the network unencrypted. Use an SSH tunnel "
            "(ssh -L 10001:localhost:10001 HEAD, then --address ray://127.0.0.1:10001), Ray's "
            "TLS (RAY_USE_TLS=1), or 'ftlaunch submit'; on a network you trust, --insecure "
            "connects anyway.",
        )  # fmt: skip


PROBE_TIMEOUT_S = 5.0


def check_cluster_answers(address: str | None, env: Mapping[str, str]) -> None:
    """After ``check_cluster_address``: that something listens at the cluster address
    (``auto`` resolved as ``ray.init`` resolves it). Given an address where nothing answers,
    Ray's C++ client gives up ~60 s later by terminating the process, and ``auto`` with no
    cluster ends in a ConnectionError traceback; this names the address at once instead."""
    where = "--address" if address else "RAY_ADDRESS"
    address = address or env.get("RAY_ADDRESS") or ""
    if address in ("", "local"):
        return
    target = _resolve_auto(where) if address == "auto" else address
    url = urlparse(target if "://" in target else f"gcs://{target}")
    try:
        port = url.port
    except ValueError:  # what ray.init resolved "auto" to: left to ray.init
        port = None
    if not url.hostname or port is None:
        return
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise UserInputError(
            where, f"no Ray cluster answers at {target} ({e.strerror or e}); start one "
            "(ray start --head) or leave the address out to train on an embedded local Ray",
        ) from None


def _resolve_auto(where: str) -> str:
    """The cluster ``auto`` stands for, found as ``ray.init`` finds it: the last ``ray
    start`` on this machine, else a running GCS."""
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:  # a Ray without it: ray.init resolves "auto" (see orchestrate.connect)
        return "auto"
    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as e:
        raise UserInputError(where, f"auto: {e}") from None
