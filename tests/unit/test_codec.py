"""The codec: round trips, canonical bytes, and clear errors for everything else."""

from __future__ import annotations

import json
import random
import re
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import MAX_DEPTH, Codec, canonical
from schemas.errors import MalformedMessageError
from schemas.messages import BODY_TYPES, Delivery, Envelope, Say, SubmitTask
from tests.strategies import (
    BODY_STRATEGIES,
    deliveries,
    envelopes,
    json_values,
    payloads,
)

CODEC = Codec()
SUBJECT = "lm.intake.writer"
KNOWN_TAGS = frozenset(t.__struct_config__.tag for t in BODY_TYPES)

ENVELOPE = Envelope(
    id="0190f5d2-7c1e-7000-8000-000000000001",
    sender="writer",
    task_id="t-1",
    sent_at=datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    body=Say(text="hello"),
)
DELIVERY = Delivery(
    id="d-1",
    agent="writer",
    task_id="t-1",
    attempt=1,
    title="a title",
    input={"k": [1, 2]},
    envelope=ENVELOPE,
)


def _as_dict(message: Envelope | Delivery) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(CODEC.encode(message))
    return decoded


def _reordered(value: Any, rnd: random.Random) -> Any:
    """The same JSON value with every object's keys inserted in a shuffled order."""
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: _reordered(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [_reordered(v, rnd) for v in value]
    return value


def _keys_sorted(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert keys == sorted(keys)
    return dict(pairs)


# -- round trips --------------------------------------------------------------------------


@given(envelopes())
def test_any_envelope_round_trips(envelope: Envelope) -> None:
    assert CODEC.decode_envelope(CODEC.encode(envelope), SUBJECT) == envelope


@given(deliveries())
def test_any_delivery_round_trips(delivery: Delivery) -> None:
    assert CODEC.decode_delivery(CODEC.encode(delivery), "lm.deliver.writer") == delivery


def test_every_body_type_has_a_strategy() -> None:
    assert set(BODY_STRATEGIES) == set(BODY_TYPES)


@pytest.mark.parametrize("body_type", BODY_TYPES, ids=lambda t: t.__name__)
@settings(max_examples=20)
@given(data=st.data())
def test_every_body_type_round_trips(body_type: type[Any], data: st.DataObject) -> None:
    envelope = data.draw(envelopes(body=BODY_STRATEGIES[body_type]))
    decoded = CODEC.decode_envelope(CODEC.encode(envelope), SUBJECT)
    assert type(decoded.body) is body_type
    assert decoded == envelope


def test_sent_at_is_rfc3339_utc_and_keeps_microseconds() -> None:
    assert _as_dict(ENVELOPE)["sent_at"] == "2025-01-02T03:04:05.678901Z"
    assert CODEC.decode_envelope(CODEC.encode(ENVELOPE)).sent_at.tzinfo is not None


# -- canonical bytes ----------------------------------------------------------------------


def test_canonical_sorts_keys_and_has_no_whitespace() -> None:
    assert canonical({"b": 1, "a": {"d": [2, {"f": 3, "e": 4}], "c": None}}) == (
        b'{"a":{"c":null,"d":[2,{"e":4,"f":3}]},"b":1}'
    )


@given(envelopes())
def test_canonical_is_deterministic_and_survives_a_round_trip(
    envelope: Envelope,
) -> None:
    first = canonical(envelope)
    assert canonical(envelope) == first
    assert CODEC.encode(envelope) == first
    assert canonical(CODEC.decode_envelope(first, SUBJECT)) == first
    json.loads(first, object_pairs_hook=_keys_sorted)


@given(payloads(), st.randoms(use_true_random=False))
def test_canonical_is_key_order_independent(payload: dict[str, Any], rnd: random.Random) -> None:
    shuffled = _reordered(payload, rnd)
    assert shuffled == payload
    assert canonical(shuffled) == canonical(payload)


@given(envelopes(), st.randoms(use_true_random=False))
def test_envelope_encoding_is_independent_of_wire_key_order(
    envelope: Envelope, rnd: random.Random
) -> None:
    """A sender that orders its JSON keys differently still yields the same canonical bytes."""
    wire = json.dumps(_reordered(_as_dict(envelope), rnd)).encode()
    assert canonical(CODEC.decode_envelope(wire, SUBJECT)) == canonical(envelope)


# -- malformed input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe\x00",
        b"{",
        b"null",
        b"[]",
        b'"envelope"',
        b"42",
        b'{"id":',
        b"{}",
    ],
)
def test_garbage_raises_malformed_message_naming_the_subject(data: bytes) -> None:
    with pytest.raises(MalformedMessageError) as caught:
        CODEC.decode_envelope(data, SUBJECT)
    assert caught.value.subject == SUBJECT
    assert repr(SUBJECT) in str(caught.value)
    assert isinstance(caught.value.__cause__, msgspec.DecodeError)
    with pytest.raises(MalformedMessageError, match=r"lm\.deliver\.writer"):
        CODEC.decode_delivery(data, "lm.deliver.writer")


@settings(max_examples=50)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_are_never_an_envelope(data: bytes) -> None:
    with pytest.raises(MalformedMessageError, match=re.escape(repr(SUBJECT))):
        CODEC.decode_envelope(data, SUBJECT)


