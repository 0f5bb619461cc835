"""The active/standby lease in PostgreSQL, with an epoch that only grows.

The active node renews the lease every `renew_s`; if it stops (killed, hung, cut off), the
lease expires after `ttl_s` and the standby takes it with epoch + 1. Every active-only write
calls `gridpay_fence(epoch)` in its own transaction, so a node that wakes up believing it is
still active has its writes refused by the database.

`gridpay_fence` takes a key-share lock on the lease row and the epoch is a key column, so a
takeover (a key update) waits for the old holder's in-flight writes, while a renewal (no key
changed) waits for none of them. A holder that was paused in the middle of one (SIGSTOP, a
frozen VM) would hold that lock for ever; the node taking an expired lease therefore cuts off
the old holder's database sessions (found by their `application_name`, see `session_dsn`) when
its update waits too long for the row lock. A node that steps aside on purpose (`handover`,
or a stop: `retire`, then `stop`) keeps renewing until its work in flight has finished, so that
none of it is cut off.

The `handover_to` column carries a planned switchover:

| value      | meaning                                                              |
|------------|----------------------------------------------------------------------|
| NULL       | nothing planned                                                      |
| `?NODE`    | an operator asked the holder to hand over to NODE (`?*`: to anyone)  |
| `NODE`     | the holder has drained and released the lease to NODE (`*`: anyone)  |

Role transitions are one table: an illegal one raises and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable

import asyncpg

log = logging.getLogger("gridpay.lease")


class Role(enum.StrEnum):
    STARTING = "starting"
    STANDBY = "standby"
    ACTIVE = "active"
    STOPPED = "stopped"


TRANSITIONS: dict[Role, frozenset[Role]] = {
    Role.STARTING: frozenset({Role.STANDBY, Role.ACTIVE, Role.STOPPED}),
    Role.STANDBY: frozenset({Role.ACTIVE, Role.STOPPED}),
    Role.ACTIVE: frozenset({Role.STANDBY, Role.STOPPED}),
    Role.STOPPED: frozenset(),
}

#: `handover_to` prefix of a switchover an operator asked for, not yet granted
HANDOVER_REQUEST = "?"
#: `handover_to` target meaning "any node but the one handing over"
ANY_NODE = "*"


class IllegalTransition(Exception):
    pass


def application_name(node_id: str) -> str:
    """The PostgreSQL `application_name` of a node's sessions."""
    return f"gridpay:{node_id}"


def session_dsn(url: str, node_id: str) -> str:
    """`url` with the node's `application_name` (asyncpg passes unknown query parameters to
    the server as session settings), so that a node's sessions can be found and cut off."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
             if k != "application_name"]
    query.append(("application_name", application_name(node_id)))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


# Take the lease: handed to me, handed to anyone but its holder, expired (not by the holder
# that was asked to hand it over, which may still be draining), handed to a named node that
# has not taken it within a quarter of a ttl (it is down, or no such node: anyone, so that the
# pair is not left without an active node for a whole ttl), or expired for more than a whole
# ttl whatever was planned. `$2` is cast: PostgreSQL would type it from `$2 / 4` as an integer,
# and a ttl of 1.5 s would become a lease of 1 s and a quarter ttl of nothing.
_ACQUIRE = """
UPDATE node_lease
   SET holder = $1, epoch = epoch + 1, expires_at = now() + make_interval(secs => $2::float8),
       handover_to = NULL, updated_at = now()
 WHERE id = 1
   AND (handover_to = $1
        OR (handover_to = '*' AND holder IS DISTINCT FROM $1)
        OR ((holder IS NULL OR expires_at < now())
            AND (handover_to IS NULL
                 OR (handover_to LIKE '?%' AND holder IS DISTINCT FROM $1)))
        OR (handover_to NOT LIKE '?%' AND handover_to <> '*'
            AND expires_at < now() - make_interval(secs => $2::float8 / 4))
        OR expires_at < now() - make_interval(secs => $2::float8))
RETURNING epoch
"""
_RENEW = """
UPDATE node_lease SET expires_at = now() + make_interval(secs => $3), updated_at = now()
 WHERE id = 1 AND holder = $1 AND epoch = $2
   AND (handover_to IS NULL OR handover_to LIKE '?%')
RETURNING epoch, handover_to
"""
_RELEASE = """
UPDATE node_lease SET holder = NULL, expires_at = 'epoch', handover_to = NULL, updated_at = now()
 WHERE id = 1 AND holder = $1 AND epoch = $2
"""
_HANDOVER = """
UPDATE node_lease SET handover_to = $3, expires_at = now(), updated_at = now()
 WHERE id = 1 AND holder = $1 AND epoch = $2
