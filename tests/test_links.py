"""The bank and post-office links over real sockets: every response code of the contract,
pipelining, malformed input, reversals and their races, reconciliation, MACs."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from protocols.iso8583 import Message, Tlv
from switch.keys import load_dev_keys
from switch.links.client import BankClient, LinkClosed
from switch.node import Node
from tests.nodekit import (
    Sims,
    active_account,
    closed_account,
    running_node,
    simulators,
    until_a_statement_waits_on_a_lock,
)

BANK, POST = "01020000", "01000000"
KEYS = dict(load_dev_keys().institution_mac)


def client(node: Node, dialect: str = "bank", **kw: Any) -> BankClient:
    inst = BANK if dialect == "bank" else POST
    port = node.ports.bank if dialect == "bank" else node.ports.post
    assert port is not None
    kw.setdefault("mac_key", KEYS[inst])
    return BankClient("127.0.0.1", port, dialect=dialect, institution=inst, **kw)


@pytest.fixture(params=["bank", "post"])
async def bank(request: pytest.FixtureRequest, node: Node) -> AsyncIterator[BankClient]:
    async with client(node, request.param) as c:
        assert (await c.sign_on()).fields[39] == "00"
        yield c
        assert c.bad_macs == [], "a response MAC did not verify"


def _tlv(msg: Message) -> Tlv:
    t = msg.tlv()
    assert t is not None
    return t


async def _payments(node: Node) -> int:
    return int(await node.pool.fetchval("SELECT count(*) FROM payments"))


async def test_sign_on_echo_and_sign_off(node: Node, sims: Sims) -> None:
    async with client(node) as c:
        acct = await active_account(sims.marketing)
        r = await c.request(c.inquiry(acct))
        assert r.fields[39] == "91"  # not signed on yet
        assert (await c.echo()).fields[39] == "00"  # echo works at any time
        r = await c.sign_on()
        assert r.mti == "0810" and r.fields[39] == "00" and len(str(r.fields[15])) == 4
        assert 64 not in r.fields  # 0810 carries no MAC
        assert (await c.request(c.inquiry(acct))).fields[39] == "00"
        assert (await c.sign_off()).fields[39] == "00"
        assert (await c.request(c.payment(acct, 100))).fields[39] == "91"
        # a declined 0810 carries 15 as well; an 0800 carrying a MAC has a foreign field
        r = await c.request(c.network("999"))
        assert (r.mti, r.fields[39], len(str(r.fields[15]))) == ("0810", "12", 4)
        r = await c.request(c.network("301").evolve(set_fields={128: b"\x00" * 8}))
        assert (r.fields[39], len(str(r.fields[15]))) == ("30", 4)
    assert await _payments(node) == 0


async def test_inquiry_answers_from_marketing(bank: BankClient, sims: Sims) -> None:
    acct = await active_account(sims.marketing, start=3)
    r = await bank.request(bank.inquiry(acct))
    assert r.mti == "0210" and r.fields[39] == "00"
    t = r.fields[48]
    assert isinstance(t, Tlv) and t["01"] == acct and set(t["02"][1:]) == {"*"}
    assert int(t["03"]) == int(str(r.fields[4]))
    assert len(t["04"]) == 12 and len(t["05"]) == 2
    for echoed in (3, 7, 11, 12, 13, 32, 37, 41, 49):
        assert echoed in r.fields


async def test_payment_retransmission_and_conflict(bank: BankClient, node: Node,
                                                   sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    pay = bank.payment(acct, 5000)
    r1 = await bank.request(pay)
    assert r1.fields[39] == "00" and len(str(r1.fields[38])) == 6
    r2 = await bank.request(pay)  # retransmission: the same answer, nothing posted twice
    assert r2.fields[39] == "00"
    for f in (38, 15):
        assert r2.fields[f] == r1.fields[f]
    assert _tlv(r2)["06"] == _tlv(r1)["06"]
    assert await _payments(node) == 1
    other = Message("0200", dict(pay.fields))
    other.fields[4] = "000000005001"
    r3 = await bank.request(other)  # same identity, different content
    assert r3.fields[39] == "94"
    assert await _payments(node) == 1


async def test_each_approval_reports_the_arrears_before_it(bank: BankClient, node: Node,
                                                          sims: Sims) -> None:
    """Tag 03 is the arrears before this payment: the payments approved since the account was
    last read are taken off, not reported as still owed."""
    async with aiohttp.ClientSession() as s:
        async with s.get(sims.marketing.url + "/accounts", params={"limit": "500"}) as r:
            listed = (await r.json())["accounts"]
        for a in listed[40:]:
            if a["status"] != "active":
                continue
            async with s.get(f"{sims.marketing.url}/accounts/{a['account_no']}") as r:
                owed = int((await r.json())["arrears"])
            if owed >= 3000:
                acct = str(a["account_no"])
                break
        else:
            raise AssertionError("no account with arrears")
    await bank.request(bank.inquiry(acct))  # read now: the figure the first payment starts from
    before = [int(_tlv(await bank.request(bank.payment(acct, 1000)))["03"]) for _ in range(3)]
    assert before == [owed, owed - 1000, owed - 2000]


@pytest.mark.parametrize(("amount", "code"), [(0, "13"), (5_000_001, "13")])
async def test_invalid_amounts(bank: BankClient, node: Node, sims: Sims, amount: int,
                               code: str) -> None:
    acct = await active_account(sims.marketing)
    assert (await bank.request(bank.payment(acct, amount))).fields[39] == code
    assert await _payments(node) == 0


async def test_unknown_and_closed_accounts(bank: BankClient, node: Node, sims: Sims) -> None:
    assert (await bank.request(bank.payment("0000000001", 100))).fields[39] == "14"
    assert (await bank.request(bank.inquiry("0000000001"))).fields[39] == "14"
    closed = await closed_account(sims.marketing)
    assert (await bank.request(bank.payment(closed, 100))).fields[39] == "57"
    assert await _payments(node) == 0


async def test_format_errors_are_answered_and_the_link_stays(bank: BankClient, node: Node,
                                                             sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    no_currency = bank.payment(acct, 100)
    del no_currency.fields[49]
    assert (await bank.request(no_currency)).fields[39] == "30"
    usd = bank.payment(acct, 100)
    usd.fields[49] = "840"
    assert (await bank.request(usd)).fields[39] == "30"
    short_acct = bank.payment(acct, 100)
    short_acct.fields[48] = Tlv.of(("01", "12345"))
    assert (await bank.request(short_acct)).fields[39] == "30"
    bad_code = bank.payment(acct, 100)
    bad_code.fields[3] = "999999"
    assert (await bank.request(bad_code)).fields[39] == "12"
    # a frame whose field 4 holds letters: decoded up to the MTI and 11, answered 30
    good = bank.payment(acct, 100)
    frame = bank.encode(good)
    amount = b"000000000100" if bank.codec.dialect.name == "post" else None
    if amount is not None:
        frame = frame.replace(amount, b"00000000010A", 1)
        r = await bank.request(good, frame=frame)
        assert r.fields[39] == "30" and r.fields[11] == good.fields[11]
    assert (await bank.echo()).fields[39] == "00"  # the link is still open
    assert await _payments(node) == 0


async def test_wrong_or_missing_mac_posts_nothing(node: Node, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    async with client(node, mac_key=b"\x00" * 16) as c:
        await c.sign_on()
        r = await c.request(c.payment(acct, 100))
        assert r.fields[39] == "63" and 64 not in r.fields and 128 not in r.fields
    async with client(node, mac_key=None) as c:
        await c.sign_on()
        r = await c.request(c.payment(acct, 100))
        assert r.fields[39] == "63"
    async with client(node) as c:  # a right MAC over other bytes: one MAC bit flipped
        await c.sign_on()
        msg = c.payment(acct, 100)
        frame = bytearray(c.encode(msg))
        frame[-1] ^= 0x01
        r = await c.request(msg, frame=bytes(frame))
        assert r.fields[39] == "63"
    assert await _payments(node) == 0


async def test_field_32_must_match_the_link(node: Node, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    async with client(node) as c:
        await c.sign_on()
        c.institution = "09990000"
        r = await c.request(c.payment(acct, 100))
        assert r.fields[39] == "58"
        # the configured id exactly, not another spelling of the same number
        for other in ("1020000", "001020000"):
            c.institution = other
            r = await c.request(c.payment(acct, 100))
            assert r.fields[39] == "58", other
    assert await _payments(node) == 0


async def test_transaction_type_not_enabled_is_58(clean_db: str, clean_redis: str, sims: Sims,
                                                 tmp_path: Path) -> None:
    insts = [{"id": BANK, "dialect": "bank", "allowed": ["127.0.0.0/8"], "mac": True,
              "transactions": ["inquiry", "payment"]}]
    async with running_node(clean_db, clean_redis, sims, tmp_path,
                            overrides={"institutions": insts}) as n:
        async with client(n) as c:
            await c.sign_on()
            acct = await active_account(sims.marketing)
            pay = c.payment(acct, 100)
            assert (await c.request(pay)).fields[39] == "00"
            assert (await c.request(c.reversal(pay))).fields[39] == "58"
            assert (await c.request(c.reconciliation("0101", 0, 0, 0, 0))).fields[39] == "58"


async def test_pipelined_requests_are_all_matched(bank: BankClient, node: Node,
                                                  sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    msgs = [bank.payment(acct, 100 + i) for i in range(60)] + [bank.inquiry(acct)
                                                                 for _ in range(20)]
    random.Random(7).shuffle(msgs)
    results = await asyncio.gather(*(bank.request(m) for m in msgs))
    assert all(r.fields[39] == "00" for r in results)
    assert all(r.fields[11] == m.fields[11] for r, m in zip(results, msgs, strict=True))
    assert await _payments(node) == 60
    assert bank.unmatched == []
    text = node.metrics.render().decode()
    assert f'gridpay_link_transactions_total{{institution="{bank.institution}",mti="0200",' \
           f'response_code="00"}} 80.0' in text
    assert "gridpay_link_request_seconds_bucket" in text


async def test_reversal_cases(bank: BankClient, node: Node, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    pay = bank.payment(acct, 2500)
    r = await bank.request(pay)
    assert r.fields[39] == "00"
    wrong_amount = bank.reversal(pay)
    wrong_amount.fields[4] = "000000002499"
    assert (await bank.request(wrong_amount)).fields[39] == "12"
    rv = await bank.request(bank.reversal(pay))
    assert rv.mti == "0430" and rv.fields[39] == "00" and rv.fields[90] is not None
    assert _tlv(rv)["06"] == _tlv(r)["06"]
    again = await bank.request(bank.reversal(pay, repeat=True))  # 0421 repeat
    assert again.fields[39] == "00"
    # another amount for the reversed payment is no repeat of its reversal (it was a 00)
    other = bank.reversal(pay, repeat=True)
    other.fields[4] = "000000002499"
    assert (await bank.request(other)).fields[39] == "12"
    assert await node.pool.fetchval("SELECT count(*) FROM reversals") == 1
    # unknown original: approved, remembered, and the late original is declined
    late = bank.payment(acct, 700)
    rv2 = await bank.request(bank.reversal(late))
    assert rv2.fields[39] == "00"
    assert (await bank.request(late)).fields[39] == "94"
    assert await _payments(node) == 1


async def test_a_payment_cut_short_by_the_switch_stopping_is_not_answered(
        bank: BankClient, node: Node, sims: Sims) -> None:
    # its commit may have happened: a 96 would tell the bank "declined" of a credited
    # payment; no answer lets the bank retransmit or reverse, and the books agree either way
    acct = await active_account(sims.marketing)
    async with node.pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("SELECT 1 FROM node_lease WHERE id = 1 FOR UPDATE")
        answer = asyncio.ensure_future(bank.request(bank.payment(acct, 100)))
        await until_a_statement_waits_on_a_lock(node.pool)
        await node.components["ledger"].stop(grace_s=0.1)
        done, _ = await asyncio.wait({answer}, timeout=1.0)
        answer.cancel()
    assert not done, answer.result()  # was a 0210 with 39 = 96


async def test_a_payment_whose_database_went_away_under_its_commit_is_not_answered(
        bank: BankClient, node: Node, sims: Sims) -> None:
    # the committer's connection is cut while its statement waits: it may have committed (a
    # cut after the commit looks the same), so no 96 either
    acct = await active_account(sims.marketing)
    async with node.pool.acquire() as blocker:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM node_lease WHERE id = 1 FOR UPDATE")
            answer = asyncio.ensure_future(bank.request(bank.payment(acct, 100)))
            await until_a_statement_waits_on_a_lock(node.pool)
            await blocker.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()")
            done, _ = await asyncio.wait({answer}, timeout=1.0)
            answer.cancel()
    assert not done, answer.result()  # was a 0210 with 39 = 96
    assert (await bank.request(bank.payment(acct, 100))).fields[39] == "00"  # and carries on


async def test_reversal_of_another_business_date_is_12(bank: BankClient, node: Node,
                                                       sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    pay = bank.payment(acct, 800)
    await bank.request(pay)
    await node.pool.execute("UPDATE payments SET business_date = business_date - 1")
    assert (await bank.request(bank.reversal(pay))).fields[39] == "12"


def _date_moves_on(monkeypatch: pytest.MonkeyPatch, node: Node) -> None:
    """From now on the business date is a day later: as if the cut-over had just passed."""
    cal = node.components["calendar"]
    monkeypatch.setattr(cal, "date_at", lambda at, was=cal.date_at: was(at) + timedelta(days=1))


async def test_a_reversal_that_waits_past_the_cut_over_is_dated_after_it(
        bank: BankClient, node: Node, sims: Sims, monkeypatch: pytest.MonkeyPatch) -> None:
    # the business date is read once the payment is locked: read before, a reversal approved
    # after the cut-over was booked on the payment's (old) date and its 0430 named the new one
    acct = await active_account(sims.marketing)
    pay = bank.payment(acct, 900)
    r = await bank.request(pay)
    assert r.fields[39] == "00"
    async with node.pool.acquire() as blocker:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM payments FOR UPDATE")
            answer = asyncio.ensure_future(bank.request(bank.reversal(pay)))
            await until_a_statement_waits_on_a_lock(node.pool)
            _date_moves_on(monkeypatch, node)
        rv = await asyncio.wait_for(answer, 10)
    assert rv.fields[39] == "12"  # yesterday's payment, per the contract
    assert await node.pool.fetchval("SELECT count(*) FROM reversals") == 0


async def test_a_repeated_reversal_names_the_date_it_was_booked_on(
        bank: BankClient, node: Node, sims: Sims, monkeypatch: pytest.MonkeyPatch) -> None:
    acct = await active_account(sims.marketing)
    pay = bank.payment(acct, 900)
    await bank.request(pay)
    rv = await bank.request(bank.reversal(pay))
    assert rv.fields[39] == "00"
    booked = await node.pool.fetchval("SELECT business_date FROM reversals")
    assert rv.fields[15] == f"{booked:%m%d}"
    _date_moves_on(monkeypatch, node)
    again = await bank.request(bank.reversal(pay, repeat=True))
    assert (again.fields[39], again.fields[15]) == ("00", f"{booked:%m%d}")


async def test_reversal_racing_its_original_ends_consistent(node: Node, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    async with client(node) as c:
        await c.sign_on()
        for _ in range(15):
            pay = c.payment(acct, 300)
            rp, rv = await asyncio.gather(c.request(pay), c.request(c.reversal(pay)))
            assert rv.fields[39] == "00"
            assert rp.fields[39] in ("00", "94")
    rows = await node.pool.fetch(
        "SELECT p.id, p.reversed_at, (SELECT count(*) FROM outbox o WHERE o.payment_id = p.id"
        " AND o.kind = 'reversal') AS rev FROM payments p")
    for row in rows:  # never a payment that is reversed but still credited, or vice versa
        assert (row["reversed_at"] is None) == (row["rev"] == 0)
    # every approved-then-reversed payment is reversed; declined ones never posted
    assert all(r["reversed_at"] is not None for r in rows)


async def test_reconciliation_agree_and_disagree(bank: BankClient, node: Node,
                                                 sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    p1, p2 = bank.payment(acct, 1000), bank.payment(acct, 2000)
    await bank.request(p1)
    await bank.request(p2)
    await bank.request(bank.reversal(p2))
    await bank.request(bank.reversal(bank.payment(acct, 5)))  # unknown original: counts nothing
    today = node.components["calendar"].today().strftime("%m%d")
    r = await bank.request(bank.reconciliation(today, 2, 1, 3000, 2000))
    assert r.mti == "0510" and r.fields[39] == "00"
    r = await bank.request(bank.reconciliation(today, 2, 0, 3000, 0))
    assert r.fields[39] == "95"
    assert (r.fields[74], r.fields[75], r.fields[86], r.fields[87]) == (
        "0000000002", "0000000001", "0000000000003000", "0000000000002000")
    # a declined 0510 echoes the date it was asked about too (it carried today's)
    r = await bank.request(bank.reconciliation("1399", 2, 1, 3000, 2000))
    assert r.mti == "0510" and r.fields[39] == "30" and r.fields[15] == "1399"


async def test_the_reconciliation_file_carries_37_as_it_came(bank: BankClient, node: Node,
                                                              sims: Sims) -> None:
    from switch.links.recon import export

    acct = await active_account(sims.marketing)
    spaced = bank.payment(acct, 700)
    spaced.fields[37] = "  RRN 42    "
    assert (await bank.request(spaced)).fields[39] == "00"
    piped = bank.payment(acct, 800)
    piped.fields[37] = "AB|CD|EF|GHI"  # the file's separator: refused, nothing posted
    assert (await bank.request(piped)).fields[39] == "30"
    day = node.components["calendar"].today()
    text = await export(node.pool, bank.institution, day)
    lines = [line.split("|") for line in text.splitlines() if line.startswith("D|")]
    assert all(len(parts) == 10 for parts in lines)
    assert [p for p in lines if p[1] == spaced.fields[11]][0][3] == "  RRN 42    "
    assert not [p for p in lines if p[1] == piped.fields[11]]


async def test_inquiry_with_marketing_down_uses_mirror_or_91(bank: BankClient, node: Node,
                                                             sims: Sims) -> None:
    acct = await active_account(sims.marketing, start=11)
    await sims.marketing.set_faults(error_rate=1.0)
    try:
        assert (await bank.request(bank.inquiry(acct))).fields[39] == "00"  # from the mirror
        await node.pool.execute("DELETE FROM account_mirror WHERE account_no = $1", acct)
        assert (await bank.request(bank.inquiry(acct))).fields[39] == "91"
    finally:
        await sims.marketing.clear_faults()


async def test_an_answer_the_dialect_cannot_carry_is_answered_96(bank: BankClient, node: Node,
                                                                  sims: Sims) -> None:
    """Arrears of 10^12 fen or more (a billing system gone wrong) do not fit field 4's twelve
    digits: the inquiry is answered 96, not left unanswered, and the link stays up."""
    acct = await active_account(sims.marketing, start=13)
    await sims.marketing.set_faults(error_rate=1.0)
    try:
        assert (await bank.request(bank.inquiry(acct))).fields[39] == "00"  # from the mirror
        await node.pool.execute("UPDATE account_mirror SET arrears = $2 WHERE account_no = $1",
                                acct, 10**12)
        resp = await bank.request(bank.inquiry(acct))
        assert resp.fields[39] == "96"
        assert 4 not in resp.fields
    finally:
        await sims.marketing.clear_faults()
    assert (await bank.echo()).fields[39] == "00"


async def test_marketing_down_payment_still_approved(bank: BankClient, node: Node,
                                                     sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    await sims.marketing.set_faults(error_rate=1.0)
    try:
        assert (await bank.request(bank.payment(acct, 4321))).fields[39] == "00"
    finally:
        await sims.marketing.clear_faults()
    assert await node.pool.fetchval("SELECT state FROM outbox") == "pending"


async def test_random_frames_never_crash_the_server(node: Node) -> None:
    rng = random.Random(2024)
    async with client(node, "post") as c:
        await c.sign_on()
        for _ in range(300):
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            if rng.random() < 0.5:  # a plausible start: MTI + some hex bitmap
                body = b"0200" + b"F23A" + body
            await c.send_raw(c.codec.frame(body))
        assert (await c.echo()).fields[39] == "00"
    async with client(node, "bank") as c:
        await c.sign_on()
        for _ in range(300):
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            await c.send_raw(c.codec.frame(body))
        assert (await c.echo()).fields[39] == "00"
    assert await _payments(node) == 0


async def test_keepalive_oversize_and_bad_header(node: Node) -> None:
    async with client(node, "bank") as c:
        await c.send_raw(b"\x00\x00")  # keep-alive: ignored, not answered
        assert (await c.echo()).fields[39] == "00"
        await c.send_raw(b"\x10\x01" + b"\x00" * 10)  # 4097 announced: closes
        with pytest.raises((LinkClosed, TimeoutError, ConnectionError)):
            await c.echo()
    async with client(node, "post") as c:
        await c.send_raw(b"00x5")  # not a length
        with pytest.raises((LinkClosed, TimeoutError, ConnectionError)):
            await c.echo()


async def test_unknown_message_type_is_answered_12(bank: BankClient) -> None:
    msg = Message("0100", {7: "1126120000", 11: "000999", 32: bank.institution})
    body = bank.codec.encode(msg)
    reply = asyncio.get_running_loop().create_future()
    key = ("1", "000999", "1126120000", bank.institution)
    bank._waiting[key] = reply  # noqa: SLF001 - the client matches by class, 11, 7, 32
    await bank.send_raw(bank.codec.frame(body))
    r = await asyncio.wait_for(reply, 5)
    assert r.mti == "0110" and r.fields[39] == "12"


async def test_links_limits_address_idle_and_connections(clean_db: str, clean_redis: str,
                                                         sims: Sims, tmp_path: Path) -> None:
    insts = [
        {"id": BANK, "dialect": "bank", "allowed": ["127.0.0.0/8"], "mac": True,
         "max_connections": 1},
        {"id": POST, "dialect": "post", "allowed": ["10.0.0.0/8"], "mac": True},
    ]
    async with running_node(clean_db, clean_redis, sims, tmp_path,
                            overrides={"institutions": insts,
                                       "links": {"idle_timeout_s": 0.5}}) as n:
        async with client(n, "bank") as first:
            assert (await first.echo()).fields[39] == "00"
            async with client(n, "bank", timeout=2) as second:  # over the limit: closed
                with pytest.raises((LinkClosed, TimeoutError, ConnectionError)):
                    await second.echo()
            await asyncio.sleep(1.0)  # idle beyond 0.5 s: closed by the switch
            with pytest.raises((LinkClosed, TimeoutError, ConnectionError)):
                await first.echo()
        async with client(n, "post", timeout=2) as c:  # loopback is no post-office address
            with pytest.raises((LinkClosed, TimeoutError, ConnectionError)):
                await c.echo()


async def test_an_echo_on_a_shared_address_takes_no_connection_slot(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    """Two banks behind one address, one connection each: a connection that only echoes
    before signing on does not lock the bank's real one out."""
    other = "01030000"
    insts = [
        {"id": BANK, "dialect": "bank", "allowed": ["127.0.0.0/8"], "mac": True,
         "max_connections": 1},
        {"id": other, "dialect": "bank", "allowed": ["127.0.0.0/8"], "mac": False,
         "max_connections": 1},
        {"id": POST, "dialect": "post", "allowed": ["127.0.0.0/8"], "mac": True},
    ]
    async with running_node(clean_db, clean_redis, sims, tmp_path,
                            overrides={"institutions": insts}) as n:
        async with client(n, "bank") as echoing:
            assert (await echoing.echo()).fields[39] == "00"
            async with client(n, "bank") as real:
                assert (await real.echo()).fields[39] == "00"
                assert (await real.sign_on()).fields[39] == "00"
                # the limit still holds for a second sign-on
                assert (await echoing.sign_on()).fields[39] == "58"


