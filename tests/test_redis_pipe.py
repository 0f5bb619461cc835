"""The pipelining Redis client of the hot paths, against the embedded Redis."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from switch.redis_pipe import RedisPipe, RedisReplyError, RedisUnavailable
from tests.nodekit import StallProxy


@pytest.fixture
async def pipe(clean_redis: str) -> AsyncIterator[RedisPipe]:
    p = RedisPipe(clean_redis, timeout_s=2.0)
    try:
        yield p
    finally:
        await p.aclose()


def _with_db(url: str, db: int) -> str:
    u = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((u.scheme, u.netloc, f"/{db}", "", ""))


async def test_concurrent_callers_each_get_their_own_reply(pipe: RedisPipe) -> None:
    n = 600
    assert all(await asyncio.gather(*(pipe.set(f"k{i}", f"v{i}") for i in range(n))))
    got = await asyncio.gather(*(pipe.execute("GET", f"k{i}") for i in range(n)))
    assert got == [f"v{i}".encode() for i in range(n)]
    counts = await asyncio.gather(*(pipe.execute("INCR", "counter") for _ in range(n)))
    assert sorted(counts) == list(range(1, n + 1))
    # issued in one turn of the loop, they went out in order on the one connection
    assert counts == list(range(1, n + 1))


async def test_an_error_reply_fails_only_its_own_command(pipe: RedisPipe) -> None:
    await pipe.set("text", "abc")
    results = await asyncio.gather(pipe.execute("INCR", "n"), pipe.execute("INCR", "text"),
                                   pipe.execute("INCR", "n"), return_exceptions=True)
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], RedisReplyError)
    assert "not an integer" in str(results[1])


async def test_set_nx_px_hmget_delete(pipe: RedisPipe) -> None:
    assert await pipe.set("lock", "a", nx=True, px=5000)
    assert not await pipe.set("lock", "b", nx=True, px=5000)
    assert 0 < await pipe.execute("PTTL", "lock") <= 5000
    await pipe.execute("HSET", "h", "v", "3", "doc", b"\x00\xff")
    assert await pipe.hmget("h", ["v", "doc", "missing"]) == [b"3", b"\x00\xff", None]
    assert await pipe.delete("lock", "h", "nothing") == 2
    assert await pipe.ping()


async def test_script_is_loaded_again_after_the_server_forgot_it(pipe: RedisPipe) -> None:
    script = pipe.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert pipe.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])") is script
    assert await script(keys=["s"], args=[5]) == 5
    await pipe.execute("SCRIPT", "FLUSH")
    assert await script(keys=["s"], args=[2]) == 7  # NOSCRIPT, then EVAL
    assert await script(keys=["s"], args=[1]) == 8
    bad = pipe.register_script("return redis.call('NOSUCHCOMMAND')")
    with pytest.raises(RedisReplyError):
        await bad()


async def test_a_command_not_waited_for_runs_before_every_later_one(pipe: RedisPipe) -> None:
    await pipe.ping()
    sent = pipe.send_nowait("SET", "k", "a")
    assert sent is not None
    assert await pipe.execute("GET", "k") == b"a"
    assert sent.done() and sent.result() == b"OK"
    write = pipe.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
    read = pipe.register_script("return redis.call('GET', KEYS[1])")
    assert await write(keys=["s"], args=["0"]) == b"OK" and await read(keys=["s"]) == b"0"
    # Redis forgets both scripts: the write (sent whole) still runs ahead of the read
    await pipe.execute("SCRIPT", "FLUSH")
    for i in range(1, 6):
        assert write.send_nowait(keys=["s"], args=[str(i)])
        assert await read(keys=["s"]) == str(i).encode()


async def test_a_stored_answer_runs_before_a_retry_whose_script_redis_knows_again(
        pipe: RedisPipe) -> None:
    from switch.payments.idempotency import _CLAIM, ClaimState, IdempotencyCache

    cache = IdempotencyCache(pipe, ttl_s=60)
    assert (await cache.claim("k", "h")).state is ClaimState.CLAIMED
    await pipe.execute("SCRIPT", "FLUSH")  # Redis restarted or was flushed: scripts forgotten
    await pipe.execute("SCRIPT", "LOAD", _CLAIM)  # another request's claim loaded its own
    assert cache.complete_soon("k", "h", 201, b"{}")
    # the retry's claim (known to Redis again) runs after the answer: replayed, not 409
    retry = await cache.claim("k", "h")
    assert retry.state is ClaimState.DONE and retry.body == b"{}"


async def test_an_answer_is_not_queued_while_the_connection_is_down(pipe: RedisPipe) -> None:
    from switch.payments.idempotency import ClaimState, IdempotencyCache

    cache = IdempotencyCache(pipe, ttl_s=60)
    assert (await cache.claim("k", "h")).state is ClaimState.CLAIMED
    assert pipe._proto is not None
    pipe._proto.abort(RedisUnavailable("cut"))
    # nothing is sent, so that nothing is left to race a claim made once the connection is
    # back: the handler stores the answer and waits for it
    assert not cache.complete_soon("k", "h", 201, b"{}")
    assert (await cache.claim("k", "h")).state is ClaimState.IN_FLIGHT
    await cache.complete("k", "h", 201, b"{}")
    assert (await cache.claim("k", "h")).state is ClaimState.DONE


async def test_nothing_is_queued_without_a_live_connection(clean_redis: str) -> None:
    p = RedisPipe(clean_redis)
    assert p.send_nowait("SET", "k", "a") is None  # never connected
    assert not p.register_script("return 1").send_nowait()
    await p.ping()
    assert p.send_nowait("SET", "k", "b") is not None
    await p.aclose()
    assert p.send_nowait("SET", "k", "c") is None
    r = aioredis.from_url(clean_redis)
    try:
        assert await r.get("k") == b"b"
    finally:
        await r.aclose()


async def test_database_number_in_the_url_is_selected(clean_redis: str) -> None:
    p = RedisPipe(_with_db(clean_redis, 3))
    r = aioredis.from_url(_with_db(clean_redis, 3))
    try:
        await p.set("where", "db3")
        assert await r.get("where") == b"db3"
    finally:
        await r.flushdb()
        await r.aclose()
        await p.aclose()


async def test_unreachable_redis_fails_fast_with_a_clear_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = RedisPipe(f"redis://127.0.0.1:{port}/0", connect_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{port}"):
        await p.execute("PING")
    assert time.monotonic() - started < 1.5
    await p.aclose()


async def test_after_a_failed_connect_commands_fail_at_once_until_the_retry_time() -> None:
    # a server that takes the connection and never answers its AUTH: each attempt to connect
    # times out, the way an unreachable Redis behaves behind a dropped network
    attempts: list[int] = []
    hung_up: list[int] = []  # connections the client closed

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(1)
        with contextlib.suppress(Exception):
            await reader.read()
        hung_up.append(1)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    p = RedisPipe(f"redis://:secret@127.0.0.1:{port}/0", connect_timeout_s=0.3,
                  retry_after_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="TimeoutError"):
            await p.execute("PING")
        assert time.monotonic() - started >= 0.3 and attempts == [1]
        # the half-set-up connection was closed, not left open (one more each attempt)
        for _ in range(100):
            if hung_up:
                break
            await asyncio.sleep(0.01)
        assert hung_up == [1]
        # within the retry time: at once, and without trying again
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(RedisUnavailable, match="not tried again"):
                await p.execute("PING")
        assert time.monotonic() - started < 0.1 and attempts == [1]
        await asyncio.sleep(0.5)
        with pytest.raises(RedisUnavailable, match="TimeoutError"):
            await p.execute("PING")  # then it tries again
        assert attempts == [1, 1]
    finally:
        await p.aclose()
        server.close()
        await server.wait_closed()


async def test_a_killed_connection_fails_its_commands_and_the_next_one_reconnects(
        pipe: RedisPipe, clean_redis: str) -> None:
    await pipe.ping()
    proto = pipe._proto
    assert proto is not None and proto.transport is not None
    host, port = proto.transport.get_extra_info("sockname")[:2]
    blocked = asyncio.ensure_future(pipe.execute("BLPOP", "nothing", 5))
    await asyncio.sleep(0.1)
    admin = aioredis.from_url(clean_redis)
    try:
        assert await admin.client_kill(f"{host}:{port}")
    finally:
        await admin.aclose()
    with pytest.raises(RedisUnavailable):
        await asyncio.wait_for(blocked, 2)
    assert await pipe.ping()  # a new connection
    assert pipe._proto is not proto


async def test_a_connection_that_stops_answering_is_dropped_after_the_timeout(
        clean_redis: str) -> None:
    p = RedisPipe(clean_redis, timeout_s=0.4, retry_after_s=0.3)
    try:
        await p.ping()
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="did not answer within 0.4 s"):
            await p.execute("BLPOP", "nothing", 10)
        assert time.monotonic() - started < 1.5
        with pytest.raises(RedisUnavailable, match="not tried again"):
            await p.ping()  # at once, for the retry time
        await asyncio.sleep(0.35)
        assert await p.ping()  # then a new connection, once it answered its PING
    finally:
        await p.aclose()


@contextlib.asynccontextmanager
async def _stalled(redis_url: str, timeout_s: float, retry_after_s: float
                   ) -> AsyncIterator[tuple[StallProxy, RedisPipe]]:
    """A client reaching Redis through a relay that has just stalled, its first command
    after the stall timed out."""
    u = urllib.parse.urlsplit(redis_url)
    proxy = StallProxy(u.hostname or "127.0.0.1", u.port or 6379)
    port = await proxy.start()
    p = RedisPipe(f"redis://127.0.0.1:{port}{u.path}", timeout_s=timeout_s,
                  connect_timeout_s=timeout_s, retry_after_s=retry_after_s)
    try:
        assert await p.ping()
        proxy.stall()
        with pytest.raises(RedisUnavailable, match="did not answer"):
            await p.ping()
        yield proxy, p
    finally:
        await p.aclose()
        await proxy.close()


async def test_a_stalled_server_costs_one_timeout_not_one_per_command(clean_redis: str) -> None:
    """A stopped Redis still accepts connections: each command used to wait out the timeout
    (a payment's claim, then its stored answer: five seconds a payment). After the first
    timeout, commands fail at once; one probe at a time finds out whether it is back."""
    async with _stalled(clean_redis, 0.3, 0.2) as (proxy, p):
        with pytest.raises(RedisUnavailable, match="not tried again"):
            await p.ping()
        await asyncio.sleep(0.25)
        connections = proxy.connections
        probe = asyncio.ensure_future(p.ping())  # the probe: its PING goes unanswered
        await asyncio.sleep(0.05)
        for _ in range(20):  # meanwhile, nobody queues behind it
            with pytest.raises(RedisUnavailable, match="being tried again"):
                await p.execute("GET", "k")
        with pytest.raises(RedisUnavailable):
            await probe
        assert proxy.connections == connections + 1
        proxy.resume()
        await asyncio.sleep(0.25)
        assert await p.ping()


async def test_a_probe_whose_caller_gave_up_does_not_leave_the_client_refusing(
        clean_redis: str) -> None:
    """The probe's caller cancelled (a shutdown, a timeout of its own): the probe still ends,
    and once Redis is back the client works, whichever way the probe ended."""
    async with _stalled(clean_redis, 0.2, 0.1) as (proxy, p):
        for then_back in (False, True):
            await asyncio.sleep(0.15)
            probe = asyncio.ensure_future(p.ping())
            await asyncio.sleep(0.02)
            probe.cancel()  # the probe's only caller goes
            with contextlib.suppress(asyncio.CancelledError):
                await probe
            if then_back:
                proxy.resume()
            await asyncio.sleep(0.4)  # the probe has ended, failed or not
        assert await p.ping()


async def test_a_caller_that_gives_up_does_not_shift_the_replies(pipe: RedisPipe) -> None:
    waiting = asyncio.ensure_future(pipe.execute("BLPOP", "queue", 1))
    await asyncio.sleep(0.05)
    waiting.cancel()
    # queued behind the BLPOP on the same connection: answered after it, with its own reply
    assert await pipe.execute("SET", "after", "1") == b"OK"
    assert await pipe.execute("GET", "after") == b"1"


async def test_closed_client_refuses_and_repr_hides_the_password() -> None:
    p = RedisPipe("redis://user:s3cr3t-pass@127.0.0.1:6390/1")
    assert "s3cr3t" not in repr(p) and "6390/1" in repr(p)
    await p.aclose()
    with pytest.raises(RedisUnavailable, match="closed"):
        await p.execute("PING")


def test_commands_are_encoded_in_resp_and_a_bool_is_refused() -> None:
    from switch.redis_pipe import _encode

    assert _encode(("SET", "k", b"\x00v", 7, 0.5)) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\x00v\r\n$1\r\n7\r\n$3\r\n0.5\r\n")
    assert _encode(("ECHO", "é")) == b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n"
    for bad in (True, None, bytearray(b"x")):
        with pytest.raises(TypeError):
            _encode(("SET", "k", bad))  # type: ignore[arg-type]
