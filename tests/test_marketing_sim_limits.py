"""The marketing simulator's server and journal under hostile or heavy traffic, over real sockets.

Each test is a regression test for a defect found in review: a journal group lost when a full
group's completion appended again, write buffers growing for a client that never reads, an
unbounded chunked trailer, a false 431 on pipelined traffic, connections that could not be
closed because their client does not read, and ``Expect: 100-continue`` in corner cases.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from marketing_sim import app, journal, server
from marketing_sim.app import MarketingSettings, MarketingSim, start
from marketing_sim.server import MAX_HEAD, MAX_QUEUED, Connection
from tests.test_marketing_sim_wire import (
    closed_by_server,
    connect,
    healthy,
    payment,
    post_request,
    read_answer,
    refused_nothing_posted,
)

CUSTOMERS = 200
# A request whose answer (200 accounts) is tens of kilobytes: a few hundred of them, pipelined
# by a client that never reads, would buffer megabytes if answers were not held back.
BIG_ANSWER = b"GET /accounts?limit=200 HTTP/1.1\r\nHost: sim\r\n\r\n"
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: sim\r\n\r\n"


async def eventually(condition: Callable[[], bool], within: float = 2.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def connections(sim: MarketingSim) -> set[Connection]:
    assert sim._http is not None
    return sim._http.connections


async def stalled_client(sim: MarketingSim, count: int = 300) -> tuple[socket.socket, Connection]:
    """A client that pipelines ``count`` big-answer requests and never reads, and its server side.

    Both sides' socket buffers are made small, so that the server's writes pause at once.
    """
    before = set(connections(sim))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, ("127.0.0.1", sim.port))
    assert await eventually(lambda: len(connections(sim) - before) == 1)
    (connection,) = connections(sim) - before
    assert connection.transport is not None
    server_socket = connection.transport.get_extra_info("socket")
    server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await loop.sock_sendall(client, BIG_ANSWER * count)
    assert await eventually(lambda: connection.stalled)
    await asyncio.sleep(0.2)  # let the server do whatever it would do with the rest
    return client, connection


# --- 1. the journal: a group finishing while appends go on -----------------------------------


async def test_postings_appended_while_a_full_group_finishes_are_all_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Finishing a full group answers its postings; the connections then answer their next
    # pipelined posting, appending again from inside the append that filled the group.
    monkeypatch.setattr(journal, "_MAX_BATCH", 20)
    settings = MarketingSettings(port=0, data_dir=tmp_path, customers=CUSTOMERS, seed=3)
    sim = await start(settings)
    clients = 70
    try:
        pairs = [await connect(sim) for _ in range(clients)]
        await asyncio.sleep(0.05)  # every connection accepted
        for i, (_, writer) in enumerate(pairs):  # all sent in one turn of the loop
            writer.write(post_request(payment(f"g{i}-a", 1)) + post_request(payment(f"g{i}-b", 1)))

        async def two_answers(reader: asyncio.StreamReader) -> list[int]:
            return [(await read_answer(reader)).status for _ in range(2)]

        statuses = await asyncio.wait_for(
            asyncio.gather(*(two_answers(reader) for reader, _ in pairs)), 3
        )
        assert statuses == [[201, 201]] * clients
        for _, writer in pairs:
            writer.close()
    finally:
        await sim.close()
    again = await start(settings)
    try:
        assert len(again.ledger) == 2 * clients
        for i in range(clients):
            assert again.ledger.posting(f"g{i}-a") is not None
            assert again.ledger.posting(f"g{i}-b") is not None
    finally:
        await again.close()


# --- 2. a client that never reads -------------------------------------------------------------


async def test_a_client_that_never_reads_cannot_grow_the_servers_buffers(sim: MarketingSim) -> None:
    client, connection = await stalled_client(sim)
    try:
        assert connection.transport is not None
        # Answers wait for the client to read: about one answer beyond the high-water mark.
        assert connection.transport.get_write_buffer_size() < 512 * 1024
        # And parsing stopped with the queue full (the rest of the read is kept unparsed).
        assert len(connection._queue) <= MAX_QUEUED + server._SLICE // len(BIG_ANSWER)
        await healthy(sim)  # others are still served
    finally:
        client.close()
    assert await eventually(lambda: connection not in connections(sim))


async def test_a_slow_reader_gets_every_answer_in_order(sim: MarketingSim) -> None:
    count = 150
    reader, writer = await connect(sim)
    writer.write((BIG_ANSWER + HEALTH) * count)
    await asyncio.sleep(0.3)  # the server stalls on the unread answers
    for _ in range(count):
        assert (await asyncio.wait_for(read_answer(reader), 2)).json()["accounts"]
        assert (await asyncio.wait_for(read_answer(reader), 2)).json()["status"] == "ok"
    writer.close()


# --- 3. and 4. the size of heads and trailers ------------------------------------------------


CHUNKED_HEAD = b"POST /postings HTTP/1.1\r\nHost: sim\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_an_oversized_chunked_trailer_gets_431(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    # One chunk, the last chunk, then a trailer field that never ends.
    trailer = b"X-Trailer: " + b"t" * (MAX_HEAD + 3 * server._SLICE)
    writer.write(CHUNKED_HEAD + b"1\r\na\r\n0\r\n" + trailer)
    answer = await asyncio.wait_for(read_answer(reader), 2)
    assert (answer.status, answer.json()["code"]) == (431, "headers_too_large")
    await refused_nothing_posted(sim, reader, writer)


async def test_a_chunked_body_with_trailers_and_tiny_chunks(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    body = payment("trailer-1")
    chunks = b"".join(b"1\r\n%s\r\n" % body[i : i + 1] for i in range(len(body)))
    trailer = b"X-Checksum: " + b"c" * 1000 + b"\r\nX-More: 1\r\n"
    # Sent in pieces, so that reads end inside chunks and inside the trailer.
    message = CHUNKED_HEAD + chunks + b"0\r\n" + trailer + b"\r\n"
    for offset in range(0, len(message), 97):
        writer.write(message[offset : offset + 97])
        await writer.drain()
        await asyncio.sleep(0)
    answer = await asyncio.wait_for(read_answer(reader), 2)
    assert (answer.status, answer.json()["posting_id"]) == (201, "trailer-1")
    writer.close()


async def test_pipelined_heads_are_not_counted_as_one_large_head(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    count = 3 * MAX_HEAD // len(HEALTH) + 1
    # Far more than MAX_HEAD bytes of small requests, the last one cut inside its head.
    writer.write(HEALTH * count + HEALTH[:10])
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.write(HEALTH[10:])

    async def all_answers() -> list[int]:
        return [(await read_answer(reader)).status for _ in range(count + 1)]

    assert await asyncio.wait_for(all_answers(), 3) == [200] * (count + 1)
    writer.close()


# --- 5. closing connections whose client does not read -----------------------------------------


async def test_down_drops_a_client_that_does_not_read(sim: MarketingSim) -> None:
    client, connection = await stalled_client(sim)
    try:
        assert connection.transport is not None
        assert connection.transport.get_write_buffer_size() > 0
        await sim.set_faults(down=True)
        assert await eventually(lambda: connection not in connections(sim), 1)
    finally:
        client.close()
        await sim.clear_faults()
    await healthy(sim)


async def test_idle_sweep_drops_a_client_that_does_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "KEEPALIVE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(server, "_SWEEP_EVERY_S", 0.1)
    sim = await start(MarketingSettings(port=0, customers=CUSTOMERS))
    try:
        idle_reader, idle_writer = await connect(sim)
        client, connection = await stalled_client(sim)
        try:
            assert connection.transport is not None
            assert connection.transport.get_write_buffer_size() > 0
            assert await eventually(lambda: connection not in connections(sim), 2)
            assert await closed_by_server(idle_reader)  # a merely idle one is closed too
            assert not connections(sim)
        finally:
            client.close()
            idle_writer.close()
    finally:
        await sim.close()


async def test_shutdown_drops_a_client_that_does_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app, "_SHUTDOWN_TIMEOUT_S", 0.2)
    sim = await start(MarketingSettings(port=0, customers=CUSTOMERS))
    client, connection = await stalled_client(sim)
    try:
        await asyncio.wait_for(sim.close(), 2)
        assert await eventually(lambda: connection not in connections(sim), 1)
    finally:
        client.close()


# --- Expect: 100-continue ---------------------------------------------------------------------


async def test_100_continue_is_sent_after_the_answers_owed_before_it(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    body = payment("expect-pipelined")
    writer.write(
        HEALTH + b"POST /postings HTTP/1.1\r\nHost: sim\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    assert (await asyncio.wait_for(read_answer(reader), 2)).status == 200
    assert await asyncio.wait_for(reader.readline(), 2) == b"HTTP/1.1 100 Continue\r\n"
    assert await reader.readline() == b"\r\n"
    writer.write(body)
    assert (await asyncio.wait_for(read_answer(reader), 2)).status == 201
    writer.close()


async def test_no_100_continue_for_http_1_0(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    body = payment("expect-http10")
    writer.write(
        b"POST /postings HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    await asyncio.sleep(0.1)
    writer.write(body)
    assert await asyncio.wait_for(reader.readline(), 2) == b"HTTP/1.0 201 Created\r\n"
    writer.close()


# --- 6. chunked bodies ------------------------------------------------------------------------


async def test_a_body_in_many_pieces_is_kept_in_one_buffer(sim: MarketingSim) -> None:
    reader, writer = await connect(sim)
    writer.write(CHUNKED_HEAD + b"1\r\n{\r\n" * 3)
    await writer.drain()
    await asyncio.sleep(0.05)
    (connection,) = connections(sim)
    assert isinstance(connection._body, bytearray)  # not a list of tiny bytes objects
    assert bytes(connection._body) == b"{{{"
    writer.close()


def test_a_data_directory_holding_no_journal_of_ours_is_one_line_at_start(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / journal.FILE_NAME).write_bytes(b"not a journal\n")
    code = app.main(["--host", "127.0.0.1", "--port", "0", "--customers", "10", "--seed", "1",
                     "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot start" in err and "not a marketing journal" in err, err
    assert "Traceback" not in err
