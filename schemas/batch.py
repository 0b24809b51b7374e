"""Intake batches: several envelopes in one intake message.

An intake message is one envelope (a JSON object) or a **batch**: a JSON array of
envelopes, each element exactly the bytes the envelope would be on its own. The
coordinator records a batch's envelopes in order, in one transaction, each as if it had
come alone. A batch costs the intake stream one stored message and its sender one ack,
where its envelopes alone would cost one each: the Python runtime sends the outputs a
handler says in one turn (a say and the handoff after it) as one batch.

A batch's ``Nats-Msg-Id`` is free. JetStream deduplicates by it across the whole intake
stream, whoever publishes, so an id another principal can predict is one it can take
first, and the real message is then answered ``duplicate`` and never stored. A sender
with a ``key`` (a secret of its own) therefore sends every turn as a batch, even of one
envelope, under an id nobody else can compute. (The envelope ids inside stay
deterministic: the ledger deduplicates by those, per task and sender.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from uuid import UUID

from schemas.ids import uuid5_text

# A batch the Python runtime builds is at most this long (one envelope longer than this
# goes alone). The intake stream accepts messages of twice this size at least, whatever
# the policy's max_payload_bytes, so a batch of small envelopes is never refused for its
# length; each envelope in it is held to max_payload_bytes on its own.
BATCH_MAX_BYTES = 32 * 1024

_NS_BATCH = UUID("8d2f6c1e-4a7b-5e3d-9c0f-1b2a3d4e5f60")


def batch_msg_id(ids: Sequence[str], key: bytes | None = None) -> str:
    """The ``Nats-Msg-Id`` of a batch: a function of its envelope ids, so a batch sent again
    (a retried publish, a redelivered handler) is deduplicated by the stream too; keyed
    (BLAKE2b's MAC mode, 16 bytes) when ``key`` is given, so that only its holder can
    compute it."""
    name = "\n".join(ids)
    if key is None:
        return uuid5_text(_NS_BATCH, name)
    return hashlib.blake2b(name.encode(), key=key, digest_size=16).hexdigest()


def is_batch(data: bytes) -> bool:
    """Whether an intake message is a batch (a JSON array), not one envelope."""
    return data.lstrip()[:1] == b"[" if data[:1].isspace() else data[:1] == b"["


def pack(encoded: Sequence[tuple[str, bytes]], max_bytes: int = BATCH_MAX_BYTES,
         key: bytes | None = None) -> list[tuple[str, bytes]]:
    """Envelopes, as (id, bytes) in the order said → the intake messages to publish, as
    (Nats-Msg-Id, bytes): consecutive envelopes joined into batches of at most
    ``max_bytes``. Without a ``key``, an envelope that is alone (or too long to share)
    goes as itself, under its own id; with one, it goes as a batch of one, keyed."""
    messages: list[tuple[str, bytes]] = []
    group: list[tuple[str, bytes]] = []
    size = 1  # the opening bracket

    def close() -> None:
        if len(group) == 1 and key is None:
            messages.append(group[0])
        elif group:
            messages.append((batch_msg_id([i for i, _ in group], key),
                             b"[" + b",".join(data for _, data in group) + b"]"))
        group.clear()

    for envelope_id, data in encoded:
        if group and size + len(data) + 1 > max_bytes:
            close()
            size = 1
        group.append((envelope_id, data))
        size += len(data) + 1  # its bytes and a comma (or the closing bracket)
    close()
    return messages
