"""The relay's kept-alive HTTP/1.1 client, against real servers on loopback."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from switch.keepalive import HttpStatusError, KeepAlivePool, OutOfStep, PoolClosed

Echo = tuple[str, set[tuple[str, int]]]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    """An aiohttp server echoing the JSON body; also the set of client ports it saw."""
    peers: set[tuple[str, int]] = set()

    async def handle(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername")[:2])  # type: ignore[union-attr]
        body = await request.read()
        await asyncio.sleep(0.001)
        return web.Response(status=201, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/base/echo", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site.port}/base/", peers
    finally:
        await runner.cleanup()


async def _raw_server(handler: Handler) -> tuple[asyncio.Server, int]:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(closing, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _stop(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.05)  # the handlers' writers close


@contextlib.asynccontextmanager
async def _served(handler: Handler, **pool_args: Any) -> AsyncIterator[KeepAlivePool]:
    """A pool (`pool_args`) to a raw server answering with `handler`; both closed after."""
    server, port = await _raw_server(handler)
    pool = KeepAlivePool(f"http://127.0.0.1:{port}", **pool_args)
    try:
        yield pool
    finally:
        await pool.close()
        await _stop(server)


def _content_length(head: bytes) -> int:
    return next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                 if line.lower().startswith(b"content-length:")), 0)


async def _read_head_and_body(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    return head, await reader.readexactly(_content_length(head))


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    return (await _read_head_and_body(reader))[1]


def _ok(body: bytes, status: bytes = b"200 OK") -> bytes:
    """An answer carrying `body`, framed by its length."""
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


async def test_concurrent_requests_share_the_pool_size_connections(echo: Echo) -> None:
    url, peers = echo
    pool = KeepAlivePool(url, size=4, timeout_s=5.0)
    try:
        bodies = [orjson.dumps({"n": i}) for i in range(200)]
        results = await asyncio.gather(*(pool.request("POST", "/echo", b) for b in bodies))
        assert [r for r in results] == [(201, b) for b in bodies]
        assert 1 <= len(peers) <= 4  # kept alive and reused, never more than the size
        more = await pool.request("POST", "/echo", b"{}")
        assert more == (201, b"{}") and len(peers) <= 4
    finally:
        await pool.close()
    with pytest.raises(PoolClosed):
        await pool.request("POST", "/echo", b"{}")


async def test_a_connection_the_server_closed_is_replaced_once() -> None:
    served = 0

    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                             ) -> None:
        nonlocal served
        body = await _read_request(reader)
        served += 1
        writer.write(_ok(body))
        await writer.drain()
        await asyncio.sleep(0.05)  # says keep-alive, then closes while the client is idle

    async with _served(one_then_close, size=1, timeout_s=2.0) as pool:
        for i in range(4):
            assert await pool.request("POST", "/x", b"%d" % i) == (200, b"%d" % i)
            await asyncio.sleep(0.1)
        assert served == 4


async def test_a_server_that_does_not_answer_times_out_and_frees_the_slot() -> None:
    hold = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await hold.wait()

    server, port = await _raw_server(silent)
    pool = KeepAlivePool(f"http://127.0.0.1:{port}", size=1, timeout_s=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.request("POST", "/x", b"{}")
        assert 0.25 < time.monotonic() - started < 1.0
        with pytest.raises(TimeoutError):  # the slot was given back: a new connection
            await pool.request("POST", "/x", b"{}")
    finally:
        hold.set()
        await pool.close()
        await _stop(server)


async def test_garbage_and_refused_connections_are_connection_errors() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)

    async with _served(garbage, size=2, timeout_s=1.0) as pool:
        with pytest.raises(HttpStatusError, match="malformed"):
            await pool.request("POST", "/x", b"{}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    pool = KeepAlivePool(f"http://127.0.0.1:{free}", size=2, timeout_s=1.0)
    with pytest.raises(ConnectionRefusedError):
        await pool.request("POST", "/x", b"{}")
    await pool.close()


async def test_waiters_beyond_the_size_are_served_in_turn(echo: Echo) -> None:
    url, _ = echo
    pool = KeepAlivePool(url, size=1, timeout_s=5.0)
    try:
        results = await asyncio.gather(*(pool.request("POST", "/echo", b"[%d]" % i)
                                         for i in range(20)))
        assert results == [(201, b"[%d]" % i) for i in range(20)]
    finally:
        await pool.close()


def test_only_plain_http_urls() -> None:
    with pytest.raises(ValueError, match="http://"):
        KeepAlivePool("https://billing.example/")


async def test_an_interim_answer_is_skipped_and_never_handed_to_the_next_request() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")  # GET requests: no body
            path = head.split(b" ")[1]
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(_ok(path))
            await writer.drain()

    async with _served(handler, size=1, timeout_s=2.0) as pool:
        for path in ("/accounts/1", "/accounts/2", "/accounts/3"):  # one connection, in turn
            assert await pool.request("GET", path) == (200, path.encode())


async def test_an_answer_that_ends_with_the_connection_is_read_whole() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\n\r\n{\"ok\": true}")
        await writer.drain()
        writer.close()

    async with _served(handler, size=1, timeout_s=2.0) as pool:
        assert await pool.request("GET", "/x") == (200, b'{"ok": true}')


# --- pipelining -------------------------------------------------------------------------------


async def _answer_in_order(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                           reads: list[int], close_after: int | None = None) -> None:
    """Answer each request with its body, in order; note how many requests each read
    carried (what the client wrote together); close after `close_after` answers."""
    answered = 0
    while close_after is None or answered < close_after:
        data = await reader.read(65536)
        if not data:
            return
        buf = data
        while (requests := _split(buf)) is None:  # a request cut between two reads
            buf += await reader.read(65536)
        reads.append(len(requests))
        out = b""
        for body in requests:
            if close_after is not None and answered == close_after:
                break
            out += _ok(body)
            answered += 1
        writer.write(out)
        await writer.drain()


async def _read_bodies(reader: asyncio.StreamReader) -> list[bytes]:
    """The bodies of the requests of the next read (more reads if it ends inside one); an
    empty list when the client has closed (also in the middle of a request)."""
    data = await reader.read(65536)
    while data:
        bodies = _split(data)
        if bodies is not None:
            return bodies
        more = await reader.read(65536)
        if not more:
            break
        data += more
    return []


def _split(buf: bytes) -> list[bytes] | None:
    """The bodies of the whole requests in `buf`; None if it ends inside one."""
    bodies = []
    while buf:
        head, found, rest = buf.partition(b"\r\n\r\n")
        if not found:
            return None
        length = _content_length(head)
        if len(rest) < length:
            return None
        bodies.append(rest[:length])
        buf = rest[length:]
    return bodies


async def test_pipelined_requests_share_one_write_and_come_back_in_order() -> None:
    reads: list[int] = []
    peers = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal peers
        peers += 1
        await _answer_in_order(reader, writer, reads=reads)

    async with _served(serve, size=2, timeout_s=2.0, pipeline=8) as pool:
        bodies = [b"%d" % i for i in range(16)]
        results = await asyncio.gather(*(pool.request("POST", "/x", b) for b in bodies))
        assert results == [(200, b) for b in bodies]  # each answer to its own request
        # 8 per connection: the first request of each went alone while it connected, the
        # other seven together
        assert peers == 2 and sum(reads) == 16 and len(reads) <= 4 and max(reads) >= 7
        # more requests than the pipelines hold wait for room, and are all answered
        bodies = [b"more-%d" % i for i in range(40)]
        results = await asyncio.gather(*(pool.request("POST", "/x", b) for b in bodies))
        assert results == [(200, b) for b in bodies] and peers == 2
        assert max(reads) <= 8


async def test_requests_behind_an_answer_the_server_closed_after_are_sent_again() -> None:
    seen: list[bytes] = []
    reads: list[int] = []

    async def two_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                             ) -> None:
        await _answer_in_order(reader, writer, reads=reads, close_after=2)

    async with _served(two_then_close, size=1, timeout_s=2.0, pipeline=4) as pool:
        bodies = [b"%d" % i for i in range(4)]
        results = await asyncio.gather(*(pool.request("POST", "/x", b) for b in bodies))
        seen = [body for _, body in results]
        # the first two were answered on the first connection; the two the server never
        # answered went again on a new one
        assert seen == bodies and reads[0] == 4


@pytest.mark.parametrize("batch", [False, True])
async def test_requests_behind_a_connection_close_answer_go_again_without_waiting(
        batch: bool) -> None:
    # the first connection answers its first request with "Connection: close" and then
    # neither closes nor reads: the requests written behind it will never be answered there
    connections = 0

    async def close_said_not_done(reader: asyncio.StreamReader,
                                  writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            body = (await _read_bodies(reader))[0]
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d"
                         b"\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            await asyncio.sleep(30)  # ended when the test stops the server
            return
        await _answer_in_order(reader, writer, reads=[])

    async with _served(close_said_not_done, size=1, timeout_s=5.0, pipeline=4) as pool:
        bodies = [b"%d" % i for i in range(4)]
        started = time.monotonic()
        if batch:
            results = await pool.request_many("POST", "/x", bodies, window=4)
        else:
            results = list(await asyncio.gather(
                *(pool.request("POST", "/x", b) for b in bodies)))
        assert results == [(200, b) for b in bodies]
        # those behind the first went at once on a new connection, not after the timeout
        assert time.monotonic() - started < 1.0 and connections == 2


async def test_a_timeout_in_a_pipeline_closes_the_connection_and_nothing_is_misread() -> None:
    async def first_never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = await reader.read(65536)
        while (bodies := _split(buf)) is None:
            buf += await reader.read(65536)
        if bodies and bodies[0] == b"slow":
            await asyncio.sleep(5)  # never answers the first: the others are not answered
            return
        writer.write(b"".join(_ok(b) for b in bodies))
        await writer.drain()
        await asyncio.sleep(1)

    async with _served(first_never, size=1, timeout_s=0.3, pipeline=3) as pool:
        async def later(body: bytes) -> tuple[int, bytes]:
            await asyncio.sleep(0.15)  # pipelined behind "slow", with a later deadline
            return await pool.request("POST", "/x", body)

        results = await asyncio.gather(
            pool.request("POST", "/x", b"slow"), later(b"a"), later(b"b"),
            return_exceptions=True)
        assert isinstance(results[0], TimeoutError)
        # the ones behind it got no answer on that connection: sent once more on a fresh
        # one, within their own deadline, and answered there with their own bodies
        assert list(results[1:]) == [(200, b"a"), (200, b"b")]


def test_pipeline_must_be_positive() -> None:
    with pytest.raises(ValueError):
        KeepAlivePool("http://127.0.0.1:1/", pipeline=0)


async def test_a_close_delimited_answer_read_with_the_end_of_the_one_before_is_kept() -> None:
    served = 0

    async def two_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                             ) -> None:
        nonlocal served
        served += 1
        buf = b""
        while buf.count(b"\r\n\r\n") < 2:
            data = await reader.read(65536)
            if not data:
                return
            buf += data
        # the end of the first answer and all of the second (which ends with the
        # connection) in one write, so the client reads them in one go
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nA1"
                     b"HTTP/1.1 200 OK\r\n\r\nclose-delimited-B")
        await writer.drain()

    async with _served(two_then_close, size=1, timeout_s=2.0, pipeline=2) as pool:
        results = await asyncio.gather(pool.request("GET", "/a"), pool.request("GET", "/b"))
        assert list(results) == [(200, b"A1"), (200, b"close-delimited-B")]
        assert served == 1  # read whole, not taken for unanswered and sent again


async def test_a_request_given_up_behind_a_stuck_one_does_not_fail_a_healthy_connection(
) -> None:
    connection = 0
    hung_up = 0  # connections the client closed

    async def first_stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connection, hung_up
        connection += 1
        mine = connection
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if mine == 1 and b"/warm" not in head:
                    continue  # the first connection stops answering after its warm-up
                path = head.split(b" ")[1]
                await asyncio.sleep(0.3)  # the others answer, slowly, in order
                writer.write(_ok(path))
        except (ConnectionError, asyncio.IncompleteReadError, RuntimeError):
            hung_up += 1  # (RuntimeError: writing to a transport the client closed)
            raise

    async with _served(first_stuck, size=2, timeout_s=0.5, pipeline=4) as pool:

        async def later(path: str, delay: float) -> tuple[int, bytes]:
            await asyncio.sleep(delay)
            return await pool.request("GET", path)

        assert await pool.request("GET", "/warm") == (200, b"/warm")
        # four requests fill the stuck connection; a fifth goes to a new one and is doing
        # fine there when the stuck ones time out and are sent again beside it
        results = await asyncio.gather(
            later("/stuck0", 0), *(later(f"/stuck{i}", 0.05) for i in range(1, 4)),
            later("/healthy", 0.4), return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results[:4]), results
        assert results[4] == (200, b"/healthy")
        # the second connection now carries only requests given up (sent again there after
        # the first was closed, and timed out): closing the pool closes it too
        await pool.close()
        for _ in range(200):
            if hung_up == connection:
                break
            await asyncio.sleep(0.01)
        assert (connection, hung_up) == (2, 2)


# --- batches (request_many) -------------------------------------------------------------------


async def test_a_batch_comes_back_in_order_and_never_has_more_than_its_window_in_flight(
        ) -> None:
    outstanding = most = 0
    conns = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal outstanding, most, conns
        conns += 1
        while bodies := await _read_bodies(reader):
            outstanding += len(bodies)
            most = max(most, outstanding)
            await asyncio.sleep(0.02)  # so that requests pile up while these wait
            writer.write(b"".join(_ok(b, b"201 Created") for b in bodies))
            outstanding -= len(bodies)
            await writer.drain()

    async with _served(serve, size=2, timeout_s=2.0, pipeline=8) as pool:
        bodies = [b"%d" % i for i in range(200)]
        assert await pool.request_many("POST", "/x", bodies, window=12) == \
            [(201, b) for b in bodies]
        # the pool's connections could carry 16, the window allowed 12, and it was used
        assert conns == 2 and 8 < most <= 12, most
        # the pool serves single requests as before, on the same connections
        assert await pool.request("POST", "/x", b"after") == (201, b"after") and conns == 2
        assert await pool.request_many("POST", "/x", [], window=4) == []
        with pytest.raises(ValueError):
            await pool.request_many("POST", "/x", [b"1"], window=0)


async def test_a_batch_request_that_times_out_fails_alone_those_behind_it_go_again(
        ) -> None:
    async def stuck_at_slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                            ) -> None:
        while bodies := await _read_bodies(reader):
            out = b""
            for b in bodies:
                if b == b"slow":  # answers nothing more on this connection
                    await asyncio.sleep(0.05)  # what is written after these, comes later
                    writer.write(out)
                    await asyncio.sleep(5)
                    return
                out += _ok(b)
            writer.write(out)
            await writer.drain()

    async with _served(stuck_at_slow, size=1, timeout_s=0.3, pipeline=4) as pool:
        bodies = [b"a", b"b", b"slow", b"c", b"d", b"e", b"f"]
        started = time.monotonic()
        results = await pool.request_many("POST", "/x", bodies, window=4)
        # "slow" timed out, first in line; "c", "d" and "e" behind it were never begun: the
        # connection was closed when "slow" timed out, and they went once more on a new
        # one, with "f", each answered with its own body
        assert results[:2] == [(200, b"a"), (200, b"b")]
        assert isinstance(results[2], TimeoutError)
        assert results[3:] == [(200, b"c"), (200, b"d"), (200, b"e"), (200, b"f")]
        assert time.monotonic() - started < 1.5


async def test_a_batch_behind_an_answer_the_server_closed_after_is_sent_again_once(
        ) -> None:
    reads: list[int] = []

    async def three_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                             ) -> None:
        await _answer_in_order(reader, writer, reads=reads, close_after=3)

    async with _served(three_then_close, size=1, timeout_s=2.0, pipeline=4) as pool:
        bodies = [b"%d" % i for i in range(5)]
        # the first connection carried four and answered three: the fourth (and the fifth,
        # if it was written before the close was seen) went once more on a new one
        assert await pool.request_many("POST", "/x", bodies, window=4) == \
            [(200, b) for b in bodies]
        assert reads[0] == 4 and len(reads) >= 2


async def test_a_batch_request_the_server_never_answers_is_written_twice_at_most() -> None:
    seen: collections.Counter[bytes] = collections.Counter()

    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                             ) -> None:  # answers the first request it reads, drops the rest
        bodies = await _read_bodies(reader)
        seen.update(bodies)
        writer.write(_ok(bodies[0]))
        await writer.drain()

    async with _served(one_then_close, size=1, timeout_s=2.0, pipeline=4) as pool:
        bodies = [b"0", b"1", b"2", b"3"]
        results = await pool.request_many("POST", "/x", bodies, window=4)
        assert results[0] == (200, b"0") and results[1] == (200, b"1")
        # "2" and "3" were unanswered twice: they fail, said as a reset connection
        assert all(type(r) is ConnectionResetError for r in results[2:]), results
        assert seen == {b"0": 1, b"1": 2, b"2": 2, b"3": 2}, seen


async def test_a_batch_sharing_its_pool_with_single_requests_waits_its_turn_not_fails(
        ) -> None:
    posted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal posted
        while True:
            head, body = await _read_head_and_body(reader)
            if head.startswith(b"POST"):
                posted += 1
            await asyncio.sleep(0.1 if head.startswith(b"GET") else 0.01)
            writer.write(_ok(body))
            await writer.drain()

    # one request per connection (no pipelining): the lookups and the batch share 4
    async with _served(serve, size=4, timeout_s=0.3, pipeline=1) as pool:
        stop = False

        async def lookups() -> None:
            while not stop:
                assert await pool.request("GET", "/accounts") == (200, b"")

        looking = asyncio.ensure_future(lookups())
        try:
            await asyncio.sleep(0.05)
            bodies = [b"%d" % i for i in range(100)]
            # the batch's wait for a connection is not one request's deadline: while its
            # own requests are answered, it goes on writing into the room they free
            assert await pool.request_many("POST", "/postings", bodies, window=4) == \
                [(200, b) for b in bodies]
            assert posted == 100
        finally:
            stop = True
            await looking


async def test_a_connection_that_cannot_be_opened_does_not_fail_a_batch_that_moves(
        ) -> None:
    received = 0
    server: asyncio.Server | None = None

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        assert server is not None
        server.close()  # no further connection is accepted
        while True:
            head, body = await _read_head_and_body(reader)
            received += 1
            await asyncio.sleep(0.005)
            writer.write(_ok(body))
            await writer.drain()

    server, port = await _raw_server(serve)
    pool = KeepAlivePool(f"http://127.0.0.1:{port}", size=2, timeout_s=1.0, pipeline=2)
    opens = 0
    acquire = pool._acquire

    async def counted(deadline: float) -> object:
        nonlocal opens
        opens += 1
        return await acquire(deadline)

    pool._acquire = counted  # type: ignore[method-assign,assignment]
    try:
        bodies = [b"%d" % i for i in range(20)]
        # the second connection is refused; the first carries the whole batch
        assert await pool.request_many("POST", "/x", bodies, window=4) == \
            [(200, b) for b in bodies]
        assert received == 20
        # and the refused one is not tried again after every answer
        assert opens <= 3, opens
    finally:
        await pool.close()
        await _stop(server)


async def test_a_batch_to_a_server_that_cannot_be_reached_fails_each_request_at_once(
        ) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens on it
    pool = KeepAlivePool(f"http://127.0.0.1:{port}", size=2, timeout_s=2.0, pipeline=4)
    try:
        started = time.monotonic()
        results = await pool.request_many("POST", "/x", [b"1", b"2", b"3"], window=8)
        assert all(isinstance(r, ConnectionRefusedError) for r in results), results
        assert time.monotonic() - started < 1.0
    finally:
        await pool.close()
    closed = KeepAlivePool(f"http://127.0.0.1:{port}", size=1)
    await closed.close()
    results = await closed.request_many("POST", "/x", [b"1"], window=1)
    assert isinstance(results[0], PoolClosed)


async def test_a_batch_given_up_leaves_the_pool_usable() -> None:
    async def hang_on_some(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                           ) -> None:
        while bodies := await _read_bodies(reader):
            if b"hang" in bodies:
                await asyncio.sleep(5)
                return
            writer.write(b"".join(_ok(b) for b in bodies))
            await writer.drain()

    async with _served(hang_on_some, size=1, timeout_s=3.0, pipeline=4) as pool:
        batch = asyncio.ensure_future(
            pool.request_many("POST", "/x", [b"hang", b"x", b"y"], window=4))
        await asyncio.sleep(0.2)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        # the connection that carried the given-up requests was closed, not left stuck:
        # the next request is answered at once on a new one
        assert await asyncio.wait_for(pool.request("POST", "/x", b"ok"), 1.0) == (200, b"ok")
        assert await pool.request_many("POST", "/x", [b"p", b"q"], window=2) == \
            [(200, b"p"), (200, b"q")]


async def test_a_garbled_answer_in_a_batch_fails_that_request_the_others_go_again() -> None:
    async def garble_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while bodies := await _read_bodies(reader):
            out = b""
            for b in bodies:
                if b == b"bad":
                    writer.write(out + b"HTTP/1.1 2x0 what\r\n\r\n")
                    await writer.drain()
                    return
                out += _ok(b)
            writer.write(out)
            await writer.drain()

    async with _served(garble_one, size=1, timeout_s=2.0, pipeline=4) as pool:
        bodies = [b"a", b"bad", b"c", b"d", b"e"]
        results = await pool.request_many("POST", "/x", bodies, window=4)
        assert results[0] == (200, b"a") and isinstance(results[1], HttpStatusError)
        assert results[2:] == [(200, b"c"), (200, b"d"), (200, b"e")]


async def test_an_answer_out_of_step_closes_its_connection_and_none_reaches_another_request(
        ) -> None:
    # A server that answers one request twice puts every later answer on its connection one
    # request late. An answer the caller's check refuses (it names another request) closes
    # the connection; what it still carried, answers read with it included, goes again on
    # another: a refusal (which names nothing) is never handed to the wrong request.
    first_connection = [True]

    async def doubling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        doubled = not first_connection[0]
        first_connection[0] = False
        while bodies := await _read_bodies(reader):
            out = b""
            for b in bodies:
                answer = _ok(b"no:" + b, b"404 Not Found") if b.startswith(b"refuse") \
                    else _ok(b)
                out += answer
                if not doubled and b == b"a1":
                    out += answer  # the duplicate
                    doubled = True
            writer.write(out)
            await writer.drain()

    def check(i: int, answer: tuple[int, bytes]) -> bool:
        status, body = answer
        return status != 200 or body == bodies[i]

    async with _served(doubling, size=1, timeout_s=2.0, pipeline=8) as pool:
        bodies = [b"a0", b"a1", b"a2", b"refuse3", b"a4", b"refuse5", b"a6"]
        results = await pool.request_many("POST", "/x", bodies, window=8, check=check)
    for body, result in zip(bodies, results, strict=True):
        if isinstance(result, BaseException):
            assert isinstance(result, OutOfStep), result  # only the one caught out of step
            continue
        status, got = result
        assert got == (b"no:" + body if status == 404 else body), (body, result)
    assert sum(isinstance(r, OutOfStep) for r in results) == 1


def _one_at_a_time(seen: list[bytes], delay_s: float) -> Handler:
    """A server that reads one request, answers it `delay_s` later, then reads the next."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                body = await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            seen.append(body)
            await asyncio.sleep(delay_s)
            writer.write(_ok(body))
            await writer.drain()

    return serve


