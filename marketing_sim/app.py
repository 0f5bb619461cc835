"""The marketing-system simulator's HTTP server (aiohttp), its fault injection and its CLI.

Layers: :mod:`customers` (seeded customers) and :mod:`ledger` (allocation, idempotency) do no
I/O; :mod:`journal` makes postings durable; this module serves them over HTTP and injects
faults.  See ``docs/marketing-simulator.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import random
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Final

import orjson
from aiohttp import web

from marketing_sim.customers import CustomerBook
from marketing_sim.faults import NO_FAULTS, FaultError, Faults
from marketing_sim.journal import JournalError, SqliteJournal
from marketing_sim.ledger import Ledger, LedgerError, PostedCredit, PostingRequest

log = logging.getLogger("marketing_sim")

DEFAULT_PORT: Final = 8090
MAX_PAGE: Final = 1_000
DEFAULT_PAGE: Final = 100
_SHUTDOWN_TIMEOUT_S: Final = 2.0
_HOLD_POLL_S: Final = 0.02
_JSON: Final = "application/json"
_PROBLEM: Final = "application/problem+json"
_DATE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MarketingSettings:
    """How to run the simulator; ``data_dir=None`` keeps everything in memory."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path | None = None
    customers: int = 100_000
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65_535:
            raise ValueError("port must be between 0 and 65535")
        if self.customers < 0:
            raise ValueError("customers must not be negative")


def _problem(status: int, code: str, detail: str) -> web.Response:
    body = {
        "type": f"urn:gridpay:marketing:{code}",
        "title": code.replace("_", " "),
        "status": status,
        "detail": detail,
        "code": code,
    }
    return web.Response(status=status, body=orjson.dumps(body), content_type=_PROBLEM)


def _json(status: int, body: object) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON)


async def _read_json(request: web.Request) -> object:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise LedgerError("invalid_body", "the body is not JSON") from None


