"""A small HTTP/1.1 client for the posting relay: kept-alive connections, one request at a time
on each, responses parsed by httptools (the C llhttp parser).

The relay sends one `POST /postings` per confirmed payment (the marketing contract has no
batch), so its client is on every payment's cost. aiohttp's client spends about 300 µs of CPU
per request (session, request and response objects, a timeout context, cookie and redirect
handling the relay never needs); this one spends a fraction of that. Requests are not
pipelined: a server answers one connection's requests one after another, so a pipelined relay
only queues behind itself; concurrency comes from several connections instead.

Only what the relay needs: a request with a body, the status and the whole body back.
A connection whose request fails or times out is closed (its state is unknown); a kept-alive
connection that turns out to be closed by the server before any byte of the answer is
replaced once, which is safe only for requests the server treats idempotently (postings are,
by their posting id).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import urllib.parse
from collections.abc import Mapping
from typing import Any

import httptools

__all__ = ["HttpStatusError", "KeepAlivePool", "PoolClosed"]


class PoolClosed(ConnectionError):
    """The pool was closed."""


class HttpStatusError(ConnectionError):
    """The server sent something that is not an HTTP/1.1 response."""


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []
        self.got_bytes = False
        self.closed = False
        self.reusable = False
        self.headers_done = False  # of the answer being read
        self.framed = False  # it has a Content-Length or is chunked (else: ends at close)

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(HttpStatusError(f"malformed HTTP response: {type(e).__name__}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if (exc is None and waiter is not None and not waiter.done() and self.headers_done
                and not self.framed):
            # an answer with neither a length nor chunks ends where the connection does
            # (httptools cannot be told of the end, so it is completed here)
            self.waiter = None
            waiter.set_result((int(self.parser.get_status_code()), b"".join(self.body)))
            self.body = []
            return
        self._fail(ConnectionResetError("the server closed the connection"))

    # -- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status = int(self.parser.get_status_code())
        if 100 <= status < 200 and status != 101:
            # an interim answer (100 Continue, 103 Early Hints): the real one follows on this
            # connection; completing the request here would hand it to the next request
            self.body = []
            self.headers_done = self.framed = False
            return
        waiter, self.waiter = self.waiter, None
        self.reusable = bool(self.parser.should_keep_alive()) and not self.closed
        if waiter is not None and not waiter.done():
            waiter.set_result((int(self.parser.get_status_code()), b"".join(self.body)))
        self.body = []

    # -- use -------------------------------------------------------------------------------

    def send(self, data: bytes, waiter: asyncio.Future[tuple[int, bytes]]) -> None:
        assert self.transport is not None
        self.waiter = waiter
        self.got_bytes = False
        self.reusable = False
        self.headers_done = self.framed = False
        self.transport.write(data)

    def _fail(self, error: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class KeepAlivePool:
    """Up to `size` kept-alive connections to one `http://` origin."""

    def __init__(self, base_url: str, *, size: int = 16, timeout_s: float = 1.0,
                 connect_timeout_s: float | None = None) -> None:
        u = urllib.parse.urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            # the scheme only: a URL may carry user:password@
            raise ValueError(f"KeepAlivePool needs an http:// URL, not a {u.scheme!r} one")
        if size < 1 or timeout_s <= 0:
            raise ValueError("size and timeout_s must be positive")
        self.host = u.hostname
        self.port = u.port or 80
        self.prefix = u.path.rstrip("/")
        self.size = size
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s or timeout_s
        self._host_header = u.netloc.rpartition("@")[2].encode()
        self._idle: collections.deque[_Conn] = collections.deque()
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        # the loop of the first request, kept: asyncio.get_running_loop() costs a getpid()
        # system call on Python 3.11 (a pool's connections belong to one loop anyway)
        self._loop: asyncio.AbstractEventLoop | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def __repr__(self) -> str:
        return f"KeepAlivePool({self.host}:{self.port}, size={self.size})"

    async def request(self, method: str, path: str, body: bytes | None = None, *,
                      content_type: str = "application/json",
                      headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body). Raises `TimeoutError` after `timeout_s`, `ConnectionError`/`OSError`
        when the server cannot be reached or drops the connection."""
        head = [f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode(), b"Host: ",
                self._host_header, b"\r\nAccept: application/json\r\n"]
        if headers:
            head.append("".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode())
        if body is not None:
            head.append(f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                        .encode())
        head.append(b"\r\n")
        data = b"".join(head) + (body or b"")
        loop = self._running_loop()
        deadline = loop.time() + self.timeout_s
        for attempt in (0, 1):
            conn, reused = await self._acquire(deadline)
            waiter: asyncio.Future[tuple[int, bytes]] = loop.create_future()
            timer = loop.call_at(deadline, _expire, waiter)
            ok = False
            try:
                conn.send(data, waiter)
                result = await waiter
                ok = True
                return result
            except ConnectionResetError:
                # a kept-alive connection the server had closed meanwhile: one fresh try
                if attempt == 0 and reused and not conn.got_bytes:
                    continue
                raise
            finally:
                timer.cancel()
                self._release(conn, ok and conn.reusable)
        raise AssertionError("unreachable")

    async def _acquire(self, deadline: float) -> tuple[_Conn, bool]:
        loop = self._running_loop()
        while True:
            if self._closed:
                raise PoolClosed("the HTTP connection pool was closed")
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn, True
                self._open -= 1
            if self._open < self.size:
                self._open += 1
                try:
                    timeout = max(0.001, min(self.connect_timeout_s, deadline - loop.time()))
                    async with asyncio.timeout(timeout):
                        _, conn = await loop.create_connection(_Conn, self.host, self.port)
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
                return conn, False
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake_one()  # woken, but leaving: the slot goes to the next one
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                raise
            finally:
                timer.cancel()

    def _release(self, conn: _Conn, reusable: bool) -> None:
        if reusable and not self._closed and not conn.closed:
            self._idle.append(conn)
        else:
            conn.abort()
            self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            conn = self._idle.pop()
            self._open -= 1
            if conn.transport is not None:
                conn.closed = True
                conn.transport.close()
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(PoolClosed("the HTTP connection pool was closed"))


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
