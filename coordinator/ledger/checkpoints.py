"""Signed checkpoints: a global hash chain over the notification log, signed with Ed25519.

Per-aggregate chains (``events.py``) catch an edited event, but not someone with write
access to the database who deletes the tail of the log, or rewrites an event and then
recomputes every later hash of its aggregate: those chains verify again. Checkpoints close
that gap. Over notification positions in order,

    global_head(0) = GENESIS
    global_head(n) = sha256(global_head(n-1) ‖ hash of the event at position n)

and the coordinator periodically records a ``ledger.checkpointed`` event on the
``checkpoint`` aggregate (key ``checkpoints``) with data ``{ledger, position, global_head,
key, signature, algorithm}``: the head at ``position`` (the newest position before the
checkpoint event itself), signed with an Ed25519 nkey over ``signed_message(...)``. The
checkpoint is an ordinary ledger event, so it is chained itself and relayed to the LEDGER
stream, where a copy survives whatever happens to the database.

Verification (``replay``, via ``GlobalChain``) recomputes the global chain, checks every
checkpoint's signature (and, given trusted keys, its signer) and its head; and checks
*external* checkpoints (the newest one from the stream, or one saved to a file) the same
way, so a ledger that ends before a signed position is reported as truncated, and one
whose prefix was rewritten no longer reaches the signed head.

Writer side: ``Checkpointer`` keeps the running head in memory (one pass over the log on
start, then only the new notifications) and seals the checkpoint event;
``LedgerWriter.record_checkpoint`` commits it; ``coordinator.checkpointer`` schedules it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import nacl.exceptions
import nacl.signing
import nkeys  # type: ignore[import-untyped, unused-ignore]
from eventsourcing.persistence import Notification

from coordinator.ledger.events import (
    GENESIS,
    Aggregate,
    Draft,
    Kind,
    LedgerEvent,
    Provenance,
    Sealed,
    stamp,
)
from coordinator.ledger.store import Ledger, is_postgres
from schemas import LedgermeshError, LedgerRecord, Subjects, canonical

if TYPE_CHECKING:  # only the bus speaks NATS; replay stays importable without it
    from bus.client import Bus

log = logging.getLogger("ledgermesh.coordinator.checkpoints")

CHECKPOINTS_KEY = "checkpoints"  # the one key of the checkpoint aggregate
ALGORITHM = "ed25519-nkey"
SIGNED_TYPE = "ledgermesh.checkpoint"  # domain separation of what the key signs
SIGNING_KEY_SUFFIX = ".signing.nk"
SIGNER = "coordinator"  # the sender of checkpoint events
UNTRUSTED_KEY = "not a trusted key"  # in the problem of a checkpoint signed by another key
_KEEP_HEADS = 4096  # recent (position, head) pairs replay keeps to check checkpoints


class CheckpointError(LedgermeshError):
    """A signing key or a checkpoint cannot be read."""


# -- the global chain -------------------------------------------------------------------
def global_link(head: str, event_hash: str) -> str:
    """The global head after an event whose stored ``hash`` is ``event_hash``."""
    return _link(bytes.fromhex(head), event_hash).hex()


def _link(head: bytes, event_hash: str) -> bytes:
    """``global_link`` on the head's bytes: replay links every event, and keeps them so."""
    try:
        tail = bytes.fromhex(event_hash)
    except ValueError:  # not a hash (a damaged event): still a deterministic link
        tail = event_hash.encode()
    return hashlib.sha256(head + tail).digest()


class _Link(msgspec.Struct):
    """The two fields of a stored event the global chain needs."""

    hash: str = ""
    aggregate: str = ""


_link_decoder = msgspec.json.Decoder(_Link)


