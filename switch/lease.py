"""The active/standby lease in PostgreSQL, with an epoch that only grows.

The active node renews the lease every `renew_s`; if it stops (killed, hung, cut off), the
lease expires after `ttl_s` and the standby takes it with epoch + 1. Every active-only write
calls `gridpay_fence(epoch)` in its own transaction, so a node that wakes up believing it is
still active has its writes refused by the database.

Role transitions are one table: an illegal one raises and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
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


class IllegalTransition(Exception):
    pass


_ACQUIRE = """
UPDATE node_lease
   SET holder = $1, epoch = epoch + 1, expires_at = now() + make_interval(secs => $2),
       handover_to = NULL, updated_at = now()
 WHERE id = 1
   AND (holder IS NULL OR expires_at < now() OR handover_to = $1)
RETURNING epoch
"""
_RENEW = """
UPDATE node_lease SET expires_at = now() + make_interval(secs => $3), updated_at = now()
 WHERE id = 1 AND holder = $1 AND epoch = $2 AND handover_to IS NULL
RETURNING epoch
"""
_RELEASE = """
UPDATE node_lease SET holder = NULL, expires_at = 'epoch', updated_at = now()
 WHERE id = 1 AND holder = $1 AND epoch = $2
"""
_HANDOVER = """
UPDATE node_lease SET handover_to = $3, expires_at = now(), updated_at = now()
 WHERE id = 1 AND holder = $1 AND epoch = $2
RETURNING epoch
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
            await asyncio.sleep(self.renew_s if self.role is Role.ACTIVE else self.renew_s / 2)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # database unreachable: keep trying, demote on expiry
                log.warning("lease tick failed", extra={"error": type(e).__name__})
                if self.role is Role.ACTIVE and time.monotonic() >= self._valid_until:
                    await self.demote("lease could not be renewed")

    async def _tick(self) -> None:
        started = time.monotonic()
        if self.role is Role.ACTIVE:
            async with self.pool.acquire(timeout=self.renew_s) as con:
                row = await con.fetchrow(_RENEW, self.node_id, self.epoch, self.ttl_s,
                                         timeout=self.renew_s)
            if row is None:
                await self.demote("lease lost")
            else:
                self._valid_until = started + self.ttl_s
            return
        async with self.pool.acquire(timeout=self.renew_s) as con:
            row = await con.fetchrow(_ACQUIRE, self.node_id, self.ttl_s, timeout=self.renew_s)
        if row is not None:
            self.epoch = int(row["epoch"])
            self._valid_until = started + self.ttl_s
            self._move(Role.ACTIVE)
            await self._on_active()

    async def demote(self, reason: str) -> None:
        if self.role is not Role.ACTIVE:
            return
        log.warning("demoting to standby", extra={"reason": reason, "epoch": self.epoch})
        self._valid_until = 0.0
        self._move(Role.STANDBY)
        await self._on_standby()

    async def handover(self, to_node: str) -> bool:
        """Planned switchover: stop being active and let `to_node` take the next epoch."""
        if self.role is not Role.ACTIVE:
            return False
        async with self.pool.acquire() as con:
            row = await con.fetchrow(_HANDOVER, self.node_id, self.epoch, to_node)
        await self.demote(f"handed over to {to_node}")
        return row is not None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.role is Role.ACTIVE:
            with contextlib.suppress(Exception):
                async with self.pool.acquire(timeout=2) as con:
                    await con.execute(_RELEASE, self.node_id, self.epoch, timeout=2)
        if self.role is not Role.STOPPED:
            self._move(Role.STOPPED)
