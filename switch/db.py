"""PostgreSQL: the pool, and versioned migrations applied under an advisory lock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

log = logging.getLogger("gridpay.db")

#: Two nodes starting together take turns on this lock, so migrations never collide.
MIGRATION_LOCK = 0x67726964  # "grid"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

Pool = asyncpg.Pool

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from asyncpg.pool import PoolConnectionProxy

    #: a connection, whether taken from a pool or opened alone
    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    out: list[Migration] = []
    for entry in resources.files("switch").joinpath("migrations").iterdir():
        m = _NAME.fullmatch(entry.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return out


#: The first line of a migration whose statements run one by one outside a transaction
#: (`CREATE INDEX CONCURRENTLY` cannot run inside one). Each statement ends a line with `;`.
CONCURRENT = "-- gridpay: each statement alone, outside a transaction"


def _statements(sql: str) -> list[str]:
    """The statements of a migration: every line that is not a comment, up to one that ends
    with `;`."""
    out: list[str] = []
    current: list[str] = []
    for line in sql.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("--")):
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            out.append("\n".join(current))
            current = []
    if any(line.strip() for line in current):
        raise RuntimeError("a migration's last statement does not end with ';'")
    return out


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply every migration not yet recorded; returns the versions applied now."""
    applied_now: list[int] = []
    # taken by polling, not by waiting in pg_advisory_lock: a statement waiting there keeps
    # its snapshot, and CREATE INDEX CONCURRENTLY in the holder's migration waits for every
    # older snapshot to end (a deadlock, which PostgreSQL breaks by failing one of the two)
    while True:  # the lock is another server's: there is no event to wait for here
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK):
            break
        await asyncio.sleep(0.05)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for m in migrations():
            if m.version in done:
                continue
            concurrent = m.sql.startswith(CONCURRENT)
            # statements that must not hold a table's writers for their length (an index
            # built over the whole outbox, say) run each on its own, outside a transaction,
            # written so that a retry after an interruption redoes them safely
            async with contextlib.nullcontext() if concurrent else conn.transaction():
                for statement in _statements(m.sql) if concurrent else [m.sql]:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    m.version, m.name)
            log.info("migration applied", extra={"version": m.version, "migration": m.name})
            applied_now.append(m.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied_now


async def _init_conn(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=_loads, schema="pg_catalog")


def _dumps(v: Any) -> str:
    import orjson

    return orjson.dumps(v).decode()


def _loads(s: str) -> Any:
    import orjson

    return orjson.loads(s)


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Connections go back to the pool without a reset round trip: the switch keeps no
    session state (its advisory locks are transaction-scoped; migrations use a connection of
    their own), so asyncpg's default reset would only cost a round trip per release."""


def local_time(tz: ZoneInfo) -> dict[str, str]:
    """Server settings for sessions that judge dates the way the utility does: a card's
    expiry (`expiry < current_date`) is a date on the card, in the utility's time zone, not in
    the database server's (a server on UTC is a day behind Shanghai until 08:00, and would
    take a card expired yesterday)."""
    return {"TimeZone": tz.key}


async def create_pool(url: str, *, min_size: int = 2, max_size: int = 16,
                      server_settings: dict[str, str] | None = None,
                      reset_on_release: bool = False) -> asyncpg.Pool:
    """`reset_on_release`: asyncpg's reset (a round trip) each time a connection goes back,
    which also ends a transaction that a cancelled statement left open (a statement being
    prepared when its task was cancelled leaves the server's implicit transaction open, so
    the connection's next statement would see the old `now()`). For a pool whose users may
    be cancelled mid-statement and that is not on a payment's path."""
    pool = await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, init=_init_conn,
        reset=None if reset_on_release else _no_reset,
        command_timeout=30, max_inactive_connection_lifetime=300,
        server_settings=server_settings,
    )
    assert pool is not None
    return pool


# What a statement raises when the database is down, going down or out of reach, rather
# than refusing the statement itself: a lost or refused connection, a server shutting down or
# cancelling, out of connections, a read-only server (a standby after a failover), a closed
# pool or connection, a time limit. A request that meets one is answered 503 (retry), not
# 500. Left out on purpose, though asyncpg files them beside these: its own refusals of what
# we sent (a wrong parameter type, an operation already in progress, a protocol error), which
# are defects that must show as such, not as an outage to wait out.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError, OSError, TimeoutError)


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database is out of reach (see `_UNAVAILABLE`), not that a
    statement or its parameters were wrong."""
    if isinstance(exc, asyncpg.exceptions.ProtocolViolationError):
        return False
    if isinstance(exc, _UNAVAILABLE):
        return True
    # a closed pool or connection; and no host of a multi-host URL taking writes
    if type(exc) is asyncpg.InterfaceError:
        return "closed" in str(exc) or "closing" in str(exc)
    return type(exc) is asyncpg.exceptions.InternalClientError


def is_fenced(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", None) == "GP001"


async def fence(conn: Conn, epoch: int | None) -> None:
    """Refuse (SQLSTATE GP001, see `is_fenced`) the transaction unless `epoch` is the lease's
    current epoch, and hold the lease row until it ends: a stale node's writes stop at its
    next transaction after another node took the lease, not when it notices. None: not
    fenced (tools and tests that run outside a node)."""
    if epoch is not None:
        await conn.execute("SELECT gridpay_fence($1)", epoch)


async def lock_name(conn: Conn, name: str) -> None:
    """Hold a lock named `name` until the transaction ends (an advisory lock on its 64-bit
    hash): the transactions that take one name run one at a time, on every node."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", name)


def fenced(param: int, statement: str) -> str:
    """`statement` fenced as `fence` does, in one statement, by the epoch in `$param` when
    that is not NULL (NULL: not fenced). The statement reads `{fence}` in its FROM (one row,
    once the fence has passed), so the fence runs before anything is written."""
    p = f"${int(param)}::bigint"  # only a parameter's number is formatted in
    head = f"WITH fence AS (SELECT gridpay_fence({p}) WHERE {p} IS NOT NULL) "  # noqa: S608
    return head + statement.replace("{fence}", "(SELECT count(*) FROM fence) AS f")
