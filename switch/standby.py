"""The standby side of the pair: keeping warm, the planned switchover, takeover measurement.

* `keep_warm(node)` runs on every node; while it is the standby it touches its database pool,
  Redis and HSM connections every few seconds, so that a takeover does not begin with
  reconnecting (asyncpg closes connections idle for five minutes).
* `switchover(database_url, to_node, timeout_s)` is the operator's planned switchover: it asks
  the lease holder, through the lease row, to hand over. The holder stops taking work, finishes
  what is in flight under its own epoch, then releases the lease to the standby, which takes the
  next epoch. No approved request is lost or failed; requests arriving during the hand-over are
  answered 503 `standby` and retried by their sender on the other node.
* `lease_state`, `wait_for_holder` and `TakeoverClock` measure a takeover from outside.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from switch.lease import ANY_NODE, HANDOVER_REQUEST, Role

if TYPE_CHECKING:
    from switch.node import Node

log = logging.getLogger("gridpay.standby")

#: how often a standby touches its connections
WARM_EVERY_S = 5.0


class StandbyError(Exception):
    """Base of this module's errors."""


class SwitchoverRefused(StandbyError):
    """The switchover cannot be asked for (no holder, or the target already holds the lease)."""


class SwitchoverTimeout(StandbyError):
    """No node took the lease in time; the request was withdrawn if still pending."""


# -- keeping the standby warm ----------------------------------------------------------------


async def warm_once(node: Node) -> dict[str, bool]:
    """Touch every connection a takeover will need; returns what answered."""
    out: dict[str, bool] = {}

    async def one_db() -> None:
        async with node.pool.acquire(timeout=2.0) as con:
            await con.fetchval("SELECT 1", timeout=2.0)

    try:
        n = max(1, node.settings.services.db_pool_min)
        await asyncio.wait_for(asyncio.gather(*(one_db() for _ in range(n))), 3.0)
        out["database"] = True
    except Exception:
        out["database"] = False
    try:
        out["redis"] = bool(await asyncio.wait_for(node.redis.ping(), 2.0))
    except Exception:
        out["redis"] = False
    hsm = node.components.get("hsm")
    if hsm is not None:
        try:
            await asyncio.wait_for(hsm.echo(b"warm"), 2.0)
            out["hsm"] = True
        except Exception:
            out["hsm"] = False
    return out


async def keep_warm(node: Node, every_s: float = WARM_EVERY_S) -> None:
    """Forever: while this node is the standby, keep its connections open and tested."""
    while True:
        await asyncio.sleep(every_s)
        if node.role is not Role.STANDBY:
            continue
        result = await warm_once(node)
        if not all(result.values()):
            log.warning("standby: a service did not answer", extra={"checks": result})


# -- taking over: claims abandoned by the previous active node ---------------------------------

# Deletes those of KEYS that are in-flight claims (not finished answers); returns how many.
_DROP_INFLIGHT = """
local n = 0
for _, k in ipairs(KEYS) do
  if redis.call('HGET', k, 'state') == 'inflight' then
    redis.call('DEL', k)
    n = n + 1
  end
end
return n
"""


async def drop_abandoned_claims(redis: Any, prefix: str, *, batch: int = 500,
                                within_s: float = 60.0) -> int:
    """Delete every in-flight idempotency claim under `prefix`.

    Called when this node becomes active: a claim still in flight then belongs to a request on
    the previous active node, which can no longer commit (its epoch is fenced), so the claim
    would only make a retry wait `request_in_progress` until it expires. Finished answers are
    kept. Redis is only the fast path: the database's key still decides.
    """
    script = redis.register_script(_DROP_INFLIGHT)
    return await _each_batch(redis, prefix, lambda keys: script(keys=keys), batch=batch,
                             within_s=within_s)


