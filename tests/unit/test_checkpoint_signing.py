"""The pure parts of signed checkpoints: the global chain, signing, verifying, key files."""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

import msgspec
import nkeys
import pytest

from coordinator.ledger.checkpoints import (
    ALGORITHM,
    Checkpoint,
    CheckpointError,
    GlobalChain,
    Signer,
    checkpoint_from_data,
    checkpoint_from_record,
    global_link,
    load_signer,
    read_checkpoint,
    read_signer,
    signature_problem,
    signed_message,
    signer_at,
    signing_key_path,
    verify_key,
    write_checkpoint,
)
from coordinator.ledger.events import GENESIS
from schemas import LedgerRecord, canonical

H1, H2, H3 = ("11" * 32, "22" * 32, "33" * 32)


def test_the_global_chain_hashes_the_previous_head_and_the_event_hash() -> None:
    first = global_link(GENESIS, H1)
    assert first == hashlib.sha256(bytes(32) + bytes.fromhex(H1)).hexdigest()
    assert global_link(first, H2) == hashlib.sha256(
        bytes.fromhex(first) + bytes.fromhex(H2)).hexdigest()
    assert global_link(first, H2) != global_link(GENESIS, H2)
    assert global_link(GENESIS, "not hex") != global_link(GENESIS, "")  # never raises


def test_a_signature_covers_ledger_position_and_head() -> None:
    signer = Signer.generate()
    assert signer.public_key.startswith("N")
    checkpoint = signer.sign("lm", 7, H1)
    assert checkpoint.key == signer.public_key
    assert checkpoint.algorithm == ALGORITHM
    assert signature_problem(checkpoint) is None
    assert signature_problem(checkpoint, [signer.public_key]) is None
    # Ed25519 signs deterministically, and exactly the documented message.
    assert signer.sign("lm", 7, H1) == checkpoint
    assert signed_message("lm", 7, H1) == canonical(
        {"type": "ledgermesh.checkpoint", "ledger": "lm", "position": 7, "global_head": H1})
    for changed in (msgspec.structs.replace(checkpoint, position=8),
                    msgspec.structs.replace(checkpoint, global_head=H2),
                    msgspec.structs.replace(checkpoint, ledger="other")):
        problem = signature_problem(changed)
        assert problem is not None
        assert problem.startswith("bad signature")


def test_a_signature_must_come_from_a_trusted_key_when_keys_are_given() -> None:
    signer, other = Signer.generate(), Signer.generate()
    checkpoint = other.sign("lm", 1, H1)
    assert signature_problem(checkpoint) is None  # consistent on its own...
    problem = signature_problem(checkpoint, [signer.public_key])
    assert problem is not None
    assert "not a trusted key" in problem
    # ...and claiming someone else's key does not help.
    claimed = msgspec.structs.replace(checkpoint, key=signer.public_key)
    assert (signature_problem(claimed, [signer.public_key]) or "").startswith("bad signature")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("signature", "not base64!", "bad signature"),
        ("signature", base64.b64encode(b"short").decode(), "bad signature"),
        ("key", "NOTAKEY", "bad key"),
        ("algorithm", "rsa", "unknown signature algorithm"),
    ],
)
def test_malformed_checkpoints_are_problems_not_crashes(field: str, value: str,
                                                        expected: str) -> None:
    checkpoint = msgspec.structs.replace(Signer.generate().sign("lm", 1, H1), **{field: value})
    assert (signature_problem(checkpoint) or "").startswith(expected)


def test_keys_are_nkeys_with_checked_checksums() -> None:
    signer = Signer.generate()
    assert Signer(signer.seed + "\n").public_key == signer.public_key
    verify_key(signer.public_key)
    with pytest.raises(CheckpointError, match="public key"):
        verify_key(signer.seed)
    with pytest.raises(CheckpointError, match="seed"):
        Signer(signer.public_key)
    typo = signer.seed[:-3] + ("A" if signer.seed[-3] != "A" else "B") + signer.seed[-2:]
    with pytest.raises(CheckpointError, match="checksum"):
        Signer(typo)
    # Any nkey seed signs; a NATS user seed too.
    user = nkeys.encode_seed(bytes(range(32)), nkeys.PREFIX_BYTE_USER).decode()
    assert Signer(user).public_key.startswith("U")
    assert signature_problem(Signer(user).sign("lm", 1, H1)) is None


def test_the_key_file_is_made_once_private_and_reused(tmp_path: Path) -> None:
    db = str(tmp_path / "data" / "ledger.db")
    path = signing_key_path(db)
    assert path == tmp_path / "data" / "ledger.db.signing.nk"
    first = load_signer(None, db)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_signer(None, db).public_key == first.public_key
    assert read_signer(path).public_key == first.public_key
    given = Signer.generate()
    assert load_signer(given.seed, db).public_key == given.public_key
    # PostgreSQL without a key: a key for this run, no file anywhere.
    assert signing_key_path("postgresql://u:p@h/db") is None
    assert load_signer(None, "postgresql://u:p@h/db").public_key != first.public_key
    path.write_text("garbage\n")
    with pytest.raises(CheckpointError, match=r"signing\.nk"):
        load_signer(None, db)


