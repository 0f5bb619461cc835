"""One switch node: the resources it owns, its role in the pair, and its listeners.

Resources are opened in order in an AsyncExitStack and closed in reverse. The HTTP listener is
bound on both nodes of a pair (a standby answers `/readyz` 503 and payment requests 503
`standby`); the ISO 8583 listeners and the store-and-forward relay run only while this node
holds the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from switch import db
from switch.config import Settings
from switch.lease import Lease, Role, session_dsn
from switch.logs import mask_url
from switch.loop import watch_lag
from switch.metrics import Metrics
from switch.redis_pipe import RedisPipe

log = logging.getLogger("gridpay.node")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceUrls:
    database: str
    redis: str
    hsm: str
    marketing: str

    def __repr__(self) -> str:
        return "ServiceUrls(<masked>)"


@dataclass(slots=True)
class Ports:
    http: int = 0
    bank: int | None = None
    post: int | None = None


@dataclass(slots=True)
class Hooks:
    """What a component does when the node's role changes (run in registration order)."""

    on_active: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_standby: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


class Node:
    def __init__(self, settings: Settings, services: ServiceUrls) -> None:
        self.settings = settings
        self.services = services
        self.metrics = Metrics()
        self.started_at = time.time()
        self.ports = Ports()
        self.hooks = Hooks()
        self.pool: asyncpg.Pool
        self.redis: aioredis.Redis
        self.redis_pipe: RedisPipe  # the hot paths' shared, pipelined connection
        self.lease: Lease
        self.components: dict[str, Any] = {}
        self._stack = contextlib.AsyncExitStack()
        self._runner: web.AppRunner | None = None
        self._stopping = False
        self._demotion: asyncio.Task[None] | None = None  # see `fenced`
        self._standby_ran = False  # the standby hooks ran since the last activation

    # -- role -----------------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.lease.role

    @property
    def is_active(self) -> bool:
        return not self._stopping and self.lease.is_active

    @property
    def stopping(self) -> bool:
        """Stopping: it takes no new work, whatever its role was."""
        return self._stopping

    @property
    def epoch(self) -> int:
        return self.lease.epoch

    async def _became_active(self) -> None:
        self._standby_ran = False
        self.metrics.role.set(1)
        self.metrics.epoch.set(self.lease.epoch)
        for hook in self.hooks.on_active:
            try:
                await hook()
            except Exception:
                log.exception("activation hook failed")
                # a node that cannot work gives the lease up for the other one at once
                await self.lease.step_aside("activation failed")
                return

    async def _became_standby(self) -> None:
        # once per activation: stop() runs this itself, and the lease's own loop may find the
        # lease lost meanwhile and demote the node again (the hooks would run twice at once)
        if self._standby_ran:
            return
        self._standby_ran = True
        self.metrics.role.set(0)
        self.metrics.epoch.set(0)  # it holds no epoch now (the gauge showed the old one)
        for hook in self.hooks.on_standby:
            try:
                await hook()
            except Exception:
                log.exception("demotion hook failed")

    async def _finish_requests(self) -> None:
        """Standby hook, run after the links have closed and before the posting path stops:
        the HTTP requests taken while this node was active (a payment, a reversal, an IVR
        turn, a card-centre action) finish, `node.shutdown_grace_s` at most. New ones are
        answered 503 already; a switchover or a stop renews the lease meanwhile, so that what
        they write is committed under this node's epoch instead of being cut off by the node
        taking over."""
        if self._runner is None:
            return
        from switch.web.app import IN_FLIGHT

        in_flight = self._runner.app[IN_FLIGHT]  # the HTTP requests taken as the active node
        if not in_flight:
            return
        grace_s = self.settings.node.shutdown_grace_s
        log.info("waiting for requests in flight", extra={"requests": len(in_flight)})
        left = await in_flight.finished(grace_s)
        if left:
            log.warning("requests still in flight after the grace",
                        extra={"requests": left, "grace_s": grace_s})

    async def fenced(self) -> None:
        """Called by any component whose write was refused for a stale epoch: the node steps
        down. The demotion runs in a task of its own, not the caller's: it stops the very
        components that call this (a group committer, the relay, a card job), and a caller
        that waited for it would wait on its own stopping (a committer held the posting path's
        stop for its whole 10 s drain, with the relay still running behind it)."""
        if self._stopping:
            return  # stop() demotes the node itself, and must not be outlived by a demotion
        if self._demotion is None or self._demotion.done():
            self._demotion = asyncio.get_running_loop().create_task(
                self.lease.demote("write fenced by the database"), name="demotion")

    # -- life -----------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        st = self._stack
        # Migrations first, on one connection, under the advisory lock.
        try:
            conn = await asyncpg.connect(self.services.database)
        except OSError as e:  # one line at the command: which service, and why
            raise ConnectionError(f"the database cannot be reached: {e}") from e
        try:
            await db.migrate(conn)
        finally:
            await conn.close()
        # sessions named after the node, so that a node taking an expired lease can cut off
        # the sessions of a holder that was paused in the middle of a fenced write
        self.pool = await db.create_pool(session_dsn(self.services.database, s.node.id),
                                         min_size=s.services.db_pool_min,
                                         max_size=s.services.db_pool_max,
                                         server_settings=db.local_time(s.business.timezone))
        st.push_async_callback(self.pool.close)
        self.redis = aioredis.from_url(self.services.redis, decode_responses=False,
                                       socket_timeout=2.0, socket_connect_timeout=2.0,
                                       health_check_interval=10)
        st.push_async_callback(self.redis.aclose)
        self.redis_pipe = RedisPipe(self.services.redis, timeout_s=2.0, connect_timeout_s=2.0)
        st.push_async_callback(self.redis_pipe.aclose)

        # before the components' hooks: the posting path stops after the requests that feed
        # it (the links' hook goes first of all, see `switch.links.install`)
        self.hooks.on_standby.append(self._finish_requests)

        from switch.components import install_components

        await install_components(self, st)

        from switch.standby import on_takeover

        async def took_over() -> None:
            await on_takeover(self)

        self.hooks.on_active.append(took_over)

        # The lease has connections of its own: a burst of work that takes every connection of
        # the main pool must not make this node miss its renewals and demote itself.
        lease_pool = await db.create_pool(session_dsn(self.services.database, s.node.id),
                                          min_size=1, max_size=2)
        st.push_async_callback(lease_pool.close)
        self.lease = Lease(lease_pool, s.node.id, ttl_s=s.lease.ttl_s, renew_s=s.lease.renew_s,
                           on_active=self._became_active, on_standby=self._became_standby)

        from switch.web.app import ProblemRunner, build_app

        app = build_app(self)
        self._runner = ProblemRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=s.node.shutdown_grace_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.listen.host, s.listen.http_port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.ports.http = int(sockets[0].getsockname()[1]) if sockets else s.listen.http_port
        await self.lease.start()

        from switch.standby import keep_warm

        warm = asyncio.create_task(keep_warm(self), name="keep-warm")
        st.callback(warm.cancel)
        lag = asyncio.create_task(watch_lag(self.metrics.loop_lag.observe), name="loop-lag")
        st.callback(lag.cancel)

    def ready_line(self) -> dict[str, Any]:
        return {
            "node_id": self.settings.node.id,
            "role": "active" if self.role is Role.ACTIVE else "standby",
            "epoch": self.lease.epoch,
            "ports": {"http": self.ports.http, "bank": self.ports.bank, "post": self.ports.post},
            "home": str(self.settings.node.home),
            # printed for operators and supervisors: a password in a URL is not
            "services": {"database": mask_url(self.services.database),
                         "redis": mask_url(self.services.redis),
                         "hsm": self.services.hsm, "marketing": mask_url(self.services.marketing)},
        }

    async def stop(self) -> None:
        """Stop taking new work, finish what is in flight (bounded) while the lease is still
        renewed, then release the lease and close.

        The renewals go on until the drain is over: stopped first, the lease expired under
        work still in flight (a reversal waiting on a row lock), and the standby took it by
        cutting off this node's sessions, the work rolled back. They still end at once if
        another node has the lease (the node is demoted; its writes are fenced anyway)."""
        if self._stopping:
            return
        self._stopping = True  # new requests are answered 503 from here
        # no lease taken and no switchover begun from here; an activation under way finishes
        # first (and is undone below), and so does a switchover under way
        await self.lease.retire(self.settings.node.shutdown_grace_s)
        if self._demotion is not None:
            with contextlib.suppress(Exception):
                await self._demotion
        if self.role is Role.ACTIVE:
            # closes listeners, lets requests in flight finish, drains the posting path,
            # stops relays
            await self._became_standby()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.lease.stop()
        await self._stack.aclose()
        log.info("node stopped", extra={"node_id": self.settings.node.id})
