"""The marketing-system simulator's HTTP interface, its fault injection and its CLI.

Layers: :mod:`customers` (seeded customers) and :mod:`ledger` (allocation, idempotency) do no
I/O; :mod:`journal` makes postings durable; :mod:`server` speaks HTTP/1.1; this module routes
requests to the books and injects faults.  See ``docs/marketing-simulator.md``.

Answers that need no waiting are computed and sent in the call that read the request; a new
posting waits for its journal group without a task (a :class:`~marketing_sim.server.Deferred`);
only fault injection (latency, holding a connection, going down) runs coroutines.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import random
import re
import signal
import sys
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Final

import orjson

from marketing_sim.customers import CustomerBook, check_count
from marketing_sim.faults import NO_FAULTS, FaultError, Faults
from marketing_sim.journal import Group, JournalError, PostingJournal
from marketing_sim.ledger import Ledger, LedgerError, PostedCredit, PostingRequest
from marketing_sim.server import (
    Connection,
    Deferred,
    HttpServer,
    Outcome,
    Reply,
    ReplyThen,
    Request,
    json_reply,
    problem,
)

log = logging.getLogger("marketing_sim")

DEFAULT_PORT: Final = 8090
MAX_PAGE: Final = 1_000
DEFAULT_PAGE: Final = 100
_SHUTDOWN_TIMEOUT_S: Final = 2.0
_DATE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_ACCOUNTS_PREFIX: Final = "/accounts/"


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
        check_count(self.customers)


def _read_json(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise LedgerError("invalid_body", "the body is not JSON") from None


def _is_posting(request: Request) -> bool:
    """Pipelined postings are handled while earlier ones on their connection wait for their
    journal group: each is applied in order at once, and their answers leave together."""
    return request.method == b"POST" and request.path == "/postings"


def _not_allowed(allow: str) -> Reply:
    return problem(
        405,
        "method_not_allowed",
        f"this resource allows {allow}",
        f"Allow: {allow}\r\n".encode("ascii"),
    )


_NOT_FOUND: Final = problem(404, "not_found", "no such resource")
_BROKEN: Final = problem(503, "storage_failed", "the simulator cannot write its journal")
_NOT_DURABLE: Final = problem(503, "storage_failed", "the posting could not be made durable")
_INJECTED: Final = problem(503, "injected_error", "fault injection: error_rate")
_GET = (b"GET", b"HEAD")
_ALLOW_GET: Final = "GET,HEAD"


class MarketingSim:
    """A running simulator: its books, its listener and its faults."""

    def __init__(
        self, settings: MarketingSettings, ledger: Ledger, journal: PostingJournal | None
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self._journal = journal
        self._faults = NO_FAULTS
        self._random = random.Random(settings.seed)
        # Postings applied in memory whose journal group is not yet durable, and those groups.
        self._inflight: dict[str, Group] = {}
        self._last_group: Group | None = None
        self._broken = False
        self._closing = asyncio.Event()
        self._listen_lock = asyncio.Lock()
        self._up_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: HttpServer | None = None
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
        return self._http is not None and self._http.listening

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
        if self._http is not None:
            await self._http.close(_SHUTDOWN_TIMEOUT_S)
        if self._journal is not None:
            await self._journal.close()

    # --- listening ----------------------------------------------------------------------------

    async def _start_http(self) -> None:
        self._http = HttpServer(
            self._dispatch, self.settings.host, self._port, ahead=_is_posting
        )
        await self._listen()

    async def _listen(self) -> None:
        assert self._http is not None
        self._port = await self._http.listen()

    def update_faults(self, changes: Mapping[str, object]) -> bool:
        """Apply ``changes``; returns whether ``down`` was among them."""
        self._faults = self._faults.updated(changes)
        return "down" in changes

    async def apply_down(self, changed: bool, *, keep: Connection | None = None) -> None:
        """Listen or not, as ``down`` now says. Going down closes every connection but `keep`
        (the one that asked for it, which stays open for ``/_faults`` alone)."""
        if not changed:
            return
        async with self._listen_lock:
            if self._up_timer is not None:
                self._up_timer.cancel()
                self._up_timer = None
            http = self._http
            if http is None:
                return
            down = self._faults.down
            if down is None:
                if not http.listening and not self._closing.is_set():
                    await self._listen()
                    if self._closing.is_set():  # close() ran meanwhile: it stays closed
                        await http.close(0)
                        return
                    log.info("marketing simulator listening again on port %d", self._port)
                return
            if http.listening:
                http.stop_listening()
                http.close_connections(keep)
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

    async def hold_open(self, connection: Connection) -> None:
        """Do not answer: wait until the client gives up (or ``hold_ms``), then drop the line."""
        if not self._closing.is_set():
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                await asyncio.wait(
                    (connection.gone(), closing),
                    timeout=self._faults.hold_ms / 1000,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                closing.cancel()
        connection.close()

    # --- postings -----------------------------------------------------------------------------

    def post_nowait(self, request: PostingRequest) -> tuple[PostedCredit, bool, Group | None]:
        """Apply ``request``; also returns the journal group that makes it durable, if any.

        For a replay of a posting still being written, that is its original's group.
        """
        posted, created = self.ledger.post(request)
        posting_id = request.posting_id
        if not created:
            return posted, False, self._inflight.get(posting_id)
        if self._journal is None:
            return posted, True, None
        group = self._journal.append(posted)
        if not group.done():
            self._inflight[posting_id] = group
        if group is not self._last_group:
            self._last_group = group
            # Registered before any waiter's callback: the group leaves ``_inflight`` first.
            group.add_done_callback(self._group_written)
        return posted, True, group

    def _group_written(self, group: Group) -> None:
        inflight = self._inflight
        for posting_id in group.posting_ids:
            inflight.pop(posting_id, None)
        if group.error is not None and not self._broken:
            # Memory is now ahead of the disk: refuse everything until a restart re-reads it.
            self._broken = True
            log.error("marketing simulator cannot write its journal; refusing all requests")

    def durable_postings_on(self, business_date: date) -> list[PostedCredit]:
        return [
            posted
            for posted in self.ledger.postings_on(business_date)
            if posted.request.posting_id not in self._inflight
        ]

    @property
    def broken(self) -> bool:
        return self._broken

    # --- HTTP ---------------------------------------------------------------------------------

    def _dispatch(self, request: Request, connection: Connection, *,
                  waited: bool = False) -> Outcome:
        """Faults first (except for ``/_faults``), then the route. `waited`: the latency fault
        has been waited out; the other faults are looked at again, as they are now (a
        simulator that went down, or broke, meanwhile does nothing)."""
        if request.path.startswith("/_faults"):
            return self._route(request, connection)
        if self._faults.down is not None:
            # down: only the connection that asked for it is still open, for /_faults alone
            connection.drop()
            return None
        if self._broken:
            return _BROKEN
        faults = self._faults
        if faults.latency_ms and not waited:
            return self._delayed(request, connection, faults.latency_ms)
        if self.roll(faults.error_rate):
            return _INJECTED
        return self._route(request, connection)

    async def _delayed(self, request: Request, connection: Connection, latency_ms: int) -> Outcome:
        await asyncio.sleep(latency_ms / 1000)
        return self._dispatch(request, connection, waited=True)

    def _route(self, request: Request, connection: Connection) -> Outcome:
        try:
            return self._handle(request, connection)
        except LedgerError as exc:
            return problem(exc.status, exc.code, exc.detail)
        except FaultError as exc:
            return problem(400, "invalid_fault", str(exc))
        except JournalError:
            return _NOT_DURABLE

    def _handle(self, request: Request, connection: Connection) -> Outcome:
        path = request.path
        method = request.method
        if path == "/postings":
            if method == b"POST":
                return self._post_posting(request, connection)
            if method in _GET:
                return self._list_postings(request)
            return _not_allowed("GET,HEAD,POST")
        if path.startswith(_ACCOUNTS_PREFIX):
            account_no = path[len(_ACCOUNTS_PREFIX) :]
            if not account_no or "/" in account_no:
                return _NOT_FOUND
            if method not in _GET:
                return _not_allowed(_ALLOW_GET)
            account = self.ledger.account(account_no)
            if account is None:
                return problem(404, "account_not_found", "no such account")
            return json_reply(200, account.to_json())
        if path == "/accounts":
            return self._list_accounts(request) if method in _GET else _not_allowed(_ALLOW_GET)
        if path == "/healthz":
            if method not in _GET:
                return _not_allowed(_ALLOW_GET)
            return json_reply(200, {"status": "ok", "postings": len(self.ledger)})
        if path == "/_faults":
            if method in _GET:
                return json_reply(200, self._faults.to_json())
            if method == b"POST":
                return self._post_faults(request, connection)
            if method == b"DELETE":
                return self._delete_faults()
            return _not_allowed("DELETE,GET,HEAD,POST")
        return _NOT_FOUND

    def _post_posting(self, request: Request, connection: Connection) -> Outcome:
        posting = PostingRequest.from_json(_read_json(request.body))
        posted, created, group = self.post_nowait(posting)
        if group is None or group.done():
            return self._posted(posted, created, group, connection)
        return Deferred(group, lambda done: self._posted(posted, created, done, connection))

    def _posted(
        self, posted: PostedCredit, created: bool, group: Group | None, connection: Connection
    ) -> Outcome:
        """The answer to a posting once it is durable (or could not be made so)."""
        if group is not None and group.error is not None:
            return _NOT_DURABLE
        if created and self.roll(self._faults.timeout_after_commit_rate):
            return self._hold(connection)
        return json_reply(201 if created else 200, posted.result_json())

    async def _hold(self, connection: Connection) -> Outcome:
        await self.hold_open(connection)
        return None

    def _list_accounts(self, request: Request) -> Reply:
        after = request.query_value("after") or None
        if after is not None and not _is_account_no(after):
            return problem(400, "invalid_query", "after must be a 10-digit account number")
        limit_text = request.query_value("limit", str(DEFAULT_PAGE)) or ""
        if (
            not limit_text.isascii()
            or not limit_text.isdigit()
            or not 1 <= int(limit_text) <= MAX_PAGE
        ):
            return problem(400, "invalid_query", f"limit must be 1 to {MAX_PAGE}")
        accounts, next_after = self.ledger.accounts_after(after, int(limit_text))
        return json_reply(
            200,
            {
                "accounts": [account.to_json(with_address=False) for account in accounts],
                "next_after": next_after,
            },
        )

    def _list_postings(self, request: Request) -> Reply:
        text = request.query_value("date", "") or ""
        try:
            if not _DATE.fullmatch(text):
                raise ValueError(text)
            business_date = date.fromisoformat(text)
        except ValueError:
            return problem(400, "invalid_query", "date must be YYYY-MM-DD")
        postings = self.durable_postings_on(business_date)
        return json_reply(
            200,
            {
                "date": business_date.isoformat(),
                "postings": [posted.record_json() for posted in postings],
            },
        )

    def _post_faults(self, request: Request, connection: Connection) -> Outcome:
        changes = _read_json(request.body)
        if not isinstance(changes, dict):
            return problem(400, "invalid_fault", "the body must be a JSON object")
        down_changed = self.update_faults(changes)
        reply = json_reply(200, self._faults.to_json())
        if down_changed:
            # Answer first, then stop listening. This connection stays open, for /_faults
            # alone, so that the client that took the simulator down can bring it back with
            # DELETE /_faults on it: the port itself refuses connections.
            return ReplyThen(reply, self.apply_down(True, keep=connection))
        return reply

    async def _delete_faults(self) -> Outcome:
        await self.clear_faults()
        return json_reply(200, self._faults.to_json())


def _is_account_no(text: str) -> bool:
    return len(text) == 10 and text.isascii() and text.isdigit()


async def start(settings: MarketingSettings) -> MarketingSim:
    """Open the books (reading the journal back when there is a data directory) and listen."""
    ledger = Ledger(CustomerBook(count=settings.customers, seed=settings.seed))
    journal: PostingJournal | None = None
    if settings.data_dir is not None:
        journal = PostingJournal(
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
    try:
        settings = MarketingSettings(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            customers=args.customers,
            seed=args.seed,
        )
    except ValueError as e:  # the messages name the setting and its range, not the value
        print(f"gridpay marketing: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        return uvloop.run(_serve(settings))
    except (OSError, JournalError) as e:  # the port taken, the data directory not writable,
        # or holding another simulator's journal
        print(f"gridpay marketing: cannot start: {e}", file=sys.stderr)
        return 2
