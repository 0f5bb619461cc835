"""A small HTTP/1.1 server for the simulator: an :class:`asyncio.Protocol` over httptools.

The simulator shares its machine with the switch it is benchmarked against, so every
microsecond it spends per request is taken from the system under test.  A general web framework
builds request, response and middleware objects and runs a task per request; this server does
only what the simulator's handful of routes need:

* HTTP/1.0 and 1.1, keep-alive, requests with ``Content-Length`` or chunked bodies (httptools,
  the C llhttp parser, does the parsing);
* pipelined requests, answered in the order they came; requests the application marks as
  able to run ahead (the simulator's postings) are handled while earlier answers still wait
  for their journal group, so that a pipelined batch shares one ``fdatasync`` and its answers
  leave in one write; any other request waits until every earlier answer is out;
* limits on the request target, the header block and the body, and a ``400``/``413``/``431``
  followed by closing the connection when they are broken;
* ``Expect: 100-continue``;
* idle keep-alive connections closed after a while.

The application is one function, ``handler(request, connection) -> Outcome``.  Most answers are
ready at once (a :data:`Reply`); the others are a :class:`Deferred` (wait for a future, then
compute the answer, without creating a task), a coroutine (run as a task: the slow paths of
fault injection), a :class:`ReplyThen` (answer, then run a coroutine before reading the next
request) or ``None`` (close the connection without an answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Final, Protocol, TypeAlias, cast

import httptools
import orjson

log = logging.getLogger("marketing_sim")

#: Largest request body accepted (as aiohttp's default ``client_max_size``).
MAX_BODY: Final = 1024 * 1024
#: Largest request target (path and query).
MAX_TARGET: Final = 8 * 1024
#: Largest header block (request line and headers), and largest trailer block of a chunked body.
MAX_HEAD: Final = 64 * 1024
#: Requests parsed ahead of the one being answered before the connection stops reading.
MAX_QUEUED: Final = 64
#: Requests handled ahead (see ``ahead``) whose answers are still owed, at most.
MAX_OWED: Final = 256
#: Reads are parsed this much at a time, so that parsing can stop once ``MAX_QUEUED`` is reached
#: (the rest of the read is kept until the queue drains).
_SLICE: Final = 8 * 1024
#: A kept-alive connection with nothing to do is closed after this long.
KEEPALIVE_TIMEOUT_S: Final = 75.0
_SWEEP_EVERY_S: Final = 10.0
_BACKLOG: Final = 1024

JSON_TYPE: Final = b"application/json"
PROBLEM_TYPE: Final = b"application/problem+json"

#: An answer: status, content type, body and extra header lines (each ending in CRLF).
Reply: TypeAlias = tuple[int, bytes, bytes, bytes]


class Waitable(Protocol):
    """Something that finishes later, such as an :class:`asyncio.Future`."""

    def done(self) -> bool: ...

    def add_done_callback(self, callback: Callable[[Any], object], /) -> None: ...


@dataclass(frozen=True, slots=True)
class Deferred:
    """Answer once ``future`` is done: ``then(future)`` gives the outcome."""

    future: Waitable
    then: Callable[[Any], Outcome]


@dataclass(frozen=True, slots=True)
class ReplyThen:
    """Send ``reply``, then run ``after`` before reading the connection's next request."""

    reply: Reply
    after: Coroutine[Any, Any, None]


Outcome: TypeAlias = "Reply | Deferred | ReplyThen | Coroutine[Any, Any, Outcome] | None"


def problem(status: int, code: str, detail: str, headers: bytes = b"") -> Reply:
    """An ``application/problem+json`` answer with a stable ``code``."""
    body = {
        "type": f"urn:gridpay:marketing:{code}",
        "title": code.replace("_", " "),
        "status": status,
        "detail": detail,
        "code": code,
    }
    return (status, PROBLEM_TYPE, orjson.dumps(body), headers)


