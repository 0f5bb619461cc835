"""The simulator's own HTTP/1.1 server and its journal file, over real sockets and real files."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from marketing_sim.app import MarketingSettings, MarketingSim, start
from marketing_sim.journal import FILE_NAME, LEGACY_FILE_NAME, JournalError
from marketing_sim.server import MAX_BODY

CUSTOMERS = 200
WHEN = "2026-05-01T10:00:00+08:00"
ACCOUNT = "1000000008"


def payment(posting_id: str, amount: int = 100) -> bytes:
    return orjson.dumps(
        {
            "posting_id": posting_id,
            "account_no": ACCOUNT,
            "amount": amount,
            "kind": "payment",
            "channel": "bank:01020000",
            "occurred_at": WHEN,
        }
    )


def post_request(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /postings HTTP/1.1\r\nHost: sim\r\nContent-Length: %d\r\n%s\r\n%s"
        % (len(body), extra, body)
    )


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return orjson.loads(self.body)


async def read_answer(reader: asyncio.StreamReader, *, head: bool = False) -> Answer:
    status_line = await reader.readline()
    assert status_line.startswith(b"HTTP/1."), status_line
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head else int(headers.get("content-length", "0"))
    body = await reader.readexactly(length)
    return Answer(status, headers, body)


async def connect(sim: MarketingSim) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", sim.port)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(1), 2) == b""


async def refused_nothing_posted(sim: MarketingSim, reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
    """After a refused request: the server closed the connection, posted nothing, serves on."""
    assert await closed_by_server(reader)
    writer.close()
    assert len(sim.ledger) == 0
    await healthy(sim)


async def healthy(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: sim\r\n\r\n")
    answer = await read_answer(reader)
    assert answer.status == 200 and answer.json()["status"] == "ok"
    writer.close()


# --- HTTP -------------------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    writer.write(
        post_request(payment("pipe-1", 300))
        + b"GET /healthz HTTP/1.1\r\nHost: sim\r\n\r\n"
        + post_request(payment("pipe-2", 200))
        + b"GET /accounts/9999999999 HTTP/1.1\r\nHost: sim\r\n\r\n"
        + post_request(payment("pipe-1", 300))
        + b"HEAD /healthz HTTP/1.1\r\nHost: sim\r\n\r\n"
        + b"GET /_faults HTTP/1.1\r\nHost: sim\r\n\r\n"
    )
    first = await read_answer(reader)
    assert first.status == 201 and first.json()["posting_id"] == "pipe-1"
    assert first.headers["content-type"] == "application/json"
    assert "date" in first.headers
    health = await read_answer(reader)
    assert health.status == 200 and health.json()["postings"] == 1
    second = await read_answer(reader)
    assert second.status == 201 and second.json()["posting_id"] == "pipe-2"
    unknown = await read_answer(reader)
    assert unknown.status == 404 and unknown.json()["code"] == "account_not_found"
    assert unknown.headers["content-type"] == "application/problem+json"
    replay = await read_answer(reader)
    assert replay.status == 200 and replay.body == first.body
    head = await read_answer(reader, head=True)
    assert head.status == 200 and int(head.headers["content-length"]) > 0
    faults = await read_answer(reader)
    assert faults.status == 200 and faults.json()["down"] is False
    writer.close()


async def test_many_pipelined_postings_on_one_connection(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    count = 300  # more than the server parses ahead: it stops reading, then goes on
    writer.write(b"".join(post_request(payment(f"many-{i}", 1)) for i in range(count)))
    for i in range(count):
        answer = await read_answer(reader)
        assert (answer.status, answer.json()["posting_id"]) == (201, f"many-{i}")
    writer.close()
    assert len(sim.ledger) == count


async def test_routes_methods_and_connection_handling(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    writer.write(b"GET /nowhere HTTP/1.1\r\nHost: sim\r\n\r\n")
    missing = await read_answer(reader)
    assert missing.status == 404 and missing.json()["code"] == "not_found"
    assert missing.headers["content-type"] == "application/problem+json"
    writer.write(b"PUT /postings HTTP/1.1\r\nHost: sim\r\nContent-Length: 0\r\n\r\n")
    wrong = await read_answer(reader)
    assert wrong.status == 405 and wrong.headers["allow"] == "GET,HEAD,POST"
    writer.write(b"DELETE /healthz HTTP/1.1\r\nHost: sim\r\n\r\n")
    assert (await read_answer(reader)).status == 405
    # Percent-encoding, the absolute form and a chunked body.
    writer.write(b"GET /accounts/%31000000008 HTTP/1.1\r\nHost: sim\r\n\r\n")
    assert (await read_answer(reader)).json()["account_no"] == ACCOUNT
    writer.write(b"GET http://sim/accounts?limit=2&limit=5 HTTP/1.1\r\nHost: sim\r\n\r\n")
    assert len((await read_answer(reader)).json()["accounts"]) == 2
    body = payment("chunked-1")
    writer.write(
        b"POST /postings HTTP/1.1\r\nHost: sim\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
    )
    assert (await read_answer(reader)).status == 201
    # The client asks to close: the answer says so and the server closes.
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n\r\n")
    last = await read_answer(reader)
    assert last.status == 200 and last.headers["connection"] == "close"
    assert await closed_by_server(reader)
    writer.close()

    # HTTP/1.0: closed after the answer unless asked to keep alive.
    reader, writer = await connect(sim)
    writer.write(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    kept = await read_answer(reader)
    assert kept.status == 200 and kept.headers["connection"] == "keep-alive"
    writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert (await read_answer(reader)).status == 200
    assert await closed_by_server(reader)
    writer.close()


async def test_expect_100_continue(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    body = payment("expect-1")
    writer.write(
        b"POST /postings HTTP/1.1\r\nHost: sim\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    assert await asyncio.wait_for(reader.readline(), 2) == b"HTTP/1.1 100 Continue\r\n"
    assert await reader.readline() == b"\r\n"
    writer.write(body)
    assert (await read_answer(reader)).status == 201
    writer.close()


CHUNK_BAD = b"POST /postings HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz HTTP/9.9\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n", 400, "bad_request"),
        (b"POST /postings HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400, "bad_request"),
        (CHUNK_BAD, 400, "bad_request"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
        (b"GET / HTTP/1.1\r\nX-Pad: " + b"p" * 70_000 + b"\r\n\r\n", 431, "headers_too_large"),
    ],
)
async def test_malformed_http_gets_a_problem_and_the_connection_closes(
    sim: MarketingSim, request_bytes: bytes, status: int, code: str
) -> None:
    reader, writer = await connect(sim)
    # A good request first: it is still answered, before the problem.
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: sim\r\n\r\n" + request_bytes)
    assert (await read_answer(reader)).status == 200
    answer = await read_answer(reader)
    assert (answer.status, answer.json()["code"]) == (status, code)
    assert answer.headers["content-type"] == "application/problem+json"
    assert await closed_by_server(reader)
    writer.close()
    await healthy(sim)


async def test_oversized_body_is_refused(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    size = MAX_BODY + 1
    writer.write(b"POST /postings HTTP/1.1\r\nHost: sim\r\nContent-Length: %d\r\n\r\n" % size)
    writer.write(b"x" * size)
    answer = await read_answer(reader)
    assert (answer.status, answer.json()["code"]) == (413, "body_too_large")
    await refused_nothing_posted(sim, reader, writer)


async def test_bad_json_and_random_bytes_never_break_the_server(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    for body in (b"{not json", b"[]", b'"x"', b"\xff\xfe", b""):
        writer.write(post_request(body))
        answer = await read_answer(reader)
        assert answer.status == 400 and answer.json()["code"] == "invalid_body", body
    writer.write(b"POST /_faults HTTP/1.1\r\nHost: sim\r\nContent-Length: 5\r\n\r\n{bad}")
    assert (await read_answer(reader)).json()["code"] == "invalid_body"
    writer.close()
    noise = random.Random(7)
    for _ in range(20):
        reader, writer = await connect(sim)
        writer.write(bytes(noise.randrange(256) for _ in range(noise.randrange(1, 400))))
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 2)  # whatever it says, it ends
        writer.close()
    await healthy(sim)


async def test_client_half_close_still_gets_its_answers(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    writer.write(post_request(payment("eof-1")) + b"GET /healthz HTTP/1.1\r\nHost: sim\r\n\r\n")
    writer.write_eof()
    assert (await read_answer(reader)).status == 201
    assert (await read_answer(reader)).status == 200
    assert await closed_by_server(reader)
    writer.close()


async def test_hold_drops_a_pipelined_connection(sim: MarketingSim) -> None:
    await sim.set_faults(timeout_after_commit_rate=1.0, hold_ms=100)
    reader, writer = await connect(sim)
    writer.write(post_request(payment("hold-1")) + b"GET /healthz HTTP/1.1\r\nHost: sim\r\n\r\n")
    assert await closed_by_server(reader)  # no answer at all, not even to the second request
    writer.close()
    assert sim.ledger.posting("hold-1") is not None


# --- the journal ------------------------------------------------------------------------------


async def post_all(sim: MarketingSim, bodies: list[bytes]) -> list[Answer]:
    reader, writer = await connect(sim)
    writer.write(b"".join(post_request(body) for body in bodies))
    answers = [await read_answer(reader) for _ in bodies]
    writer.close()
    return answers


def settings(data_dir: Path) -> MarketingSettings:
    return MarketingSettings(port=0, data_dir=data_dir, customers=CUSTOMERS, seed=3)


async def test_pipelined_postings_share_one_journal_group_and_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = await start(settings(tmp_path))
    try:
        journal = sim._journal
        assert journal is not None
        groups: list[int] = []
        write = journal._write_sync

        def counted(data: bytes) -> None:  # the real write and fdatasync, counted
            groups.append(data.count(b"\n"))
            write(data)

        monkeypatch.setattr(journal, "_write_sync", counted)
        reader, writer = await connect(sim)
        count = 20
        writer.write(b"".join(post_request(payment(f"grp-{i}", 1)) for i in range(count)))
        # every answer of the batch is in the first read: they left together
        first = await asyncio.wait_for(reader.read(1 << 20), 5)
        assert first.count(b"HTTP/1.1 201 Created") == count
        assert groups == [count]  # one write and one fdatasync for the whole pipeline
        # in order, each with its own posting
        ids = [orjson.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])["posting_id"]
               for part in first.split(b"HTTP/1.1 201 Created")[1:]]
        assert ids == [f"grp-{i}" for i in range(count)]
        # a read pipelined behind postings waits until they are durable, and sees them
        writer.write(post_request(payment("grp-last", 1))
                     + b"GET /healthz HTTP/1.1\r\nHost: sim\r\n\r\n")
        assert (await read_answer(reader)).status == 201
        health = await read_answer(reader)
        assert health.status == 200 and health.json()["postings"] == count + 1
        writer.close()
    finally:
        await sim.close()


async def test_a_held_posting_in_a_pipeline_answers_none_of_it(tmp_path: Path) -> None:
    sim = await start(settings(tmp_path))
    try:
        await sim.set_faults(timeout_after_commit_rate=1.0, hold_ms=100)
        reader, writer = await connect(sim)
        writer.write(b"".join(post_request(payment(f"held-{i}")) for i in range(3)))
        assert await closed_by_server(reader)  # not a byte of any answer
        writer.close()
        # each was credited (the fault is "credits, then does not answer"): sent again, they
        # are answered as the postings they already are
        await sim.clear_faults()
        answers = await post_all(sim, [payment(f"held-{i}") for i in range(3)])
        assert [a.status for a in answers] == [200, 200, 200]
    finally:
        await sim.close()


async def test_torn_last_record_is_cut_off(tmp_path: Path) -> None:
    first = await start(settings(tmp_path))
    try:
        answers = await post_all(first, [payment(f"torn-{i}", 10) for i in range(5)])
        assert all(a.status == 201 for a in answers)
    finally:
        await first.close()
    path = tmp_path / FILE_NAME
    whole = path.read_bytes()
    last_line = whole.rstrip(b"\n").rsplit(b"\n", 1)[1]
    for torn in (last_line[:20], b"\x00" * 300, last_line[:-3] + b"XYZ\n", b"deadbeef [1,2]\n"):
        path.write_bytes(whole + torn)
        again = await start(settings(tmp_path))
        try:
            assert len(again.ledger) == 5
            assert path.read_bytes() == whole  # cut back to the last whole record
        finally:
            await again.close()
    # After a cut the journal goes on as before.
    path.write_bytes(whole + last_line[:30])
    third = await start(settings(tmp_path))
    try:
        answers = await post_all(third, [payment("torn-5", 10), payment("torn-0", 10)])
        assert [a.status for a in answers] == [201, 200]
    finally:
        await third.close()
    fourth = await start(settings(tmp_path))
    try:
        assert len(fourth.ledger) == 6
        assert fourth.ledger.posting("torn-5") is not None
    finally:
        await fourth.close()


async def test_damage_before_whole_records_is_refused(tmp_path: Path) -> None:
    first = await start(settings(tmp_path))
    try:
        await post_all(first, [payment(f"dmg-{i}", 10) for i in range(4)])
    finally:
        await first.close()
    path = tmp_path / FILE_NAME
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"dmg-1"', b'"dmg-X"')  # the CRC no longer matches
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(JournalError, match="whole records follow"):
        await start(settings(tmp_path))
    path.write_bytes(b"not a journal\n")
    with pytest.raises(JournalError, match="header"):
        await start(settings(tmp_path))


async def test_identity_is_checked(tmp_path: Path) -> None:
    first = await start(settings(tmp_path))
    await first.close()
    with pytest.raises(JournalError, match="use another data directory"):
        await start(MarketingSettings(port=0, data_dir=tmp_path, customers=CUSTOMERS, seed=4))
    with pytest.raises(JournalError, match="use another data directory"):
        await start(MarketingSettings(port=0, data_dir=tmp_path, customers=CUSTOMERS + 1, seed=3))


async def test_a_write_failure_refuses_everything(tmp_path: Path) -> None:
    sim = await start(settings(tmp_path))
    try:
        assert (await post_all(sim, [payment("wf-1")]))[0].status == 201
        # Make the journal's descriptor read-only underneath it: the next write really fails.
        journal_fd = sim._journal._fd  # type: ignore[union-attr]
        assert journal_fd is not None
        read_only = os.open(tmp_path / FILE_NAME, os.O_RDONLY)
        os.dup2(read_only, journal_fd)
        os.close(read_only)
        failed = (await post_all(sim, [payment("wf-2")]))[0]
        assert (failed.status, failed.json()["code"]) == (503, "storage_failed")
        assert sim.broken
        reader, writer = await connect(sim)
        writer.write(b"GET /accounts/1000000008 HTTP/1.1\r\nHost: sim\r\n\r\n")
        refused = await read_answer(reader)
        assert (refused.status, refused.json()["code"]) == (503, "storage_failed")
        writer.close()
    finally:
        await sim.close()
    again = await start(settings(tmp_path))
    try:
        assert again.ledger.posting("wf-1") is not None
        assert again.ledger.posting("wf-2") is None  # never durable, never answered 201
    finally:
        await again.close()


_LEGACY_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE postings (
    seq INTEGER PRIMARY KEY, posting_id TEXT NOT NULL UNIQUE, account_no TEXT NOT NULL,
    amount INTEGER NOT NULL, kind TEXT NOT NULL, original_posting_id TEXT,
    channel TEXT NOT NULL, occurred_at TEXT NOT NULL, business_date TEXT NOT NULL,
    allocation BLOB NOT NULL, arrears_after INTEGER NOT NULL,
    prepaid_balance_after INTEGER NOT NULL
);
"""


