"""The standby pair in-process: switchover, fencing of a stale writer, cutting off a paused
holder, abandoned claims, the replicated database (RPO 0)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from switch.lease import Lease, Role, application_name, session_dsn
from switch.node import Node
from switch.replication import ReplicatedPostgres
from switch.standby import (
    SwitchoverRefused,
    SwitchoverTimeout,
    TakeoverClock,
    drop_abandoned_claims,
    lease_state,
    switchover,
)
from tests.nodekit import Api, Sims, active_account, api_key, running_node

TTL_S, RENEW_S = "1.0", "0.2"  # a fast lease for these tests


async def _wait(cond: object, within_s: float, what: str) -> None:
    assert callable(cond)
    for _ in range(int(within_s / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {within_s}s: {what}")


def _pay(acct: str, amount: int) -> dict[str, object]:
    return {"account_no": acct, "amount": amount, "method": "cash"}


def test_session_dsn_keeps_hosts_and_names_the_node() -> None:
    url = "postgresql://u@h1:5432,h2:5433/gridpay?target_session_attrs=read-write"
    out = session_dsn(url, "node-b")
    assert out.startswith("postgresql://u@h1:5432,h2:5433/gridpay?")
    assert "target_session_attrs=read-write" in out and "application_name=gridpay%3Anode-b" in out
    assert session_dsn(out, "node-c").count("application_name") == 1


async def test_session_dsn_names_the_session(clean_db: str) -> None:
    con = await asyncpg.connect(session_dsn(clean_db, "node-x"))
    try:
        assert await con.fetchval("SHOW application_name") == application_name("node-x")
    finally:
        await con.close()


def test_takeover_clock_counts_only_the_other_node() -> None:
    clock = TakeoverClock()
    clock.approved("node-b", at=1.0)  # before any fault: ignored
    clock.mark("node-a", at=10.0)
    clock.approved("node-a", at=10.5)  # the failed node itself: ignored
    assert clock.seconds is None
    clock.approved("node-b", at=12.25)
    clock.approved("node-b", at=13.0)
    assert clock.seconds == pytest.approx(2.25) and clock.first_approval_by == "node-b"
    clock.mark("", at=20.0, only_new=True)  # a shared service failed: any node counts...
    clock.approved("node-a", at=20.1, started=19.9)  # ... but not what was already in flight
    clock.approved("node-a", at=21.0, started=20.2)
    assert clock.seconds == pytest.approx(1.0)


@contextlib.asynccontextmanager
async def active_and_standby(clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path,
                             **env: str) -> AsyncIterator[tuple[Node, Node]]:
    """node-a active (its account mirror synced) and node-b its standby, with settings `env`."""
    # (wait_active and overrides given in place, so that `env` holds settings only)
    async with running_node(clean_db, clean_redis, sims, tmp_path / "a", "node-a", True, None,
                            **env) as a, \
            running_node(clean_db, clean_redis, sims, tmp_path / "b", "node-b", False, None,
                         **env) as b:
        await asyncio.wait_for(a.components["accounts"].synced.wait(), 20)
        assert a.is_active and b.role is Role.STANDBY
        yield a, b


async def test_switchover_loses_nothing(clean_db: str, clean_redis: str, sims: Sims,
                                        tmp_path: Path) -> None:
    async with active_and_standby(clean_db, clean_redis, sims, tmp_path) as (a, b):
        epoch = a.epoch
        key = await api_key(a.pool, "internet")
        acct = await active_account(sims.marketing)
        urls = {"node-a": f"http://127.0.0.1:{a.ports.http}",
                "node-b": f"http://127.0.0.1:{b.ports.http}"}
        approved: dict[str, bytes] = {}
        async with aiohttp.ClientSession() as s:
            apis = {n: Api(s, u, key) for n, u in urls.items()}

            async def client(i: int) -> None:
                # a client with both addresses: retries the same key on the other node
                idem = f"sw-{i}"
                for _ in range(200):
                    for api in apis.values():
                        st, _, body = await api.call("POST", "/v1/payments", idem=idem,
                                                     json=_pay(acct, 100 + i))
                        if st == 201:
                            approved[idem] = body
                            return
                        assert st in (503, 409), (st, body)
                    await asyncio.sleep(0.02)
                raise AssertionError(f"{idem} never approved")

            async def stream() -> None:
                await asyncio.gather(*(client(i) for i in range(60)))

            load = asyncio.create_task(stream())
            await asyncio.sleep(0.05)
            result = await switchover(clean_db, "node-b", timeout_s=10)
            await asyncio.wait_for(load, 30)
            assert result.from_node == "node-a" and result.to_node == "node-b"
            assert result.to_epoch == epoch + 1 and result.seconds < 3
            await _wait(lambda: b.is_active, 5, "node-b active")
            assert a.role is Role.STANDBY and not a.is_active
            # the gauges say which node holds the lease, under which epoch: the old node none
            gauge = {n: (node.metrics.registry.get_sample_value("gridpay_node_active"),
                         node.metrics.registry.get_sample_value("gridpay_lease_epoch"))
                     for n, node in (("a", a), ("b", b))}
            assert gauge == {"a": (0, 0), "b": (1, epoch + 1)}
            # every approved payment is in the ledger once, and a retry on the new node of a
            # key approved by the old one gets the original answer, byte for byte
            rows = await b.pool.fetch("SELECT dedup_key FROM payments")
            assert len(rows) == len(approved) == 60
            await b.redis.flushdb()
            st, h, body = await apis["node-b"].call("POST", "/v1/payments", idem="sw-0",
                                                    json=_pay(acct, 100))
            assert st == 201 and body == approved["sw-0"]
            assert h.get("Idempotent-Replayed") == "true"
            # the old node answers 503 standby
            st, _, body = await apis["node-a"].call("POST", "/v1/payments", idem="late",
                                                    json=_pay(acct, 5))
            assert st == 503 and orjson.loads(body)["code"] == "standby"
        with pytest.raises(SwitchoverRefused):
            await switchover(clean_db, "node-b", timeout_s=2)  # it already holds the lease


async def _until_the_node_waits_on_a_lock(con: asyncpg.Connection, node_id: str) -> None:
    for _ in range(250):
        if await con.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type ="
                              " 'Lock' AND application_name = $1", application_name(node_id)):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no statement of {node_id} waited on the lock")


@pytest.mark.parametrize("how", ["switchover", "stop"])
async def test_a_write_in_flight_finishes_before_the_lease_moves(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path, how: str) -> None:
    """A switchover or a stop lets a fenced write in flight on the old node finish under its
    epoch, even one that takes longer than the lease's ttl (a reversal waiting 1.5 s on a row
    lock, ttl 1 s): the old node keeps its lease renewed until the request is answered, then
    the other node takes it. (The lease used to be handed over at once, or to expire during
    the stop: the standby cut the old node's sessions off, and the reversal, rolled back, was
    answered 503.)"""
    async with active_and_standby(clean_db, clean_redis, sims, tmp_path,
                                  GRIDPAY_LEASE_TTL_S=TTL_S,
                                  GRIDPAY_LEASE_RENEW_S=RENEW_S) as (a, b):
        epoch = a.epoch
        key = await api_key(a.pool, "internet")
        acct = await active_account(sims.marketing)
        async with aiohttp.ClientSession() as s:
            api = Api(s, f"http://127.0.0.1:{a.ports.http}", key)
            st, _, body = await api.call("POST", "/v1/payments", idem="p1",
                                         json=_pay(acct, 1234))
            assert st == 201, body
            pid = uuid.UUID(orjson.loads(body)["payment_id"])
            blocker = await asyncpg.connect(clean_db)
            try:
                async with blocker.transaction():  # something else holds the payment's row
                    await blocker.execute("SELECT 1 FROM payments WHERE id = $1 FOR UPDATE",
                                          pid)
                    reversal = asyncio.ensure_future(
                        api.call("POST", f"/v1/payments/{pid}/reversal", idem="r1"))
                    # inside its fenced transaction, waiting on the row
                    await _until_the_node_waits_on_a_lock(blocker, "node-a")
                    moving = asyncio.ensure_future(
                        switchover(clean_db, "node-b", timeout_s=10) if how == "switchover"
                        else a.stop())
                    await asyncio.sleep(1.5)  # longer than the lease's ttl
                    assert not b.is_active  # the lease is still node-a's
                    assert not reversal.done()
            finally:
                await blocker.close()
            st, _, body = await asyncio.wait_for(reversal, 15)
            assert st == 200, body
            assert orjson.loads(body)["status"] == "reversed"
            await asyncio.wait_for(moving, 15)
        await _wait(lambda: b.is_active, 5, "node-b takes over")
        assert b.epoch == epoch + 1 and not a.is_active
        booked = await b.pool.fetchval("SELECT epoch FROM reversals WHERE payment_id = $1", pid)
        assert booked == epoch  # recorded, by node-a, under its epoch
        assert await b.pool.fetchval("SELECT reversed_at IS NOT NULL FROM payments"
                                     " WHERE id = $1", pid)


async def test_switchover_with_nobody_holding_is_refused(clean_db: str) -> None:
    with pytest.raises(SwitchoverRefused):
        await switchover(clean_db, None, timeout_s=1)


async def test_stale_writer_is_fenced_and_demotes(clean_db: str, clean_redis: str, sims: Sims,
                                                  tmp_path: Path) -> None:
    """A node whose lease loop hung and whose clock lies still believes it is active: the
    database refuses its write, it answers 503 and demotes itself at once."""
    async with running_node(clean_db, clean_redis, sims, tmp_path / "a", "node-a",
                            GRIDPAY_LEASE_TTL_S=TTL_S, GRIDPAY_LEASE_RENEW_S=RENEW_S) as a:
        await asyncio.wait_for(a.components["accounts"].synced.wait(), 20)
        key = await api_key(a.pool, "internet")
        acct = await active_account(sims.marketing)
        task = a.lease._task
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        a.lease._valid_until = time.monotonic() + 3600  # the lying clock
        async with running_node(clean_db, clean_redis, sims, tmp_path / "b", "node-b",
                                wait_active=False, GRIDPAY_LEASE_TTL_S=TTL_S,
                                GRIDPAY_LEASE_RENEW_S=RENEW_S) as b:
            await _wait(lambda: b.is_active, 5, "node-b takes the expired lease")
            assert a.is_active  # it still believes it
            async with aiohttp.ClientSession() as s:
                api = Api(s, f"http://127.0.0.1:{a.ports.http}", key)
                st, _, body = await api.call("POST", "/v1/payments", idem="stale",
                                             json=_pay(acct, 700))
                assert st == 503 and orjson.loads(body)["code"] == "standby"
            assert a.role is Role.STANDBY and not a.is_active
            # and it stops its posting path and relay at once (the demotion must not run in
            # the fenced committer, which it has to stop: that held it for the 10 s drain)
            ledger, relay = a.components["ledger"], a.components["forwarder"]
            await _wait(lambda: not ledger._tasks and relay._task is None, 3,
                        "the stale node stops its committers and its relay")
            assert await b.pool.fetchval("SELECT count(*) FROM payments") == 0
            assert await b.pool.fetchval("SELECT epoch FROM node_lease") == b.epoch > a.epoch


async def test_a_lease_lost_while_the_node_stops_runs_the_standby_hooks_once(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    calls: list[str] = []
    async with running_node(clean_db, clean_redis, sims, tmp_path / "a", "node-a",
                            GRIDPAY_LEASE_TTL_S=TTL_S, GRIDPAY_LEASE_RENEW_S=RENEW_S) as a:
        async def slow_hook() -> None:  # stands in for the posting path's drain
            calls.append("standby hook")
            await asyncio.sleep(1.0)

        a.hooks.on_standby.insert(0, slow_hook)
        stopping = asyncio.create_task(a.stop())
        await asyncio.sleep(0.1)
        # another node takes the lease meanwhile (what makes a write fenced): the lease's own
        # loop finds it lost, and a committer's write is refused
        await a.pool.execute("UPDATE node_lease SET holder = 'node-x', epoch = epoch + 1,"
                             " expires_at = now() + interval '1 hour' WHERE id = 1")
        await a.fenced()
        await stopping
        # stop() demoted the node once, and nothing of it runs on after stop() returned
        assert calls == ["standby hook"]
        assert a._demotion is None or a._demotion.done()


async def test_a_node_stopped_while_it_takes_over_leaves_no_listener_open(
        clean_db: str, clean_redis: str, sims: Sims, tmp_path: Path) -> None:
    async with running_node(clean_db, clean_redis, sims, tmp_path / "a", "node-a",
                            GRIDPAY_LEASE_TTL_S=TTL_S, GRIDPAY_LEASE_RENEW_S=RENEW_S) as a:
        async with running_node(clean_db, clean_redis, sims, tmp_path / "b", "node-b",
                                wait_active=False, GRIDPAY_LEASE_TTL_S=TTL_S,
                                GRIDPAY_LEASE_RENEW_S=RENEW_S) as b:
            assert b.role is Role.STANDBY

            async def slow_activation() -> None:  # before the links open
                await asyncio.sleep(0.2)

            async def slow_demotion() -> None:  # after the links close
                await asyncio.sleep(0.5)

            b.hooks.on_active.insert(0, slow_activation)
            b.hooks.on_standby.append(slow_demotion)
            await a.stop()
            # the role is active before its hooks have run: node-b is stopped mid-activation
            await _wait(lambda: b.is_active, 5, "node-b takes over")
        links = b.components["links"]
        left_open = [name for name, listener in links.items() if listener.server is not None]
        for name in left_open:
            await links[name].stop(0)
        # the activation finished before the node stood down, so its listeners were closed
        # too (they used to open after the demotion had closed them, and stay open)
        assert left_open == []


async def test_paused_holder_mid_write_is_cut_off(clean_db: str, clean_redis: str, sims: Sims,
                                                  tmp_path: Path) -> None:
    """The holder froze inside a fenced transaction (share lock on the lease row): the node
    taking the expired lease cuts off the frozen node's sessions instead of waiting for ever."""
    async with running_node(clean_db, clean_redis, sims, tmp_path / "a", "node-a",
                            GRIDPAY_LEASE_TTL_S=TTL_S, GRIDPAY_LEASE_RENEW_S=RENEW_S) as a:
        task = a.lease._task
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        con = await a.pool.acquire()
        tx = con.transaction()
        await tx.start()
        await con.execute("SELECT gridpay_fence($1)", a.epoch)  # ... and freezes here
        try:
            started = time.monotonic()
            async with running_node(clean_db, clean_redis, sims, tmp_path / "b", "node-b",
                                    wait_active=False, GRIDPAY_LEASE_TTL_S=TTL_S,
                                    GRIDPAY_LEASE_RENEW_S=RENEW_S) as b:
                await _wait(lambda: b.is_active, 6, "node-b takes over")
                assert time.monotonic() - started < 4
                with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                    await con.execute("SELECT 1")  # the frozen session was terminated
        finally:
            with contextlib.suppress(Exception):
                await tx.rollback()
            with contextlib.suppress(Exception):
                await a.pool.release(con)


