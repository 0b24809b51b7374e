"""The coordinator's receipts (coordinator/receipts.py): which ids go to which agent."""

from __future__ import annotations

import msgspec

from coordinator.ledger.writer import IntakeMessage
from coordinator.receipts import ReceiptBook
from schemas import Receipt, Subjects

SUBJECTS = Subjects("lm")


def message(seq: int, principal: str, msg_id: str | None) -> IntakeMessage:
    return IntakeMessage(seq, SUBJECTS.intake(principal), b"{}", msg_id)


async def test_each_agent_gets_its_own_ids_and_nobody_else_any() -> None:
    book = ReceiptBook(SUBJECTS, frozenset({"hop1", "hop2"}))
    book.add([message(1, "hop1", "a"), message(2, "client", "c"), message(3, "hop2", "b"),
              message(4, "hop1", None)], now=0.0)
    book.add([message(5, "hop1", "d")], now=0.001)  # a later commit, held together
    sent = {subject: msgspec.json.decode(data, type=Receipt).ids
            for subject, data in book.take()}
    assert sent == {"lm.receipt.hop1": ("a", "d"), "lm.receipt.hop2": ("b",)}
    assert book.take() == []