def test_a_signing_key_file_given_is_made_on_first_use_and_kept(tmp_path: Path) -> None:
    """``--signing-key FILE`` (PostgreSQL has no file beside the ledger): made there, mode
    0600, then the same key at every start; a place it cannot be written is one line."""
    path = tmp_path / "keys" / "checkpoints.nk"
    first = signer_at(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert signer_at(path).public_key == first.public_key
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match=r"signing key.*afile/key\.nk"):
        signer_at(tmp_path / "afile" / "key.nk")


def test_checkpoints_round_trip_through_events_records_and_files(tmp_path: Path) -> None:
    checkpoint = Signer.generate().sign("lm", 41, H1)
    assert checkpoint_from_data(checkpoint.data(), at=42) == msgspec.structs.replace(
        checkpoint, at=42)
    state = {"kind": "ledger.checkpointed", "aggregate": "checkpoint", "data": checkpoint.data()}
    record = LedgerRecord(position=42, aggregate_id="x", version=3, topic="t",
                          event=msgspec.Raw(canonical(state)))
    from_stream = checkpoint_from_record(msgspec.json.encode(record))
    assert from_stream == checkpoint_from_record(record)
    assert from_stream.at == 42
    assert signature_problem(from_stream) is None
    path = tmp_path / "checkpoint.json"
    write_checkpoint(path, from_stream)
    assert read_checkpoint(path) == from_stream
    not_one = LedgerRecord(position=1, aggregate_id="x", version=1, topic="t",
                           event=msgspec.Raw(canonical({**state, "kind": "task.submitted"})))
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        checkpoint_from_record(not_one)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        checkpoint_from_data({"position": 1})
    path.write_text("{}")
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def chain_of(*hashes: str) -> list[str]:
    heads, head = [], GENESIS
    for h in hashes:
        head = global_link(head, h)
        heads.append(head)
    return heads


def test_replay_checks_each_checkpoint_against_the_recomputed_head() -> None:
    signer = Signer.generate()
    heads = chain_of(H1, H2, H3)
    chain = GlobalChain([signer.public_key])
    assert chain.link(1, H1) == []
    assert chain.link(2, H2) == []
    good = signer.sign("lm", 2, heads[1])
    assert chain.check(3, good.data()) is None
    assert chain.link(3, H3) == []
    assert (chain.checkpoints, chain.last, chain.unsigned) == (
        1, msgspec.structs.replace(good, at=3), 0)
    assert chain.link(4, H1) == []
    assert chain.unsigned == 1
    assert chain.summary() == (f"1 signed checkpoint verified (newest covers position 2; key "
                               f"{signer.public_key}); 1 events after it")
    assert GlobalChain().summary() == "no signed checkpoint (0 events not covered by a signature)"
    wrong = signer.sign("lm", 3, heads[1])  # the head of position 2, claimed for 3
    assert (chain.check(5, wrong.data()) or "").startswith(
        "rewritten: global head at position 3")
    assert "after position 2" in (chain.check(5, wrong.data()) or "")
    assert "claims to cover" in (chain.check(5, signer.sign("lm", 5, H1).data()) or "")
    assert "not in the log" in (chain.check(9, signer.sign("lm", 7, H1).data()) or "")
    assert "not a checkpoint" in (chain.check(9, {"what": 1}) or "")
    assert chain.finish() == []


def test_external_checkpoints_catch_truncation_deletion_and_rewrites() -> None:
    signer = Signer.generate()
    heads = chain_of(H1, H2, H3)
    at_3 = signer.sign("lm", 3, heads[2])
    # The log ends before the signed position.
    truncated = GlobalChain(against=[at_3])
    truncated.link(1, H1)
    truncated.link(2, H2)
    assert truncated.finish() == [(3, "truncated: ledger ends at 2, signed checkpoint covers 3")]
    # ...unless the replay stopped early on purpose.
    stopped = GlobalChain(against=[at_3])
    stopped.link(1, H1)
    assert stopped.finish(to=1) == []
    # The signed position is gone, later ones exist.
    gap = GlobalChain(against=[at_3])
    gap.link(1, H1)
    gap.link(2, H2)
    assert ["missing" in p for p in gap.link(4, H3)] == [True]
    # Same length, different history.
    rewritten = GlobalChain(against=[at_3])
    rewritten.link(1, H2)
    rewritten.link(2, H1)
    assert [p.split(":")[0] for p in rewritten.link(3, H3)] == ["rewritten"]
    # Matching.
    fine = GlobalChain([signer.public_key], against=[at_3])
    for position, h in enumerate((H1, H2, H3), start=1):
        assert fine.link(position, h) == []
    assert fine.finish() == []
    assert fine.anchored == 1
    # An external checkpoint that does not verify is reported, not used.
    forged = Signer.generate().sign("lm", 3, heads[2])
    rejected = GlobalChain([signer.public_key], against=[forged])
    for position, h in enumerate((H1, H2), start=1):
        rejected.link(position, h)
    [(position, problem)] = rejected.finish()
    assert position == 3
    assert problem.startswith("external checkpoint rejected: signed by")


def test_checkpoint_struct_is_what_the_event_stores() -> None:
    checkpoint = Checkpoint(ledger="lm", position=1, global_head=H1, key="K", signature="S")
    assert set(checkpoint.data()) == {"ledger", "position", "global_head", "key", "signature",
                                      "algorithm"}
