"""The relay's queue read: a round costs its batch, not the length of the backlog."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import orjson
import pytest

from switch import db
from switch.payments.forwarder import (
    _DUE,
    _DUE_AFTER,
    _FAILED,
    _QUEUE_COUNTS,
    _SENT,
    RELAY_SERVER_SETTINGS,
    queue_counts,
)

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


async def _clear_outbox_stats(pool: asyncpg.Pool) -> None:
    """The outbox's statistics as a fresh deployment has them: none (PostgreSQL 18 can clear
    them; an older server given by GRIDPAY_TEST_DATABASE_URL skips the test)."""
    if int(await pool.fetchval("SHOW server_version_num")) < 180000:
        pytest.skip("clearing a table's statistics needs PostgreSQL 18")
    await pool.execute("SELECT pg_clear_relation_stats('public', 'outbox')")
    await pool.execute("SELECT pg_clear_attribute_stats('public', 'outbox', attname, false)"
                       "  FROM pg_attribute WHERE attrelid = 'outbox'::regclass AND attnum > 0"
                       "   AND NOT attisdropped")


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


async def test_the_relays_connections_read_off_the_index_when_the_statistics_say_nothing(
        pool: asyncpg.Pool, clean_db: str) -> None:
    # 20 000 postings forwarded, then 10 000 more due (the billing system was down), in a
    # table whose statistics say nothing (never analyzed, as in a fresh deployment)
    await pool.execute(_BACKLOG, 20000)
    await pool.execute("UPDATE outbox SET state = 'sent'")
    await pool.execute(_BACKLOG.replace("generate_series(1, $1)",
                                        "generate_series(100001, 100000 + $1)"), 10000)
    await _clear_outbox_stats(pool)

    async def plan(p: asyncpg.Pool) -> tuple[list[str], list[dict[str, Any]]]:
        raw = await p.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {_DUE}", 256)
        nodes = _nodes(orjson.loads(raw)[0]["Plan"])
        return [n["Node Type"] for n in nodes], nodes

    # the hazard: on an ordinary connection the planner reads every due row and sorts them,
    # so the longer the backlog, the slower each round
    kinds, _ = await plan(pool)
    assert "Sort" in kinds and "Bitmap Heap Scan" in kinds, kinds
    relay = await db.create_pool(clean_db, min_size=1, max_size=1,
                                 server_settings=dict(RELAY_SERVER_SETTINGS))
    try:
        kinds, nodes = await plan(relay)
    finally:
        await relay.close()
    assert "Sort" not in kinds, kinds
    scans = [n for n in nodes if n.get("Relation Name") == "outbox"
             and n["Node Type"].startswith("Index")]
    assert scans and scans[0]["Index Name"] == "outbox_pending", kinds
    assert scans[0]["Actual Rows"] <= 256, scans[0]["Actual Rows"]


async def _stale_reads_after_cancelled_prepares(url: str, *, reset_on_release: bool) -> int:
    """How often, of 200 reads cancelled at various points (some while the statement was
    being prepared), the connection's next read missed a row committed and due meanwhile."""
    admin = await db.create_pool(url, min_size=1, max_size=1)
    pool = await db.create_pool(url, min_size=1, max_size=1, reset_on_release=reset_on_release)
    stale = 0
    try:
        await admin.execute("DROP TABLE IF EXISTS due_probe_shared")
        await admin.execute("CREATE TABLE due_probe_shared"
                            " (id int, due timestamptz NOT NULL DEFAULT now())")
        for i in range(200):
            await admin.execute("TRUNCATE due_probe_shared")
            # a statement this connection has not prepared yet, as the relay's first read
            task = asyncio.ensure_future(pool.fetch(
                f"SELECT id FROM due_probe_shared /* {i} */ WHERE due <= now()"))
            for _ in range(i % 8):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.002)
            await admin.execute("INSERT INTO due_probe_shared (id) VALUES (1)")
            if not await pool.fetch("SELECT id FROM due_probe_shared WHERE due <= now()"):
                stale += 1
        await admin.execute("DROP TABLE due_probe_shared")
    finally:
        await pool.close()
        await admin.close()
    return stale


async def test_a_read_cancelled_while_prepared_leaves_no_stale_transaction_on_the_relays_pool(
        clean_db: str) -> None:
    # the relay's stop cancels its read, which may be half prepared: on a pool that skips
    # asyncpg's reset, the server's implicit transaction stayed open and the next read on
    # that connection saw the old now(), missing postings already due (and held a lock on
    # the outbox meanwhile); the relay's pool resets a connection when it comes back
    assert await _stale_reads_after_cancelled_prepares(clean_db, reset_on_release=True) == 0


