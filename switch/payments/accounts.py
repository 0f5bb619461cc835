"""Customer accounts: live from the marketing system, or from the switch's mirror.

The mirror is kept in step from the marketing system's account listing (a full pass at start
and periodically after), and refreshed by every live lookup. Payments are validated against it
(no remote call on the payment path); inquiries ask the marketing system first and fall back to
the mirror, marked stale, when it does not answer in time.

A live lookup's refresh is written behind: the lookup answers at once, and the refreshes of the
last `MIRROR_FLUSH_S` go to the table together in one transaction committed without waiting for
its fsync. The mirror is a copy of what the marketing system holds; a crash can lose at most
those last moments of refreshes, which the next lookup or sync pass writes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg
import orjson

from switch.marketing_client import MarketingClient, MarketingError, MarketingUnavailable

if TYPE_CHECKING:
    from switch.db import Conn

log = logging.getLogger("gridpay.accounts")


class AccountsUnavailable(Exception):
    """Neither the marketing system nor the mirror can answer for this account."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountView:
    account_no: str
    name: str
    status: str
    arrears: int
    prepaid_balance: int
    bills: tuple[tuple[str, int], ...]
    as_of: datetime
    stale: bool

    def __repr__(self) -> str:
        return f"AccountView({self.account_no}, {self.status}, stale={self.stale})"


@dataclass(frozen=True, slots=True)
class MirrorProfile:
    status: str
    name: str
    arrears: int

    def __repr__(self) -> str:
        return f"MirrorProfile({self.status})"


def mask_name(name: str) -> str:
    """First character kept, every other replaced by '*'."""
    return name[:1] + "*" * (len(name) - 1) if name else ""


_UPSERT = """
INSERT INTO account_mirror (account_no, name, status, arrears, prepaid_balance, bills,
                            refreshed_at)
SELECT a, n, s, ar, pb, b::jsonb, t
  FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[],
              $7::timestamptz[]) AS u(a, n, s, ar, pb, b, t)
ON CONFLICT (account_no) DO UPDATE
   SET name = EXCLUDED.name, status = EXCLUDED.status,
       arrears = coalesce(EXCLUDED.arrears, account_mirror.arrears),
       prepaid_balance = coalesce(EXCLUDED.prepaid_balance, account_mirror.prepaid_balance),
       bills = coalesce(EXCLUDED.bills, account_mirror.bills),
       refreshed_at = EXCLUDED.refreshed_at
"""


#: a live lookup that finds exactly what it wrote less than this long ago does not write again
MIRROR_REWRITE_S = 30.0
#: how long a live lookup's refresh may wait to be written with the others
MIRROR_FLUSH_S = 0.2

# account, name, status, arrears, prepaid balance, bills: the last three None when the
# marketing system's list does not give them (the contract asks it for the first three only)
_Row = tuple[str, str, str, int | None, int | None, tuple[tuple[str, int], ...] | None]


