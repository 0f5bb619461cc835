"""The IVR channel end to end: a real node, PostgreSQL, Redis, the HSM simulator, the
marketing simulator, real HTTP, and the IVR-server simulator building real format-4 PIN blocks.

One node serves the whole module (starting one takes a while); every test uses its own cards,
caller numbers and accounts, so that tests do not see each other's counters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import itertools
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from crypto.voucher import voucher_tag
from hsm_sim.server import load_dev_settings, start_server
from switch.cards.serials import make_serial
from switch.ivr.simulator import IvrSimulator, IvrSimulatorError, spoken_digits
from switch.keys import load_dev_keys
from switch.node import Node
from tests.nodekit import Api, Sims, active_account, api_key, running_node, simulators

DEV = load_dev_keys()
VVK = DEV.voucher_verification_key
assert VVK is not None
_SEQ = itertools.count(1)
_ANI = itertools.count(13800000001)
_ACCT = itertools.count(0)


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def sims() -> AsyncIterator[Sims]:
    async with simulators() as s:
        yield s
        s.hsm.close()  # a test restarts the HSM: close the one running now
        await s.hsm.wait_closed()


async def _fresh(database_url: str, redis_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'schema_migrations'")]
        await conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables)
                           + " RESTART IDENTITY CASCADE")
        await conn.execute("INSERT INTO node_lease (id) VALUES (1) ON CONFLICT DO NOTHING")
        await conn.execute("INSERT INTO mirror_sync (id) VALUES (1) ON CONFLICT DO NOTHING")
    finally:
        await conn.close()
    r = aioredis.from_url(redis_url)
    try:
        await r.flushdb()
    finally:
        await r.aclose()


@pytest.fixture(scope="module")
async def node(migrated: str, redis_url: str, sims: Sims,
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Node]:
    await _fresh(migrated, redis_url)
    async with running_node(migrated, redis_url, sims, tmp_path_factory.mktemp("ivr")) as n:
        await asyncio.wait_for(n.components["accounts"].synced.wait(), 20)
        yield n


@pytest.fixture(scope="module")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture(scope="module")
async def ivr_key(node: Node) -> str:
    return await api_key(node.pool, "ivr", "ivr-server")


@pytest.fixture
async def ivr(node: Node, ivr_key: str, session: aiohttp.ClientSession,
              sims: Sims) -> AsyncIterator[IvrSimulator]:
    await sims.marketing.clear_faults()
    async with IvrSimulator(f"http://127.0.0.1:{node.ports.http}", ivr_key, DEV.ivr_pin_key,
                            session=session) as sim:
        yield sim


@pytest.fixture
def raw(node: Node, ivr_key: str, session: aiohttp.ClientSession) -> Api:
    return Api(session, f"http://127.0.0.1:{node.ports.http}", ivr_key)


# --- helpers -----------------------------------------------------------------------------------

def new_pin() -> str:
    return f"{secrets.randbelow(10**12):012d}"


async def make_card(node: Node, *, state: str = "sold", face: int = 10000,
                    expired: bool = False) -> tuple[str, str]:
    """A card in `state` with a known PIN (its tag computed as the HSM does, under the dev
    VVK)."""
    assert VVK is not None
    seq = next(_SEQ)
    serial = make_serial("130225", seq)
    pin = new_pin()
    today = dt.date.today()
    expiry = today - dt.timedelta(days=1) if expired else today + dt.timedelta(days=365)
    batch_id = await node.pool.fetchval(
        "INSERT INTO card_batches (face_value, quantity, expiry, manufacturer, prefix,"
        " first_seq, ordered_by, status) VALUES ($1, 1, $2, 'acme', '130225', $3, 'test',"
        " 'stocked') RETURNING id", face, expiry, seq)
    await node.pool.execute(
        "INSERT INTO cards (serial, batch_id, face_value, state, location, expiry, tag)"
        " VALUES ($1, $2, $3, $4, 'H1', $5, $6)",
        serial, batch_id, face, state, expiry, voucher_tag(VVK, serial, pin))
    return serial, pin


def ani() -> str:
    return str(next(_ANI))


async def account(sims: Sims) -> str:
    return await active_account(sims.marketing, start=next(_ACCT))


def ids(turn: dict[str, Any]) -> list[str]:
    return [p["id"] for p in turn["prompts"]]


async def to_step(ivr: IvrSimulator, caller: str, acct: str, step: str,
                  serial: str | None = None, pin: str | None = None) -> tuple[str, dict[str, Any]]:
    """A new call walked to `step` (enter_card_serial, enter_pin or confirm_recharge)."""
    t = await ivr.start(caller, "zh")
    call_id = t["call_id"]
    assert t["step"] == "menu", t
    t = await ivr.send_digits(call_id, "1")
    t = await ivr.send_digits(call_id, acct + "#")
    assert t["step"] == "confirm_account", t
    t = await ivr.send_digits(call_id, "1")
    assert t["step"] == "enter_card_serial"
    if step == "enter_card_serial":
        return call_id, t
    assert serial is not None
    t = await ivr.send_digits(call_id, serial)
    assert t["step"] == "enter_pin", t
    if step == "enter_pin":
        return call_id, t
    assert pin is not None
    t = await ivr.send_pin(call_id, serial, pin)
    assert t["step"] == "confirm_recharge", t
    return call_id, t


async def drain(node: Node, within_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        if await node.pool.fetchval("SELECT count(*) FROM outbox WHERE state <> 'sent'") == 0:
            return
        node.components["forwarder"].wake()
        await asyncio.sleep(0.05)
    raise AssertionError("outbox did not drain")


async def market_balance(sims: Sims, acct: str) -> tuple[int, int]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{sims.marketing.url}/accounts/{acct}") as r:
            doc = await r.json()
    return int(doc["arrears"]), int(doc["prepaid_balance"])


def redemptions(node: Node) -> float:
    return node.metrics.registry.get_sample_value("gridpay_card_redemptions_total") or 0.0


async def card_row(node: Node, serial: str) -> asyncpg.Record:
    row = await node.pool.fetchrow(
        "SELECT state, failed_pin_count FROM cards WHERE serial = $1", serial)
    assert row is not None
    return row


# --- the happy path ----------------------------------------------------------------------------

async def test_recharge_is_credited_once(node: Node, ivr: IvrSimulator, sims: Sims) -> None:
    serial, pin = await make_card(node, face=20000)
    acct = await account(sims)
    arrears, prepaid = await market_balance(sims, acct)
    redeemed_before = redemptions(node)
    result = await ivr.recharge(ani(), acct, serial, pin, lang="zh")
    assert result.ok, result.outcome
    # the result turn: amount, expected balance or arrears, transaction number, then 1/9
    turn = result.turns[-2]
    assert turn["step"] == "result"
    assert ids(turn)[0] == "result_credited" and "二百元整" in turn["prompts"][0]["text"]
    exp_arrears, exp_prepaid = max(0, arrears - 20000), prepaid + max(0, 20000 - arrears)
    assert ids(turn)[1] == ("result_arrears" if exp_arrears else "result_prepaid")
    assert ids(turn)[2:] == ["result_txn", "result_menu"]
    assert result.last["step"] == "goodbye" and result.last["hangup"] is True
    pay = await node.pool.fetchrow(
        "SELECT id, receipt_no, amount, channel, method, card_serial, caller FROM payments"
        " WHERE card_serial = $1", serial)
    assert pay is not None and pay["receipt_no"] == result.receipt_no
    assert (pay["amount"], pay["channel"], pay["method"]) == (20000, "ivr", "card")
    assert (await card_row(node, serial))["state"] == "redeemed"
    line = await node.pool.fetchrow("SELECT * FROM card_recharges WHERE serial = $1", serial)
    assert line is not None and line["txn_no"] == pay["receipt_no"]
    assert line["account_no"] == acct and line["payment_id"] == pay["id"]
    assert redemptions(node) == redeemed_before + 1
    # the recharge ledger of a day goes by business date (which moves at the cut-over): a
    # recharge whose payment belongs to the next business date is in that day's ledger
    from switch.cards.workflow import recharges

    tz = str(node.settings.business.timezone)
    bdate = await node.pool.fetchval("SELECT business_date FROM payments WHERE id = $1",
                                     pay["id"])
    listed = await recharges(node.pool, bdate.isoformat(), tz)
    assert serial in [r["serial"] for r in listed["recharges"]]
    await node.pool.execute("UPDATE payments SET business_date = business_date + 1"
                            " WHERE id = $1", pay["id"])
    try:
        later = await recharges(node.pool, (bdate + dt.timedelta(days=1)).isoformat(), tz)
        assert serial in [r["serial"] for r in later["recharges"]]
        assert serial not in [r["serial"] for r in
                              (await recharges(node.pool, bdate.isoformat(), tz))["recharges"]]
    finally:
        await node.pool.execute("UPDATE payments SET business_date = business_date - 1"
                                " WHERE id = $1", pay["id"])
    await drain(node)
    posting = await node.pool.fetchval(
        "SELECT posting_id FROM outbox WHERE payment_id = $1", pay["id"])
    assert sims.marketing.ledger.posting(posting) is not None
    after = await market_balance(sims, acct)
    assert after == (exp_arrears, exp_prepaid)  # credited once, oldest bills first


async def test_english_dialog_and_balance(node: Node, ivr: IvrSimulator, sims: Sims) -> None:
    acct = await account(sims)
    t = await ivr.start(ani(), "en")
    assert ids(t) == ["welcome", "menu"] and t["collect"]["kind"] == "digits"
    call_id = t["call_id"]
    t = await ivr.send_digits(call_id, "2")
    assert t["step"] == "enter_account"
    assert t["collect"] == {"kind": "digits", "min": 10, "max": 10, "terminator": "#",
                            "timeout_s": 15}
    t = await ivr.send_digits(call_id, acct + "#")
    assert t["step"] == "balance" and ids(t) == ["balance", "balance_menu"]
    spoken = t["prompts"][0]["text"]
    assert "yuan" in spoken and spoken_digits(spoken.split(",")[0], "en") == acct
    t = await ivr.send_digits(call_id, "9")
    assert t["step"] == "goodbye" and t["hangup"] and t["collect"]["kind"] == "none"


async def test_agent_transfer_hangs_up(node: Node, ivr: IvrSimulator) -> None:
    t = await ivr.start(ani())
    t = await ivr.send_digits(t["call_id"], "0")
    assert t["step"] == "agent" and ids(t) == ["agent_transfer"] and t["hangup"]


# --- card states -------------------------------------------------------------------------------

@pytest.mark.parametrize(("state", "prompt"), [
    ("in_stock", "card_not_sold"), ("issued", "card_not_sold"), ("redeemed", "card_used"),
    ("voided", "card_voided"), ("expired", "card_expired"), ("locked", "card_locked"),
    ("sold-past-expiry", "card_expired"), ("unknown", "card_not_found"),
    ("bad-check-digit", "serial_invalid"),
])
async def test_card_state_branches(node: Node, ivr: IvrSimulator, sims: Sims, state: str,
                                   prompt: str) -> None:
    if state == "unknown":
        serial = make_serial("130225", 900_000_000 + next(_SEQ))
    elif state == "bad-check-digit":
        good, _ = await make_card(node)
        serial = good[:15] + str((int(good[15]) + 1) % 10)
    elif state == "sold-past-expiry":
        serial, _ = await make_card(node, expired=True)
    else:
        serial, _ = await make_card(node, state=state)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "enter_card_serial")
    t = await ivr.send_digits(call_id, serial + "#")
    assert t["step"] == "enter_card_serial" and ids(t) == [prompt, "enter_card_serial"]
    assert t["hangup"] is False
    assert await node.pool.fetchval("SELECT count(*) FROM payments WHERE card_serial = $1",
                                    serial) == 0
    if state == "sold-past-expiry":  # said expired, and marked so, as every other path does
        assert (await card_row(node, serial))["state"] == "expired"
        assert await node.pool.fetchval(
            "SELECT actor FROM card_events WHERE serial = $1 AND to_state = 'expired'",
            serial) == "ivr"


async def test_a_card_that_expired_before_its_confirmation_is_marked_expired(
        node: Node, ivr: IvrSimulator, sims: Sims) -> None:
    serial, pin = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "confirm_recharge", serial, pin)
    await node.pool.execute("UPDATE cards SET expiry = current_date - 1 WHERE serial = $1",
                            serial)
    t = await ivr.send_digits(call_id, "1")
    assert "card_expired" in ids(t), t
    assert (await card_row(node, serial))["state"] == "expired"
    assert await node.pool.fetchval(
        "SELECT actor FROM card_events WHERE serial = $1 AND to_state = 'expired'",
        serial) == "ivr"


# --- limits ------------------------------------------------------------------------------------

async def test_three_wrong_pins_end_the_call(node: Node, ivr: IvrSimulator, sims: Sims) -> None:
    serial, pin = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "enter_pin", serial)
    t = await ivr.send_pin(call_id, serial, "000000000000")
    assert ids(t) == ["pin_wrong", "enter_pin"] and "两次" in t["prompts"][0]["text"]
    t = await ivr.send_pin(call_id, serial, "000000000001")
    assert ids(t) == ["pin_wrong", "enter_pin"] and "一次" in t["prompts"][0]["text"]
    t = await ivr.send_pin(call_id, serial, "000000000002")
    assert ids(t) == ["pin_too_many", "goodbye"] and t["hangup"] is True
    row = await card_row(node, serial)
    assert (row["state"], row["failed_pin_count"]) == ("sold", 3)
    with pytest.raises(IvrSimulatorError) as e:
        await ivr.send_pin(call_id, serial, pin)
    assert (e.value.status, e.value.code) == (409, "call_ended")


async def test_card_locks_at_five_across_calls(node: Node, ivr: IvrSimulator,
                                               sims: Sims) -> None:
    serial, pin = await make_card(node)
    acct = await account(sims)
    caller = ani()
    call_id, _ = await to_step(ivr, caller, acct, "enter_pin", serial)
    for i in range(3):
        t = await ivr.send_pin(call_id, serial, f"11111111111{i}")
    assert t["hangup"]
    call_id, _ = await to_step(ivr, caller, acct, "enter_pin", serial)
    t = await ivr.send_pin(call_id, serial, "222222222222")
    assert ids(t) == ["pin_wrong", "enter_pin"] and "一次" in t["prompts"][0]["text"]
    t = await ivr.send_pin(call_id, serial, "222222222223")
    assert ids(t) == ["card_locked_now", "goodbye"] and t["hangup"]
    row = await card_row(node, serial)
    assert (row["state"], row["failed_pin_count"]) == ("locked", 5)
    events = await node.pool.fetch(
        "SELECT to_state, doc_type FROM card_events WHERE serial = $1 ORDER BY id", serial)
    assert events[-1]["to_state"] == "locked" and events[-1]["doc_type"] == "call"
    # even the right PIN cannot use it now: the serial step says it is locked
    call_id, _ = await to_step(ivr, ani(), acct, "enter_card_serial")
    t = await ivr.send_digits(call_id, serial)
    assert ids(t)[0] == "card_locked"


async def test_parallel_calls_cannot_exceed_the_card_limit(node: Node, ivr: IvrSimulator,
                                                          sims: Sims) -> None:
    serial, _ = await make_card(node)
    acct = await account(sims)
    calls = [await to_step(ivr, ani(), acct, "enter_pin", serial) for _ in range(4)]

    async def up_to_two_wrong(call_id: str) -> list[str]:
        said: list[str] = []
        for i in range(2):
            said.append(ids(await ivr.send_pin(call_id, serial, f"99999999999{i}"))[0])
            if said[-1] != "pin_wrong":
                break
        return said

    results = await asyncio.gather(*(up_to_two_wrong(c) for c, _ in calls))
    row = await card_row(node, serial)
    assert (row["state"], row["failed_pin_count"]) == ("locked", 5)
    said = [p for r in results for p in r]
    assert said.count("pin_wrong") == 4
    assert said.count("card_locked_now") == 1  # the fifth, whichever call it was
    assert set(said) <= {"pin_wrong", "card_locked_now", "card_locked"}


async def test_a_right_pin_among_parallel_guesses_is_not_confirmed_past_the_card_limit(
        node: Node, ivr: IvrSimulator, sims: Sims) -> None:
    """Eleven wrong PINs and the right one at once, each from its own call and number: no
    guess is verified once the card has locked, so the right one is told the card is locked,
    whichever moment it came."""
    serial, pin = await make_card(node)
    acct = await account(sims)
    calls = [(await to_step(ivr, ani(), acct, "enter_pin", serial))[0] for _ in range(12)]
    wrong = [f"{(int(pin) + k) % 10**12:012d}" for k in range(1, 12)]
    turns = await asyncio.gather(*(ivr.send_pin(c, serial, w) for c, w in zip(calls, wrong)),
                                 ivr.send_pin(calls[11], serial, pin))
    row = await card_row(node, serial)
    assert (row["state"], row["failed_pin_count"]) == ("locked", 5)
    said = [ids(t)[0] for t in turns]
    assert said.count("pin_wrong") + said.count("card_locked_now") + (
        said[-1] == "confirm_recharge") == 5  # five verified, the lock's included
    if said[-1] == "confirm_recharge":  # the right one came among the first five: fine
        assert said.count("card_locked_now") == 0 and said.count("pin_wrong") == 4
    else:
        assert said.count("card_locked_now") == 1 and said[-1] == "card_locked"
    assert said.count("card_locked") == 12 - 5


async def test_parallel_guesses_from_one_number_stop_at_its_daily_limit(
        node: Node, ivr: IvrSimulator, sims: Sims) -> None:
    """Fourteen wrong PINs on fourteen cards and the right one on a fifteenth, all at once
    from one number: ten are counted, the number is blocked, and no card is recharged from
    it after the block, whatever order they ran in."""
    caller = ani()
    acct = await account(sims)
    calls = []
    for _ in range(14):
        serial, pin = await make_card(node)
        call_id, _ = await to_step(ivr, caller, acct, "enter_pin", serial)
        calls.append((call_id, serial, f"{(int(pin) + 1) % 10**12:012d}"))
    good_serial, good_pin = await make_card(node)
    good_call, _ = await to_step(ivr, caller, acct, "enter_pin", good_serial)
    turns = await asyncio.gather(*(ivr.send_pin(c, s, p) for c, s, p in calls),
                                 ivr.send_pin(good_call, good_serial, good_pin))
    assert await node.pool.fetchval(
        "SELECT count(*) FROM ivr_pin_failures WHERE ani = $1", caller) == 10
    said = [ids(t)[0] for t in turns]
    # nine told wrong, the tenth told the number is blocked, and the four after it too
    assert said[:-1].count("pin_wrong") == 9 and said[:-1].count("ani_blocked") == 5
    assert len(node.components["ivr"]._pin_steps) == 0  # no lock kept once all are done
    if said[-1] != "confirm_recharge":  # (verified before the tenth wrong one, it may go on)
        assert said[-1] == "ani_blocked"
        assert (await card_row(node, good_serial))["state"] == "sold"


async def test_attempts_left_count_the_numbers_daily_limit(node: Node, ivr: IvrSimulator,
                                                            sims: Sims) -> None:
    """Eight wrong PINs from a number (two on each of four cards): the ninth, on a fifth card
    in a new call, leaves one attempt (the number's tenth blocks it), not the call's two."""
    caller = ani()
    acct = await account(sims)
    for _ in range(4):
        serial, _ = await make_card(node)
        call_id, _ = await to_step(ivr, caller, acct, "enter_pin", serial)
        for i in range(2):
            assert ids(await ivr.send_pin(call_id, serial, f"12341234123{i}"))[0] == "pin_wrong"
    serial, _ = await make_card(node)
    call_id, _ = await to_step(ivr, caller, acct, "enter_pin", serial)
    t = await ivr.send_pin(call_id, serial, "123412341239")
    assert ids(t) == ["pin_wrong", "enter_pin"]
    assert "一次" in t["prompts"][0]["text"], t["prompts"][0]


async def test_caller_number_blocked_after_ten_failures(node: Node, ivr: IvrSimulator,
                                                        sims: Sims) -> None:
    caller = ani()
    acct = await account(sims)
    said: list[str] = []
    for _ in range(2):  # two cards, five wrong PINs each, in calls of three and two
        serial, _ = await make_card(node)
        for tries in (3, 2):
            call_id, _ = await to_step(ivr, caller, acct, "enter_pin", serial)
            for i in range(tries):
                said.append(ids(await ivr.send_pin(call_id, serial, f"12341234123{i}"))[0])
    assert said[-1] == "ani_blocked" and said.count("ani_blocked") == 1
    assert await node.pool.fetchval(
        "SELECT failures FROM ivr_ani_blocks WHERE ani = $1 AND blocked_until > now()"
        " + interval '23 hours'", caller) == 10
    t = await ivr.start(caller)
    assert ids(t) == ["ani_blocked", "goodbye"] and t["hangup"]
    await node.redis.flushdb()  # Redis forgets everything; the block is in PostgreSQL
    t = await ivr.start(caller)
    assert ids(t) == ["ani_blocked", "goodbye"] and t["hangup"]
    t = await ivr.start(ani())  # another number is served
    assert t["step"] == "menu"


async def test_a_block_set_elsewhere_reaches_call_starts_and_the_pin_step(
        node: Node, ivr: IvrSimulator, sims: Sims) -> None:
    """A block written by the other node: the PIN step sees it at once (it asks the
    database), the start of a call once its copy of the blocks is read again."""
    svc = node.components["ivr"]
    caller = ani()
    acct = await account(sims)
    serial, pin = await make_card(node)
    call_id, _ = await to_step(ivr, caller, acct, "enter_pin", serial)  # reads the blocks now
    await node.pool.execute(
        "INSERT INTO ivr_ani_blocks (ani, failures, blocked_at, blocked_until)"
        " VALUES ($1, 10, now(), now() + interval '24 hours')", caller)
    assert ids(await ivr.send_pin(call_id, serial, pin))[0] == "ani_blocked"
    old = svc.blocks_refresh_s
    svc.blocks_refresh_s = 0.2
    try:
        await asyncio.sleep(0.3)
        t = await ivr.start(caller)
        assert ids(t) == ["ani_blocked", "goodbye"] and t["hangup"]
        await node.pool.execute("DELETE FROM ivr_ani_blocks WHERE ani = $1", caller)
        await asyncio.sleep(0.3)
        assert (await ivr.start(caller))["step"] == "menu"  # lifted: served again
    finally:
        svc.blocks_refresh_s = old
    assert (await card_row(node, serial))["state"] == "sold"


async def test_three_bad_inputs_in_a_row_end_the_call(node: Node, ivr: IvrSimulator) -> None:
    t = await ivr.start(ani())
    call_id = t["call_id"]
    t = await ivr.send_digits(call_id, "7")
    assert ids(t) == ["invalid_input", "menu"]
    t = await ivr.send_timeout(call_id)
    assert ids(t) == ["no_input", "menu"]
    t = await ivr.send_digits(call_id, "55")
    assert ids(t) == ["invalid_input", "too_many_attempts", "goodbye"] and t["hangup"]


# --- exactly once ------------------------------------------------------------------------------

async def test_two_calls_racing_with_one_card_redeem_once(node: Node, ivr: IvrSimulator,
                                                          sims: Sims) -> None:
    serial, pin = await make_card(node)
    a, _ = await to_step(ivr, ani(), await account(sims), "confirm_recharge", serial, pin)
    b, _ = await to_step(ivr, ani(), await account(sims), "confirm_recharge", serial, pin)
    ta, tb = await asyncio.gather(ivr.send_digits(a, "1"), ivr.send_digits(b, "1"))
    steps = sorted([(ta["step"], ids(ta)[0]), (tb["step"], ids(tb)[0])])
    assert steps == [("enter_card_serial", "card_used"), ("result", "result_credited")]
    assert await node.pool.fetchval(
        "SELECT count(*) FROM payments WHERE card_serial = $1", serial) == 1
    assert await node.pool.fetchval(
        "SELECT count(*) FROM card_recharges WHERE serial = $1", serial) == 1
    assert await node.pool.fetchval(
        "SELECT count(*) FROM outbox o JOIN payments p ON p.id = o.payment_id"
        " WHERE p.card_serial = $1", serial) == 1


async def test_card_changed_during_the_recharge_statement_records_nothing(
        node: Node, sims: Sims) -> None:
    """The recharge statement's snapshot sees the card sold, but another transaction locks
    it before the statement's update: the key would be won without the card moving, so the
    whole statement is aborted (both happen, or neither)."""
    from switch.ivr.service import _RECHARGE
    from switch.payments.ledger import PaymentRequest

    serial, _ = await make_card(node)
    acct = await account(sims)
    ledger = node.components["ledger"]
    request = PaymentRequest(
        kind="card_recharge", dedup_key=f"card:{serial}", request_hash=b"h" * 32,
        channel="ivr", method="card", account_no=acct, amount=10000, card_serial=serial,
        caller="5550001")
    async with node.pool.acquire() as locker, node.pool.acquire() as con:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("UPDATE cards SET state = 'locked' WHERE serial = $1", serial)
        # the gate's snapshot still sees 'sold'; the update waits for the locker
        recording = asyncio.ensure_future(
            ledger.record_one(con, request, _RECHARGE, serial, 10000, "ivr"))
        await asyncio.sleep(0.3)
        assert not recording.done()
        await tx.commit()
        with pytest.raises(asyncpg.PostgresError, match="nothing recorded") as raised:
            await recording
    assert raised.value.sqlstate == "GP002"
    assert (await card_row(node, serial))["state"] == "locked"
    for table, column in (("dedup_keys", "key"), ("payments", "dedup_key")):
        assert await node.pool.fetchval(
            f"SELECT count(*) FROM {table} WHERE {column} = $1", f"card:{serial}") == 0  # noqa: S608
    assert await node.pool.fetchval(
        "SELECT count(*) FROM card_recharges WHERE serial = $1", serial) == 0


async def test_hang_up_before_confirmation_changes_nothing(node: Node, ivr: IvrSimulator,
                                                           sims: Sims) -> None:
    serial, pin = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "confirm_recharge", serial, pin)
    t = await ivr.hangup(call_id)
    assert t == {"call_id": call_id, "step": "goodbye", "prompts": [],
                 "collect": {"kind": "none", "min": 0, "max": 0, "terminator": None,
                             "timeout_s": 0}, "hangup": True}
    assert await ivr.hangup(call_id) == t  # a retried hang-up: the same answer
    assert (await card_row(node, serial))["state"] == "sold"
    assert await node.pool.fetchval(
        "SELECT count(*) FROM payments WHERE card_serial = $1", serial) == 0
    with pytest.raises(IvrSimulatorError) as e:
        await ivr.send_digits(call_id, "1")
    assert e.value.code == "call_ended"
    # the card is still good for another call
    assert (await ivr.recharge(ani(), await account(sims), serial, pin)).ok


async def test_hang_up_after_confirmation_keeps_the_recharge(node: Node, ivr: IvrSimulator,
                                                             sims: Sims) -> None:
    serial, pin = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "confirm_recharge", serial, pin)
    t = await ivr.send_digits(call_id, "1")
    assert t["step"] == "result"
    await ivr.hangup(call_id)
    assert (await card_row(node, serial))["state"] == "redeemed"
    assert await node.pool.fetchval(
        "SELECT count(*) FROM payments WHERE card_serial = $1", serial) == 1


async def test_retried_confirmation_gets_the_original_result(node: Node, raw: Api,
                                                             ivr: IvrSimulator,
                                                             sims: Sims) -> None:
    serial, pin = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "confirm_recharge", serial, pin)
    key = f"ivr:call:{call_id}"
    before = await node.redis.hgetall(key)
    path = f"/ivr/v1/calls/{call_id}/input"
    st1, _, b1 = await raw.call("POST", path, json={"digits": "1"}, idem="confirm-1")
    st2, h2, b2 = await raw.call("POST", path, json={"digits": "1"}, idem="confirm-1")
    assert (st1, st2) == (200, 200) and b1 == b2 and h2.get("Idempotent-Replayed") == "true"
    st3, _, b3 = await raw.call("POST", path, json={"digits": "9"}, idem="confirm-1")
    assert st3 == 422 and orjson.loads(b3)["code"] == "idempotency_key_reused"
    # the answer was lost AND the call state went back (e.g. a failover before it was saved):
    # the same call confirming again finds its own payment and hears the same result
    await node.redis.delete(key)
    await node.redis.hset(key, mapping=cast(Any, before))
    st4, _, b4 = await raw.call("POST", path, json={"digits": "1"})
    assert st4 == 200
    assert orjson.loads(b4)["prompts"] == orjson.loads(b1)["prompts"]
    assert await node.pool.fetchval(
        "SELECT count(*) FROM payments WHERE card_serial = $1", serial) == 1


async def test_state_flushed_during_the_confirmation_still_answers_the_result(
        node: Node, ivr: IvrSimulator, sims: Sims) -> None:
    """Redis loses the call while the confirmed recharge commits: the caller still hears it."""
    serial, pin = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "confirm_recharge", serial, pin)
    async with node.pool.acquire() as holder:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM cards WHERE serial = $1 FOR UPDATE", serial)
        confirm = asyncio.create_task(ivr.send_digits(call_id, "1"))
        await asyncio.sleep(0.5)  # the turn is now waiting for the card row
        await node.redis.flushdb()
        await tx.rollback()
    t = await asyncio.wait_for(confirm, 15)
    assert t["step"] == "result", t
    assert (await card_row(node, serial))["state"] == "redeemed"
    assert await node.pool.fetchval(
        "SELECT count(*) FROM payments WHERE card_serial = $1", serial) == 1


async def test_marketing_down_recharge_accepted_then_credited_once(
        node: Node, ivr: IvrSimulator, sims: Sims) -> None:
    serial, pin = await make_card(node, face=5000)
    acct = await account(sims)
    arrears, prepaid = await market_balance(sims, acct)
    await sims.marketing.set_faults(error_rate=1.0)
    try:
        result = await ivr.recharge(ani(), acct, serial, pin, lang="en")
        assert result.ok, result.outcome
        await asyncio.sleep(0.3)
        pid = await node.pool.fetchval("SELECT id FROM payments WHERE card_serial = $1", serial)
        assert await node.pool.fetchval(
            "SELECT state FROM outbox WHERE payment_id = $1", pid) == "pending"
    finally:
        await sims.marketing.clear_faults()
    await node.pool.execute("UPDATE outbox SET next_attempt_at = now() WHERE state = 'pending'")
    await drain(node)
    assert await market_balance(sims, acct) == (max(0, arrears - 5000),
                                                prepaid + max(0, 5000 - arrears))


# --- malformed input ---------------------------------------------------------------------------

async def test_malformed_requests_are_refused_and_change_nothing(
        node: Node, raw: Api, ivr: IvrSimulator, sims: Sims) -> None:
    serial, _ = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "enter_pin", serial)
    key = f"ivr:call:{call_id}"
    before = await node.redis.hgetall(key)
    path = f"/ivr/v1/calls/{call_id}/input"
    cases: list[tuple[Any, str]] = [
        ({"digits": "12ab"}, "invalid_digits"), ({"digits": "1" * 33}, "invalid_digits"),
        ({"digits": ""}, "invalid_digits"), ({"digits": 5}, "invalid_digits"),
        ({"digits": "12\n"}, "invalid_digits"), ({"pin_block": "00" * 16 + "\n"},
                                                  "invalid_pin_block"),
        ({"pin_block": "00" * 15}, "invalid_pin_block"),
        ({"pin_block": "zz" * 16}, "invalid_pin_block"),
        ({"pin_block": "00" * 17}, "invalid_pin_block"),
        ({"digits": "1", "pin_block": "00" * 16}, "invalid_input"), ({}, "invalid_input"),
        ({"event": "hangup"}, "invalid_event"), ({"digits": "1", "x": 1}, "unknown_field"),
        ({"digits": "1", "0F0F1A2B3C4D5E6F": 1}, "unknown_field"),  # a PIN block as a name
        ([1, 2], "malformed_json"),
    ]
    for body, code in cases:
        st, h, b = await raw.call("POST", path, json=body)
        assert st == 400, (body, st)
        assert b"0F0F1A2B3C4D5E6F" not in b  # nothing sent is echoed
        assert h["Content-Type"].startswith("application/problem+json")
        assert orjson.loads(b)["code"] == code
    st, _, b = await raw.call("POST", "/ivr/v1/calls/no-such-call/input", json={"digits": "1"})
    assert st == 404 and orjson.loads(b)["code"] == "call_not_found"
    st, _, b = await raw.call("DELETE", "/ivr/v1/calls/no-such-call")
    assert st == 404 and orjson.loads(b)["code"] == "call_not_found"
    st, _, b = await raw.call("POST", "/ivr/v1/calls/bad%20id/input", json={"digits": "1"})
    assert st == 400 and orjson.loads(b)["code"] == "invalid_call_id"
    st, _, b = await raw.call("POST", path, json={"digits": "1"}, idem="bad key!")
    assert st == 400
    assert await node.redis.hgetall(key) == before  # nothing changed
    assert (await card_row(node, serial))["failed_pin_count"] == 0
    # digits where a PIN block is expected: a clear turn, nothing counted against the card
    t = await ivr.send_digits(call_id, "123456789012")
    assert ids(t) == ["invalid_input", "enter_pin"]
    assert (await card_row(node, serial))["failed_pin_count"] == 0
    # a 32-hex block that is not a valid format-4 block is simply a wrong PIN
    t = await ivr._request("POST", path, {"pin_block": "AB" * 16}, key="garbage-block")
    assert ids(t)[0] == "pin_wrong"
    assert (await card_row(node, serial))["failed_pin_count"] == 1


async def test_start_validation_and_auth(node: Node, raw: Api, session: aiohttp.ClientSession,
                                         ivr: IvrSimulator) -> None:
    ok = {"call_id": "c-1.a:b_2", "ani": "13800000000", "dnis": "95598", "lang": "zh"}
    for field, value, code in [("call_id", "x" * 65, "invalid_call_id"),
                               ("call_id", "a/b", "invalid_call_id"),
                               ("ani", "+86138", "invalid_ani"), ("ani", "", "invalid_ani"),
                               ("ani", "13800000000\n", "invalid_ani"),
                               ("call_id", "c-1\n", "invalid_call_id"),
                               ("dnis", 95598, "invalid_dnis"), ("lang", "fr", "invalid_lang")]:
        st, _, b = await raw.call("POST", "/ivr/v1/calls", json={**ok, field: value})
        assert st == 400 and orjson.loads(b)["code"] == code, (field, value)
    internet = Api(session, raw.base, await api_key(node.pool, "internet"))
    st, _, b = await internet.call("POST", "/ivr/v1/calls", json=ok)
    assert st == 403 and orjson.loads(b)["code"] == "wrong_channel"
    st, _, _ = await Api(session, raw.base, None).call("POST", "/ivr/v1/calls", json=ok)
    assert st == 401
    st1, _, b1 = await raw.call("POST", "/ivr/v1/calls", json=ok)
    st2, h2, b2 = await raw.call("POST", "/ivr/v1/calls", json=ok)  # a retried start
    assert (st1, st2) == (201, 200) and b1 == b2 and h2["Idempotent-Replayed"] == "true"
    ttl = await node.redis.ttl("ivr:call:c-1.a:b_2")
    assert 0 < ttl <= node.settings.ivr.call_idle_s  # idle calls are forgotten
    await ivr.send_digits("c-1.a:b_2", "2")
    st, _, b = await raw.call("POST", "/ivr/v1/calls", json=ok)
    assert st == 409 and orjson.loads(b)["code"] == "call_exists"
    async with session.get(raw.base + "/v1/openapi.json") as r:
        doc = await r.json()
    assert {"/ivr/v1/calls", "/ivr/v1/calls/{call_id}/input",
            "/ivr/v1/calls/{call_id}"} <= set(doc["paths"])
    assert "IvrTurn" in doc["components"]["schemas"]


# --- secrets -----------------------------------------------------------------------------------

async def test_a_pin_never_leaks(node: Node, ivr: IvrSimulator, sims: Sims,
                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gp = logging.getLogger("gridpay")
    gp.addHandler(caplog.handler)
    try:
        serial, pin = await make_card(node)
        wrong = new_pin()
        acct = await account(sims)
        call_id, t0 = await to_step(ivr, ani(), acct, "enter_pin", serial)
        blocks = [ivr.pin_block(serial, wrong), ivr.pin_block(serial, pin)]
        path = f"/ivr/v1/calls/{call_id}/input"
        responses = [orjson.dumps(t0)]
        for i, block in enumerate(blocks):
            responses.append(orjson.dumps(await ivr._request(
                "POST", path, {"pin_block": block}, key=f"leak-{i}")))
        responses.append(orjson.dumps(await ivr.send_digits(call_id, "1")))
        responses.append(orjson.dumps(await ivr.send_digits(call_id, "9")))
        assert orjson.loads(responses[-2])["step"] == "result"
    finally:
        gp.removeHandler(caplog.handler)
    secrets_ = [pin, wrong, *blocks, *(b.lower() for b in blocks)]
    logged = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert caplog.records
    dump: list[str] = []
    for table in [r["tablename"] for r in await node.pool.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]:
        for row in await node.pool.fetch(f'SELECT t::text AS x FROM "{table}" t'):  # noqa: S608
            dump.append(row["x"])
    db_text = "\n".join(dump)
    assert serial in db_text  # the dump is real
    redis_text = ""
    async for k in node.redis.scan_iter("*"):
        if await node.redis.type(k) == b"hash":
            redis_text += repr(await node.redis.hgetall(k))
        elif await node.redis.type(k) == b"string":
            redis_text += repr(await node.redis.get(k))
    assert call_id in redis_text
    for s in secrets_:
        for where, text in (("logs", logged), ("database", db_text), ("redis", redis_text),
                            ("responses", b"".join(responses).decode())):
            assert s not in text, f"a secret leaked into the {where}"


async def test_a_pin_typed_at_the_serial_step_cannot_be_recovered_from_redis(
        node: Node, ivr: IvrSimulator, sims: Sims) -> None:
    """Digits are remembered for replays, but a PIN typed where the serial belongs must not be
    recoverable from what Redis keeps: 12 digits are 10^12 candidates, which a full hash gives
    back in minutes."""
    serial, pin = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "enter_card_serial")
    key = "typed-pin-at-serial"
    t = await ivr._request("POST", f"/ivr/v1/calls/{call_id}/input", {"digits": pin}, key=key)
    assert t["step"] == "enter_card_serial"  # not a serial: asked again
    again = await ivr._request("POST", f"/ivr/v1/calls/{call_id}/input", {"digits": pin},
                               key=key)
    assert again == t  # the retry is still recognised
    with pytest.raises(IvrSimulatorError) as refused:  # other digits under its key are not
        await ivr._request("POST", f"/ivr/v1/calls/{call_id}/input", {"digits": serial},
                           key=key)
    assert refused.value.status == 422
    kept: list[str] = []
    async for k in node.redis.scan_iter(f"*{call_id}*"):  # this call's inputs only
        if await node.redis.type(k) == b"hash":
            kept += [v.decode() if isinstance(v, bytes) else v
                     for v in (await node.redis.hgetall(k)).values()]
    fingerprints = [str(orjson.loads(v)["h"]) for v in kept if v.startswith('{"h"')]
    doc = orjson.loads(await node.redis.hget(f"ivr:call:{call_id}", "doc") or b"{}")
    fingerprints.append(str(doc.get("input_hash")))
    assert len(fingerprints) >= 2
    for text in kept:
        assert pin not in text and hashlib.sha256(f"d:{pin}".encode()).hexdigest() not in text
    for fp in fingerprints:
        hexdigits = fp.removeprefix("d:")
        if all(c in "0123456789abcdef" for c in hexdigits):
            assert len(hexdigits) <= 6, f"{fp!r} keeps more than 24 bits of the digits"
    # an input answered by the version before (its full hash kept), retried on this one, on
    # a call alive across the upgrade: still its own retry
    field = f"k:{key}"
    prior = orjson.loads(await node.redis.hget(f"ivr:call:{call_id}", field) or b"{}")
    prior["h"] = hashlib.sha256(f"d:{pin}".encode()).hexdigest()
    await node.redis.hset(f"ivr:call:{call_id}", field, orjson.dumps(prior))
    assert await ivr._request("POST", f"/ivr/v1/calls/{call_id}/input", {"digits": pin},
                              key=key) == t


# --- failures of the services around -----------------------------------------------------------

async def test_hsm_down_caller_told_busy_nothing_counted(node: Node, ivr: IvrSimulator,
                                                         sims: Sims) -> None:
    serial, pin = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "enter_pin", serial)
    port = sims.hsm.port
    sims.hsm.close()
    await sims.hsm.wait_closed()
    try:
        t = await ivr.send_pin(call_id, serial, "000011112222")
        assert t["step"] == "enter_pin" and ids(t) == ["service_busy", "enter_pin"]
        assert t["hangup"] is False
        row = await card_row(node, serial)
        assert (row["state"], row["failed_pin_count"]) == ("sold", 0)
        assert await node.pool.fetchval(
            "SELECT count(*) FROM ivr_pin_failures WHERE serial = $1", serial) == 0
    finally:
        sims.hsm = await start_server(dataclasses.replace(load_dev_settings(), port=port))
    hsm = node.components["hsm"]
    for _ in range(100):  # the client reconnects after its back-off
        try:
            await hsm.echo(b"up")
            break
        except Exception:
            await asyncio.sleep(0.05)
    t = await ivr.send_pin(call_id, serial, pin)
    assert t["step"] == "confirm_recharge"


async def test_standby_node_answers_503(node: Node, sims: Sims, ivr_key: str, raw: Api,
                                        redis_url: str, migrated: str, tmp_path: Path,
                                        ivr: IvrSimulator) -> None:
    t = await ivr.start(ani())
    async with running_node(migrated, redis_url, sims, tmp_path, "node-b",
                            wait_active=False) as b:
        assert not b.is_active
        standby = Api(raw.session, f"http://127.0.0.1:{b.ports.http}", ivr_key)
        st, h, body = await standby.call("POST", f"/ivr/v1/calls/{t['call_id']}/input",
                                         json={"digits": "1"})
        assert st == 503 and orjson.loads(body)["code"] == "standby"
        assert h.get("Retry-After") == "1"
        st, h, body = await standby.call("POST", "/ivr/v1/calls", json={
            "call_id": "on-standby", "ani": "1", "dnis": "2", "lang": "en"})
        assert st == 503 and orjson.loads(body)["code"] == "standby"
        assert h.get("Retry-After") == "1"
        st, h, body = await standby.call("DELETE", f"/ivr/v1/calls/{t['call_id']}")
        assert st == 503 and orjson.loads(body)["code"] == "standby"
        assert h.get("Retry-After") == "1"
    # the call goes on at the active node, where it was left
    t = await ivr.send_digits(t["call_id"], "1")
    assert t["step"] == "enter_account"


async def test_retried_wrong_pin_is_counted_once(node: Node, raw: Api, ivr: IvrSimulator,
                                                 sims: Sims) -> None:
    serial, _ = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "enter_pin", serial)
    key = f"ivr:call:{call_id}"
    before = await node.redis.hgetall(key)
    path = f"/ivr/v1/calls/{call_id}/input"
    body = {"pin_block": ivr.pin_block(serial, "555555555555")}
    st1, _, b1 = await raw.call("POST", path, json=body, idem="pin-1")
    st2, h2, b2 = await raw.call("POST", path, json=body, idem="pin-1b")  # same block
    assert (st1, st2) == (200, 200) and b1 == b2 and h2["Idempotent-Replayed"] == "true"
    # the answer was lost and the call state went back: the database still counts it once
    await node.redis.delete(key)
    await node.redis.hset(key, mapping=cast(Any, before))
    st3, _, b3 = await raw.call("POST", path, json=body)
    assert st3 == 200 and orjson.loads(b3)["prompts"] == orjson.loads(b1)["prompts"]
    assert (await card_row(node, serial))["failed_pin_count"] == 1
    assert await node.pool.fetchval(
        "SELECT count(*) FROM ivr_pin_failures WHERE serial = $1", serial) == 1


async def test_the_tenth_wrong_pin_blocks_the_number_even_if_the_card_moved_meanwhile(
        node: Node, ivr: IvrSimulator, sims: Sims) -> None:
    caller = ani()
    acct = await account(sims)
    for _ in range(3):  # nine wrong PINs, three calls on three cards
        serial, _ = await make_card(node)
        call_id, _ = await to_step(ivr, caller, acct, "enter_pin", serial)
        for _ in range(3):
            await ivr.send_pin(call_id, serial, new_pin())
    # the tenth, while another call locks the card under it
    serial, _ = await make_card(node)
    call_id, _ = await to_step(ivr, caller, acct, "enter_pin", serial)
    async with node.pool.acquire() as other:
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM cards WHERE serial = $1 FOR UPDATE", serial)
        wrong = asyncio.create_task(ivr.send_pin(call_id, serial, new_pin()))
        await asyncio.sleep(0.5)
        await other.execute("UPDATE cards SET state = 'locked', failed_pin_count = 5"
                            " WHERE serial = $1", serial)
        await tx.commit()
    await asyncio.wait_for(wrong, 10)
    assert await node.pool.fetchval(
        "SELECT count(*) FROM ivr_pin_failures WHERE ani = $1", caller) == 10
    assert await node.pool.fetchval(
        "SELECT count(*) FROM ivr_ani_blocks WHERE ani = $1", caller) == 1
    # no eleventh guess: the number's next call is refused at once
    turn = await ivr.start(caller)
    assert "ani_blocked" in ids(turn) and turn["hangup"], turn


async def test_a_recharge_that_committed_is_told_done_even_if_what_follows_times_out(
        node: Node, ivr: IvrSimulator, sims: Sims, monkeypatch: pytest.MonkeyPatch) -> None:
    from switch.ivr import store as ivr_store

    serial, pin = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "confirm_recharge", serial, pin)
    monkeypatch.setattr(node.components["ivr"], "effect_timeout_s", 1.0)
    real = ivr_store.RedisLock.release

    async def slow_release(self: ivr_store.RedisLock, token: str) -> None:
        if self.key.startswith("ivr:card-lock:"):  # Redis slow after the commit
            await asyncio.sleep(1.5)
        await real(self, token)

    monkeypatch.setattr(ivr_store.RedisLock, "release", slow_release)
    turn = await ivr.send_digits(call_id, "1")
    assert turn["step"] == "result", turn  # not "service busy": it is done
    assert (await card_row(node, serial))["state"] == "redeemed"
    assert await node.pool.fetchval(
        "SELECT count(*) FROM payments WHERE card_serial = $1", serial) == 1


async def test_a_retried_input_is_replayed_though_the_call_moved_to_or_from_the_pin_step(
        node: Node, raw: Api, ivr: IvrSimulator, sims: Sims) -> None:
    serial, _ = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "enter_card_serial")
    path = f"/ivr/v1/calls/{call_id}/input"
    st1, _, first = await raw.call("POST", path, json={"digits": serial + "#"}, idem="k-serial")
    assert st1 == 200 and orjson.loads(first)["step"] == "enter_pin"
    # the answer was lost: the IVR sends the same input with the same key (now at the PIN step)
    st2, h2, again = await raw.call("POST", path, json={"digits": serial + "#"}, idem="k-serial")
    assert (st2, again) == (200, first) and h2.get("Idempotent-Replayed") == "true"
    # another input under that key is still refused
    st3, _, raw3 = await raw.call("POST", path, json={"digits": "99#"}, idem="k-serial")
    assert st3 == 422 and orjson.loads(raw3)["code"] == "idempotency_key_reused"
    # digits at the PIN step that end the call, retried after the call left that step
    for i in range(2):
        st, _, _ = await raw.call("POST", path, json={"digits": "12#"}, idem=f"d{i}")
        assert st == 200
    st1, _, last = await raw.call("POST", path, json={"digits": "12#"}, idem="d2")
    assert st1 == 200 and orjson.loads(last)["hangup"] is True
    st2, _, again = await raw.call("POST", path, json={"digits": "12#"}, idem="d2")
    assert (st2, again) == (200, last)


async def test_a_late_retry_of_an_earlier_input_is_replayed_not_taken_as_new(
        node: Node, raw: Api, ivr: IvrSimulator, sims: Sims) -> None:
    """A delayed copy of the "1" that confirmed the account, arriving at the recharge's
    confirmation, must not confirm the recharge: it gets the turn it got the first time."""
    serial, pin = await make_card(node)
    acct = await account(sims)
    t = await ivr.start(ani(), "zh")
    path = f"/ivr/v1/calls/{t['call_id']}/input"
    steps = [({"digits": "1"}, "A", "enter_account"),
             ({"digits": acct + "#"}, "B", "confirm_account"),
             ({"digits": "1"}, "C", "enter_card_serial"),
             ({"digits": serial + "#"}, "D", "enter_pin"),
             ({"pin_block": ivr.pin_block(serial, pin)}, "E", "confirm_recharge")]
    answers: dict[str, bytes] = {}
    for body, key, step in steps:
        st, _, b = await raw.call("POST", path, json=body, idem=key)
        assert st == 200 and orjson.loads(b)["step"] == step, b
        answers[key] = b
    st, h, b = await raw.call("POST", path, json={"digits": "1"}, idem="C")
    assert (st, b) == (200, answers["C"]) and h.get("Idempotent-Replayed") == "true"
    st, _, b = await raw.call("POST", path, json={"digits": "2"}, idem="A")  # other input
    assert st == 422 and orjson.loads(b)["code"] == "idempotency_key_reused"
    # the PIN block again, without its key: a retry of that input, not a new PIN
    st, h, b = await raw.call("POST", path, json=steps[4][0])
    assert (st, b) == (200, answers["E"]) and h.get("Idempotent-Replayed") == "true"
    assert (await card_row(node, serial))["state"] == "sold"  # nothing was confirmed
    st, _, b = await raw.call("POST", path, json={"digits": "1"}, idem="F")
    assert st == 200 and orjson.loads(b)["step"] == "result"  # the real confirmation
    assert (await card_row(node, serial))["state"] == "redeemed"


async def test_a_takeover_drops_the_turn_and_card_locks_the_old_node_left(
        node: Node, ivr: IvrSimulator, sims: Sims) -> None:
    """A node killed during a turn leaves the call's turn lock (15 s) and the card's lock
    behind: the node that takes over drops them, so the call goes on at once."""
    from switch.ivr.install import drop_abandoned_locks
    from switch.ivr.store import CARD_LOCK_PREFIX, CallStore

    serial, pin = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "confirm_recharge", serial, pin)
    await node.redis.set(CallStore.lock_key(call_id), "dead-node-token", px=15000)
    await node.redis.set(f"{CARD_LOCK_PREFIX}{serial}", "dead-node-token", px=10000)
    # what the IVR's activation hook runs when this node takes over
    assert any(h.__module__ == "switch.ivr.install" for h in node.hooks.on_active)
    await asyncio.wait_for(drop_abandoned_locks(node), 10)
    started = asyncio.get_running_loop().time()
    t = await ivr.send_digits(call_id, "1")
    # at once: the turn lock left would have held the turn 5 s, then answered 409 (whose
    # retries the simulator would have spent waiting for it to expire)
    assert asyncio.get_running_loop().time() - started < 3.0
    assert t["step"] == "result", t
    assert (await card_row(node, serial))["state"] == "redeemed"


async def test_a_retry_after_the_hang_up_still_hears_what_its_input_was_answered(
        node: Node, raw: Api, ivr: IvrSimulator, sims: Sims) -> None:
    """The caller confirmed and hung up; the IVR never got the confirmation's answer and
    retries it: it hears the result (with its transaction number), not the closing turn."""
    serial, pin = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "enter_pin", serial)
    path = f"/ivr/v1/calls/{call_id}/input"
    block = {"pin_block": ivr.pin_block(serial, pin)}
    st, _, pinned = await raw.call("POST", path, json=block)  # no key: known by its hash
    assert st == 200 and orjson.loads(pinned)["step"] == "confirm_recharge"
    key = f"{call_id}-9"  # the recommended form, '.' and ':' included when the id has them
    st, _, confirmed = await raw.call("POST", path, json={"digits": "1"}, idem=key)
    assert st == 200 and orjson.loads(confirmed)["step"] == "result"
    st, _, _ = await raw.call("DELETE", f"/ivr/v1/calls/{call_id}")
    assert st == 200
    st, h, again = await raw.call("POST", path, json={"digits": "1"}, idem=key)
    assert (st, again) == (200, confirmed) and h.get("Idempotent-Replayed") == "true"
    st, h, again = await raw.call("POST", path, json=block)
    assert (st, again) == (200, pinned) and h.get("Idempotent-Replayed") == "true"
    st, _, body = await raw.call("POST", path, json={"digits": "1"}, idem=f"{call_id}-10")
    assert st == 409 and orjson.loads(body)["code"] == "call_ended"  # a new input: refused


async def test_a_key_of_the_call_ids_own_characters_is_taken(
        node: Node, raw: Api) -> None:
    call_id = f"sip.trunk:7-{next(_SEQ)}"
    st, _, _ = await raw.call("POST", "/ivr/v1/calls", json={
        "call_id": call_id, "ani": ani(), "dnis": "95598", "lang": "en"})
    assert st == 201
    path = f"/ivr/v1/calls/{call_id}/input"
    st, _, body = await raw.call("POST", path, json={"digits": "2"}, idem=f"{call_id}-1")
    assert st == 200 and orjson.loads(body)["step"] == "enter_account"
    st, _, body = await raw.call("POST", path, json={"digits": "2"}, idem="k" * 101)
    assert st == 400 and orjson.loads(body)["code"] == "idempotency_key_invalid"


async def test_two_idempotency_keys_on_one_input_are_refused(
        node: Node, raw: Api, ivr: IvrSimulator) -> None:
    t = await ivr.start(ani(), "zh")
    two = [*raw.headers().items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    async with raw.session.post(f"{raw.base}/ivr/v1/calls/{t['call_id']}/input",
                                json={"digits": "1"}, headers=two) as r:
        assert r.status == 400 and (await r.json())["code"] == "idempotency_key_invalid"
    turn = await ivr.send_digits(t["call_id"], "1")  # nothing was taken: still at the menu
    assert turn["step"] == "enter_account"


async def test_a_wrong_pin_block_sent_again_later_in_the_call_counts_once(
        node: Node, raw: Api, ivr: IvrSimulator, sims: Sims) -> None:
    serial, _ = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "enter_pin", serial)
    path = f"/ivr/v1/calls/{call_id}/input"
    wrong = {"pin_block": ivr.pin_block(serial, "555555555555")}
    st, _, first = await raw.call("POST", path, json=wrong)
    assert st == 200 and "pin_wrong" in ids(orjson.loads(first))
    for _ in range(2):  # a timeout, then the same block again: the same answer, not counted
        st, _, _ = await raw.call("POST", path, json={"event": "timeout"})
        assert st == 200
        st, h, again = await raw.call("POST", path, json=wrong)
        assert (st, again) == (200, first) and h.get("Idempotent-Replayed") == "true"
    # the call goes on: a second, different wrong PIN is the second of three
    st, _, b = await raw.call("POST", path, json={"pin_block": ivr.pin_block(serial,
                                                                           "666666666666")})
    turn = orjson.loads(b)
    assert st == 200 and "pin_wrong" in ids(turn) and not turn["hangup"], turn
    assert (await card_row(node, serial))["failed_pin_count"] == 2


async def test_random_walks_through_the_dialog_answer_every_turn(
        node: Node, raw: Api, ivr: IvrSimulator, sims: Sims) -> None:
    # callers pressing anything at any step, retrying with keys old and new, PINs right and
    # garbled, timeouts and hang-ups: every answer is a turn or a clear problem, never a 5xx,
    # and no card is ever recharged twice
    import random

    rng = random.Random(20261126)
    cards = [await make_card(node) for _ in range(4)]
    accts = [await account(sims) for _ in range(2)]
    seen: list[str] = []

    def digits() -> str:
        serial, _ = rng.choice(cards)
        return rng.choice([
            "1", "2", "3", "9", "0", "*", "#", "1#", rng.choice(accts) + "#", serial,
            serial[:-1] + str((int(serial[-1]) + 1) % 10), "1" * 32,
            "".join(rng.choice("0123456789*#") for _ in range(rng.randint(1, 32)))])

    for walk in range(40):
        call_id = f"walk-{walk}"
        st, _, body = await raw.call("POST", "/ivr/v1/calls", json={
            "call_id": call_id, "ani": ani(), "dnis": "95598", "lang": rng.choice(["zh", "en"])})
        assert st == 201, body
        step = orjson.loads(body)["step"]
        card = rng.choice(cards)
        last_key: str | None = None
        for turn_no in range(14):
            roll = rng.random()
            # half the time, what the step asks for (so that walks reach the later steps)
            expected = {"menu": {"digits": "1"}, "confirm_account": {"digits": "1"},
                        "enter_account": {"digits": rng.choice(accts) + "#"},
                        "enter_card_serial": {"digits": card[0]},
                        "enter_pin": {"pin_block": ivr.pin_block(*card)},
                        "confirm_recharge": {"digits": "1"}}.get(step)
            if expected is not None and rng.random() < 0.5:
                inp: dict[str, str] = expected
            elif roll < 0.05:
                st, _, body = await raw.call("DELETE", f"/ivr/v1/calls/{call_id}")
                assert st == 200 and orjson.loads(body)["hangup"] is True, body
                break
            elif roll < 0.6:
                inp = {"digits": digits()}
            elif roll < 0.75:
                serial, pin = rng.choice(cards)
                inp = {"pin_block": ivr.pin_block(serial, pin if rng.random() < 0.7
                                                  else new_pin())}
            elif roll < 0.85:
                inp = {"pin_block": secrets.token_hex(16)}
            else:
                inp = {"event": "timeout"}
            key = (last_key if last_key and rng.random() < 0.15
                   else f"{call_id}-{turn_no}" if rng.random() < 0.7 else None)
            headers = {"Idempotency-Key": key} if key else None
            st, _, body = await raw.call("POST", f"/ivr/v1/calls/{call_id}/input", json=inp,
                                         headers=headers)
            assert st in (200, 409, 422), (st, body)
            doc = orjson.loads(body)
            if st != 200:
                assert doc["code"] in ("call_ended", "idempotency_key_reused",
                                       "turn_in_progress"), doc
                if doc["code"] == "call_ended":
                    break
                continue
            assert {"call_id", "step", "prompts", "collect", "hangup"} <= set(doc), doc
            seen.append(doc["step"])
            step = doc["step"]
            last_key = key
            if doc["hangup"]:
                break
    # the walks reached every step, the result included
    assert {"confirm_account", "enter_card_serial", "enter_pin", "confirm_recharge",
            "result"} <= set(seen), set(seen)
    rows = await node.pool.fetch(
        "SELECT card_serial, count(*) AS n FROM payments WHERE card_serial = ANY($1::text[])"
        " GROUP BY card_serial", [s for s, _ in cards])
    assert all(r["n"] == 1 for r in rows), rows
    redeemed = await node.pool.fetchval(
        "SELECT count(*) FROM cards WHERE serial = ANY($1::text[]) AND state = 'redeemed'",
        [s for s, _ in cards])
    assert redeemed == len(rows)


async def test_zz_fenced_node_refuses_the_redemption(node: Node, ivr: IvrSimulator,
                                                     raw: Api, sims: Sims) -> None:
    """Last in the module: the node loses its lease in the middle of a call."""
    serial, pin = await make_card(node)
    call_id, _ = await to_step(ivr, ani(), await account(sims), "confirm_recharge", serial, pin)
    await node.pool.execute("UPDATE node_lease SET epoch = epoch + 1")  # another node took over
    st, _, b = await raw.call("POST", f"/ivr/v1/calls/{call_id}/input", json={"digits": "1"})
    assert st == 503 and orjson.loads(b)["code"] == "standby"
    assert (await card_row(node, serial))["state"] == "sold"
    assert await node.pool.fetchval(
        "SELECT count(*) FROM payments WHERE card_serial = $1", serial) == 0
    stored = await node.redis.hget(f"ivr:call:{call_id}", "doc")
    assert stored is not None and orjson.loads(stored)["call"]["step"] == "confirm_recharge"
    assert not node.is_active