async def test_an_sqlite_journal_is_converted(tmp_path: Path) -> None:
    # Read the postings' effects from a fresh in-memory simulator, then store them the old way.
    probe = await start(MarketingSettings(port=0, customers=CUSTOMERS, seed=3))
    try:
        await post_all(probe, [payment("old-1", 700), payment("old-2", 900)])
        postings = [probe.ledger.posting(pid) for pid in ("old-1", "old-2")]
        account = probe.ledger.account(ACCOUNT)
    finally:
        await probe.close()
    # the old format written out by hand on purpose (not through the journal's encoder): the
    # conversion must read what the previous version wrote
    db = sqlite3.connect(tmp_path / LEGACY_FILE_NAME)
    db.executescript(_LEGACY_SCHEMA)
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("customers", str(CUSTOMERS)), ("seed", "3")])
    for posted in postings:
        assert posted is not None
        request = posted.request
        db.execute(
            "INSERT INTO postings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                posted.seq,
                request.posting_id,
                request.account_no,
                request.amount,
                request.kind,
                request.original_posting_id,
                request.channel,
                request.occurred_at.isoformat(),
                request.business_date.isoformat(),
                orjson.dumps(posted.allocation.to_json()),
                posted.arrears_after,
                posted.prepaid_balance_after,
            ),
        )
    db.commit()
    db.close()

    converted = await start(settings(tmp_path))
    try:
        assert converted.ledger.account(ACCOUNT) == account
        assert [converted.ledger.posting(p) for p in ("old-1", "old-2")] == postings
        assert (await post_all(converted, [payment("old-1", 700)]))[0].status == 200
    finally:
        await converted.close()
    assert not (tmp_path / LEGACY_FILE_NAME).exists()
    assert (tmp_path / (LEGACY_FILE_NAME + ".migrated")).exists()
    again = await start(settings(tmp_path))
    try:
        assert len(again.ledger) == 2
    finally:
        await again.close()
