"""Receipts: telling each agent which of its intake messages the ledger has recorded.

An agent acks a delivery only once a receipt names every message its handler sent
(docs/protocol.md §7). Receipts are off the path of the work itself (the next delivery
is relayed after the commit, whatever the acks), so they are collected over the commits
of ``every_s`` and sent together: an agent gets at most one receipt per ``every_s``, not
one per commit (each costs nats-server and the agent a message).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
import msgspec
from anyio.abc import TaskStatus

from bus.client import Bus, BusError
from coordinator.ledger.events import LedgerEvent
from coordinator.ledger.writer import IntakeMessage
from schemas import Receipt, Refusal, Subjects

log = logging.getLogger("ledgermesh.coordinator.receipts")
_receipt = msgspec.json.Encoder()


class ReceiptBook:
    """The message ids recorded since the last receipts were sent, per agent."""

    def __init__(self, subjects: Subjects, agents: frozenset[str],
                 every_s: float = 0.01) -> None:
        self._subjects = subjects
        self._agents = agents  # only agents wait for receipts (clients read the ledger)
        self._every_s = every_s
        self._ids: dict[str, list[str]] = {}
        self._refused: dict[str, list[Refusal]] = {}
        self._since: float | None = None  # when the oldest id held was added
        self._added = anyio.Event()  # set while anything is held

    def add(self, messages: list[IntakeMessage], now: float,
            refused: Sequence[tuple[str, LedgerEvent]] = ()) -> None:
        """Note ``messages``, just recorded, and what of them the ledger recorded as
        refused (each with the id of the message that carried it)."""
        for message in messages:
            principal = self._subjects.principal_of(message.subject)
            if principal in self._agents and message.msg_id is not None:
                self._ids.setdefault(principal, []).append(message.msg_id)
        for msg_id, event in refused:
            if event.sender in self._agents:
                data = event.data
                self._refused.setdefault(event.sender, []).append(
                    Refusal(message=msg_id, id=event.msg_id, task_id=data.get("task_id", ""),
                            code=data["code"], reason=data["reason"]))
        if self._ids and self._since is None:
            self._since = now
            self._added.set()

    def take(self) -> list[tuple[str, bytes]]:
        """The receipts to send (subject, bytes); nothing is held after."""
        out = [(self._subjects.receipt(agent),
                _receipt.encode(Receipt(ids=tuple(ids),
                                        refused=tuple(self._refused.get(agent, ())))))
               for agent, ids in self._ids.items()]
        self._ids.clear()
        self._refused.clear()
        self._since = None
        self._added = anyio.Event()
        return out

    async def serve(self, bus: Bus, *,
                    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send what is held once it is due, until cancelled. Plain NATS, unacknowledged:
        an agent that misses a receipt publishes again under a new id, which the ledger
        finds already recorded, and gets a receipt for that."""
        task_status.started()
        while True:
            await self._added.wait()
            if self._since is not None:
                await anyio.sleep_until(self._since + self._every_s)
            try:
                await bus.notify(self.take())
            except BusError as exc:
                log.warning("receipts not sent: %s", exc)