async def test_abandoned_claims_are_dropped_answers_kept(clean_redis: str) -> None:
    r = aioredis.from_url(clean_redis)
    try:
        await r.hset("gp:idem:a", mapping={"state": "inflight", "hash": "x"})
        await r.hset("gp:idem:b", mapping={"state": "done", "hash": "x", "status": 201,
                                           "body": b"{}"})
        await r.set("other:key", "v")
        for i in range(1200):
            await r.hset(f"gp:idem:n{i}", mapping={"state": "inflight" if i % 3 else "done"})
        n = await drop_abandoned_claims(r, "gp:idem:", batch=100)
        assert n == 1 + 800
        assert await r.exists("gp:idem:a") == 0 and await r.exists("gp:idem:b") == 1
        assert await r.exists("other:key") == 1 and await r.exists("gp:idem:n0") == 1
    finally:
        await r.aclose()


async def test_lease_state_after_takeover_grows(clean_db: str, clean_redis: str, sims: Sims,
                                                tmp_path: Path) -> None:
    """A stopped active node releases the lease: the standby takes the next epoch at once."""
    async with running_node(clean_db, clean_redis, sims, tmp_path / "b", "node-b",
                            wait_active=False) as b:
        first: Node | None = None
        async with running_node(clean_db, clean_redis, sims, tmp_path / "a", "node-a",
                                wait_active=False) as a:
            first = a if a.is_active else b
            epoch = first.epoch
        assert first is not None
        await _wait(lambda: b.is_active, 3, "node-b active after node-a stopped")
        con = await asyncpg.connect(clean_db)
        try:
            st = await lease_state(con)
        finally:
            await con.close()
        assert st.holder == "node-b" and st.epoch >= epoch + (0 if first is b else 1)


