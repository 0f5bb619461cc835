"""Card centre core: serials, the state machine against a real PostgreSQL, the IVR helpers,
the operation log's hash chain, the files and the reconciliation."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import hashlib
import itertools
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from switch import loop as loop_module
from switch.cards import oplog, states, workflow
from switch.cards.batches import feed_card_back
from switch.cards.errors import IllegalTransition, InvalidInput
from switch.cards.files import (
    CardBackParser,
    CardBackRecord,
    CardBackRecords,
    card_back_header,
    card_back_record,
    new_card_header,
    new_card_record,
    parse_card_back,
    reconcile,
    reconcile_steps,
    trailer,
)
from switch.cards.jobs import render_progress
from switch.cards.manufacturer import main as manufacturer_main
from switch.cards.manufacturer import manufacture
from switch.cards.serials import (
    SerialRange,
    compress,
    expand,
    luhn_digit,
    make_serial,
    valid_serial,
)
from switch.cards.states import ALLOWED_FROM, TRANSITIONS, CardState, Document
from switch.cards.users import add_user, main_users_add
from switch.loop import SLICE
from tests.nodekit import LoopTurns

S = CardState
DOC = Document(type="test", id="1")


def test_serial_luhn_and_validation() -> None:
    s = make_serial("130225", 1)
    assert len(s) == 16 and s.startswith("130225000000001")
    assert valid_serial(s)
    # every single-digit change is caught
    for i in range(16):
        for d in "0123456789":
            if d != s[i]:
                assert not valid_serial(s[:i] + d + s[i + 1:])
    assert luhn_digit("7992739871") == "3"  # the textbook example
    assert not valid_serial("123") and not valid_serial("13022500000000１0")


def test_ranges_expand_and_compress() -> None:
    a = [make_serial("130225", q) for q in (5, 6, 7, 9, 10)]
    ranges = compress(a)
    assert [(r.first, r.last, len(r)) for r in ranges] == [(a[0], a[2], 3), (a[3], a[4], 2)]
    assert expand([], ranges) == a
    assert expand([a[0]], [SerialRange(a[0], a[1])]) == [a[0], a[1]]
    with pytest.raises(InvalidInput):
        SerialRange(a[2], a[0])
    with pytest.raises(InvalidInput):
        expand(["1302250000000011"], [])  # bad check digit


def test_transition_table_is_the_contract() -> None:
    edges = {(e.source, e.target) for e in TRANSITIONS}
    forward = [S.ORDERED, S.PRODUCED, S.IN_STOCK, S.ISSUED, S.SOLD, S.REDEEMED]
    for a, b in itertools.pairwise(forward):
        assert (a, b) in edges
    assert ALLOWED_FROM[S.VOIDED] == {S.ORDERED, S.PRODUCED, S.IN_STOCK, S.ISSUED}
    assert ALLOWED_FROM[S.LOCKED] == {S.SOLD} and ALLOWED_FROM[S.SOLD] == {S.ISSUED, S.LOCKED}
    assert S.REDEEMED not in ALLOWED_FROM[S.EXPIRED] and S.VOIDED not in ALLOWED_FROM[S.EXPIRED]
    assert ALLOWED_FROM[S.ORDERED] == frozenset()
    assert "sold --> locked: lock" in states.diagram()


async def _batch(conn: asyncpg.Connection | asyncpg.Pool, *, expiry: dt.date | None = None
                 ) -> int:
    bid: int = await conn.fetchval(
        "INSERT INTO card_batches (face_value, quantity, expiry, manufacturer, prefix,"
        " first_seq, ordered_by, status) VALUES (10000, 100, $1, 'acme', '130225', 1, 't',"
        " 'ordered') RETURNING id", expiry or dt.date.today() + dt.timedelta(days=365))
    return bid


_SEQ = itertools.count(1)


async def _card(pool: asyncpg.Pool, state: CardState, *, location: str = "warehouse",
                expiry: dt.date | None = None) -> str:
    bid = await _batch(pool)
    serial = make_serial("130225", next(_SEQ))
    await pool.execute(
        "INSERT INTO cards (serial, batch_id, face_value, state, location, expiry, tag)"
        " VALUES ($1, $2, 10000, $3, $4, $5, $6)", serial, bid, state.value, location,
        expiry or dt.date.today() + dt.timedelta(days=365), bytes(32))
    return serial


async def _state(pool: asyncpg.Pool, serial: str) -> str:
    st: str = await pool.fetchval("SELECT state FROM cards WHERE serial = $1", serial)
    return st


async def test_every_illegal_transition_is_refused_and_changes_nothing(
        pool: asyncpg.Pool) -> None:
    """Every (state, event) pair that is not an edge: a sale and an unlock both end in `sold`,
    but a sale takes only an issued card and an unlock only a locked one."""
    legal = {(e.source, e.target, e.event) for e in TRANSITIONS}
    moves = {(e.target, e.event) for e in TRANSITIONS}
    tried = 0
    for source in CardState:
        serial = await _card(pool, source)
        for target, event in sorted(moves):
            if (source, target, event) in legal:
                continue
            async with pool.acquire() as conn:
                with pytest.raises(IllegalTransition) as ei:
                    await states.transition(conn, [serial], target, event=event, actor="t",
                                            reason="r", doc=DOC)
            assert ei.value.refused == {serial: source.value}
            assert serial in str(ei.value) and source.value in str(ei.value)
            assert await _state(pool, serial) == source.value
            tried += 1
    assert tried == len(CardState) * len(moves) - len(legal)
    assert await pool.fetchval("SELECT count(*) FROM card_events") == 0
    with pytest.raises(ValueError, match="no card moves"):  # not an event of the machine
        states.sources_of(S.SOLD, "issue")


async def test_transition_is_all_or_nothing(pool: asyncpg.Pool) -> None:
    good = [await _card(pool, S.IN_STOCK) for _ in range(3)]
    bad = await _card(pool, S.SOLD)
    unknown = make_serial("130225", 999_999)
    async with pool.acquire() as conn:
        with pytest.raises(IllegalTransition) as ei:
            await states.transition(conn, [*good, bad, unknown], S.ISSUED, event="issue",
                                    actor="t",
                                    reason="r", doc=DOC, location="H1")
    assert ei.value.refused == {bad: "sold", unknown: "unknown"}
    for s in good:
        assert await _state(pool, s) == "in_stock"
    assert await pool.fetchval("SELECT count(*) FROM card_events") == 0
    async with pool.acquire() as conn:
        n = await states.transition(conn, good, S.ISSUED, event="issue", actor="alice",
                                    reason="r", doc=DOC,
                                    location="H1")
    assert n == 3
    rows = await pool.fetch("SELECT serial, from_state, to_state, actor, doc_type, doc_id"
                            " FROM card_events ORDER BY id")
    assert {(r["from_state"], r["to_state"], r["actor"], r["doc_type"]) for r in rows} == \
        {("in_stock", "issued", "alice", "test")}
    assert await pool.fetchval("SELECT count(*) FROM cards WHERE location = 'H1'") == 3
    # a sale requires the cards to be at the seller's hall
    async with pool.acquire() as conn:
        with pytest.raises(IllegalTransition) as ei:
            await states.transition(conn, good, S.SOLD, event="sell", actor="t", reason="r",
                                    doc=DOC,
                                    at_location="H2")
    assert set(ei.value.refused.values()) == {"issued at H1"}


async def test_expiry_blocks_sale_and_redemption_and_is_swept(pool: asyncpg.Pool) -> None:
    past = dt.date.today() - dt.timedelta(days=1)
    issued = await _card(pool, S.ISSUED, location="H1", expiry=past)
    sold = await _card(pool, S.SOLD, location="H1", expiry=past)
    redeemed = await _card(pool, S.REDEEMED, location="H1", expiry=past)
    async with pool.acquire() as conn:
        with pytest.raises(IllegalTransition) as ei:
            await states.transition(conn, [issued], S.SOLD, event="sell", actor="t",
                                    reason="r", doc=DOC)
        assert ei.value.refused == {issued: "issued, past expiry"}
        async with conn.transaction():
            r = await states.redeem_card(conn, sold, "0000000001", txn_no="T1")
        assert not r.redeemed and r.reason == "expired"
    view = await states.card_status(pool, issued)
    assert view is not None and view.state is S.EXPIRED and "tag" not in repr(view)
    assert await _state(pool, sold) == "expired"  # lazily, when touched
    assert await states.sweep_expired(pool) == 1
    assert await _state(pool, issued) == "expired"
    assert await _state(pool, redeemed) == "redeemed"
    assert await pool.fetchval("SELECT count(*) FROM card_recharges") == 0


async def test_wrong_pins_lock_then_unlock_and_redeem(pool: asyncpg.Pool) -> None:
    serial = await _card(pool, S.SOLD, location="H1")
    async with pool.acquire() as conn:
        assert await states.record_wrong_pin(conn, serial, 3) == (1, False)
        assert await states.record_wrong_pin(conn, serial, 3) == (2, False)
        assert await states.record_wrong_pin(conn, serial, 3) == (3, True)
        assert await states.record_wrong_pin(conn, serial, 3) == (3, True)  # not counted
        assert await states.record_wrong_pin(conn, make_serial("130225", 999_998), 3) \
            == (0, False)
        async with conn.transaction():
            r = await states.redeem_card(conn, serial, "0000000001", txn_no="T1")
        assert not r.redeemed and r.reason == "state:locked"
        await states.transition(conn, [serial], S.SOLD, event="unlock", actor="appr",
                                reason="unlocked",
                                doc=DOC, reset_pin_count=True)
        async with conn.transaction():
            r = await states.redeem_card(conn, serial, "0000000001", amount_expected=10000,
                                         txn_no="T2", caller="13800000000", actor="ivr")
        assert r.redeemed and r.face_value == 10000
        async with conn.transaction():
            again = await states.redeem_card(conn, serial, "0000000001", txn_no="T3")
        assert not again.redeemed and again.reason == "state:redeemed"
    led = await pool.fetch("SELECT serial, account_no, amount, txn_no, caller FROM "
                           "card_recharges")
    assert [tuple(r) for r in led] == [(serial, "0000000001", 10000, "T2", "13800000000")]
    history = [r["to_state"] for r in await pool.fetch(
        "SELECT to_state FROM card_events WHERE serial = $1 ORDER BY id", serial)]
    assert history == ["sold", "sold", "locked", "sold", "redeemed"]


async def test_the_log_check_gives_the_event_loop_turns_within_a_page(
        pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    # the check runs on the active node and rehashes every entry of a page of 5 000 at a
    # time; with slices of two entries here, a ticker moves on between the entries' hashes
    async with pool.acquire() as conn:
        for i in range(6):
            await oplog.append(conn, actor="alice", action="batch.order",
                               objects={"batch_id": i}, result={"ok": True})
    monkeypatch.setattr(loop_module, "SLICE", 2)
    turns = LoopTurns()
    at: list[int] = []
    entry_hash = oplog.entry_hash

    def watched(*args: Any) -> bytes:
        at.append(turns.count)
        return entry_hash(*args)

    monkeypatch.setattr(oplog, "entry_hash", watched)
    async with turns:
        assert (await oplog.verify(pool)).ok
    assert len(at) == 6 and len(set(at)) >= 3, at


async def test_operation_log_detects_edit_and_deletion(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        for i in range(6):
            await oplog.append(conn, actor="alice", action="batch.order",
                               objects={"batch_id": i, "note": "é"}, result={"ok": True})
    good = await oplog.verify(pool)
    assert good.ok and good.entries == 6
    assert good.head_hash == bytes(await pool.fetchval(
        "SELECT hash FROM card_oplog_head WHERE id = 1")).hex()
    await pool.execute("UPDATE card_oplog SET actor = 'mallory' WHERE seq = 3")
    bad = await oplog.verify(pool)
    assert not bad.ok and bad.first_broken == 3 and "altered" in (bad.problem or "")
    await pool.execute("UPDATE card_oplog SET actor = 'alice' WHERE seq = 3")
    assert (await oplog.verify(pool)).ok
    await pool.execute("UPDATE card_oplog SET objects = '{\"batch_id\": 9, \"note\": \"é\"}'"
                       " WHERE seq = 2")
    assert (await oplog.verify(pool)).first_broken == 2
    await pool.execute("UPDATE card_oplog SET objects = '{\"batch_id\": 1, \"note\": \"é\"}'"
                       " WHERE seq = 2")
    assert (await oplog.verify(pool)).ok
    await pool.execute("DELETE FROM card_oplog WHERE seq = 4")
    gone = await oplog.verify(pool)
    assert not gone.ok and gone.first_broken == 4 and "missing" in (gone.problem or "")
    await pool.execute("DELETE FROM card_oplog WHERE seq >= 4")
    tail = await oplog.verify(pool)
    assert not tail.ok and tail.first_broken == 4
    # a whole log deleted, head and all, beside the batches it ordered
    await pool.execute("DELETE FROM card_oplog")
    await pool.execute("DELETE FROM card_oplog_head")
    assert (await oplog.verify(pool)).ok  # nothing ordered yet: an empty log is right
    await _batch(pool)
    wiped = await oplog.verify(pool)
    assert not wiped.ok and wiped.first_broken == 1 and "deleted" in (wiped.problem or "")


def _new_card_file(path: Path, n: int) -> list[str]:
    serials = [make_serial("130225", 100 + i) for i in range(n)]
    body = "".join(new_card_record(s, 10000, "AB" * 16) for s in serials).encode()
    path.write_bytes(new_card_header(batch_id=7, face_value=10000, count=n, manufacturer="acme",
                                     created="2025-01-01T00:00:00+00:00", print_kcv="5ECA62",
                                     expiry="2028-01-01")
                     + body + trailer(n, n * 10000, hashlib.sha256(body).hexdigest()))
    return serials


def test_manufacturer_defects_are_reconciled_exactly(tmp_path: Path) -> None:
    ncf = tmp_path / "b.ncf"
    serials = _new_card_file(ncf, 250)
    out = tmp_path / "b.cbf"
    summary = manufacture(ncf, out, missing=3, unexpected=2, damaged=4, changed_face=5, seed=7)
    assert summary.delivered == 250 - 3 + 2
    with pytest.raises(ValueError, match="at most 1000 unexpected"):  # not gigabytes of strays
        manufacture(ncf, tmp_path / "x.cbf", unexpected=5_000_000_000)
    cbf = parse_card_back(out.read_bytes())
    # a duplicate, made by hand
    records = [*cbf.records, cbf.records[10]]
    rec = reconcile(batch_id=7, prefix="130225", first_seq=100, quantity=250, face_value=10000,
                    records=records)
    by_kind: dict[str, set[str]] = {}
    for d in rec.discrepancies:
        by_kind.setdefault(d.kind, set()).add(d.serial)
    assert by_kind["missing"] == set(summary.missing)
    assert by_kind["unexpected"] == set(summary.unexpected)
    assert by_kind["damaged"] == set(summary.damaged)
    assert by_kind["face_value_changed"] == set(summary.changed_face)
    assert by_kind["duplicate"] == {cbf.records[10].serial}
    assert rec.matched == 250 - 3 - 4 - 5 - 1
    assert set(rec.to_void()) <= set(serials)
    # a tampered file is refused
    raw = out.read_bytes().replace(b"|OK|", b"|DAMAGED|", 1)
    with pytest.raises(InvalidInput, match="digest"):
        parse_card_back(raw)
    assert manufacturer_main([str(ncf), "--out", str(tmp_path / "c.cbf"), "--damaged", "1"]) == 0
    clean = reconcile(batch_id=7, prefix="130225", first_seq=100, quantity=250,
                      face_value=10000,
                      records=parse_card_back((tmp_path / "c.cbf").read_bytes()).records)
    assert clean.counts() == {"missing": 0, "unexpected": 0, "damaged": 1,
                              "face_value_changed": 0, "duplicate": 0}


def _card_back_bytes(records: list[CardBackRecord], batch_id: int = 7) -> bytes:
    body = b"".join(card_back_record(r) for r in records)
    total = sum(r.face_value for r in records)
    return (card_back_header(batch_id=batch_id, count=len(records), manufacturer="acme",
                             created="2026-11-27T10:00:00+08:00") + body
            + f"T|{len(records)}|{total}|{hashlib.sha256(body).hexdigest()}\n".encode())


def test_card_back_records_are_columns_the_collector_does_not_walk() -> None:
    # a million-card file held as a million record objects cost every full pass of the
    # garbage collector a walk over them all, and their release in one go, each a stall of
    # tenths of a second of the node's event loop; as columns they are five objects
    records = [CardBackRecord(make_serial("130225", q), q // 100, q % 100,
                              "DAMAGED" if q % 7 == 0 else "OK", 10000) for q in range(20_000)]
    records.append(CardBackRecord("0000000000000000", 999_999_999_999_999_999,
                                  999_999_999_999_999_999, "OK", 10**17))  # the widest
    data = _card_back_bytes(records)
    gc.collect()
    before = len(gc.get_objects())
    cbf = parse_card_back(data)
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    # and they read back as they were written, one record at a time or as a whole
    assert len(cbf.records) == len(records)
    assert list(cbf.records) == records
    assert cbf.records[-1] == records[-1] and cbf.records[-1].serial == "0000000000000000"
    assert list(cbf.records[10:13]) == records[10:13]
    assert cbf.records == CardBackRecords(records) and cbf.records != CardBackRecords()
    assert repr(cbf.records) == "<CardBackRecords: 20001>"


async def test_a_large_card_back_file_gives_the_event_loop_turns() -> None:
    # a node parses and reconciles a card-back file on the loop that answers its payments:
    # both let the loop run every SLICE records, instead of holding it for seconds
    n = 10 * SLICE
    records = [CardBackRecord(make_serial("130225", q), 1, 1, "OK", 10000)
               for q in range(1, n + 1)]
    parser = CardBackParser()
    async with LoopTurns() as turns:
        await feed_card_back(parser, _card_back_bytes(records).splitlines(keepends=True))
    assert turns.count >= 9, turns.count
    assert len(parser.result().records) == n
    # the reconciliation yields as often, over the file's records and over the serials the
    # file lacks, and comes to the same answer as run through at once
    kw = dict(batch_id=7, prefix="130225", first_seq=1, quantity=2 * n, face_value=10000)
    steps = reconcile_steps(**kw, records=records, slice_=SLICE)  # type: ignore[arg-type]
    yields = 0
    while True:
        try:
            next(steps)
            yields += 1
        except StopIteration as done:
            stepped = done.value
            break
    assert yields >= 19, yields
    assert stepped == reconcile(**kw, records=records)  # type: ignore[arg-type]
    assert stepped.counts()["missing"] == n and stepped.matched == n


async def test_a_large_range_is_expanded_with_turns_for_the_event_loop() -> None:
    # a void or a stocktake may name a million cards by range: expanded in one go it held the
    # node's payments for 1.4 s
    first, last = make_serial("130225", 1), make_serial("130225", 5 * SLICE)
    async with LoopTurns() as turns:
        out = await workflow.cards_of({"ranges": [{"first": first, "last": last}],
                                       "serials": [make_serial("130226", 7)]})
    assert turns.count >= 4, turns.count
    assert len(out) == 5 * SLICE + 1 and out[0] == make_serial("130226", 7)
    assert out[1:] == [make_serial("130225", q) for q in range(1, 5 * SLICE + 1)]
    with pytest.raises(InvalidInput, match="at most 100 cards"):
        await workflow.cards_of({"ranges": [{"first": first, "last": last}]}, limit=100)
    # as many turns when the cards come as many ranges, each shorter than a slice
    short = [{"first": make_serial("130227", q), "last": make_serial("130227", q + 9)}
             for q in range(1, 5 * SLICE, 10)]
    async with LoopTurns() as turns:
        out = await workflow.cards_of({"ranges": short})
    assert len(out) == 5 * SLICE and turns.count >= 4, turns.count


def test_render_progress() -> None:
    line = render_progress({"done": 250, "total": 1000, "state": "running",
                            "kind": "batch.generate"}, width=20)
    assert line.startswith("[#####---------------]  25.0%  250/1000  running")


async def test_users_add_and_cli(pool: asyncpg.Pool) -> None:
    import io

    u = await add_user(pool, "carol", "cashier", "H1", "s3cret-pass")
    assert u.hall == "H1"
    with pytest.raises(InvalidInput):
        await add_user(pool, "dave", "cashier", None, "s3cret-pass")
    with pytest.raises(InvalidInput):
        await add_user(pool, "dave", "wizard", None, "s3cret-pass")
    rc = await main_users_add(["erin", "--role", "auditor", "--password-stdin"], pool,
                              stdin=io.StringIO("another-pass\n"))
    assert rc == 0
    row = await pool.fetchrow("SELECT role, hall, password_hash FROM card_users"
                              " WHERE username = 'erin'")
    assert row is not None
    assert row["role"] == "auditor" and row["hall"] is None
    assert row["password_hash"].startswith("$argon2id$")
    assert "another-pass" not in row["password_hash"]
    # each is in the operation log (who may approve is part of maker-checker), with the
    # role it replaced, and never a password or its hash
    await add_user(pool, "carol", "approver", None, "other-pass-2", actor="root")
    entries = await oplog.entries(pool, limit=100)
    added = [(e["actor"], e["objects"], e["result"]) for e in entries
             if e["action"] == "user.add"]
    assert added[0] == ("cli", {"username": "carol", "role": "cashier", "hall": "H1"},
                        {"ok": True, "created": True})
    assert added[-1] == ("root", {"username": "carol", "role": "approver", "hall": None},
                         {"ok": True, "created": False, "role_before": "cashier",
                          "hall_before": "H1", "was_disabled": False})
    assert [e[1]["username"] for e in added] == ["carol", "erin", "carol"]
    text = orjson.dumps(entries).decode()
    assert "pass" not in text and "argon2" not in text
    assert (await oplog.verify(pool)).ok


async def test_the_log_check_sees_no_tampering_while_the_log_grows(pool: asyncpg.Pool) -> None:
    # its pages and its head record were read apart: an entry appended in between looked
    # like entries deleted at the end of the log
    stop = asyncio.Event()

    async def writer() -> None:
        i = 0
        while not stop.is_set():
            async with pool.acquire() as conn:
                await oplog.append(conn, actor="x", action="probe", objects={"i": i},
                                   result={"ok": True})
            i += 1

    tasks = [asyncio.create_task(writer()) for _ in range(2)]
    try:
        alarms = [v for v in [await oplog.verify(pool, page=7) for _ in range(150)]
                  if not v.ok]
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert alarms == []
    assert (await oplog.verify(pool)).entries > 150


async def test_job_writes_are_fenced_by_the_lease_epoch(pool: asyncpg.Pool) -> None:
    from switch import db
    from switch.cards import batches

    bid = await _batch(pool)
    serials = [make_serial("130225", q) for q in (1, 2, 3)]
    await pool.execute("UPDATE card_batches SET status = 'reconciled', quantity = 3"
                       " WHERE id = $1", bid)
    await pool.executemany(
        "INSERT INTO cards (serial, batch_id, face_value, state, location, expiry, tag)"
        " VALUES ($1, $2, 10000, 'produced', 'manufacturer', $3, $4)",
        [(s, bid, dt.date.today() + dt.timedelta(days=365), bytes(32)) for s in serials])
    epoch = int(await pool.fetchval("SELECT epoch FROM node_lease"))
    await pool.execute("UPDATE node_lease SET epoch = epoch + 1")  # another node took over
    with pytest.raises(Exception) as e:
        await batches.stock_in(pool, bid, actor="t", epoch=epoch)
    assert db.is_fenced(e.value), e.value
    assert [await _state(pool, s) for s in serials] == ["produced"] * 3
    out = await batches.stock_in(pool, bid, actor="t", epoch=epoch + 1)
    assert out["stocked_in"] == 3


async def test_a_stale_node_s_job_records_nothing_of_its_end(pool: asyncpg.Pool) -> None:
    # a node paused in the middle of a job wakes up after another took the lease: its job is
    # cancelled, and it overwrote what the new node had recorded ("interrupted") and logged
    # the job's end in the operation log
    import asyncio

    from switch.cards import jobs

    epoch = int(await pool.fetchval("SELECT epoch FROM node_lease"))
    job_id = await jobs.create_job(pool, "batch.generate", total=10, actor="t", epoch=epoch)
    started = asyncio.Event()

    async def body(p: jobs.Progress) -> dict[str, object]:
        p.add(4)
        started.set()
        await asyncio.sleep(30)  # the node is paused here
        return {}

    runner = jobs.JobRunner(pool)
    runner.start(job_id, 10, body, epoch=epoch)
    await asyncio.wait_for(started.wait(), 5)
    await pool.execute("UPDATE node_lease SET epoch = epoch + 1")  # another node took over
    assert await jobs.fail_interrupted(pool) == 1  # which marks the orphaned job
    logged = await pool.fetchval("SELECT count(*) FROM card_oplog")
    await runner.close()  # the stale node's job is cancelled
    row = await pool.fetchrow("SELECT state, error FROM card_jobs WHERE id = $1", job_id)
    assert row is not None and (row["state"], row["error"]) == ("failed", "interrupted")
    assert await pool.fetchval("SELECT count(*) FROM card_oplog") == logged


async def test_a_node_whose_lease_moved_on_fails_no_job(pool: asyncpg.Pool) -> None:
    """A node paused right after taking the lease wakes up after another took it: its
    activation must not fail the jobs the new holder runs (nor their batches)."""
    from switch import db
    from switch.cards import jobs

    bid = await _batch(pool)
    stale = int(await pool.fetchval("SELECT epoch FROM node_lease"))
    await pool.execute("UPDATE node_lease SET epoch = epoch + 1")  # another node took over
    theirs = await jobs.create_job(pool, "batch.generate", total=1, actor="t")
    await pool.execute("UPDATE card_batches SET status = 'generating', generate_job = $2"
                       " WHERE id = $1", bid, theirs)
    with pytest.raises(asyncpg.PostgresError) as e:
        await jobs.fail_interrupted(pool, epoch=stale)
    assert db.is_fenced(e.value)
    assert await pool.fetchval("SELECT state FROM card_jobs WHERE id = $1", theirs) == "queued"
    assert await pool.fetchval("SELECT status FROM card_batches WHERE id = $1",
                               bid) == "generating"


async def test_a_node_taking_over_fails_only_the_jobs_it_does_not_run(pool: asyncpg.Pool) -> None:
    # a node takes requests as soon as it is active, before its activation hooks run: a job
    # (and the batch it generates) begun in between was failed as if orphaned
    from switch.cards import jobs

    bid = await _batch(pool)
    mine = await jobs.create_job(pool, "batch.generate", total=1, actor="t")
    orphan = await jobs.create_job(pool, "batch.generate", total=1, actor="t")
    await pool.execute("UPDATE card_batches SET status = 'generating', generate_job = $2"
                       " WHERE id = $1", bid, mine)
    assert await jobs.fail_interrupted(pool, {mine}) == 1
    states = {r["id"]: r["state"] for r in await pool.fetch("SELECT id, state FROM card_jobs")}
    assert states == {mine: "queued", orphan: "failed"}
    assert await pool.fetchval("SELECT status FROM card_batches WHERE id = $1",
                               bid) == "generating"
    assert await jobs.fail_interrupted(pool) == 1  # no longer running here: orphaned
    assert await pool.fetchval("SELECT status FROM card_batches WHERE id = $1",
                               bid) == "failed"
