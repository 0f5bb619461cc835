"""A card's expiry is a date in the utility's time zone, whatever the database server's is.

The node runs in Pacific/Kiritimati (UTC+14) and the database's sessions default to
Etc/GMT+12 (UTC-12): 26 hours apart, so the two dates always differ, at any hour of the day.
Judged by the server's date, a card that expired yesterday in the utility's zone was still
recharged (money credited for a dead card).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from switch.ivr.simulator import IvrSimulator
from switch.node import Node
from tests.nodekit import Sims, api_key, running_node, simulators
from tests.test_ivr_api import DEV, _fresh, account, ani, make_card

ZONE = "Pacific/Kiritimati"
SERVER_ZONE = "Etc/GMT+12"


@pytest.fixture(scope="module")
async def sims() -> AsyncIterator[Sims]:
    async with simulators() as s:
        yield s


@pytest.fixture(scope="module")
async def node(migrated: str, redis_url: str, sims: Sims,
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Node]:
    await _fresh(migrated, redis_url)
    con = await asyncpg.connect(migrated)
    name = await con.fetchval("SELECT current_database()")
    await con.execute(f"ALTER DATABASE \"{name}\" SET timezone TO '{SERVER_ZONE}'")
    try:
        home: Path = tmp_path_factory.mktemp("zone")
        async with running_node(migrated, redis_url, sims, home,
                                GRIDPAY_TIMEZONE=ZONE) as n:
            await asyncio.wait_for(n.components["accounts"].synced.wait(), 20)
            yield n
    finally:
        await con.execute(f"ALTER DATABASE \"{name}\" RESET timezone")
        await con.close()


async def test_the_node_judges_dates_in_the_utilitys_zone(node: Node, migrated: str) -> None:
    con = await asyncpg.connect(migrated)
    try:
        server_day = await con.fetchval("SELECT current_date")
    finally:
        await con.close()
    ours = await node.pool.fetchval("SELECT current_date")
    assert ours == dt.datetime.now(node.settings.business.timezone).date()
    assert ours != server_day  # the test's premise: the server's own date is another one


async def test_a_card_expired_yesterday_in_the_utilitys_zone_is_not_recharged(
        node: Node, sims: Sims) -> None:
    today = dt.datetime.now(node.settings.business.timezone).date()
    key = await api_key(node.pool, "ivr", "ivr-zone")
    async with aiohttp.ClientSession() as session, IvrSimulator(
            f"http://127.0.0.1:{node.ports.http}", key, DEV.ivr_pin_key,
            session=session) as ivr:
        dead, dead_pin = await make_card(node)
        live, live_pin = await make_card(node)
        await node.pool.execute("UPDATE cards SET expiry = $2 WHERE serial = $1", dead,
                                today - dt.timedelta(days=1))
        await node.pool.execute("UPDATE cards SET expiry = $2 WHERE serial = $1", live, today)
        refused = await ivr.recharge(ani(), await account(sims), dead, dead_pin)
        assert refused.outcome == "card_expired"
        assert await node.pool.fetchval("SELECT state FROM cards WHERE serial = $1",
                                        dead) != "redeemed"
        assert await node.pool.fetchval("SELECT count(*) FROM payments WHERE card_serial = $1",
                                        dead) == 0
        # and a card whose last day is today, there, is still good
        ok = await ivr.recharge(ani(), await account(sims), live, live_pin)
        assert ok.ok