def json_reply(status: int, body: object) -> Reply:
    return (status, JSON_TYPE, orjson.dumps(body), b"")


class Request:
    """One parsed request.  ``error`` is set instead when the request could not be read."""

    __slots__ = ("method", "path", "query", "body", "keep_alive", "version", "error")

    def __init__(
        self,
        method: bytes,
        path: str,
        query: str,
        body: bytes,
        keep_alive: bool,
        version: str,
        error: Reply | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.body = body
        self.keep_alive = keep_alive
        self.version = version
        self.error = error

    def query_value(self, name: str, default: str | None = None) -> str | None:
        """The first value of query parameter ``name``."""
        for key, value in urllib.parse.parse_qsl(self.query, keep_blank_values=True):
            if key == name:
                return value
        return default


def _split_target(target: bytes) -> tuple[str, str]:
    """Path (percent-decoded) and raw query of a request target; ``ValueError`` if unusable."""
    if not target.startswith(b"/"):
        # Absolute form (``http://host/path``) is allowed by HTTP/1.1; anything else is not.
        try:
            parsed = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise ValueError("bad request target") from None
        raw_path = parsed.path or b"/"
        raw_query = parsed.query or b""
    else:
        raw_path, _, raw_query = target.partition(b"?")
        raw_query = raw_query.partition(b"#")[0]
        raw_path = raw_path.partition(b"#")[0]
    path = raw_path.decode("utf-8", "replace")
    if "%" in path:
        path = urllib.parse.unquote(path, errors="replace")
    return path, raw_query.decode("utf-8", "replace")


# --- response heads ---------------------------------------------------------------------------

_status_lines: dict[tuple[str, int], bytes] = {}
_date_second = -1
_date_line = b""


def _status_line(version: str, status: int) -> bytes:
    line = _status_lines.get((version, status))
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        line = f"HTTP/{version} {status} {phrase}\r\n".encode("ascii")
        _status_lines[(version, status)] = line
    return line


def _date_header() -> bytes:
    """The ``Date`` header line, formatted at most once a second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = f"Date: {formatdate(now, usegmt=True)}\r\n".encode("ascii")
    return _date_line


_BAD_REQUEST: Final = problem(400, "bad_request", "the request is not valid HTTP/1.1")
_TOO_LARGE: Final = problem(413, "body_too_large", f"the body exceeds {MAX_BODY} bytes")
_HEAD_TOO_LARGE: Final = problem(
    431, "headers_too_large", f"the request line and headers exceed {MAX_HEAD} bytes"
)
_TARGET_TOO_LONG: Final = problem(414, "uri_too_long", f"the target exceeds {MAX_TARGET} bytes")
_INTERNAL: Final = problem(500, "internal_error", "the simulator failed to answer")


class _TooLarge(Exception):
    """Raised inside a parser callback to stop parsing; ``reply`` says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply[2].decode())
        self.reply = reply


Handler: TypeAlias = Callable[[Request, "Connection"], Outcome]


class _Owed:
    """A request handled ahead of its turn, and its outcome once known."""

    __slots__ = ("request", "outcome", "pending")

    def __init__(self, request: Request, outcome: Outcome, pending: bool) -> None:
        self.request = request
        self.outcome = outcome
        self.pending = pending


