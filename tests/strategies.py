"""Shared Hypothesis strategies for the wire contracts (one module, as in attrs' tests).

Everything generated here survives a JSON round trip unchanged: timestamps are
timezone-aware UTC with microsecond precision, floats are finite, integers fit in 64 bits,
JSON arrays are lists and ``labels`` are tuples (what msgspec decodes them to).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from schemas import Codec, MalformedMessageError, is_batch
from schemas.messages import (
    ApproveTool,
    Body,
    Complete,
    Delivery,
    Envelope,
    Fail,
    HandoffDecision,
    HandoffRequest,
    ResumeAgent,
    Say,
    SubmitTask,
    SuspendAgent,
    ToolCall,
)

__all__ = [
    "BODY_STRATEGIES",
    "bodies",
    "deliveries",
    "envelopes",
    "json_values",
    "payloads",
    "timestamps",
    "tokens",
]

TOKEN_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
INT64 = 2**63


def tokens(max_size: int = 40) -> st.SearchStrategy[str]:
    """Valid NATS subject tokens: ``[A-Za-z0-9_-]{1,max_size}``."""
    return st.text(TOKEN_ALPHABET, min_size=1, max_size=max_size)


def tool_names() -> st.SearchStrategy[str]:
    """Dotted lowercase tool names, e.g. ``kb.search``."""
    word = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)
    return st.lists(word, min_size=1, max_size=3).map(".".join)


def timestamps() -> st.SearchStrategy[datetime]:
    """Timezone-aware UTC datetimes (microsecond precision), as the sender stamps ``sent_at``."""
    return st.datetimes(
        min_value=datetime(1970, 1, 1),
        max_value=datetime(2200, 1, 1),
        timezones=st.just(UTC),
    )


def _scalars() -> st.SearchStrategy[Any]:
    return (
        st.none()
        | st.booleans()
        | st.integers(-INT64, INT64 - 1)
        | st.text(max_size=20)
        | st.floats(allow_nan=False, allow_infinity=False)
    )


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value: scalars, and small nested lists and objects of them."""
    return st.recursive(
        _scalars(),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def payloads() -> st.SearchStrategy[dict[str, Any]]:
    """JSON objects with str keys, as carried in ``payload`` / ``input``."""
    return st.dictionaries(st.text(max_size=10), json_values(), max_size=5)


def _text() -> st.SearchStrategy[str]:
    return st.text(max_size=30)


# One strategy per body Struct (a test checks that it covers schemas.messages.BODY_TYPES).
BODY_STRATEGIES: dict[type[Body], st.SearchStrategy[Body]] = {
    SubmitTask: st.builds(SubmitTask, to=tokens(), title=_text(), payload=payloads()),
    Say: st.builds(Say, text=_text()),
    HandoffRequest: st.builds(HandoffRequest, to=tokens(), reason=_text(), payload=payloads()),
    HandoffDecision: st.builds(HandoffDecision, accept=st.booleans(), reason=_text()),
    Complete: st.builds(Complete, result=_text(), payload=payloads()),
    Fail: st.builds(Fail, reason=_text(), retryable=st.booleans()),
    ToolCall: st.builds(ToolCall, tool=tool_names(), args=payloads()),
    ApproveTool: st.builds(ApproveTool, tool=tool_names(), reason=_text()),
    SuspendAgent: st.builds(SuspendAgent, agent=tokens(), reason=_text()),
    ResumeAgent: st.builds(ResumeAgent, agent=tokens(), reason=_text()),
}


def bodies() -> st.SearchStrategy[Body]:
    """Any body, every body Struct being drawn."""
    return st.one_of(*BODY_STRATEGIES.values())


def _ids() -> st.SearchStrategy[str]:
    return st.uuids().map(str)


def _labels() -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(tokens(20), max_size=3).map(tuple)


def envelopes(
    body: st.SearchStrategy[Body] | None = None,
) -> st.SearchStrategy[Envelope]:
    """Any envelope; optional fields are sometimes left at their defaults."""
    return st.builds(
        Envelope,
        id=_ids(),
        sender=tokens(),
        task_id=tokens(),
        sent_at=timestamps(),
        body=bodies() if body is None else body,
        causation_id=st.none() | _ids(),
        trace=st.none() | _text(),
        labels=_labels(),
        attempt=st.integers(0, 1000),
    )


def deliveries() -> st.SearchStrategy[Delivery]:
    """Any delivery, wrapping any envelope."""
    return st.builds(
        Delivery,
        id=_ids(),
        agent=tokens(),
        task_id=tokens(),
        attempt=st.integers(0, 1000),
        title=_text(),
        input=payloads(),
        envelope=envelopes(),
        labels=_labels(),
    )


# -- intake fuzzing ------------------------------------------------------------------------
# Messages the coordinator must record as ``message.rejected`` (never accept, never crash
# on), and good messages dressed up in ways it must still accept. Used by
# tests/unit/test_fuzz_writer.py and tests/integration/test_fuzz_intake.py.
import msgspec  # noqa: E402

from schemas.codec import canonical  # noqa: E402
from schemas.messages import BODY_TYPES  # noqa: E402

KNOWN_TAGS = frozenset(t.__struct_config__.tag for t in BODY_TYPES)
FUZZ_CATEGORIES = (
    "random_bytes",  # arbitrary bytes
    "json_value",  # valid JSON that is no envelope
    "flipped",  # a spoofed envelope with 1-3 bytes XOR-ed
    "truncated",  # an envelope cut short
    "wrong_type",  # one field (envelope or body) of a type the schema does not allow
    "missing_field",  # one required field (envelope or body) left out
    "unknown_type",  # a body ``type`` no Struct has
    "invalid_utf8",  # a string field holding bytes that are not UTF-8 (or lone surrogates)
    "deep",  # a value nested 1000+ levels deep
    "huge",  # a huge string, the message around the policy's max_payload_bytes
    "spoofed",  # sender is not the principal whose subject it came on
    "unknown_task",  # output for a task nobody submitted
    "outsider",  # an agent that never took part speaking on someone else's task
    "msg_id_mismatch",  # Nats-Msg-Id is not the envelope id
    "submit_denied",  # a principal that may not submit, submitting
    "unknown_agent",  # a submission to an agent the policy does not know
)
# Intake subjects whose last part is no principal name: recorded against "_unknown".
INVALID_TAILS = ("a.b", "x" * 129, "bad$name")
INVALID_UTF8 = (
    b"\xff",
    b"\xfe\xff",
    b"\x80",
    b"\xc3",  # a lead byte without its continuation
    b"\xc3(",
    b"\xe2\x82",
    b"\xed\xa0\x80",  # an encoded surrogate (CESU-8)
    b"\xc0\xaf",  # overlong encoding of "/"
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xf8\x88\x80\x80\x80",  # 5-byte sequence
    rb"\ud800",  # JSON escapes of lone surrogates
    rb"\udfff",
    rb"\ud800\u0041",
)
_MARK = "__ledgermesh_fuzz_mark__"
_STRING_FIELDS = ("title", "text", "reason", "result")
# Values that no field of the given name accepts (checked against the decoder by a test).
WRONG_VALUES: dict[str, tuple[Any, ...]] = {
    "id": (0, 1.5, True, None, [], {}),
    "sender": (0, None, [], {}, "", "has space", "x" * 129, "a.b", "é"),
    "task_id": (0, None, [], {}, "", "a b", "x" * 129, "a.b", "*", ">"),
    "sent_at": (0, 1.5, None, "yesterday", "2025-01-02T03:04:05", "2025-13-01T00:00:00Z",
                "2025-01-02", [], {}),
    "body": (None, 0, "task.say", [], {}),
    "causation_id": (0, [], {}, True),
    "trace": (0, [], {}, False),
    "labels": ("a", 0, {}, [0], [None], [[]]),
    "attempt": (-1, "1", 1.5, None, [], True),  # (any int >= 0 is valid, 2**64 too)
    "type": (0, None, [], {}, True),
    "to": (0, None, [], "", "a b", "x" * 129, "a.b"),
    "agent": (0, None, [], "", "a b", "x" * 129),
    "tool": (0, None, [], "", "Bad", "a..b", "x" * 65),
    "title": (0, None, [], {}, True, 1.5),
    "text": (0, None, [], {}, True, 1.5),
    "reason": (0, None, [], {}, True, 1.5),
    "result": (0, None, [], {}, True, 1.5),
    "payload": ([], "x", 0, None, True),
    "args": ([], "x", 0, None, True),
    "accept": ("yes", 0, 1, None, [], 1.5),
    "retryable": ("yes", 0, 1, None, [], 1.5),
}
_REQUIRED_TOP = ("id", "sender", "task_id", "sent_at", "body")


class BadIntake:
    """One intake message the coordinator must record as rejected.

    ``codes`` are the acceptable rejection codes while the message is within the policy's
    ``max_payload_bytes``; above it the only acceptable code is ``oversize``. (A plain
    class, not a dataclass, so that Hypothesis prints failing examples with the short
    ``__repr__``.)
    """

    __slots__ = ("category", "codes", "data", "msg_id", "tail")

    def __init__(self, category: str, tail: str, data: bytes, msg_id: str | None,
                 codes: frozenset[str]) -> None:
        self.category = category
        self.tail = tail  # what follows "<prefix>.intake." in its subject
        self.data = data
        self.msg_id = msg_id  # its Nats-Msg-Id header (None: sent without one)
        self.codes = codes

    def _key(self) -> tuple[object, ...]:
        return (self.category, self.tail, self.data, self.msg_id, self.codes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BadIntake) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:  # short: a failing example holds a hundred of these
        data = self.data if len(self.data) <= 60 else self.data[:48] + b"..."
        return (f"BadIntake({self.category!r}, {self.tail[:12]!r}, {self.msg_id!r}, "
                f"{len(self.data)}B {data!r})")

    def expected_codes(self, max_payload_bytes: int) -> frozenset[str]:
        return frozenset({"oversize"}) if len(self.data) > max_payload_bytes else self.codes


def as_json_dict(env: Envelope) -> dict[str, Any]:
    """An envelope as the JSON object it is sent as."""
    out: dict[str, Any] = msgspec.json.decode(canonical(env))
    return out


def _splice(obj: dict[str, Any], path: tuple[str, ...], raw: bytes) -> bytes:
    """``obj`` encoded with the value at ``path`` replaced by the raw JSON bytes ``raw``."""
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = _MARK
    data = msgspec.json.encode(obj)
    mark = msgspec.json.encode(_MARK)
    assert data.count(mark) == 1
    return data.replace(mark, raw)


def _nested(depth: int, shape: str) -> bytes:
    if shape == "array":
        return b"[" * depth + b"1" + b"]" * depth
    return b'{"":' * depth + b"1" + b"}" * depth


def body_paths(body: dict[str, Any]) -> list[tuple[str, ...]]:
    return [("body", key) for key in sorted(body)]


def required_body_fields(tag: str) -> list[str]:
    cls = next(t for t in BODY_TYPES if t.__struct_config__.tag == tag)
    return [f.encode_name for f in msgspec.structs.fields(cls) if f.required]


_EXTRA_FIELDS = st.dictionaries(st.text(max_size=8).map(lambda s: "x-" + s), json_values(6),
                                min_size=1, max_size=3)
_WHERE_EXTRA = st.sampled_from(("envelope", "body", "both"))


def extra_fields() -> st.SearchStrategy[dict[str, Any]]:
    """Fields no Struct declares (a newer sender's): names that cannot clash with ours."""
    return _EXTRA_FIELDS


@st.composite
def with_extra_fields(draw: st.DrawFn, env: Envelope) -> bytes:
    """``env`` encoded with unknown fields added to the envelope, its body, or both; the
    coordinator must accept it exactly as it accepts ``env``."""
    obj = as_json_dict(env)
    where = draw(_WHERE_EXTRA)
    if where in ("envelope", "both"):
        obj.update(draw(_EXTRA_FIELDS))
    if where in ("body", "both"):
        obj["body"].update(draw(_EXTRA_FIELDS))
    return msgspec.json.encode(obj)


def bad_intake(
    *,
    max_payload_bytes: int,
    principals: tuple[str, ...],
    submitter: str,
    stranger: str,
    outsider: str,
    agent: str,
    task_ids: st.SearchStrategy[str],
    templates: st.SearchStrategy[Envelope] | None = None,
    ids: st.SearchStrategy[str] | None = None,
    max_random_bytes: int = 64,
    max_excess: int = 64,
    categories: tuple[str, ...] = FUZZ_CATEGORIES,
    no_msg_id: bool = True,
) -> st.SearchStrategy[BadIntake]:
    """Messages that must be rejected, each of one of ``categories``.

    ``principals`` publish (none of them an operator); ``submitter`` may submit tasks,
    ``stranger`` may not; ``outsider`` is an agent that never takes part in the tasks named
    by ``task_ids`` (the good tasks around the bad messages); ``agent`` is an agent tasks
    may be submitted to. Tasks the bad messages name are otherwise fresh ("bad-…"), so
    every rejection lands on a principal's record, never on a good task's chain.
    ``templates`` are the envelopes mutated (any envelope by default: a small pool keeps
    a long list of messages within Hypothesis's data budget).
    """
    # Strategies are built once, here: building them per draw is what makes fuzzing slow.
    templates = envelopes() if templates is None else templates
    ids = st.uuids().map(str) if ids is None else ids
    one_category = st.sampled_from(categories)
    one_principal = st.sampled_from(principals)
    any_tail = st.sampled_from(principals) | st.sampled_from(INVALID_TAILS)
    random_bytes = st.binary(max_size=max_random_bytes)
    any_json = json_values()
    # Longer than any principal, so a few flipped bytes never turn it into one of them.
    pad = "z" * max(len(p) for p in principals)
    spoofers = tokens(8).map(lambda s: "spoofer-" + pad + s)
    spoofed_task = task_ids | st.just("")
    tenths = st.integers(0, 9)
    flips = st.lists(st.tuples(st.integers(0, 2**16), st.integers(1, 255)),
                     min_size=1, max_size=3)
    cut = st.integers(0, 2**16)
    tags = st.sampled_from(("", "TASK.SAY", "task.say ", "task.submit\x00",
                            "message.rejected", "task")) | st.text(max_size=20)
    utf8 = st.sampled_from(INVALID_UTF8)
    ok_or_not = st.sampled_from(("", "ok"))
    depths = st.integers(1000, 1200)
    shapes = st.sampled_from(("array", "object"))
    deep_places = st.sampled_from(("id", "task_id", "labels", "payload", "extra"))
    over = st.integers(1, max_excess)
    around = st.integers(-max_excess, max_excess)
    nobody = tokens(20).map(lambda s: "nobody-" + s)
    mismatched = ids.map(lambda s: "not-" + s)

    @st.composite
    def one(draw: st.DrawFn) -> BadIntake:
        category = draw(one_category)
        principal = draw(one_principal)
        new_id = draw(ids)
        fresh_task = "bad-" + "".join(c for c in new_id if c in TOKEN_ALPHABET)[:100]
        template = msgspec.structs.replace(draw(templates), id=new_id, sender=principal,
                                           task_id=fresh_task)

        def header(env_id: str) -> str | None:
            return None if no_msg_id and draw(tenths) == 0 else env_id

        def make(data: bytes, codes: set[str], tail: str = principal,
                 msg_id: str | None = None) -> BadIntake:
            return BadIntake(category, tail, data, msg_id, frozenset(codes))

        if category == "random_bytes":
            return make(draw(random_bytes), {"malformed"}, draw(any_tail), header(new_id))
        if category == "json_value":
            return make(msgspec.json.encode(draw(any_json)), {"malformed"}, draw(any_tail),
                        header(new_id))
        if category in ("spoofed", "flipped"):
            env = msgspec.structs.replace(template, sender=draw(spoofers),
                                          task_id=draw(spoofed_task) or fresh_task)
            data = canonical(env)
            if category == "spoofed":
                return make(data, {"spoofed_sender"}, msg_id=header(env.id))
            flipped = bytearray(data)
            for at, mask in draw(flips):
                flipped[at % len(data)] ^= mask
            return make(bytes(flipped), {"spoofed_sender", "malformed"},
                        msg_id=header(env.id))
        if category == "truncated":
            data = canonical(template)
            return make(data[: draw(cut) % len(data)], {"malformed"}, msg_id=header(new_id))
        obj = as_json_dict(template)
        path: tuple[str, ...]
        if category == "wrong_type":
            path = draw(st.sampled_from([(k,) for k in WRONG_VALUES if k in obj]
                                        + body_paths(obj["body"])))
            value = draw(st.sampled_from(WRONG_VALUES[path[-1]]))
            return make(_splice(obj, path, msgspec.json.encode(value)), {"malformed"},
                        msg_id=header(new_id))
        if category == "missing_field":
            required = [(k,) for k in _REQUIRED_TOP] + [
                ("body", k) for k in ["type", *required_body_fields(obj["body"]["type"])]]
            path = draw(st.sampled_from(required))
            del (obj["body"] if len(path) == 2 else obj)[path[-1]]
            return make(msgspec.json.encode(obj), {"malformed"}, msg_id=header(new_id))
        if category == "unknown_type":
            tag = draw(tags)
            obj["body"]["type"] = tag if tag not in KNOWN_TAGS else tag + "!"
            return make(msgspec.json.encode(obj), {"malformed"}, msg_id=header(new_id))
        if category == "invalid_utf8":
            strings = [("id",), ("sender",), ("task_id",)] + [
                ("body", k) for k in _STRING_FIELDS if k in obj["body"]]
            path = draw(st.sampled_from(strings))
            raw = (b'"' + draw(ok_or_not).encode() + draw(utf8) + draw(ok_or_not).encode()
                   + b'"')
            return make(_splice(obj, path, raw), {"malformed"}, msg_id=header(new_id))
        if category == "deep":
            nested = _nested(draw(depths), draw(shapes))
            where = draw(deep_places)
            tail = principal
            if where == "payload":  # an otherwise valid submission: only its depth is wrong
                obj = as_json_dict(msgspec.structs.replace(
                    template, sender=submitter, body=SubmitTask(to=agent, title="deep")))
                obj["body"]["payload"] = {"k": None}
                path = ("body", "payload", "k")
                tail = submitter
            elif where == "extra":  # an unknown field, nested that deep
                obj["x-deep"] = None
                path = ("x-deep",)
            else:
                path = (where,)
            return make(_splice(obj, path, nested), {"malformed"}, tail, header(new_id))
        if category == "huge":
            # The size lands within max_excess bytes of the limit (a valid submission:
            # only above it).
            if draw(st.booleans()):
                env = msgspec.structs.replace(template, sender=submitter,
                                              body=SubmitTask(to=agent, title=""))
                size = max_payload_bytes + draw(over)
                title = "x" * max(size - len(canonical(env)), 0)
                data = canonical(msgspec.structs.replace(env, body=SubmitTask(
                    to=agent, title=title)))
                return make(data, {"oversize"}, submitter, header(new_id))
            obj["task_id"] = ""
            size = max_payload_bytes + draw(around) - len(msgspec.json.encode(obj))
            obj["task_id"] = "x" * max(size, 129)  # too long for a task id anyway
            return make(msgspec.json.encode(obj), {"malformed"}, msg_id=header(new_id))
        if category == "unknown_task":
            body = template.body
            if isinstance(body, SubmitTask):
                body = Say(text=body.title)
            env = msgspec.structs.replace(template, body=body)
            return make(canonical(env), {"unknown_task", "not_operator"},
                        msg_id=header(new_id))
        if category == "outsider":
            body = template.body
            if isinstance(body, SubmitTask):  # its own submission would be a valid one
                body = Say(text=body.title)
            env = msgspec.structs.replace(template, sender=outsider, body=body,
                                          task_id=draw(task_ids))
            return make(canonical(env), {"unknown_task", "not_owner", "task_closed",
                                         "not_operator"}, outsider, header(new_id))
        if category == "msg_id_mismatch":
            return make(canonical(template), {"msg_id_mismatch"}, msg_id=draw(mismatched))
        if category == "submit_denied":
            env = msgspec.structs.replace(template, sender=stranger,
                                          body=SubmitTask(to=agent, title="let me in"))
            return make(canonical(env), {"submit_denied"}, stranger, header(new_id))
        assert category == "unknown_agent", category
        env = msgspec.structs.replace(template, sender=submitter,
                                      body=SubmitTask(to=draw(nobody), title="to whom?"))
        return make(canonical(env), {"unknown_agent"}, submitter, header(new_id))

    return one()


def _template_pool() -> tuple[Envelope, ...]:
    sent_at = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    bodies_: list[Body] = [
        SubmitTask(to="triage", title="Refund?", payload={"order": 1182, "items": [1, 2]}),
        Say(text="thinking… ünïcödé ✓"),
        HandoffRequest(to="researcher", reason="needs a lookup", payload={"q": None}),
        HandoffDecision(accept=False, reason="not mine"),
        Complete(result="done", payload={"answer": "yes", "score": 0.5}),
        Fail(reason="gave up", retryable=True),
        ToolCall(tool="kb.search", args={"query": "refund"}),
        ApproveTool(tool="payments.refund", reason="ok'd"),
        SuspendAgent(agent="triage", reason="misbehaving"),
        ResumeAgent(agent="triage"),
    ]
    return tuple(
        Envelope(id="template", sender="template", task_id="template", sent_at=sent_at,
                 body=body, causation_id=cause, trace=trace, labels=labels, attempt=attempt)
        for body in bodies_
        for cause, trace, labels, attempt in ((None, None, (), 0),
                                              ("c-1", "trace-1", ("untrusted",), 3))
    )


# A fixed pool of templates (every body type): one choice per draw, for long lists.
TEMPLATE_POOL = _template_pool()


# -- matching rejections to the bad messages that caused them ------------------------------
import base64  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterable  # noqa: E402

Ident = tuple[str, str]


def rejection_identity(key: str, code: str, raw: str, msg_id: str) -> Ident:
    """What ties a rejection to its message: the raw bytes it recorded, or for an oversize
    message (whose bytes are not kept) its Nats-Msg-Id ("seq-N" without one)."""
    return (key, "id:" + msg_id) if code == "oversize" else (key, "raw:" + raw)


def _rejected_parts(bad: BadIntake, data: bytes, msg_id: str,
                    limit: int) -> list[tuple[bytes, str, frozenset[str]]]:
    """What a bad message is rejected as: itself, or, if it reads as a batch (a JSON array
    with elements), each element on its own (none of them is a valid envelope)."""
    if is_batch(data):
        try:
            parts = Codec().split_batch(data)
        except MalformedMessageError:
            parts = []
        if parts:
            return [(part, f"{msg_id}/{i}", frozenset({"oversize"}) if len(part) > limit
                     else frozenset({"malformed"})) for i, part in enumerate(parts)]
    return [(data, msg_id, bad.expected_codes(limit))]


def match_rejections(events: list[dict[str, Any]],
                     sent: Iterable[tuple[str, BadIntake, bytes, str]],
                     limit: int) -> tuple[Counter[Ident], Counter[Ident]]:
    """(expected, got): one ``message.rejected`` per bad message ``(principal key, bad
    message, bytes published, msg id)``, each asserted to be on the publisher's record, with
    a reason and a code that bad message allows."""
    expected: Counter[Ident] = Counter()
    codes: dict[Ident, set[str]] = {}
    for key, bad, data, msg_id in sent:
        for element, element_id, allowed in _rejected_parts(bad, data, msg_id, limit):
            ident = rejection_identity(key, "oversize" if allowed == {"oversize"} else "",
                                       base64.b64encode(element).decode(), element_id)
            expected[ident] += 1
            codes.setdefault(ident, set()).update(allowed)
    got: Counter[Ident] = Counter()
    for r in (e for e in events if e["kind"] == "message.rejected"):
        where = f"{r['data']['code']}: {r['data']['reason']} (msg {r['msg_id']})"
        assert r["aggregate"] == "principal", where
        assert r["data"]["reason"], where
        assert r["data"]["subject_principal"] == r["key"], where
        ident = rejection_identity(r["key"], r["data"]["code"], r["raw"], r["msg_id"])
        assert ident in codes, f"a rejection no bad message explains: {where}"
        assert r["data"]["code"] in codes[ident], (where, codes[ident])
        got[ident] += 1
    return expected, got
