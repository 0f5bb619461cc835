"""The marketing-system simulator over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from marketing_sim.app import MarketingSettings, MarketingSim, start
from marketing_sim.customers import LAST_BILLED_PERIOD, Customer, CustomerBook
from marketing_sim.journal import JournalError

CUSTOMERS = 500
WHEN = "2026-05-01T10:00:00+08:00"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, orjson.loads(await response.read())


async def post(
    http: aiohttp.ClientSession, sim: MarketingSim, body: dict[str, object]
) -> tuple[int, Any, bytes]:
    async with http.post(f"{sim.url}/postings", data=orjson.dumps(body)) as response:
        raw = await response.read()
        if response.status >= 400:
            assert response.content_type == "application/problem+json"
        return response.status, orjson.loads(raw), raw


def payment(posting_id: str, account_no: str, amount: int, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "posting_id": posting_id,
        "account_no": account_no,
        "amount": amount,
        "kind": "payment",
        "channel": "bank:01020000",
        "occurred_at": WHEN,
    }
    body.update(extra)
    return body


def reversal(posting_id: str, original: dict[str, object]) -> dict[str, object]:
    return payment(
        posting_id,
        str(original["account_no"]),
        int(str(original["amount"])),
        kind="reversal",
        original_posting_id=original["posting_id"],
    )


def find(book: CustomerBook, *, min_bills: int = 0, prepaid: bool | None = None) -> Customer:
    for index in range(book.count):
        customer = book.customer(index)
        if customer.status != "active" or len(customer.bills) < min_bills:
            continue
        if prepaid is not None and (customer.prepaid_balance > 0) != prepaid:
            continue
        return customer
    raise AssertionError("no such customer in the book")


def expected_bills(customer: Customer) -> list[dict[str, object]]:
    return [{"period": b.period, "amount": b.amount} for b in customer.bills]


# --- seeding ----------------------------------------------------------------------------------


def test_seeding_is_deterministic_fast_and_gbk() -> None:
    started = time.perf_counter()
    book = CustomerBook(count=100_000, seed=42)
    customers = [book.customer(index) for index in range(book.count)]
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0, f"seeding 100k customers took {elapsed:.2f}s"

    again = CustomerBook(count=100_000, seed=42)
    assert [again.customer(i) for i in range(0, 100_000, 997)] == customers[::997]
    other = CustomerBook(count=100_000, seed=43)
    assert sum(other.customer(i) != customers[i] for i in range(1000)) > 900

    numbers = [c.account_no for c in customers]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    last = f"{LAST_BILLED_PERIOD[0]:04d}-{LAST_BILLED_PERIOD[1]:02d}"
    for index, customer in enumerate(customers):
        assert len(customer.account_no) == 10 and customer.account_no.isdigit()
        assert book.index_of(customer.account_no) == index
        assert 2 <= len(customer.name) <= 3
        customer.name.encode("gbk")
        customer.address.encode("gbk")
        if customer.bills:
            assert 1 <= len(customer.bills) <= 6 and customer.prepaid_balance == 0
            assert customer.bills[-1].period == last
            periods = [b.period for b in customer.bills]
            assert periods == sorted(periods) and len(set(periods)) == len(periods)
    closed = sum(c.status == "closed" for c in customers) / len(customers)
    arrears = sum(bool(c.bills) for c in customers) / len(customers)
    prepaid = sum(c.prepaid_balance > 0 for c in customers) / len(customers)
    assert 0.015 < closed < 0.025
    assert 0.28 < arrears < 0.32
    assert 0.18 < prepaid < 0.22
    # A mistyped account number (wrong check digit) is nobody's.
    first = numbers[0]
    assert book.index_of(first[:9] + str((int(first[9]) + 1) % 10)) is None
    assert book.index_of("12345") is None


async def test_get_account(sim: MarketingSim, http: aiohttp.ClientSession) -> None:
    customer = find(sim.ledger.book, min_bills=2)
    status, body = await get(http, f"{sim.url}/accounts/{customer.account_no}")
    assert status == 200
    assert body == {
        "account_no": customer.account_no,
        "name": customer.name,
        "address": customer.address,
        "status": "active",
        "arrears": sum(b.amount for b in customer.bills),
        "prepaid_balance": 0,
        "bills": expected_bills(customer),
    }
    for unknown in ("9999999999", "1000000001", "abc"):
        status, problem = await get(http, f"{sim.url}/accounts/{unknown}")
        assert status == 404 and problem["code"] == "account_not_found"


# --- allocation and reversal ------------------------------------------------------------------


async def test_allocation_pays_oldest_first_then_prepaid(
    sim: MarketingSim, http: aiohttp.ClientSession
) -> None:
    customer = find(sim.ledger.book, min_bills=3)
    b1, b2, *rest = customer.bills
    account = f"{sim.url}/accounts/{customer.account_no}"
    total = sum(b.amount for b in customer.bills)

    status, body, _ = await post(http, sim, payment("a1", customer.account_no, b1.amount + 100))
    assert status == 201
    assert body == {
        "posting_id": "a1",
        "arrears_after": total - b1.amount - 100,
        "prepaid_balance_after": 0,
    }
    _, shown = await get(http, account)
    assert shown["bills"][0] == {"period": b2.period, "amount": b2.amount - 100}
    assert len(shown["bills"]) == len(customer.bills) - 1
    assert shown["arrears"] == total - b1.amount - 100

    left = total - b1.amount - 100
    status, body, _ = await post(http, sim, payment("a2", customer.account_no, left + 555))
    assert status == 201
    assert body == {"posting_id": "a2", "arrears_after": 0, "prepaid_balance_after": 555}
    _, shown = await get(http, account)
    assert shown["bills"] == [] and shown["arrears"] == 0 and shown["prepaid_balance"] == 555

    status, body, _ = await post(
        http, sim, payment("a3", customer.account_no, 45, kind="card_recharge")
    )
    assert status == 201 and body["prepaid_balance_after"] == 600

    # An account with prepaid balance and no bills: everything goes to prepaid.
    saver = find(sim.ledger.book, prepaid=True)
    status, body, _ = await post(http, sim, payment("a4", saver.account_no, 1000))
    assert body["prepaid_balance_after"] == saver.prepaid_balance + 1000
    assert body["arrears_after"] == 0


async def test_reversal_takes_back_exactly(sim: MarketingSim, http: aiohttp.ClientSession) -> None:
    customer = find(sim.ledger.book, min_bills=3)
    b1, b2, *_ = customer.bills
    account = f"{sim.url}/accounts/{customer.account_no}"
    _, seeded = await get(http, account)
    total = seeded["arrears"]

    first = payment("r-a", customer.account_no, b1.amount + b2.amount // 2)
    second = payment("r-b", customer.account_no, total - first["amount"] + 700)
    assert (await post(http, sim, first))[0] == 201
    assert (await post(http, sim, second))[0] == 201
    _, paid_up = await get(http, account)
    assert paid_up["arrears"] == 0 and paid_up["prepaid_balance"] == 700

    status, body, _ = await post(http, sim, reversal("r-a-rev", first))
    assert status == 201
    # The bills the first payment paid are unpaid again; the second payment's credit stays.
    assert body == {
        "posting_id": "r-a-rev",
        "arrears_after": first["amount"],
        "prepaid_balance_after": 700,
    }
    _, shown = await get(http, account)
    assert shown["bills"] == [
        {"period": b1.period, "amount": b1.amount},
        {"period": b2.period, "amount": b2.amount // 2},
    ]

    status, body, _ = await post(http, sim, reversal("r-b-rev", second))
    assert status == 201
    assert body == {"posting_id": "r-b-rev", "arrears_after": total, "prepaid_balance_after": 0}
    _, shown = await get(http, account)
    assert shown == seeded

    # Replaying a reversal is a replay; reversing twice, or wrongly, is refused.
    assert (await post(http, sim, reversal("r-b-rev", second)))[0] == 200
    status, problem, _ = await post(http, sim, reversal("r-b-rev2", second))
    assert (status, problem["code"]) == (400, "already_reversed")
    wrong_amount = reversal("r-x", first) | {"amount": 1}
    third = payment("r-c", customer.account_no, 5000)
    assert (await post(http, sim, third))[0] == 201
    status, problem, _ = await post(http, sim, reversal("r-x", third) | {"amount": 1})
    assert (status, problem["code"]) == (400, "reversal_amount_mismatch")
    status, problem, _ = await post(http, sim, wrong_amount | {"original_posting_id": "nope"})
    assert (status, problem["code"]) == (400, "original_not_found")
    status, problem, _ = await post(http, sim, reversal("r-y", {**third, "posting_id": "r-a-rev"}))
    assert (status, problem["code"]) == (400, "cannot_reverse_reversal")
    other = find(sim.ledger.book, prepaid=True)
    status, problem, _ = await post(
        http, sim, reversal("r-z", third) | {"account_no": other.account_no}
    )
    assert (status, problem["code"]) == (400, "reversal_account_mismatch")


# --- idempotency and validation ---------------------------------------------------------------


async def test_replay_and_conflict(sim: MarketingSim, http: aiohttp.ClientSession) -> None:
    customer = find(sim.ledger.book, min_bills=1)
    body = payment("idem-1", customer.account_no, 1234)
    status, _, raw = await post(http, sim, body)
    assert status == 201
    for _ in range(3):
        replay_status, _, replay_raw = await post(http, sim, body)
        assert replay_status == 200 and replay_raw == raw
    # The same instant written in another offset is other content (another business date).
    for changed in (
        {"amount": 1235},
        {"channel": "post"},
        {"kind": "card_recharge"},
        {"occurred_at": "2026-05-01T02:00:00+00:00"},
    ):
        status, problem, _ = await post(http, sim, body | changed)
        assert (status, problem["code"]) == (409, "posting_id_reused")
    _, shown = await get(http, f"{sim.url}/accounts/{customer.account_no}")
    assert shown["arrears"] == sum(b.amount for b in customer.bills) - 1234
    assert len(sim.ledger) == 1


async def test_validation_errors(sim: MarketingSim, http: aiohttp.ClientSession) -> None:
    account_no = find(sim.ledger.book).account_no
    good = payment("v-1", account_no, 100)
    cases: list[tuple[dict[str, object], int, str]] = [
        (good | {"amount": 0}, 400, "invalid_amount"),
        (good | {"amount": -5}, 400, "invalid_amount"),
        (good | {"amount": 1.5}, 400, "invalid_field"),
        (good | {"amount": "100"}, 400, "invalid_field"),
        (good | {"amount": True}, 400, "invalid_field"),
        (good | {"kind": "refund"}, 400, "invalid_field"),
        (good | {"kind": "reversal"}, 400, "invalid_field"),
        (good | {"original_posting_id": "x"}, 400, "invalid_field"),
        (good | {"occurred_at": "2026-05-01T10:00:00"}, 400, "invalid_field"),
        (good | {"occurred_at": "yesterday"}, 400, "invalid_field"),
        (good | {"posting_id": ""}, 400, "invalid_field"),
        (good | {"account_no": "12345"}, 400, "invalid_field"),
        (good | {"account_no": "9999999999"}, 404, "account_not_found"),
    ]
    for body, status, code in cases:
        got_status, problem, _ = await post(http, sim, body)
        assert (got_status, problem["code"]) == (status, code), body
        assert problem["status"] == status and problem["type"] and problem["title"]
    async with http.post(f"{sim.url}/postings", data=b"{not json") as response:
        assert response.status == 400
        assert (await response.json(content_type=None))["code"] == "invalid_body"
    assert len(sim.ledger) == 0


async def test_concurrent_postings_to_one_account(
    sim: MarketingSim, http: aiohttp.ClientSession
) -> None:
    customer = find(sim.ledger.book, min_bills=2)
    total = sum(b.amount for b in customer.bills)
    results = await asyncio.gather(
        *(post(http, sim, payment(f"c-{i}", customer.account_no, 1000)) for i in range(50))
    )
    assert all(status == 201 for status, _, _ in results)
    _, shown = await get(http, f"{sim.url}/accounts/{customer.account_no}")
    assert shown["arrears"] + shown["prepaid_balance"] == max(total - 50_000, 0) + max(
        50_000 - total, 0
    )


# --- listing ----------------------------------------------------------------------------------


async def test_listing_pagination(sim: MarketingSim, http: aiohttp.ClientSession) -> None:
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        query = f"limit=120&after={after}" if after else "limit=120"
        status, body = await get(http, f"{sim.url}/accounts?{query}")
        assert status == 200
        pages += 1
        seen += [account["account_no"] for account in body["accounts"]]
        assert all("address" not in account for account in body["accounts"])
        after = body["next_after"]
        if after is None:
            break
        assert after == seen[-1]
    assert pages == 5
    book = sim.ledger.book
    assert seen == [book.account_no(i) for i in range(CUSTOMERS)]
    # A cursor that is no account number still works; bad queries are refused.
    status, body = await get(http, f"{sim.url}/accounts?after=1000000500&limit=3")
    assert [a["account_no"] for a in body["accounts"]] == [book.account_no(i) for i in (50, 51, 52)]
    status, body = await get(http, f"{sim.url}/accounts?after=9999999999")
    assert body == {"accounts": [], "next_after": None}
    status, body = await get(http, f"{sim.url}/accounts?after=0000000000&limit=1")
    assert body["accounts"][0]["account_no"] == book.account_no(0)
    for bad in ("limit=0", "limit=1001", "limit=x", "after=123"):
        status, problem = await get(http, f"{sim.url}/accounts?{bad}")
        assert (status, problem["code"]) == (400, "invalid_query")


async def test_postings_by_business_date(sim: MarketingSim, http: aiohttp.ClientSession) -> None:
    account_no = find(sim.ledger.book, prepaid=True).account_no
    # 01:00 in +08:00 on 2 May is still 1 May in UTC: the posting's own offset decides.
    times = {
        "d-1": "2026-05-01T23:59:59+08:00",
        "d-2": "2026-05-02T01:00:00+08:00",
        "d-3": "2026-05-01T20:00:00-02:00",
        "d-4": "2026-05-02T00:00:00+08:00",
    }
    for posting_id, when in times.items():
        status, _, _ = await post(http, sim, payment(posting_id, account_no, 10, occurred_at=when))
        assert status == 201
    _, first = await get(http, f"{sim.url}/postings?date=2026-05-01")
    _, second = await get(http, f"{sim.url}/postings?date=2026-05-02")
    assert [p["posting_id"] for p in first["postings"]] == ["d-1", "d-3"]
    assert [p["posting_id"] for p in second["postings"]] == ["d-2", "d-4"]
    record = first["postings"][0]
    assert record["occurred_at"] == times["d-1"] and record["business_date"] == "2026-05-01"
    assert record["amount"] == 10 and record["kind"] == "payment"
    assert record["allocation"] == {"bills": [], "prepaid": 10}
    _, empty = await get(http, f"{sim.url}/postings?date=2026-04-30")
    assert empty == {"date": "2026-04-30", "postings": []}
    for bad in ("", "?date=2026-5-1", "?date=tomorrow", "?date=2026-W18-5", "?date=2026-02-30"):
        status, problem = await get(http, f"{sim.url}/postings{bad}")
        assert (status, problem["code"]) == (400, "invalid_query")


# --- durability -------------------------------------------------------------------------------


async def test_durable_across_restart(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    settings = MarketingSettings(port=0, data_dir=tmp_path, customers=CUSTOMERS, seed=7)
    first = await start(settings)
    try:
        customer = find(first.ledger.book, min_bills=2)
        replies = []
        for i in range(20):
            status, _, raw = await post(http, first, payment(f"dur-{i}", customer.account_no, 900))
            assert status == 201
            replies.append(raw)
        status, _, rev_raw = await post(
            http, first, reversal("dur-rev", payment("dur-3", customer.account_no, 900))
        )
        assert status == 201
        _, before = await get(http, f"{first.url}/accounts/{customer.account_no}")
        _, day_before = await get(http, f"{first.url}/postings?date=2026-05-01")
    finally:
        await first.close()

    second = await start(settings)
    try:
        _, after = await get(http, f"{second.url}/accounts/{customer.account_no}")
        assert after == before
        _, day_after = await get(http, f"{second.url}/postings?date=2026-05-01")
        assert day_after == day_before and len(day_after["postings"]) == 21
        for i, raw in enumerate(replies):
            status, _, replay = await post(
                http, second, payment(f"dur-{i}", customer.account_no, 900)
            )
            assert (status, replay) == (200, raw)
        status, _, replay = await post(
            http, second, reversal("dur-rev", payment("dur-3", customer.account_no, 900))
        )
        assert (status, replay) == (200, rev_raw)
        status, problem, _ = await post(
            http, second, reversal("dur-rev2", payment("dur-3", customer.account_no, 900))
        )
        assert problem["code"] == "already_reversed"
        status, _, _ = await post(http, second, payment("dur-new", customer.account_no, 1))
        assert status == 201
    finally:
        await second.close()
    # The journal belongs to one seed and customer count.
    with pytest.raises(JournalError):
        await start(MarketingSettings(port=0, data_dir=tmp_path, customers=CUSTOMERS, seed=8))


# --- faults -----------------------------------------------------------------------------------


async def test_fault_latency(sim: MarketingSim, http: aiohttp.ClientSession) -> None:
    account_no = find(sim.ledger.book).account_no
    async with http.post(f"{sim.url}/_faults", json={"latency_ms": 250}) as response:
        assert response.status == 200
        assert (await response.json())["latency_ms"] == 250
    started = time.perf_counter()
    status, _ = await get(http, f"{sim.url}/accounts/{account_no}")
    assert status == 200 and time.perf_counter() - started >= 0.25
    async with http.delete(f"{sim.url}/_faults") as response:
        assert response.status == 200
    started = time.perf_counter()
    await get(http, f"{sim.url}/accounts/{account_no}")
    assert time.perf_counter() - started < 0.2


async def test_fault_error_rate(sim: MarketingSim, http: aiohttp.ClientSession) -> None:
    customer = find(sim.ledger.book, min_bills=1)
    async with http.post(f"{sim.url}/_faults", json={"error_rate": 1.0}) as response:
        assert response.status == 200
    status, problem, _ = await post(http, sim, payment("e-1", customer.account_no, 100))
    assert (status, problem["code"]) == (503, "injected_error")
    assert len(sim.ledger) == 0  # nothing was done
    await sim.set_faults(error_rate=0.5)
    statuses = [
        (await post(http, sim, payment(f"e-{i}", customer.account_no, 100)))[0] for i in range(60)
    ]
    assert 10 < statuses.count(503) < 50 and statuses.count(201) == 60 - statuses.count(503)
    assert len(sim.ledger) == statuses.count(201)
    async with http.post(f"{sim.url}/_faults", json={"error_rate": 2}) as response:
        assert response.status == 400
    async with http.post(f"{sim.url}/_faults", json={"bogus": 1}) as response:
        assert response.status == 400


async def test_fault_timeout_after_commit(sim: MarketingSim, http: aiohttp.ClientSession) -> None:
    customer = find(sim.ledger.book, min_bills=1)
    body = payment("t-1", customer.account_no, 777)
    async with http.post(f"{sim.url}/_faults", json={"timeout_after_commit_rate": 1.0}) as response:
        assert response.status == 200
    with pytest.raises(TimeoutError):
        async with http.post(
            f"{sim.url}/postings", data=orjson.dumps(body), timeout=aiohttp.ClientTimeout(total=0.3)
        ) as response:
            await response.read()
    # The posting was committed although no answer came; the retry is a replay.
    assert sim.ledger.posting("t-1") is not None
    status, result, _ = await post(http, sim, body)
    assert status == 200
    assert result["arrears_after"] == sum(b.amount for b in customer.bills) - 777
    # With a short hold the simulator drops the connection itself.
    await sim.set_faults(hold_ms=100)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(http, sim, payment("t-2", customer.account_no, 1))
    assert sim.ledger.posting("t-2") is not None


async def test_a_posting_waiting_out_its_latency_is_not_credited_once_the_simulator_is_down(
        sim: MarketingSim, http: aiohttp.ClientSession) -> None:
    """Latency comes "before anything else": a simulator that goes down while a posting waits
    credits nothing (it had been applied after the connection was dropped)."""
    customer = find(sim.ledger.book, min_bills=1)
    await sim.set_faults(latency_ms=400)
    sent = asyncio.ensure_future(post(http, sim, payment("late-1", customer.account_no, 5)))
    await asyncio.sleep(0.1)
    await sim.set_faults(down=True)
    with pytest.raises(aiohttp.ClientError):
        await sent
    await asyncio.sleep(0.5)  # past the latency
    assert sim.ledger.posting("late-1") is None
    await sim.clear_faults()
    status, _, _ = await post(http, sim, payment("late-1", customer.account_no, 5))
    assert status == 201  # the retry is the first credit


def refused(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        try:
            probe.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


async def test_fault_down(sim: MarketingSim, http: aiohttp.ClientSession) -> None:
    account_no = find(sim.ledger.book).account_no
    url = f"{sim.url}/accounts/{account_no}"
    assert (await get(http, url))[0] == 200  # leaves a pooled connection
    async with http.post(f"{sim.url}/_faults", json={"down": True}) as response:
        assert response.status == 200 and (await response.json())["down"] is True
    assert refused(sim.port)
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(http, url)
    await sim.clear_faults()  # the control endpoint is down too: the Python API restores it
    assert (await get(http, url))[0] == 200

    async with http.post(f"{sim.url}/_faults", json={"down": 0.3}) as response:
        assert response.status == 200
    assert refused(sim.port)
    deadline = time.monotonic() + 5
    while refused(sim.port):
        assert time.monotonic() < deadline, "the simulator did not come back"
        await asyncio.sleep(0.05)
    assert (await get(http, url))[0] == 200
    status, faults = await get(http, f"{sim.url}/_faults")
    assert faults["down"] is False


async def test_the_client_that_took_it_down_brings_it_back_over_http(sim: MarketingSim) -> None:
    """The port refuses connections while down, but the connection that asked for it stays
    open for /_faults alone: DELETE /_faults on it brings the simulator back."""
    account_no = find(sim.ledger.book).account_no
    url = f"{sim.url}/accounts/{account_no}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as control:
        async with control.post(f"{sim.url}/_faults", json={"down": True}) as response:
            assert response.status == 200
        assert refused(sim.port)
        # the idle sweep leaves it open, however long the simulator stays down
        server = sim._http
        assert server is not None and server.kept is not None
        server.kept.last_active = -1e9
        server._sweep()
        async with control.get(f"{sim.url}/_faults") as response:  # the same connection
            assert response.status == 200 and (await response.json())["down"] is True
        async with control.delete(f"{sim.url}/_faults") as response:
            assert response.status == 200 and (await response.json())["down"] is False
    assert not refused(sim.port)
    async with aiohttp.ClientSession() as http:
        assert (await get(http, url))[0] == 200
    # while down, anything but /_faults on that connection closes it unanswered
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as control:
        async with control.post(f"{sim.url}/_faults", json={"down": True}) as response:
            assert response.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(control, url)
    await sim.clear_faults()


# --- the command ------------------------------------------------------------------------------


async def test_command_prints_ready_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "marketing_sim",
        "--port",
        "0",
        "--customers",
        "20",
        "--data-dir",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        assert line.startswith(b"READY ")
        ready = orjson.loads(line[len(b"READY ") :])
        assert set(ready) == {"port", "url"} and ready["url"].endswith(f":{ready['port']}")
        async with aiohttp.ClientSession() as http:
            status, body = await get(http, f"{ready['url']}/accounts?limit=1")
        assert status == 200 and body["accounts"][0]["account_no"] == "1000000008"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
        assert await process.stdout.read() == b""
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
