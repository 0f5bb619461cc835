"""Business date, cut-over and reconciliation with the marketing system."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import pytest

from switch import db, marketing_client
from switch import loop as loop_module
from switch.business import BusinessCalendar, filing_dates, next_cutover
from switch.marketing_client import MarketingClient
from switch.node import Node
from switch.payments import reconcile as reconcile_module
from switch.payments.reconcile import reconcile
from tests.nodekit import (
    Api,
    LoopTurns,
    Sims,
    active_account,
    api_key,
    running_node,
    simulators,
)

SH = ZoneInfo("Asia/Shanghai")


def test_business_date_advances_at_the_cutover() -> None:
    cal = BusinessCalendar(SH, time(23, 0))
    before = datetime(2026, 11, 26, 22, 59, 59, tzinfo=SH)
    at = datetime(2026, 11, 26, 23, 0, 0, tzinfo=SH)
    assert cal.date_at(before) == date(2026, 11, 26)
    assert cal.date_at(at) == date(2026, 11, 27)
    assert cal.date_at(datetime(2026, 12, 31, 23, 30, tzinfo=SH)) == date(2027, 1, 1)
    assert next_cutover(cal, before) == at.astimezone(UTC)
    assert next_cutover(cal, at) == (at + timedelta(days=1)).astimezone(UTC)


def test_settlement_mmdd_is_read_in_the_nearest_year() -> None:
    cal = BusinessCalendar(SH, time(23, 0))
    assert cal.date_from_mmdd("1231", date(2027, 1, 2)) == date(2026, 12, 31)
    assert cal.date_from_mmdd("0102", date(2026, 12, 31)) == date(2027, 1, 2)
    with pytest.raises(ValueError):
        cal.date_from_mmdd("0230", date(2026, 12, 31))


async def _pay_at_counter(node: Node, sims: Sims, idem: str) -> tuple[int, bytes]:
    """One counter payment of 100 fen, once the node's account mirror is ready."""
    await asyncio.wait_for(node.components["accounts"].synced.wait(), 20)
    key = await api_key(node.pool, "counter")
    acct = await active_account(sims.marketing)
    async with aiohttp.ClientSession() as s:
        api = Api(s, f"http://127.0.0.1:{node.ports.http}", key)
        st, _, raw = await api.call("POST", "/v1/payments", idem=idem,
                                    json={"account_no": acct, "amount": 100, "method": "cash"})
    return st, raw