class Connection(asyncio.Protocol):
    """One client connection: parses requests and answers them in order."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._handler = server.handler
        self._ahead = server.ahead
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.last_active = 0.0
        # The message being parsed.
        self._target: list[bytes] = []
        self._target_size = 0
        self._body: bytes | bytearray = b""
        self._body_size = 0
        # Size limits while httptools buffers unfinished header lines (the head, or the trailer
        # of a chunked body): ``_head_size`` counts the fields reported so far, ``_raw_size`` the
        # slices parsed wholly inside the current head or trailer (``_phase`` changes whenever
        # a phase ends, so a slice in which one ended is never counted).  Both only ever
        # undercount, so no message within the limits is refused.
        self._in_head = False
        self._in_trailer = False
        self._phase = 0
        self._head_size = 0
        self._raw_size = 0
        self._expect_continue = False
        self._continue_owed = False  # a 100 to send once the earlier answers are out
        # Requests read and not yet answered, and the state of the one being answered.
        self._queue: deque[Request] = deque()
        self._rest: bytes | None = None  # read, not yet parsed (the queue was full)
        self._busy = False
        # Handled, answers owed in order (only while requests run ahead; see ``_owe``).
        self._owed: deque[_Owed] = deque()
        self._barrier = False  # an owed outcome that is not a plain answer: handle no more
        self._answering = False  # an ``_answer_owed`` call is scheduled
        self._out: list[bytes] | None = None  # answers being gathered into one write
        self._stopped = False  # nothing more will be read (EOF, a broken request, an upgrade)
        self._reading = True
        self._write_paused = False
        self._closed = False
        self._gone: asyncio.Future[None] | None = None

    # --- asyncio ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self.last_active = self._server.loop.time()
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._queue.clear()
        self._drop_owed()
        self._rest = None
        self._server.connections.discard(self)
        self._mark_gone()

    def eof_received(self) -> bool | None:
        # The client will send nothing more; answer what it already sent, then close.
        self._stopped = True
        self._mark_gone()
        if self.busy:
            return True  # keep the write side open
        return None  # nothing to answer: let the transport close

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        self.last_active = self._server.loop.time()
        if self._rest is not None:
            # Not expected (reading stops while a rest is kept), but never lose bytes.
            self._rest += data
        else:
            self._feed(data)
        self._pump()

    def _feed(self, data: bytes) -> None:
        """Parse ``data`` a slice at a time; keep what is left once the queue is full."""
        size = len(data)
        view = memoryview(data) if size > _SLICE else data
        parser = self._parser
        start = 0
        while start < size:
            end = start + _SLICE
            piece = view[start:end] if size > _SLICE else data
            phase = self._phase
            limited = self._in_head or self._in_trailer
            try:
                parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                # No protocol switch is offered: answer what came before, read nothing more.
                self._stop(None)
                return
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__context__
                self._stop(cause.reply if isinstance(cause, _TooLarge) else _BAD_REQUEST)
                return
            except httptools.HttpParserError:
                self._stop(_BAD_REQUEST)
                return
            if limited and phase == self._phase:
                # The whole slice lies in the head (or trailer) still being read.
                self._raw_size += len(piece)
                if self._raw_size > MAX_HEAD:
                    self._stop(_HEAD_TOO_LARGE)
                    return
            start = end
            if start < size and len(self._queue) >= MAX_QUEUED:
                self._rest = bytes(view[start:])
                return

    # --- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._target = []
        self._target_size = 0
        self._body = b""
        self._body_size = 0
        self._in_head = True
        self._in_trailer = False
        self._phase += 1
        self._head_size = 0
        self._raw_size = 0
        self._expect_continue = False
        self._continue_owed = False

    def on_url(self, url: bytes) -> None:
        self._target_size += len(url)
        if self._target_size > MAX_TARGET:
            raise _TooLarge(_TARGET_TOO_LONG)
        self._target.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEAD:
            raise _TooLarge(_HEAD_TOO_LARGE)
        if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._phase += 1
        if self._expect_continue and self._parser.get_http_version() != "1.0":
            # The client waits for this before sending the body.  Answers never interleave:
            # while an earlier answer is still owed, it is sent after that answer.
            if not self._busy and not self._queue and not self._owed and not self._closed:
                assert self.transport is not None
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            else:
                self._continue_owed = True

    def on_chunk_header(self) -> None:
        # Until body bytes follow, this may be the last chunk: what comes next is its trailer.
        self._in_trailer = True
        self._phase += 1
        self._raw_size = 0

    def on_body(self, body: bytes) -> None:
        if self._in_trailer:
            self._in_trailer = False
            self._phase += 1
        self._body_size += len(body)
        if self._body_size > MAX_BODY:
            raise _TooLarge(_TOO_LARGE)
        if not self._body:
            self._body = body
        elif type(self._body) is bytes:
            # A body in several pieces (chunked, or over several reads): one growing buffer.
            self._body = bytearray(self._body)
            self._body += body
        else:
            self._body += body

    def on_message_complete(self) -> None:
        parser = self._parser
        target = self._target[0] if len(self._target) == 1 else b"".join(self._target)
        body = self._body if type(self._body) is bytes else bytes(self._body)
        version = parser.get_http_version()
        keep_alive = bool(parser.should_keep_alive())
        try:
            path, query = _split_target(target)
        except ValueError:
            request = Request(b"", "", "", b"", False, version, _BAD_REQUEST)
        else:
            request = Request(parser.get_method(), path, query, body, keep_alive, version)
        self._queue.append(request)
        self._body = b""
        self._in_trailer = False
        self._phase += 1
        self._continue_owed = False

    # --- answering ----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether an answer is owed on this connection."""
        return self._busy or bool(self._queue) or bool(self._owed) or self._rest is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stalled(self) -> bool:
        """Whether answers wait for the client to read what was already sent."""
        return self._write_paused

    def gone(self) -> asyncio.Future[None]:
        """A future done once the client has closed (or half-closed) the connection."""
        if self._gone is None:
            self._gone = self._server.loop.create_future()
            if self._closed or self._stopped:
                self._gone.set_result(None)
        return self._gone

    def _mark_gone(self) -> None:
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    def close(self) -> None:
        """Close the connection (whatever was written is still sent)."""
        self._stopped = True
        self._flush_out()  # answers gathered for one write go before the close
        if self.transport is not None and not self._closed:
            self.transport.close()
        self._closed = True
        self._queue.clear()
        self._drop_owed()
        self._rest = None

    def _drop_owed(self) -> None:
        """Forget the owed answers (the connection is closing); work that was to follow an
        answer is not started."""
        owed, self._owed = self._owed, deque()
        self._barrier = False
        for item in owed:
            outcome = item.outcome
            if isinstance(outcome, ReplyThen):
                outcome.after.close()
            elif asyncio.iscoroutine(outcome):
                outcome.close()

    def drop(self) -> None:
        """Close the connection now: what the client has not read yet is discarded.

        A graceful close waits for the client to read what is buffered, forever if it never
        reads; so a connection with unsent data is aborted instead.
        """
        transport = self.transport
        self.close()
        if transport is not None and transport.get_write_buffer_size() > 0:
            transport.abort()

    def _stop(self, reply: Reply | None) -> None:
        """Read nothing more; answer what was read, then ``reply`` (if any), then close."""
        self._stopped = True
        self._rest = None
        if reply is not None:
            self._queue.append(Request(b"", "", "", b"", False, "1.1", reply))

    def _update_reading(self) -> None:
        if self._closed or self.transport is None:
            return
        want = (
            not self._stopped
            and not self._write_paused
            and self._rest is None
            and len(self._queue) < MAX_QUEUED
        )
        if want != self._reading:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _pump(self) -> None:
        """Answer queued requests in order until one has to wait (or the client stops reading)."""
        if self._owed:
            self._send_owed()
        while True:
            while not self._busy and self._queue and not self._closed and not self._write_paused:
                if self._owed and not self._may_run_ahead(self._queue[0]):
                    break  # it waits until every earlier answer is out
                request = self._queue.popleft()
                if request.error is not None:
                    self._write(request, request.error)
                    continue
                try:
                    outcome = self._handler(request, self)
                except Exception:
                    log.exception("marketing simulator failed to answer %s", request.path)
                    outcome = _INTERNAL
                if self._owed or (
                    isinstance(outcome, Deferred)
                    and not outcome.future.done()
                    and self._may_run_ahead(request)
                ):
                    self._owe(request, outcome)
                else:
                    self._settle(request, outcome)
            rest = self._rest
            if rest is None or self._closed or self._write_paused or len(self._queue) >= MAX_QUEUED:
                break
            self._rest = None
            self._feed(rest)
        if self._closed:
            return
        if not self._busy and not self._queue and not self._owed:
            if self._stopped and self._rest is None:
                self.close()
                return
            if self._continue_owed:
                # Every earlier answer is out: the client may now send the body.
                self._continue_owed = False
                assert self.transport is not None
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._update_reading()

    def _may_run_ahead(self, request: Request) -> bool:
        return (
            self._ahead is not None
            and not self._barrier
            and len(self._owed) < MAX_OWED
            and request.error is None
            and self._ahead(request)
        )

    def _owe(self, request: Request, outcome: Outcome) -> None:
        """Keep ``outcome`` until the answers before it are out (or until it is known)."""
        if isinstance(outcome, Deferred) and not outcome.future.done():
            owed = _Owed(request, None, True)
            deferred = outcome
            outcome.future.add_done_callback(lambda done: self._owed_done(owed, deferred, done))
        else:
            owed = _Owed(request, outcome, False)
            if type(outcome) is not tuple and not isinstance(outcome, Deferred):
                self._barrier = True  # a task, a hold or a close: nothing more until it is done
        self._owed.append(owed)

    def _owed_done(self, owed: _Owed, deferred: Deferred, future: Waitable) -> None:
        if self._closed:
            return
        owed.outcome = self._then(deferred, future)
        owed.pending = False
        if not self._answering:
            # every answer a journal group completes on this connection, in one write
            self._answering = True
            self._server.loop.call_soon(self._answer_owed)

    def _answer_owed(self) -> None:
        self._answering = False
        self._pump()

    def _send_owed(self) -> None:
        """Send the owed answers that are known, in order, in one write."""
        self._out = []
        try:
            while self._owed and not self._busy and not self._closed and not self._write_paused:
                owed = self._owed[0]
                if owed.pending:
                    break
                self._owed.popleft()
                if not self._owed:
                    self._barrier = False
                self._settle(owed.request, owed.outcome)
        finally:
            self._flush_out()
            self._out = None

    def _flush_out(self) -> None:
        if self._out and self.transport is not None and not self._closed:
            self.transport.write(b"".join(self._out))
        if self._out is not None:
            self._out = []

    def _settle(self, request: Request, outcome: Outcome) -> None:
        """Send ``outcome`` now, or arrange for it to be sent when it is known."""
        if type(outcome) is tuple:
            self._write(request, outcome)
        elif outcome is None:
            self.close()
        elif isinstance(outcome, Deferred):
            future = outcome.future
            if future.done():
                self._settle(request, self._then(outcome, future))
            else:
                self._busy = True
                future.add_done_callback(lambda done: self._deferred_done(request, outcome, done))
        elif isinstance(outcome, ReplyThen):
            self._write(request, outcome.reply)
            self._run_after(outcome.after)
        else:
            assert not isinstance(outcome, tuple)
            self._run(request, outcome)

    @staticmethod
    def _then(deferred: Deferred, future: Waitable) -> Outcome:
        try:
            return deferred.then(future)
        except Exception:
            log.exception("marketing simulator failed to finish an answer")
            return _INTERNAL

    def _deferred_done(self, request: Request, deferred: Deferred, future: Waitable) -> None:
        self._busy = False
        self._settle(request, self._then(deferred, future))
        self._pump()

    def _run(self, request: Request, work: Coroutine[Any, Any, Outcome]) -> None:
        self._busy = True
        task = self._server.loop.create_task(work)
        self._server.tasks.add(task)
        task.add_done_callback(lambda done: self._task_done(request, done))

    def _run_after(self, work: Coroutine[Any, Any, None]) -> None:
        self._busy = True
        task = self._server.loop.create_task(work)
        self._server.tasks.add(task)
        task.add_done_callback(self._after_done)

    def _after_done(self, task: asyncio.Task[Any]) -> None:
        self._server.tasks.discard(task)
        self._busy = False
        if not task.cancelled() and task.exception() is not None:
            log.error("marketing simulator follow-up failed", exc_info=task.exception())
        self._pump()

    def _task_done(self, request: Request, task: asyncio.Task[Outcome]) -> None:
        self._server.tasks.discard(task)
        self._busy = False
        if task.cancelled():
            self.close()
            return
        error = task.exception()
        if error is not None:
            log.error("marketing simulator failed to answer %s", request.path, exc_info=error)
            outcome: Outcome = _INTERNAL
        else:
            outcome = task.result()
        self._settle(request, outcome)
        self._pump()

    def _write(self, request: Request, reply: Reply) -> None:
        if self._closed or self.transport is None:
            return
        status, content_type, body, headers = reply
        version = request.version
        if not request.keep_alive:
            self._stopped = True
            if version != "1.0":
                headers += b"Connection: close\r\n"
        elif version == "1.0":
            headers += b"Connection: keep-alive\r\n"
        head = b"%sContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n" % (
            _status_line(version, status),
            content_type,
            len(body),
            _date_header(),
            headers,
        )
        data = head if request.method == b"HEAD" else head + body
        if self._out is not None:
            self._out.append(data)  # (a last answer is flushed by close() below)
        else:
            self.transport.write(data)
        self.last_active = self._server.loop.time()
        if not request.keep_alive:
            self.close()