def test_replicated_postgres_loses_no_commit(tmp_path: Path) -> None:
    """RPO 0: every commit acknowledged by the primary is on the promoted standby."""
    rp = ReplicatedPostgres(tmp_path / "pg")
    rp.start()
    try:
        assert rp.status().sync_state == "sync"

        async def write_then_fail_over() -> tuple[int, int, int]:
            con = await asyncpg.connect(rp.url)
            await con.execute("CREATE TABLE acked (id uuid PRIMARY KEY)")
            acked = 0
            some = asyncio.Event()

            async def writer() -> None:
                nonlocal acked
                while True:
                    await con.execute("INSERT INTO acked VALUES ($1)", uuid.uuid4())
                    acked += 1
                    if acked == 20:
                        some.set()

            w = asyncio.create_task(writer())
            # a loaded machine commits slowly: wait for some commits, not for a fixed time
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(some.wait(), 20)
            rp.kill_primary()  # mid-stream: the writer's next commit fails
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w, 5)
            w.cancel()
            with contextlib.suppress(BaseException):
                await w
            rp.promote_standby()
            con2 = await asyncpg.connect(rp.url)  # the same URL finds the new primary
            try:
                n = int(await con2.fetchval("SELECT count(*) FROM acked"))
                port = int(await con2.fetchval("SHOW port"))
                await con2.execute("INSERT INTO acked VALUES ($1)", uuid.uuid4())
            finally:
                await con2.close()
            return acked, n, port

        acked, present, port = asyncio.run(write_then_fail_over())
        assert acked >= 20 and present >= acked and present <= acked + 1
        assert port == rp.primary.port
    finally:
        rp.stop()