def _set(document: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        document = document[key]
    document[last] = value


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("task_id", 1, "$.task_id"),
        ("id", None, "$.id"),
        ("sent_at", "yesterday", "$.sent_at"),
        ("attempt", "1", "$.attempt"),
        ("attempt", 1.5, "$.attempt"),
        ("labels", "untrusted", "$.labels"),
        ("labels", ["ok", 7], "$.labels[1]"),
        ("causation_id", [], "$.causation_id"),
        ("body", "hello", "$.body"),
        ("body.text", False, "$.body.text"),
    ],
)
def test_wrong_type_names_subject_and_json_path(field: str, value: Any, path: str) -> None:
    document = _as_dict(ENVELOPE)
    _set(document, field, value)
    with pytest.raises(MalformedMessageError) as caught:
        CODEC.decode_envelope(msgspec.json.encode(document), SUBJECT)
    assert repr(SUBJECT) in str(caught.value)
    assert f"at `{path}`" in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("attempt", None, "$.attempt"),
        ("input", [], "$.input"),
        ("envelope.task_id", 1, "$.envelope.task_id"),
        ("envelope.body.text", 1, "$.envelope.body.text"),
    ],
)
def test_wrong_type_in_delivery_names_subject_and_json_path(
    field: str, value: Any, path: str
) -> None:
    document = _as_dict(DELIVERY)
    _set(document, field, value)
    with pytest.raises(MalformedMessageError) as caught:
        CODEC.decode_delivery(msgspec.json.encode(document), "lm.deliver.writer")
    assert "'lm.deliver.writer'" in str(caught.value)
    assert f"at `{path}`" in str(caught.value)


def test_missing_required_field_is_malformed() -> None:
    document = _as_dict(ENVELOPE)
    del document["body"]["text"]
    with pytest.raises(
        MalformedMessageError, match=r"missing required field `text` - at `\$\.body`"
    ):
        CODEC.decode_envelope(msgspec.json.encode(document), SUBJECT)


# -- evolution ----------------------------------------------------------------------------


def _unknown_fields() -> st.SearchStrategy[dict[str, Any]]:
    # "x-" keys cannot collide with a field of any Struct: none of them has a '-'.
    return st.dictionaries(st.text(max_size=8).map(lambda k: "x-" + k), json_values(4), max_size=3)


@given(envelopes(), _unknown_fields(), _unknown_fields())
def test_unknown_fields_from_a_newer_sender_are_ignored(
    envelope: Envelope, extra: dict[str, Any], extra_in_body: dict[str, Any]
) -> None:
    document = _as_dict(envelope)
    document.update(extra)
    document["body"].update(extra_in_body)
    assert CODEC.decode_envelope(msgspec.json.encode(document), SUBJECT) == envelope


@given(deliveries(), _unknown_fields())
def test_unknown_fields_in_a_delivery_are_ignored(
    delivery: Delivery, extra: dict[str, Any]
) -> None:
    document = _as_dict(delivery)
    document.update(extra)
    document["envelope"].update(extra)
    assert CODEC.decode_delivery(msgspec.json.encode(document), "lm.deliver.a") == delivery


@given(envelopes(), st.text(max_size=20).filter(lambda tag: tag not in KNOWN_TAGS))
def test_unknown_body_type_is_rejected(envelope: Envelope, tag: str) -> None:
    document = _as_dict(envelope)
    document["body"]["type"] = tag
    with pytest.raises(MalformedMessageError, match=r"at `\$\.body\.type`") as caught:
        CODEC.decode_envelope(msgspec.json.encode(document), SUBJECT)
    assert caught.value.subject == SUBJECT


def test_body_without_type_is_rejected() -> None:
    document = _as_dict(ENVELOPE)
    del document["body"]["type"]
    with pytest.raises(
        MalformedMessageError, match=r"missing required field `type` - at `\$\.body`"
    ):
        CODEC.decode_envelope(msgspec.json.encode(document), SUBJECT)



@pytest.mark.parametrize(("open_", "close"), [(b"[", b"]"), (b'{"k":', b"}")])
def test_nesting_is_refused_exactly_past_the_limit(open_: bytes, close: bytes) -> None:
    # The body is level 0 and the payload level 1: ``levels`` containers inside the payload
    # reach depth 1 + levels, and depth MAX_DEPTH is one past what is allowed.
    def submit(levels: int) -> bytes:
        data = canonical(Envelope(id="e-1", sender="client", task_id="t-1",
                                  sent_at=ENVELOPE.sent_at,
                                  body=SubmitTask(to="writer", title="t",
                                                  payload={"p": "__x__"})))
        return data.replace(b'"__x__"', open_ * levels + b"1" + close * levels)

    assert CODEC.decode_envelope(submit(MAX_DEPTH - 2), SUBJECT).body is not None
    with pytest.raises(MalformedMessageError, match="nested deeper than"):
        CODEC.decode_envelope(submit(MAX_DEPTH - 1), SUBJECT)


def test_brackets_inside_text_do_not_count_as_nesting() -> None:
    # Counting brackets in the bytes only decides whether to walk the body: text full
    # of them is walked and found flat.
    data = canonical(msgspec.structs.replace(ENVELOPE, body=Say(text="[{" * 500)))
    assert CODEC.decode_envelope(data, SUBJECT).body == Say(text="[{" * 500)
