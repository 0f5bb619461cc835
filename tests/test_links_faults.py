"""What a link answers when a part of the system fails or a request is unusual: a recorded
payment is never answered as failed, anything unforeseen is a 96, and the contract's MAC and
processing-code rules hold."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from crypto.cmac import mac8
from protocols.iso8583 import Message, Tlv
from switch.hsm_client import HsmError
from switch.node import Node
from tests.nodekit import Sims, active_account, running_node
from tests.test_links import BANK, KEYS, client


async def _count(node: Node, table: str) -> int:
    return int(await node.pool.fetchval(f"SELECT count(*) FROM {table}"))


async def test_a_recorded_payment_whose_answer_cannot_be_signed_is_not_answered_failed(
        node: Node, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    svc = node.components["link_service"]
    working = svc.ctx

    async def hsm_down(block: object, data: bytes) -> bytes:
        raise HsmError("68", "M6")

    svc.ctx = dataclasses.replace(working, hsm_mac=hsm_down)
    try:
        async with client(node, timeout=3) as c:
            await c.sign_on()
            pay = c.payment(acct, 1234)
            with pytest.raises(TimeoutError):  # silence, not "96 failed"
                await c.request(pay)
            assert await _count(node, "payments") == 1
            svc.ctx = working  # the HSM is back: the retransmission gets the payment, signed
            answer = await c.request(pay)
            assert answer.fields[39] == "00" and c.bad_macs == []
    finally:
        svc.ctx = working
    assert await _count(node, "payments") == 1


async def test_an_approval_is_signed_while_its_payment_commits_and_again_if_that_failed(
        node: Node, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    svc = node.components["link_service"]
    working = svc.ctx
    calls: list[bytes] = []
    fail_first = False
    metrics = node.metrics
    committed = metrics.child(metrics.payments, "bank")  # counted once the commit returned
    early_failed = metrics.child(metrics.link_errors, "bank", "early_signature_failed")
    committed_at_call: list[float] = []

    async def counted(block: object, data: bytes) -> bytes:
        calls.append(data)
        committed_at_call.append(committed.value)
        if fail_first and len(calls) == 1:
            raise HsmError("68", "M6")
        mac: bytes = await working.hsm_mac(block, data)
        return mac

    svc.ctx = dataclasses.replace(working, hsm_mac=counted)
    try:
        async with client(node, timeout=5) as c:
            await c.sign_on()
            before = committed.value
            answer = await c.request(c.payment(acct, 4321))
            # one MAC request, asked while the payment committed (before the ledger counted
            # it), and its signature verifies
            assert answer.fields[39] == "00" and c.bad_macs == [] and len(calls) == 1
            assert committed_at_call == [before] and committed.value == before + 1
            calls.clear()
            committed_at_call.clear()
            fail_first = True
            failed_before = early_failed.value
            answer = await c.request(c.payment(acct, 4322))
            # the early one failed: the recorded payment's approval is signed again, the
            # same bytes, after the commit
            assert answer.fields[39] == "00" and c.bad_macs == []
            assert len(calls) == 2 and calls[0] == calls[1]
            assert committed_at_call == [before + 1, before + 2]
            assert early_failed.value == failed_before + 1
    finally:
        svc.ctx = working


async def test_an_unforeseen_failure_is_answered_96_and_records_nothing(
        node: Node, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    await node.pool.execute("ALTER TABLE payments ADD CONSTRAINT test_chk CHECK (amount <> 777)"
                            " NOT VALID")
    try:
        async with client(node, timeout=5) as c:
            await c.sign_on()
            assert (await c.request(c.payment(acct, 777))).fields[39] == "96"
            assert (await c.echo()).fields[39] == "00"
    finally:
        await node.pool.execute("ALTER TABLE payments DROP CONSTRAINT test_chk")
    assert await _count(node, "payments") == 0


async def test_a_name_the_link_cannot_encode_is_sent_with_a_placeholder(
        node: Node, sims: Sims) -> None:
    acct = await active_account(sims.marketing, start=5)
    await node.pool.execute("UPDATE account_mirror SET name = $2 WHERE account_no = $1",
                            acct, "\U00020bb7\u5f20")  # the first character is not in GBK
    node.components["accounts"]._profiles.pop(acct, None)
    async with client(node, timeout=5) as c:
        await c.sign_on()
        answer = await c.request(c.payment(acct, 500))
        assert answer.fields[39] == "00"
        tlv = answer.fields[48]
        assert isinstance(tlv, Tlv) and str(tlv["02"]).startswith("?")
    assert await _count(node, "payments") == 1


async def test_a_reversal_names_the_payment_processing_code(node: Node, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    async with client(node) as c:
        await c.sign_on()
        pay = c.payment(acct, 900)
        assert (await c.request(pay)).fields[39] == "00"
        rv = c.reversal(pay)
        rv.fields[3] = "999999"
        assert (await c.request(rv)).fields[39] == "12"
    assert await _count(node, "reversals") == 0


async def test_an_institution_without_mac_transacts(clean_db: str, clean_redis: str,
                                                    sims: Sims, tmp_path: Path) -> None:
    insts = [{"id": BANK, "dialect": "bank", "allowed": ["127.0.0.0/8"], "mac": False}]
    async with running_node(clean_db, clean_redis, sims, tmp_path,
                            overrides={"institutions": insts}) as n:
        await asyncio.wait_for(n.components["accounts"].synced.wait(), 20)
        acct = await active_account(sims.marketing)
        async with client(n, mac_key=None) as c:
            await c.sign_on()
            assert (await c.request(c.inquiry(acct))).fields[39] == "00"
            assert (await c.request(c.payment(acct, 100))).fields[39] == "00"


@pytest.mark.parametrize("dialect", ["bank", "post"])
async def test_a_mac_in_128_is_taken_when_it_is_the_only_secondary_field(
        node: Node, sims: Sims, dialect: str) -> None:
    acct = await active_account(sims.marketing)
    inst = BANK if dialect == "bank" else "01000000"
    async with client(node, dialect) as c:
        await c.sign_on()
        pay = c.payment(acct, 100)
        m = Message("0200", dict(pay.fields))
        m.fields.pop(64, None)
        m.fields[128] = b"\0" * 8
        body = c.codec.encode(m)[:-8]
        body += mac8(KEYS[inst], body)
        answer = await c.request(pay, frame=c.codec.frame(body))
        assert answer.fields[39] == "00" and c.bad_macs == []


async def test_an_institution_without_a_mac_key_is_answered_96(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    other = "01030000"
    insts = [{"id": other, "dialect": "bank", "allowed": ["127.0.0.0/8"], "mac": True}]
    async with running_node(clean_db, clean_redis, sims, tmp_path,
                            overrides={"institutions": insts}) as n:
        await asyncio.wait_for(n.components["accounts"].synced.wait(), 20)
        acct = await active_account(sims.marketing)
        async with client(n, mac_key=b"\x11" * 16, timeout=5) as c:
            c.institution = other
            assert (await c.sign_on()).fields[39] == "00"
            assert (await c.request(c.payment(acct, 100))).fields[39] == "96"
            assert (await c.echo()).fields[39] == "00"
        assert await _count(n, "payments") == 0


async def test_a_sign_on_without_its_mandatory_fields_is_a_format_error(node: Node) -> None:
    async with client(node) as c:
        m = c.network("001")
        del m.fields[11]
        assert (await c.request(m)).fields[39] == "30"


async def test_a_malformed_request_of_an_unknown_type_is_answered_12(node: Node) -> None:
    async with client(node, "post", timeout=5) as c:
        await c.sign_on()
        m = Message("0100", {4: "000000000100", 7: "1126120000", 11: "000999",
                             32: c.institution})
        frame = c.codec.encode_frame(m).replace(b"000000000100", b"00000000010X")
        answer = await c.request(m, frame=frame)
        assert answer.mti == "0110" and answer.fields[39] == "12"


async def test_the_connection_limit_holds_when_one_address_serves_several_institutions(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    insts = [{"id": i, "dialect": "bank", "allowed": ["127.0.0.0/8"], "mac": True,
              "max_connections": 1} for i in (BANK, "01030000")]
    async with running_node(clean_db, clean_redis, sims, tmp_path,
                            overrides={"institutions": insts}) as n:
        listener = n.components["links"]["bank"]
        links = [client(n, "bank") for _ in range(3)]
        for c in links:
            await c.connect()
        try:
            codes = [(await c.sign_on()).fields[39] for c in links]
            assert codes == ["00", "58", "58"]  # one connection for BANK, as configured
            assert listener.count[BANK] == 1
        finally:
            for c in links:
                await c.close()
        for _ in range(50):
            if not listener.protocols:
                break
            await asyncio.sleep(0.05)
        assert listener.count[BANK] == 0 and min(listener.count.values(), default=0) >= 0


async def test_bytes_that_never_make_a_frame_do_not_keep_a_link_open(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    async with running_node(clean_db, clean_redis, sims, tmp_path,
                            overrides={"links": {"idle_timeout_s": 0.5}}) as n:
        listener = n.components["links"]["bank"]
        _, trickle = await asyncio.open_connection("127.0.0.1", n.ports.bank)
        _, keeper = await asyncio.open_connection("127.0.0.1", n.ports.bank)
        trickle.write(b"\x00\x30")  # announces 48 bytes, then one byte every 0.2 s
        for _ in range(10):
            await asyncio.sleep(0.2)
            for w, data in ((trickle, b"0"), (keeper, b"\x00\x00")):  # keeper: keep-alives
                if not w.is_closing():
                    w.write(data)
        assert len(listener.protocols) == 1  # the trickle was cut off, the keep-alives kept
        trickle.close()
        keeper.close()