async def test_a_demoted_node_stops_its_card_jobs(node: Node) -> None:
    """A node that loses the active role must not keep writing through a card-centre job
    beside the node that took over: its jobs are stopped and marked failed."""
    from switch.cards import jobs

    runner = node.components["card_jobs"]
    started = asyncio.Event()

    async def endless(progress: jobs.Progress) -> dict[str, object]:
        started.set()
        while True:
            progress.done += 1
            await asyncio.sleep(0.01)

    job_id = await jobs.create_job(node.pool, "test.endless", total=10**9, actor="test")
    runner.start(job_id, 10**9, endless)
    await asyncio.wait_for(started.wait(), 5)
    await node.lease.demote("test: the lease was lost")
    job = await jobs.get_job(node.pool, job_id)
    assert job["state"] == "failed", job
    assert "lost the active role" in str(job["error"])


async def _nothing() -> None:
    pass


async def _lease_pair(url: str, *, ttl_s: float, a_active: Callable[[], Awaitable[None]] = _nothing,
                      a_standby: Callable[[], Awaitable[None]] = _nothing
                      ) -> tuple[Lease, Lease, list[asyncpg.Pool]]:
    """node-a and node-b's leases (not started: a test's hooks may name them first)."""
    from switch import db as gdb

    pools = [await gdb.create_pool(session_dsn(url, n), min_size=1, max_size=2)
             for n in ("node-a", "node-b")]
    a = Lease(pools[0], "node-a", ttl_s=ttl_s, renew_s=0.2, on_active=a_active,
              on_standby=a_standby)
    b = Lease(pools[1], "node-b", ttl_s=ttl_s, renew_s=0.2, on_active=_nothing,
              on_standby=_nothing)
    return a, b, pools


