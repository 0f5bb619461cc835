"""A small HTTP/1.1 client for the posting relay: kept-alive connections, optionally
pipelined, responses parsed by httptools (the C llhttp parser).

The relay sends one `POST /postings` per confirmed payment (the marketing contract has no
batch), so its client is on every payment's cost. aiohttp's client spends about 300 µs of CPU
per request (session, request and response objects, a timeout context, cookie and redirect
handling the relay never needs); this one spends a fraction of that.

`pipeline` requests may be outstanding on one connection (HTTP/1.1 pipelining; the server
answers them in order). The requests written in one turn of the event loop leave in one write
per connection, so a round of postings costs the switch and the server a few system calls and
wake-ups instead of one each. With `pipeline=1` a connection carries one request at a time and
concurrency comes from `size` connections only, which suits a server that handles a
connection's requests one after another with a commit each.

Only what the relay needs: a request with a body, the status and the whole body back, at
most `max_body` bytes of it (a server that sends more fails the request, and its connection is
closed: an answer is held in memory whole, so its size is bounded).
A connection on which a request fails or times out is closed (its state is unknown). A request
that got no byte of its answer because the server closed the connection (a kept-alive
connection closed meanwhile, or one the server closed after an earlier answer in the pipeline,
or one behind an answer that said `Connection: close`, whose connection we close at once)
is sent once more on another connection, which is safe only for requests the server treats
idempotently (postings are, by their posting id; reads are).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import httptools

__all__ = ["AnswerTooLarge", "HttpStatusError", "KeepAlivePool", "OutOfStep", "PoolClosed"]


class PoolClosed(ConnectionError):
    """The pool was closed."""


class HttpStatusError(ConnectionError):
    """The server sent something that is not an HTTP/1.1 response."""


class AnswerTooLarge(HttpStatusError):
    """The answer is longer than the pool's `max_body`."""


class _Unanswered(ConnectionResetError):
    """The connection closed before any byte of this request's answer arrived."""


class OutOfStep(HttpStatusError):
    """An answer that is not this request's: its connection is out of step (closed)."""


Answer = tuple[int, bytes]


class _Waiter(Protocol):
    """What waits for a request's answer on a connection: the future of a single request, or
    a batch's slot."""

    def done(self) -> bool: ...
    def set_result(self, answer: Answer, /) -> None: ...
    def set_exception(self, error: BaseException, /) -> None: ...


class _AnswerTooLarge(Exception):
    """Raised inside the parser's body callback to stop reading an oversized answer."""


