"""Long-running commands: ``coordinator run`` and ``agent run``, stopped by SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from agents import load_agent
from agents.runtime import AgentSettings, run_agent
from agents.tools import ToolHostSettings, load_tool_host, run_tool_host
from bus.faults import CrashPoints
from coordinator.ledger.checkpoints import signer_at
from coordinator.policy import load_policy
from coordinator.service import CoordinatorSettings, run_coordinator
from ledgermesh.auth import COORDINATOR, TOOLS, load_credentials
from schemas import Subjects

Service = Callable[..., Awaitable[None]]
log = logging.getLogger("ledgermesh")
# An agent stopped with SIGTERM finishes its handlers for this long first: under systemd's
# TimeoutStopSec (30 s in deploy/systemd), and long enough for most handlers.
DRAIN_S = 20.0


async def run_until_signalled(service: Callable[..., Coroutine[Any, Any, None]],
                              drain_s: float | None = None) -> None:
    """Run ``service`` until SIGTERM or SIGINT, then cancel it cleanly.

    With ``drain_s``, it is called as ``service(stopping, task_status=…)``: the first signal
    sets ``stopping`` and gives it ``drain_s`` seconds to finish what it holds and return;
    a second signal, or the time running out, cancels it."""
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if stopping.is_set():
                        log.info("stopping now on a second %s", name)
                        break
                    if drain_s is None:
                        log.info("stopping on %s", name)
                        break
                    log.info("stopping on %s: finishing the work in hand (up to %.0f s; "
                             "again to stop now)", name, drain_s)
                    stopping.set()
                    tg.start_soon(cancel_after, drain_s)
            tg.cancel_scope.cancel()

        async def cancel_after(seconds: float) -> None:
            await anyio.sleep(seconds)
            log.warning("stopping now: the work in hand did not finish within %.0f s", seconds)
            tg.cancel_scope.cancel()

        tg.start_soon(stop_on_signal)
        if drain_s is None:
            await tg.start(service)  # it serves until the signal cancels it
            return
        await service(stopping, task_status=anyio.TASK_STATUS_IGNORED)
        tg.cancel_scope.cancel()  # it returned (drained): the signal watch ends too


def coordinator_run(nats_url: str, ledger: str, config: Path, prefix: str,
                    nkey: Path | None = None, signing_key: Path | None = None,
                    checkpoint_every_s: float = 30.0, metrics: str | None = None) -> None:
    address = None if metrics is None else host_port(metrics)  # a typo fails before anything
    subjects = Subjects(prefix)
    settings = CoordinatorSettings(nats_url=nats_url, ledger=ledger,
                                   policy=load_policy(config), subjects=subjects,
                                   crash=CrashPoints.from_environment(),
                                   credentials=load_credentials(nkey, subjects, COORDINATOR),
                                   signing_seed=(signer_at(signing_key).seed
                                                 if signing_key is not None else None),
                                   checkpoint_interval_s=checkpoint_every_s,
                                   metrics=address)

    async def service(task_status: TaskStatus[None]) -> None:
        await run_coordinator(settings, task_status=task_status)

    anyio.run(run_until_signalled, service)


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``:PORT`` for every interface) as (host, port); ValueError if not."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics takes HOST:PORT (e.g. 127.0.0.1:9464), got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def agent_run(spec: str, nats_url: str, prefix: str, concurrency: int | None,
              nkey: Path | None = None) -> None:
    agent = load_agent(spec)
    subjects = Subjects(prefix)
    settings = AgentSettings(nats_url=nats_url, subjects=subjects,
                             concurrency=concurrency, crash=CrashPoints.from_environment(),
                             credentials=load_credentials(nkey, subjects, agent.name))

    async def service(stopping: anyio.Event, task_status: TaskStatus[None]) -> None:
        await run_agent(agent, settings, stopping=stopping, task_status=task_status)

    anyio.run(run_until_signalled, service, DRAIN_S)


def tools_run(spec: str, nats_url: str, prefix: str, nkey: Path | None = None) -> None:
    host = load_tool_host(spec)
    subjects = Subjects(prefix)
    settings = ToolHostSettings(nats_url=nats_url, subjects=subjects,
                                credentials=load_credentials(nkey, subjects, TOOLS))

    async def service(task_status: TaskStatus[None]) -> None:
        await run_tool_host(host, settings, task_status=task_status)

    anyio.run(run_until_signalled, service)
