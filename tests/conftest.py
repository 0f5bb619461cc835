"""Shared fixtures: a real PostgreSQL and Redis for the whole session (the embedded ones, or
external ones from GRIDPAY_TEST_DATABASE_URL / GRIDPAY_TEST_REDIS_URL), with per-test
isolation: every test starts from empty tables and an empty Redis database."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from hsm_sim.server import HsmServer, start_server
from marketing_sim.app import MarketingSettings, MarketingSim, start
from switch import db
from switch.embedded import EmbeddedPostgres, EmbeddedRedis
from switch.loop import new_event_loop
from switch.node import Node
from tests.nodekit import HSM_SETTINGS, Sims, running_node, simulators

_FAILED: list[str] = []
_PASSED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _FAILED.append(report.nodeid)
    elif report.passed and report.when == "call":
        _PASSED.append(report.nodeid)


def pytest_configure(config: pytest.Config) -> None:
    from switch import loop

    capman = config.pluginmanager.getplugin("capturemanager")

    def verdict() -> int:
        """If closing a loop ever hangs, end the process with the suite's true verdict, and
        say it on the real standard output (pytest's own summary would never come)."""
        try:
            if capman is not None:
                capman.suspend_global_capture(in_=False)
            sys.stdout.write(f"\n{len(_PASSED)} passed, {len(_FAILED)} failed\n")
            sys.stdout.flush()
        except Exception:  # noqa: S110 - the exit status below still tells the truth
            pass
        return 1 if _FAILED else 0

    loop.exit_status_on_hang = verdict


def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> Mapping[str, Callable[[], Any]]:
    """The suite runs on the switch's own loop (uvloop)."""
    return {"uvloop": new_event_loop}


@pytest.fixture(scope="session")
def service_root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gridpay-test-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def database_url(service_root: Path) -> Iterator[str]:
    external = os.environ.get("GRIDPAY_TEST_DATABASE_URL")
    if external:
        yield external
        return
    pg = EmbeddedPostgres(service_root / "postgres")
    pg.start()
    try:
        yield pg.url
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def redis_url(service_root: Path) -> Iterator[str]:
    external = os.environ.get("GRIDPAY_TEST_REDIS_URL")
    if external:
        yield external
        return
    r = EmbeddedRedis(service_root / "redis")
    r.start()
    try:
        yield r.url
    finally:
        r.stop()


@pytest.fixture(scope="session")
async def migrated(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    return database_url


async def _truncate_all(conn: asyncpg.Connection) -> None:
    tables = [r["tablename"] for r in await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        " AND tablename <> 'schema_migrations'")]
    if tables:
        await conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables)
                           + " RESTART IDENTITY CASCADE")
    # singleton rows the migrations seed
    await conn.execute("INSERT INTO node_lease (id) VALUES (1) ON CONFLICT DO NOTHING")
    await conn.execute("INSERT INTO mirror_sync (id) VALUES (1) ON CONFLICT DO NOTHING")


@pytest.fixture
async def clean_db(migrated: str) -> str:
    """A database with the schema and no rows (but the seeded singletons)."""
    conn = await asyncpg.connect(migrated)
    try:
        await _truncate_all(conn)
    finally:
        await conn.close()
    return migrated


@pytest.fixture
async def pool(clean_db: str) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(clean_db, min_size=1, max_size=8)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def clean_redis(redis_url: str) -> AsyncIterator[str]:
    r = aioredis.from_url(redis_url)
    try:
        await r.flushdb()
    finally:
        await r.aclose()
    yield redis_url


@pytest.fixture
async def hsm_server() -> AsyncIterator[HsmServer]:
    """An HSM simulator of its own (HSM_SETTINGS), for one test."""
    async with await start_server(HSM_SETTINGS) as srv:
        yield srv


# -- a running node and its simulators, for the modules that test through one -----------------

@pytest.fixture(scope="module")
async def sims() -> AsyncIterator[Sims]:
    """The HSM and marketing simulators, one pair per test module."""
    async with simulators() as s:
        yield s


@pytest.fixture
async def node(clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> AsyncIterator[Node]:
    """A fresh active node on clean databases, its account mirror synced."""
    await sims.marketing.clear_faults()
    async with running_node(clean_db, clean_redis, sims, tmp_path) as n:
        await asyncio.wait_for(n.components["accounts"].synced.wait(), 20)
        yield n


@pytest.fixture
async def sim(request: pytest.FixtureRequest) -> AsyncIterator[MarketingSim]:
    """An in-memory marketing simulator with the test module's `CUSTOMERS` accounts."""
    running = await start(MarketingSettings(port=0, customers=request.module.CUSTOMERS))
    try:
        yield running
    finally:
        await running.close()