async def test_a_server_that_answers_its_pipeline_one_at_a_time_is_slow_not_stuck() -> None:
    """Each answer takes 0.1 s and the timeout is 0.3 s: the eighth request of a pipeline is
    answered 0.8 s after it was written, but answers kept coming, so none times out and none
    is sent twice (timing them out closed the connection and sent everything behind again,
    piling more work on a server that was only slow)."""
    seen: list[bytes] = []
    async with _served(_one_at_a_time(seen, 0.1), size=1, timeout_s=0.3, pipeline=8) as pool:
        bodies = [b"%d" % i for i in range(8)]
        results = await pool.request_many("POST", "/x", bodies, window=8)
        assert results == [(200, b) for b in bodies]
        assert seen == bodies  # each sent once


async def test_a_batch_behind_a_single_request_counts_from_that_request_s_answer() -> None:
    """The answer to a single request ahead on the connection is progress too: the batch's
    request behind it waits its own timeout from then, and is sent once."""
    seen: list[bytes] = []
    async with _served(_one_at_a_time(seen, 0.35), size=1, timeout_s=0.5, pipeline=4) as pool:
        single = asyncio.ensure_future(pool.request("POST", "/x", b"single"))
        await asyncio.sleep(0)
        results = await pool.request_many("POST", "/x", [b"a", b"b"], window=2)
        assert await single == (200, b"single")
        assert results == [(200, b"a"), (200, b"b")]
        assert seen == [b"single", b"a", b"b"]  # each sent once
