"""Telling a database outage (answered 503, retry) from a defect (500, a traceback)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from switch import db


async def _raised(work: object) -> BaseException:
    try:
        await work  # type: ignore[misc]
    except Exception as e:
        return e
    raise AssertionError("nothing was raised")


async def test_an_outage_is_told_apart_from_a_defect(clean_db: str) -> None:
    pool = await db.create_pool(clean_db, min_size=1, max_size=1)
    try:
        # defects: a parameter of the wrong type, a broken statement, a violated constraint,
        # two operations at once on one connection
        wrong_type = await _raised(pool.fetchval("SELECT $1::int", "one"))
        syntax = await _raised(pool.fetchval("SELEC 1"))
        unique = await _raised(pool.execute(
            "INSERT INTO node_lease (id) VALUES (1)"))  # the seeded singleton is there
        async with pool.acquire() as con:
            slow = asyncio.ensure_future(con.fetchval("SELECT pg_sleep(0.2)"))
            await asyncio.sleep(0.05)
            busy = await _raised(con.fetchval("SELECT 1"))
            await slow
        for e in (wrong_type, syntax, unique, busy):
            assert not db.unavailable(e), repr(e)
    finally:
        await pool.close()
    # outages: a closed pool, a server that refuses the connection, a time limit
    closed = await _raised(pool.fetchval("SELECT 1"))
    refused = await _raised(asyncpg.connect("postgresql://postgres@127.0.0.1:1/x", timeout=2))
    timed_out = await _raised(asyncio.wait_for(asyncio.sleep(1), 0.01))
    for e in (closed, refused, timed_out):
        assert db.unavailable(e), repr(e)


@pytest.mark.parametrize("sqlstate_error", [
    asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError, asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.ConnectionDoesNotExistError])
def test_server_side_outages_are_outages(sqlstate_error: type[Exception]) -> None:
    # what the server sends as it shuts down, starts, runs out of connections or is a standby
    assert db.unavailable(sqlstate_error("x"))
    assert not db.unavailable(asyncpg.exceptions.ProtocolViolationError("x"))
