"""The switch's HSM client: a small pool of pipelined connections to the HSM (or its simulator).

Each connection sends requests as they come and matches answers by their 4-character header,
so one connection carries many requests in flight. Every request has a timeout. When the HSM
cannot be reached, requests fail at once with `HsmUnavailable` (a circuit breaker tries a new
connection at most every `retry_interval_s`), instead of each waiting out its timeout.

No method returns or logs a clear key or PIN; key blocks are wrapped in `KeyBlock`, whose repr
shows only the key usage and length.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from hsm_sim.wire import (
    COMMANDS,
    MIN_MESSAGE,
    FieldError,
    FieldReader,
    data_field,
    encode_frame,
    key_block_field,
    response_code,
)
from switch.metrics import Counter, Histogram, LabelCache

__all__ = [
    "GeneratedKey",
    "HsmClient",
    "HsmError",
    "HsmTimeout",
    "HsmUnavailable",
    "KeyBlock",
    "VoucherRecord",
]

log = logging.getLogger("gridpay.hsm")

VOUCHERS_PER_REQUEST = 1000
PIN_BLOCK_FORMAT_ISO4 = "48"


class HsmError(Exception):
    """The HSM refused a command (`code` is its 2-character error code)."""

    def __init__(self, code: str | None, command: str, detail: str = "") -> None:
        self.code = code
        self.command = command
        text = f"HSM command {command} failed with error {code}" if code else \
            f"HSM command {command} failed"
        super().__init__(f"{text}: {detail}" if detail else text)


class HsmUnavailable(HsmError):
    """No connection to the HSM could be made (or it dropped with the request in flight)."""

    def __init__(self, command: str, detail: str = "HSM unavailable") -> None:
        super().__init__(None, command, detail)


class HsmTimeout(HsmError):
    """The HSM did not answer within the request timeout."""

    def __init__(self, command: str) -> None:
        super().__init__(None, command, "timed out")


@dataclass(frozen=True, slots=True)
class KeyBlock:
    """A TR-31 key block (under the LMK or a KEK). Its repr is masked."""

    text: str

    def __post_init__(self) -> None:
        if len(self.text) < 16 or not self.text.isascii() or not self.text[1:5].isdigit():
            raise ValueError("not a TR-31 key block")

    @property
    def key_usage(self) -> str:
        return self.text[5:7]

    def __repr__(self) -> str:
        return f"KeyBlock(usage={self.key_usage}, length={len(self.text)}, <masked>)"

    __str__ = __repr__


BlockLike = KeyBlock | str


def _block_text(block: BlockLike) -> str:
    return block.text if isinstance(block, KeyBlock) else KeyBlock(block).text


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    key_block: KeyBlock
    kcv: str
    exported_block: KeyBlock | None = None


@dataclass(frozen=True, slots=True)
class VoucherRecord:
    """One generated card: its serial, the keyed tag (hex) and the PIN under the print key."""

    serial: str
    tag: str
    encrypted_pin: str

    def __repr__(self) -> str:
        return f"VoucherRecord(serial={self.serial!r}, tag=<masked>, encrypted_pin=<masked>)"


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("gridpay_hsm_requests", "HSM requests by command and result",
                                ["command", "result"], registry=registry)
        self.latency = Histogram("gridpay_hsm_request_seconds", "HSM request latency",
                                 ["command"], registry=registry,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                                          0.25, 0.5, 1.0, 2.5))
        self.child = LabelCache()

    def count(self, command: str, result: str, seconds: float) -> None:
        self.child(self.requests, command, result).inc()
        self.child(self.latency, command).observe(seconds)


#: the error codes of the HSM contract (docs/hsm.md)
ERROR_CODES = frozenset({"00", "01", "04", "10", "15", "17", "20", "23", "24", "29", "41",
                         "68", "80", "A4", "A6", "A7", "A8"})

#: answers owed on a connection (requests given up) past which it is drained and replaced
_MAX_OWED = 1024


class _Connection(asyncio.Protocol):
    """One TCP connection with requests in flight, matched to answers by header.

    A protocol rather than a stream reader and a reading task: the answers are cut out of the
    bytes as they arrive and handed to their callers directly, one hop less per request.

    A request that times out leaves its answer owed: the HSM may still send it, late. Its
    header must then never go to a new request on this connection, or that late answer
    would be taken for the new request's ("MAC verifies" for another payment, after the
    4-digit headers have come round). So once a request times out the connection takes no
    new request (it drains: the pool opens another) and closes when nothing is left in
    flight. An answer that cannot be this connection's (a header never sent, or the wrong
    response code for its request) shows it out of step: it is closed at once, and what it
    carried fails as unavailable.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        # header -> (future, deadline, command, response code expected); one timer checks
        # the deadlines, which is much cheaper than a timeout context per request
        self._pending: dict[bytes, tuple[asyncio.Future[bytes], float, str, bytes]] = {}
        self._owed: set[bytes] = set()  # headers of requests given up: their answers dropped
        self.draining = False  # a request timed out here: no new request, closed when idle
        self._next = 0
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._check_every = 0.05
        self._timer: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None  # set while the buffer is full
        # kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11
        self._loop = asyncio.get_running_loop()
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self.alive = True

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
            data = bytes(self._buf)
            self._buf.clear()
        pos, n = 0, len(data)
        pending = self._pending
        while n - pos >= 2:
            end = pos + 2 + ((data[pos] << 8) | data[pos + 1])
            if end > n:
                break
            message = data[pos + 2:end]
            pos = end
            header = message[:4]
            entry = pending.get(header)
            if entry is not None and message[4:6] == entry[3]:
                if not entry[0].done():
                    entry[0].set_result(message)
                else:  # given up (timed out, cancelled): nothing is owed any more
                    del pending[header]
            elif header in self._owed:  # the late answer to a request given up
                self._owed.discard(header)
            else:
                log.warning("HSM answer that is no request's: connection closed",
                            extra={"length": len(message)})
                self._fail()
                return
        if pos < n:
            self._buf += data[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail()
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # -- requests -------------------------------------------------------------------------

    def _header(self) -> bytes:
        for _ in range(0x10000):
            self._next = (self._next + 1) % 0x10000
            header = f"{self._next:04X}".encode()
            if header not in self._pending and header not in self._owed:
                return header
        raise HsmUnavailable("--", "too many requests in flight")

    async def send(self, command: str, fields: bytes, limit_s: float) -> bytes:
        if not self.alive:
            raise HsmUnavailable(command, "connection lost")
        header = self._header()
        loop = self._loop
        future: asyncio.Future[bytes] = loop.create_future()
        code = command.encode()
        self._pending[header] = (future, loop.time() + limit_s, command, response_code(code))
        if self._timer is None:
            self._check_every = max(0.005, limit_s / 4)
            self._timer = loop.call_later(self._check_every, self._expire)
        # Requests made in the same loop iteration leave in one write (one system call),
        # which is what pipelining buys under load.
        self._out.append(encode_frame(header + code + fields))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        try:
            writable = self._writable
            if writable is not None:
                # the HSM is not reading: wait with the others, but no longer than this
                # request's own deadline (its future fails then, and the connection drains)
                await asyncio.wait((writable, future), return_when=asyncio.FIRST_COMPLETED)
            return await future
        except HsmUnavailable:
            raise HsmUnavailable(command, "connection lost") from None
        finally:
            entry = self._pending.pop(header, None)
            if entry is not None and not (future.done() and not future.cancelled()
                                          and future.exception() is None):
                self._owed.add(header)  # no answer taken: one may still come
                if len(self._owed) > _MAX_OWED:  # answers that never come: start afresh
                    self.draining = True
            if self.draining and not self._pending:
                self._fail()  # drained: what is still owed will never be read

    def _expire(self) -> None:
        """Fail the requests that have waited past their deadline (`HsmTimeout`); the
        connection then takes no new request (see the class)."""
        self._timer = None
        if not self.alive:
            return
        loop = self._loop
        now = loop.time()
        for future, deadline, command, _ in list(self._pending.values()):
            if deadline <= now and not future.done():
                future.set_exception(HsmTimeout(command))
                if not self.draining:
                    self.draining = True
                    log.warning("HSM request timed out: connection drained and replaced",
                                extra={"command": command})
        if self._pending:
            self._timer = loop.call_later(self._check_every, self._expire)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        if not self.alive or self.transport is None:
            return
        try:
            self.transport.write(data)
        except (ConnectionError, OSError, RuntimeError):
            self._fail()

    def _fail(self) -> None:
        if not self.alive:
            return
        self.alive = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for future, _, _, _ in self._pending.values():
            if not future.done():
                future.set_exception(HsmUnavailable("--", "connection lost"))
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_exception(HsmUnavailable("--", "connection lost"))
            writable.exception()  # retrieved: nobody else may be waiting
        if self.transport is not None:
            self.transport.close()

    async def close(self) -> None:
        self._fail()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._lost), 1.0)


