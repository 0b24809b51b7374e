"""What the writer just committed, handed to the relay without reading it back.

The notification log stays the relay's source of truth. The feed only answers "what
follows position P?" when it can vouch for the answer: every position after P present and
in order. Otherwise (a gap from a commit whose outcome was unclear, an overflow, a restart)
it says so, and the relay reads the log as before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from uuid import UUID

from eventsourcing.persistence import Mapper, Notification

from coordinator.ledger.events import LedgerEvent


class CommitFeed:
    """Filled by the writer's thread after each commit; drained by the relay's loop.

    ``deque`` appends and pops are atomic, so the two sides need no lock. Bounded: a relay
    that falls behind loses the oldest entries, sees the gap and reads the log instead.
    """

    def __init__(self, mapper: Mapper[UUID], maxlen: int = 8192) -> None:
        self._mapper = mapper
        self._items: deque[tuple[int, LedgerEvent]] = deque(maxlen=maxlen)

    def add(self, positions: Sequence[int], events: Sequence[LedgerEvent]) -> None:
        self._items.extend(zip(positions, events, strict=True))

    def after(self, position: int, limit: int) -> list[Notification] | None:
        """Up to ``limit`` notifications right after ``position``, exactly as the log holds
        them ([] if nothing new is known); None if the feed cannot vouch for what follows."""
        out: list[Notification] = []
        while len(out) < limit:
            try:
                at, event = self._items.popleft()
            except IndexError:
                break
            if at <= position:
                continue  # relayed already, from the log
            if at != position + 1:
                return None  # a gap: only the log knows what is there
            stored = self._mapper.to_stored_event(event)  # the very bytes the log stores
            out.append(Notification(id=at, originator_id=stored.originator_id,
                                    originator_version=stored.originator_version,
                                    topic=stored.topic, state=stored.state))
            position = at
        return out