class HttpServer:
    """Listens on ``host``:``port`` and serves ``handler``; can stop and start listening."""

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        *,
        ahead: Callable[[Request], bool] | None = None,
    ) -> None:
        self.handler = handler
        #: Which requests may be handled while earlier answers on their connection still
        #: wait (``Deferred``): their effects must be applied in order and be safe to run
        #: before the earlier answers are out.  ``None``: one request at a time.
        self.ahead = ahead
        self.host = host
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.kept: Connection | None = None  # left open while not listening (see below)

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def listen(self) -> int:
        """Start listening (on the port used before, once it is known); returns the port."""
        server = await self.loop.create_server(
            lambda: Connection(self),
            self.host,
            self.port,
            reuse_address=True,
            backlog=_BACKLOG,
        )
        self._server = server
        self.kept = None
        self.port = server.sockets[0].getsockname()[1]
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(_SWEEP_EVERY_S, self._sweep)
        return self.port

    def stop_listening(self) -> None:
        """Close the listening socket: new connections are refused from now on."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def close_connections(self, keep: Connection | None = None) -> None:
        """Close every connection (but `keep`, which the sweeper then leaves open however
        idle, until the server listens again); one whose client does not read what was sent
        is aborted."""
        self.kept = keep
        for connection in list(self.connections):
            if connection is not keep:
                connection.drop()

    def _sweep(self) -> None:
        # Idle ones, and those whose client has read nothing of what was sent for as long.
        deadline = self.loop.time() - KEEPALIVE_TIMEOUT_S
        for connection in list(self.connections):
            if connection is self.kept and not connection.closed:
                continue
            if connection.last_active < deadline and (
                not connection.busy or connection.stalled or connection.closed
            ):
                connection.drop()
        self._sweeper = self.loop.call_later(_SWEEP_EVERY_S, self._sweep)

    async def close(self, grace_s: float) -> None:
        """Stop listening, give owed answers up to ``grace_s``, then close every connection."""
        self.stop_listening()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        deadline = self.loop.time() + grace_s
        # Polled, and only at shutdown, so that answering a request costs no notification.
        while any(c.busy for c in self.connections) and self.loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self.close_connections()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
