"""Running a real switch node in the test process, against the real simulators."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from hsm_sim.server import HsmServer, load_dev_settings, start_server
from marketing_sim.app import MarketingSettings, MarketingSim
from marketing_sim.app import start as start_marketing
from switch.clients import create_client
from switch.config import Settings, load_settings
from switch.node import Node, ServiceUrls

TEST_CUSTOMERS = 3000


@dataclasses.dataclass
class Sims:
    hsm: HsmServer
    marketing: MarketingSim

    @property
    def hsm_addr(self) -> str:
        return f"127.0.0.1:{self.hsm.port}"


#: the HSM simulator of the HSM tests: any port, authorised state (key import and export)
HSM_SETTINGS = dataclasses.replace(load_dev_settings(), port=0, authorised=True)


@contextlib.asynccontextmanager
async def simulators(data_dir: Path | None = None,
                     customers: int = TEST_CUSTOMERS) -> AsyncIterator[Sims]:
    hsm_settings = dataclasses.replace(load_dev_settings(), port=0)
    hsm = await start_server(hsm_settings)
    mkt = await start_marketing(MarketingSettings(host="127.0.0.1", port=0, data_dir=data_dir,
                                                  customers=customers, seed=42))
    try:
        yield Sims(hsm, mkt)
    finally:
        await mkt.close()
        hsm.close()
        await hsm.wait_closed()


def node_settings(home: Path, node_id: str = "node-a",
                  overrides: dict[str, Any] | None = None, **env: str) -> Settings:
    base = {"GRIDPAY_HOME": str(home), "GRIDPAY_NODE_ID": node_id, "GRIDPAY_HTTP_PORT": "0",
            "GRIDPAY_BANK_PORT": "0", "GRIDPAY_POST_PORT": "0"}
    base.update(env)
    return load_settings(env=base, overrides=overrides)


@contextlib.asynccontextmanager
async def running_node(database_url: str, redis_url: str, sims: Sims, home: Path,
                       node_id: str = "node-a", wait_active: bool = True,
                       overrides: dict[str, Any] | None = None,
                       **env: str) -> AsyncIterator[Node]:
    settings = node_settings(home, node_id, overrides, **env)
    node = Node(settings, ServiceUrls(database=database_url, redis=redis_url,
                                      hsm=sims.hsm_addr, marketing=sims.marketing.url))
    await node.start()
    try:
        if wait_active:
            for _ in range(200):
                if node.is_active:
                    break
                await asyncio.sleep(0.02)
            assert node.is_active, "node did not become active"
        yield node
    finally:
        await node.stop()


async def api_key(pool_or_url: asyncpg.Pool | str, channel: str, name: str = "") -> str:
    """A new client's key (a new client each call, unless `name` is given again)."""
    name = name or f"t-{channel}-{uuid.uuid4().hex[:8]}"
    if isinstance(pool_or_url, str):
        pool = await asyncpg.create_pool(pool_or_url, min_size=1, max_size=1)
        assert pool is not None
        try:
            return (await create_client(pool, name, channel))[1]
        finally:
            await pool.close()
    return (await create_client(pool_or_url, name, channel))[1]


class Api:
    """A tiny HTTP client bound to a node's base URL and one API key."""

    def __init__(self, session: aiohttp.ClientSession, base: str, key: str | None) -> None:
        self.session = session
        self.base = base
        self.key = key

    def headers(self, idem: str | None = None, **extra: str) -> dict[str, str]:
        h = dict(extra)
        if self.key is not None:
            h["Authorization"] = f"Bearer {self.key}"
        if idem is not None:
            h["Idempotency-Key"] = idem
        return h

    async def call(self, method: str, path: str, *, json: Any = None, data: bytes | None = None,
                   idem: str | None = None, headers: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, str], bytes]:
        h = self.headers(idem, **(headers or {}))
        async with self.session.request(method, self.base + path, json=json, data=data,
                                        headers=h) as r:
            return r.status, dict(r.headers), await r.read()


async def active_account(marketing: MarketingSim, *, start: int = 0) -> str:
    """An active account number of the simulator (scanning from `start`)."""
    async with aiohttp.ClientSession() as s:
        async with s.get(marketing.url + "/accounts", params={"limit": "500"}) as r:
            body = await r.json()
    for a in body["accounts"][start:]:
        if a["status"] == "active":
            return str(a["account_no"])
    raise AssertionError("no active account")


async def closed_account(marketing: MarketingSim) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(marketing.url + "/accounts", params={"limit": "1000"}) as r:
            body = await r.json()
    for a in body["accounts"]:
        if a["status"] == "closed":
            return str(a["account_no"])
    raise AssertionError("no closed account")


async def until_a_statement_waits_on_a_lock(pool: asyncpg.Pool, within_s: float = 5.0) -> None:
    """Return once some statement waits on a lock (one a test holds), or fail."""
    for _ in range(int(within_s / 0.02)):
        if await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("no statement waited on the lock")


class LoopTurns:
    """Within `async with`: `count` is how many turns the event loop has given other tasks (a
    task that yields and counts). Code that holds the loop for a long stretch lets it move on
    only at its end."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0)
            self.count += 1

    async def __aenter__(self) -> LoopTurns:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


class StallProxy:
    """A TCP relay to a real server that can stall: while stalled it takes connections and
    bytes but forwards nothing either way, then forwards what it held on `resume` (a server
    process stopped with SIGSTOP, whose kernel still accepts connections, looks like this)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.running = asyncio.Event()
        self.running.set()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def stall(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self.running.wait()
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()
