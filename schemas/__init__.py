"""Wire contracts of ledgermesh: what crosses NATS, and nothing else.

Pure: imports nothing of ours and does no I/O, so an agent in any language can be written
from these Structs (or from the JSON Schema exported from them into ``schemas/json``).
"""

from __future__ import annotations

from schemas.codec import Codec, canonical
from schemas.errors import LedgermeshError, MalformedMessageError
from schemas.messages import (
    BODY_TYPES,
    Body,
    Complete,
    Delivery,
    Envelope,
    Fail,
    HandoffDecision,
    HandoffRequest,
    LedgerRecord,
    Say,
    SubmitTask,
)
from schemas.subjects import Subjects, is_token

__all__ = [
    "BODY_TYPES",
    "Body",
    "Codec",
    "Complete",
    "Delivery",
    "Envelope",
    "Fail",
    "HandoffDecision",
    "HandoffRequest",
    "LedgerRecord",
    "LedgermeshError",
    "MalformedMessageError",
    "Say",
    "SubmitTask",
    "Subjects",
    "canonical",
    "is_token",
]
