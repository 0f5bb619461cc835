"""The switch's marketing-system client against the simulator (and a misbehaving server)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from marketing_sim.app import MarketingSettings, MarketingSim, start
from marketing_sim.customers import Customer
from switch import marketing_client
from switch.marketing_client import (
    Account,
    MarketingClient,
    MarketingConflict,
    MarketingError,
    MarketingRejected,
    MarketingUnavailable,
    Posting,
    PostingResult,
    _parse_in_turns,
    encode_posting,
)
from tests.nodekit import LoopTurns

CUSTOMERS = 300
CST = timezone(timedelta(hours=8))
WHEN = datetime(2026, 5, 1, 9, 30, tzinfo=CST)


@pytest.fixture
async def client(sim: MarketingSim) -> AsyncIterator[MarketingClient]:
    async with MarketingClient(sim.url, timeout=1.0) as marketing:
        yield marketing


def customer_with_bills(sim: MarketingSim) -> Customer:
    book = sim.ledger.book
    for index in range(book.count):
        customer = book.customer(index)
        if customer.status == "active" and len(customer.bills) >= 2:
            return customer
    raise AssertionError("no customer with bills")


def payment(posting_id: str, account_no: str, amount: int) -> Posting:
    return Posting(
        posting_id=posting_id,
        account_no=account_no,
        amount=amount,
        kind="payment",
        channel="internet",
        occurred_at=WHEN,
    )


async def test_get_account(sim: MarketingSim, client: MarketingClient) -> None:
    customer = customer_with_bills(sim)
    account = await client.get_account(customer.account_no)
    assert account == Account(
        account_no=customer.account_no,
        name=customer.name,
        address=customer.address,
        status="active",
        arrears=sum(b.amount for b in customer.bills),
        prepaid_balance=0,
        bills=tuple((b.period, b.amount) for b in customer.bills),
    )
    assert customer.name not in repr(account) and customer.address not in repr(account)
    assert await client.get_account("9999999999") is None
    with pytest.raises(ValueError):
        await client.get_account("12")


async def test_list_accounts_walks_every_page(sim: MarketingSim, client: MarketingClient) -> None:
    numbers: list[str] = []
    after: str | None = None
    for _ in range(10):
        page, after = await client.list_accounts(after, limit=128)
        numbers += [summary.account_no for summary in page]
        if after is None:
            break
    assert after is None
    assert numbers == [sim.ledger.book.account_no(i) for i in range(CUSTOMERS)]
    with pytest.raises(MarketingRejected) as rejected:
        await client.list_accounts(limit=0)
    assert rejected.value.status == 400 and rejected.value.code == "invalid_query"


async def test_post_replay_conflict_and_rejections(
    sim: MarketingSim, client: MarketingClient
) -> None:
    customer = customer_with_bills(sim)
    total = sum(b.amount for b in customer.bills)
    first = payment("cl-1", customer.account_no, 1500)
    result = await client.post(first)
    assert (result.posting_id, result.arrears_after, result.replayed) == (
        "cl-1",
        total - 1500,
        False,
    )
    again = await client.post(first)
    assert again.replayed and again.arrears_after == result.arrears_after

    with pytest.raises(MarketingConflict):
        await client.post(payment("cl-1", customer.account_no, 1501))
    with pytest.raises(MarketingRejected) as rejected:
        await client.post(payment("cl-2", "9999999999", 100))
    assert (rejected.value.status, rejected.value.code) == (404, "account_not_found")
    reverse_wrong = Posting(
        posting_id="cl-3",
        account_no=customer.account_no,
        amount=1,
        kind="reversal",
        original_posting_id="cl-1",
        channel="internet",
        occurred_at=WHEN,
    )
    with pytest.raises(MarketingRejected) as rejected:
        await client.post(reverse_wrong)
    assert (rejected.value.status, rejected.value.code) == (400, "reversal_amount_mismatch")
    reverse = Posting(
        posting_id="cl-3",
        account_no=customer.account_no,
        amount=1500,
        kind="reversal",
        original_posting_id="cl-1",
        channel="internet",
        occurred_at=WHEN + timedelta(minutes=5),
    )
    undone = await client.post(reverse)
    assert undone.arrears_after == total and not undone.replayed

    records = await client.postings_for_date(date(2026, 5, 1))
    assert [r.posting for r in records] == [first, reverse]
    assert [r.arrears_after for r in records] == [total - 1500, total]
    assert all(r.business_date == date(2026, 5, 1) for r in records)
    assert await client.postings_for_date(date(2026, 5, 2)) == []


def test_posting_is_validated() -> None:
    with pytest.raises(ValueError):
        payment("p", "1000000008", 0)
    with pytest.raises(ValueError):
        payment("p", "100000000", 10)
    with pytest.raises(ValueError):
        Posting(
            posting_id="p",
            account_no="1000000008",
            amount=10,
            kind="reversal",
            channel="ivr",
            occurred_at=WHEN,
        )
    with pytest.raises(ValueError):
        Posting(
            posting_id="p",
            account_no="1000000008",
            amount=10,
            kind="payment",
            channel="ivr",
            occurred_at=datetime(2026, 5, 1, 9, 30),
        )


async def test_unavailable_on_injected_errors(sim: MarketingSim, client: MarketingClient) -> None:
    customer = customer_with_bills(sim)
    await sim.set_faults(error_rate=1.0)
    with pytest.raises(MarketingUnavailable):
        await client.get_account(customer.account_no)
    with pytest.raises(MarketingUnavailable):
        await client.post(payment("u-1", customer.account_no, 100))
    await sim.clear_faults()
    assert not (await client.post(payment("u-1", customer.account_no, 100))).replayed


async def test_unavailable_on_timeout_then_retry_is_a_replay(sim: MarketingSim) -> None:
    customer = customer_with_bills(sim)
    posting = payment("to-1", customer.account_no, 2500)
    await sim.set_faults(timeout_after_commit_rate=1.0)
    async with MarketingClient(sim.url, timeout=0.3) as client:
        with pytest.raises(MarketingUnavailable):
            await client.post(posting)
        retried = await client.post(posting)
    assert retried.replayed
    assert retried.arrears_after == sum(b.amount for b in customer.bills) - 2500


async def test_unavailable_when_down_then_recovers(
    sim: MarketingSim, client: MarketingClient
) -> None:
    customer = customer_with_bills(sim)
    assert await client.get_account(customer.account_no) is not None
    await sim.set_faults(down=True)
    with pytest.raises(MarketingUnavailable):
        await client.get_account(customer.account_no)
    with pytest.raises(MarketingUnavailable):
        await client.post(payment("dn-1", customer.account_no, 100))
    await sim.clear_faults()
    assert await client.get_account(customer.account_no) is not None
    assert not (await client.post(payment("dn-1", customer.account_no, 100))).replayed


async def test_unavailable_when_nothing_listens() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]  # bound, never listening: connections are refused
        async with MarketingClient(f"http://127.0.0.1:{port}") as client:
            with pytest.raises(MarketingUnavailable):
                await client.get_account("1000000008")


async def test_a_misbehaving_server(sim: MarketingSim) -> None:
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(status=200, text="<html>oops</html>")

    async def teapot(request: web.Request) -> web.Response:
        return web.Response(status=418, text="short and stout")

    async def wrong_id(request: web.Request) -> web.Response:
        return web.json_response(
            {"posting_id": "other", "arrears_after": 0, "prepaid_balance_after": 0}, status=201
        )

    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=304)

    app = web.Application()
    app.add_routes(
        [
            web.get("/accounts/{account_no}", garbage),
            web.get("/accounts", teapot),
            web.post("/postings", wrong_id),
            web.get("/postings", moved),
        ]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as session:
            client = MarketingClient(f"http://127.0.0.1:{site.port}/", session=session)
            with pytest.raises(MarketingUnavailable):
                await client.get_account("1000000008")
            with pytest.raises(MarketingRejected) as rejected:
                await client.list_accounts()
            assert rejected.value.status == 418 and rejected.value.body == "short and stout"
            with pytest.raises(MarketingUnavailable):
                await client.post(payment("x", "1000000008", 1))
            with pytest.raises(MarketingError):
                await client.postings_for_date(date(2026, 5, 1))
            await client.close()
            assert not session.closed  # a session passed in belongs to the caller
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status", [408, 425, 429])
async def test_a_temporary_refusal_is_retried_not_a_dead_letter(status: int) -> None:
    async def busy(request: web.Request) -> web.Response:
        return web.json_response({}, status=status, headers={"Retry-After": "1"})

    async def other_account(request: web.Request) -> web.Response:
        return web.json_response({"account_no": "1000000001", "name": "某某", "address": "x",
                                  "status": "active", "arrears": 0, "prepaid_balance": 0,
                                  "bills": []})

    async with _serving([web.post("/postings", busy),
                         web.get("/accounts/{account_no}", other_account)]) as url:
        async with MarketingClient(url) as client:
            with pytest.raises(MarketingUnavailable):  # the relay retries it later
                await client.post(payment("x", "1000000008", 1))
            with pytest.raises(MarketingUnavailable):  # another customer's is no answer
                await client.get_account("2000000002")


@contextlib.asynccontextmanager
async def _serving(routes: list[web.RouteDef]) -> AsyncIterator[str]:
    """A stand-in marketing system with these routes; its base URL."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site.port}/"
    finally:
        await runner.cleanup()


