"""Child processes of the dev stack: each service its own OS process, logs to a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio

from bus.client import Bus
from schemas import LedgermeshError, Subjects


class StartupError(LedgermeshError):
    """A child service exited or did not become ready."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_file: Path
    service: str = ""  # the NATS micro name it answers to (default: its name)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def spawn(name: str, args: list[str], log_dir: Path, *, service: str = "",
          env: dict[str, str] | None = None) -> Child:
    """Start ``python -m ledgermesh ARGS`` with output to ``log_dir/NAME.log``.

    ``env`` adds variables (e.g. a crash point for a fault demo); ``service`` is the micro
    service name it registers, when that is not ``name`` (a second instance, a tool host).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"{name}.log"
    with log_file.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ledgermesh", *args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            # Credentials only ever as arguments: never inherit the parent's.
            env={**{k: v for k, v in os.environ.items() if k != "LEDGERMESH_NKEY"},
                 "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    return Child(name, process, log_file, service or name)


async def stop_all(children: list[Child], timeout: float = 10.0) -> None:
    """SIGTERM everyone, wait, then SIGKILL whoever is left. Never raises."""
    for child in children:
        if child.alive():
            child.process.send_signal(signal.SIGTERM)
    with anyio.move_on_after(timeout):
        while any(child.alive() for child in children):  # noqa: ASYNC110 - exits are polled
            await anyio.sleep(0.05)
    for child in children:
        if child.alive():
            child.process.kill()
        child.process.wait()


async def wait_ready(bus: Bus, subjects: Subjects, children: list[Child],
                     timeout: float = 30.0) -> None:
    """Until every child answers its NATS micro PING (it registers once it is serving)."""
    waiting = list(children)
    with anyio.move_on_after(timeout):
        while waiting:
            child = waiting[0]
            if await bus.ping(subjects.service(child.service)):
                waiting.pop(0)
            elif not child.alive():
                raise StartupError(f"{child.name} exited during start-up "
                                   f"(log {child.log_file}):\n{child.log_tail()}")
    if waiting:
        raise StartupError(f"not ready after {timeout:.0f} s: "
                           f"{', '.join(c.name for c in waiting)}; "
                           f"see logs in {waiting[0].log_file.parent}")
