"""Every NATS subject, stream and consumer name of ledgermesh is built here and only here."""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")


def is_token(value: str) -> bool:
    """True if ``value`` can stand alone as one subject token (names, task ids)."""
    return _TOKEN.fullmatch(value) is not None


@dataclass(frozen=True)
class Subjects:
    """Names under one prefix, so that several deployments (or tests) share a server."""

    prefix: str = "lm"  # stream names upper-case it: "lm" and "LM" share streams

    def __post_init__(self) -> None:
        if not is_token(self.prefix):
            raise ValueError(f"subject prefix must be letters, digits, '-' or '_': {self.prefix!r}")

    # -- subjects -------------------------------------------------------------------
    def intake(self, principal: str) -> str:
        return f"{self.prefix}.intake.{principal}"

    @property
    def intake_all(self) -> str:
        return f"{self.prefix}.intake.>"

    def principal_of(self, intake_subject: str) -> str | None:
        """The principal an intake subject belongs to, or None if it is not one."""
        head = f"{self.prefix}.intake."
        if not intake_subject.startswith(head):
            return None
        principal = intake_subject[len(head) :]
        return principal if is_token(principal) else None

    def deliver(self, agent: str) -> str:
        return f"{self.prefix}.deliver.{agent}"

    @property
    def deliver_all(self) -> str:
        return f"{self.prefix}.deliver.>"

    def receipt(self, agent: str) -> str:
        """Where the coordinator tells ``agent`` which of its intake messages are recorded."""
        return f"{self.prefix}.receipt.{agent}"

    @property
    def receipt_all(self) -> str:
        return f"{self.prefix}.receipt.*"

    def tool_gateway(self, agent: str) -> str:
        """Where ``agent`` asks the coordinator to run a tool (request/reply)."""
        return f"{self.prefix}.toolcall.{agent}"

    @property
    def tool_gateway_all(self) -> str:
        return f"{self.prefix}.toolcall.*"

    def tool(self, name: str) -> str:
        """Where tool hosts serve ``name`` (a queue group: any host may answer)."""
        return f"{self.prefix}.tool.{name}"

    def ledger(self, aggregate: str, aggregate_id: str, kind: str) -> str:
        return f"{self.prefix}.ledger.{aggregate}.{aggregate_id}.{kind}"

    def ledger_of_task(self, task_id: str) -> str:
        return f"{self.prefix}.ledger.task.{task_id}.>"

    @property
    def ledger_all(self) -> str:
        return f"{self.prefix}.ledger.>"

    def service(self, name: str) -> str:
        """The NATS micro service name of an agent (or the coordinator) in this prefix."""
        return f"{self.prefix}_{name}"

    def ledger_msg_id(self, position: int) -> str:
        """Nats-Msg-Id of the relayed copy of ledger position ``position``."""
        return f"{self.prefix}:{position}"

    def ledger_position(self, msg_id: str | None) -> int:
        """Inverse of ``ledger_msg_id``; 0 when nothing was relayed yet."""
        if not msg_id:
            return 0
        head, _, tail = msg_id.rpartition(":")
        if head != self.prefix or not (tail.isascii() and tail.isdigit()):
            raise ValueError(f"not a ledger message id of prefix {self.prefix!r}: {msg_id!r}")
        return int(tail)

    # -- streams and consumers ------------------------------------------------------
    @property
    def intake_stream(self) -> str:
        return f"{self.prefix.upper()}_INTAKE"

    @property
    def deliver_stream(self) -> str:
        return f"{self.prefix.upper()}_DELIVER"

    @property
    def ledger_stream(self) -> str:
        return f"{self.prefix.upper()}_LEDGER"

    @property
    def coordinator_consumer(self) -> str:
        return "coordinator"

    def agent_consumer(self, agent: str) -> str:
        return f"agent-{agent}"
