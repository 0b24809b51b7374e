"""The ledger's one writer thread.

Every call that writes the ledger (intake batches, timer ticks, checkpoints, tool calls)
runs on it, one at a time and in the order asked: one writer per ledger, which the write
path assumes.

Not ``anyio.to_thread.run_sync`` under a ``CapacityLimiter(1)``: that yields to the event
loop twice before it hands a call to a thread (a checkpoint, then the limiter's), so under
load each intake commit started behind everything else the loop had ready: 2–2.5 ms per
batch, measured, against ~8 ms of recording. Here the call is queued at once, and the
loop goes on with its own work while the writer records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


class LedgerThread:
    """Runs calls on one dedicated thread; ``close`` waits for the last and ends it."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the writer thread. A cancelled caller still waits for the call
        to end, as ``to_thread.run_sync`` does: a commit is never left running unowned."""
        future = asyncio.wrap_future(self._executor.submit(fn, *args))
        with anyio.CancelScope(shield=True):
            result = await future
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=True)
