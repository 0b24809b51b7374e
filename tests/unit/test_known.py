"""The writer's filter of known task ids: never a false "certainly new"."""

from __future__ import annotations

from coordinator.ledger.known import MaybeKnown


def test_every_added_key_is_reported_and_few_others_are() -> None:
    known = MaybeKnown()
    added = [f"task-{i}" for i in range(20_000)]
    for key in added:
        known.add(key)
    assert all(known.may_hold(key) for key in added)
    others = [f"other-{i}" for i in range(20_000)]
    assert sum(known.may_hold(key) for key in others) < 20  # ~0 at this size


def test_an_overfull_filter_says_maybe_more_often_but_never_wrongly_no() -> None:
    tiny = MaybeKnown(bits=64)
    added = [f"t{i}" for i in range(500)]
    for key in added:
        tiny.add(key)
    assert all(tiny.may_hold(key) for key in added)
    assert tiny.may_hold("never-added")  # saturated: everything is a maybe
    assert not MaybeKnown(bits=64).may_hold("t1")
