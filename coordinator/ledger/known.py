"""Which task ids the ledger may already hold: a fixed-size Bloom filter.

Before recording a submission the writer must know that its task id is new. Without this,
that is a database read for every new task (up to a tenth of the writer's time under
load). A "certainly not" answer needs no read; a "maybe" (about 2% of new ids at a million
tasks) reads the database as before. The memory is fixed: past its design size more answers
are "maybe", so more reads, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import struct

_HASHES = 6
_UNPACK = struct.Struct(f"<{_HASHES}I").unpack


class MaybeKnown:
    """Keys added are always reported; others almost never are (no false negatives)."""

    def __init__(self, bits: int = 1 << 23) -> None:  # 1 MiB
        self._size = bits
        self._bits = bytearray((bits + 7) // 8)

    def _positions(self, key: str) -> list[int]:
        digest = hashlib.blake2b(key.encode(), digest_size=4 * _HASHES).digest()
        return [word % self._size for word in _UNPACK(digest)]

    def add(self, key: str) -> None:
        for position in self._positions(key):
            self._bits[position >> 3] |= 1 << (position & 7)

    def may_hold(self, key: str) -> bool:
        return all(self._bits[p >> 3] & (1 << (p & 7)) for p in self._positions(key))