async def _each_batch(redis: Any, prefix: str, act: Callable[[list[Any]], Awaitable[Any]], *,
                      batch: int, within_s: float) -> int:
    """`act` on the keys under `prefix`, `batch` at a time (SCAN, never KEYS), for `within_s`
    at most; the sum of what it returns."""
    deadline = time.monotonic() + within_s
    done = 0
    cursor: int = 0
    while True:
        cursor, keys = await redis.scan(cursor, match=prefix + "*", count=batch)
        if keys:
            done += int(await act(list(keys)))
        if cursor == 0 or time.monotonic() > deadline:
            return done


async def drop_locks(redis: Any, prefix: str, *, batch: int = 500,
                     within_s: float = 60.0) -> int:
    """Delete every key under `prefix` (short locks only); how many."""
    return await _each_batch(redis, prefix, lambda keys: redis.delete(*keys), batch=batch,
                             within_s=within_s)


async def on_takeover(node: Node) -> None:
    """Activation hook: clears the previous holder's in-flight claims in the background."""
    idem = node.components.get("idempotency")
    prefix = getattr(idem, "prefix", None)
    if not isinstance(prefix, str):
        return

    async def run() -> None:
        try:
            n = await drop_abandoned_claims(node.redis, prefix)
        except Exception as e:  # Redis down: the claims expire by themselves
            log.warning("could not clear abandoned claims", extra={"error": type(e).__name__})
            return
        if n:
            log.info("abandoned in-flight claims cleared", extra={"claims": n})

    # kept by the node (a task nobody references may be collected before it finishes)
    node.components["drop_abandoned_claims"] = asyncio.create_task(
        run(), name="drop-abandoned-claims")


# -- looking at the lease from outside ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseState:
    holder: str | None
    epoch: int
    expires_in_s: float
    handover_to: str | None


async def lease_state(con: asyncpg.Connection) -> LeaseState:
    row = await con.fetchrow(
        "SELECT holder, epoch, extract(epoch FROM expires_at - now())::float8 AS left_s,"
        " handover_to FROM node_lease WHERE id = 1", timeout=5)
    if row is None:
        raise StandbyError("the lease row is missing: run the migrations first")
    return LeaseState(row["holder"], int(row["epoch"]), float(row["left_s"]), row["handover_to"])


async def wait_for_holder(con: asyncpg.Connection, *, above_epoch: int, timeout_s: float,
                          holder: str | None = None, poll_s: float = 0.02) -> LeaseState:
    """Wait until the lease has an epoch above `above_epoch` (held by `holder` if given)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = await lease_state(con)
        if st.holder is not None and st.epoch > above_epoch and (
                holder is None or st.holder == holder):
            return st
        if time.monotonic() >= deadline:
            if holder is not None and st.holder is not None and st.epoch > above_epoch:
                raise SwitchoverTimeout(  # a node named is down: another one took over
                    f"{holder} did not take the lease within {timeout_s}s; {st.holder} holds "
                    f"it (epoch {st.epoch})")
            raise SwitchoverTimeout(
                f"no node took the lease above epoch {above_epoch} within {timeout_s}s")
        await asyncio.sleep(poll_s)


class TakeoverClock:
    """Measures a takeover: from the fault (`mark`) to the first approved answer from a node
    other than the one that failed (`approved`)."""

    def __init__(self) -> None:
        self.fault_at: float | None = None
        self.failed_node: str | None = None
        self.only_new = False
        self.first_approval_at: float | None = None
        self.first_approval_by: str | None = None

    def mark(self, failed_node: str, at: float | None = None, *,
             only_new: bool = False) -> None:
        """The fault happens now (or `at`). `only_new`: count only operations that started
        after it (when the failed thing is shared, e.g. the database, rather than a node)."""
        self.fault_at = time.monotonic() if at is None else at
        self.failed_node = failed_node
        self.only_new = only_new
        self.first_approval_at = None
        self.first_approval_by = None

    def approved(self, node: str, at: float | None = None, *,
                 started: float | None = None) -> None:
        when = time.monotonic() if at is None else at
        if (self.fault_at is None or self.first_approval_at is not None or node == self.failed_node
                or when < self.fault_at):
            return
        if self.only_new and (started is None or started < self.fault_at):
            return
        self.first_approval_at = when
        self.first_approval_by = node

    @property
    def seconds(self) -> float | None:
        if self.fault_at is None or self.first_approval_at is None:
            return None
        return self.first_approval_at - self.fault_at


# -- planned switchover ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SwitchoverResult:
    from_node: str
    from_epoch: int
    to_node: str
    to_epoch: int
    seconds: float

    def describe(self) -> str:
        return (f"switchover done in {self.seconds:.2f}s: {self.from_node} (epoch "
                f"{self.from_epoch}) -> {self.to_node} (epoch {self.to_epoch})")


_REQUEST = """
UPDATE node_lease SET handover_to = $3, updated_at = now()
 WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > now()
   AND (handover_to IS NULL OR handover_to LIKE '?%')
