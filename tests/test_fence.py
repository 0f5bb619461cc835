"""The lease fence against the lease's own statements, on the real server: a takeover waits
for the fenced writes in flight and refuses those after it; a renewal waits for none, so a
long fenced transaction does not make the active node lose its role."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from switch import db, lease


@contextlib.asynccontextmanager
async def _conns(url: str, n: int) -> AsyncIterator[list[asyncpg.Connection]]:
    # no wait here is meant to last: a test that would hang fails instead
    conns = [await asyncpg.connect(url, server_settings={"lock_timeout": "5s"})
             for _ in range(n)]
    try:
        yield conns
    finally:
        for c in conns:
            await c.close()


async def _held_by_a(url: str) -> None:
    c = await asyncpg.connect(url)
    try:
        await c.execute("UPDATE node_lease SET holder = 'a', epoch = 7,"
                        " expires_at = now() + interval '1 minute'")
    finally:
        await c.close()


async def test_a_renewal_does_not_wait_for_the_fenced_writes_in_flight(clean_db: str) -> None:
    await _held_by_a(clean_db)
    async with _conns(clean_db, 2) as (writer, node):
        tx = writer.transaction()
        await tx.start()
        await writer.execute("SELECT gridpay_fence(7)")
        await node.execute("SET lock_timeout = '500ms'")
        # with a share lock this waited for the writer's commit (and timed out here)
        row = await node.fetchrow(lease._RENEW, "a", 7, 2.0)
        assert row is not None and row["epoch"] == 7
        await writer.execute("SELECT gridpay_fence(7)")  # and the writer is not held up either
        await tx.commit()


async def test_a_takeover_waits_for_a_fenced_write_begun_before_a_renewal(
        clean_db: str) -> None:
    await _held_by_a(clean_db)
    async with _conns(clean_db, 3) as (writer, holder, other):
        tx = writer.transaction()
        await tx.start()
        await writer.execute("SELECT gridpay_fence(7)")
        # the holder renews, then lets the lease lapse: two new versions of the row
        assert await holder.fetchrow(lease._RENEW, "a", 7, 2.0) is not None
        await holder.execute("UPDATE node_lease SET expires_at = 'epoch'")
        await other.execute("SET lock_timeout = '300ms'")
        with pytest.raises(asyncpg.exceptions.LockNotAvailableError):
            await other.fetchval(lease._ACQUIRE, "b", 2.0)
        await other.execute("RESET lock_timeout")
        takeover = asyncio.ensure_future(other.fetchval(lease._ACQUIRE, "b", 2.0))
        await asyncio.sleep(0.3)
        assert not takeover.done(), "the takeover did not wait for the fenced write"
        await writer.execute("SELECT 1")  # the write goes on while it waits
        await tx.commit()
        assert await asyncio.wait_for(takeover, 10) == 8
        with pytest.raises(asyncpg.PostgresError) as e:
            await writer.execute("SELECT gridpay_fence(7)")
        assert db.is_fenced(e.value)


async def test_a_fenced_write_waiting_on_a_takeover_is_refused_once_it_commits(
        clean_db: str) -> None:
    await _held_by_a(clean_db)
    async with _conns(clean_db, 2) as (writer, other):
        await other.execute("UPDATE node_lease SET expires_at = 'epoch'")
        tx = other.transaction()
        await tx.start()
        assert await other.fetchval(lease._ACQUIRE, "b", 2.0) == 8
        fenced = asyncio.ensure_future(writer.execute("SELECT gridpay_fence(7)"))
        await asyncio.sleep(0.3)
        assert not fenced.done(), "a fenced write did not wait for the takeover in progress"
        await tx.commit()
        with pytest.raises(asyncpg.PostgresError) as e:
            await asyncio.wait_for(fenced, 10)
        assert db.is_fenced(e.value)
        await writer.execute("SELECT gridpay_fence(8)")


async def test_a_long_fenced_transaction_does_not_cost_the_active_node_its_role(
        clean_db: str, pool: asyncpg.Pool) -> None:
    changes: list[str] = []

    async def active() -> None:
        changes.append("active")

    async def standby() -> None:
        changes.append("standby")

    node = lease.Lease(pool, "a", ttl_s=0.8, renew_s=0.2, on_active=active,
                       on_standby=standby)
    await node.start()
    try:
        assert node.is_active and changes == ["active"]
        async with _conns(clean_db, 1) as (writer,):
            async with writer.transaction():  # a card job's long transaction, say
                await writer.execute("SELECT gridpay_fence($1)", node.epoch)
                for _ in range(20):  # 2 s: more than two ttls
                    await asyncio.sleep(0.1)
                    assert node.is_active, "the renewals waited for the fenced transaction"
        assert changes == ["active"]
    finally:
        await node.halt()
