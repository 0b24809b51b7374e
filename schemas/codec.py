"""Encoding and decoding of wire messages, with reused msgspec encoders and decoders."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.errors import MalformedMessageError
from schemas.messages import Delivery, Envelope

# Stateless and thread-safe: one canonical encoder for everything that is hashed.
_CANONICAL = msgspec.json.Encoder(order="sorted")


def canonical(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, no whitespace): the bytes that hashes are taken over."""
    return _CANONICAL.encode(obj)


class Codec:
    """Typed decoders and one encoder, built once per process and reused."""

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder(order="sorted")
        self._envelope = msgspec.json.Decoder(Envelope)
        self._delivery = msgspec.json.Decoder(Delivery)

    def encode(self, message: Envelope | Delivery) -> bytes:
        return self._encoder.encode(message)

    def decode_envelope(self, data: bytes, subject: str = "?") -> Envelope:
        try:
            return self._envelope.decode(data)
        except msgspec.DecodeError as exc:
            raise MalformedMessageError(subject, str(exc), "Envelope") from exc

    def decode_delivery(self, data: bytes, subject: str = "?") -> Delivery:
        try:
            return self._delivery.decode(data)
        except msgspec.DecodeError as exc:
            raise MalformedMessageError(subject, str(exc), "Delivery") from exc
