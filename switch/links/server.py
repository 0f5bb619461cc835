"""The TCP listeners of the bank and post-office links: a thin asyncio shell around the framer
and `LinkService`.

Per connection: the peer address must belong to an institution of this dialect (else the
connection is closed at once, as is one above the institution's connection limit); frames are
fed to the framer; each request is handled in its own task, so responses go back in whatever
order they complete (clients match them by MTI class, 11, 7 and 32); at most `max_in_flight`
requests are handled at once, and reading pauses until one finishes (backpressure); a connection
silent for `idle_timeout_s` is closed; a bad length header or an oversize frame closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import TYPE_CHECKING, cast

from protocols.iso8583 import NEED_DATA, Codec, Dialect, Framer, FramingError
from switch.config import Institution, LinkSettings
from switch.links.service import Link, LinkService, LinkState

if TYPE_CHECKING:
    from switch.metrics import Metrics

log = logging.getLogger("gridpay.links")


class LinkProtocol(asyncio.Protocol):
    def __init__(self, listener: LinkListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        # the protocol is made by the loop it runs on; kept, because asyncio.get_running_loop()
        # costs a getpid() system call on Python 3.11
        self._loop = asyncio.get_running_loop()
        self.link: Link | None = None
        self.framer = Framer(listener.dialect, listener.settings.max_frame)
        self.in_flight: set[asyncio.Task[None]] = set()
        self.paused = False
        self.closing = False
        self._idle: asyncio.TimerHandle | None = None
        self._counted: str | None = None  # the institution this connection counts against
        self._out: list[bytes] = []
        self._flush_scheduled = False

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but behave as one
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        host = peer[0] if peer else ""
        lst = self.listener
        candidates = tuple(lst.institutions_for(host))
        if not lst.accepting or not candidates:
            log.warning("connection refused", extra={"dialect": lst.dialect.name, "peer": host,
                                                     "reason": "standby or stopping"
                                                     if not lst.accepting else
                                                     "address of no institution"})
            lst.metrics.link_errors.labels(lst.dialect.name, "refused").inc()
            self.transport.abort()
            return
        link = Link(dialect=lst.dialect.name, codec=lst.codec, peer=host, candidates=candidates,
                    bind=self._bind)
        if len(candidates) == 1:
            inst = candidates[0]
            if not self._bind(inst):
                self.transport.abort()
                return
            link.institution = inst
        self.link = link
        lst.protocols.add(self)
        self._arm_idle()
        log.info("link connected", extra={"dialect": lst.dialect.name, "peer": host})

    def _bind(self, inst: Institution) -> bool:
        """Count this connection for `inst`, within its limit (at connect when the peer's
        address names one institution, else at sign-on); False: at the limit."""
        lst = self.listener
        if lst.count[inst.id] >= inst.max_connections:
            log.warning("connection refused: institution at its connection limit",
                        extra={"institution": inst.id, "limit": inst.max_connections})
            lst.metrics.link_errors.labels(lst.dialect.name, "over_limit").inc()
            return False
        lst.count[inst.id] += 1
        lst.metrics.link_connections.labels(inst.id).inc()
        self._counted = inst.id
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        lst = self.listener
        if self._idle is not None:
            self._idle.cancel()
        if self._counted is not None:  # only what was counted is given back
            lst.count[self._counted] -= 1
            lst.metrics.link_connections.labels(self._counted).dec()
            self._counted = None
        if self.link is not None:
            self.link.state = LinkState.CLOSED
        lst.protocols.discard(self)
        for t in self.in_flight:
            t.cancel()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(self.listener.settings.idle_timeout_s, self._idle_out)

    def _idle_out(self) -> None:
        log.info("link idle: closing", extra={"peer": self.link.peer if self.link else ""})
        self.listener.metrics.link_errors.labels(self.listener.dialect.name, "idle").inc()
        self.close()

    def close(self) -> None:
        self.closing = True
        self._flush()  # answers already made go out before the close
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- data ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.link is None or self.closing:
            return
        self.framer.receive_data(data)
        keepalives = self.framer.keepalives
        frames = self._take_frames()
        # whole frames (a keep-alive is a zero-length one) keep the link open; bytes that
        # never complete a frame do not
        if frames or self.framer.keepalives != keepalives:
            self._arm_idle()

    def _take_frames(self) -> int:
        """Start the buffered frames while fewer than `max_in_flight` are in flight (the rest
        wait in the framer, reading paused, until answers make room); how many started."""
        assert self.link is not None
        frames = 0
        limit = self.listener.settings.max_in_flight
        try:
            while len(self.in_flight) < limit:
                frame = self.framer.next_frame()
                if frame is NEED_DATA:
                    break
                frames += 1
                self._spawn(frame)
        except FramingError as e:
            log.warning("framing error: closing the connection",
                        extra={"peer": self.link.peer, "reason": str(e)})
            self.listener.metrics.link_errors.labels(self.listener.dialect.name,
                                                     "framing").inc()
            if self.transport is not None:
                self.transport.abort()
        return frames

    def _send(self, data: bytes) -> None:
        """Responses completed in the same loop iteration leave in one write."""
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _spawn(self, frame: bytes) -> None:
        assert self.link is not None
        task = self._loop.create_task(self._handle(frame))
        self.in_flight.add(task)
        task.add_done_callback(self._handled)
        if len(self.in_flight) >= self.listener.settings.max_in_flight and not self.paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self.paused = True

    async def _handle(self, frame: bytes) -> None:
        assert self.link is not None
        try:
            out = await self.listener.service.handle(self.link, frame)
            if out is not None:
                self._send(self.listener.codec.frame(out))
        except Exception:
            log.exception("request failed unexpectedly", extra={"peer": self.link.peer})
            self.listener.metrics.link_errors.labels(self.listener.dialect.name,
                                                     "internal").inc()

    def _handled(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        if not self.paused or self.closing or self.transport is None \
                or self.transport.is_closing():
            return
        self._take_frames()  # those already read first (as many as there is room for)
        if len(self.in_flight) < self.listener.settings.max_in_flight \
                and not self.transport.is_closing():
            self.transport.resume_reading()
            self.paused = False


class LinkListener:
    """One dialect's listening socket (bound only while the node is active)."""

    def __init__(self, dialect: Dialect, host: str, port: int, settings: LinkSettings,
                 institutions: tuple[Institution, ...], service: LinkService,
                 metrics: Metrics) -> None:
        self.dialect = dialect
        self.codec = Codec(dialect)
        self.host = host
        self.port = port
        self.settings = settings
        self.institutions = tuple(i for i in institutions if i.dialect == dialect.name)
        self.service = service
        self.metrics = metrics
        self.server: asyncio.Server | None = None
        self.protocols: set[LinkProtocol] = set()
        self.count: Counter[str] = Counter()
        self.accepting = False
        self.bound_port: int | None = None

    def institutions_for(self, host: str) -> list[Institution]:
        return [i for i in self.institutions if i.allows(host)]

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.accepting = True
        self.server = await loop.create_server(lambda: LinkProtocol(self), self.host, self.port,
                                               reuse_address=True, backlog=512)
        self.bound_port = int(self.server.sockets[0].getsockname()[1])
        if self.port == 0:
            self.port = self.bound_port  # keep the same port across standby/active flips
        log.info("link listener open", extra={"dialect": self.dialect.name,
                                              "port": self.bound_port})
        return self.bound_port

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close."""
        self.accepting = False
        if self.server is not None:
            self.server.close()
        pending = [t for p in self.protocols for t in p.in_flight]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        for p in list(self.protocols):
            p.close()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)
            self.server = None
        self.bound_port = None