class _Conn(asyncio.Protocol):
    def __init__(self, max_body: int, loop: asyncio.AbstractEventLoop) -> None:
        self.max_body = max_body
        self.loop = loop
        self.size = 0  # of the answer being read
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # the requests sent and not yet answered, in order; the first is being answered
        self.waiters: collections.deque[_Waiter] = collections.deque()
        self.body: list[bytes] = []
        self.answering = False  # a byte of the first waiter's answer has arrived
        self.closed = False
        self.last_call = False  # the server will close after an answer: send nothing more
        self.headers_done = False  # of the answer being read
        self.framed = False  # it has a Content-Length or is chunked (else: ends at close)
        self.out: list[bytes] = []  # requests written in this turn of the loop
        self.sent = 0  # requests ever sent on this connection
        self.out_of_step = False  # an answer was found not to be its request's
        # loop time of its last answer: a batch's pipelined request's time is counted from
        # when the answer before it came, not only from when it was written
        self.answered_at = 0.0

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if isinstance(e.__context__, _AnswerTooLarge):
                self._fail(AnswerTooLarge(f"an answer over {self.max_body} bytes"))
            else:
                self._fail(HttpStatusError(f"malformed HTTP response: {type(e).__name__}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if (exc is None and self.waiters and self.answering and self.headers_done
                and not self.framed):
            # an answer with neither a length nor chunks ends where the connection does
            # (httptools cannot be told of the end, so it is completed here)
            self._complete(int(self.parser.get_status_code()))
        self._fail(ConnectionResetError("the server closed the connection"))

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.answering = True  # the first waiter's answer has begun (not the one before it)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) not in (14, 17):  # neither Content-Length nor Transfer-Encoding
            return
        lower = name.lower()
        if lower in (b"content-length", b"transfer-encoding"):
            self.framed = True
            if lower == b"content-length" and value.strip().isdigit() \
                    and int(value) > self.max_body:
                raise _AnswerTooLarge  # said at once: not read at all

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            raise _AnswerTooLarge
        self.body.append(body)

    def on_message_complete(self) -> None:
        status = int(self.parser.get_status_code())
        if 100 <= status < 200 and status != 101:
            # an interim answer (100 Continue, 103 Early Hints): the real one follows on this
            # connection; completing the request here would hand it to the next request
            self.body = []
            self.size = 0
            self.headers_done = self.framed = False
            return
        if not self.parser.should_keep_alive():
            self.last_call = True
        self._complete(status)
        if self.last_call and self.waiters and self.transport is not None:
            # The server said it would close after this answer, so it reads nothing after
            # it (RFC 9112, 9.6): the requests behind it were never begun. They go again on
            # another connection now (the close makes them unanswered), instead of waiting
            # for a close the server may be slow to make, or their timeout.
            self.transport.close()

    def _complete(self, status: int) -> None:
        body, self.body = b"".join(self.body), []
        self.size = 0
        self.headers_done = self.framed = False
        self.answering = False
        self.answered_at = self.loop.time()
        if self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result((status, body))

    # -- use -------------------------------------------------------------------------------

    def send(self, data: bytes, waiter: _Waiter,
             loop: asyncio.AbstractEventLoop) -> None:
        self.waiters.append(waiter)
        self.sent += 1
        if not self.out:
            loop.call_soon(self._flush)
        self.out.append(data)

    def _flush(self) -> None:
        out, self.out = self.out, []
        if out and self.transport is not None and not self.closed:
            self.transport.write(b"".join(out))

    def _fail(self, error: Exception) -> None:
        """Fail every request still waiting: the first with `error` if its answer had begun,
        the others (and the first otherwise) as unanswered."""
        waiters, self.waiters = self.waiters, collections.deque()
        begun = self.answering
        self.answering = False
        for i, waiter in enumerate(waiters):
            if waiter.done():
                continue
            if i == 0 and (begun or not isinstance(error, ConnectionResetError)):
                waiter.set_exception(error)
            else:
                waiter.set_exception(_Unanswered(str(error)))

    @property
    def usable(self) -> bool:
        return not self.closed and not self.last_call

    def abort(self) -> None:
        self.closed = True
        self.out = []
        if self.transport is not None:
            self.transport.abort()
        self._fail(ConnectionResetError("the connection was closed"))


def _carries(conn: _Conn) -> bool:
    """Whether a request still waits for its answer on `conn`. Requests given up behind a
    live head stay in its line (their answers are read and dropped in turn) but wait for
    nothing: a connection that carries only those is closed like an idle one when it has to
    go, or nothing would ever close it."""
    return any(not w.done() for w in conn.waiters)


class KeepAlivePool:
    """Up to `size` kept-alive connections to one `http://` origin, each carrying up to
    `pipeline` requests at once."""

    def __init__(self, base_url: str, *, size: int = 16, timeout_s: float = 1.0,
                 connect_timeout_s: float | None = None, pipeline: int = 1,
                 max_body: int = 16 << 20) -> None:
        u = urllib.parse.urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            # the scheme only: a URL may carry user:password@
            raise ValueError(f"KeepAlivePool needs an http:// URL, not a {u.scheme!r} one")
        if size < 1 or timeout_s <= 0 or pipeline < 1 or max_body < 1:
            raise ValueError("size, timeout_s, pipeline and max_body must be positive")
        self.host = u.hostname
        self.port = u.port or 80
        self.prefix = u.path.rstrip("/")
        self.size = size
        self.pipeline = pipeline
        self.max_body = max_body
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s or timeout_s
        self._host_header = u.netloc.rpartition("@")[2].encode()
        self._conns: list[_Conn] = []  # open, in the order they were last given a request
        self._open = 0  # open or being opened
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
        return (f"KeepAlivePool({self.host}:{self.port}, size={self.size}, "
                f"pipeline={self.pipeline})")

    def _head(self, method: str, path: str, headers: Mapping[str, str] | None) -> bytes:
        """A request's head up to its last header line (its framing and the blank line are
        the caller's)."""
        head = [f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode(), b"Host: ",
                self._host_header, b"\r\nAccept: application/json\r\n"]
        if headers:
            head.append("".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode())
        return b"".join(head)

    async def request(self, method: str, path: str, body: bytes | None = None, *,
                      content_type: str = "application/json",
                      headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body). Raises `TimeoutError` after `timeout_s`, `ConnectionError`/`OSError`
        when the server cannot be reached or drops the connection."""
        data = self._head(method, path, headers)
        if body is not None:
            data += (f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body)
        else:
            data += b"\r\n"
        loop = self._running_loop()
        deadline = loop.time() + self.timeout_s
        for attempt in (0, 1):
            conn = await self._acquire(deadline)
            # a request that is not the first on its connection may find it closed by the
            # server after an earlier answer (or while idle): it is then sent once more
            may_retry = attempt == 0 and conn.sent > 0
            waiter: asyncio.Future[Answer] = loop.create_future()
            timer = loop.call_at(deadline, _expire, waiter)
            ok = False
            try:
                conn.send(data, waiter, loop)
                result = await waiter
                ok = True
                return result
            except _Unanswered:
                if may_retry:
                    continue
                raise
            finally:
                timer.cancel()
                self._release(conn, ok, waiter)
        raise AssertionError("unreachable")

    async def request_many(self, method: str, path: str, bodies: Sequence[bytes], *,
                           window: int, content_type: str = "application/json",
                           check: Callable[[int, Answer], bool] | None = None
                           ) -> list[Answer | BaseException]:
        """Send one request per body, at most `window` of them in flight at once, and return
        each one's (status, body) or the error it met, in the order of `bodies`.

        The same requests as `request` would send, with the same rules (one that got no byte
        of its answer because the server closed a used connection is sent once more on
        another), but without a task per request, and with one difference: only the first of
        the batch's requests waiting on a connection times out, `timeout_s` after it was
        written or after the answer before it, whichever is later (see `_Batch.expire`; a
        pipeline of n requests to a server that answers them in turn may take n times
        `timeout_s` in all, as long as each answer comes within it):
        an answer is taken by a callback that also writes the next request, and the caller
        wakes once, when every request has its outcome. This is the relay's path, where a
        batch of postings goes out together (`request` costs a few times more per request).
        If the caller is cancelled, the requests still in flight are given up as `request`
        gives them up.

        `check(index, answer)` says whether an answer is the one to that request (the body
        names what it answers, say). One that is not means the connection is out of step
        with its requests (a server or a middlebox that answered twice, or skipped one): its
        connection is closed, that request fails with `OutOfStep`, and every later answer on
        that connection is taken as no answer (the request is sent again on another one, as
        for any unanswered request), so that no answer is ever handed to another request."""
        if window < 1:
            raise ValueError("window must be positive")
        head = (self._head(method, path, None)
                + f"Content-Type: {content_type}\r\nContent-Length: ".encode())
        requests = [b"%s%d\r\n\r\n%s" % (head, len(body), body) for body in bodies]
        return await _Batch(self, requests, window, self._running_loop(), check).run()

    async def _acquire(self, deadline: float) -> _Conn:
        loop = self._running_loop()
        while True:
            if self._closed:
                raise PoolClosed("the HTTP connection pool was closed")
            conn = self._pick()
            if conn is not None:
                return conn
            if self._open < self.size:
                self._open += 1
                try:
                    timeout = max(0.001, min(self.connect_timeout_s, deadline - loop.time()))
                    async with asyncio.timeout(timeout):
                        _, conn = await loop.create_connection(
                            lambda: _Conn(self.max_body, loop), self.host, self.port)
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
                self._conns.append(conn)
                for _ in range(self.pipeline - 1):  # the rest of its room, to those waiting
                    self._wake_one()
                return conn
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

    def _pick(self) -> _Conn | None:
        """The usable connection with room that carries the most requests already (so that
        requests share writes), the most recently used among equals; None if there is none."""
        for conn in [c for c in self._conns if c.closed and not c.waiters]:
            self._discard(conn)  # closed by the server while idle
        best: _Conn | None = None
        for conn in self._conns:
            n = len(conn.waiters)
            if n < self.pipeline and conn.usable and (best is None or n >= len(best.waiters)):
                best = conn
        return best

    def _release(self, conn: _Conn, ok: bool, waiter: _Waiter) -> None:
        if not ok and not conn.closed and conn.waiters and (
                conn.waiters[0] is waiter or conn.waiters[0].done()):
            # its answer was the one awaited (or the one before it was given up already):
            # the connection is stuck or its state unknown, and whatever else it carries is
            # answered as lost. A request given up behind a live head stays in line as done,
            # its answer dropped in turn, so that one slow request does not fail the others.
            conn.abort()
        if (conn.closed or self._closed or conn.last_call) and not _carries(conn):
            self._discard(conn)
        elif ok and conn in self._conns and len(self._conns) > 1:
            # most recently used last: an idle connection is reused before an older one
            self._conns.remove(conn)
            self._conns.append(conn)
        self._wake_one()

    def _discard(self, conn: _Conn) -> None:
        """Take a connection with nothing in flight out of the pool, and close it."""
        if conn in self._conns:
            self._conns.remove(conn)
            self._open -= 1
            if not conn.closed:
                conn.closed = True
                if conn.transport is not None:
                    conn.transport.close()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        for conn in [c for c in self._conns if not _carries(c)]:
            self._discard(conn)  # those in use are closed as their last request ends
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(PoolClosed("the HTTP connection pool was closed"))


class _Slot:
    """One request of a `request_many` batch on its connection. It stands in for the future
    a single request waits on (a connection calls only `done`, `set_result` and
    `set_exception`), and hands its outcome to its batch."""

    __slots__ = ("_done", "answer", "batch", "conn", "deadline", "error", "index", "may_retry")

    def __init__(self, batch: _Batch, index: int, conn: _Conn, deadline: float,
                 may_retry: bool) -> None:
        self.batch = batch
        self.index = index
        self.conn = conn
        self.deadline = deadline
        self.may_retry = may_retry
        self.answer: Answer | None = None
        self.error: BaseException | None = None
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, answer: Answer) -> None:
        if not self._done:
            self._done = True
            self.answer = answer
            self.batch.settled(self)

    def set_exception(self, error: BaseException) -> None:
        if not self._done:
            self._done = True
            self.error = error
            self.batch.settled(self)


class _Batch:
    """The requests of one `request_many` call, written as connections and the window have
    room. Outcomes are taken together, once per turn of the event loop (never inside a
    connection's parser), and each one frees the room the next request is written into."""

    def __init__(self, pool: KeepAlivePool, requests: list[bytes], window: int,
                 loop: asyncio.AbstractEventLoop,
                 check: Callable[[int, Answer], bool] | None = None) -> None:
        self.pool = pool
        self.check = check
        self.requests = requests
        self.window = window
        self.least_write = max(1, window // 4)  # with nothing in flight, the whole window
        self.loop = loop
        self.results: list[Answer | BaseException | None] = [None] * len(requests)
        self.left = len(requests)  # without an outcome yet
        # (index, first attempt): a request sent again goes first, on another connection
        self.queue: collections.deque[tuple[int, bool]] = collections.deque(
            (i, True) for i in range(len(requests)))
        self.in_flight: dict[_Slot, None] = {}  # in the order they were written
        self.outcomes: list[_Slot] = []  # come in since the last `settle`
        self.wakeup: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.over = False
        self.connect_failed = False  # an open failed while requests were in flight

    async def run(self) -> list[Answer | BaseException]:
        pool = self.pool
        try:
            while self.left:
                # wait for an outcome (the last, or one after which a request still waits
                # for a connection) while requests are written as room comes by `settle`;
                # a connection is opened or waited for only when the batch cannot move on
                # its own: none of its requests in flight, or room for one more connection
                if self.write() or (self.in_flight and (
                        pool._open >= pool.size or self.connect_failed)):
                    await self._outcome()
                    continue
                try:
                    await pool._acquire(self.loop.time() + pool.timeout_s)
                except (OSError, TimeoutError) as e:  # PoolClosed is a ConnectionError
                    if self.in_flight:
                        # the batch still moves: it goes on with the connections it has,
                        # and tries to open another only once none of its requests is left
                        # in flight (not after every answer)
                        self.connect_failed = True
                        await self._outcome()
                        continue
                    while self.queue:  # each would have met the same
                        self.results[self.queue.popleft()[0]] = e
                        self.left -= 1
                else:
                    # the room `_acquire` found may go unused (the batch may have finished
                    # meanwhile): another waiter is told too, and looks again for itself
                    pool._wake_one()
            return self.results  # type: ignore[return-value]  # every one is set
        finally:
            self.over = True
            if self.timer is not None:
                self.timer.cancel()
            for slot in self.in_flight:  # given up (the caller was cancelled)
                ok = slot._done and slot.error is None
                slot._done = True
                pool._release(slot.conn, ok, slot)
            self.in_flight.clear()

    async def _outcome(self) -> None:
        self.wakeup = self.loop.create_future()
        await self.wakeup

    def write(self) -> bool:
        """Write queued requests while the window and the connections have room; False when
        one is left waiting for a connection (which only `run` can open or wait for)."""
        pool, loop = self.pool, self.loop
        while self.queue and len(self.in_flight) < self.window:
            conn = pool._pick()
            if conn is None:
                return False
            room = min(pool.pipeline - len(conn.waiters), self.window - len(self.in_flight))
            deadline = loop.time() + pool.timeout_s
            for _ in range(room):
                if not self.queue:
                    break
                index, first = self.queue.popleft()
                # as in `request`: sent again only if the connection had carried a request
                slot = _Slot(self, index, conn, deadline, first and conn.sent > 0)
                self.in_flight[slot] = None
                conn.send(self.requests[index], slot, loop)
            if self.timer is None:
                self.timer = loop.call_at(deadline, self.expire)
        return True

    def settled(self, slot: _Slot) -> None:
        if self.over:
            return
        if not self.outcomes:
            self.loop.call_soon(self.settle)
        self.outcomes.append(slot)

    def settle(self) -> None:
        if self.over:
            return
        outcomes, self.outcomes = self.outcomes, []
        release = self.pool._release
        again: list[tuple[int, bool]] = []
        check = self.check
        for slot in outcomes:
            del self.in_flight[slot]
            if check is not None and slot.error is None:
                conn = slot.conn
                if conn.out_of_step:  # answered after its connection lost step: not its own
                    slot.answer, slot.error = None, _Unanswered("the connection was out of step")
                elif not check(slot.index, slot.answer):  # type: ignore[arg-type]
                    slot.answer = None
                    slot.error = OutOfStep("an answer that is not this request's: the "
                                           "connection is out of step")
                    conn.out_of_step = True
                    conn.abort()  # what it still carries goes again, on another connection
            ok = slot.error is None
            release(slot.conn, ok, slot)
            if slot.may_retry and isinstance(slot.error, _Unanswered):
                again.append((slot.index, False))
                continue
            error = slot.error
            if isinstance(error, _Unanswered):  # a private name, not for the caller
                error = ConnectionResetError(str(error))
            self.results[slot.index] = slot.answer if ok else error
            self.left -= 1
        self.queue.extendleft(reversed(again))  # before the rest, in the order they were
        # the room an answer frees is filled a few requests at a time, a quarter of the
        # window at least (or what is left to send), not one by one: fewer, larger writes,
        # for the server to read together too. It comes as the requests ahead are answered.
        free = self.window - len(self.in_flight)
        if free < self.least_write and free < len(self.queue):
            return
        if (not self.left or not self.write()) and self.wakeup is not None \
                and not self.wakeup.done():
            self.wakeup.set_result(None)

    def expire(self) -> None:
        """Time out every request past its deadline; then wait for the next deadline.

        Only the first request waiting on a connection times out, `timeout_s` after it was
        written or after the answer before it came, whichever is later: a server that
        answers its pipeline one request at a time, each within the timeout, is slow, not
        stuck, and timing out the requests behind (the connection closed, every one of them
        sent again) would only pile more work on it. When the first one times out its
        connection is closed, and the requests behind it, never begun, go again."""
        self.timer = None
        if self.over:
            return
        # uvloop's timers have a resolution of a millisecond: a deadline within it is due
        now = self.loop.time() + 0.001
        timeout = self.pool.timeout_s
        following: float | None = None
        heads: set[_Conn] = set()
        for slot in list(self.in_flight):  # in the order they were written
            if slot._done:
                continue
            due = max(slot.deadline, slot.conn.answered_at + timeout)
            if slot.conn in heads:
                # behind the first: settled when it is (its connection closed, never begun),
                # or, if the connection stays open for a request ahead that is not this
                # batch's, timed out itself a timeout later: never left without a timer
                due += timeout
            heads.add(slot.conn)
            if due <= now:
                slot.set_exception(TimeoutError())
            elif following is None or due < following:
                following = due
        if following is not None:
            self.timer = self.loop.call_at(following, self.expire)


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