RETURNING epoch
"""
_EXPIRED_HOLDER = """
SELECT holder FROM node_lease
 WHERE id = 1 AND holder IS NOT NULL AND holder <> $1 AND expires_at < now()
"""
_CUT_OFF = """
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
 WHERE application_name = $1 AND pid <> pg_backend_pid()
"""

Hook = Callable[[], Awaitable[None]]


class Lease:
    def __init__(self, pool: asyncpg.Pool, node_id: str, *, ttl_s: float, renew_s: float,
                 on_active: Hook, on_standby: Hook) -> None:
        self.pool = pool
        self.node_id = node_id
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.role = Role.STARTING
        self.epoch = 0
        self._on_active = on_active
        self._on_standby = on_standby
        self._valid_until = 0.0  # monotonic: past it, we must not act as active
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._handing_over: asyncio.Task[bool] | None = None
        # a switchover under way (see `handover`): demoted, the work taken under `epoch`
        # finishing. No lease is taken meanwhile, and the lease being handed over is renewed
        # for that work until it is handed over, or found taken (`_kept` False)
        self._draining = False
        self._kept = False
        # stopping: takes the lease no more and begins no switchover (see `retire`)
        self._retiring = False
        self._hold_off_until = 0.0  # monotonic: before it, do not try to take the lease
        self._idle = asyncio.Event()  # clear while a tick (and the hooks it runs) is under way
        self._idle.set()

    @property
    def is_active(self) -> bool:
        return self.role is Role.ACTIVE and time.monotonic() < self._valid_until

    def _move(self, to: Role) -> None:
        if to not in TRANSITIONS[self.role]:
            raise IllegalTransition(f"{self.role} -> {to}")
        log.info("role change", extra={"from_role": str(self.role), "to_role": str(to),
                                        "epoch": self.epoch, "node_id": self.node_id})
        self.role = to
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self) -> None:
        await self._changed.wait()

    async def start(self) -> None:
        """Try once to become active, then keep the role up to date in the background."""
        await self._tick()
        if self.role is Role.STARTING:
            self._move(Role.STANDBY)
        self._task = asyncio.create_task(self._run(), name="lease")

    async def _run(self) -> None:
        while True:
            renewing = self.role is Role.ACTIVE or self._draining
            await asyncio.sleep(self.renew_s if renewing else self.renew_s / 2)
            self._idle.clear()
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # database unreachable: keep trying, demote on expiry
                log.warning("lease tick failed", extra={"error": type(e).__name__})
                if self.role is Role.ACTIVE and time.monotonic() >= self._valid_until:
                    await self.demote("lease could not be renewed")
            finally:
                self._idle.set()

    async def halt(self) -> None:
        """Stop the background renewal, after the tick under way: an activation (or a
        demotion) it began runs its hooks to the end. Cancelled halfway, an activation could
        open the link listeners after the stopping node had already closed them, and nothing
        would close them again."""
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            await self._tick_ended()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _renew(self) -> asyncpg.Record | None:
        """Extend the lease this node holds under its epoch; None if it holds it no more."""
        async with self.pool.acquire(timeout=self.renew_s) as con:
            row: asyncpg.Record | None = await con.fetchrow(
                _RENEW, self.node_id, self.epoch, self.ttl_s, timeout=self.renew_s)
        return row

    async def _tick(self) -> None:
        started = time.monotonic()
        if self._draining:
            if self._kept and await self._renew() is None:  # another node has it: no more
                self._kept = False  # renewals
                log.warning("lease lost while handing it over", extra={"epoch": self.epoch})
            return
        if self.role is Role.ACTIVE:
            row = await self._renew()
            if row is None:
                await self.demote("lease lost")
                return
            self._valid_until = started + self.ttl_s
            asked = row["handover_to"]
            if asked is not None and self._handing_over is None and not self._retiring:
                target = str(asked)[len(HANDOVER_REQUEST):] or ANY_NODE
                log.info("switchover requested", extra={"to_node": target})
                self._handing_over = asyncio.create_task(self._handover_then_clear(target))
            return
        if (self.role is Role.STOPPED or self._retiring
                or time.monotonic() < self._hold_off_until):
            return
        epoch = await self._acquire()
        if epoch is not None:
            self.epoch = epoch
            self._valid_until = started + self.ttl_s
            self._move(Role.ACTIVE)
            await self._on_active()

    async def _acquire(self) -> int | None:
        """One attempt at the lease; cuts off an expired holder whose sessions block it."""
        wait_ms = max(20, int(self.renew_s * 1000 / 4))
        for attempt in range(2):
            async with self.pool.acquire(timeout=self.renew_s) as con:
                try:
                    async with con.transaction():
                        await con.execute(f"SET LOCAL lock_timeout = {wait_ms}")
                        row = await con.fetchrow(_ACQUIRE, self.node_id, self.ttl_s,
                                                 timeout=self.renew_s)
                    return None if row is None else int(row["epoch"])
                except asyncpg.LockNotAvailableError:
                    if attempt:
                        return None
                    holder = await con.fetchval(_EXPIRED_HOLDER, self.node_id,
                                                timeout=self.renew_s)
                    if holder is None:
                        return None
                    n = await con.fetchval(_CUT_OFF, application_name(str(holder)),
                                           timeout=self.renew_s)
                    log.warning("cut off the database sessions of an expired lease holder",
                                extra={"holder": str(holder), "sessions": int(n or 0)})
        return None

    async def demote(self, reason: str) -> None:
        if self.role is not Role.ACTIVE:
            return
        log.warning("demoting to standby", extra={"reason": reason, "epoch": self.epoch})
        self._valid_until = 0.0
        self._move(Role.STANDBY)
        await self._on_standby()

    async def step_aside(self, reason: str) -> None:
        """Demote, and give the lease up in the database at once (the other node need not
        wait for it to expire); then do not try to take it again for two ttls, so that a node
        that cannot work does not win it back first."""
        epoch = self.epoch
        was_active = self.role is Role.ACTIVE
        self._hold_off_until = time.monotonic() + 2 * self.ttl_s
        await self.demote(reason)
        if was_active:
            await self._release(epoch, self.ttl_s)

    async def _release(self, epoch: int, wait_s: float) -> None:
        """Give the lease of `epoch` up (best effort: it expires by itself otherwise)."""
        with contextlib.suppress(Exception):
            async with self.pool.acquire(timeout=wait_s) as con:
                await con.execute(_RELEASE, self.node_id, epoch, timeout=wait_s)

    async def _handover_then_clear(self, to_node: str) -> bool:
        try:
            return await self.handover(to_node)
        except Exception as e:
            log.error("switchover failed", extra={"error": type(e).__name__})
            return False
        finally:
            self._handing_over = None

    async def handover(self, to_node: str = ANY_NODE) -> bool:
        """Planned switchover: stop taking work, finish what is in flight while the epoch is
        still ours, then release the lease to `to_node` (`*`: any other node), which takes
        the next epoch. Returns whether the lease was handed over (False: it was lost first).

        The lease is renewed until then, demoted as the node is: work in flight that takes
        longer than what is left of the lease (a request waiting on a row lock) finishes
        instead of making the lease expire, which would let the other node take it by cutting
        off this node's sessions, that work rolled back. The demotion's hooks bound the wait
        (each drain has its grace), and a node cut off from the database stops renewing: its
        lease expires as any other's.
        """
        if self.role is not Role.ACTIVE:
            return False
        epoch = self.epoch
        self._draining = self._kept = True
        try:
            await self.demote(f"switchover to {to_node}")  # the hooks drain in-flight work
            async with self.pool.acquire(timeout=self.ttl_s) as con:
                row = await con.fetchrow(_HANDOVER, self.node_id, epoch, to_node,
                                         timeout=self.ttl_s)
        finally:
            self._draining = self._kept = False
        return row is not None

    async def retire(self, grace_s: float) -> None:
        """For a node that is stopping: take the lease no more and begin no switchover, but
        go on renewing the lease held, so that the work in flight finishes under its epoch
        while the node drains (`stop` then ends the renewals and releases the lease). A tick
        under way ends first (an activation it began runs its hooks to the end, for the node
        to undo), and so does a switchover under way, for `grace_s` at most."""
        self._retiring = True
        if self._task is not None and not self._task.done():
            await self._tick_ended()
        await self._switchover_done(grace_s)

    async def _tick_ended(self) -> None:
        """Wait for the tick under way to end; bounded (its own statements time out well
        within the bound)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(5.0, 2 * self.ttl_s))

    async def _switchover_done(self, within_s: float) -> None:
        if self._handing_over is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._handing_over), within_s)

    async def stop(self) -> None:
        """Stop renewing and release the lease (a switchover under way finishes first, a ttl
        at most, while the lease is still renewed)."""
        self._retiring = True
        await self._switchover_done(self.ttl_s)
        await self.halt()
        if self.role is Role.ACTIVE:
            await self._release(self.epoch, 2)
        if self.role is not Role.STOPPED:
            self._move(Role.STOPPED)
