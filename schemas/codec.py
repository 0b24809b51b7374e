"""Encoding and decoding of wire messages, with reused msgspec encoders and decoders."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from schemas.errors import MalformedMessageError
from schemas.messages import Delivery, Envelope

T = TypeVar("T")

# Stateless and thread-safe: one canonical encoder for everything that is hashed.
_CANONICAL = msgspec.json.Encoder(order="sorted")


def canonical(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, no whitespace): the bytes that hashes are taken over."""
    return _CANONICAL.encode(obj)


MAX_DEPTH = 64  # JSON nesting allowed in payloads: deeper is refused, never recursed into


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests lists/dicts deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            items: Any = item.values()
        elif isinstance(item, list | tuple):
            items = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in items)
    return False


def _decode(decoder: msgspec.json.Decoder[T], data: bytes, subject: str, what: str) -> T:
    """``decoder.decode(data)``; any way the bytes are not a ``what`` is one
    MalformedMessageError, never a traceback."""
    try:
        return decoder.decode(data)
    except RecursionError:  # deeply nested JSON: refuse it like any other bad input
        raise MalformedMessageError(subject, "nested too deeply", what) from None
    except UnicodeDecodeError as exc:  # msgspec raises this, not DecodeError
        raise MalformedMessageError(subject, f"invalid UTF-8: {exc.reason} at byte "
                                             f"{exc.start}", what) from None
    except msgspec.DecodeError as exc:
        raise MalformedMessageError(subject, str(exc), what) from exc


class Codec:
    """Typed decoders and one encoder, built once per process and reused."""

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder(order="sorted")
        self._envelope = msgspec.json.Decoder(Envelope)
        self._delivery = msgspec.json.Decoder(Delivery)
        self._batch = msgspec.json.Decoder(list[msgspec.Raw])

    def encode(self, message: Envelope | Delivery) -> bytes:
        return self._encoder.encode(message)

    def decode_envelope(self, data: bytes, subject: str = "?") -> Envelope:
        envelope = _decode(self._envelope, data, subject, "Envelope")
        # Nesting N levels deep takes N opening brackets: most envelopes have too few
        # to need the walk (counting them: 0.4 µs for an agent's handoff, the walk 4 µs).
        if (data.count(b"[") + data.count(b"{") > MAX_DEPTH
                and too_deep(msgspec.structs.asdict(envelope.body))):
            raise MalformedMessageError(subject, f"nested deeper than {MAX_DEPTH} levels",
                                        "Envelope")
        return envelope

    def split_batch(self, data: bytes, subject: str = "?") -> list[bytes]:
        """A batch's elements, each exactly as sent (schemas/batch.py); they are decoded
        one by one, so one bad element does not take the others with it."""
        parts = _decode(self._batch, data, subject, "batch")
        if not parts:
            raise MalformedMessageError(subject, "an empty batch", "batch")
        return [bytes(part) for part in parts]

    def decode_delivery(self, data: bytes, subject: str = "?") -> Delivery:
        return _decode(self._delivery, data, subject, "Delivery")
