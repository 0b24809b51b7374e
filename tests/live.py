"""An in-process system for integration tests: coordinator, agents and a tool host in one
event loop against the real NATS server, and helpers to speak as a principal and read
what the ledger recorded."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec

from agents import Agent, ToolHost
from agents.runtime import AgentSettings, run_agent
from agents.tools import ToolHostSettings, run_tool_host
from bus.client import Bus, BusSettings, open_bus
from bus.embedded import EmbeddedNats
from coordinator.ledger.store import open_ledger
from coordinator.policy import Policy, parse_policy
from coordinator.service import CoordinatorSettings, run_coordinator
from schemas import Codec, Envelope, Subjects

Events = list[dict[str, Any]]
_codec = Codec()

TEAM = """
[agents.triage]
handoff_to = ["researcher"]
[agents.researcher]
handoff_to = ["writer"]
[agents.writer]
handoff_to = ["reviewer"]
[agents.reviewer]
handoff_to = ["writer"]
"""


def team_policy(top: str = "", source: str = "inline test policy") -> Policy:
    """The example team's handoff graph; ``top`` adds top-level keys before the tables."""
    return parse_policy('submitters = ["client"]\n' + top + TEAM, source)


@asynccontextmanager
async def system(nats: EmbeddedNats, prefix: str, ledger: str, policy: Policy,
                 *agents: Agent, host: ToolHost | None = None) -> AsyncIterator[Bus]:
    """Everything running; yields a client connection. Cancelled (like a stop) on exit."""
    subjects = Subjects(prefix)
    async with anyio.create_task_group() as tg:
        await tg.start(run_coordinator, CoordinatorSettings(nats.url, ledger, policy, subjects))
        if host is not None:
            await tg.start(run_tool_host, host, ToolHostSettings(nats.url, subjects))
        for agent in agents:
            await tg.start(run_agent, agent, AgentSettings(nats.url, subjects))
        async with open_bus(BusSettings(url=nats.url, name="test-client")) as bus:
            yield bus
        tg.cancel_scope.cancel()


def envelope(sender: str, task_id: str, body: Any, attempt: int = 0) -> Envelope:
    return Envelope(id=str(uuid.uuid4()), sender=sender, task_id=task_id,
                    sent_at=datetime.now(UTC), body=body, attempt=attempt)


async def say(bus: Bus, prefix: str, env: Envelope) -> None:
    """Publish on the sender's own intake subject, as that principal would."""
    await bus.publish(Subjects(prefix).intake(env.sender), _codec.encode(env), msg_id=env.id)


def recorded(ledger: str) -> Events:
    """Every stored event's state, in ledger order."""
    opened = open_ledger(ledger, create=False)
    try:
        return [msgspec.json.decode(n.state) for n in opened.read(0, 1_000_000)]
    finally:
        opened.close()


def of(events: Events, key: str) -> Events:
    return [e for e in events if e["key"] == key]


def kinds(events: Events) -> list[str]:
    return [e["kind"] for e in events]


async def until(ledger: str, done: Callable[[Events], bool], timeout: float = 20) -> Events:
    """Poll the ledger until ``done(events)``; TimeoutError after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while True:
            if await anyio.Path(ledger).exists():
                events = recorded(ledger)
                if done(events):
                    return events
            await anyio.sleep(0.05)
