"""JSON Schema of the wire messages, exported into ``schemas/json`` for agents in other languages.

``json_schemas()`` is pure and deterministic (sorted keys, 2-space indent, trailing newline),
so the committed files can be compared byte for byte against it (see
``tests/unit/test_schema_drift.py``); ``write_json_schemas`` regenerates them.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from schemas.messages import Delivery, Envelope, Receipt

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "json_schemas",
    "stale_json_schemas",
    "write_json_schemas",
]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_DEFS = "#/$defs/"


@dataclass(frozen=True)
class _Export:
    file: str
    type: type[msgspec.Struct]
    description: str


_EXPORTS: tuple[_Export, ...] = (
    _Export(
        "envelope.schema.json",
        Envelope,
        "A ledgermesh message, published by an agent or client on the NATS subject "
        "`<prefix>.intake.<sender>` (one token per part; `<prefix>` defaults to `lm`), alone "
        "or with others in a JSON array (a batch: docs/protocol.md §7). "
        "`body.type` selects the body. Unknown fields are ignored by the coordinator.",
    ),
    _Export(
        "delivery.schema.json",
        Delivery,
        "A ledgermesh delivery, published by the coordinator on the NATS subject "
        "`<prefix>.deliver.<agent>` (one token per part; `<prefix>` defaults to `lm`) "
        "once the envelope that made `<agent>` the task's owner is recorded.",
    ),
    _Export(
        "receipt.schema.json",
        Receipt,
        "A ledgermesh receipt, published by the coordinator on the NATS subject "
        "`<prefix>.receipt.<agent>` after a commit: the `Nats-Msg-Id` of each of the "
        "agent's intake messages now recorded. Ack a delivery only once every message "
        "sent for it is named in one (docs/protocol.md §7).",
    ),
)


def _refers_to(node: Any, ref: str) -> bool:
    """True if ``ref`` is the target of a ``$ref`` anywhere inside ``node``."""
    if isinstance(node, dict):
        return node.get("$ref") == ref or any(_refers_to(v, ref) for v in node.values())
    if isinstance(node, list):
        return any(_refers_to(v, ref) for v in node)
    return False


def _clean_descriptions(node: Any) -> None:
    """Dedent docstring-derived ``description``s in place (msgspec keeps their indentation)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                node[key] = inspect.cleandoc(value)
            else:
                _clean_descriptions(value)
    elif isinstance(node, list):
        for value in node:
            _clean_descriptions(value)


def _schema(export: _Export) -> dict[str, Any]:
    """The root Struct inlined at the top level, everything it uses under ``$defs``."""
    (root_ref,), defs = msgspec.json.schema_components([export.type], ref_template=_DEFS + "{name}")
    name = root_ref["$ref"].removeprefix(_DEFS)
    root: dict[str, Any] = dict(defs[name])
    if not _refers_to(defs, _DEFS + name):  # keep it in $defs only if something refers back
        del defs[name]
    _clean_descriptions(root)
    _clean_descriptions(defs)
    schema: dict[str, Any] = {
        **root,
        "$schema": JSON_SCHEMA_DIALECT,
        "title": name,
        "description": export.description,
    }
    if defs:
        schema["$defs"] = defs
    return schema


def _dump(schema: dict[str, Any]) -> bytes:
    return (json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def json_schemas() -> dict[str, bytes]:
    """File name -> JSON Schema bytes, for every message that crosses NATS."""
    return {export.file: _dump(_schema(export)) for export in _EXPORTS}


def _on_disk(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def stale_json_schemas(directory: Path) -> list[str]:
    """Names of the schema files in ``directory`` that are missing or differ from the export."""
    return [
        name for name, content in json_schemas().items() if _on_disk(directory / name) != content
    ]


def write_json_schemas(directory: Path) -> list[Path]:
    """Write the schema files whose content changed into ``directory``; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, content in json_schemas().items():
        path = directory / name
        if _on_disk(path) == content:
            continue
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_bytes(content)
        tmp.replace(path)
        written.append(path)
    return written
