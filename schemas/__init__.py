"""Wire contracts of ledgermesh: what crosses NATS, and nothing else.

Pure: imports nothing of ours and does no I/O, so an agent in any language can be written
from these Structs (or from the JSON Schema exported from them into ``schemas/json``).
"""

from __future__ import annotations

from schemas.batch import BATCH_MAX_BYTES, batch_msg_id, is_batch, pack
from schemas.codec import Codec, canonical
from schemas.errors import LedgermeshError, MalformedMessageError
from schemas.ids import uuid5_text
from schemas.messages import (
    BODY_TYPES,
    ApproveTool,
    Body,
    Complete,
    Delivery,
    Envelope,
    Fail,
    Failure,
    HandoffDecision,
    HandoffRequest,
    LedgerRecord,
    Receipt,
    Refusal,
    ResumeAgent,
    Say,
    SubmitTask,
    SuspendAgent,
    ToolCall,
    ToolInvocation,
    ToolOutcome,
)
from schemas.subjects import Subjects, is_token

__all__ = [
    "BATCH_MAX_BYTES",
    "BODY_TYPES",
    "ApproveTool",
    "Body",
    "Codec",
    "Complete",
    "Delivery",
    "Envelope",
    "Fail",
    "Failure",
    "HandoffDecision",
    "HandoffRequest",
    "LedgerRecord",
    "LedgermeshError",
    "MalformedMessageError",
    "Receipt",
    "Refusal",
    "ResumeAgent",
    "Say",
    "Subjects",
    "SubmitTask",
    "SuspendAgent",
    "ToolCall",
    "ToolInvocation",
    "ToolOutcome",
    "batch_msg_id",
    "canonical",
    "is_batch",
    "is_token",
    "pack",
    "uuid5_text",
]
