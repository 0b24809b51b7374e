"""The health report's counts of refused output: by principal, and bounded."""

from __future__ import annotations

from coordinator.health import Health
from coordinator.ledger.events import Aggregate, Draft, Kind, LedgerEvent, Provenance, stamp


def event(kind: str, key: str, data: dict[str, object]) -> LedgerEvent:
    draft = Draft(aggregate=Aggregate.PRINCIPAL, key=key, kind=kind, data=data,
                  provenance=Provenance(msg_id=f"m-{key}", sender=key))
    return stamp(draft, version=1, prev_hash="0" * 64, recorded_at="2026-11-25T00:00:00Z").event


def rejected(principal: str, code: str = "malformed") -> LedgerEvent:
    return event(Kind.REJECTED, principal, {"code": code, "reason": f"{code} from {principal}",
                                            "subject_principal": principal})


def test_rejections_and_throttles_are_counted_by_principal() -> None:
    health = Health()
    health.count([rejected("writer"), event(Kind.SAID, "t-1", {"text": "hi"}),
                  rejected("writer", "not_owner"), rejected("client"),
                  event(Kind.THROTTLED, "noisy", {"count": 40}),
                  event(Kind.THROTTLED, "noisy", {"count": 2})])
    report = health.report()
    assert report.rejected == {"writer": 2, "client": 1}
    assert report.last_rejection == {"writer": "not_owner: not_owner from writer",
                                     "client": "malformed: malformed from client"}
    assert report.throttled == {"noisy": 42}


def test_a_flood_of_new_names_is_counted_together() -> None:
    health = Health()
    health.count(rejected(f"p{n}") for n in range(1_005))
    report = health.report()
    assert len(report.rejected) == 1_001
    assert report.rejected["_others"] == 5
    assert sum(report.rejected.values()) == 1_005
    health.count([rejected("p7")])  # a name already counted keeps its own count
    assert health.report().rejected["p7"] == 2
