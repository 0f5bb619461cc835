"""Payment ids: UUIDv7, so that the payments' primary key grows at its right edge."""

from __future__ import annotations


def test_payment_ids_are_time_ordered_uuid7() -> None:
    import time
    import uuid

    from switch.payments.ledger import time_ordered_ids

    before_ms = time.time_ns() // 1_000_000
    first = time_ordered_ids(500)
    time.sleep(0.002)
    second = time_ordered_ids(500)
    for pid in first + second:
        assert pid.version == 7 and pid.variant == uuid.RFC_4122
    ms = int.from_bytes(first[0].bytes[:6], "big")
    assert before_ms <= ms <= before_ms + 1000
    assert max(first) < min(second)  # a later batch sorts after an earlier one
    assert len(set(first + second)) == 1000  # 74 random bits within a millisecond
