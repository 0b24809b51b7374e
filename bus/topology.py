"""The streams and consumers (docs/protocol.md §4), as plain data (no nats-py here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from schemas import BATCH_MAX_BYTES, Subjects

DEDUP_WINDOW_S = 120.0


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    retention: Literal["limits", "workqueue"]
    deny_delete: bool = False
    max_msg_size: int = -1


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subject: str
    ack_wait_s: float = 30.0
    max_ack_pending: int = 10_000
    # One ack covers every message up to it (so a batch takes one ack, not one per
    # message); only for a consumer whose single reader handles messages in order.
    ack_all: bool = False
    # When the consumer is created: deliver from the stream sequence after this (0: all).
    start_after: int = 0


def streams(subjects: Subjects, max_payload_bytes: int | None = None,
            ) -> tuple[StreamSpec, ...]:
    """The three streams; intake's messages limited to twice the policy's
    ``max_payload_bytes`` (None: no limit) and never below twice a batch's length."""
    max_msg_size = (-1 if max_payload_bytes is None
                    else 2 * max(max_payload_bytes, BATCH_MAX_BYTES))
    return (
        # Everything said, deduplicated by Nats-Msg-Id within the window.
        StreamSpec(subjects.intake_stream, (subjects.intake_all,), "limits",
                   max_msg_size=max_msg_size),
        # Deliveries: a work queue, one durable consumer per agent name.
        StreamSpec(subjects.deliver_stream, (subjects.deliver_all,), "workqueue"),
        # The relayed ledger: nobody may delete or purge it.
        StreamSpec(subjects.ledger_stream, (subjects.ledger_all,), "limits", deny_delete=True),
    )


def coordinator_consumer(subjects: Subjects, start_after: int = 0) -> ConsumerSpec:
    """The coordinator's intake consumer; ``start_after``: the recorded intake position
    (a consumer made anew need not deliver what the ledger already holds)."""
    return ConsumerSpec(subjects.intake_stream, subjects.coordinator_consumer,
                        subjects.intake_all, ack_all=True, start_after=start_after)


def agent_consumer(subjects: Subjects, agent: str, ack_wait_s: float = 30.0) -> ConsumerSpec:
    return ConsumerSpec(subjects.deliver_stream, subjects.agent_consumer(agent),
                        subjects.deliver(agent), ack_wait_s=ack_wait_s, max_ack_pending=1_000)
