"""The HTTP payment API against a real node, PostgreSQL, Redis and simulators."""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import pytest

from switch.clients import revoke_client
from switch.node import Node
from tests.nodekit import (
    Api,
    Sims,
    StallProxy,
    active_account,
    api_key,
    closed_account,
    running_node,
    until_a_statement_waits_on_a_lock,
)


@pytest.fixture
async def api(node: Node) -> AsyncIterator[Api]:
    key = await api_key(node.pool, "internet")
    async with aiohttp.ClientSession() as s:
        yield Api(s, f"http://127.0.0.1:{node.ports.http}", key)


async def _drain(node: Node, within_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        n = await node.pool.fetchval("SELECT count(*) FROM outbox WHERE state <> 'sent'")
        if n == 0:
            return
        node.components["forwarder"].wake()
        await asyncio.sleep(0.05)
    raise AssertionError("outbox did not drain")


async def test_payment_is_confirmed_then_posted_once(node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    st, h, body = await api.call("POST", "/v1/payments", idem="k1",
                                 json={"account_no": acct, "amount": 12050, "method": "cash"})
    assert st == 201, body
    doc = orjson.loads(body)
    assert doc["status"] == "confirmed" and doc["amount"] == 12050 and doc["channel"] == "internet"
    assert doc["posting"] == "pending" and len(doc["receipt_no"]) <= 20
    await _drain(node)
    st, _, body = await api.call("GET", f"/v1/payments/{doc['payment_id']}")
    assert st == 200 and orjson.loads(body)["posting"] == "posted"
    n = await node.pool.fetchval("SELECT count(*) FROM payments WHERE account_no = $1", acct)
    assert n == 1


async def test_replay_is_byte_identical(node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    req = {"account_no": acct, "amount": 500, "method": "wallet", "reference": "r-1"}
    st1, _, b1 = await api.call("POST", "/v1/payments", idem="same", json=req)
    st2, h2, b2 = await api.call("POST", "/v1/payments", idem="same", json=req)
    assert (st1, st2) == (201, 201) and b1 == b2
    assert h2.get("Idempotent-Replayed") == "true"
    # Redis forgets everything: PostgreSQL still answers the same, byte for byte
    await node.redis.flushdb()
    st3, h3, b3 = await api.call("POST", "/v1/payments", idem="same", json=req)
    assert st3 == 201 and b3 == b1 and h3.get("Idempotent-Replayed") == "true"
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 1


async def _refused_soon(api: Api, path: str) -> tuple[int, bytes]:
    for _ in range(100):  # the notice comes within moments; 2 s at most here
        st, _, body = await api.call("GET", path)
        if st != 200:
            return st, body
        await asyncio.sleep(0.02)
    return st, body


async def test_a_revoked_key_is_refused_at_once_not_after_the_cache(node: Node,
                                                                   sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    clients = node.components["clients"]
    await asyncio.wait_for(clients.listening.wait(), 10)
    assert clients.ttl_s >= 30  # so a refusal within 2 s is the notice's doing
    url = f"http://127.0.0.1:{node.ports.http}"
    async with aiohttp.ClientSession() as s:
        by_cli = Api(s, url, await api_key(node.pool, "internet", name="leaver"))
        by_sql = Api(s, url, await api_key(node.pool, "counter", name="hall-9"))
        for api in (by_cli, by_sql):  # known, and now cached
            assert (await api.call("GET", f"/v1/accounts/{acct}"))[0] == 200
        assert await revoke_client(node.pool, "leaver") == 1
        st, body = await _refused_soon(by_cli, f"/v1/accounts/{acct}")
        assert st == 401 and orjson.loads(body)["code"] == "unauthenticated"
        # straight in the database, as an operator might: the same
        assert (await by_sql.call("GET", f"/v1/accounts/{acct}"))[0] == 200
        await node.pool.execute("UPDATE api_clients SET revoked_at = now() WHERE name = $1",
                                "hall-9")
        st, body = await _refused_soon(by_sql, f"/v1/accounts/{acct}")
        assert st == 401
        # the listening connection is cut: a key revoked while nobody listens (its notice
        # is lost) is refused once the listener is back, which drops the cache again
        by_gap = Api(s, url, await api_key(node.pool, "internet", name="in-the-gap"))
        assert (await by_gap.call("GET", f"/v1/accounts/{acct}"))[0] == 200
        await node.pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()")
        await _wait_for(lambda: not clients.listening.is_set(), 5)
        await node.pool.execute("UPDATE api_clients SET revoked_at = now() WHERE name = $1",
                                "in-the-gap")
        await asyncio.wait_for(clients.listening.wait(), 10)
        assert (await by_gap.call("GET", f"/v1/accounts/{acct}"))[0] == 401


async def test_a_key_revoked_while_it_was_being_looked_up_is_not_cached_as_valid(
        node: Node, sims: Sims) -> None:
    from switch.clients import ClientDirectory, create_client

    listening = node.components["clients"]
    await asyncio.wait_for(listening.listening.wait(), 10)
    _, key = await create_client(node.pool, "racing", "internet")

    class RevokedMeanwhile:
        """The real pool; its lookup row comes back only after the key was revoked and the
        directory heard of it (the race, made certain)."""

        async def fetchrow(self, query: str, *args: object) -> object:
            row = await node.pool.fetchrow(query, *args)
            heard = directory._changes
            await revoke_client(node.pool, "racing")
            await _wait_for(lambda: directory._changes > heard, 5)
            return row

    directory = ClientDirectory(cast(Any, RevokedMeanwhile()))
    directory.listen(f"{node.services.database}")
    try:
        await asyncio.wait_for(directory.listening.wait(), 10)
        # read before the revocation: good for this request, but not kept
        assert await directory.authenticate(key) is not None
        directory.pool = node.pool
        assert await directory.authenticate(key) is None
    finally:
        await directory.close()


async def test_the_key_listener_outlives_any_error_it_meets(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    from switch import clients
    from switch.clients import ClientDirectory

    monkeypatch.setattr(clients, "LISTEN_RETRY_S", 0.05)  # so that it tries again, often

    # every host in recovery for a read-write URL is an error outside asyncpg's PostgresError
    # and InterfaceError families; 'standby' against the primary stands in for it here
    url = node.services.database
    directory = ClientDirectory(node.pool)
    directory.listen(url + ("&" if "?" in url else "?") + "target_session_attrs=standby")
    try:
        await asyncio.sleep(1.0)  # many attempts, each refused
        assert directory._listener is not None and not directory._listener.done()
        assert not directory.listening.is_set()
    finally:
        await directory.close()  # and closing it raises nothing


async def _wait_for(cond: object, within_s: float) -> None:
    assert callable(cond)
    for _ in range(int(within_s / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_a_retry_sent_as_soon_as_the_answer_came_is_replayed(node: Node, api: Api,
                                                                   sims: Sims) -> None:
    # the answer is stored in Redis without waiting for it there: queued ahead of any retry's
    # claim, so the retry is replayed, never told the first request is still in progress
    acct = await active_account(sims.marketing)
    for i in range(25):
        req = {"account_no": acct, "amount": 100 + i, "method": "wallet", "reference": f"q{i}"}
        st1, _, b1 = await api.call("POST", "/v1/payments", idem=f"quick-{i}", json=req)
        st2, h2, b2 = await api.call("POST", "/v1/payments", idem=f"quick-{i}", json=req)
        assert (st1, st2, b2) == (201, 201, b1) and h2.get("Idempotent-Replayed") == "true"
    keys = await node.redis.keys("gp:idem:*:quick-*")
    assert len(keys) == 25
    assert {await node.redis.hget(k, "state") for k in keys} == {b"done"}
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 25


async def test_same_key_other_body_is_422(node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    await api.call("POST", "/v1/payments", idem="k", json={"account_no": acct, "amount": 100,
                                                           "method": "cash"})
    st, h, body = await api.call("POST", "/v1/payments", idem="k",
                                 json={"account_no": acct, "amount": 101, "method": "cash"})
    assert st == 422 and orjson.loads(body)["code"] == "idempotency_key_reused"
    assert h["Content-Type"].startswith("application/problem+json")
    await node.redis.flushdb()
    st, _, body = await api.call("POST", "/v1/payments", idem="k",
                                 json={"account_no": acct, "amount": 101, "method": "cash"})
    assert st == 422 and orjson.loads(body)["code"] == "idempotency_key_reused"


async def test_concurrent_same_key_never_pays_twice(node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    req = {"account_no": acct, "amount": 777, "method": "transfer"}
    results = await asyncio.gather(*(api.call("POST", "/v1/payments", idem="race", json=req)
                                     for _ in range(20)))
    statuses = [r[0] for r in results]
    assert set(statuses) <= {201, 409}, statuses
    bodies = {r[2] for r in results if r[0] == 201}
    assert len(bodies) == 1
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 1


async def test_concurrent_same_key_without_redis_state(node: Node, api: Api, sims: Sims) -> None:
    """Redis flushed between claims: the database fence alone keeps it to one payment."""
    acct = await active_account(sims.marketing)
    req = {"account_no": acct, "amount": 778, "method": "transfer"}

    async def one() -> tuple[int, dict[str, str], bytes]:
        await node.redis.flushdb()
        return await api.call("POST", "/v1/payments", idem="race2", json=req)

    results = await asyncio.gather(*(one() for _ in range(10)))
    assert {r[0] for r in results} <= {201, 409}
    assert len({r[2] for r in results if r[0] == 201}) == 1
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"amount": 10.5, "method": "cash"}, 400, "invalid_amount_type"),
        ({"amount": "100", "method": "cash"}, 400, "invalid_amount_type"),
        ({"amount": -5, "method": "cash"}, 400, "invalid_amount_type"),
        ({"amount": True, "method": "cash"}, 400, "invalid_amount_type"),
        ({"amount": 0, "method": "cash"}, 422, "invalid_amount"),
        ({"amount": 5_000_001, "method": "cash"}, 422, "invalid_amount"),
        # an integer beyond 64 bits is still an integer over the limit (it was read as a float)
        ({"amount": 2**64, "method": "cash"}, 422, "invalid_amount"),
        ({"amount": 1e3, "method": "cash"}, 400, "invalid_amount_type"),
        ({"amount": 100, "method": "cheque"}, 400, "invalid_method"),
        ({"amount": 100, "method": "cash", "extra": 1}, 400, "unknown_field"),
        # a NUL cannot be stored as text: it must be refused alone, not fail a whole batch
        ({"amount": 100, "method": "cash", "reference": "a\u0000b"}, 400, "invalid_reference"),
        ({"amount": 100, "method": "cash", "reference": "tab\there"}, 400, "invalid_reference"),
        ({"amount": 100, "method": "cash", "reference": ""}, 400, "invalid_reference"),
        # `$` in a pattern also matches before a final newline: checked with fullmatch
        ({"account_no": "1000000008\n", "amount": 100, "method": "cash"}, 400,
         "invalid_account_no"),
    ],
)
async def test_amount_and_body_validation(node: Node, api: Api, sims: Sims,
                                          body: dict[str, object], status: int,
                                          code: str) -> None:
    acct = await active_account(sims.marketing)
    st, h, raw = await api.call("POST", "/v1/payments", idem=f"v-{uuid.uuid4().hex[:8]}",
                                json={"account_no": acct, **body})
    doc = orjson.loads(raw)
    assert st == status and doc["code"] == code and doc["status"] == status
    assert {"type", "title", "detail"} <= set(doc)
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 0


async def test_accounts_unknown_closed_and_malformed(node: Node, api: Api, sims: Sims) -> None:
    req = {"amount": 100, "method": "cash"}
    st, _, raw = await api.call("POST", "/v1/payments", idem="a1",
                                json={"account_no": "0000000001", **req})
    assert st == 404 and orjson.loads(raw)["code"] == "account_not_found"
    closed = await closed_account(sims.marketing)
    st, _, raw = await api.call("POST", "/v1/payments", idem="a2",
                                json={"account_no": closed, **req})
    assert st == 422 and orjson.loads(raw)["code"] == "account_closed"
    st, _, raw = await api.call("POST", "/v1/payments", idem="a3",
                                json={"account_no": "12345", **req})
    assert st == 400
    st, _, raw = await api.call("GET", "/v1/accounts/12ab")
    assert st == 400
    st, _, raw = await api.call("GET", "/v1/accounts/0000000001")
    assert st == 404 and orjson.loads(raw)["code"] == "account_not_found"


async def test_account_inquiry_live_then_stale(node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    st, _, raw = await api.call("GET", f"/v1/accounts/{acct}")
    doc = orjson.loads(raw)
    assert st == 200 and doc["stale"] is False and doc["account_no"] == acct
    assert len(doc["name"]) >= 2 and set(doc["name"][1:]) == {"*"}
    await sims.marketing.set_faults(latency_ms=3000)
    try:
        st, _, raw = await api.call("GET", f"/v1/accounts/{acct}")
    finally:
        await sims.marketing.clear_faults()
    doc2 = orjson.loads(raw)
    assert st == 200 and doc2["stale"] is True and doc2["arrears"] == doc["arrears"]


async def test_idempotency_key_and_auth_errors(node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    req = {"account_no": acct, "amount": 100, "method": "cash"}
    st, _, raw = await api.call("POST", "/v1/payments", json=req)
    assert st == 400 and orjson.loads(raw)["code"] == "idempotency_key_missing"
    st, _, raw = await api.call("POST", "/v1/payments", json=req, idem="bad key!")
    assert st == 400 and orjson.loads(raw)["code"] == "idempotency_key_missing"
    anon = Api(api.session, api.base, None)
    st, _, _ = await anon.call("POST", "/v1/payments", json=req, idem="x")
    assert st == 401
    wrong = Api(api.session, api.base, "gp_not_a_key")
    st, _, raw = await wrong.call("POST", "/v1/payments", json=req, idem="x")
    assert st == 401 and b"gp_not_a_key" not in raw
    ivr = Api(api.session, api.base, await api_key(node.pool, "ivr"))
    st, _, raw = await ivr.call("POST", "/v1/payments", json=req, idem="x")
    assert st == 403 and orjson.loads(raw)["code"] == "wrong_channel"
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 0


async def test_only_the_channel_that_made_it_reads_it(node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    _, _, raw = await api.call("POST", "/v1/payments", idem="own",
                               json={"account_no": acct, "amount": 100, "method": "cash"})
    pid = orjson.loads(raw)["payment_id"]
    counter = Api(api.session, api.base, await api_key(node.pool, "counter"))
    st, _, _ = await counter.call("GET", f"/v1/payments/{pid}")
    assert st == 404
    st, _, _ = await api.call("GET", f"/v1/payments/{uuid.uuid4()}")
    assert st == 404


async def test_a_partner_reads_and_reverses_only_its_own_payments(node: Node, api: Api,
                                                                   sims: Sims) -> None:
    """Partners are separate organisations: one partner's key neither reads nor reverses
    another's payment (404, as for a payment that does not exist); the utility's own counters
    share theirs within the channel."""
    acct = await active_account(sims.marketing)
    one = Api(api.session, api.base, await api_key(node.pool, "partner", "partner-one"))
    other = Api(api.session, api.base, await api_key(node.pool, "partner", "partner-two"))
    _, _, raw = await one.call("POST", "/v1/payments", idem="p1",
                               json={"account_no": acct, "amount": 100, "method": "wallet"})
    pid = orjson.loads(raw)["payment_id"]
    st, _, raw = await other.call("GET", f"/v1/payments/{pid}")
    assert st == 404 and orjson.loads(raw)["code"] == "payment_not_found"
    st, _, raw = await other.call("POST", f"/v1/payments/{pid}/reversal", idem="r1")
    assert st == 404 and orjson.loads(raw)["code"] == "payment_not_found"
    assert await node.pool.fetchval("SELECT reversed_at FROM payments WHERE id = $1",
                                    uuid.UUID(pid)) is None
    st, _, _ = await one.call("GET", f"/v1/payments/{pid}")
    assert st == 200
    st, _, _ = await one.call("POST", f"/v1/payments/{pid}/reversal", idem="r1")
    assert st == 200
    counter = Api(api.session, api.base, await api_key(node.pool, "counter", "hall-1"))
    hall = Api(api.session, api.base, await api_key(node.pool, "counter", "hall-2"))
    _, _, raw = await counter.call("POST", "/v1/payments", idem="c1",
                                   json={"account_no": acct, "amount": 100, "method": "cash"})
    st, _, _ = await hall.call("GET", f"/v1/payments/{orjson.loads(raw)['payment_id']}")
    assert st == 200


async def test_a_rotated_key_is_the_same_client(node: Node, api: Api, sims: Sims) -> None:
    """A new key added under a client's name is that client: a retry sent with it is replayed,
    not paid again, and a partner still reads and reverses what it paid with its old key."""
    from switch.clients import create_client

    acct = await active_account(sims.marketing)
    old = Api(api.session, api.base, await api_key(node.pool, "partner", "rotating"))
    body = {"account_no": acct, "amount": 700, "method": "wallet"}
    st, _, first = await old.call("POST", "/v1/payments", idem="rot-1", json=body)
    assert st == 201
    new = Api(api.session, api.base, await api_key(node.pool, "partner", "rotating"))
    st, headers, again = await new.call("POST", "/v1/payments", idem="rot-1", json=body)
    assert st == 201 and again == first and headers.get("Idempotent-Replayed") == "true"
    assert await node.pool.fetchval("SELECT count(*) FROM payments WHERE account_no = $1"
                                    " AND amount = 700", acct) == 1
    pid = orjson.loads(first)["payment_id"]
    assert (await new.call("GET", f"/v1/payments/{pid}"))[0] == 200
    assert (await new.call("POST", f"/v1/payments/{pid}/reversal", idem="rv"))[0] == 200
    with pytest.raises(ValueError, match="partner channel"):  # a name is one channel's
        await create_client(node.pool, "rotating", "internet")
    # every key revoked: the name starts a new client, which inherits nothing
    assert await revoke_client(node.pool, "rotating") == 2
    later = Api(api.session, api.base, await api_key(node.pool, "partner", "rotating"))
    assert (await later.call("GET", f"/v1/payments/{pid}"))[0] == 404
    st, headers, _ = await later.call("POST", "/v1/payments", idem="rot-1", json=body)
    assert st == 201 and "Idempotent-Replayed" not in headers


async def test_reversal_same_day_repeatable_and_forwarded_after_original(
        node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    _, _, raw = await api.call("POST", "/v1/payments", idem="rv",
                               json={"account_no": acct, "amount": 2500, "method": "cash"})
    pid = orjson.loads(raw)["payment_id"]
    st, _, r1 = await api.call("POST", f"/v1/payments/{pid}/reversal", idem="rv-1")
    assert st == 200
    d1 = orjson.loads(r1)
    assert d1["status"] == "reversed" and "reversed_at" in d1
    st, _, r2 = await api.call("POST", f"/v1/payments/{pid}/reversal", idem="rv-1")
    assert st == 200 and orjson.loads(r2)["reversed_at"] == d1["reversed_at"]
    await _drain(node)
    rows = await node.pool.fetch("SELECT kind, sent_at FROM outbox ORDER BY sent_at")
    assert [r["kind"] for r in rows] == ["payment", "reversal"]
    st, _, _ = await api.call("POST", f"/v1/payments/{pid}/reversal")
    assert st == 400
    # repeated once the reversal is forwarded, with its key or another: the first answer,
    # byte for byte (its posting still "pending"), not the payment as it is now
    st, h, r3 = await api.call("POST", f"/v1/payments/{pid}/reversal", idem="rv-1")
    assert (st, r3) == (200, r1) and h.get("Idempotent-Replayed") == "true"
    st, h, r4 = await api.call("POST", f"/v1/payments/{pid}/reversal", idem="rv-2")
    assert (st, r4) == (200, r1) and h.get("Idempotent-Replayed") == "true"
    # the key of this reversal, for another payment: refused, and that payment stands
    _, _, raw = await api.call("POST", "/v1/payments", idem="rv-other",
                               json={"account_no": acct, "amount": 300, "method": "cash"})
    other = orjson.loads(raw)["payment_id"]
    st, _, r5 = await api.call("POST", f"/v1/payments/{other}/reversal", idem="rv-1")
    assert st == 422 and orjson.loads(r5)["code"] == "idempotency_key_reused"
    st, _, r6 = await api.call("GET", f"/v1/payments/{other}")
    assert st == 200 and "reversed_at" not in orjson.loads(r6)
    # two keys in one request: refused, not one of them picked
    two = [*api.headers().items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    async with api.session.post(f"{api.base}/v1/payments/{other}/reversal",
                                headers=two) as r:
        assert r.status == 400 and (await r.json())["code"] == "idempotency_key_missing"


async def test_refusals_do_not_echo_what_was_sent_and_two_keys_are_refused(
        node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    secret = "sk_live_7f3a9c"  # pasted where it does not belong
    st, _, raw = await api.call("POST", "/v1/payments", idem="echo-1",
                                json={"account_no": acct, "amount": 300, "method": "cash",
                                      secret: 1})
    assert st == 400 and orjson.loads(raw)["code"] == "unknown_field"
    assert secret not in raw.decode()
    st, _, raw = await api.call("GET", f"/v1/{secret}/payments")
    assert st == 404 and secret not in raw.decode()
    # two API keys in one request: refused, not the first one taken
    other = await api_key(node.pool, "internet")
    two = [("Authorization", f"Bearer {api.key}"), ("Authorization", f"Bearer {other}")]
    async with api.session.get(f"{api.base}/v1/accounts/{acct}", headers=two) as r:
        assert r.status == 400 and (await r.json())["code"] == "authorization_repeated"


async def test_reversal_of_another_business_date_is_refused(node: Node, api: Api,
                                                            sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    _, _, raw = await api.call("POST", "/v1/payments", idem="old",
                               json={"account_no": acct, "amount": 300, "method": "cash"})
    pid = orjson.loads(raw)["payment_id"]
    await node.pool.execute("UPDATE payments SET business_date = business_date - 1")
    st, _, raw = await api.call("POST", f"/v1/payments/{pid}/reversal", idem="old-r")
    assert st == 409 and orjson.loads(raw)["code"] == "not_reversible"


async def test_a_reversal_that_waits_past_the_cut_over_is_refused(
        node: Node, api: Api, sims: Sims, monkeypatch: pytest.MonkeyPatch) -> None:
    # the business date is read once the payment is locked, not before (it was: a reversal
    # approved after the cut-over was booked on the payment's old date)
    acct = await active_account(sims.marketing)
    _, _, raw = await api.call("POST", "/v1/payments", idem="late",
                               json={"account_no": acct, "amount": 300, "method": "cash"})
    pid = orjson.loads(raw)["payment_id"]
    cal = node.components["calendar"]
    async with node.pool.acquire() as blocker:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM payments FOR UPDATE")
            answer = asyncio.ensure_future(
                api.call("POST", f"/v1/payments/{pid}/reversal", idem="late-r"))
            await until_a_statement_waits_on_a_lock(node.pool)
            monkeypatch.setattr(cal, "date_at",
                                lambda at, was=cal.date_at: was(at) + timedelta(days=1))
        st, _, raw = await asyncio.wait_for(answer, 10)
    assert st == 409 and orjson.loads(raw)["code"] == "not_reversible"
    assert await node.pool.fetchval("SELECT count(*) FROM reversals") == 0


async def test_marketing_down_payment_confirmed_then_credited_once(
        node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    await sims.marketing.set_faults(error_rate=1.0)
    try:
        st, _, raw = await api.call("POST", "/v1/payments", idem="down",
                                    json={"account_no": acct, "amount": 900, "method": "cash"})
        assert st == 201
        await asyncio.sleep(0.3)
        assert await node.pool.fetchval("SELECT state FROM outbox") == "pending"
    finally:
        await sims.marketing.clear_faults()
    await node.pool.execute("UPDATE outbox SET next_attempt_at = now()")
    await _drain(node)


async def _balance(sims: Sims, acct: str) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{sims.marketing.url}/accounts/{acct}") as r:
            doc = await r.json()
    return int(doc["prepaid_balance"]) - int(doc["arrears"])


async def test_marketing_cuts_off_after_commit_credited_once(
        node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing, start=7)
    before = await _balance(sims, acct)
    # held 1 s, then the connection closes: inside the 5 s a posting is awaited, the same
    # unanswered posting as a timeout
    await sims.marketing.set_faults(timeout_after_commit_rate=1.0, hold_ms=1000)
    try:
        st, _, raw = await api.call("POST", "/v1/payments", idem="tac",
                                    json={"account_no": acct, "amount": 901, "method": "cash"})
        assert st == 201
        await asyncio.sleep(1.5)  # the first attempt committed there, then was cut off
        assert await node.pool.fetchval("SELECT attempts FROM outbox") >= 1
    finally:
        await sims.marketing.clear_faults()
    await node.pool.execute("UPDATE outbox SET next_attempt_at = now()")
    await _drain(node)
    pid = await node.pool.fetchval("SELECT posting_id FROM outbox")
    assert sims.marketing.ledger.posting(pid) is not None
    assert await _balance(sims, acct) - before == 901  # credited once, not twice


async def test_an_active_node_whose_lease_lapsed_says_so(node: Node, api: Api,
                                                          sims: Sims) -> None:
    # a lone node that cannot renew (the database out of reach) sent clients to "the active
    # node", which does not exist
    await node.lease.halt()
    node.lease._valid_until = 0.0  # the renewals failed for a ttl
    st, _, raw = await api.call("GET", f"/v1/accounts/{await active_account(sims.marketing)}")
    doc = orjson.loads(raw)
    assert st == 503 and doc["code"] == "standby"
    assert "could not renew its lease" in doc["detail"], doc


async def test_standby_node_answers_503(clean_db: str, clean_redis: str, sims: Sims,
                                        tmp_path: Path) -> None:
    async with running_node(clean_db, clean_redis, sims, tmp_path / "a", "node-a") as a:
        async with running_node(clean_db, clean_redis, sims, tmp_path / "b", "node-b",
                                wait_active=False) as b:
            assert a.is_active and not b.is_active
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{b.ports.http}/readyz") as r:
                    assert r.status == 503
                async with s.get(f"http://127.0.0.1:{a.ports.http}/readyz") as r:
                    assert r.status == 200
                key = await api_key(b.pool, "internet")
                async with s.post(f"http://127.0.0.1:{b.ports.http}/v1/payments",
                                  json={"account_no": "1", "amount": 1, "method": "cash"},
                                  headers={"Authorization": f"Bearer {key}",
                                           "Idempotency-Key": "s"}) as r:
                    assert r.status == 503 and (await r.json())["code"] == "standby"
                # a read of a payment too: the standby answers no payment request
                async with s.get(f"http://127.0.0.1:{b.ports.http}/v1/payments/{uuid.uuid4()}",
                                 headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 503 and (await r.json())["code"] == "standby"


async def test_openapi_document_validates(node: Node, api: Api) -> None:
    from openapi_spec_validator import validate

    st, _, raw = await api.call("GET", "/v1/openapi.json")
    assert st == 200
    doc = orjson.loads(raw)
    validate(doc)
    assert {"/v1/payments", "/v1/payments/{payment_id}", "/v1/payments/{payment_id}/reversal",
            "/v1/accounts/{account_no}"} <= set(doc["paths"])


async def test_metrics_and_health(node: Node, api: Api) -> None:
    st, _, raw = await api.call("GET", "/metrics")
    assert st == 200 and b"gridpay_payments_total" in raw
    st, _, raw = await api.call("GET", "/healthz")
    assert st == 200
    st, _, raw = await api.call("GET", "/nope")
    assert st == 404 and orjson.loads(raw)["code"] == "not_found"


async def test_malformed_json_is_a_clear_400(node: Node, api: Api) -> None:
    st, _, raw = await api.call("POST", "/v1/payments", idem="mj", data=b"{not json",
                                headers={"Content-Type": "application/json"})
    assert st == 400 and orjson.loads(raw)["code"] == "malformed_json"


async def test_a_member_named_twice_is_a_clear_400(node: Node, api: Api, sims: Sims) -> None:
    # the last one counted, where a gateway in front may have checked the first
    acct = await active_account(sims.marketing)
    for i, body in enumerate((
            b'{"account_no": "%s", "amount": 100, "method": "cash", "amount": 100000}',
            b'{"account_no":"%s","amount":100,"method":"cash","method" :"wallet"}',
            b'{"account_no": "%s", "amount": 100, "method": "cash",'
            b' "reference": "x", "extra": {"a": 1, "a": 2}}')):
        st, _, raw = await api.call("POST", "/v1/payments", idem=f"dup{i}",
                                    data=body % acct.encode(),
                                    headers={"Content-Type": "application/json"})
        doc = orjson.loads(raw)
        assert st == 400 and doc["code"] == "malformed_json", raw
        assert "twice" in doc["detail"]
    # text that looks like a member name inside a string is no repeat
    st, _, raw = await api.call("POST", "/v1/payments", idem="dup-no", data=b'{"account_no": "'
                                + acct.encode() + b'", "amount": 100, "method": "cash",'
                                b' "reference": "amount\\": 5, \\"amount\\" : 6"}',
                                headers={"Content-Type": "application/json"})
    assert st == 201, raw
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 1


async def test_a_body_in_another_charset_than_utf_8_is_a_clear_415(node: Node, api: Api,
                                                                   sims: Sims) -> None:
    # it was read as UTF-8 whatever it said it was
    acct = await active_account(sims.marketing)
    body = orjson.dumps({"account_no": acct, "amount": 100, "method": "cash",
                         "reference": "caf\u00e9"})
    st, h, raw = await api.call("POST", "/v1/payments", idem="cs1", data=body.decode().encode(
        "latin-1"), headers={"Content-Type": "application/json; charset=latin-1"})
    assert st == 415 and h["Content-Type"] == "application/problem+json"
    assert orjson.loads(raw)["code"] == "unsupported_media_type"
    assert "latin" not in raw.decode()  # what was sent is not echoed
    for ctype in ("application/json; charset=UTF-8", "application/json;charset=utf8"):
        st, _, raw = await api.call("POST", "/v1/payments", idem=f"cs-{ctype[-1]}", data=body,
                                    headers={"Content-Type": ctype})
        assert st == 201, raw


async def test_a_commit_cut_short_by_the_switch_stopping_is_an_unknown_outcome(
        node: Node, api: Api, sims: Sims) -> None:
    # the commit waits on the lease row (locked here), and the posting path stops meanwhile:
    # the statement may already be committed, so "nothing was charged" would be a guess
    acct = await active_account(sims.marketing)
    async with node.pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("SELECT 1 FROM node_lease WHERE id = 1 FOR UPDATE")
        call = asyncio.ensure_future(api.call(
            "POST", "/v1/payments", idem="cut",
            json={"account_no": acct, "amount": 100, "method": "cash"}))
        await until_a_statement_waits_on_a_lock(node.pool)
        await node.components["ledger"].stop(grace_s=0.1)
        st, _, raw = await call
    assert st == 503, raw
    doc = orjson.loads(raw)
    assert doc["code"] == "unavailable" and "may or may not" in doc["detail"], doc


async def test_a_method_not_allowed_says_which_are(node: Node, api: Api) -> None:
    st, headers, raw = await api.call("DELETE", "/v1/payments")
    assert st == 405 and orjson.loads(raw)["code"] == "method_not_allowed"
    assert headers["Content-Type"] == "application/problem+json"
    assert headers["Allow"] == "POST"


async def test_a_payment_meeting_a_database_that_went_away_is_a_503_to_retry(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    acct = await active_account(sims.marketing)
    async with running_node(clean_db, clean_redis, sims, tmp_path / "a") as node:
        key = await api_key(node.pool, "internet")
        async with aiohttp.ClientSession() as s:
            api = Api(s, f"http://127.0.0.1:{node.ports.http}", key)
            req = {"account_no": acct, "amount": 100, "method": "cash"}
            st, _, raw = await api.call("POST", "/v1/payments", idem="before", json=req)
            assert st == 201, raw
            # the node's connections to PostgreSQL are gone (the pool is closed under it)
            await node.pool.close()
            st, headers, raw = await api.call("POST", "/v1/payments", idem="after", json=req)
            assert st == 503, raw  # was a 500 internal_error
            doc = orjson.loads(raw)
            assert doc["code"] == "unavailable" and headers["Retry-After"] == "1"
            assert "same Idempotency-Key" in doc["detail"]
            # once the key's cached answer has expired, the key itself is looked up: a 503
            # too (it was a 500 after the cache's 30 s)
            node.components["clients"].ttl_s = 0
            st, headers, raw = await api.call("POST", "/v1/payments", idem="later", json=req)
            assert st == 503 and orjson.loads(raw)["code"] == "unavailable", raw
            assert "Retry-After" in headers
            # the metrics are still served, the outbox gauges as last read (they are read on
            # the relay's connections, closed here as well)
            await node.components["forwarder"].pool.close()
            st, _, raw = await api.call("GET", "/metrics")
            assert st == 200 and b"gridpay_payments_total" in raw



async def test_dead_letters_and_retry(clean_db: str, clean_redis: str, sims: Sims,
                                      tmp_path: Path) -> None:
    from switch.payments.forwarder import outbox_counts, retry_dead_letters

    await sims.marketing.clear_faults()
    async with running_node(clean_db, clean_redis, sims, tmp_path,
                            overrides={"forwarder": {"dead_letter_after_s": 1.0,
                                                     "backoff_initial_s": 0.05,
                                                     "backoff_max_s": 0.2}}) as node:
        await asyncio.wait_for(node.components["accounts"].synced.wait(), 20)
        key = await api_key(node.pool, "internet")
        acct = await active_account(sims.marketing, start=21)
        await sims.marketing.set_faults(error_rate=1.0)
        try:
            async with aiohttp.ClientSession() as s:
                api = Api(s, f"http://127.0.0.1:{node.ports.http}", key)
                st, _, raw = await api.call("POST", "/v1/payments", idem="dl", json={
                    "account_no": acct, "amount": 300, "method": "cash"})
                assert st == 201
                pid = orjson.loads(raw)["payment_id"]
                for _ in range(100):
                    if (await outbox_counts(node.pool))["dead"] == 1:
                        break
                    await asyncio.sleep(0.05)
                assert (await outbox_counts(node.pool))["dead"] == 1
                st, _, raw = await api.call("GET", f"/v1/payments/{pid}")
                assert orjson.loads(raw)["posting"] == "failed"
                st, _, raw = await api.call("GET", "/metrics")
                assert b"gridpay_outbox_dead 1.0" in raw
        finally:
            await sims.marketing.clear_faults()
        assert await retry_dead_letters(node.pool) == 1
        await _drain(node)
        assert (await outbox_counts(node.pool)) == {"pending": 0, "sent": 1, "dead": 0}
        # a posting that waited in the queue longer than dead_letter_after_s (behind a
        # backlog, or a reversal behind its original) is not given up on its first failure:
        # its time to die counts from that failure, not from when it was recorded
        relay = node.components["forwarder"]
        await relay.stop()
        async with aiohttp.ClientSession() as s:
            api = Api(s, f"http://127.0.0.1:{node.ports.http}", key)
            st, _, _ = await api.call("POST", "/v1/payments", idem="waited", json={
                "account_no": acct, "amount": 301, "method": "cash"})
            assert st == 201
        await node.pool.execute("UPDATE outbox SET created_at = now() - interval '1 hour'"
                                " WHERE state = 'pending'")
        await sims.marketing.set_faults(error_rate=1.0)
        try:
            await relay.forward_once()
        finally:
            await sims.marketing.clear_faults()
        row = await node.pool.fetchrow("SELECT state, attempts, first_failed_at FROM outbox"
                                       " WHERE amount = 301")
        assert row is not None
        assert row["state"] == "pending" and row["attempts"] == 1
        assert row["first_failed_at"] is not None


async def test_slow_marketing_does_not_slow_payments(node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing, start=31)
    await sims.marketing.set_faults(latency_ms=2000)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        st, _, _ = await api.call("POST", "/v1/payments", idem="slow",
                                  json={"account_no": acct, "amount": 640, "method": "cash"})
        assert st == 201
        assert loop.time() - started < 1.0  # confirmed at once: the credit follows later
    finally:
        await sims.marketing.clear_faults()
    await _drain(node)
    pid = await node.pool.fetchval("SELECT posting_id FROM outbox")
    assert sims.marketing.ledger.posting(pid) is not None


async def test_a_repeated_live_lookup_does_not_rewrite_the_mirror(node: Node, api: Api,
                                                                  sims: Sims) -> None:
    accounts = node.components["accounts"]
    acct = await active_account(sims.marketing, start=37)

    async def mirrored() -> tuple[datetime, int, int]:
        row = await node.pool.fetchrow(
            "SELECT refreshed_at, arrears, prepaid_balance FROM account_mirror"
            " WHERE account_no = $1", acct)
        assert row is not None
        return row["refreshed_at"], row["arrears"], row["prepaid_balance"]

    first = await accounts.lookup(acct)
    assert first is not None and not first.stale
    assert await accounts.flush() == 1  # written behind, in one batch
    at, _, _ = await mirrored()
    again = await accounts.lookup(acct)
    assert again is not None and (again.arrears, again.prepaid_balance) == (
        first.arrears, first.prepaid_balance)
    assert await accounts.flush() == 0
    assert (await mirrored())[0] == at  # the same answer: not written again
    # a payment changes what the marketing system answers: the next lookup writes it
    st, _, raw = await api.call("POST", "/v1/payments", idem=f"m-{uuid.uuid4().hex[:8]}",
                                json={"account_no": acct, "amount": 100, "method": "cash"})
    assert st == 201, raw
    before = (first.arrears, first.prepaid_balance)
    for _ in range(100):  # the relay posts it within moments
        after = await accounts.lookup(acct)
        assert after is not None
        if (after.arrears, after.prepaid_balance) != before:
            break
        await asyncio.sleep(0.05)
    assert (after.arrears, after.prepaid_balance) != before
    await accounts.flush()
    refreshed, arrears, prepaid = await mirrored()
    assert refreshed > at and (arrears, prepaid) == (after.arrears, after.prepaid_balance)


async def test_a_live_lookup_reaches_the_mirror_by_itself(node: Node, sims: Sims) -> None:
    accounts = node.components["accounts"]
    acct = await active_account(sims.marketing, start=41)
    await node.pool.execute("DELETE FROM account_mirror WHERE account_no = $1", acct)
    view = await accounts.lookup(acct)
    assert view is not None and not view.stale
    for _ in range(100):  # written behind, within moments, with no flush asked for
        row = await node.pool.fetchrow(
            "SELECT status, arrears FROM account_mirror WHERE account_no = $1", acct)
        if row is not None:
            break
        await asyncio.sleep(0.02)
    assert row is not None and (row["status"], row["arrears"]) == (view.status, view.arrears)


async def test_a_node_not_listening_refuses_a_revoked_key_within_the_cache_lifetime(
        node: Node, sims: Sims) -> None:
    from switch.clients import create_client

    directory = node.components["clients"]
    await directory.close()  # as if it could not hear the database's notices
    client_id, key = await create_client(node.pool, "to-revoke", "internet")
    assert (await directory.authenticate(key)).id == client_id  # now cached
    assert await revoke_client(node.pool, str(client_id)) == 1  # as the other node would
    assert await directory.authenticate(key) is not None  # the cached answer still stands
    old = directory.ttl_s
    directory.ttl_s = 0.05
    try:
        await asyncio.sleep(0.1)
        assert await directory.authenticate(key) is None  # read again: revoked
        assert await directory.authenticate(key) is None  # and not cached as valid
    finally:
        directory.ttl_s = old
    assert await revoke_client(node.pool, "to-revoke") == 0


async def test_a_wrong_body_after_redis_forgot_the_key_leaves_no_claim_behind(
        node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    first = {"account_no": acct, "amount": 100, "method": "cash"}
    other = {"account_no": acct, "amount": 101, "method": "cash"}
    st, _, paid = await api.call("POST", "/v1/payments", idem="kk", json=first)
    assert st == 201
    await node.redis.flushdb()  # or the key's lifetime in Redis ran out
    st, _, raw = await api.call("POST", "/v1/payments", idem="kk", json=other)
    assert st == 422 and orjson.loads(raw)["code"] == "idempotency_key_reused"
    # the right body is still answered with its payment, the wrong one still 422 (not 409)
    st, h, again = await api.call("POST", "/v1/payments", idem="kk", json=first)
    assert st == 201 and again == paid and h.get("Idempotent-Replayed") == "true"
    st, _, raw = await api.call("POST", "/v1/payments", idem="kk", json=other)
    assert st == 422 and orjson.loads(raw)["code"] == "idempotency_key_reused"
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 1


async def test_a_wrong_body_claim_left_in_redis_does_not_refuse_the_right_retry(
        node: Node, api: Api, sims: Sims) -> None:
    """Redis forgot a paid key, a request with another body claimed it, and Redis went away
    before that claim could be replaced with the stored answer: the claim stays for its 30 s.
    The payment's own retry is still answered with its payment (PostgreSQL is asked whenever
    a claim is in flight), not told that its key was reused."""
    acct = await active_account(sims.marketing)
    first = {"account_no": acct, "amount": 100, "method": "cash"}
    st, _, paid = await api.call("POST", "/v1/payments", idem="left", json=first)
    assert st == 201
    client_id = await node.pool.fetchval("SELECT client_id FROM payments")
    await node.redis.flushdb()
    idem = node.components["http_payments"].idempotency
    # the other body's claim, as it stays when Redis fails right after granting it
    await idem.claim(f"http:{client_id}:left", "ab" * 32)
    st, h, again = await api.call("POST", "/v1/payments", idem="left", json=first)
    assert st == 201 and again == paid and h.get("Idempotent-Replayed") == "true"
    st, _, raw = await api.call("POST", "/v1/payments", idem="left", json={**first, "amount": 7})
    assert st == 422 and orjson.loads(raw)["code"] == "idempotency_key_reused"
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 1


async def test_a_reference_takes_any_script_and_space_but_no_control_or_direction_mark(
        node: Node, api: Api, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    for i, ref in enumerate(["电费\u3000缴纳", "a\u00a0b", "电费 缴纳", "x\u200dy"]):
        st, _, raw = await api.call("POST", "/v1/payments", idem=f"ref-ok-{i}", json={
            "account_no": acct, "amount": 1, "method": "cash", "reference": ref})
        assert st == 201 and orjson.loads(raw)["reference"] == ref, (ref, raw)
    for i, ref in enumerate(["a\nb", "a\tb", "a\u2028b", "paid \u202e01", "\u2066x",
                             "a\x7fb"]):
        st, _, raw = await api.call("POST", "/v1/payments", idem=f"ref-bad-{i}", json={
            "account_no": acct, "amount": 1, "method": "cash", "reference": ref})
        assert st == 400 and orjson.loads(raw)["code"] == "invalid_reference", (ref, raw)
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 4


async def test_a_refusal_while_redis_stalls_leaves_the_key_free(node: Node, api: Api,
                                                                 sims: Sims,
                                                                 clean_redis: str) -> None:
    """A stopped Redis runs what it was sent once it goes on: a claim made for a request that
    was then refused outlived it, and the corrected retry under the same key was told 422 (or
    409) for the claim's 30 s. A refusal now asks Redis nothing; and a payment whose claim
    failed does not wait for Redis a second time to store its answer."""
    from switch.payments.idempotency import IdempotencyCache
    from switch.redis_pipe import RedisPipe

    acct = await active_account(sims.marketing)
    u = urllib.parse.urlsplit(clean_redis)
    proxy = StallProxy(u.hostname or "127.0.0.1", u.port or 6379)
    port = await proxy.start()
    pipe = RedisPipe(f"redis://127.0.0.1:{port}{u.path}", timeout_s=0.3,
                     connect_timeout_s=0.3, retry_after_s=0.2)
    svc = node.components["http_payments"]
    node.components["http_payments"] = type(svc)(
        accounts=svc.accounts, ledger=svc.ledger, max_amount=svc.max_amount,
        idempotency=IdempotencyCache(pipe, ttl_s=3600))
    try:
        st, _, _ = await api.call("POST", "/v1/payments", idem="before", json={
            "account_no": acct, "amount": 200, "method": "cash"})
        assert st == 201  # (Redis knows the claim's script: a stalled one runs it later)
        proxy.stall()
        st, _, raw = await api.call("POST", "/v1/payments", idem="fixme", json={
            "account_no": acct, "amount": svc.max_amount + 1, "method": "cash"})
        assert st == 422 and orjson.loads(raw)["code"] == "invalid_amount"
        st, _, paid = await api.call("POST", "/v1/payments", idem="stalled", json={
            "account_no": acct, "amount": 300, "method": "cash"})
        assert st == 201
        proxy.resume()  # whatever it was sent now runs
        await asyncio.sleep(0.3)
        st, _, raw = await api.call("POST", "/v1/payments", idem="fixme", json={
            "account_no": acct, "amount": 100, "method": "cash"})
        assert st == 201, raw
        # the paid request's claim ran late, and was never completed: PostgreSQL answers
        st, h, again = await api.call("POST", "/v1/payments", idem="stalled", json={
            "account_no": acct, "amount": 300, "method": "cash"})
        assert (st, again) == (201, paid) and h.get("Idempotent-Replayed") == "true"
    finally:
        node.components["http_payments"] = svc
        await pipe.aclose()
        await proxy.close()
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 3


async def test_an_amount_beyond_a_doubles_range_is_judged_as_the_integer_it_is(
        node: Node, api: Api, sims: Sims) -> None:
    """orjson refuses numbers beyond a double's range: an integer amount of 310 digits or
    more, valid JSON, was answered 400 malformed_json instead of 422 over the limit."""
    acct = await active_account(sims.marketing)
    cases = [(b"9" * 400, 422, "invalid_amount"), (b"1" + b"0" * 5000, 422, "invalid_amount"),
             (b"-" + b"9" * 400, 400, "invalid_amount_type"),
             (b"1e400", 400, "invalid_amount_type"), (b"9" * 400 + b"x", 400, "malformed_json")]
    for i, (amount, status, code) in enumerate(cases):
        raw = b'{"account_no": "' + acct.encode() + b'", "method": "cash", "amount": ' + amount
        st, _, body = await api.call("POST", "/v1/payments", idem=f"huge-{i}", data=raw + b"}",
                                     headers={"Content-Type": "application/json"})
        assert (st, orjson.loads(body)["code"]) == (status, code), (amount[:12], body)
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 0


async def test_a_retry_while_the_first_is_in_flight_is_409_even_if_it_would_be_refused(
        node: Node, api: Api, sims: Sims) -> None:
    """The first request holds its claim (still committing) when the account is closed: the
    retry is told 409 request_in_progress, as the contract says, not 422 account_closed
    (the first may well commit); another body under the key is 422 reused."""
    import hashlib

    acct = await closed_account(sims.marketing)
    body = {"account_no": acct, "amount": 100, "method": "cash"}
    assert api.key is not None
    client_id = await node.pool.fetchval(
        "SELECT client_id FROM api_clients WHERE key_hash = $1",
        hashlib.sha256(api.key.encode()).digest())
    req_hash = hashlib.sha256(orjson.dumps({**body, "reference": None},
                                           option=orjson.OPT_SORT_KEYS)).hexdigest()
    await node.redis.hset(f"gp:idem:http:{client_id}:first", mapping={
        "state": "inflight", "hash": req_hash})  # as the first request's claim holds it
    st, _, raw = await api.call("POST", "/v1/payments", idem="first", json=body)
    assert st == 409 and orjson.loads(raw)["code"] == "request_in_progress", raw
    st, _, raw = await api.call("POST", "/v1/payments", idem="first",
                                json={**body, "amount": 200})
    assert st == 422 and orjson.loads(raw)["code"] == "idempotency_key_reused", raw
    st, _, raw = await api.call("POST", "/v1/payments", idem="fresh", json=body)
    assert st == 422 and orjson.loads(raw)["code"] == "account_closed", raw


async def test_a_late_retry_gets_its_payment_whatever_changed_since(
        node: Node, api: Api, sims: Sims) -> None:
    closing = await active_account(sims.marketing, start=3)
    unmirrored = await active_account(sims.marketing, start=5)
    big = {"account_no": await active_account(sims.marketing, start=7), "amount": 90_000,
           "method": "cash"}
    paid = {}
    for idem, req in (("late-closed", {"account_no": closing, "amount": 100, "method": "cash"}),
                      ("late-unknown", {"account_no": unmirrored, "amount": 100,
                                        "method": "cash"}),
                      ("late-limit", big)):
        st, _, paid[idem] = await api.call("POST", "/v1/payments", idem=idem, json=req)
        assert st == 201
    # since then: one account closed, one gone from the mirror while the marketing system is
    # down, the amount limit lowered; and Redis forgot every key
    await node.pool.execute("UPDATE account_mirror SET status = 'closed' WHERE account_no = $1",
                            closing)
    await node.pool.execute("DELETE FROM account_mirror WHERE account_no = $1", unmirrored)
    node.components["accounts"]._profiles.clear()
    svc = node.components["http_payments"]
    node.components["http_payments"] = type(svc)(accounts=svc.accounts, ledger=svc.ledger,
                                                  idempotency=svc.idempotency, max_amount=50_000)
    await node.redis.flushdb()
    await sims.marketing.set_faults(error_rate=1.0)
    try:
        for idem, req in (("late-closed", {"account_no": closing, "amount": 100,
                                           "method": "cash"}),
                          ("late-unknown", {"account_no": unmirrored, "amount": 100,
                                            "method": "cash"}),
                          ("late-limit", big)):
            st, h, again = await api.call("POST", "/v1/payments", idem=idem, json=req)
            assert (st, again) == (201, paid[idem]), (idem, st, again)
            assert h.get("Idempotent-Replayed") == "true"
        # a new payment is still refused for each reason
        st, _, raw = await api.call("POST", "/v1/payments", idem="new-closed",
                                    json={"account_no": closing, "amount": 100,
                                          "method": "cash"})
        assert st == 422 and orjson.loads(raw)["code"] == "account_closed"
        st, _, raw = await api.call("POST", "/v1/payments", idem="new-big", json=big)
        assert st == 422 and orjson.loads(raw)["code"] == "invalid_amount"
    finally:
        await sims.marketing.clear_faults()
        node.components["http_payments"] = svc
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 3


async def test_a_key_that_is_not_utf8_is_a_401(node: Node, sims: Sims) -> None:
    acct = await active_account(sims.marketing)
    body = orjson.dumps({"account_no": acct, "amount": 100, "method": "cash"})
    r, w = await asyncio.open_connection("127.0.0.1", node.ports.http)
    w.write(b"POST /v1/payments HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer gp_\xff\xfeabc\r\nIdempotency-Key: u1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    assert data.startswith(b"HTTP/1.1 401"), data[:200]
    assert b"application/problem+json" in data


async def test_a_request_that_is_not_valid_http_gets_problem_json_that_quotes_nothing(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    key = await api_key(node.pool, "internet")
    caplog.set_level(logging.WARNING)
    for tail in (b"\x01", b" " + b"x" * 9000):  # a forbidden byte; a header line over the limit
        r, w = await asyncio.open_connection("127.0.0.1", node.ports.http)
        w.write(b"GET /v1/payments/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + key.encode() + tail + b"\r\n\r\n")
        data = await asyncio.wait_for(r.read(), 10)
        w.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split(b" ")[1]  # HTTP/1.0 when the version is unread
        assert status.startswith(b"4") and b"application/problem+json" in head, head
        assert key.encode() not in data and key[:12].encode() not in data
        assert orjson.loads(body)["code"] == "bad_request"
    # the client's mistake is a warning of one line, not an error with a traceback
    refused = [r for r in caplog.records if "malformed HTTP" in r.getMessage()]
    assert len(refused) == 2 and all(r.levelno == logging.WARNING for r in refused)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _one_response(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The head and body of one HTTP response, read by its Content-Length."""
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    return head, await asyncio.wait_for(r.readexactly(length), 10)


async def test_a_body_that_stops_arriving_is_a_408_that_closes_the_connection(
        node: Node, sims: Sims, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that announces a body and stops sending (slowly or on purpose) held its
    connection and the handler for ever: it is now answered 408 and cut off."""
    from switch.web import problems

    monkeypatch.setattr(problems, "BODY_TIMEOUT_S", 0.3)
    key = await api_key(node.pool, "internet")
    r, w = await asyncio.open_connection("127.0.0.1", node.ports.http)
    w.write(b"POST /v1/payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + key.encode() + b"\r\nIdempotency-Key: slow-1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"acc")
    head, body = await _one_response(r)
    w.close()
    assert head.startswith(b"HTTP/1.1 408") and b"application/problem+json" in head, head
    assert b"connection: close" in head.lower()
    assert orjson.loads(body)["code"] == "request_timeout"
    assert await node.pool.fetchval("SELECT count(*) FROM payments") == 0


async def test_an_expectation_the_server_cannot_meet_is_problem_json(node: Node) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", node.ports.http)
    w.write(b"POST /v1/payments HTTP/1.1\r\nHost: x\r\nExpect: secret-ish-value\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    head, body = await _one_response(r)
    w.close()
    assert head.startswith(b"HTTP/1.1 417") and b"application/problem+json" in head, head
    assert orjson.loads(body)["code"] == "expectation_failed"
    assert b"secret-ish-value" not in head + body  # was text/plain: "Unknown Expect: ..."


async def test_the_ready_line_prints_no_database_password(clean_db: str, clean_redis: str,
                                                          sims: Sims, tmp_path: Path) -> None:
    # the test server trusts every connection, so a URL with a password still connects
    with_password = clean_db.replace("postgresql://postgres@", "postgresql://postgres:sekrit@")
    assert with_password != clean_db
    async with running_node(with_password, clean_redis, sims, tmp_path / "a") as node:
        line = orjson.dumps(node.ready_line()).decode()
        assert "sekrit" not in line
        assert node.ready_line()["services"]["database"] == with_password.replace("sekrit",
                                                                                  "***")
