from __future__ import annotations

import asyncio

import asyncpg

from switch import db


async def test_migrations_are_recorded_and_idempotent(migrated: str) -> None:
    conn = await asyncpg.connect(migrated)
    try:
        assert await db.migrate(conn) == []  # already applied by the session fixture
        versions = [r["version"] for r in await conn.fetch(
            "SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == [m.version for m in db.migrations()]
    finally:
        await conn.close()


async def test_two_nodes_migrating_together_do_not_collide(migrated: str) -> None:
    # a fresh database, migrated by two connections at once
    admin = await asyncpg.connect(migrated)
    try:
        await admin.execute("DROP DATABASE IF EXISTS gridpay_mig_race")
        await admin.execute("CREATE DATABASE gridpay_mig_race")
    finally:
        await admin.close()
    url = migrated.rsplit("/", 1)[0] + "/gridpay_mig_race"
    c1, c2 = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        a, b = await asyncio.gather(db.migrate(c1), db.migrate(c2))
        assert sorted(a + b) == [m.version for m in db.migrations()]
        assert not set(a) & set(b)
    finally:
        await c1.close()
        await c2.close()


async def test_fence_refuses_a_stale_epoch(pool: asyncpg.Pool) -> None:
    await pool.execute("UPDATE node_lease SET epoch = 7, holder = 'a'")
    await pool.execute("SELECT gridpay_fence(7)")
    try:
        await pool.execute("SELECT gridpay_fence(6)")
    except asyncpg.PostgresError as e:
        assert db.is_fenced(e)
    else:
        raise AssertionError("a stale epoch was accepted")


async def test_the_embedded_server_is_set_for_a_durable_busy_ledger(pool: asyncpg.Pool) -> None:
    settings = {r["name"]: r["setting"] for r in await pool.fetch(
        "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
        ["fsync", "synchronous_commit", "full_page_writes", "data_checksums", "max_wal_size",
         "checkpoint_timeout"])}
    assert settings["fsync"] == settings["synchronous_commit"] == "on"
    assert settings["full_page_writes"] == settings["data_checksums"] == "on"
    # checkpoints far apart: each one costs every page's next write a full-page image
    assert int(settings["max_wal_size"]) >= 4096  # MB
    assert int(settings["checkpoint_timeout"]) >= 900  # s


async def test_every_change_to_the_api_clients_is_announced(pool: asyncpg.Pool,
                                                            clean_db: str) -> None:
    heard: list[str] = []
    listener = await asyncpg.connect(clean_db)
    await listener.add_listener("gridpay_api_clients", lambda *args: heard.append(args[2]))
    try:
        for sql in ("UPDATE api_clients SET revoked_at = now()", "DELETE FROM api_clients",
                    "TRUNCATE api_clients CASCADE"):
            before = len(heard)
            await pool.execute(sql)  # even touching no row: nodes only drop their caches
            for _ in range(250):
                if len(heard) > before:
                    break
                await asyncio.sleep(0.02)
            assert len(heard) > before, f"no notice for {sql}"
    finally:
        await listener.close()