# -- checkpoints and signatures -----------------------------------------------------------
class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A signed statement: the global head of ``ledger`` at ``position`` is ``global_head``."""

    ledger: str
    position: int
    global_head: str
    key: str  # the signer's nkey public key
    signature: str  # base64 of the Ed25519 signature over ``signed_message``
    algorithm: str = ALGORITHM
    at: int = 0  # where the checkpoint event itself is stored (not signed; 0 if unknown)

    def data(self) -> dict[str, Any]:
        """The checkpoint event's ``data``."""
        return {"ledger": self.ledger, "position": self.position,
                "global_head": self.global_head, "key": self.key,
                "signature": self.signature, "algorithm": self.algorithm}


def signed_message(ledger: str, position: int, global_head: str) -> bytes:
    """The exact bytes a checkpoint's signature covers."""
    return canonical({"type": SIGNED_TYPE, "ledger": ledger, "position": position,
                      "global_head": global_head})


def _nkey_bytes(text: str) -> bytes:
    """Base32-decode an nkey and check its CRC16 (nkeys itself does not)."""
    text = text.strip()
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError) as exc:
        raise CheckpointError(f"not an nkey: {exc}") from None
    if len(raw) < 4 or nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
        raise CheckpointError("not an nkey: checksum mismatch")
    return raw[:-2]


def verify_key(public_key: str) -> nacl.signing.VerifyKey:
    """The Ed25519 key an nkey public key (``N…``, ``A…``, ``U…``, …) stands for."""
    raw = _nkey_bytes(public_key)
    if len(raw) != 33 or not nkeys.valid_public_prefix_byte(raw[0]):
        raise CheckpointError(f"not an nkey public key: {public_key[:12]}…")
    return nacl.signing.VerifyKey(raw[1:])


def signature_problem(checkpoint: Checkpoint,
                      trusted_keys: Iterable[str] | None = None) -> str | None:
    """Why ``checkpoint``'s signature does not hold, or None if it does."""
    if checkpoint.algorithm != ALGORITHM:
        return f"unknown signature algorithm {checkpoint.algorithm!r}"
    if trusted_keys is not None and checkpoint.key not in set(trusted_keys):
        return f"signed by {checkpoint.key[:12]}…, {UNTRUSTED_KEY}"
    try:
        key = verify_key(checkpoint.key)
        signature = base64.b64decode(checkpoint.signature, validate=True)
        key.verify(signed_message(checkpoint.ledger, checkpoint.position,
                                  checkpoint.global_head), signature)
    except CheckpointError as exc:
        return f"bad key: {exc}"
    except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError,
            nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        return f"bad signature (key {checkpoint.key[:12]}…)"
    return None


class Signer:
    """An Ed25519 nkey that signs checkpoints."""

    def __init__(self, seed: str) -> None:
        seed = seed.strip()
        raw = _nkey_bytes(seed)
        if len(raw) != 34:
            raise CheckpointError("not an nkey seed (seeds start with 'S')")
        try:
            self._keys = nkeys.from_seed(bytearray(seed.encode()))
            public = self._keys.public_key
        except (nkeys.NkeysError, ValueError, TypeError) as exc:
            raise CheckpointError(f"not an nkey seed ({type(exc).__name__})") from None
        self.seed = seed
        self.public_key: str = public.decode() if isinstance(public, bytes) else str(public)

    @classmethod
    def generate(cls) -> Signer:
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_SERVER)
        return cls(seed.decode() if isinstance(seed, bytes) else str(seed))

    def sign(self, ledger: str, position: int, global_head: str) -> Checkpoint:
        signature = bytes(self._keys.sign(signed_message(ledger, position, global_head)))
        return Checkpoint(ledger=ledger, position=position, global_head=global_head,
                          key=self.public_key, signature=base64.b64encode(signature).decode())

    def __repr__(self) -> str:
        return f"Signer({self.public_key})"


def signing_key_path(ledger_location: str) -> Path | None:
    """Where the generated key of a SQLite ledger lives; None for PostgreSQL."""
    if is_postgres(ledger_location):
        return None
    # Beside the file itself: a symlink to the ledger finds the ledger's key, not a new one.
    return Path(os.path.realpath(ledger_location) + SIGNING_KEY_SUFFIX)


