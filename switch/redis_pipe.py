"""A small pipelining Redis client for the hot paths (idempotency claims, IVR call state).

redis-py's asyncio client costs about 100 µs of CPU per command (a pooled connection per
caller, a timeout context per read, retries and locks around every call), which made Redis the
largest cost of an HTTP payment. On the hot paths every concurrent caller shares one connection
here instead: commands issued in the same turn of the event loop go out in one write, replies
are parsed by hiredis (the C parser redis-py itself uses) and handed back in order. That is
about a tenth of the CPU per command, and one system call for many commands under load.

Only what the hot paths need: plain commands and Lua scripts (EVALSHA, falling back to EVAL when
the server has forgotten the script). Everything else (health checks, scans, administration)
keeps using redis-py.

Failure behaviour, which the callers rely on:

- a refused or lost connection fails every command in flight at once with `RedisUnavailable`;
  the next command reconnects; after an attempt to connect failed, commands fail at once for
  `retry_after_s` (1 s) instead of each waiting out a connect timeout of its own;
- a connection that stops answering for `timeout_s` is dropped the same way (one timer checks
  the oldest command in flight, so there is no per-command timeout to pay for), and commands
  then fail at once for `retry_after_s` too: a stalled server (a stopped process, whose
  kernel still accepts connections) would otherwise make every caller wait out the timeout;
- after either, the next connection is a probe: it is in use only once the server has
  answered a PING, and while the probe is under way other commands fail at once instead of
  queueing behind it;
- an error reply raises `RedisReplyError` for that command only.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import hiredis

__all__ = ["Arg", "RedisPipe", "RedisPipeError", "RedisReplyError", "RedisUnavailable", "Script"]

Arg = bytes | str | int | float


class RedisPipeError(Exception):
    """Base of this client's errors."""


class RedisUnavailable(RedisPipeError, ConnectionError):
    """Redis could not be reached, or the connection was lost or stopped answering."""


class RedisReplyError(RedisPipeError):
    """Redis answered the command with an error."""