async def test_one_record_the_database_cannot_hold_does_not_stop_the_mirror(
        pool: asyncpg.Pool) -> None:
    from switch.payments.accounts import Accounts

    accounts = [{"account_no": f"{1000000000 + i}", "name": "张三", "status": "active",
                 "arrears": 0, "prepaid_balance": 0, "bills": []} for i in range(30)]
    accounts[5]["name"] = "李\x00四"

    async def listing(request: web.Request) -> web.Response:
        after = request.query.get("after")
        limit = int(request.query["limit"])
        rest = [a for a in accounts if after is None or str(a["account_no"]) > after]
        page = rest[:limit]
        nxt = page[-1]["account_no"] if len(rest) > limit else None
        return web.json_response({"accounts": page, "next_after": nxt})

    async with _serving([web.get("/accounts", listing)]) as url, MarketingClient(url) as client:
        mirror = Accounts(pool, client)
        assert await mirror.sync_once(page=10) == 30
        assert mirror.synced.is_set()
        assert await pool.fetchval("SELECT count(*) FROM account_mirror") == 29


async def test_pipelined_postings_each_credit_once_beside_a_lookup(
    tmp_path: Path,
) -> None:
    durable = await start(MarketingSettings(port=0, customers=CUSTOMERS, data_dir=tmp_path))
    try:
        customer = customer_with_bills(durable)
        owed = sum(b.amount for b in customer.bills)
        async with MarketingClient(durable.url, timeout=2.0, connections=16,
                                   pipeline=8) as client:
            postings = [payment(f"pp-{i}", customer.account_no, 10) for i in range(40)]
            got = await asyncio.gather(*(client.post(p) for p in postings),
                                       client.get_account(customer.account_no))
            results, account = got[:-1], got[-1]
            assert all(isinstance(r, PostingResult) and not r.replayed for r in results)
            assert [r.posting_id for r in results if isinstance(r, PostingResult)] == \
                [p.posting_id for p in postings]
            assert isinstance(account, Account) and account.account_no == customer.account_no
            # each credited once: arrears went down by 40 x 10 fen, whatever the order
            after = await client.get_account(customer.account_no)
            assert after is not None and after.arrears == owed - 400
            # held unanswered (credited, then the connection closed without a word): the
            # client sends each once more on a fresh connection and gets the stored result
            await durable.set_faults(timeout_after_commit_rate=1.0, hold_ms=100)
            late = [payment(f"pl-{i}", customer.account_no, 1) for i in range(5)]
            again = await asyncio.gather(*(client.post(p) for p in late))
            assert all(r.replayed for r in again)
            await durable.clear_faults()
            final = await client.get_account(customer.account_no)
            assert final is not None and final.arrears == owed - 405
    finally:
        await durable.close()


