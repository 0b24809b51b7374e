"""The checked-in JSON Schema (``schemas/json``) must match the Structs it is exported from."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings

import schemas
from schemas.codec import Codec
from schemas.export import (
    JSON_SCHEMA_DIALECT,
    json_schemas,
    stale_json_schemas,
    write_json_schemas,
)
from schemas.messages import BODY_TYPES, Delivery, Envelope, Receipt
from tests.strategies import deliveries, envelopes

SCHEMA_DIR = Path(schemas.__file__).parent / "json"
EXPORT_HINT = "run `ledgermesh schema export` and commit the result"
CODEC = Codec()
ROOTS: dict[str, type[msgspec.Struct]] = {
    "envelope.schema.json": Envelope,
    "delivery.schema.json": Delivery,
    "receipt.schema.json": Receipt,
}
SUBJECTS = {
    "envelope.schema.json": "`<prefix>.intake.<sender>`",
    "delivery.schema.json": "`<prefix>.deliver.<agent>`",
    "receipt.schema.json": "`<prefix>.receipt.<agent>`",
}


def _committed(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMA_DIR / name).read_bytes())
    return loaded


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/$defs/"), ref
    resolved: dict[str, Any] = root["$defs"][ref.removeprefix("#/$defs/")]
    return resolved


# -- drift --------------------------------------------------------------------------------


def test_checked_in_schemas_match_the_structs() -> None:
    stale = stale_json_schemas(SCHEMA_DIR)
    assert not stale, (
        f"{', '.join(stale)} in {SCHEMA_DIR} out of date with schemas/messages.py: {EXPORT_HINT}"
    )


def test_no_stray_schema_files() -> None:
    stray = sorted({p.name for p in SCHEMA_DIR.glob("*.json")} - set(json_schemas()))
    assert not stray, (
        f"{', '.join(stray)} in {SCHEMA_DIR} no longer exported: delete, then {EXPORT_HINT}"
    )


def test_export_is_deterministic_and_pretty() -> None:
    exported = json_schemas()
    assert exported == json_schemas()
    assert list(exported) == list(ROOTS)
    for content in exported.values():
        expected = (
            json.dumps(json.loads(content), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        )
        assert content == expected.encode()


@pytest.mark.parametrize("name", list(ROOTS))
def test_schema_header(name: str) -> None:
    schema = json.loads(json_schemas()[name])
    assert schema["$schema"] == JSON_SCHEMA_DIALECT
    assert schema["title"] == ROOTS[name].__name__
    assert SUBJECTS[name] in schema["description"]
    assert '"$id"' not in json_schemas()[name].decode()
    assert "$ref" not in schema  # the root Struct is inlined
    assert schema["type"] == "object"


def test_write_only_rewrites_what_changed(tmp_path: Path) -> None:
    directory = tmp_path / "json"
    assert stale_json_schemas(directory) == list(ROOTS)
    assert write_json_schemas(directory) == [directory / name for name in ROOTS]
    assert stale_json_schemas(directory) == []
    assert write_json_schemas(directory) == []

    (directory / "delivery.schema.json").write_bytes(b"{}\n")
    assert stale_json_schemas(directory) == ["delivery.schema.json"]
    assert write_json_schemas(directory) == [directory / "delivery.schema.json"]
    assert stale_json_schemas(directory) == []
    assert sorted(p.name for p in directory.iterdir()) == sorted(ROOTS)  # no temporary files left


# -- structure: the schema says what the Structs say --------------------------------------


def _struct_types(name: str) -> dict[str, msgspec.inspect.StructType]:
    """Every Struct the exported message reaches, by its schema name."""
    found: dict[str, msgspec.inspect.StructType] = {}
    pending: list[msgspec.inspect.Type] = [msgspec.inspect.type_info(ROOTS[name])]
    while pending:
        t = pending.pop()
        if isinstance(t, msgspec.inspect.StructType):
            if t.cls.__name__ in found:
                continue
            found[t.cls.__name__] = t
            pending.extend(f.type for f in t.fields)
        elif isinstance(t, msgspec.inspect.UnionType):
            pending.extend(t.types)
        elif isinstance(t, msgspec.inspect.VarTupleType | msgspec.inspect.ListType):
            pending.append(t.item_type)
    return found


def _schema_of(schema: dict[str, Any], struct_name: str) -> dict[str, Any]:
    if schema["title"] == struct_name:
        return schema
    defined: dict[str, Any] = schema["$defs"][struct_name]
    return defined


@pytest.mark.parametrize("name", list(ROOTS))
def test_properties_and_required_fields_match_the_structs(name: str) -> None:
    schema = _committed(name)
    structs = _struct_types(name)
    assert set(structs) == {ROOTS[name].__name__} | set(schema.get("$defs", {}))
    for struct_name, info in structs.items():
        part = _schema_of(schema, struct_name)
        tag = [info.tag_field] if info.tag_field else []
        assert part["required"] == tag + [f.encode_name for f in info.fields if f.required], (
            struct_name
        )
        assert set(part["properties"]) == set(tag) | {f.encode_name for f in info.fields}, (
            struct_name
        )
        if info.tag_field:
            assert part["properties"][info.tag_field] == {"enum": [info.tag]}, struct_name


@pytest.mark.parametrize("name", [n for n in ROOTS if n != "receipt.schema.json"])
def test_every_body_tag_is_in_the_body_union(name: str) -> None:
    schema = _committed(name)
    envelope = _schema_of(schema, "Envelope")
    body = envelope["properties"]["body"]
    tags = {
        tag
        for option in body["anyOf"]
        for tag in _resolve(schema, option["$ref"])["properties"]["type"]["enum"]
    }
    expected = {t.__struct_config__.tag for t in BODY_TYPES}
    assert tags == expected
    assert body["discriminator"]["propertyName"] == "type"
    assert set(body["discriminator"]["mapping"]) == expected


# -- samples: every encoded message is valid against its schema ---------------------------
# jsonschema is not installed; this checks the few keywords msgspec emits, and fails on any
# other keyword so that it never passes by ignoring one.

_ANNOTATIONS = frozenset(
    {"$schema", "$defs", "title", "description", "default", "format", "discriminator"}
)
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _has_type(instance: Any, name: str) -> bool:
    if isinstance(instance, bool) and name != "boolean":
        return False
    return isinstance(instance, _TYPES[name])


def _errors(
    instance: Any, schema: dict[str, Any], root: dict[str, Any], path: str = "$"
) -> list[str]:
    errors: list[str] = []
    for keyword, value in schema.items():
        if keyword in _ANNOTATIONS:
            continue
        if keyword == "$ref":
            errors += _errors(instance, _resolve(root, value), root, path)
        elif keyword == "type":
            names = value if isinstance(value, list) else [value]
            if not any(_has_type(instance, n) for n in names):
                errors.append(f"{path}: {instance!r} is not of type {value}")
        elif keyword == "enum":
            if instance not in value:
                errors.append(f"{path}: {instance!r} not in {value}")
        elif keyword == "required":
            if isinstance(instance, dict):
                errors += [f"{path}: missing {field!r}" for field in value if field not in instance]
        elif keyword == "properties":
            if isinstance(instance, dict):
                for field, sub in value.items():
                    if field in instance:
                        errors += _errors(instance[field], sub, root, f"{path}.{field}")
        elif keyword == "items":
            if isinstance(instance, list):
                for i, item in enumerate(instance):
                    errors += _errors(item, value, root, f"{path}[{i}]")
        elif keyword == "pattern":
            if isinstance(instance, str) and re.search(value, instance) is None:
                errors.append(f"{path}: {instance!r} does not match {value}")
        elif keyword == "minimum":
            if isinstance(instance, int | float) and instance < value:
                errors.append(f"{path}: {instance!r} is below {value}")
        elif keyword == "anyOf":
            if all(_errors(instance, option, root, path) for option in value):
                errors.append(f"{path}: matches none of anyOf")
        else:
            raise AssertionError(
                f"the test validator does not know JSON Schema keyword {keyword!r}"
            )
    return errors


@settings(max_examples=30)
@given(envelopes())
def test_encoded_envelopes_are_valid(envelope: Envelope) -> None:
    schema = _committed("envelope.schema.json")
    assert _errors(json.loads(CODEC.encode(envelope)), schema, schema) == []


@settings(max_examples=30)
@given(deliveries())
def test_encoded_deliveries_are_valid(delivery: Delivery) -> None:
    schema = _committed("delivery.schema.json")
    assert _errors(json.loads(CODEC.encode(delivery)), schema, schema) == []


def test_an_encoded_receipt_is_valid() -> None:
    schema = _committed("receipt.schema.json")
    encoded = json.loads(msgspec.json.encode(Receipt(ids=("a", "b"))))
    assert _errors(encoded, schema, schema) == []
    assert _errors({"ids": "a"}, schema, schema) != []


def test_the_validator_rejects_what_the_decoder_rejects() -> None:
    schema = _committed("envelope.schema.json")
    good = {
        "id": "m-1",
        "sender": "writer",
        "task_id": "t-1",
        "sent_at": "2025-01-02T03:04:05Z",
        "body": {"type": "task.say", "text": "hi"},
    }
    assert _errors(good, schema, schema) == []
    bad_documents = [
        {**good, "task_id": 1},
        {k: v for k, v in good.items() if k != "sender"},
        {**good, "body": {"type": "task.nope", "text": "hi"}},
        {**good, "body": {"type": "task.say"}},
        {**good, "labels": ["a", 2]},
        {**good, "attempt": True},
    ]
    for bad in bad_documents:
        assert _errors(bad, schema, schema), bad
        with pytest.raises(schemas.MalformedMessageError):
            CODEC.decode_envelope(json.dumps(bad).encode())
