"""Intake batches (schemas/batch.py): packing envelopes into messages and splitting them
back, byte for byte."""

from __future__ import annotations

import re

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import Codec, Envelope, MalformedMessageError, batch_msg_id, is_batch, pack
from tests.strategies import envelopes

CODEC = Codec()


def encoded(items: list[Envelope]) -> list[tuple[str, bytes]]:
    return [(e.id, CODEC.encode(e)) for e in items]


@given(st.lists(envelopes(), min_size=1, max_size=8), st.integers(1, 4000))
def test_packed_messages_split_back_into_the_same_envelope_bytes_in_order(
        items: list[Envelope], max_bytes: int) -> None:
    sent = encoded(items)
    messages = pack(sent, max_bytes)
    back: list[tuple[str, bytes]] = []
    for msg_id, data in messages:
        if is_batch(data):
            parts = CODEC.split_batch(data)
            assert len(parts) >= 2
            assert len(data) <= max_bytes  # a batch keeps to the limit...
            ids = [CODEC.decode_envelope(p).id for p in parts]
            assert msg_id == batch_msg_id(ids)
            back += zip(ids, parts, strict=True)
        else:  # ...and an envelope alone is itself, with its own id
            assert msg_id == CODEC.decode_envelope(data).id
            back.append((msg_id, data))
    assert back == sent


def test_small_envelopes_share_a_message_and_a_long_one_goes_alone() -> None:
    small = [("a", b'{"n":1}'), ("b", b'{"n":2}')]
    long = ("c", b'{"n":"' + b"x" * 100 + b'"}')
    assert pack([*small, long, *small], max_bytes=64) == [
        (batch_msg_id(["a", "b"]), b'[{"n":1},{"n":2}]'),
        long,
        (batch_msg_id(["a", "b"]), b'[{"n":1},{"n":2}]'),
    ]
    assert pack(small[:1]) == small[:1]
    assert pack([]) == []


def test_with_a_key_every_envelope_goes_in_a_batch_under_a_keyed_id() -> None:
    small = [("a", b'{"n":1}'), ("b", b'{"n":2}')]
    long = ("c", b'{"n":"' + b"x" * 100 + b'"}')
    key = b"k" * 32
    assert pack([*small, long], max_bytes=64, key=key) == [
        (batch_msg_id(["a", "b"], key), b'[{"n":1},{"n":2}]'),
        (batch_msg_id(["c"], key), b"[" + long[1] + b"]"),
    ]
    assert pack(small[:1], key=key) == [(batch_msg_id(["a"], key), b'[{"n":1}]')]
    # Nobody without the key can compute the id: not from the envelope ids, not unkeyed.
    keyed = batch_msg_id(["a"], key)
    assert keyed not in {"a", batch_msg_id(["a"]), batch_msg_id(["a"], b"j" * 32)}
    assert keyed == batch_msg_id(["a"], key)  # a republish is still deduplicated


def test_the_batch_id_depends_on_every_id_and_their_order() -> None:
    assert batch_msg_id(["a", "b"]) == batch_msg_id(["a", "b"])
    assert len({batch_msg_id(["a", "b"]), batch_msg_id(["b", "a"]), batch_msg_id(["a"]),
                batch_msg_id(["a", "b", "c"]), batch_msg_id(["ab"])}) == 5


@pytest.mark.parametrize(("data", "batch"), [
    (b"[]", True), (b" \n[{}]", True), (b"{}", False), (b" {}", False), (b"", False),
    (b"  ", False), (b"null", False)])
def test_a_batch_is_a_json_array(data: bytes, batch: bool) -> None:
    assert is_batch(data) is batch


@pytest.mark.parametrize("data", [b"[]", b"[{}", b"[1,]", b"[\xff]", b"[" * 10_000])
def test_a_bad_batch_is_one_clear_error(data: bytes) -> None:
    with pytest.raises(MalformedMessageError, match=re.escape("batch on 'lm.intake.x'")):
        CODEC.split_batch(data, "lm.intake.x")


def test_elements_are_split_as_sent_even_when_they_are_no_envelopes() -> None:
    assert CODEC.split_batch(b'[ {"a" : 1} ,null,"x"]') == [b'{"a" : 1}', b"null", b'"x"']
    assert msgspec.json.decode(b"[" + b",".join(CODEC.split_batch(b"[1,[2]]")) + b"]") == [
        1, [2]]
