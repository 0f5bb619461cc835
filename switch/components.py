"""Wiring: the components of a node, opened in order and closed in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import asyncpg

from switch import db
from switch.business import BusinessCalendar
from switch.clients import ClientDirectory
from switch.hsm_client import HsmClient, HsmError
from switch.keys import KeyRing, load_dev_keys, provision_dev_keys
from switch.lease import session_dsn
from switch.marketing_client import MarketingClient
from switch.payments.accounts import Accounts
from switch.payments.forwarder import RELAY_SERVER_SETTINGS, Forwarder, queue_counts
from switch.payments.idempotency import IdempotencyCache
from switch.payments.ledger import PostingPath

if TYPE_CHECKING:
    from switch.node import Node

log = logging.getLogger("gridpay.components")

KEYS_LOCK = 0x6B657973  # "keys"


class KeyStore:
    """The node's key blocks: loaded from the database, or provisioned once through the HSM."""

    def __init__(self, pool: asyncpg.Pool, hsm: HsmClient,
                 components: dict[str, object]) -> None:
        self.pool = pool
        self.hsm = hsm
        self.ring: KeyRing | None = None
        self._components = components

    async def ensure(self) -> KeyRing:
        if self.ring is not None:
            return self.ring
        async with self.pool.acquire() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", KEYS_LOCK)
            rows = await con.fetch("SELECT name, key_block, kcv FROM key_blocks ORDER BY name")
            if rows:
                ring = KeyRing.from_rows((r["name"], r["key_block"], r["kcv"]) for r in rows)
            else:
                ring = await provision_dev_keys(self.hsm, load_dev_keys())
                await con.executemany(
                    "INSERT INTO key_blocks (name, key_block, kcv) VALUES ($1, $2, $3)",
                    ring.as_rows())
                log.info("dev keys provisioned through the HSM", extra={"keys": ring.names()})
        self.ring = ring
        self._components["keyring"] = ring
        return ring

    async def keep_trying(self) -> None:
        delay = 0.5
        while self.ring is None:
            try:
                await self.ensure()
            except (HsmError, OSError) as e:
                log.warning("key blocks not available yet (HSM unreachable); retrying",
                            extra={"error": type(e).__name__})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)