async def _stop_pair(a: Lease, b: Lease, pools: list[asyncpg.Pool]) -> None:
    for lease in (a, b):
        await lease.stop()
    for p in pools:
        await p.close()


async def test_a_switchover_whose_drain_outlasts_the_ttl_keeps_the_lease_until_it_is_over(
        clean_db: str) -> None:
    seen: dict[str, bool] = {}

    async def slow_drain() -> None:  # in-flight work finishing for longer than the ttl
        for _ in range(80):
            await asyncio.sleep(0.02)
            seen["a_active_again"] = seen.get("a_active_again", False) or a.is_active
            seen["b_active"] = seen.get("b_active", False) or b.is_active
        seen["drained"] = True

    a, b, pools = await _lease_pair(clean_db, ttl_s=1.0, a_standby=slow_drain)
    await a.start()
    await b.start()
    try:
        result = await switchover(clean_db, None, timeout_s=5)
        assert (result.from_node, result.to_node) == ("node-a", "node-b")
        assert seen.get("drained") and result.seconds > 1.6
        # node-a renewed the lease while it drained: node-b took it only after, and node-a
        # took no more work meanwhile
        assert not seen["b_active"] and not seen["a_active_again"]
        await asyncio.sleep(1.0)
        assert b.is_active and not a.is_active
    finally:
        await _stop_pair(a, b, pools)


