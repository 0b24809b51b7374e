"""``uuid5_text`` is exactly the text of ``uuid.uuid5``: delivery and output ids made
either way must never differ (a redelivery would otherwise produce new ids)."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from schemas import uuid5_text


@given(st.uuids(), st.text())
def test_uuid5_text_is_the_text_of_uuid5(namespace: uuid.UUID, name: str) -> None:
    assert uuid5_text(namespace, name) == str(uuid.uuid5(namespace, name))


def test_a_known_id() -> None:
    assert uuid5_text(uuid.NAMESPACE_DNS, "python.org") == "886313e1-3b8a-5372-9b90-0c9aee199e5d"