class Accounts:
    def __init__(self, pool: asyncpg.Pool, client: MarketingClient, *,
                 sync_every_s: float = 900.0) -> None:
        self.pool = pool
        self.client = client
        self.sync_every_s = sync_every_s
        # mirrored profiles in memory, so that validating a payment costs no round trip: kept
        # for `sync_every_s` (the mirror's own refresh period: the copy is never staler than the
        # table it copies) and replaced whenever this node writes the mirror (every live lookup
        # and every sync pass goes through `_store`)
        self._profiles: dict[str, tuple[MirrorProfile, float]] = {}
        # what a live lookup last wrote to the mirror, and when: the same answer again within
        # `MIRROR_REWRITE_S` is not written again (an IVR dialog or a bank inquiry followed by
        # its payment looks the same account up several times a minute)
        self._written: dict[str, tuple[tuple[object, ...], float]] = {}
        # refreshes found by live lookups, not yet written (see `flush`)
        self._unwritten: dict[str, _Row] = {}
        self._flush_task: asyncio.Task[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()

    # -- lookups -------------------------------------------------------------------------

    async def lookup(self, account_no: str) -> AccountView | None:
        """The account, live when possible, else from the mirror (stale). None: unknown."""
        try:
            return await self._live(account_no)
        except (TimeoutError, MarketingError, OSError):
            return await self._from_mirror(account_no)

    async def _live(self, account_no: str) -> AccountView | None:
        """The account as the marketing system answers now (its errors raise), the mirror
        refreshed behind it. None: unknown."""
        # bounded by the marketing client's own request timeout
        acc = await self.client.get_account(account_no)
        if acc is None:
            return None
        now = datetime.now(UTC)
        seen = (acc.account_no, acc.name, acc.status, acc.arrears, acc.prepaid_balance,
                acc.bills)
        mono = time.monotonic()
        last = self._written.get(acc.account_no)
        if last is None or last[0] != seen or mono - last[1] > MIRROR_REWRITE_S:
            self._profiles[acc.account_no] = (MirrorProfile(acc.status, acc.name, acc.arrears),
                                              mono)
            self._unwritten[acc.account_no] = seen
            if len(self._written) > 200_000:
                self._written.clear()
            self._written[acc.account_no] = (seen, mono)
            if self._flush_task is None:
                self._flush_task = asyncio.get_running_loop().create_task(
                    self._flush_soon(), name="mirror-flush")
        return AccountView(account_no=acc.account_no, name=acc.name, status=acc.status,
                           arrears=acc.arrears, prepaid_balance=acc.prepaid_balance,
                           bills=acc.bills, as_of=now, stale=False)

    async def _from_mirror(self, account_no: str) -> AccountView:
        """The mirrored account, when the marketing system did not answer."""
        try:
            row = await self.pool.fetchrow(
                "SELECT account_no, name, status, arrears, prepaid_balance, bills, refreshed_at"
                " FROM account_mirror WHERE account_no = $1", account_no)
        except (OSError, asyncpg.PostgresError) as e:
            raise AccountsUnavailable("marketing system and mirror both unavailable") from e
        if row is None:
            # The marketing system did not answer and the mirror has never seen this account:
            # it may be new since the last pass, so "unknown" would be a guess. Say we cannot.
            raise AccountsUnavailable("marketing system unavailable; account not in the mirror")
        if row["arrears"] is None or row["prepaid_balance"] is None:
            # mirrored from a list that gives no balances and never looked up live: 0 owed
            # would be a guess too
            raise AccountsUnavailable("marketing system unavailable; the mirror has no balances "
                                      "for this account")
        bills = tuple((str(b[0]), int(b[1])) for b in (row["bills"] or []))
        return AccountView(account_no=row["account_no"], name=row["name"], status=row["status"],
                           arrears=row["arrears"], prepaid_balance=row["prepaid_balance"],
                           bills=bills, as_of=row["refreshed_at"], stale=True)

    async def status(self, account_no: str) -> str | None:
        """'active', 'closed' or None (unknown), for validating a payment: mirror first."""
        prof = await self.profile(account_no)
        return prof.status if prof else None

    def paid(self, account_no: str, amount: int) -> None:
        """A payment of `amount` to `account_no` was approved: the arrears it pays (oldest
        bills first, the rest is prepaid) are no longer owed in the cached profile, so that
        the next approval reports the arrears before it, not those of the last refresh. The
        billing system's own figures replace it at the next live lookup or mirror pass."""
        hit = self._profiles.get(account_no)
        if hit is not None and hit[0].arrears > 0:
            prof, at = hit
            self._profiles[account_no] = (
                MirrorProfile(prof.status, prof.name, max(0, prof.arrears - amount)), at)

    def forget(self, account_no: str) -> None:
        """The cached profile of `account_no` no longer holds (a payment was reversed): the
        next read goes to the mirror."""
        self._profiles.pop(account_no, None)

    async def profile(self, account_no: str) -> MirrorProfile | None:
        """The mirrored name, status and last known arrears (no remote call when mirrored)."""
        hit = self._profiles.get(account_no)
        if hit is not None and time.monotonic() - hit[1] < self.sync_every_s:
            return hit[0]
        row = await self.pool.fetchrow(
            "SELECT status, name, arrears FROM account_mirror WHERE account_no = $1", account_no)
        if row is None or row["arrears"] is None:
            # not mirrored yet, or mirrored without balances: ask live. With no answer, an
            # account not mirrored cannot be judged; one mirrored without balances keeps its
            # status, and the arrears an approval reports are 0, the one figure left to give
            # (not kept: the next payment asks again)
            try:
                view = await self._live(account_no)
            except (TimeoutError, MarketingError, OSError):
                if row is None:
                    raise AccountsUnavailable("marketing system unavailable; account not in "
                                              "the mirror") from None
                return MirrorProfile(row["status"], row["name"], 0)
            if view is None:
                return None
            prof = MirrorProfile(view.status, view.name, view.arrears)
        else:
            prof = MirrorProfile(row["status"], row["name"], row["arrears"])
        if len(self._profiles) > 2_000_000:
            self._profiles.clear()
        mono = time.monotonic()
        self._profiles[account_no] = (prof, mono)
        return prof

    # -- mirror --------------------------------------------------------------------------

    async def _flush_soon(self) -> None:
        try:
            await asyncio.sleep(MIRROR_FLUSH_S)
            await self.flush()
        finally:
            self._flush_task = None

    async def flush(self) -> int:
        """Write the live lookups' refreshes now; returns how many. A failure is logged and
        forgets them (the mirror is a copy: the next lookup or sync pass writes them again)."""
        n = 0
        while self._unwritten:
            # in account order, as the sync pass writes: two writers never wait on each other
            # in opposite orders (a deadlock)
            rows, self._unwritten = sorted(self._unwritten.values()), {}
            try:
                async with self.pool.acquire() as con, con.transaction():
                    await con.execute("SET LOCAL synchronous_commit = off")
                    await self._store(rows, datetime.now(UTC), con)
            except Exception as e:
                for r in rows:
                    self._written.pop(r[0], None)
                log.warning("account mirror refresh not written",
                            extra={"accounts": len(rows), "error": type(e).__name__})
                return n
            n += len(rows)
        return n

    async def _store(self, rows: list[_Row], now: datetime,
                     con: Conn | None = None) -> None:
        if not rows:
            return
        await (con or self.pool).execute(
            _UPSERT, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
            [r[3] for r in rows], [r[4] for r in rows],
            [None if r[5] is None else orjson.dumps([list(b) for b in r[5]]).decode()
             for r in rows],
            [now] * len(rows))
        mono = time.monotonic()
        for r in rows:
            if r[3] is None:  # the arrears kept in the table are the ones to go by
                self._profiles.pop(r[0], None)
            else:
                self._profiles[r[0]] = (MirrorProfile(r[2], r[1], r[3]), mono)

    async def sync_once(self, page: int = 1000) -> int:
        """One full pass over the marketing system's accounts; returns how many."""
        after: str | None = None
        n = 0
        while True:
            accounts, nxt = await self.client.list_accounts(after, page)
            now = datetime.now(UTC)
            # a record the database cannot hold (a NUL in a name) is left out, not the pass
            good = [a for a in accounts if "\x00" not in a.name]
            if len(good) != len(accounts):
                log.warning("account records not mirrored: a NUL in the name",
                            extra={"accounts": [a.account_no for a in accounts
                                                if "\x00" in a.name]})
            await self._store([(a.account_no, a.name, a.status, a.arrears, a.prepaid_balance,
                                a.bills) for a in good], now)
            n += len(accounts)
            if nxt is None or not accounts:
                break
            if after is not None and nxt <= after:
                # the list is in account-number order: a cursor that does not move on would
                # walk the same page for ever (a billing system's defect); this pass fails and
                # the next one starts again from the beginning
                raise MarketingUnavailable(
                    f"the marketing system's account list did not move on after {after!r}")
            after = nxt
        await self.pool.execute("UPDATE mirror_sync SET completed_at = now(), last_after = NULL")
        self.synced.set()
        return n

    async def _sync_loop(self) -> None:
        if await self.pool.fetchval("SELECT completed_at IS NOT NULL FROM mirror_sync"):
            self.synced.set()  # a previous pass exists: usable at once
        delay = 0.0
        while True:
            await asyncio.sleep(delay)
            try:
                started = time.monotonic()
                n = await self.sync_once()
                log.info("account mirror in step", extra={
                    "accounts": n, "seconds": round(time.monotonic() - started, 2)})
                delay = self.sync_every_s
            except Exception as e:
                log.warning("account mirror sync failed; will retry",
                            extra={"error": f"{type(e).__name__}: {e}"})
                delay = min(max(delay * 2, 1.0), 60.0)

    def start_sync(self) -> None:
        if self._sync_task is None:
            self._sync_task = asyncio.create_task(self._sync_loop(), name="mirror-sync")

    async def stop_sync(self) -> None:
        """Stop the sync loop and write what live lookups have refreshed."""
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
        await self.flush()