RETURNING epoch
"""
_WITHDRAW = """
UPDATE node_lease SET handover_to = NULL, updated_at = now()
 WHERE id = 1 AND epoch = $1 AND handover_to = $2
"""


#: how long `gridpay switchover` waits by default: longer than the holder's drain may last
#: with the default grace (ISO messages and HTTP requests 8 s each, the posting queue 10 s),
#: so that a slow drain is not reported as a failed switchover that then happens anyway
SWITCHOVER_TIMEOUT_S = 60.0


async def switchover(database_url: str, to_node: str | None = None,
                     timeout_s: float = SWITCHOVER_TIMEOUT_S) -> SwitchoverResult:
    """Ask the active node to hand the lease to `to_node` (None: to whichever standby takes it)
    and wait until a node holds it under a new epoch. Raises `SwitchoverRefused` or
    `SwitchoverTimeout` (after withdrawing a request nobody acted on)."""
    started = time.monotonic()
    con = await asyncpg.connect(database_url, timeout=min(timeout_s, 10.0))
    try:
        st = await lease_state(con)
        if st.holder is None or st.expires_in_s <= 0:
            raise SwitchoverRefused("no node holds the lease: there is nothing to hand over")
        if to_node is not None and to_node == st.holder:
            raise SwitchoverRefused(f"{to_node} already holds the lease")
        ask = HANDOVER_REQUEST + (to_node or ANY_NODE)
        if await con.fetchval(_REQUEST, st.holder, st.epoch, ask, timeout=5) is None:
            raise SwitchoverRefused("the lease changed hands while asking; look again")
        log.info("switchover asked", extra={"from_node": st.holder, "to_node": ask[1:]})
        try:
            new = await wait_for_holder(con, above_epoch=st.epoch, timeout_s=timeout_s,
                                        holder=to_node)
        except SwitchoverTimeout:
            with contextlib.suppress(Exception):
                await con.execute(_WITHDRAW, st.epoch, ask, timeout=5)
            raise
        assert new.holder is not None
        if new.holder == st.holder:  # nobody else took it: the old holder has it again
            raise SwitchoverRefused(f"no other node took the lease; {st.holder} holds it again "
                                    f"(epoch {new.epoch})")
        return SwitchoverResult(st.holder, st.epoch, new.holder, new.epoch,
                                time.monotonic() - started)
    finally:
        await con.close(timeout=5)


def _database_url(args: argparse.Namespace) -> str:
    url = getattr(args, "database_url", None) or os.environ.get("GRIDPAY_DATABASE_URL", "")
    if url:
        return str(url)
    from switch.cli import _settings
    from switch.embedded import EmbeddedPostgres

    settings = _settings(args)
    if settings.services.database_url:
        return settings.services.database_url
    running = EmbeddedPostgres(settings.node.home / "postgres").running_url()
    if running is None:
        raise StandbyError("no GRIDPAY_DATABASE_URL and no running embedded database")
    return running


def cmd_switchover(args: argparse.Namespace) -> int:
    """`gridpay switchover [--to NODE] [--timeout S] [--database-url URL]`."""
    try:
        url = _database_url(args)
    except Exception as e:
        print(f"gridpay switchover: no database: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    timeout = float(getattr(args, "timeout", SWITCHOVER_TIMEOUT_S))
    if not timeout > 0:
        print("gridpay switchover: --timeout must be a positive number of seconds",
              file=sys.stderr)
        return 2

    async def run() -> int:
        try:
            result = await switchover(url, getattr(args, "to", None), timeout)
        except SwitchoverRefused as e:
            print(f"gridpay switchover: refused: {e}", file=sys.stderr)
            return 3
        except SwitchoverTimeout as e:
            print(f"gridpay switchover: {e}", file=sys.stderr)
            return 4
        except _ONE_LINE as e:
            print(f"gridpay switchover: {_explain(e)}", file=sys.stderr)
            return 2
        print(result.describe())
        return 0

    return asyncio.run(run())


def cmd_lease(args: argparse.Namespace) -> int:
    """`gridpay lease`: who holds the lease (one JSON line)."""
    import orjson

    try:
        url = _database_url(args)
    except StandbyError as e:
        print(f"gridpay lease: {e}", file=sys.stderr)
        return 2

    async def run() -> dict[str, Any]:
        con = await asyncpg.connect(url, timeout=10)
        try:
            st = await lease_state(con)
        finally:
            await con.close(timeout=5)
        return {"holder": st.holder, "epoch": st.epoch,
                "expires_in_s": round(st.expires_in_s, 3), "handover_to": st.handover_to,
                "at": datetime.now().astimezone().isoformat(timespec="seconds")}

    try:
        state = asyncio.run(run())
    except _ONE_LINE as e:
        print(f"gridpay lease: {_explain(e)}", file=sys.stderr)
        return 2
    print(orjson.dumps(state).decode())
    return 0


#: what `lease` and `switchover` answer in one line (`_explain`), not with a traceback
_ONE_LINE = (StandbyError, OSError, TimeoutError, asyncpg.PostgresError, ValueError,
             asyncpg.InterfaceError)


def _explain(e: BaseException) -> str:
    """What an operator command says of one of `_ONE_LINE`: its own refusal; the database out
    of reach (look at the network), reached but not a gridpay database (look at the
    migrations), or reached and refusing; or a URL the client cannot take (never echoed: it
    may hold a password)."""
    if isinstance(e, StandbyError):
        return str(e)
    if isinstance(e, ValueError | asyncpg.InterfaceError):
        return f"{_BAD_URL} ({type(e).__name__})"
    if isinstance(e, asyncpg.UndefinedTableError | asyncpg.UndefinedFunctionError):
        return ("the database was reached but holds no gridpay schema (run `gridpay migrate` "
                "against it, or check the database name)")
    if isinstance(e, asyncpg.PostgresError) and not isinstance(
            e, asyncpg.PostgresConnectionError | asyncpg.CannotConnectNowError):
        return f"the database refused the command: {type(e).__name__}"
    return f"the database cannot be reached: {type(e).__name__}"


# not echoed: the URL may hold a password
_BAD_URL = "the database URL is not one PostgreSQL's client takes (check its form and options)"
# A URL given on the command line is seen by everyone on the machine (`ps`): one with a
# password belongs in GRIDPAY_DATABASE_URL
_URL_HELP = ("default: GRIDPAY_DATABASE_URL, else the running embedded database; a URL with "
             "a password belongs in GRIDPAY_DATABASE_URL, not here, where the process list "
             "shows it")


def register_cli(subparsers: Any) -> None:
    """Adds `switchover` and `lease` to the `gridpay` parser; the handler is in `func`."""
    p = subparsers.add_parser("switchover",
                              help="planned switchover: hand the lease to the standby")
    p.add_argument("--to", default=None, metavar="NODE",
                   help="the node to hand over to (default: whichever standby takes it)")
    p.add_argument("--timeout", type=float, default=SWITCHOVER_TIMEOUT_S, metavar="S",
                   help="give up after this many seconds (default 60: the holder first lets "
                        "its work in flight finish, two graces and 10 s at most)")
    p.add_argument("--database-url", default=None, help=_URL_HELP)
    p.set_defaults(func=cmd_switchover)
    q = subparsers.add_parser("lease", help="show who holds the lease")
    q.add_argument("--database-url", default=None, help=_URL_HELP)
    q.set_defaults(func=cmd_lease)