def _encode(args: Sequence[Arg]) -> bytes:
    """One command in RESP, by hiredis's C packer (a third of the CPU of doing it in Python).
    It takes str (UTF-8), bytes, int and float (as `repr`), and refuses anything else with
    TypeError, bool included."""
    # (the hiredis stub types the argument as a 1-tuple)
    return bytes(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: RedisPipe) -> None:
        self.owner = owner
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        # made by the loop it runs on; kept, because asyncio.get_running_loop() costs a
        # getpid() system call on Python 3.11
        self.loop = asyncio.get_running_loop()
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
            while True:
                reply = self.reader.gets()
                if reply is False:
                    return
                fut, _ = self.waiting.popleft()
                if fut.done():  # its caller gave up; the reply is dropped
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    fut.set_exception(RedisReplyError(str(reply)))
                else:
                    fut.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as e:  # garbage, or a reply nobody asked for
            self.abort(RedisUnavailable(f"Redis protocol error: {type(e).__name__}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisUnavailable("the connection to Redis was lost"))

    def send(self, data: bytes, fut: asyncio.Future[Any]) -> None:
        if self.lost:
            fut.set_exception(RedisUnavailable("the connection to Redis was lost"))
            return
        self.out.append(data)
        self.waiting.append((fut, time.monotonic()))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            fut.get_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and not self.lost:
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out.clear()
            self.transport.write(data)

    def abort(self, error: RedisPipeError) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.fail(error)

    def fail(self, error: RedisPipeError) -> None:
        self.lost = True
        self.out.clear()
        if self.owner._proto is self:
            self.owner._proto = None
        while self.waiting:
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(error)


class RedisPipe:
    """One shared, pipelined connection to Redis (reconnected on demand)."""

    def __init__(self, url: str, *, timeout_s: float = 2.0, connect_timeout_s: float = 2.0,
                 retry_after_s: float = 1.0) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("redis", ""):
            raise ValueError(f"unsupported Redis URL scheme {u.scheme!r}")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 6379
        self._password = urllib.parse.unquote(u.password) if u.password else None
        self._username = urllib.parse.unquote(u.username) if u.username else None
        path = u.path.strip("/")
        self.db = int(path) if path else 0
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        # after a failed attempt to connect, commands fail at once until then (monotonic
        # time): while Redis cannot be reached, each caller (a payment, whose fast path this
        # is) would otherwise wait out a connect timeout of its own
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self._down_reason = ""
        self._probing = False  # the next connection must answer a PING before it is used
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False
        self._scripts: dict[str, Script] = {}

    def __repr__(self) -> str:  # never the password
        return f"RedisPipe({self.host}:{self.port}/{self.db})"

    async def execute(self, *args: Arg) -> Any:
        """Send one command; its reply (bytes, int, list, None), decoded by hiredis."""
        data = _encode(args)
        proto = self._proto
        if proto is None or proto.lost:
            proto = await self._connect()
        fut: asyncio.Future[Any] = proto.loop.create_future()
        proto.send(data, fut)
        return await fut

    def send_nowait(self, *args: Arg) -> asyncio.Future[Any] | None:
        """Queue one command now, without waiting for its reply: it runs before every command
        sent after it (one connection, in order). None when there is no live connection to
        queue it on (nothing is sent). The caller owns the future and must retrieve its
        exception."""
        proto = self._proto
        if proto is None or proto.lost:
            return None
        fut: asyncio.Future[Any] = proto.loop.create_future()
        proto.send(_encode(args), fut)
        return fut

    def register_script(self, source: str) -> Script:
        """The script for `source`, made once per client (its SHA1 is computed once)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = Script(self, source)
        return script

    # the few commands the hot paths use, with redis-py's names

    async def set(self, key: str, value: Arg, *, nx: bool = False, px: int | None = None
                  ) -> bool:
        args: list[Arg] = ["SET", key, value]
        if nx:
            args.append("NX")
        if px is not None:
            args += ["PX", px]
        return await self.execute(*args) is not None

    async def delete(self, *keys: str) -> int:
        return int(await self.execute("DEL", *keys))

    async def hmget(self, key: str, fields: Sequence[str]) -> list[bytes | None]:
        reply: list[bytes | None] = await self.execute("HMGET", key, *fields)
        return reply

    async def ping(self) -> bool:
        return bool(await self.execute("PING") == b"PONG")

    async def aclose(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.flush()
            proto.transport.close()
            proto.fail(RedisUnavailable("the Redis client was closed"))

    # -- connection -----------------------------------------------------------------------

    async def _connect(self) -> _Protocol:
        if self._closed:
            raise RedisUnavailable("the Redis client was closed")
        if self._connecting is None:
            if time.monotonic() < self._down_until:
                raise RedisUnavailable(f"{self._down_reason} (not tried again for "
                                       f"{self.retry_after_s:g} s)")
            self._connecting = asyncio.ensure_future(self._open())
            # forgotten when it ends, whoever waits for it (its callers may all be cancelled)
            self._connecting.add_done_callback(self._connected)
        elif self._probing:  # one caller finds out whether the server is back; not everyone
            raise RedisUnavailable(f"{self._down_reason} (being tried again)")
        return await asyncio.shield(self._connecting)

    def _connected(self, attempt: asyncio.Future[_Protocol]) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved here: its callers may have gone

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        proto: _Protocol | None = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, proto = await loop.create_connection(lambda: _Protocol(self), self.host,
                                                        self.port)
                setup: list[list[Arg]] = []
                if self._password is not None:
                    setup.append(["AUTH", self._password] if self._username is None
                                 else ["AUTH", self._username, self._password])
                if self.db:
                    setup.append(["SELECT", self.db])
                if self._probing:
                    setup.append(["PING"])
                futs = []
                for cmd in setup:
                    fut: asyncio.Future[Any] = loop.create_future()
                    proto.send(_encode(cmd), fut)
                    futs.append(fut)
                for fut in futs:
                    await fut
        except BaseException as e:
            if proto is not None:
                # connected, but the setup did not complete (refused, timed out, cancelled):
                # the socket is closed here, or every failed attempt would leave one open
                proto.abort(RedisUnavailable("the connection setup did not complete"))
            if isinstance(e, RedisReplyError):
                raise self._down(f"Redis refused the connection setup: {e}") from None
            if isinstance(e, OSError | TimeoutError):
                raise self._down(f"cannot connect to Redis at {self.host}:{self.port}: "
                                 f"{type(e).__name__}") from None
            raise
        self._down_until = 0.0
        self._probing = False
        self._proto = proto
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout_s / 4, self._check)
        return proto

    def _down(self, reason: str) -> RedisUnavailable:
        self._down_until = time.monotonic() + self.retry_after_s
        self._down_reason = reason
        self._probing = True
        return RedisUnavailable(reason)

    def _check(self) -> None:
        """Drop a connection whose oldest command has waited longer than `timeout_s`."""
        self._watchdog = None
        if self._closed:
            return
        proto = self._proto
        if proto is not None and proto.waiting:
            _, sent = proto.waiting[0]
            if time.monotonic() - sent > self.timeout_s:
                proto.abort(self._down(f"Redis did not answer within {self.timeout_s:g} s"))
        self._watchdog = asyncio.get_running_loop().call_later(self.timeout_s / 4, self._check)


class Script:
    """A Lua script run by its SHA1 (EVALSHA), loaded again with EVAL when Redis lost it."""

    def __init__(self, client: RedisPipe, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def send_nowait(self, keys: Sequence[str] = (), args: Sequence[Arg] = ()) -> bool:
        """Run the script without waiting for its outcome: queued now, so it runs before any
        command sent after it (see `RedisPipe.send_nowait`). False when there is no live
        connection (nothing was sent). Its errors are dropped.

        It goes as EVAL with the whole source, never EVALSHA: a script Redis had forgotten
        would come back NOSCRIPT, and its second sending would then run after commands queued
        meanwhile (a retry's claim, whose own script was already loaded again). Redis keeps
        the script by its SHA1 either way; this costs only the source's bytes on the wire."""
        fut = self.client.send_nowait("EVAL", self.source, len(keys), *keys, *args)
        if fut is None:
            return False
        fut.add_done_callback(_dropped)
        return True

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Arg] = ()) -> Any:
        try:
            return await self.client.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except RedisReplyError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        return await self.client.execute("EVAL", self.source, len(keys), *keys, *args)


def _dropped(f: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a command nobody waits for (so asyncio does not log it)."""
    if not f.cancelled():
        f.exception()
