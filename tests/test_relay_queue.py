"""The relay's queue read: a round costs its batch, not the length of the backlog."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from switch.payments.forwarder import _DUE, _DUE_AFTER

_BACKLOG = """
WITH k AS (
  INSERT INTO dedup_keys (key, kind, request_hash)
  SELECT 'q:' || i, 'payment', '\\x00' FROM generate_series(1, $1) AS i RETURNING key
), p AS (
  INSERT INTO payments (id, receipt_no, dedup_key, channel, method, account_no, amount,
                        business_date, created_at, epoch)
  SELECT gen_random_uuid(), substr(key, 3), key, 'counter', 'cash', '0000000001', 100,
         current_date, now(), 1 FROM k
  RETURNING id, receipt_no
)
INSERT INTO outbox (posting_id, kind, payment_id, account_no, amount, channel, occurred_at,
                    next_attempt_at)
SELECT 'P' || receipt_no, 'payment', id, '0000000001', 100, 'counter', now(),
       now() - interval '1 hour' + receipt_no::int * interval '1 ms'
  FROM p
"""


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out.extend(_nodes(child))
    return out


async def test_a_round_reads_its_batch_off_the_index_however_long_the_backlog(
        pool: asyncpg.Pool) -> None:
    await pool.execute(_BACKLOG, 5000)
    await pool.execute("ANALYZE outbox")
    raw = await pool.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {_DUE}", 256)
    nodes = _nodes(orjson.loads(raw)[0]["Plan"])
    kinds = [n["Node Type"] for n in nodes]
    assert "Sort" not in kinds, kinds  # no reading and sorting the whole backlog
    scans = [n for n in nodes if n.get("Relation Name") == "outbox"
             and n["Node Type"].startswith("Index")]
    assert scans and scans[0]["Index Name"] == "outbox_pending", kinds
    assert scans[0]["Actual Rows"] <= 256  # it stopped at the batch, of 5000 pending


async def test_due_postings_come_in_the_order_they_fell_due(pool: asyncpg.Pool) -> None:
    await pool.execute(_BACKLOG, 6)
    # the first posting failed and waits for its retry; the last fell due before the others
    await pool.execute("UPDATE outbox SET next_attempt_at = now() + interval '1 minute'"
                       " WHERE posting_id = 'P1'")
    await pool.execute("UPDATE outbox SET next_attempt_at = now() - interval '2 hours'"
                       " WHERE posting_id = 'P6'")
    rows = await pool.fetch(_DUE, 10)
    assert [r["posting_id"] for r in rows] == ["P6", "P2", "P3", "P4", "P5"]
    assert [r["posting_id"] for r in await pool.fetch(_DUE, 2)] == ["P6", "P2"]



async def test_the_next_batch_reads_on_from_the_last_row_off_the_index(
        pool: asyncpg.Pool) -> None:
    await pool.execute(_BACKLOG, 5000)
    await pool.execute("ANALYZE outbox")
    first = await pool.fetch(_DUE, 256)
    last = first[-1]
    following = await pool.fetch(_DUE_AFTER, 256, last["next_attempt_at"], last["id"])
    # the batch after, with nothing of the first again and nothing skipped
    both = [r["posting_id"] for r in first] + [r["posting_id"] for r in following]
    assert both == [r["posting_id"] for r in await pool.fetch(_DUE, 512)]
    raw = await pool.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {_DUE_AFTER}", 256,
                              last["next_attempt_at"], last["id"])
    nodes = _nodes(orjson.loads(raw)[0]["Plan"])
    kinds = [n["Node Type"] for n in nodes]
    assert "Sort" not in kinds, kinds
    scans = [n for n in nodes if n.get("Relation Name") == "outbox"
             and n["Node Type"].startswith("Index")]
    assert scans and scans[0]["Index Name"] == "outbox_pending", kinds
    assert scans[0]["Actual Rows"] <= 256  # a range from the last row, not a walk from the head
