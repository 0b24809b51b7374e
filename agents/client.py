"""Submitting tasks: what a client (a person, a service, the CLI) says to start work."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from bus.client import Bus, PubAck
from schemas import Codec, Envelope, Subjects, SubmitTask


async def submit_task(bus: Bus, subjects: Subjects, *, task_id: str, to: str, title: str,
                      payload: dict[str, Any], principal: str, msg_id: str,
                      clock: Callable[[], datetime], labels: tuple[str, ...] = ()) -> PubAck:
    """Publish a SubmitTask on ``principal``'s intake subject; safe to retry (same msg_id)."""
    envelope = Envelope(id=msg_id, sender=principal, task_id=task_id, sent_at=clock(),
                        body=SubmitTask(to=to, title=title, payload=payload), labels=labels)
    return await bus.publish(subjects.intake(principal), Codec().encode(envelope), msg_id=msg_id)