async def install_components(node: Node, stack: contextlib.AsyncExitStack) -> None:
    """Open every component of the node; each registers its role hooks on `node.hooks`."""
    s = node.settings
    comps = node.components
    cal = BusinessCalendar(s.business.timezone, s.business.cutover)
    comps["calendar"] = cal

    host, _, port = node.services.hsm.rpartition(":")
    hsm = HsmClient(host, int(port), pool_size=2, timeout=2.0, registry=node.metrics.registry)
    await hsm.start()
    stack.push_async_callback(hsm.close)
    comps["hsm"] = hsm
    keys = KeyStore(node.pool, hsm, comps)
    comps["keys"] = keys
    try:
        await keys.ensure()
    except (HsmError, OSError):
        task = asyncio.create_task(keys.keep_trying(), name="keys")
        stack.callback(task.cancel)

    marketing = MarketingClient(node.services.marketing, timeout=s.services.marketing_timeout_s,
                                posting_timeout=s.forwarder.timeout_s,
                                connections=s.forwarder.concurrency,
                                pipeline=s.forwarder.pipeline)
    stack.push_async_callback(marketing.close)
    comps["marketing"] = marketing
    accounts = Accounts(node.pool, marketing)
    comps["accounts"] = accounts
    clients = ClientDirectory(node.pool)
    clients.listen(session_dsn(node.services.database, s.node.id))
    stack.push_async_callback(clients.close)
    comps["clients"] = clients

    def epoch() -> int:
        return node.epoch

    # the relay's reads and marks go over connections of their own (see RELAY_SERVER_SETTINGS)
    relay_pool = await db.create_pool(session_dsn(node.services.database, s.node.id),
                                      min_size=0, max_size=3,
                                      server_settings=dict(RELAY_SERVER_SETTINGS),
                                      reset_on_release=True)  # the relay's stop cancels
    stack.push_async_callback(relay_pool.close)
    forwarder = Forwarder(relay_pool, marketing, s.forwarder, node.metrics, epoch,
                          timezone=s.business.timezone, on_fenced=node.fenced)
    comps["forwarder"] = forwarder
    # each payment recorded, whatever its channel, comes off the account's cached arrears
    ledger = PostingPath(node.pool, cal, node.metrics, epoch, on_fenced=node.fenced,
                         on_committed=forwarder.wake, on_paid=accounts.paid)
    comps["ledger"] = ledger
    idem = IdempotencyCache(node.redis_pipe, ttl_s=s.business.idempotency_ttl_h * 3600)
    comps["idempotency"] = idem

    from switch.web.payments import HttpPayments
    from switch.web.payments import register as register_payments

    comps["http_payments"] = HttpPayments(accounts=accounts, ledger=ledger,
                                          idempotency=idem, max_amount=s.business.max_amount)
    routes = comps.setdefault("routes", [])
    routes.append(register_payments)

    from switch.cards.api import register as register_cards
    from switch.cards.jobs import JobRunner, fail_interrupted
    from switch.cards.openapi import ADMIN_OPENAPI_PATHS
    from switch.cards.states import sweep_expired

    # the card centre's background jobs run only while this node is active: a node that loses
    # the lease stops its jobs (they are marked failed) instead of writing on beside the new one
    card_jobs = JobRunner(node.pool, on_fenced=node.fenced)
    comps["card_jobs"] = card_jobs
    routes.append(register_cards)
    comps.setdefault("openapi_paths", []).append({"paths": ADMIN_OPENAPI_PATHS})
    sweeper: list[asyncio.Task[None]] = []

    async def sweep_loop() -> None:
        while True:
            try:
                n = await sweep_expired(node.pool)
                if n:
                    log.info("cards expired", extra={"cards": n})
            except Exception as e:
                log.warning("expiry sweep failed", extra={"error": type(e).__name__})
            await asyncio.sleep(3600)

    from switch.payments.daily import DailyCutover

    # the daily close reads whole days of postings: its own client, with a timeout for that
    # (the relay's is for one posting)
    recon_client = MarketingClient.for_reconciliation(node.services.marketing)
    stack.push_async_callback(recon_client.close)
    daily = DailyCutover(node, cal, recon_client)
    comps["daily"] = daily

    async def active() -> None:
        ledger.start()
        forwarder.start()
        accounts.start_sync()
        # jobs of a node that died cannot resume by themselves (this node's own, begun since
        # it became active, are left alone)
        try:
            await fail_interrupted(node.pool, card_jobs.running(), epoch=node.epoch)
        except Exception as e:
            if not db.is_fenced(e):
                raise
            await node.fenced()  # the lease moved on already: this node steps down
            return
        sweeper.append(asyncio.create_task(sweep_loop(), name="card-expiry"))
        daily.start()

    async def standby() -> None:
        await card_jobs.close()
        await daily.stop()
        await ledger.stop()
        await forwarder.stop()
        await accounts.stop_sync()
        while sweeper:
            t = sweeper.pop()
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t

    node.hooks.on_active.append(active)
    node.hooks.on_standby.append(standby)

    async def refresh_metrics() -> None:
        """The queue's gauges, read for a scrape; when the database does not answer in time,
        the scrape still gets every other metric (and the gauges as last read)."""
        try:
            # on the relay's pool: its connections are reset when they come back, so a count
            # cut short by the time limit leaves nothing open for the next statement
            async with asyncio.timeout(2.0):  # a connection to wait for included
                pending, dead = await queue_counts(relay_pool)
        except Exception as e:
            log.warning("outbox counts not read for a metrics scrape; the gauges keep their "
                        "last values", extra={"error": type(e).__name__})
            return
        node.metrics.outbox_pending.set(pending)
        node.metrics.outbox_dead.set(dead)

    comps["metrics_refresh"] = refresh_metrics

    # the channels that have their own listeners and routes
    from switch.ivr.install import install as install_ivr
    from switch.links.install import install as install_links

    await install_links(node, stack)
    await install_ivr(node, stack)