async def test_the_marks_look_up_the_postings_they_name_whatever_the_statistics_say(
        pool: asyncpg.Pool) -> None:
    # 20 000 forwarded and analyzed while nothing was pending, then 10 000 due (the billing
    # system was down): the statistics make pending rows look rare, and a plain pending check
    # had the planner read every pending row off outbox_pending to mark four of them (into a
    # hash, or once per posting named; the same with the statistics cleared)
    await pool.execute(_BACKLOG, 20000)
    await pool.execute("UPDATE outbox SET state = 'sent'")
    await pool.execute("ANALYZE outbox")
    await pool.execute(_BACKLOG.replace("generate_series(1, $1)",
                                        "generate_series(100001, 100000 + $1)"), 10000)
    ids = [r["id"] for r in await pool.fetch(
        "SELECT id FROM outbox WHERE state = 'pending' ORDER BY id LIMIT 4")]
    n = len(ids)
    marks = {"sent": (_SENT, (ids, [0] * n, [0] * n, 0)),
             "failed": (_FAILED, (ids, ["x"] * n, [1.0] * n, [False] * n, 3600.0, 0))}

    async def plan(sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        async with pool.acquire() as con:
            tr = con.transaction()
            await tr.start()
            try:
                raw = await con.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
            finally:
                await tr.rollback()
        return _nodes(orjson.loads(raw)[0]["Plan"])

    for state in ("analyzed with nothing pending", "cleared"):
        if state == "cleared":
            await _clear_outbox_stats(pool)
        for name, (sql, args) in marks.items():
            nodes = await plan(sql, args)
            kinds = [n["Node Type"] for n in nodes]
            assert not any(k.startswith("Hash") for k in kinds), (state, name, kinds)
            scans = [n for n in nodes if n.get("Relation Name") == "outbox"
                     and n["Node Type"] != "ModifyTable"]
            assert scans, (state, name, kinds)
            for scan in scans:  # one primary-key look-up per posting named, nothing more
                assert scan["Node Type"] == "Index Scan", (state, name, kinds)
                assert scan["Index Name"] == "outbox_pkey", (state, name, scan["Index Name"])
                assert scan["Actual Rows"] * scan["Actual Loops"] <= n, (state, name)
    # and the marks do mark: pending rows only
    await pool.execute(_SENT, ids[:2], [5, 6], [7, 8], 0)
    await pool.execute(_FAILED, ids[1:], ["late"] * 3, [1.0] * 3, [True] * 3, 3600.0, 0)
    rows = {r["id"]: (r["state"], r["arrears_after"], r["last_error"]) for r in await pool.fetch(
        "SELECT id, state, arrears_after, last_error FROM outbox WHERE id = ANY($1)", ids)}
    assert rows == {ids[0]: ("sent", 5, None), ids[1]: ("sent", 6, None),
                    ids[2]: ("dead", None, "late"), ids[3]: ("dead", None, "late")}


def _execute_mark(ids: list[int]) -> str:
    """EXECUTE of the prepared mark (EXECUTE takes no bind parameters)."""
    zeros = ",".join("0" * len(ids))
    return (f"EXECUTE mark('{{{','.join(map(str, ids))}}}', '{{{zeros}}}', '{{{zeros}}}', 0)")


async def test_the_relays_connections_plan_the_marks_for_the_table_as_it_is_now(
        pool: asyncpg.Pool, clean_db: str) -> None:
    # a prepared statement settles on a generic plan after five runs, made for the table as it
    # was: a relay started on a young outbox went on scanning the whole table to mark a batch
    # as the table grew; the relay's connections plan each run afresh
    await pool.execute("ALTER TABLE outbox SET (autovacuum_enabled = false)")  # no replanning
    ordinary = await db.create_pool(clean_db, min_size=1, max_size=1)
    relay = await db.create_pool(clean_db, min_size=1, max_size=1,
                                 server_settings=dict(RELAY_SERVER_SETTINGS))
    plans: dict[str, list[dict[str, Any]]] = {}
    try:
        await pool.execute(_BACKLOG, 40)
        first = [r["id"] for r in await pool.fetch("SELECT id FROM outbox LIMIT 4")]
        cons = {"ordinary": await ordinary.acquire(), "relay": await relay.acquire()}
        for con in cons.values():  # young table: the plan chosen now is kept
            await con.execute(f"PREPARE mark(bigint[], bigint[], bigint[], bigint) AS {_SENT}")
            for _ in range(8):
                await con.execute(_execute_mark(first))
        await pool.execute("UPDATE outbox SET state = 'pending'")  # the four, marked meanwhile
        await pool.execute(_BACKLOG.replace("generate_series(1, $1)",
                                            "generate_series(1001, 1000 + $1)"), 20000)
        ids = [r["id"] for r in await pool.fetch("SELECT id FROM outbox ORDER BY id DESC LIMIT 4")]
        for name, con in cons.items():
            tr = con.transaction()
            await tr.start()
            try:
                raw = await con.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {_execute_mark(ids)}")
            finally:
                await tr.rollback()
            plans[name] = _nodes(orjson.loads(raw)[0]["Plan"])
        await ordinary.release(cons["ordinary"])
        await relay.release(cons["relay"])
    finally:
        await relay.close()
        await ordinary.close()
        await pool.execute("ALTER TABLE outbox RESET (autovacuum_enabled)")

    def outbox_scans(nodes: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
        return [(n["Node Type"], n.get("Index Name")) for n in nodes
                if n.get("Relation Name") == "outbox" and n["Node Type"] != "ModifyTable"]

    # the hazard, on an ordinary connection: the young table's plan, a scan of all 20 040 rows
    assert ("Seq Scan", None) in outbox_scans(plans["ordinary"]), plans["ordinary"]
    assert outbox_scans(plans["relay"]) == [("Index Scan", "outbox_pkey")], plans["relay"]


async def test_a_metrics_scrape_counts_the_queue_not_the_history(pool: asyncpg.Pool) -> None:
    # every scrape counted the outbox by state, a scan of every posting ever made (3.5 ms at
    # 30 000 rows in the HTTP bench, and the outbox only grows)
    await pool.execute(_BACKLOG, 20000)
    await pool.execute("UPDATE outbox SET state = 'sent' WHERE id > 5")
    await pool.execute("UPDATE outbox SET state = 'dead' WHERE id IN (4, 5)")
    await pool.execute("ANALYZE outbox")
    assert await queue_counts(pool) == (3, 2)
    raw = await pool.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {_QUEUE_COUNTS}")
    nodes = _nodes(orjson.loads(raw)[0]["Plan"])
    assert not any(n["Node Type"] == "Seq Scan" for n in nodes), nodes
    assert {n["Index Name"] for n in nodes if "Index Name" in n} == {"outbox_dead",
                                                                     "outbox_pending"}
