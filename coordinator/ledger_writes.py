"""Where the ledger's writes run: one at a time, in the order asked.

Every call that writes the ledger (intake batches, timer ticks, checkpoints, tool calls)
goes through one ``LedgerWrites``: one writer per ledger, which the write path assumes.

An embedded SQLite ledger is written **inline**, on the event loop: its commit is local
and short, and a second thread costs more than it overlaps. The thread and the loop take
turns at the GIL (the loop wakes on each socket read and waits for the writer to let go),
which measured 10–15% more coordinator CPU per handoff than writing inline, with no
better throughput or latency. A PostgreSQL ledger is written on **one dedicated thread**:
its commit waits on the network, and the loop keeps publishing meanwhile (inline measured
10% slower there).

The thread is not ``anyio.to_thread.run_sync`` under a ``CapacityLimiter(1)``: that yields
to the event loop twice before it hands a call over, so under load each commit started
2–2.5 ms late. Here the call is queued at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


class LedgerWrites:
    """Runs ledger writes one at a time: inline, or on one thread (``threaded=True``).
    ``close`` waits for the last call and ends the thread."""

    def __init__(self, *, threaded: bool) -> None:
        self._executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")
                          if threaded else None)

    @property
    def threaded(self) -> bool:
        return self._executor is not None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, inline or on the writer thread. On the thread, a cancelled
        caller still waits for the call to end, as ``to_thread.run_sync`` does: a commit
        is never left running unowned. Inline, a call cannot be interrupted at all."""
        if self._executor is None:
            return fn(*args)
        future = asyncio.wrap_future(self._executor.submit(fn, *args))
        with anyio.CancelScope(shield=True):
            result = await future
        return result

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