def read_signer(path: Path) -> Signer:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise CheckpointError(f"no signing key file at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read signing key file {path}: {exc}") from None
    try:
        return Signer(text)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def write_signer(path: Path, signer: Signer) -> None:
    """Write the seed (mode 0600; never replaces an existing file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(signer.seed + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def load_signer(seed: str | None, ledger_location: str) -> Signer:
    """The coordinator's checkpoint key: ``seed`` if given; else ``<ledger>.signing.nk``
    next to a SQLite ledger (generated on first use, mode 0600); else (PostgreSQL without
    a key) a new key for this run only."""
    if seed is not None:
        return Signer(seed)
    path = signing_key_path(ledger_location)
    if path is None:
        log.warning("no checkpoint signing key given for %s: signing with a key for this "
                    "run only (pass one so auditors can trust checkpoints across restarts)",
                    ledger_location.split("@")[-1])
        return Signer.generate()
    return signer_at(path)


def signer_at(path: Path) -> Signer:
    """The key in ``path``, made there (mode 0600) if there is none yet."""
    if path.exists():
        return read_signer(path)
    signer = Signer.generate()
    try:
        write_signer(path, signer)
    except FileExistsError:  # another process just made one: use that
        return read_signer(path)
    except OSError as exc:
        raise CheckpointError(f"cannot write a signing key to {path}: {exc.strerror}") from None
    log.info("generated checkpoint signing key %s (public key %s)", path, signer.public_key)
    return signer


# -- reading checkpoints back ---------------------------------------------------------------
_record_decoder = msgspec.json.Decoder(LedgerRecord)
_state_decoder = msgspec.json.Decoder()
_checkpoint_decoder = msgspec.json.Decoder(Checkpoint)
_encoder = msgspec.json.Encoder(order="sorted")


def checkpoint_from_data(data: Any, at: int = 0) -> Checkpoint:
    """A checkpoint from the data of a ``ledger.checkpointed`` event; CheckpointError if not."""
    try:
        return msgspec.convert({**data, "at": at}, Checkpoint)
    except (msgspec.ValidationError, TypeError) as exc:
        raise CheckpointError(f"not a checkpoint: {exc}") from None


def checkpoint_from_record(record: LedgerRecord | bytes) -> Checkpoint:
    """A checkpoint from its relayed copy (a LEDGER stream message, decoded or not)."""
    try:
        if isinstance(record, bytes):
            record = _record_decoder.decode(record)
        state = _state_decoder.decode(record.event)
    except msgspec.DecodeError as exc:
        raise CheckpointError(f"not a ledger record: {exc}") from None
    if not isinstance(state, dict) or state.get("kind") != Kind.CHECKPOINTED:
        raise CheckpointError(f"ledger record {record.position} is not a checkpoint")
    return checkpoint_from_data(state.get("data"), at=record.position)


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Save a checkpoint (JSON) for a later ``verify_against``."""
    path.write_bytes(_encoder.encode(checkpoint) + b"\n")


