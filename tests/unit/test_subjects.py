"""Subject, stream and consumer names: built in one place, parsed back safely."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.subjects import Subjects, is_token
from tests.strategies import tokens

LM = Subjects()


# -- builders -----------------------------------------------------------------------------


def test_default_prefix_is_lm() -> None:
    assert LM.prefix == "lm"


def test_subject_builders() -> None:
    assert LM.intake("writer") == "lm.intake.writer"
    assert LM.intake_all == "lm.intake.>"
    assert LM.deliver("reviewer") == "lm.deliver.reviewer"
    assert LM.deliver_all == "lm.deliver.>"
    assert LM.ledger("task", "t-1", "HandoffAccepted") == "lm.ledger.task.t-1.HandoffAccepted"
    assert LM.ledger_of_task("t-1") == "lm.ledger.task.t-1.>"
    assert LM.ledger_all == "lm.ledger.>"


def test_builders_use_the_prefix() -> None:
    dev = Subjects("dev-2")
    assert dev.intake("a") == "dev-2.intake.a"
    assert dev.intake_all == "dev-2.intake.>"
    assert dev.deliver("a") == "dev-2.deliver.a"
    assert dev.deliver_all == "dev-2.deliver.>"
    assert dev.ledger("task", "t", "Created") == "dev-2.ledger.task.t.Created"
    assert dev.ledger_of_task("t") == "dev-2.ledger.task.t.>"
    assert dev.ledger_all == "dev-2.ledger.>"


def test_stream_and_consumer_names() -> None:
    assert (LM.intake_stream, LM.deliver_stream, LM.ledger_stream) == (
        "LM_INTAKE",
        "LM_DELIVER",
        "LM_LEDGER",
    )
    assert LM.coordinator_consumer == "coordinator"
    assert LM.agent_consumer("writer") == "agent-writer"
    other = Subjects("t1a2b3c4d")
    assert (other.intake_stream, other.deliver_stream, other.ledger_stream) == (
        "T1A2B3C4D_INTAKE",
        "T1A2B3C4D_DELIVER",
        "T1A2B3C4D_LEDGER",
    )


@given(tokens(), tokens())
def test_names_are_valid_nats_names(prefix: str, agent: str) -> None:
    """Stream and consumer names may not hold '.', '*', '>' or whitespace; subjects are tokens."""
    subjects = Subjects(prefix)
    for name in (
        subjects.intake_stream,
        subjects.deliver_stream,
        subjects.ledger_stream,
    ):
        assert is_token(name)
    assert is_token(subjects.coordinator_consumer)
    assert is_token(subjects.agent_consumer(agent))
    assert all(is_token(part) for part in subjects.intake(agent).split("."))
    assert all(is_token(part) for part in subjects.deliver(agent).split("."))


def test_subjects_is_a_frozen_value() -> None:
    assert Subjects("lm") == LM
    assert hash(Subjects("lm")) == hash(LM)
    with pytest.raises(AttributeError):
        LM.prefix = "other"  # type: ignore[misc]


def test_service_names() -> None:
    assert LM.service("writer") == "lm_writer"
    assert Subjects("dev").service("coordinator") == "dev_coordinator"


# -- ledger message ids -------------------------------------------------------------------


@given(tokens(), st.integers(min_value=0, max_value=2**64))
def test_ledger_position_inverts_ledger_msg_id(prefix: str, position: int) -> None:
    subjects = Subjects(prefix)
    assert subjects.ledger_position(subjects.ledger_msg_id(position)) == position


def test_ledger_msg_id_format() -> None:
    assert LM.ledger_msg_id(42) == "lm:42"


@pytest.mark.parametrize("msg_id", [None, ""])
def test_nothing_relayed_yet_is_position_zero(msg_id: str | None) -> None:
    assert LM.ledger_position(msg_id) == 0


@pytest.mark.parametrize(
    "msg_id",
    [
        "dev:1",
        "LM:1",
        "lm",
        "lm:",
        "lm:x",
        "lm:-1",
        "lm:1.5",
        "lm: 1",
        "lm:1:2",
        ":1",
        "lm-1",
        "0190f5d2-7c1e",
    ],
)
def test_ledger_position_rejects_other_ids(msg_id: str) -> None:
    with pytest.raises(ValueError, match="not a ledger message id"):
        LM.ledger_position(msg_id)


# -- invalid prefixes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix", ["", "lm.x", "lm*", ">", "*", "l m", " lm", "lm\n", "lé", "a" * 129]
)
def test_invalid_prefix_raises_value_error(prefix: str) -> None:
    with pytest.raises(ValueError, match="subject prefix"):
        Subjects(prefix)


# -- principal_of -------------------------------------------------------------------------


@given(tokens(), tokens())
def test_principal_of_inverts_intake(prefix: str, principal: str) -> None:
    subjects = Subjects(prefix)
    assert subjects.principal_of(subjects.intake(principal)) == principal


@pytest.mark.parametrize(
    ("subject", "principal"),
    [
        ("lm.intake.writer", "writer"),
        ("lm.intake.a", "a"),
        ("lm.intake.agent_2-b", "agent_2-b"),
        ("lm.intake." + "x" * 128, "x" * 128),
    ],
)
def test_principal_of_valid_subjects(subject: str, principal: str) -> None:
    assert LM.principal_of(subject) == principal


@pytest.mark.parametrize(
    "subject",
    [
        # wrong prefix or not an intake subject
        "xx.intake.writer",
        "LM.intake.writer",
        "lmx.intake.writer",
        "l.intake.writer",
        "intake.writer",
        "lm.deliver.writer",
        "lm.ledger.task.t-1.Created",
        ".lm.intake.writer",
        # no principal, or more than one token
        "lm.intake",
        "lm.intake.",
        "lm.intake.writer.extra",
        "lm.intake.writer.",
        "lm.intake..writer",
        # wildcards
        "lm.intake.*",
        "lm.intake.>",
        "lm.*.writer",
        "lm.intake.wri*ter",
        # not a token
        "lm.intake.wri ter",
        "lm.intake.writer\n",
        "lm.intake.é",
        "lm.intake." + "x" * 129,
        "",
    ],
)
def test_principal_of_rejects_other_subjects(subject: str) -> None:
    assert LM.principal_of(subject) is None


@given(tokens(), tokens(), tokens())
def test_principal_of_rejects_another_prefix(prefix: str, other: str, principal: str) -> None:
    if other != prefix:
        assert Subjects(prefix).principal_of(Subjects(other).intake(principal)) is None


@given(tokens(), st.lists(tokens(), min_size=2, max_size=4))
def test_principal_of_rejects_extra_tokens(prefix: str, parts: list[str]) -> None:
    subjects = Subjects(prefix)
    assert subjects.principal_of(subjects.intake(".".join(parts))) is None


# -- is_token -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["a", "Z", "0", "-", "_", "--", "agent-1", "Agent_2", "t1a2b3c4d", "x" * 128],
)
def test_is_token_accepts(value: str) -> None:
    assert is_token(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * 129,
        "a.b",
        ".",
        "*",
        ">",
        "a*",
        "a>",
        "a b",
        " a",
        "a\n",  # `$` would match before a trailing newline; fullmatch must not
        "\t",
        "é",
        "\u0663",  # ARABIC-INDIC DIGIT THREE: a Unicode digit is not [0-9]
        "\uff41",  # FULLWIDTH LATIN SMALL LETTER A
        "a/b",
        "$SRV",
        "a\x00",
    ],
)
def test_is_token_rejects(value: str) -> None:
    assert not is_token(value)


@given(tokens())
def test_generated_tokens_are_tokens(value: str) -> None:
    assert is_token(value)


@given(st.text(min_size=1, max_size=20))
def test_is_token_matches_the_alphabet(value: str) -> None:
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
    assert is_token(value) == set(value).issubset(allowed)