async def test_a_switchover_drain_stops_renewing_once_another_node_has_the_lease(
        clean_db: str) -> None:
    taken_at: list[float] = []

    async def taken_meanwhile() -> None:  # the lease moves on while node-a drains
        await asyncio.sleep(0.1)
        await pools[1].execute("UPDATE node_lease SET holder = 'node-x', epoch = epoch + 1,"
                               " expires_at = now() + interval '1 second' WHERE id = 1")
        taken_at.append(time.monotonic())
        await asyncio.sleep(1.5)  # seven renewal periods of node-a's drain

    a, b, pools = await _lease_pair(clean_db, ttl_s=1.0, a_standby=taken_meanwhile)
    renewals: list[float] = []  # when node-a asked to renew (the real statement runs)
    renew = a._renew

    async def counted() -> asyncpg.Record | None:
        renewals.append(time.monotonic())
        return await renew()

    a._renew = counted  # type: ignore[method-assign]
    await a.start()
    try:
        assert a.is_active
        epoch = a.epoch
        assert await a.handover() is False  # lost, not handed over
        assert a.role is Role.STANDBY and not a.is_active
        # one renewal after the lease moved on found it taken, and the drain asked no more
        assert len([t for t in renewals if t > taken_at[0]]) == 1, (renewals, taken_at)
        # it renewed nothing of node-x's, and went back to being a standby that takes an
        # expired lease (epoch + 2, once node-x's has expired)
        await _wait(lambda: a.is_active, 3, "node-a takes the expired lease again")
        assert a.epoch == epoch + 2
    finally:
        await _stop_pair(a, b, pools)


async def test_a_node_that_cannot_activate_gives_the_lease_to_the_other_at_once(
        clean_db: str) -> None:
    failed: list[float] = []

    async def cannot_work() -> None:  # as Node does when an activation hook fails
        failed.append(time.monotonic())
        await a.step_aside("activation failed")

    a, b, pools = await _lease_pair(clean_db, ttl_s=2.0, a_active=cannot_work)
    await a.start()
    await b.start()
    try:
        for _ in range(100):
            if b.is_active:
                break
            await asyncio.sleep(0.02)
        assert b.is_active and failed
        assert time.monotonic() - failed[0] < 1.0  # not a whole ttl with nobody active
        await asyncio.sleep(1.0)
        assert b.is_active and len(failed) == 1  # and the broken node did not take it back
    finally:
        await _stop_pair(a, b, pools)


async def test_a_switchover_to_a_node_that_never_comes_leaves_no_gap_of_a_ttl(
        clean_db: str) -> None:
    a, b, pools = await _lease_pair(clean_db, ttl_s=2.0)
    await a.start()
    await b.start()
    try:
        with pytest.raises(SwitchoverTimeout, match=r"node-ghost did not take the lease within "
                                                    r"1.5s; node-[ab] holds it \(epoch \d+\)"):
            await switchover(clean_db, "node-ghost", timeout_s=1.5)
        # the lease was handed to nobody that exists: a node took it back well within a ttl
        assert a.is_active or b.is_active
    finally:
        await _stop_pair(a, b, pools)


async def test_the_lease_lasts_its_ttl_and_a_named_node_gets_a_quarter_ttl_first(
        clean_db: str) -> None:
    """The ttl is seconds with a fraction: a lease taken lasts exactly it, and a lease handed
    to a named node is that node's alone for a quarter of it."""
    from switch import db as gdb

    pool = await gdb.create_pool(session_dsn(clean_db, "node-c"), min_size=1, max_size=2)
    try:
        c = Lease(pool, "node-c", ttl_s=4.5, renew_s=0.2, on_active=_nothing,
                  on_standby=_nothing)
        assert await c._acquire() is not None
        lasts = await pool.fetchval("SELECT expires_at - updated_at FROM node_lease")
        assert lasts.total_seconds() == 4.5
        # node-a hands the lease to node-b (as its drained switchover writes it)
        await pool.execute("UPDATE node_lease SET holder = 'node-a', handover_to = 'node-b',"
                           " expires_at = now()")
        assert await c._acquire() is None  # node-b's turn, for a quarter ttl (1.125 s)
        await asyncio.sleep(1.125 + 0.1)
        assert await c._acquire() is not None  # node-b never came: anyone may
    finally:
        await pool.close()


def test_operator_commands_answer_in_one_line_when_the_database_is_unreachable() -> None:
    import subprocess
    import sys

    def gridpay(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "switch.cli", *args], capture_output=True,
                              text=True, timeout=60)

    nowhere = "postgresql://postgres@127.0.0.1:9/gridpay"
    for out in (gridpay("switchover", "--database-url", nowhere, "--timeout", "2"),
                gridpay("switchover", "--database-url", nowhere, "--timeout", "-1")):
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("gridpay switchover:")
