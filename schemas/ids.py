"""Deterministic ids: the text of a name-based (version 5) UUID, as ``uuid.uuid5`` makes it.

Every delivery and every agent output gets one, so it is made per message; building the
``UUID`` object only to format it costs about twice the SHA-1 itself.
"""

from __future__ import annotations

import hashlib
from uuid import UUID


def uuid5_text(namespace: UUID, name: str) -> str:
    """``str(uuid.uuid5(namespace, name))``."""
    digest = bytearray(hashlib.sha1(namespace.bytes + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