class HsmClient:
    """Async client of the HSM host commands (see docs/hsm.md for the commands)."""

    def __init__(self, host: str, port: int, *, pool_size: int = 2, timeout: float = 2.0,
                 registry: CollectorRegistry | None = None, connect_timeout: float = 1.0,
                 retry_interval_s: float = 0.5) -> None:
        if pool_size < 1 or timeout <= 0 or connect_timeout <= 0 or retry_interval_s <= 0:
            raise ValueError("pool_size, timeout, connect_timeout and retry interval > 0")
        self._host = host
        self._port = port
        self._pool_size = pool_size
        self._timeout = timeout
        self._connect_timeout = min(connect_timeout, timeout)
        self._retry_max = retry_interval_s
        self._retry = min(0.05, retry_interval_s)
        self._down_until = 0.0
        # open connections, draining ones included (they take no request, see `_live`)
        self._conns: list[_Connection] = []
        self._rr = 0
        self._lock = asyncio.Lock()
        self._fill_task: asyncio.Task[None] | None = None
        self._closed = False
        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics = _Metrics(self.registry)

    def __repr__(self) -> str:
        return f"HsmClient({self._host}:{self._port}, pool_size={self._pool_size})"

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the pool. Does not fail when the HSM is down: requests will say so."""
        self._closed = False
        try:
            await self._acquire("--")
        except HsmUnavailable:
            log.warning("HSM not reachable at start", extra={"host": self._host,
                                                             "port": self._port})
            return
        if self._fill_task is not None:
            with contextlib.suppress(Exception):
                await self._fill_task

    async def close(self) -> None:
        self._closed = True
        if self._fill_task is not None:
            self._fill_task.cancel()
            with contextlib.suppress(BaseException):
                await self._fill_task
            self._fill_task = None
        conns, self._conns = self._conns, []
        for conn in conns:
            await conn.close()

    async def __aenter__(self) -> HsmClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> int:
        return sum(1 for c in self._conns if c.alive and not c.draining)

    # --- pool -------------------------------------------------------------------------------

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(_Connection, self._host, self._port), self._connect_timeout)
        return conn

    async def _fill(self) -> None:
        try:
            while not self._closed and self.connected < self._pool_size:
                try:
                    conn = await self._open()
                except (OSError, TimeoutError):
                    return
                self._conns.append(conn)
        finally:
            self._fill_task = None

    def _live(self) -> list[_Connection]:
        """The connections that take requests. A draining one stays listed until it closes
        itself (once its last request ends), so that `close` closes it too."""
        conns = self._conns
        live = [c for c in conns if c.alive and not c.draining]
        if len(live) != len(conns):
            self._conns = [c for c in conns if c.alive]
        return live

    async def _acquire(self, command: str) -> _Connection:
        if self._closed:
            raise HsmUnavailable(command, "client closed")
        live = self._live()
        if live:
            if len(live) < self._pool_size and self._fill_task is None:
                self._fill_task = asyncio.create_task(self._fill())
            # the connection with the fewest requests in flight, starting the search at the
            # next one round-robin (ties spread over the pool)
            n = len(live)
            self._rr = (self._rr + 1) % n
            best = live[self._rr]
            for i in range(1, n):
                c = live[(self._rr + i) % n]
                if c.in_flight < best.in_flight:
                    best = c
            return best
        if time.monotonic() < self._down_until:
            raise HsmUnavailable(command)
        async with self._lock:
            live = self._live()
            if live:
                return live[0]
            if time.monotonic() < self._down_until:
                raise HsmUnavailable(command)
            try:
                conn = await self._open()
            except (OSError, TimeoutError):
                self._down_until = time.monotonic() + self._retry
                self._retry = min(self._retry * 2, self._retry_max)
                log.warning("HSM connection failed", extra={"host": self._host,
                                                            "port": self._port})
                raise HsmUnavailable(command) from None
            self._retry = min(0.05, self._retry_max)
            self._down_until = 0.0
            self._conns.append(conn)
            if self._pool_size > 1 and self._fill_task is None:
                self._fill_task = asyncio.create_task(self._fill())
            return conn

    # --- one request ------------------------------------------------------------------------

    async def _call(self, command: str, fields: bytes, *, ok: tuple[str, ...] = ("00",)
                    ) -> tuple[str, FieldReader]:
        started = time.perf_counter()
        result = "error"
        try:
            conn = await self._acquire(command)
            message = await conn.send(command, fields, self._timeout)
            # (the response code was matched to the request's as the answer was read)
            if len(message) < MIN_MESSAGE + 2:
                result = "bad_response"
                raise HsmError(None, command, "unexpected response")
            code = message[6:8].decode("ascii", "replace")
            # a metric label: the contract's codes only, not whatever two bytes came
            result = code if code in ERROR_CODES else "other"
            if code not in ok:
                raise HsmError(code, command)
            return code, FieldReader(message, 8)
        except HsmTimeout:
            result = "timeout"
            raise
        except HsmUnavailable:
            result = "unavailable"
            raise
        finally:
            self._metrics.count(command, result, time.perf_counter() - started)

    async def _verdict(self, command: str, fields: bytes) -> bool:
        """A verification's answer: `00` matches, `01` does not; an answer that carries
        anything after its code is not one this command gives, and is trusted for neither."""
        code, rest = await self._call(command, fields, ok=("00", "01"))
        with _bad_response(command):
            rest.end()
        return code == "00"

    async def _fields(self, command: str, fields: bytes) -> FieldReader:
        _, reader = await self._call(command, fields)
        return reader

    # --- commands ---------------------------------------------------------------------------

    async def diagnostics(self) -> tuple[str, str]:
        """(LMK check value, firmware version)."""
        r = await self._fields("NC", b"")
        with _bad_response("NC"):
            kcv = r.text(6)
            firmware = r.raw(r.remaining).decode("ascii")
        return kcv, firmware

    async def echo(self, data: bytes) -> bytes:
        r = await self._fields("B2", data_field(data))
        with _bad_response("B2"):
            return r.raw(r.remaining)

    async def generate_key(self, usage: str, *, export_under: BlockLike | None = None,
                           mode_of_use: str | None = None,
                           exportability: str | None = None) -> GeneratedKey:
        """A new key of TR-31 `usage` (P0, M6, V0, K0, K1) under the LMK.

        With `export_under` (a KEK block), also under that KEK (authorised state only).
        `mode_of_use` defaults to the usage's usual one; `exportability` to `E` when exported
        at once, else `N`.
        """
        mode_of_use = mode_of_use or _DEFAULT_MODES.get(usage, "N")
        export = exportability or ("E" if export_under is not None else "N")
        fields = (("1" if export_under is not None else "0") + usage + mode_of_use
                  + export).encode("ascii")
        if export_under is not None:
            fields += key_block_field(_block_text(export_under))
        r = await self._fields("A0", fields)
        with _bad_response("A0"):
            block = KeyBlock(r.key_block())
            exported = KeyBlock(r.key_block()) if export_under is not None else None
            kcv = r.text(6)
            r.end()
        return GeneratedKey(block, kcv, exported)

    async def import_key(self, kek_block: BlockLike, block_under_kek: BlockLike, *,
                         expected_kcv: str | None = None) -> tuple[KeyBlock, str]:
        """Import a key given under a KEK; returns (block under the LMK, KCV)."""
        fields = key_block_field(_block_text(kek_block)) + \
            key_block_field(_block_text(block_under_kek))
        if expected_kcv is not None:
            fields += expected_kcv.encode("ascii")
        r = await self._fields("A6", fields)
        with _bad_response("A6"):
            block = KeyBlock(r.key_block())
            kcv = r.text(6)
        return block, kcv

    async def export_key(self, kek_block: BlockLike, key_block: BlockLike
                         ) -> tuple[KeyBlock, str]:
        """Export a key under a KEK; returns (block under the KEK, KCV)."""
        r = await self._fields("A8", key_block_field(_block_text(kek_block))
                               + key_block_field(_block_text(key_block)))
        with _bad_response("A8"):
            block = KeyBlock(r.key_block())
            kcv = r.text(6)
        return block, kcv

    async def key_check_value(self, key_block: BlockLike) -> str:
        r = await self._fields("BU", key_block_field(_block_text(key_block)))
        with _bad_response("BU"):
            return r.text(6)

    async def generate_mac(self, key_block: BlockLike, data: bytes) -> bytes:
        """AES-CMAC of `data`, truncated to 8 bytes."""
        r = await self._fields("M6", key_block_field(_block_text(key_block)) + data_field(data))
        with _bad_response("M6"):
            return r.hex(16)

    async def verify_mac(self, key_block: BlockLike, data: bytes, mac: bytes) -> bool:
        if len(mac) != 8:
            return False
        return await self._verdict(
            "M8", key_block_field(_block_text(key_block)) + data_field(data)
            + mac.hex().upper().encode())

    async def voucher_generate(self, vvk_block: BlockLike, print_key_block: BlockLike,
                               serials: Sequence[str], *, pin_length: int = 12
                               ) -> list[VoucherRecord]:
        """New random PINs for `serials`: per card the tag and the PIN under the print key.

        Splits the list into requests of at most 1000 serials, sent concurrently.
        """
        head = key_block_field(_block_text(vvk_block)) + \
            key_block_field(_block_text(print_key_block)) + f"{pin_length:02d}".encode()
        chunks = [list(serials[i:i + VOUCHERS_PER_REQUEST])
                  for i in range(0, len(serials), VOUCHERS_PER_REQUEST)]

        async def one(chunk: list[str]) -> list[VoucherRecord]:
            body = "".join(chunk).encode("ascii")
            r = await self._fields("ZG", head + f"{len(chunk):04d}".encode() + body)
            out: list[VoucherRecord] = []
            with _bad_response("ZG"):
                for serial in chunk:
                    tag = r.raw(32).hex().upper()
                    out.append(VoucherRecord(serial, tag, r.raw(16).hex().upper()))
                r.end()
            return out

        results = await asyncio.gather(*(one(c) for c in chunks))
        return [record for chunk in results for record in chunk]

    async def voucher_verify(self, pin_key_block: BlockLike, vvk_block: BlockLike,
                             serial: str, pin_block_hex: str, tag: str | bytes) -> bool:
        """Whether the format-4 PIN block holds the PIN whose tag is `tag`."""
        tag_hex = tag.hex() if isinstance(tag, bytes) else tag
        fields = (key_block_field(_block_text(pin_key_block))
                  + key_block_field(_block_text(vvk_block))
                  + (PIN_BLOCK_FORMAT_ISO4 + serial + pin_block_hex + tag_hex).encode("ascii"))
        return await self._verdict("ZV", fields)


_DEFAULT_MODES = {"P0": "B", "M6": "C", "V0": "C", "K0": "B", "K1": "B"}
assert set(COMMANDS) >= {"A0", "A6", "A8", "BU", "M6", "M8", "NC", "B2", "ZG", "ZV"}  # noqa: S101


@contextlib.contextmanager
def _bad_response(command: str) -> Iterator[None]:
    try:
        yield
    except (FieldError, ValueError, UnicodeDecodeError):
        raise HsmError(None, command, "malformed response") from None