class MarketingSim:
    """A running simulator: its books, its listener and its faults."""

    def __init__(
        self, settings: MarketingSettings, ledger: Ledger, journal: SqliteJournal | None
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self._journal = journal
        self._faults = NO_FAULTS
        self._random = random.Random(settings.seed)
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._broken = False
        self._closing = asyncio.Event()
        self._listen_lock = asyncio.Lock()
        self._up_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._port = settings.port

    # --- public API ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = self.settings.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._port}"

    @property
    def faults(self) -> Faults:
        return self._faults

    @property
    def listening(self) -> bool:
        return self._site is not None

    async def set_faults(
        self,
        *,
        latency_ms: int | None = None,
        error_rate: float | None = None,
        timeout_after_commit_rate: float | None = None,
        hold_ms: int | None = None,
        down: bool | float | None = None,
    ) -> Faults:
        """Change the given faults (``None`` leaves one as it is); ``down`` takes effect now."""
        given = {
            "latency_ms": latency_ms,
            "error_rate": error_rate,
            "timeout_after_commit_rate": timeout_after_commit_rate,
            "hold_ms": hold_ms,
            "down": down,
        }
        changes = {name: value for name, value in given.items() if value is not None}
        await self.apply_down(self.update_faults(changes))
        return self._faults

    async def clear_faults(self) -> None:
        """No faults; listen again if down."""
        self._faults = NO_FAULTS
        await self.apply_down(True)

    async def close(self) -> None:
        """Stop listening, drop held requests, write what is queued, close the journal."""
        self._closing.set()
        if self._up_timer is not None:
            self._up_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None
        if self._journal is not None:
            await self._journal.close()

    # --- listening ----------------------------------------------------------------------------

    async def _start_http(self) -> None:
        app = web.Application(middlewares=[_fault_middleware])
        app[SIM_KEY] = self
        app.add_routes(
            [
                web.get("/accounts/{account_no}", _get_account),
                web.get("/accounts", _list_accounts),
                web.post("/postings", _post_posting),
                web.get("/postings", _list_postings),
                web.get("/healthz", _healthz),
                web.get("/_faults", _get_faults),
                web.post("/_faults", _post_faults),
                web.delete("/_faults", _delete_faults),
            ]
        )
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_TIMEOUT_S
        )
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self.settings.host, self._port, reuse_address=True)
        await site.start()
        self._site = site
        self._port = site.port

    def update_faults(self, changes: Mapping[str, object]) -> bool:
        """Apply ``changes``; returns whether ``down`` was among them."""
        self._faults = self._faults.updated(changes)
        return "down" in changes

    async def apply_down(self, changed: bool) -> None:
        if not changed:
            return
        async with self._listen_lock:
            if self._up_timer is not None:
                self._up_timer.cancel()
                self._up_timer = None
            down = self._faults.down
            if down is None:
                if self._site is None and not self._closing.is_set():
                    await self._listen()
                    log.info("marketing simulator listening again on port %d", self._port)
                return
            if self._site is not None:
                await self._site.stop()
                self._site = None
                assert self._runner is not None and self._runner.server is not None
                for connection in list(self._runner.server.connections):
                    connection.force_close()
                log.info("marketing simulator down (port %d closed)", self._port)
            if down > 0:
                self._up_timer = asyncio.get_running_loop().call_later(down, self._come_back)

    def _come_back(self) -> None:
        self._up_timer = None
        self._faults = dataclasses.replace(self._faults, down=None)
        self._spawn(self.apply_down(True))

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("marketing simulator background task failed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- faults in the request path -----------------------------------------------------------

    def roll(self, rate: float) -> bool:
        return rate > 0 and self._random.random() < rate

    async def hold_open(self, request: web.Request) -> None:
        """Do not answer: wait until the client gives up (or ``hold_ms``), then drop the line."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._faults.hold_ms / 1000
        while loop.time() < deadline and not self._closing.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), _HOLD_POLL_S)
        transport = request.transport
        if transport is not None:
            transport.close()

    # --- postings -----------------------------------------------------------------------------

    async def post(self, request: PostingRequest) -> tuple[PostedCredit, bool]:
        """Apply and make durable; a replay waits until its original is durable."""
        posted, created = self.ledger.post(request)
        posting_id = request.posting_id
        if created:
            if self._journal is None:
                return posted, True
            future = self._journal.append(posted)
            self._inflight[posting_id] = future
            future.add_done_callback(lambda _: self._inflight.pop(posting_id, None))
        else:
            pending = self._inflight.get(posting_id)
            if pending is None:
                return posted, False
            future = pending
        try:
            await asyncio.shield(future)
        except JournalError:
            # Memory is now ahead of the disk: refuse everything until a restart re-reads it.
            self._broken = True
            log.exception("marketing simulator cannot write its journal; refusing all requests")
            raise
        return posted, created

    def durable_postings_on(self, business_date: date) -> list[PostedCredit]:
        return [
            posted
            for posted in self.ledger.postings_on(business_date)
            if posted.request.posting_id not in self._inflight
        ]

    @property
    def broken(self) -> bool:
        return self._broken


SIM_KEY: Final = web.AppKey("marketing_sim", MarketingSim)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _fault_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    try:
        if request.path.startswith("/_faults"):
            return await handler(request)
        if sim.broken:
            return _problem(503, "storage_failed", "the simulator cannot write its journal")
        faults = sim.faults
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        if sim.roll(faults.error_rate):
            return _problem(503, "injected_error", "fault injection: error_rate")
        return await handler(request)
    except LedgerError as exc:
        return _problem(exc.status, exc.code, exc.detail)
    except FaultError as exc:
        return _problem(400, "invalid_fault", str(exc))
    except JournalError:
        return _problem(503, "storage_failed", "the posting could not be made durable")


async def _get_account(request: web.Request) -> web.Response:
    account = request.app[SIM_KEY].ledger.account(request.match_info["account_no"])
    if account is None:
        return _problem(404, "account_not_found", "no such account")
    return _json(200, account.to_json())


def _is_account_no(text: str) -> bool:
    return len(text) == 10 and text.isascii() and text.isdigit()


async def _list_accounts(request: web.Request) -> web.Response:
    after = request.query.get("after") or None
    if after is not None and not _is_account_no(after):
        return _problem(400, "invalid_query", "after must be a 10-digit account number")
    limit_text = request.query.get("limit", str(DEFAULT_PAGE))
    if not limit_text.isascii() or not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_PAGE:
        return _problem(400, "invalid_query", f"limit must be 1 to {MAX_PAGE}")
    accounts, next_after = request.app[SIM_KEY].ledger.accounts_after(after, int(limit_text))
    return _json(
        200,
        {
            "accounts": [account.to_json(with_address=False) for account in accounts],
            "next_after": next_after,
        },
    )


async def _post_posting(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    posting = PostingRequest.from_json(await _read_json(request))
    posted, created = await sim.post(posting)
    if created and sim.roll(sim.faults.timeout_after_commit_rate):
        await sim.hold_open(request)
    return _json(201 if created else 200, posted.result_json())


async def _list_postings(request: web.Request) -> web.Response:
    text = request.query.get("date", "")
    try:
        if not _DATE.fullmatch(text):
            raise ValueError(text)
        business_date = date.fromisoformat(text)
    except ValueError:
        return _problem(400, "invalid_query", "date must be YYYY-MM-DD")
    postings = request.app[SIM_KEY].durable_postings_on(business_date)
    return _json(
        200,
        {
            "date": business_date.isoformat(),
            "postings": [posted.record_json() for posted in postings],
        },
    )


async def _healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok", "postings": len(request.app[SIM_KEY].ledger)})


async def _get_faults(request: web.Request) -> web.Response:
    return _json(200, request.app[SIM_KEY].faults.to_json())


async def _post_faults(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    changes = await _read_json(request)
    if not isinstance(changes, dict):
        return _problem(400, "invalid_fault", "the body must be a JSON object")
    down_changed = sim.update_faults(changes)
    response = _json(200, sim.faults.to_json())
    if down_changed:
        # Answer first, then stop listening (which also drops this connection).
        await response.prepare(request)
        await response.write_eof()
        await sim.apply_down(True)
    return response


async def _delete_faults(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    await sim.clear_faults()
    return _json(200, sim.faults.to_json())


async def start(settings: MarketingSettings) -> MarketingSim:
    """Open the books (reading the journal back when there is a data directory) and listen."""
    ledger = Ledger(CustomerBook(count=settings.customers, seed=settings.seed))
    journal: SqliteJournal | None = None
    if settings.data_dir is not None:
        journal = SqliteJournal(
            settings.data_dir,
            identity={"customers": str(settings.customers), "seed": str(settings.seed)},
        )
        try:
            for posted in await journal.open():
                ledger.restore(posted)
        except BaseException:
            await journal.close()
            raise
    sim = MarketingSim(settings, ledger, journal)
    try:
        await sim._start_http()
    except BaseException:
        await sim.close()
        raise
    return sim


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gridpay marketing", description="The marketing (billing) system simulator."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: any free port")
    parser.add_argument("--data-dir", type=Path, default=None, help="durable when given")
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=42)
    return parser


async def _serve(settings: MarketingSettings) -> int:
    sim = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        ready = orjson.dumps({"port": sim.port, "url": sim.url}).decode()
        sys.stdout.write(f"READY {ready}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await sim.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``gridpay marketing``: run the simulator on uvloop until SIGINT or SIGTERM."""
    import uvloop

    args = _parser().parse_args(argv)
    settings = MarketingSettings(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        customers=args.customers,
        seed=args.seed,
    )
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    return uvloop.run(_serve(settings))