async def test_hsm_down_gives_96_and_posts_nothing(clean_db: str, clean_redis: str,
                                                   tmp_path: Path) -> None:
    async with simulators() as own:
        async with running_node(clean_db, clean_redis, own, tmp_path) as n:
            await asyncio.wait_for(n.components["accounts"].synced.wait(), 20)
            acct = await active_account(own.marketing)
            async with client(n) as c:
                await c.sign_on()
                own.hsm.close()
                await own.hsm.wait_closed()
                r = await c.request(c.payment(acct, 100))
                assert r.fields[39] == "96"
            assert await n.pool.fetchval("SELECT count(*) FROM payments") == 0


async def test_standby_refuses_link_connections(clean_db: str, clean_redis: str, sims: Sims,
                                                tmp_path: Path) -> None:
    async with running_node(clean_db, clean_redis, sims, tmp_path / "a", "node-a"):
        async with running_node(clean_db, clean_redis, sims, tmp_path / "b", "node-b",
                                wait_active=False) as b:
            assert b.ports.bank is None and b.ports.post is None
            lst = b.components["links"]["bank"]
            assert lst.server is None


async def test_frames_read_together_start_no_more_than_max_in_flight(
        bank: BankClient, node: Node, sims: Sims, monkeypatch: pytest.MonkeyPatch) -> None:
    """200 inquiries in one write: the link starts at most `max_in_flight` at once (the rest
    wait in its buffer, reading paused) and answers every one."""
    listener = node.components["links"][bank.codec.dialect.name]
    service = listener.service
    handle = service.handle
    running = peak = 0

    async def counted(link: Any, body: bytes) -> bytes | None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            out: bytes | None = await handle(link, body)
            return out
        finally:
            running -= 1

    monkeypatch.setattr(service, "handle", counted)
    acct = await active_account(sims.marketing)
    msgs = [bank.inquiry(acct) for _ in range(200)]
    waiting = [asyncio.ensure_future(bank.request(m, frame=b"")) for m in msgs]
    await asyncio.sleep(0)
    await bank.send_raw(b"".join(bank.encode(m) for m in msgs))
    results = await asyncio.gather(*waiting)
    assert all(r.fields[39] == "00" for r in results)
    limit = node.settings.links.max_in_flight
    assert 1 < peak <= limit, (peak, limit)