def read_checkpoint(path: Path) -> Checkpoint:
    try:
        return _checkpoint_decoder.decode(path.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise CheckpointError(f"{path}: not a checkpoint: {exc}") from None


def checkpoint_subject(subjects: Subjects) -> str:
    """Where the relay publishes checkpoints on the LEDGER stream."""
    return subjects.ledger(Aggregate.CHECKPOINT, CHECKPOINTS_KEY, Kind.CHECKPOINTED)


async def latest_checkpoint(bus: Bus, subjects: Subjects, wait: float = 2.0) -> Checkpoint | None:
    """The newest checkpoint in the LEDGER stream; None if none arrives within ``wait`` s
    (none relayed yet). BusError if there is no such stream or reading it is refused."""
    data = await bus.last_message(subjects.ledger_stream, checkpoint_subject(subjects), wait)
    return None if data is None else checkpoint_from_record(data)


# -- verification (replay) -----------------------------------------------------------------
class GlobalChain:
    """Recomputes the global chain during replay and checks checkpoints against it.

    ``link`` every position in order; ``check`` every checkpoint event; ``finish`` at the
    end. Each returns the problems found (strings; replay turns them into breaks).
    ``against`` are external checkpoints (from the stream or a file) the ledger must match.
    """

    def __init__(self, trusted_keys: Iterable[str] | None = None,
                 against: Iterable[Checkpoint] = ()) -> None:
        self.trusted = None if trusted_keys is None else frozenset(trusted_keys)
        self._head = bytes.fromhex(GENESIS)
        self.position = 0
        self.checkpoints = 0  # checkpoint events that verified
        self.last: Checkpoint | None = None  # the newest of them
        self.keys: set[str] = set()  # who signed them
        self.anchored = 0  # external checkpoints the ledger matched
        self._recent: OrderedDict[int, bytes] = OrderedDict()  # position -> head
        self._matched = 0  # newest position a checkpoint confirmed
        self._rejected: list[tuple[Checkpoint, str]] = []
        anchors = []
        for checkpoint in against:
            problem = signature_problem(checkpoint, self.trusted)
            if problem is None:
                anchors.append(checkpoint)
            else:
                self._rejected.append((checkpoint, problem))
        self._anchors = sorted(anchors, key=lambda c: c.position)

    @property
    def head(self) -> str:
        """The global chain's head after the last position linked."""
        return self._head.hex()

    @property
    def unsigned(self) -> int:
        """Events stored after the newest verified checkpoint (no signature covers them)."""
        return self.position - (self.last.at if self.last is not None else 0)

    def summary(self) -> str:
        """One line for ``replay --verify``."""
        if self.last is None:
            return f"no signed checkpoint ({self.position} events not covered by a signature)"
        keys = ", ".join(sorted(self.keys))
        counted = f"{self.checkpoints} signed checkpoint{'' if self.checkpoints == 1 else 's'}"
        return (f"{counted} verified (newest covers position "
                f"{self.last.position}; key {keys}); {self.unsigned} events after it"
                + (f"; matches {self.anchored} external checkpoint(s)" if self.anchored else ""))

    def link(self, position: int, event_hash: str) -> list[str]:
        problems: list[str] = []
        while self._anchors and self._anchors[0].position < position:
            missing = self._anchors.pop(0)
            problems.append(f"position {missing.position}, covered by a signed checkpoint, "
                            "is missing: events were deleted")
        self._head = head = _link(self._head, event_hash)
        self.position = position
        recent = self._recent
        recent[position] = head
        if len(recent) > _KEEP_HEADS:
            recent.popitem(last=False)
        while self._anchors and self._anchors[0].position == position:
            anchor = self._anchors.pop(0)
            problem = self._compare(anchor, head, "external signed checkpoint")
            if problem is None:
                self.anchored += 1
            else:
                problems.append(problem)
        return problems

    def check(self, at: int, data: Any) -> str | None:
        """Verify the checkpoint event stored at position ``at``."""
        try:
            checkpoint = checkpoint_from_data(data, at)
        except CheckpointError as exc:
            return str(exc)
        problem = signature_problem(checkpoint, self.trusted)
        if problem is not None:
            return f"checkpoint {problem}"
        if not 0 < checkpoint.position < at:
            return f"checkpoint at {at} claims to cover position {checkpoint.position}"
        head = self._recent.get(checkpoint.position)
        if head is None:
            return (f"checkpoint covers position {checkpoint.position}, which is not in the "
                    "log (deleted, or too far back to check)")
        problem = self._compare(checkpoint, head, "signed checkpoint")
        if problem is not None:
            return problem
        self.checkpoints += 1
        self.keys.add(checkpoint.key)
        if self.last is None or checkpoint.position > self.last.position:
            self.last = checkpoint
        return None

    def _compare(self, checkpoint: Checkpoint, head_bytes: bytes, what: str) -> str | None:
        head = head_bytes.hex()
        if head == checkpoint.global_head:
            self._matched = max(self._matched, checkpoint.position)
            return None
        return (f"rewritten: global head at position {checkpoint.position} is {head[:8]}…, "
                f"the {what} says {checkpoint.global_head[:8]}… (an event after position "
                f"{self._matched} and at or before {checkpoint.position} was changed, "
                "added or removed)")

    def finish(self, to: int | None = None) -> list[tuple[int, str]]:
        """Problems only the end of the log shows: (position, problem)."""
        problems = [(c.position, f"external checkpoint rejected: {why}")
                    for c, why in self._rejected]
        for anchor in self._anchors:
            if to is not None and anchor.position > to:
                continue  # replay stopped early by request: nothing to say
            problems.append((self.position + 1, f"truncated: ledger ends at {self.position}, "
                                                f"signed checkpoint covers {anchor.position}"))
        self._anchors = []
        return problems


# -- recording (the coordinator) -----------------------------------------------------------
class Checkpointer:
    """Keeps the running global head of the log and seals checkpoint events.

    All of its state is derived from the log, read back or followed from commits that were
    stored (never from what it sealed), so a checkpoint whose commit failed leaves nothing
    to undo, and events another writer appended are folded in before the next checkpoint.
    """

    def __init__(self, signer: Signer, ledger_name: str) -> None:
        self.signer = signer
        self.ledger_name = ledger_name
        self.position = 0  # newest position folded into ``head``
        self.head = GENESIS
        self.covered = 0  # position of the newest checkpoint event in the log
        self._version = 0  # of the checkpoint aggregate
        self._prev_hash = GENESIS  # its chain head

    def catch_up(self, ledger: Ledger, page: int = 2000) -> bool:
        """Fold one page of new notifications; True if more may follow."""
        notifications = ledger.read(self.position, page)
        for n in notifications:
            link = _link_decoder.decode(n.state)
            self.head = global_link(self.head, link.hash)
            self.position = n.id
            if link.aggregate == Aggregate.CHECKPOINT:
                self._version, self._prev_hash = n.originator_version, link.hash
                self.covered = n.id
        return len(notifications) == page

    def follow(self, stored: Sequence[Notification], events: Sequence[LedgerEvent]) -> None:
        """Fold a commit the writer just made (``stored``: as the log holds its ``events``),
        as far as it continues what is folded (so ``catch_up`` need not read it back);
        anything else is left to ``catch_up``. Call it only after the commit, on the
        writer's thread."""
        for n, event in zip(stored, events, strict=True):
            at = n.id
            if at != self.position + 1:
                return
            self.head = global_link(self.head, event.hash)
            self.position = at
            if event.aggregate == Aggregate.CHECKPOINT:
                self._version, self._prev_hash = event.originator_version, event.hash
                self.covered = at

    def pending(self, last_position: int) -> int:
        """How many positions up to ``last_position`` no checkpoint covers yet."""
        return max(0, last_position - self.covered)

    def seal(self, ledger: Ledger, now: datetime) -> list[Sealed]:
        """The checkpoint event for everything stored so far; [] if nothing is new."""
        while self.catch_up(ledger):
            pass
        if self.position == self.covered:
            return []  # nothing since the last checkpoint (or an empty log)
        checkpoint = self.signer.sign(self.ledger_name, self.position, self.head)
        draft = Draft(aggregate=Aggregate.CHECKPOINT, key=CHECKPOINTS_KEY,
                      kind=Kind.CHECKPOINTED, data=checkpoint.data(),
                      provenance=Provenance(msg_id=f"checkpoint:{self.position}",
                                            sender=SIGNER))
        return [stamp(draft, version=self._version + 1, prev_hash=self._prev_hash,
                      recorded_at=now.isoformat())]