async def test_a_payment_after_the_cutover_belongs_to_the_next_date(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    # a cut-over at 00:00 local time has always just passed: every payment is "after" it
    async with running_node(clean_db, clean_redis, sims, tmp_path,
                            GRIDPAY_CUTOVER="00:00") as node:
        st, raw = await _pay_at_counter(node, sims, "cut")
        assert st == 201
        local_today = datetime.now(SH).date()
        assert orjson.loads(raw)["business_date"] == (local_today + timedelta(1)).isoformat()


async def _drain(node: Node) -> None:
    for _ in range(300):
        if await node.pool.fetchval("SELECT count(*) FROM outbox WHERE state <> 'sent'") == 0:
            return
        node.components["forwarder"].wake()
        await asyncio.sleep(0.05)
    raise AssertionError("outbox did not drain")


async def _pay_internet(node: Node, sims: Sims, amounts: list[int]) -> str:
    """Internet payments of `amounts` to one active account, forwarded; the account."""
    await asyncio.wait_for(node.components["accounts"].synced.wait(), 20)
    key = await api_key(node.pool, "internet")
    acct = await active_account(sims.marketing)
    async with aiohttp.ClientSession() as s:
        api = Api(s, f"http://127.0.0.1:{node.ports.http}", key)
        for i, amount in enumerate(amounts):
            st, _, _ = await api.call("POST", "/v1/payments", idem=f"r{i}",
                                      json={"account_no": acct, "amount": amount,
                                            "method": "cash"})
            assert st == 201
    await _drain(node)
    return acct


async def test_reconciliation_gives_the_event_loop_turns_through_a_day(
        clean_db: str, clean_redis: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The reconciliation runs on the active node. A busy day is hundreds of thousands of
    # postings, and going through them in one go held every payment the node was answering
    # for seconds: the lists (ours, the marketing system's) are gone through in slices with a
    # turn for the event loop between them. Seen here with slices of two postings: a ticker
    # task moves on between the comparisons, and between the marketing list's records.
    monkeypatch.setattr(loop_module, "SLICE", 2)
    turns = LoopTurns()
    seen: dict[str, list[int]] = {"compared": [], "read": []}

    def watched(name: str, fn: Any) -> Any:
        def call(*args: Any) -> Any:
            seen[name].append(turns.count)
            return fn(*args)
        return call

    monkeypatch.setattr(reconcile_module, "_same", watched("compared", reconcile_module._same))
    monkeypatch.setattr(marketing_client, "_record", watched("read", marketing_client._record))
    async with simulators() as sims, running_node(clean_db, clean_redis, sims,
                                                  tmp_path) as node:
        await _pay_internet(node, sims, [100 + i for i in range(8)])
        day = node.components["calendar"].today()
        seen["compared"].clear()
        seen["read"].clear()
        async with turns:
            rep = await reconcile(node.pool, node.components["marketing"], day,
                                  calendar=node.components["calendar"])
        assert rep.clean and rep.matched == 8
        assert len(seen["compared"]) == 8 and len(set(seen["compared"])) >= 4, seen
        assert len(seen["read"]) >= 8 and len(set(seen["read"])) >= 4, seen


async def test_reconciliation_finds_and_requeues_what_is_missing(
        clean_db: str, clean_redis: str, tmp_path: Path) -> None:
    async with simulators() as sims, running_node(clean_db, clean_redis, sims,
                                                  tmp_path) as node:
        acct = await _pay_internet(node, sims, [100, 101, 102])
        day = node.components["calendar"].today()
        clean = await reconcile(node.pool, node.components["marketing"], day,
                              calendar=node.components["calendar"])
        assert clean.clean and clean.matched == 3 and clean.ours == 3
        # a posting the switch believes sent, but the marketing system never got
        await node.components["forwarder"].stop()
        await node.pool.execute(
            "INSERT INTO dedup_keys (key, kind, request_hash) VALUES ('ghost', 'payment', '')")
        pid = await node.pool.fetchval("SELECT id FROM payments LIMIT 1")
        await node.pool.execute(
            "INSERT INTO payments (id, receipt_no, dedup_key, channel, method, account_no,"
            " amount, business_date, created_at, epoch) SELECT gen_random_uuid(),"
            " '99999999999999999', 'ghost', channel, method, account_no, 55, business_date,"
            " now(), epoch FROM payments WHERE id = $1", pid)
        ghost = await node.pool.fetchval(
            "SELECT id FROM payments WHERE receipt_no = '99999999999999999'")
        await node.pool.execute(
            "INSERT INTO outbox (posting_id, kind, payment_id, account_no, amount, channel,"
            " occurred_at, state) VALUES ('P999999999999999999', 'payment', $1, $2, 55,"
            " 'internet', now(), 'sent')", ghost, acct)
        rep = await reconcile(node.pool, node.components["marketing"], day,
                              calendar=node.components["calendar"])
        assert rep.missing == ["P999999999999999999"] and rep.requeued == 1
        node.components["forwarder"].start()
        await _drain(node)
        again = await reconcile(node.pool, node.components["marketing"], day,
                              calendar=node.components["calendar"])
        assert again.clean and again.matched == 4
        # a posting the marketing system holds but the relay gave up on (a refusal read off a
        # connection out of step, say): reported, and on a run that re-queues, marked sent,
        # so that a reversal waiting behind it goes on
        held = await node.pool.fetchval("SELECT posting_id FROM outbox WHERE state = 'sent'"
                                        " AND posting_id <> 'P999999999999999999' LIMIT 1")
        await node.pool.execute("UPDATE outbox SET state = 'dead' WHERE posting_id = $1", held)
        dry = await reconcile(node.pool, node.components["marketing"], day,
                              calendar=node.components["calendar"], requeue=False)
        assert dry.held_but_dead == [held] and dry.settled == 0 and dry.clean
        settled = await reconcile(node.pool, node.components["marketing"], day,
                                  calendar=node.components["calendar"])
        assert settled.held_but_dead == [held] and settled.settled == 1
        assert await node.pool.fetchval("SELECT state FROM outbox WHERE posting_id = $1",
                                        held) == "sent"
        # our posting id held there with other content (its channel, its time): a collision,
        # which the relay was refused with 409; reported as different, and the dead letter is
        # left for a person, not settled as delivered
        from switch.marketing_client import Posting

        await node.pool.execute(
            "INSERT INTO dedup_keys (key, kind, request_hash) VALUES ('clash', 'payment', '')")
        await node.pool.execute(
            "INSERT INTO payments (id, receipt_no, dedup_key, channel, method, account_no,"
            " amount, business_date, created_at, epoch) SELECT gen_random_uuid(),"
            " '77777777777777777', 'clash', channel, method, account_no, 66, business_date,"
            " now(), epoch FROM payments WHERE id = $1", pid)
        clash_at = datetime.now(UTC)
        await node.pool.execute(
            "INSERT INTO outbox (posting_id, kind, payment_id, account_no, amount, channel,"
            " occurred_at, state, last_error) SELECT 'P777777777777777777', 'payment', id,"
            " $1, 66, 'internet', $2, 'dead', 'refused: 409' FROM payments"
            " WHERE receipt_no = '77777777777777777'", acct, clash_at)
        # held there by another channel, an hour earlier: the same amount, kind and account
        await node.components["marketing"].post(Posting(
            posting_id="P777777777777777777", account_no=acct, amount=66, kind="payment",
            channel="bank", occurred_at=clash_at - timedelta(hours=1)))
        clash = await reconcile(node.pool, node.components["marketing"], day,
                                calendar=node.components["calendar"])
        assert clash.different == ["P777777777777777777"] and not clash.clean
        assert clash.held_but_dead == [] and clash.settled == 0
        assert await node.pool.fetchval("SELECT state FROM outbox WHERE posting_id ="
                                        " 'P777777777777777777'") == "dead"
        await node.pool.execute("UPDATE outbox SET state = 'sent'"
                                " WHERE posting_id = 'P777777777777777777'")
        # a credit in the marketing system with one of our ids that no outbox row has

        await node.components["marketing"].post(Posting(
            posting_id="P888888888888888888", account_no=acct, amount=7, kind="payment",
            channel="internet", occurred_at=datetime.combine(day, time(12), UTC)))
        stray = await reconcile(node.pool, node.components["marketing"], day,
                              calendar=node.components["calendar"])
        assert stray.extra == ["P888888888888888888"] and not stray.clean
        assert stray.matched == 4 and stray.theirs == 5  # and the collision above, still
        assert stray.different == ["P777777777777777777"]
        # strays of this business date dated in the hours where the calendar date differs
        # (Shanghai 23:30 and 04:00, i.e. the UTC date before) are reported too
        night = {"P777777777777777771": datetime.combine(day - timedelta(days=1),
                                                         time(15, 30), UTC),
                 "P777777777777777772": datetime.combine(day - timedelta(days=1),
                                                         time(20, 0), UTC)}
        for posting_id, at in night.items():
            await node.components["marketing"].post(Posting(
                posting_id=posting_id, account_no=acct, amount=7, kind="payment",
                channel="internet", occurred_at=at))
        late = await reconcile(node.pool, node.components["marketing"], day,
                               calendar=node.components["calendar"], requeue=False)
        assert set(night) <= set(late.extra)
        # a node that lost the lease re-queues nothing: the re-queue is fenced
        await node.components["forwarder"].stop()
        stale = int(await node.pool.fetchval("SELECT epoch FROM node_lease"))
        await node.pool.execute("UPDATE node_lease SET epoch = epoch + 1")  # a takeover
        await node.pool.execute("UPDATE outbox SET state = 'dead' WHERE posting_id = $1",
                                "P999999999999999999")
        hiding = cast(MarketingClient, _Missing(node.components["marketing"],
                                                "P999999999999999999"))
        with pytest.raises(Exception) as fenced:
            await reconcile(node.pool, hiding, day, calendar=node.components["calendar"],
                            epoch=stale)
        assert db.is_fenced(fenced.value), fenced.value
        assert await node.pool.fetchval("SELECT state FROM outbox WHERE posting_id = $1",
                                        "P999999999999999999") == "dead"


class _ListsNothing:
    """The marketing client, but it lists no posting at all."""

    async def postings_for_date(self, day: date) -> list[object]:
        return []


async def test_a_bad_date_is_logged_by_counts_and_a_sample(
        clean_db: str, clean_redis: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # a date the billing system lost whole named every posting in one log line (megabytes
    # for a busy date); the line carries the counts and the first ten ids of each list, and
    # the cut-over keeps the whole report
    async with simulators() as sims, running_node(clean_db, clean_redis, sims,
                                                  tmp_path) as node:
        await _pay_internet(node, sims, [100 + i for i in range(12)])
        await node.components["forwarder"].stop()  # the re-queued stay queued for the check
        daily = node.components["daily"]
        daily.marketing = _ListsNothing()
        day = node.components["calendar"].today()
        with caplog.at_level(logging.INFO, logger="gridpay"):
            rep = await daily.close_date(day)
        assert rep is not None and len(rep.missing) == 12 and rep.requeued == 12
        [line] = [r for r in caplog.records if r.getMessage().startswith("business date")]
        assert line.missing_count == 12 and line.missing == rep.missing[:10]  # type: ignore[attr-defined]
        assert line.queued == [] and line.queued_count == 0  # type: ignore[attr-defined]
        kept = await node.pool.fetchval(
            "SELECT reconciliation FROM cutovers WHERE business_date = $1", day)
        assert sorted(kept["missing"]) == sorted(rep.missing)


class _Missing:
    """The marketing client, but one posting is missing from what it lists."""

    def __init__(self, client: object, posting_id: str) -> None:
        self.client = client
        self.posting_id = posting_id

    async def postings_for_date(self, day: date) -> list[object]:
        got = await self.client.postings_for_date(day)  # type: ignore[attr-defined]
        return [r for r in got if r.posting.posting_id != self.posting_id]


async def test_cutover_is_recorded_once_and_fenced(clean_db: str, clean_redis: str,
                                                   sims: Sims, tmp_path: Path) -> None:
    async with running_node(clean_db, clean_redis, sims, tmp_path) as node:
        daily = node.components["daily"]
        yesterday = node.components["calendar"].today() - timedelta(days=1)
        rep = await daily.close_date(yesterday)
        assert rep is not None and rep.clean
        await daily.close_date(yesterday)
        assert await node.pool.fetchval("SELECT count(*) FROM cutovers") == 1
        await node.pool.execute("UPDATE node_lease SET epoch = epoch + 1")
        with pytest.raises(Exception) as e:
            await daily.close_date(yesterday - timedelta(days=1))
        assert db.is_fenced(e.value), e.value  # GP001 from gridpay_fence




async def test_the_numbered_hook_sees_the_record_and_cannot_fail_the_batch(
        node: Node, sims: Sims) -> None:
    import uuid

    from switch.payments.ledger import Committed, PaymentRecord, PaymentRequest

    account = await active_account(sims.marketing)
    seen: list[PaymentRecord] = []

    def broken(rec: PaymentRecord) -> None:
        seen.append(rec)
        raise RuntimeError("a hook that fails")

    ledger = node.components["ledger"]
    outcomes = await asyncio.gather(*(ledger.submit(PaymentRequest(
        dedup_key=f"test:{uuid.uuid4()}", request_hash=b"h" * 32, channel="counter",
        method="cash", account_no=account, amount=100 + i, numbered=broken))
        for i in range(3)))
    assert all(isinstance(o, Committed) for o in outcomes)
    # told the very record each payment committed with
    assert sorted(id(r) for r in seen) == sorted(
        id(o.record) for o in outcomes if isinstance(o, Committed))
    # inside a caller's transaction, Committed is not yet durable: the hook is not told
    seen.clear()
    async with node.pool.acquire() as con, con.transaction():
        inside = await ledger.record_in(con, [PaymentRequest(
            dedup_key=f"test:{uuid.uuid4()}", request_hash=b"h" * 32, channel="counter",
            method="cash", account_no=account, amount=99, numbered=broken)])
        assert isinstance(inside[0], Committed)
    await asyncio.sleep(0.05)
    assert seen == []


def _posted(sims: Sims, business_date: date) -> list[str]:
    """The posting ids the billing system holds for `business_date` (see `filing_dates`)."""
    return [p.request.posting_id for d in filing_dates([business_date])
            for p in sims.marketing.durable_postings_on(d)]


async def _due_payments(node: Node, account: str, n: int, base: int) -> list[Any]:
    """`n` payments recorded with the relay stopped (its rounds are run by hand) and set to
    batches of 8; their records."""
    import dataclasses
    import uuid

    from switch.payments.ledger import Committed, PaymentRequest

    forwarder = node.components["forwarder"]
    await forwarder.stop()
    forwarder.settings = dataclasses.replace(forwarder.settings, batch=8)
    ledger = node.components["ledger"]
    outcomes = await asyncio.gather(*(ledger.submit(PaymentRequest(
        dedup_key=f"test:{uuid.uuid4()}", request_hash=b"h" * 32, channel="counter",
        method="cash", account_no=account, amount=base + i)) for i in range(n)))
    records = [o.record for o in outcomes if isinstance(o, Committed)]
    assert len(records) == n
    return records


async def test_a_round_forwards_batch_after_batch_each_posting_once(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    from switch.payments.forwarder import MAX_BATCHES_PER_ROUND, ForwardStats

    account = await active_account(sims.marketing)
    async with running_node(clean_db, clean_redis, sims, tmp_path) as node:
        records = await _due_payments(node, account, 70, 100)
        forwarder = node.components["forwarder"]
        # eight batches of 8, each read while the one before was on the wire; then the round
        # ends, and the next starts again from the head of the queue
        assert MAX_BATCHES_PER_ROUND == 8
        assert await forwarder.forward_once() == ForwardStats(64, 0)
        assert await forwarder.forward_once() == ForwardStats(6, 0)
        assert await node.pool.fetchval(
            "SELECT count(*) FROM outbox WHERE state = 'pending'") == 0
        posted = _posted(sims, records[0].business_date)
        assert all(posted.count(r.posting_id) == 1 for r in records)
        assert await forwarder.forward_once() == ForwardStats(0, 0)


async def test_a_refused_posting_is_a_dead_letter_and_the_rest_of_its_batch_is_sent(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    from switch.payments.forwarder import ForwardStats

    account = await active_account(sims.marketing)
    async with running_node(clean_db, clean_redis, sims, tmp_path) as node:
        records = await _due_payments(node, account, 8, 300)
        # one posting for an account the billing system does not know, and one it cannot
        # even read (a row damaged in the database): each is refused, alone
        unknown, damaged = records[2].posting_id, records[5].posting_id
        await node.pool.execute("UPDATE outbox SET account_no = '9999999999'"
                                " WHERE posting_id = $1", unknown)
        await node.pool.execute("UPDATE outbox SET account_no = 'ABCDEFGHIJ'"
                                " WHERE posting_id = $1", damaged)
        forwarder = node.components["forwarder"]
        assert await forwarder.forward_once() == ForwardStats(6, 2)
        # refused once: tried once more (a refusal names no posting, so it could have been
        # another request's), then a dead letter
        states = {r["posting_id"]: r["state"] for r in await node.pool.fetch(
            "SELECT posting_id, state FROM outbox WHERE posting_id = ANY($1::text[])",
            [unknown, damaged])}
        assert states == {unknown: "pending", damaged: "pending"}
        await node.pool.execute("UPDATE outbox SET next_attempt_at = now()")
        assert await forwarder.forward_once() == ForwardStats(0, 2)
        rows = {r["posting_id"]: r for r in await node.pool.fetch(
            "SELECT posting_id, state, attempts, last_error FROM outbox")}
        for posting_id in (unknown, damaged):
            row = rows.pop(posting_id)
            assert row["state"] == "dead" and row["attempts"] == 2
            assert row["last_error"].startswith("refused: marketing system rejected")
        assert {r["state"] for r in rows.values()} == {"sent"}
        ours = {r.posting_id for r in records}
        posted = [p for p in _posted(sims, records[0].business_date) if p in ours]
        assert sorted(posted) == sorted(rows)  # each of the six once, neither refused one
        assert await forwarder.forward_once() == ForwardStats(0, 0)


async def test_the_relay_reads_and_marks_on_its_own_connections(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    async with running_node(clean_db, clean_redis, sims, tmp_path) as node:
        forwarder = node.components["forwarder"]
        # connections of its own (see RELAY_SERVER_SETTINGS), named as the node's sessions
        # are, so that a takeover's cut-off finds them too
        assert forwarder.pool is not node.pool
        async with forwarder.pool.acquire() as conn:
            assert await conn.fetchval("SHOW enable_bitmapscan") == "off"
            assert await conn.fetchval("SHOW application_name") == \
                await node.pool.fetchval("SHOW application_name")
        assert await node.pool.fetchval("SHOW enable_bitmapscan") == "on"


async def test_a_round_stops_at_the_first_refused_mark(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    account = await active_account(sims.marketing)
    async with running_node(clean_db, clean_redis, sims, tmp_path) as node:
        records = await _due_payments(node, account, 60, 200)
        await node.pool.execute("UPDATE node_lease SET epoch = epoch + 1")  # taken over
        with pytest.raises(Exception) as e:
            await node.components["forwarder"].forward_once()
        assert db.is_fenced(e.value), e.value
        posted = set(_posted(sims, records[0].business_date))
        sent = sum(r.posting_id in posted for r in records)
        # the first batch's mark was refused while the second was on the wire: the round
        # stopped before a third, instead of posting all 60 (the old node may no longer)
        assert sent == 16, sent


async def test_relay_marks_sent_only_under_the_current_epoch(clean_db: str, clean_redis: str,
                                                            sims: Sims, tmp_path: Path) -> None:
    """The relay's "sent" update is fenced: a node that lost the lease may have posted (the
    marketing system deduplicates by posting id) but cannot record it as sent."""
    import uuid

    from switch.payments.ledger import Committed, PaymentRequest

    account = await active_account(sims.marketing)
    async with running_node(clean_db, clean_redis, sims, tmp_path) as node:
        forwarder = node.components["forwarder"]
        await forwarder.stop()  # rounds are run by hand below
        outcome = await node.components["ledger"].submit(PaymentRequest(
            dedup_key=f"test:{uuid.uuid4()}", request_hash=b"h" * 32, channel="counter",
            method="cash", account_no=account, amount=1234))
        assert isinstance(outcome, Committed)
        posting_id = outcome.record.posting_id
        await node.pool.execute("UPDATE node_lease SET epoch = epoch + 1")
        with pytest.raises(Exception) as e:
            await forwarder.forward_once()
        assert db.is_fenced(e.value), e.value  # GP001 from gridpay_fence
        assert await node.pool.fetchval(
            "SELECT state FROM outbox WHERE posting_id = $1", posting_id) == "pending"
        posted = _posted(sims, outcome.record.business_date)
        assert posted.count(posting_id) == 1  # sent once on the wire, credited once


async def test_relay_records_a_failure_only_under_the_current_epoch(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    import uuid

    from switch.payments.ledger import Committed, PaymentRequest

    account = await active_account(sims.marketing)
    async with running_node(clean_db, clean_redis, sims, tmp_path) as node:
        forwarder = node.components["forwarder"]
        await forwarder.stop()
        outcome = await node.components["ledger"].submit(PaymentRequest(
            dedup_key=f"test:{uuid.uuid4()}", request_hash=b"h" * 32, channel="counter",
            method="cash", account_no=account, amount=1234))
        assert isinstance(outcome, Committed)
        await sims.marketing.set_faults(error_rate=1.0)

        def retries() -> float | None:
            return node.metrics.registry.get_sample_value("gridpay_forwarded_total",
                                                          {"result": "retry"})
        try:
            stats = await forwarder.forward_once()  # current epoch: the failure is recorded
            assert (stats.sent, stats.failed) == (0, 1)
            row = await node.pool.fetchrow("SELECT state, attempts, last_error FROM outbox"
                                           " WHERE posting_id = $1", outcome.record.posting_id)
            assert row is not None and row["state"] == "pending"
            assert row["attempts"] == 1
            assert row["last_error"] == "unavailable: marketing system answered 503"
            assert retries() == 1.0
            await node.pool.execute("UPDATE outbox SET next_attempt_at = now()")
            await node.pool.execute("UPDATE node_lease SET epoch = epoch + 1")
            with pytest.raises(Exception) as e:
                await forwarder.forward_once()
            assert db.is_fenced(e.value), e.value  # GP001 from gridpay_fence
            assert await node.pool.fetchval(  # the stale node could not count it
                "SELECT attempts FROM outbox WHERE posting_id = $1",
                outcome.record.posting_id) == 1
            assert retries() == 1.0  # nor its metric
        finally:
            await sims.marketing.clear_faults()


async def test_a_failed_or_missed_close_is_done_when_the_node_next_looks(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    async with running_node(clean_db, clean_redis, sims, tmp_path) as node:
        daily = node.components["daily"]
        # this test drives the catch-up itself: the node's own loop would race it (it closed
        # a pending date between two of the test's reads, one run in many)
        await daily.stop()
        today = node.components["calendar"].today()
        # a new installation: nothing closed yet, and nothing owed until something is paid;
        # then the dates from its first payment are, if no node saw their cut-over
        assert await node.pool.fetchval("SELECT count(*) FROM cutovers") == 0
        assert await daily.pending_dates() == []
        await node.pool.execute(
            "INSERT INTO dedup_keys (key, kind, request_hash) VALUES ('old', 'payment', '')")
        await node.pool.execute(
            "INSERT INTO payments (id, receipt_no, dedup_key, channel, method, account_no,"
            " amount, business_date, created_at, epoch) VALUES (gen_random_uuid(),"
            " '99999999999999998', 'old', 'internet', 'cash', '0000000001', 5, $1, now(), 1)",
            today - timedelta(days=2))
        assert await daily.pending_dates() == [today - timedelta(days=2),
                                               today - timedelta(days=1)]
        # the marketing system is down at the cut-over: the date is closed, not reconciled
        await sims.marketing.set_faults(error_rate=1.0)
        try:
            assert await daily.close_date(today - timedelta(days=4)) is None
        finally:
            await sims.marketing.clear_faults()
        # and no node saw the next three cut-overs
        assert await daily.pending_dates() == [today - timedelta(days=n) for n in (4, 3, 2, 1)]
        assert await daily._catch_up()
        rows = await node.pool.fetch("SELECT business_date, reconciled_at, reconciliation"
                                     " FROM cutovers ORDER BY business_date")
        assert [r["business_date"] for r in rows] == [today - timedelta(days=n)
                                                      for n in (4, 3, 2, 1)]
        assert all(r["reconciled_at"] is not None and r["reconciliation"]["clean"]
                   for r in rows)
        assert await daily.pending_dates() == []
        # a pair stopped for longer than the look-back window: the window's dates are still
        # closed (they were all skipped when the last close lay outside it)
        from switch.payments.daily import LOOK_BACK_DAYS

        await node.pool.execute("DELETE FROM cutovers")
        await node.pool.execute(
            "INSERT INTO cutovers (business_date, node_id, epoch, reconciled_at)"
            " VALUES ($1, 'node-a', 1, now())", today - timedelta(days=LOOK_BACK_DAYS + 3))
        assert await daily.pending_dates() == [today - timedelta(days=n)
                                               for n in range(LOOK_BACK_DAYS, 0, -1)]


async def test_a_cut_over_whose_reconciliation_fails_is_not_tried_again_at_once(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    from switch.payments.daily import DailyCutover

    async with running_node(clean_db, clean_redis, sims, tmp_path) as node:
        await node.components["daily"].stop()  # this test drives a cut-over of its own
        tz = node.components["calendar"].tz
        started = datetime.now(tz)
        if (started + timedelta(seconds=30)).date() != started.date():
            pytest.skip("too close to midnight to place a cut-over")
        soon = (started + timedelta(seconds=1.5)).time()
        closed: list[date] = []

        class Watched(DailyCutover):
            async def close_date(self, day: date) -> Any:
                closed.append(day)
                return await super().close_date(day)

        daily = Watched(node, BusinessCalendar(tz, soon), node.components["marketing"])
        await sims.marketing.set_faults(error_rate=1.0)  # reconciliation fails
        try:
            daily.start()
            for _ in range(500):  # the cut-over comes in 1.5 s, and is acted on 1 s after it
                if closed:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)  # time enough to have done it twice
            await daily.stop()
        finally:
            await sims.marketing.clear_faults()
        # the date that ended was closed once; its reconciliation is retried with the next
        # round, not straight away by the catch-up that follows the cut-over
        assert closed == [started.date()]
        row = await node.pool.fetchrow("SELECT reconciled_at FROM cutovers")
        assert row is not None and row["reconciled_at"] is None


async def test_a_posting_is_sent_in_the_business_time_zone(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    async with running_node(clean_db, clean_redis, sims, tmp_path) as node:
        st, _ = await _pay_at_counter(node, sims, "tz")
        assert st == 201
        await _drain(node)
        pid = await node.pool.fetchval("SELECT posting_id FROM outbox")
        posted = sims.marketing.ledger.posting(pid)
        assert posted is not None
        sent = posted.request.occurred_at
        assert sent.utcoffset() == timedelta(hours=8)  # Asia/Shanghai, the configured zone
        assert posted.request.business_date == sent.date()  # dated by the local day there


def test_filing_dates_are_each_business_date_and_the_days_either_side() -> None:
    d = date(2026, 11, 27)
    assert filing_dates([d]) == [date(2026, 11, 26), d, date(2026, 11, 28)]
    # several dates share their neighbours once, in order
    assert filing_dates([d, date(2026, 11, 26), d]) == [
        date(2026, 11, 25), date(2026, 11, 26), d, date(2026, 11, 28)]
    assert filing_dates([]) == []


async def test_a_posting_still_queued_at_the_close_is_not_missing_and_the_date_stays_open(
        clean_db: str, clean_redis: str, tmp_path: Path) -> None:
    """The relay behind at the cut-over (the billing system slow or down): the posting is not
    missing there but not sent yet. The report says so; once the queue has drained, the date
    is compared again, and clean. It is not compared again while the posting waits."""
    async with simulators() as sims, running_node(clean_db, clean_redis, sims,
                                                  tmp_path) as node:
        await asyncio.wait_for(node.components["accounts"].synced.wait(), 20)
        await node.components["daily"].stop()  # the test drives the close itself
        key = await api_key(node.pool, "internet")
        acct = await active_account(sims.marketing, start=13)
        await node.components["forwarder"].stop()
        async with aiohttp.ClientSession() as s:
            api = Api(s, f"http://127.0.0.1:{node.ports.http}", key)
            st, _, raw = await api.call("POST", "/v1/payments", idem="queued",
                                        json={"account_no": acct, "amount": 600,
                                              "method": "cash"})
            assert st == 201
        # booked on the date that has just ended (the billing system files it by its time,
        # and reconciliation reads the dates either side)
        day = date.fromisoformat(orjson.loads(raw)["business_date"]) - timedelta(days=1)
        await node.pool.execute("UPDATE payments SET business_date = $1", day)
        pid = await node.pool.fetchval("SELECT posting_id FROM outbox")
        daily = node.components["daily"]
        rep = await daily.close_date(day)
        assert rep is not None
        assert (rep.queued, rep.missing, rep.requeued) == ([pid], [], 0)
        assert rep.clean and not rep.complete
        row = await node.pool.fetchrow("SELECT reconciliation FROM cutovers")
        assert row is not None and row["reconciliation"]["queued"] == [pid]
        assert row["reconciliation"]["complete"] is False
        assert await daily.pending_dates() == []  # not again while the posting waits
        node.components["forwarder"].start()
        await _drain(node)
        assert await daily.pending_dates() == [day]  # it has gone: compared again
        assert await daily._catch_up()
        row = await node.pool.fetchrow("SELECT reconciliation FROM cutovers")
        assert row is not None and row["reconciliation"]["complete"] is True
        assert row["reconciliation"]["clean"] is True and row["reconciliation"]["matched"] == 1
        assert await daily.pending_dates() == []

