"""Load generators: worker processes with pre-built messages, closed or open loop.

Each worker is its own process (so that it never competes with the switch for one event loop)
and runs uvloop. It builds its messages before the clock starts, connects, signs on, reports
ready, and starts at the instant the parent gives. Closed loop: every connection keeps `depth`
requests in flight. Open loop: requests are due at `rate` per second on a fixed schedule and
latency is measured from the instant a request was *due*, not when it could be sent, so that a
stalled switch cannot hide its stall (coordinated omission).

A worker reports: responses by code, an HDR histogram of latencies (microseconds), the
deduplication keys of approved payments (the books check needs them) and of requests left
without an answer, and the CPU time it used itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing as mp
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from multiprocessing.connection import Connection
from typing import Any, cast

import orjson
from hdrh.histogram import HdrHistogram

__all__ = ["LoadSpec", "WorkerPool", "new_histogram"]

HIST_MAX_US = 120_000_000


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while the clock runs: a generator keeps every request and
    answer of the run until it reads them afterwards, and a full collection walking them would
    pause it for milliseconds, which would show as the switch's latency. Reference counting
    still frees everything; nothing here makes cycles."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, 3)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSpec:
    """What one worker process does."""

    kind: str  # 'iso' (bank/post link) or 'http' (JSON POST)
    name: str  # the stream's name in the report ('bank', 'http', 'baseline_http', ...)
    host: str
    port: int
    connections: int
    duration_s: float
    rate: float = 0.0  # requests per second from this worker; 0: closed loop
    depth: int = 1  # closed loop: requests in flight per connection
    worker: int = 0
    prebuild: int = 20_000
    timeout_s: float = 10.0
    seed: int = 1
    accounts: tuple[str, ...] = ()
    # iso
    dialect: str = "bank"
    institution: str = ""
    mac_key: bytes = field(default=b"", repr=False)
    # http
    path: str = "/v1/payments"
    api_key: str = field(default="", repr=False)
    client_id: str = ""
    run_tag: str = "r"
    # ivr: test cards as (serial, PIN), callers in flight = connections
    cards: tuple[tuple[str, str], ...] = field(default=(), repr=False)


# -- message builders (run before the clock starts) --------------------------------------------


Item = tuple[str, bytes]  # (deduplication key, wire bytes)


def iso_builder(spec: LoadSpec) -> tuple[Callable[[int], Item], bytes]:
    """(payment number → (dedup key, framed 0200 with its MAC), framed sign-on)."""
    from crypto.cmac import mac8
    from protocols.iso8583 import Codec, Message, Tlv, builtin_dialect
    from switch.links import iso_dedup_key

    codec = Codec(builtin_dialect(spec.dialect))
    rnd = random.Random(spec.seed * 1000 + spec.worker)
    now = datetime.now()
    # a distinct transmission time per worker (and per million STANs) keeps keys unique
    base = now - timedelta(seconds=60 * spec.worker)
    key = spec.mac_key
    inst = spec.institution

    def build(i: int) -> Item:
        block, n = divmod(i, 999_999)
        f7 = (base - timedelta(seconds=block)).strftime("%m%d%H%M%S")
        stan = f"{n + 1:06d}"
        acct = spec.accounts[rnd.randrange(len(spec.accounts))]
        fields: dict[int, object] = {
            3: "500000", 4: f"{rnd.randint(100, 200_000):012d}", 7: f7, 11: stan,
            12: now.strftime("%H%M%S"), 13: now.strftime("%m%d"), 32: inst,
            37: f"{spec.worker:02d}{i:010d}"[-12:], 41: f"T{spec.worker:07d}",
            48: Tlv.of(("01", acct)), 49: "156"}
        msg = Message("0200", fields)  # type: ignore[arg-type]
        body = codec.encode_with_mac(msg, lambda data: mac8(key, data))
        return iso_dedup_key(inst, stan, f7), codec.frame(body)

    sign_on = Message("0800", {7: now.strftime("%m%d%H%M%S"), 11: "999999", 32: inst,
                               70: "001"})
    return build, codec.frame(codec.encode(sign_on))


def http_builder(spec: LoadSpec) -> Callable[[int], Item]:
    rnd = random.Random(spec.seed * 1000 + spec.worker)
    head = (f"POST {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n"
            "Content-Type: application/json\r\n")
    if spec.api_key:
        head += f"Authorization: Bearer {spec.api_key}\r\n"
    methods = ("cash", "transfer", "bank_card", "wallet")

    def build(i: int) -> Item:
        idem = f"{spec.run_tag}-{spec.worker}-{i}"
        body = orjson.dumps({"account_no": spec.accounts[rnd.randrange(len(spec.accounts))],
                             "amount": rnd.randint(100, 200_000),
                             "method": methods[i % 4]})
        raw = (f"{head}Idempotency-Key: {idem}\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
        return f"http:{spec.client_id}:{idem}", raw

    return build


# -- connections ------------------------------------------------------------------------------


class Engine:
    """Counts, times and paces the requests of one worker."""

    def __init__(self, spec: LoadSpec, build: Callable[[int], Item], items: list[Item]) -> None:
        self.spec = spec
        self.build = build
        self.items = items
        self.issued = 0
        self.hist = new_histogram()
        self.codes: Counter[str] = Counter()
        self.approved: list[str] = []
        self.start = 0.0
        self.end = 0.0
        self.in_window = 0
        self.completed = 0
        self.stopping = False
        self.built_late = 0
        self.idle = asyncio.Event()
        self.outstanding = 0

    def next_item(self) -> Item:
        i = self.issued
        self.issued += 1
        if i < len(self.items):
            return self.items[i]
        self.built_late += 1
        return self.build(i)

    def issued_one(self) -> None:
        self.outstanding += 1
        self.idle.clear()

    def done(self, code: str, key: str, intended: float) -> None:
        now = self.arrived()
        self.settle(code, key, intended, now)

    def arrived(self) -> float:
        """An answer came in (counted now; what it says may be read later, see `settle`)."""
        now = time.monotonic()
        self.outstanding -= 1
        self.completed += 1
        if now <= self.end:
            self.in_window += 1
        if self.outstanding == 0:
            self.idle.set()
        return now

    def settle(self, code: str, key: str, intended: float, at: float) -> None:
        """Record what an answer that arrived at `at` said, and its latency."""
        self.hist.record_value(max(1, int((at - intended) * 1e6)))
        self.codes[code] += 1
        if code in ("00", "201"):
            self.approved.append(key)

    @property
    def open_loop(self) -> bool:
        return self.spec.rate > 0


class IsoConn(asyncio.Protocol):
    """One bank/post link connection; many requests in flight, matched by (11, 7).

    Requests made together (the answers of one read replaced by new requests in a closed loop,
    or one pacing tick of an open loop) leave in one write, as a front-end processor with many
    requests outstanding on a link sends them: one system call for many requests keeps the
    generator's CPU, which it shares with the switch under test, low.
    """

    def __init__(self, engine: Engine, dialect: str) -> None:
        from protocols.iso8583 import Codec, Framer, builtin_dialect

        d = builtin_dialect(dialect)
        self.engine = engine
        self.codec = Codec(d)
        self.framer = Framer(d)
        self.transport: asyncio.Transport | None = None
        self.pending: dict[tuple[str, str], tuple[str, float]] = {}
        self.out: list[bytes] = []
        self.arrived: list[tuple[bytes, float]] = []  # answers not read yet, with arrival time
        self.signed_on: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.signed_on.done():
            self.signed_on.set_exception(ConnectionError("link closed before sign-on"))

    def data_received(self, data: bytes) -> None:
        from protocols.iso8583 import NEED_DATA

        self.framer.receive_data(data)
        while (frame := self.framer.next_frame()) is not NEED_DATA:
            assert isinstance(frame, bytes)
            if self.signed_on.done():
                # during the run an answer is only noted with its arrival time; reading it
                # (decode, match, latency, code) waits for `settle`, after the clock stops, so
                # that the generator takes less of the CPU it shares with the switch
                self.arrived.append((frame, self.engine.arrived()))
                if not self.engine.open_loop and not self.engine.stopping:
                    self.send(time.monotonic())
                continue
            msg = self.codec.decode(frame)
            if msg.mti == "0810":
                self.signed_on.set_result(str(msg.fields.get(39, "??")))
            else:
                self.engine.codes["unmatched"] += 1
        self.flush()

    def settle(self) -> None:
        """Read the answers noted during the run: match each to its request by (11, 7)."""
        for frame, at in self.arrived:
            try:
                f = self.codec.decode(frame).fields
            except Exception:
                self.engine.codes["undecodable"] += 1
                continue
            hit = self.pending.pop((str(f.get(11, "")), str(f.get(7, ""))), None)
            if hit is None:
                self.engine.codes["unmatched"] += 1
                continue
            self.engine.settle(str(f.get(39, "??")), hit[0], hit[1], at)
        self.arrived.clear()

    def send(self, intended: float) -> None:
        """Queue one request (due at `intended`); `flush` writes what is queued."""
        if self.closed or self.transport is None:
            return
        key, frame = self.engine.next_item()
        _, _, stan, f7 = key.split(":")
        self.pending[(stan, f7)] = (key, intended)
        self.engine.issued_one()
        self.out.append(frame)

    def flush(self) -> None:
        if self.out:
            if not self.closed and self.transport is not None:
                self.transport.write(b"".join(self.out))
            self.out.clear()

    def unanswered(self) -> list[str]:
        return [k for k, _ in self.pending.values()]


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time (no pipelining); requests
    due while it is busy wait in its queue, and their wait counts in their latency."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.current: tuple[str, float] | None = None
        self.queue: list[tuple[float]] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0
                              else len(head)]) if i >= 0 else 0
            total = end + 4 + length
            if len(self.buf) < total:
                return
            status = head[9:12].decode()
            del self.buf[:total]
            cur, self.current = self.current, None
            if cur is None:
                self.engine.codes["unmatched"] += 1
                continue
            self.engine.done(status, cur[0], cur[1])
            if self.queue:
                self._write(self.queue.pop(0)[0])
            elif not self.engine.open_loop and not self.engine.stopping:
                self.submit(time.monotonic())

    def submit(self, intended: float) -> None:
        self.engine.issued_one()
        if self.current is None:
            self._write(intended)
        else:
            self.queue.append((intended,))

    def _write(self, intended: float) -> None:
        if self.closed or self.transport is None:
            return
        key, raw = self.engine.next_item()
        self.current = (key, intended)
        self.transport.write(raw)

    def unanswered(self) -> list[str]:
        return [self.current[0]] if self.current else []


# -- the worker process -----------------------------------------------------------------------


async def _worker(spec: LoadSpec, pipe: Connection) -> None:
    if spec.kind == "ivr":
        from bench.ivr import ivr_worker

        await ivr_worker(spec, pipe)
        return
    cpu0 = time.process_time()
    sign_on = b""
    if spec.kind == "iso":
        build, sign_on = iso_builder(spec)
    elif spec.kind == "http":
        build = http_builder(spec)
    else:
        raise ValueError(f"unknown load kind {spec.kind!r}")
    items = [build(i) for i in range(spec.prebuild)]
    build_cpu = time.process_time() - cpu0
    engine = Engine(spec, build, items)
    loop = asyncio.get_running_loop()
    iso_conns: list[IsoConn] = []
    http_conns: list[HttpConn] = []
    for _ in range(spec.connections):
        if spec.kind == "iso":
            _, proto = await loop.create_connection(lambda: IsoConn(engine, spec.dialect),
                                                    spec.host, spec.port)
            assert proto.transport is not None
            proto.transport.write(sign_on)
            code = await asyncio.wait_for(proto.signed_on, 10)
            if code != "00":
                raise RuntimeError(f"sign-on refused with {code}")
            iso_conns.append(proto)
        else:
            _, hproto = await loop.create_connection(lambda: HttpConn(engine),
                                                     spec.host, spec.port)
            http_conns.append(hproto)
    pipe.send({"ready": True})
    msg = await asyncio.to_thread(pipe.recv)
    start = float(msg["start"])
    engine.start, engine.end = start, start + spec.duration_s
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    with gc_paused():
        cpu1 = time.process_time()
        if not engine.open_loop:
            for _ in range(spec.depth if iso_conns else 1):
                for c in iso_conns:
                    c.send(start)
                for h in http_conns:
                    h.submit(start)
            for c in iso_conns:
                c.flush()
            await asyncio.sleep(max(0.0, engine.end - time.monotonic()))
        else:
            n = 0
            rr = 0
            while (now := time.monotonic()) < engine.end:
                due = int((now - start) * spec.rate)
                while n < due:
                    intended = start + n / spec.rate
                    if iso_conns:
                        iso_conns[rr % len(iso_conns)].send(intended)
                    else:
                        min(http_conns, key=lambda h: len(h.queue)
                            + (h.current is not None)).submit(intended)
                    rr += 1
                    n += 1
                for c in iso_conns:
                    c.flush()
                # wake at the next due instant, but no more often than every 2 ms (a shorter
                # uvloop timer spins); a late send still counts from its due instant
                await asyncio.sleep(max(0.002, start + n / spec.rate - time.monotonic()))
        engine.stopping = True
        for h in http_conns:  # requests never sent are not outstanding
            engine.outstanding -= len(h.queue)
            h.queue.clear()
        if engine.outstanding > 0:
            engine.idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(engine.idle.wait(), spec.timeout_s)
        cpu2 = time.process_time()
    for c in iso_conns:
        c.settle()
    settle_cpu = time.process_time() - cpu2
    unanswered = [k for c in iso_conns for k in c.unanswered()]
    unanswered += [k for h in http_conns for k in h.unanswered()]
    for tr in [c.transport for c in iso_conns] + [h.transport for h in http_conns]:
        if tr is not None:
            tr.close()
    pipe.send({
        "name": spec.name, "worker": spec.worker, "issued": engine.issued,
        "completed": engine.completed, "completed_in_window": engine.in_window,
        "duration_s": spec.duration_s, "codes": dict(engine.codes),
        "hist": engine.hist.encode(), "approved": engine.approved, "unanswered": unanswered,
        "cpu_s": round(cpu2 - cpu1, 3), "build_cpu_s": round(build_cpu, 3),
        "settle_cpu_s": round(settle_cpu, 3),
        "built_late": engine.built_late, "open_loop": engine.open_loop,
    })
    await asyncio.to_thread(pipe.recv)  # stay alive until the parent has read our CPU time


def _entry(spec: LoadSpec, pipe: Connection) -> None:
    import uvloop

    try:
        uvloop.run(_worker(spec, pipe))
    except BaseException as e:  # noqa: BLE001 - report it to the parent, whatever it was
        with contextlib.suppress(Exception):
            pipe.send({"error": f"{type(e).__name__}: {e}"})
        raise SystemExit(1) from None


class WorkerError(Exception):
    """A load generator failed."""


class WorkerPool:
    """Worker processes for a list of specs, started together."""

    def __init__(self, specs: Sequence[LoadSpec]) -> None:
        ctx = mp.get_context("spawn")
        self.specs = list(specs)
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for spec in self.specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_entry, args=(spec, child), daemon=True,
                               name=f"bench-loadgen-{spec.name}-{spec.worker}")
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self.procs if p.pid is not None]

    async def _recv(self, pipe: Connection, wait_s: float) -> dict[str, Any]:
        ok = await asyncio.to_thread(pipe.poll, wait_s)
        if not ok:
            raise WorkerError("a load generator did not answer in time")
        msg: dict[str, Any] = pipe.recv()
        if "error" in msg:
            raise WorkerError(f"a load generator failed: {msg['error']}")
        return msg

    async def ready(self, wait_s: float = 180.0) -> None:
        await asyncio.gather(*(self._recv(p, wait_s) for p in self.pipes))

    def go(self, delay_s: float = 0.3) -> float:
        start = time.monotonic() + delay_s
        for p in self.pipes:
            p.send({"start": start})
        return start

    async def results(self, wait_s: float) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self._recv(p, wait_s) for p in self.pipes)))

    def close(self) -> None:
        for p in self.pipes:
            with contextlib.suppress(Exception):
                p.send({"bye": True})
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for p in self.pipes:
            p.close()