async def test_an_answer_over_the_size_cap_is_unavailable_not_held(sim: MarketingSim) -> None:
    big = b"[" + b"0," * 400_000 + b"0]"  # 800 kB

    async def huge(request: web.Request) -> web.Response:
        return web.Response(status=200, body=big, content_type="application/json")

    async def huge_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)  # no Content-Length: chunked
        await response.prepare(request)
        for i in range(0, len(big), 1 << 16):
            await response.write(big[i:i + (1 << 16)])
        await response.write_eof()
        return response

    app = web.Application()
    app.add_routes([web.get("/accounts/{account_no}", huge),
                    web.get("/postings", huge_chunked)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site.port}/"
    try:
        # the kept-alive client (http://) and aiohttp's (a session given) alike: refused
        # whether the length is announced or the answer is chunked
        over = "sent an answer over 100000 bytes"
        async with MarketingClient(url, max_answer=100_000) as client:
            with pytest.raises(MarketingUnavailable, match=over):
                await client.get_account("1000000008")
            with pytest.raises(MarketingUnavailable, match=over):
                await client.postings_for_date(date(2026, 5, 1))
        async with aiohttp.ClientSession() as session:
            capped = MarketingClient(url, session=session, max_answer=100_000)
            with pytest.raises(MarketingUnavailable, match=over):
                await capped.get_account("1000000008")
            with pytest.raises(MarketingUnavailable, match=over):
                await capped.postings_for_date(date(2026, 5, 1))
        # under the cap the same answers are read whole (and found not to be postings)
        async with MarketingClient(url, max_answer=1 << 20) as client:
            with pytest.raises(MarketingUnavailable, match="malformed"):
                await client.postings_for_date(date(2026, 5, 1))
    finally:
        await runner.cleanup()


def _encoded(posting: Posting) -> tuple[str, bytes]:
    return posting.posting_id, encode_posting(
        posting_id=posting.posting_id, account_no=posting.account_no, amount=posting.amount,
        kind=posting.kind, channel=posting.channel, occurred_at=posting.occurred_at,
        original_posting_id=posting.original_posting_id)


def test_a_posting_encoded_from_its_fields_is_the_body_post_sends() -> None:
    import orjson

    for posting in (payment("e-1", "1000000008", 5),
                    Posting(posting_id="e-2", account_no="1000000008", amount=5,
                            kind="reversal", original_posting_id="e-1", channel="bank",
                            occurred_at=WHEN.replace(microsecond=120))):
        assert _encoded(posting)[1] == orjson.dumps(posting.to_json())


@pytest.mark.parametrize("path", ["pipelined", "aiohttp"])
async def test_post_many_answers_each_posting_in_order(sim: MarketingSim, path: str) -> None:
    customer = customer_with_bills(sim)
    owed = sum(b.amount for b in customer.bills)
    async with contextlib.AsyncExitStack() as stack:
        if path == "pipelined":
            client = MarketingClient(sim.url, timeout=2.0, connections=8, pipeline=4)
        else:
            session = await stack.enter_async_context(aiohttp.ClientSession())
            client = MarketingClient(sim.url, timeout=2.0, connections=8, session=session)
        stack.push_async_callback(client.close)
        first = payment(f"{path}-0", customer.account_no, 100)
        await client.post(first)
        batch = [payment(f"{path}-{i}", customer.account_no, 100) for i in range(1, 30)]
        batch[10] = payment(f"{path}-0", customer.account_no, 999)  # its id, other content
        batch[20] = payment(f"{path}-x", "9999999999", 100)  # no such account
        batch[25] = first  # sent before: replayed
        results = await client.post_many([_encoded(p) for p in batch])
        assert isinstance(results[10], MarketingConflict)
        assert isinstance(results[20], MarketingRejected) and results[20].status == 404
        assert isinstance(results[25], PostingResult) and results[25].replayed
        fresh = [r for i, r in enumerate(results) if i not in (10, 20, 25)]
        assert [r.posting_id for r in fresh if isinstance(r, PostingResult)] == \
            [p.posting_id for i, p in enumerate(batch) if i not in (10, 20, 25)]
        assert all(isinstance(r, PostingResult) and not r.replayed for r in fresh)
        account = await client.get_account(customer.account_no)
        assert account is not None and account.arrears == owed - 100 * (1 + len(fresh))
        assert await client.post_many([]) == []


async def test_post_many_to_a_marketing_system_that_is_down_is_unavailable_for_each(
        sim: MarketingSim) -> None:
    customer = customer_with_bills(sim)
    async with MarketingClient(sim.url, timeout=0.5, connections=8, pipeline=4) as client:
        await sim.set_faults(error_rate=1.0)
        try:
            results = await client.post_many(
                [_encoded(payment(f"d-{i}", customer.account_no, 1)) for i in range(6)])
        finally:
            await sim.clear_faults()
        assert all(isinstance(r, MarketingUnavailable) for r in results), results
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with MarketingClient(f"http://127.0.0.1:{port}", connections=4,
                               pipeline=2) as nobody:
        results = await nobody.post_many([_encoded(payment("n-1", "1000000008", 1))])
        assert isinstance(results[0], MarketingUnavailable)
        assert "unreachable" in str(results[0])


async def test_the_lookups_keep_their_own_bound_when_postings_are_pipelined() -> None:
    async with MarketingClient("http://127.0.0.1:1", connections=64, pipeline=32) as client:
        assert client._pool is not None and client._post_pool is not None
        # the relay's 64 in flight go over two connections; lookups keep at most 32
        assert (client._post_pool.size, client._post_pool.pipeline) == (2, 32)
        assert client._pool.size == 32
    async with MarketingClient("http://127.0.0.1:1", connections=64) as client:
        assert client._pool is client._post_pool and client._pool is not None
        assert client._pool.size == 64  # one request per connection: postings need them all


async def test_a_cursor_that_does_not_move_on_fails_the_pass_instead_of_looping(
        pool: asyncpg.Pool) -> None:
    from switch.marketing_client import MarketingUnavailable
    from switch.payments.accounts import Accounts

    calls = {"n": 0}

    async def listing(request: web.Request) -> web.Response:
        # a defective billing system: the same page and the same cursor, however asked
        calls["n"] += 1
        return web.json_response({"accounts": [
            {"account_no": "1000000001", "name": "张三", "status": "active", "arrears": 0,
             "prepaid_balance": 0, "bills": []}], "next_after": "1000000001"})

    async with _serving([web.get("/accounts", listing)]) as url, MarketingClient(url) as client:
        mirror = Accounts(pool, client)
        with pytest.raises(MarketingUnavailable, match="did not move on"):
            await asyncio.wait_for(mirror.sync_once(page=10), 10)  # it looped for ever
    assert calls["n"] == 2
    assert not mirror.synced.is_set()


async def test_the_mirror_keeps_in_step_with_a_list_that_gives_only_what_the_contract_asks(
        pool: asyncpg.Pool) -> None:
    # the contract's list: accounts in number order with number, name and status, no page
    # object and no cursor; the switch's mirror used to refuse it (and never synced)
    from switch.payments.accounts import Accounts, AccountsUnavailable

    accounts = [{"account_no": f"{1000000000 + i}", "name": "张三",
                 "status": "closed" if i == 3 else "active"} for i in range(25)]

    async def listing(request: web.Request) -> web.Response:
        after = request.query.get("after")
        limit = min(int(request.query["limit"]), 7)  # its own cap, below what is asked
        return web.json_response([a for a in accounts
                                  if after is None or a["account_no"] > after][:limit])

    # balances a live lookup wrote earlier stay: the list says nothing about them
    await pool.execute(
        "INSERT INTO account_mirror (account_no, name, status, arrears, prepaid_balance, bills)"
        " VALUES ('1000000001', '张三', 'active', 4200, 0, '[[\"2026-10\", 4200]]')")
    async def down(request: web.Request) -> web.Response:  # live look-ups fail meanwhile
        return web.Response(status=503)

    async with _serving([web.get("/accounts", listing),
                         web.get("/accounts/{account_no}", down)]) as url, \
            MarketingClient(url) as client:
        mirror = Accounts(pool, client)
        assert await mirror.sync_once(page=10) == 25  # pages of 7, 7, 7, 4, then none
        assert mirror.synced.is_set()
        assert await pool.fetchval("SELECT count(*) FROM account_mirror") == 25
        row = await pool.fetchrow("SELECT status, arrears, bills FROM account_mirror"
                                  " WHERE account_no = '1000000001'")
        assert row is not None and row["status"] == "active" and row["arrears"] == 4200, row
        profile = await mirror.profile("1000000001")
        assert profile is not None and profile.arrears == 4200
        closed = await mirror.profile("1000000003")
        assert closed is not None and closed.status == "closed"
        # with the billing system not answering: the balance kept is served (stale), but an
        # account whose balances the mirror never had is not answered with a guessed 0
        stale = await mirror.lookup("1000000001")
        assert stale is not None and stale.stale and stale.arrears == 4200
        with pytest.raises(AccountsUnavailable):
            await mirror.lookup("1000000002")
        payable = await mirror.profile("1000000002")  # its status still decides a payment
        assert payable is not None and payable.status == "active"


async def test_a_posting_list_in_the_contracts_terms_is_read_and_a_foreign_record_left_out(
        ) -> None:
    # a bare list; one of the postings gives only what the posting itself is (no business
    # date, no balances); another is some other system's (an id and a kind of its own)
    ours = {"posting_id": "P202611260000000001", "account_no": "1000000001", "amount": 500,
            "kind": "payment", "channel": "bank", "occurred_at": "2026-11-26T10:00:00+08:00"}
    foreign = {**ours, "posting_id": "ADJ-" + "9" * 80, "kind": "adjustment"}

    ours_malformed = {**ours, "posting_id": "P202611260000000002", "amount": "five"}
    answers = [[foreign, ours], [foreign, ours_malformed, ours]]

    async def listing2(request: web.Request) -> web.Response:
        return web.json_response(answers.pop(0))

    async with _serving([web.get("/postings", listing2)]) as url, \
            MarketingClient(url) as client:
        got = await client.postings_for_date(date(2026, 11, 26))
        assert [r.posting.posting_id for r in got] == ["P202611260000000001"]
        assert got[0].business_date == date(2026, 11, 26) and got[0].arrears_after is None
        # one of ours that cannot be read still refuses the list: reconciled without it,
        # it would be reported missing
        with pytest.raises(MarketingUnavailable, match="malformed"):
            await client.postings_for_date(date(2026, 11, 26))


async def test_a_billing_system_that_answers_twice_never_gets_a_refusal_handed_to_another(
        ) -> None:
    # Its duplicate puts every later answer on the connection one request late: the refusal
    # meant for one posting would land on the next, which would become a dead letter though
    # billing credits it. The answer naming another posting closes the connection, and the
    # rest are sent again on another one.
    import orjson

    doubled = [False]

    async def billing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                posting = orjson.loads(await reader.readexactly(length))
                if posting["account_no"] == "9999999999":
                    status, body = b"404 Not Found", b'{"code":"account_not_found"}'
                else:
                    status, body = b"201 Created", orjson.dumps({
                        "posting_id": posting["posting_id"], "arrears_after": 0,
                        "prepaid_balance_after": 0})
                answer = b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (
                    status, len(body), body)
                if posting["posting_id"] == "d-1" and not doubled[0]:
                    doubled[0] = True
                    answer += answer
                writer.write(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(billing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # eight in flight on one pipelined connection
        async with MarketingClient(f"http://127.0.0.1:{port}", timeout=2.0, connections=8,
                                   pipeline=8) as client:
            batch = [payment("d-0", "1000000008", 5), payment("d-1", "1000000008", 5),
                     payment("d-2", "9999999999", 5), payment("d-3", "1000000008", 5),
                     payment("d-4", "9999999999", 5), payment("d-5", "1000000008", 5)]
            results = await client.post_many([_encoded(p) for p in batch])
    finally:
        server.close()
    for posting, result in zip(batch, results, strict=True):
        if isinstance(result, PostingResult):
            assert result.posting_id == posting.posting_id
        elif isinstance(result, MarketingRejected):  # only those billing refuses
            assert posting.account_no == "9999999999", posting.posting_id
        else:
            assert isinstance(result, MarketingUnavailable), result  # tried again later
    assert not isinstance(results[3], MarketingRejected)
    assert isinstance(results[5], PostingResult)


async def test_a_posting_result_the_ledger_cannot_hold_is_unavailable_not_a_stuck_batch(
        ) -> None:
    # a balance of 2**63 passed the type check and then failed the whole batch's mark in
    # PostgreSQL, round after round; it is an unreadable answer (tried again), like any other
    import orjson

    async with MarketingClient("http://127.0.0.1:1") as client:
        for value in (2 ** 63, -(2 ** 63) - 1, 2 ** 64 - 1):
            body = orjson.dumps({"posting_id": "p", "arrears_after": 0,
                                 "prepaid_balance_after": 0}).replace(
                b'"arrears_after":0', b'"arrears_after":%d' % value)
            with pytest.raises(MarketingUnavailable):
                client._posting_result("p", 201, body)
        assert client._posting_result("p", 201, orjson.dumps({
            "posting_id": "p", "arrears_after": 2 ** 63 - 1,
            "prepaid_balance_after": -(2 ** 63)})).arrears_after == 2 ** 63 - 1


@pytest.mark.parametrize("path", ["pipelined", "one_at_a_time", "aiohttp"])
async def test_a_billing_system_slower_than_a_lookup_may_be_still_takes_postings(
        sim: MarketingSim, path: str) -> None:
    """Lookups give up after `timeout` (a caller is waiting: the mirror answers); postings
    wait `posting_timeout`. Each posting takes 0.4 s here, over the lookups' 0.3 s."""
    customer = customer_with_bills(sim)
    async with contextlib.AsyncExitStack() as stack:
        session = (await stack.enter_async_context(aiohttp.ClientSession())
                   if path == "aiohttp" else None)
        client = MarketingClient(sim.url, timeout=0.3, posting_timeout=5.0, connections=4,
                                 pipeline=4 if path == "pipelined" else 1, session=session)
        stack.push_async_callback(client.close)
        await sim.set_faults(latency_ms=400)
        try:
            with pytest.raises(MarketingUnavailable):
                await client.get_account(customer.account_no)
            assert not (await client.post(payment(f"{path}-one", customer.account_no,
                                                  100))).replayed
            batch = [payment(f"{path}-{i}", customer.account_no, 100) for i in range(8)]
            results = await client.post_many([_encoded(p) for p in batch])
        finally:
            await sim.clear_faults()
        assert all(isinstance(r, PostingResult) and not r.replayed for r in results), results


# --- the day's list, parsed with turns for the event loop ------------------------------------

def _random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.randrange(-10**12, 10**12)
    if kind == 1:
        return rng.choice([True, False, None, 1.5, -0.25, 1e300])
    if kind in (2, 3, 4):
        return "".join(rng.choice('ab"\\/\n\t 户号é😀{}[],:') for _ in range(rng.randrange(8)))
    if kind == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {f"k{rng.randrange(5)}": _random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


async def test_a_day_list_is_parsed_as_orjson_parses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # the element-at-a-time reader must read what orjson reads and refuse what it refuses
    monkeypatch.setattr(marketing_client, "SLICE", 3)
    rng = random.Random(7)
    docs: list[bytes] = [b"[]", b" [ ] ", b"{}", b'{"postings": []}', b'"x"', b"12",
                         b'["\\ud83d\\ude00", "\\u00e9"]',  # an escaped pair, and an escape
                         b'\n{ "date" : "2026-11-27" ,\r\n "postings" : [ {"a": [1, {"b": 2}]} ,'
                         b' 3 , "s" ] , "more": {"x": [1, 2]} }\n']
    for _ in range(300):
        doc = _random_json(rng)
        docs.append(orjson.dumps(doc))
        docs.append(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    # orjson's reading of an integer beyond 64 bits: a float
    docs.append(b'{"postings": [{"amount": 18446744073709551616}, -9223372036854775809]}')
    docs.append(orjson.dumps({"date": "d", "postings": [_random_json(rng) for _ in range(50)]}))
    docs.append(orjson.dumps([_random_json(rng) for _ in range(50)]))
    for raw in docs:
        assert await _parse_in_turns(raw) == orjson.loads(raw), raw
    # nesting deeper than the standard library's scanner goes, within orjson's limit: read
    # (walked down by hand: comparing it would go as deep as Python's own limit)
    deep = await _parse_in_turns(b'{"postings": [' + b"[" * 1000 + b"]" * 1000 + b"]}")
    level, depth = deep["postings"][0], 1
    while level:
        level, depth = level[0], depth + 1
    assert depth == 1000
    for bad in (b"", b"[", b"[1,]", b"[1 2]", b"[,1]", b'{"a" 1}', b'{"a": 1,}', b"{1: 2}",
                b"[1] x", b"[NaN]", b'{"postings": [Infinity]}', b"[\xff]", b"[1]]",
                b'{"a": [1}', b"[" + b"9" * 5000 + b"]", b"[01]", b'["\\ud800"]',
                b'{"postings": ["x\\uDFFFy"]}', b"[1e400]", b'{"postings": [{"a": -1e309}]}',
                b'{"postings": [' + b"[" * 1100 + b"]" * 1100 + b"]}"):
        with pytest.raises(MarketingUnavailable, match="not JSON"):
            await _parse_in_turns(bad)
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(bad)


async def test_a_day_list_gives_the_event_loop_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    # 300 000 postings took orjson 0.6 s in one call, in which the node answered nothing
    monkeypatch.setattr(marketing_client, "SLICE", 2)
    for doc in ([{"posting_id": f"P{i:018d}"} for i in range(12)],
                {"date": "2026-11-27", "postings": [{"posting_id": "x"}] * 12}):
        async with LoopTurns() as turns:
            assert await _parse_in_turns(orjson.dumps(doc)) == doc
        assert turns.count >= 5, turns.count
