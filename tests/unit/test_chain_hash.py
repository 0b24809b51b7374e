"""The fast hash path agrees with the definition of the chain hash.

``stamp`` hashes ``canonical(state)`` spliced into the canonical body, and replay hashes the
stored bytes with the hash field cut out; both must give exactly ``chain_hash`` of the
state, for any data an event can carry (including data that itself holds ``"hash"`` keys).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from coordinator.ledger.events import (
    GENESIS,
    TOPIC,
    Aggregate,
    Draft,
    Kind,
    LedgerEvent,
    Provenance,
    chain_hash,
    stamp,
    stored_state,
    unhashed,
)
from coordinator.ledger.replay import link_problem
from coordinator.ledger.store import CanonicalTranscoder
from tests.strategies import json_values, tokens

provenances = st.builds(Provenance, msg_id=tokens(), sender=tokens(),
                        sent_at=st.none() | st.just("2026-11-24T12:00:00+00:00"),
                        causation_id=st.none() | tokens(), trace=st.none() | tokens(),
                        raw=st.text(max_size=30))
datas = st.dictionaries(st.sampled_from(["hash", "key", "data", "x", "prev_hash"]) | tokens(),
                        json_values(), max_size=4)


def _stored(draft_data: dict[str, Any], provenance: Provenance, version: int,
            prev_hash: str, aggregate: str = Aggregate.TASK) -> tuple[Any, bytes]:
    draft = Draft(aggregate=aggregate, key="t-1", kind=Kind.SAID, data=draft_data,
                  provenance=provenance)
    event, stored = stamp(draft, version=version, prev_hash=prev_hash,
                          recorded_at="2026-11-24T12:00:01+00:00")
    # The bytes stamp hands to the ledger are what eventsourcing's mapper would store.
    assert stored == CanonicalTranscoder().encode(stored_state(event))
    return event, stored


@given(datas, provenances, st.integers(1, 10**9), st.sampled_from([GENESIS, "ab" * 32]),
       st.sampled_from([Aggregate.TASK, Aggregate.PRINCIPAL, Aggregate.CHECKPOINT]))
def test_stamp_hashes_what_the_definition_says(data: dict[str, Any], provenance: Provenance,
                                               version: int, prev_hash: str,
                                               aggregate: str) -> None:
    event, stored = _stored(data, provenance, version, prev_hash, aggregate)
    state = stored_state(event)
    del state["hash"]
    assert event.hash == chain_hash(prev_hash, event.originator_id, version, TOPIC, state)
    # Replay's cut of the stored bytes is exactly the canonical state without the hash.
    assert unhashed(stored, event.hash) == CanonicalTranscoder().encode(state)
    assert link_problem(event, version - 1, prev_hash, stored) is None


@given(datas, provenances)
def test_data_that_quotes_the_hash_cannot_fool_the_cut(data: dict[str, Any],
                                                       provenance: Provenance) -> None:
    # A forger rewrites the data and plants the event's own hash field inside it, ahead of
    # the real one: the cut then removes the planted copy. The link must still break, as it
    # does when the decoded state is re-encoded.
    event, _ = _stored(data, provenance, 1, GENESIS)
    state = stored_state(event)
    state["data"] = {"hash": event.hash, "x": {"hash": event.hash}, "z": 1}
    forged = CanonicalTranscoder().encode(state)
    assert forged.count(b'"hash":"%s",' % event.hash.encode()) >= 2
    forged_event = LedgerEvent(originator_id=event.originator_id, originator_version=1,
                               **CanonicalTranscoder().decode(forged))
    assert link_problem(forged_event, 0, GENESIS, forged) is not None
    assert link_problem(forged_event, 0, GENESIS) is not None


def test_an_edited_stored_byte_breaks_the_link() -> None:
    event, stored = _stored({"text": "hello"}, Provenance(msg_id="m1", sender="a"), 1, GENESIS)
    edited = stored.replace(b"hello", b"hellO")
    decoded = CanonicalTranscoder().decode(edited)
    edited_event = LedgerEvent(originator_id=event.originator_id, originator_version=1,
                               **decoded)
    problem = link_problem(edited_event, 0, GENESIS, edited)
    assert problem is not None
    assert "recomputed" in problem
