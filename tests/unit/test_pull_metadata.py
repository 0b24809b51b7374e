"""A pulled message's stream sequence and delivery count, read from its reply subject,
agree with nats-py's own ``Msg.metadata`` in both of JetStream's reply layouts."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from bus.client import _sequence_and_delivered

REPLIES = [
    "$JS.ACK.LM_INTAKE.coordinator.1.42.40.1732474000000000000.17",
    "$JS.ACK.LM_INTAKE.coordinator.3.9007199254740993.7.1732474000000000000.0",
    # the longer form: domain ("_" for none) and account hash, then a random token
    "$JS.ACK._.ACCHASH.LM_INTAKE.coordinator.2.513.511.1732474000000000000.5.x7Yq",
    "$JS.ACK.hub.ACCHASH.LM_DELIVER.hop1.1.7.7.1732474000000000000.0",
]


@pytest.mark.parametrize("reply", REPLIES)
def test_agrees_with_nats_py(reply: str) -> None:
    msg = Msg(None, subject="lm.intake.hop1", reply=reply)  # type: ignore[arg-type]
    meta = msg.metadata
    assert _sequence_and_delivered(msg) == (meta.sequence.stream, meta.num_delivered)


def test_a_message_not_from_jetstream_is_refused_as_nats_py_refuses_it() -> None:
    msg = Msg(None, subject="lm.intake.hop1", reply="_INBOX.abc.1")  # type: ignore[arg-type]
    with pytest.raises(NotJSMessageError):
        _sequence_and_delivered(msg)
