"""The scenarios of `python -m bench`: each starts the system, measures it and its baseline in
the same run, checks the books, and returns a report (a JSON-able dict)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.baseline import pgbench
from bench.books import check_books
from bench.ceiling import ceiling
from bench.cpu import CpuSnapshot, cpu_split
from bench.loadgen import LoadSpec, WorkerPool
from bench.report import summarise
from bench.stack import Child, Stack, StackError

__all__ = ["Harness", "Options", "SCENARIOS", "run_scenario"]

BANK_INST, POST_INST = "01020000", "01000000"


# A bank run writes about 300 MB of WAL (19 segments of 16 MB); the bench makes 48 ready. The
# cluster keeps 16 behind (`wal_keep_size`) and recycles up to 64 ahead (`min_wal_size`).
WAL_SEGMENTS = 48


@dataclass(frozen=True, slots=True)
class Options:
    duration_s: float = 10.0
    connections: int | None = None  # per stream; None: the scenario's default
    rate: float | None = None  # open-loop rate; None: 70 % of the measured peak
    depth: int = 24  # closed loop, requests in flight per link connection
    customers: int = 20_000
    workers: int = 1  # load-generator processes per stream
    pgbench_clients: int = 16
    home: Path | None = None
    skip_open_loop: bool = False
    skip_baseline: bool = False
    switch_nice: int = 0  # the switch's nice value (0: as started)
    sustained: bool = False  # bank: also search the rate whose forwarding keeps up
    wal_segments: int = WAL_SEGMENTS  # WAL segments made ready for reuse before measuring


async def warm_wal(con: asyncpg.Connection, segments: int) -> int:
    """Give the bench's fresh cluster the WAL segments a server that has run for a while has
    ready: `segments` of them written and switched away from, then a checkpoint, which renames
    the ones no longer needed to future segment names instead of deleting them.

    A fresh cluster has none: each 16 MB segment it reaches during the run is created then,
    zero-filled and flushed (about 14 ms here) while every committing backend waits, 5 to 8
    times in an 8 s bank phase. A cluster in service reuses the segments its checkpoints
    recycle (`min_wal_size`), so that wait is the fresh cluster's, not the switch's.
    Returns how many segments are ready past the current one."""
    for _ in range(segments):
        # pg_switch_wal() only moves on from a segment that holds a record
        await con.execute("SELECT pg_logical_emit_message(false, 'gridpay-bench', 'warm')")
        await con.execute("SELECT pg_switch_wal()")
    await con.execute("CHECKPOINT")
    return int(await con.fetchval(_WAL_AHEAD))


_WAL_AHEAD = """SELECT count(*) FROM pg_ls_waldir()
 WHERE name ~ '^[0-9A-F]{24}$' AND name > pg_walfile_name(pg_current_wal_lsn())"""


def _goal(value: float, goal: float, *, at_most: bool = False) -> dict[str, Any]:
    met = value <= goal if at_most else value >= goal
    return {"value": round(value, 3), "goal": f"{'<=' if at_most else '>='} {goal}", "met": met}


@dataclass
class Harness:
    """A running system under test and what the load generators need to load it."""

    stack: Stack
    opts: Options
    accounts: tuple[str, ...] = ()
    api_keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # channel → (id, key)
    approved: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)
    run_tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    wal_ready: int = 0  # WAL segments ready for reuse when the measuring began

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, opts: Options) -> AsyncIterator[Harness]:
        import tempfile

        with contextlib.ExitStack() as es:
            home = opts.home or Path(es.enter_context(
                tempfile.TemporaryDirectory(prefix="gridpay-bench-")))
            stack = Stack(home, customers=opts.customers, switch_nice=opts.switch_nice)
            es.callback(stack.stop)
            await asyncio.to_thread(stack.start)
            h = cls(stack, opts)
            await h._prepare()
            yield h

    @property
    def db(self) -> str:
        return self.stack.urls["database"]

    async def _prepare(self) -> None:
        # the switch validates payments against its account mirror: wait for the first pass
        con = await asyncpg.connect(self.db)
        try:
            deadline = time.monotonic() + 120
            while not await con.fetchval("SELECT completed_at IS NOT NULL FROM mirror_sync"):
                if time.monotonic() > deadline:
                    raise StackError("the account mirror did not complete its first pass")
                await asyncio.sleep(0.2)
            if self.opts.wal_segments > 0:
                self.wal_ready = await warm_wal(con, self.opts.wal_segments)
            # the time WAL flushes take, for the phases' database line (a clock read per
            # flush); without the right to set it, the line gives the flushes' count alone
            with contextlib.suppress(asyncpg.PostgresError):
                await con.execute("ALTER SYSTEM SET track_wal_io_timing = on")
                await con.execute("SELECT pg_reload_conf()")
        finally:
            await con.close()
        async with aiohttp.ClientSession() as s:
            async with s.get(self.stack.urls["marketing"] + "/accounts",
                             params={"limit": "1000"}) as r:
                body = await r.json()
        self.accounts = tuple(str(a["account_no"]) for a in body["accounts"]
                              if a["status"] == "active")

    async def api_key(self, channel: str) -> tuple[str, str]:
        if channel not in self.api_keys:
            from switch.clients import create_client

            pool = await asyncpg.create_pool(self.db, min_size=1, max_size=1)
            assert pool is not None
            try:
                cid, key = await create_client(pool, f"bench-{channel}", channel)
            finally:
                await pool.close()
            self.api_keys[channel] = (str(cid), key)
        return self.api_keys[channel]

    # -- load specs ---------------------------------------------------------------------

    def iso_specs(self, dialect: str, *, name: str, connections: int, rate: float = 0.0,
                  duration_s: float | None = None, depth: int | None = None) -> list[LoadSpec]:
        from switch.keys import load_dev_keys

        inst = BANK_INST if dialect == "bank" else POST_INST
        key = dict(load_dev_keys().institution_mac)[inst]
        d = duration_s or self.opts.duration_s
        dp = depth or self.opts.depth
        w = max(1, min(self.opts.workers, connections))
        # enough pre-built messages for a generous guess of the peak (the rest are built late)
        per_worker = int(min(400_000, max(2_000, (rate or 6000) * d * 1.3 / w)))
        return [LoadSpec(kind="iso", name=name, host="127.0.0.1",
                         port=self.stack.ports[dialect], connections=connections // w,
                         duration_s=d, rate=rate / w, depth=dp, worker=i,
                         prebuild=per_worker, accounts=self.accounts, dialect=dialect,
                         institution=inst, mac_key=key, seed=hash(self.run_tag) % 10_000)
                for i in range(w)]

    async def http_specs(self, *, name: str, connections: int, port: int | None = None,
                         channel: str | None = "internet", rate: float = 0.0,
                         duration_s: float | None = None) -> list[LoadSpec]:
        cid, key = await self.api_key(channel) if channel else ("", "")
        d = duration_s or self.opts.duration_s
        w = max(1, min(self.opts.workers, connections))
        per_worker = int(min(300_000, max(2_000, (rate or 4000) * d * 1.3 / w)))
        return [LoadSpec(kind="http", name=name, host="127.0.0.1",
                         port=port or self.stack.ports["http"], connections=connections // w,
                         duration_s=d, rate=rate / w, worker=i, prebuild=per_worker,
                         accounts=self.accounts, api_key=key, client_id=cid,
                         run_tag=f"{self.run_tag}{name.replace('_', '')[:16]}") for i in range(w)]

    # -- running load -------------------------------------------------------------------

    async def load(self, specs: Sequence[LoadSpec], *, count: bool = True
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
        """Run the workers together; (figures per stream, CPU split). Each stream's figures
        also say what PostgreSQL did meanwhile (`db`: WAL written, checkpoints)."""
        pool = WorkerPool(specs)
        try:
            await pool.ready()
            db_before = await self.db_stats()
            inside_before = await self.switch_stats() if count else None
            before = CpuSnapshot.take(pool.pids)
            pool.go()
            longest = max(s.duration_s + s.timeout_s for s in specs)
            results = await pool.results(longest + 60)
            after = CpuSnapshot.take(pool.pids)
            db_after = await self.db_stats()
            inside_after = await self.switch_stats() if count else None
        finally:
            pool.close()
        if count:
            for r in results:
                self.approved.extend(r["approved"])
                self.unanswered.extend(r["unanswered"])
        figs = summarise(results)
        if count:  # a phase of the system under test (not the baseline handler's)
            # payments approved in the phase: the postings it gave the relay, and what the WAL
            # is shared by (an IVR phase completes dialog turns, most of which write nothing)
            paid = sum(len(r["approved"]) for r in results)
            activity = db_activity(db_before, db_after, paid)
            inside = switch_activity(inside_before, inside_after)
            tail = switch_tail(inside_before, inside_after)
            if len(figs) == 1 and activity.get("relay_backlog"):
                f = next(iter(figs.values()))
                if f.get("duration_s"):
                    f["forwarded_tps"] = forwarded_rate(paid, activity["relay_backlog"],
                                                        f["duration_s"])
            for f in figs.values():
                f["db"] = activity
                if inside:
                    f["switch"] = inside
                if tail:
                    f["switch_over"] = tail
        return figs, cpu_split(before, after, pool.pids)

    async def switch_stats(self) -> Scrape | None:
        """The switch's own latency histograms (sum and count of each), from its /metrics."""
        port = self.stack.ports.get("http")
        if not port:
            return None
        try:
            async with aiohttp.ClientSession() as s, s.get(
                    f"http://127.0.0.1:{port}/metrics",
                    timeout=aiohttp.ClientTimeout(total=5)) as r:
                text = await r.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        return parse_histograms(text)

    async def db_stats(self) -> dict[str, Any] | None:
        """PostgreSQL's WAL position and checkpointer counters, autovacuum and autoanalyze
        runs per table, and the relay's queue (None if it cannot say)."""
        try:
            con = await asyncpg.connect(self.db, timeout=5)
            try:
                row = await con.fetchrow(_DB_STATS)
                tables = await con.fetch(
                    "SELECT relname, autovacuum_count, autoanalyze_count"
                    " FROM pg_stat_user_tables"
                    " WHERE autovacuum_count + autoanalyze_count > 0")
            finally:
                await con.close()
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None
        assert row is not None
        return {"wal": int(row["wal"]), "started": int(row["started"]),
                "written": int(row["written"]),
                "vacuuming": int(row["vacuuming"]), "pending": int(row["pending"]),
                "wal_created": row["wal_created"],
                "fsyncs": row["wal_fsyncs"], "fsync_ms": row["wal_fsync_ms"],
                "tables": {r["relname"]: (int(r["autovacuum_count"]),
                                          int(r["autoanalyze_count"])) for r in tables}}


    async def books(self) -> dict[str, Any]:
        b = await check_books(self.db, self.stack.urls["marketing"], self.approved,
                              self.unanswered)
        return b.as_json()


# -- scenarios --------------------------------------------------------------------------------


# PostgreSQL 17 and later: checkpoints started (timed or requested) and the buffers checkpoints
# have written so far, which grows while a spread checkpoint runs
_DB_STATS = """SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS wal,
       num_timed + num_requested AS started,
       buffers_written AS written,
       (SELECT count(*) FROM pg_stat_progress_vacuum) AS vacuuming,
       -- WAL segments created (PostgreSQL 18 and later; NULL before), as of the backends'
       -- last statistics flush (at most a second old under load)
       (SELECT sum(writes) FROM pg_stat_io
         WHERE object = 'wal' AND context = 'init')::bigint AS wal_created,
       (SELECT count(*) FROM outbox WHERE state = 'pending') AS pending,
       -- WAL flushes to disk (each commit waits for one, shared by the commits it covers)
       -- and the time they took; the time needs track_wal_io_timing, which the harness turns
       -- on (`Harness._prepare`): without it the server counts 0 ms, read here as no time
       (SELECT sum(fsyncs) FROM pg_stat_io WHERE object = 'wal')::bigint AS wal_fsyncs,
       CASE WHEN current_setting('track_wal_io_timing')::bool
            THEN (SELECT sum(fsync_time) FROM pg_stat_io WHERE object = 'wal')::float8
       END AS wal_fsync_ms
  FROM pg_stat_checkpointer"""


# what the switch's own histograms say of a phase: name shown → (metric, label filter: the
# label and a prefix of its value, or None for every label set)
_INSIDE: dict[str, tuple[str, tuple[str, str] | None]] = {
    "link request": ("gridpay_link_request_seconds", None),
    "http request": ("gridpay_http_request_seconds", ("route", "/v1/")),
    "ivr turn": ("gridpay_http_request_seconds", ("route", "/ivr/v1/")),
    "group commit": ("gridpay_group_commit_seconds", None),
    "commit size": ("gridpay_group_commit_size", None),
    "HSM verify": ("gridpay_hsm_request_seconds", ("command", "M8")),
    "HSM MAC": ("gridpay_hsm_request_seconds", ("command", "M6")),
    "loop lag": ("gridpay_event_loop_lag_seconds", None),
}


# the tail the goals care about, read off the switch's own buckets: how many of each were
# slower than a bucket bound (its buckets are too coarse for a percentile)
_OVER = {"link request": 0.02, "http request": 0.02, "ivr turn": 0.02, "loop lag": 0.01}


#: (sum, count, count at most the `_OVER` bound) per histogram shown
Scrape = dict[str, tuple[float, float, float]]


def _by_sample_name() -> dict[str, list[tuple[str, tuple[str, str] | None, int]]]:
    """What `_INSIDE` reads, by sample name (a family's name depends on its TYPE line; a
    sample's does not): (name shown, label filter, 0 sum / 1 count / 2 the `_OVER` bucket)."""
    wanted: dict[str, list[tuple[str, tuple[str, str] | None, int]]] = {}
    for shown, (metric, labels) in _INSIDE.items():
        for i, suffix in enumerate(("_sum", "_count", "_bucket")):
            if i < 2 or shown in _OVER:
                wanted.setdefault(metric + suffix, []).append((shown, labels, i))
    return wanted


_WANTED = _by_sample_name()


def parse_histograms(text: str) -> Scrape:
    """(sum, count, count at most its `_OVER` bound) per histogram of `_INSIDE`, over the
    label sets it selects (the third is 0 for a histogram without a bound). The exposition is
    read by prometheus_client's own parser; a scrape it cannot read gives no figures."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[float]] = {}
    try:
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError:
        return {}
    for sample in samples:
        for shown, labels, i in _WANTED.get(sample.name, ()):
            if labels is not None and not sample.labels.get(labels[0], "").startswith(
                    labels[1]):
                continue
            if i == 2 and float(sample.labels.get("le", "nan")) != _OVER[shown]:
                continue
            out.setdefault(shown, [0.0, 0.0, 0.0])[i] += sample.value
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def switch_activity(before: Scrape | None, after: Scrape | None) -> dict[str, float]:
    """Mean of each histogram over a phase: milliseconds (a size for `commit size`)."""
    if not before or not after:
        return {}
    out: dict[str, float] = {}
    for k, (s1, c1, _) in after.items():
        s0, c0, _ = before.get(k, (0.0, 0.0, 0.0))
        if c1 > c0:
            mean = (s1 - s0) / (c1 - c0)
            out[k] = round(mean if k == "commit size" else mean * 1000, 2)
    return out


def switch_tail(before: Scrape | None, after: Scrape | None) -> dict[str, float]:
    """Per cent of each histogram's observations over a phase that were slower than its
    `_OVER` bound: whether a latency tail seen by the clients was inside the switch."""
    if not before or not after:
        return {}
    out: dict[str, float] = {}
    for k, (_, c1, le1) in after.items():
        if k not in _OVER:
            continue
        _, c0, le0 = before.get(k, (0.0, 0.0, 0.0))
        if c1 > c0:
            shown = f"{k} > {_OVER[k] * 1000:g} ms"
            out[shown] = round(100 * ((c1 - c0) - (le1 - le0)) / (c1 - c0), 2)
    return out


def forwarded_rate(paid: int, backlog: list[int], duration_s: float) -> float:
    """What the relay forwarded during a phase, as a rate over the same window as `tps`: the
    phase's payments less the growth of the backlog (the readings span the window and the
    generator's wrap-up, so it errs high)."""
    first, last = backlog
    return round(max(0, paid + first - last) / duration_s, 1)


def db_activity(before: dict[str, Any] | None, after: dict[str, Any] | None,
                paid: int) -> dict[str, Any]:
    """What PostgreSQL did during a phase: WAL written (in all, per payment approved)
    and whether a checkpoint was writing, which costs every writer full-page images and
    disk time, so that a phase with one is not compared blindly with a phase without."""
    if before is None or after is None:
        return {}
    wal = after["wal"] - before["wal"]
    written = after["written"] - before["written"]
    vacuumed, analysed = _grown(before, after, 0), _grown(before, after, 1)
    created = _delta(before, after, "wal_created")
    fsyncs = _delta(before, after, "fsyncs")
    flushing = _delta(before, after, "fsync_ms")
    fsync_ms = flushing / fsyncs if fsyncs and flushing is not None else None
    return {"wal_mb": round(wal / 1e6, 1),
            # WAL flushes in the phase, and the mean time one took: the disk's part of every
            # commit's wait, which the switch does not control and which varies from run to
            # run on a shared machine
            "wal_fsyncs": fsyncs,
            "wal_fsync_ms": round(fsync_ms, 3) if fsync_ms is not None else None,
            "wal_bytes_per_tx": round(wal / paid) if paid else None,
            # each new segment is zero-filled and flushed while the committers wait
            "wal_segments_created": created,
            "checkpoints_started": after["started"] - before["started"],
            "checkpoint_buffers_written": written,
            "checkpoint_running": written > 0 or after["started"] > before["started"],
            # autovacuum and autoanalyze runs that ended in the phase, or were running at
            # either end of it (their reads and writes compete with the load as well)
            "autovacuum_running": bool(vacuumed or analysed
                                       or before["vacuuming"] or after["vacuuming"]),
            # postings the relay had still to forward when the phase began and ended: a
            # phase that ends with a backlog left part of its cost to the next one
            "relay_backlog": [before.get("pending", 0), after.get("pending", 0)],
            # which tables were vacuumed and analysed by the autovacuum daemon meanwhile
            "autovacuumed": vacuumed, "autoanalyzed": analysed}


def _delta(before: dict[str, Any], after: dict[str, Any], key: str) -> Any:
    """How much a counter read at both ends of a phase grew (None: not read at either end,
    as on a server too old to have it, or without track_wal_io_timing for the times)."""
    if before.get(key) is None or after.get(key) is None:
        return None
    return after[key] - before[key]


def _grown(before: dict[str, Any], after: dict[str, Any], i: int) -> list[str]:
    old = before.get("tables", {})
    return sorted(t for t, counts in after.get("tables", {}).items()
                  if counts[i] > old.get(t, (0, 0))[i])


async def _link_scenario(h: Harness, dialect: str) -> dict[str, Any]:
    o = h.opts
    conns = o.connections or 8
    report: dict[str, Any] = {"scenario": dialect, "phases": {}, "baselines": {}, "goals": {},
                              "notes": []}
    if not o.skip_baseline:
        report["baselines"]["pgbench_N"] = await pgbench(h.db, o.duration_s, o.pgbench_clients)
    figs, cpu = await h.load(h.iso_specs(dialect, name=f"{dialect}_peak", connections=conns))
    peak = figs[f"{dialect}_peak"]
    report["phases"][f"{dialect}_peak (closed loop)"] = peak
    report["cpu"] = cpu
    if not o.skip_open_loop:
        rate = o.rate or max(10.0, 0.7 * peak["tps"])
        figs2, cpu2 = await h.load(h.iso_specs(dialect, name=f"{dialect}_open",
                                               connections=conns, rate=rate))
        fig = figs2[f"{dialect}_open"]
        fig["offered_rate"] = round(rate, 1)
        report["phases"][f"{dialect}_open @{rate:.0f}/s"] = fig
        report["cpu_open_loop"] = cpu2
        report["goals"]["p99_ms_at_70pct_open_loop"] = _goal(fig["p99_ms"], 20.0, at_most=True)
    base = report["baselines"].get("pgbench_N")
    if base and base["tps"]:
        ratio = peak["tps"] / base["tps"]
        report["ratios"] = {f"{dialect}_tps/pgbench_N_tps": round(ratio, 3)}
        if peak.get("forwarded_tps") is not None:
            # the same peak counted by what reached the billing system within it (reported:
            # the goal counts payments answered, the relay catching up afterwards)
            report["ratios"][f"{dialect}_forwarded_tps/pgbench_N_tps"] = round(
                peak["forwarded_tps"] / base["tps"], 3)
        if dialect == "bank":
            report["goals"]["bank_tps_vs_pgbench_N"] = _goal(ratio, 1.0)
            report["goals"]["bank_tps_vs_pgbench_N_stretch"] = _goal(ratio, 1.5)
    if dialect == "bank":
        from bench.hsm import run as hsm_run

        host, _, port = h.stack.urls["hsm"].rpartition(":")
        before = CpuSnapshot.take()
        hsm = await hsm_run(host, int(port), o.duration_s, 64)
        hsm["cpu"] = cpu_split(before, CpuSnapshot.take())
        report["baselines"]["hsm_mac_verify"] = {"per_s": hsm["verifications_per_s"], **hsm}
        report["goals"]["hsm_mac_verify_vs_bank_tps"] = _goal(
            hsm["verifications_per_s"] / max(1.0, peak["tps"]), 2.0)
        if o.sustained:
            from bench.sustained import run_sustained

            found = report["sustained"] = await run_sustained(h, peak["tps"])
            if base and base["tps"] and found["best"] is not None:
                # answered and forwarded alike, the relay kept up (reported: see the text)
                report["ratios"]["bank_sustained_tps/pgbench_N_tps"] = round(
                    found["best"]["tps"] / base["tps"], 3)
    return report


async def scenario_bank(h: Harness) -> dict[str, Any]:
    return await _link_scenario(h, "bank")


async def scenario_post(h: Harness) -> dict[str, Any]:
    return await _link_scenario(h, "post")


@contextlib.asynccontextmanager
async def baseline_server() -> AsyncIterator[int]:
    child = Child("baseline", [sys.executable, "-m", "bench.baseline", "--port", "0"],
                  {**__import__("os").environ, "PYTHONUNBUFFERED": "1"},
                  Path("/dev/null"))
    ready = await asyncio.to_thread(child.start, 30.0)
    try:
        yield int(ready["port"])
    finally:
        await asyncio.to_thread(child.stop)


async def aiohttp_baseline(h: Harness, report: dict[str, Any], connections: int) -> None:
    """Load the minimal aiohttp handler with the HTTP generator; record it in `report`."""
    async with baseline_server() as port:
        figs, cpu = await h.load(await h.http_specs(name="aiohttp_minimal", port=port,
                                                    channel=None, connections=connections),
                                 count=False)
    report["phases"]["aiohttp_minimal (baseline)"] = figs["aiohttp_minimal"]
    report["baselines"]["aiohttp_minimal"] = {"tps": figs["aiohttp_minimal"]["tps"]}
    report["cpu_baseline"] = cpu


def against_handler(report: dict[str, Any], what: str, fig: dict[str, Any],
                    cpu: dict[str, float], goal: float) -> None:
    """`fig` (a phase measured with CPU split `cpu`) against the minimal handler of the same
    run, if it was measured: the ratio `what`/handler, its goal, and the ceiling the machine
    allows (see `bench.ceiling`)."""
    base = report["baselines"].get("aiohttp_minimal")
    if not base or not base["tps"]:
        return
    ratio = fig["tps"] / base["tps"]
    report.setdefault("ratios", {})[f"{what}/aiohttp_minimal_tps"] = round(ratio, 3)
    report["goals"][f"{what}_vs_aiohttp_minimal"] = _goal(ratio, goal)
    top = ceiling(report["phases"]["aiohttp_minimal (baseline)"], report["cpu_baseline"],
                  fig, cpu, goal=goal)
    if top is not None:
        report["ceiling"] = top


async def scenario_http(h: Harness) -> dict[str, Any]:
    o = h.opts
    conns = o.connections or 32
    report: dict[str, Any] = {"scenario": "http", "phases": {}, "baselines": {}, "goals": {},
                              "notes": []}
    if not o.skip_baseline:
        await aiohttp_baseline(h, report, conns)
    figs, cpu = await h.load(await h.http_specs(name="http_peak", connections=conns))
    peak = figs["http_peak"]
    report["phases"]["http_peak (closed loop)"] = peak
    report["cpu"] = cpu
    if not o.skip_open_loop:
        rate = o.rate or max(10.0, 0.7 * peak["tps"])
        figs2, cpu2 = await h.load(await h.http_specs(name="http_open", connections=conns,
                                                      rate=rate))
        figs2["http_open"]["offered_rate"] = round(rate, 1)
        report["phases"][f"http_open @{rate:.0f}/s"] = figs2["http_open"]
        report["cpu_open_loop"] = cpu2
    against_handler(report, "http_tps", peak, cpu, 0.4)
    return report


async def scenario_mixed(h: Harness) -> dict[str, Any]:
    """Bank, post and Internet load at once (closed loop), sharing the switch."""
    o = h.opts
    conns = o.connections or 4
    specs = (h.iso_specs("bank", name="bank", connections=conns)
             + h.iso_specs("post", name="post", connections=conns)
             + await h.http_specs(name="http", connections=4 * conns))
    report: dict[str, Any] = {"scenario": "mixed", "phases": {}, "baselines": {}, "goals": {},
                              "notes": []}
    if not o.skip_baseline:
        report["baselines"]["pgbench_N"] = await pgbench(h.db, o.duration_s, o.pgbench_clients)
    figs, cpu = await h.load(specs)
    report["phases"] = figs
    report["cpu"] = cpu
    total = sum(f["tps"] for f in figs.values())
    report["phases"]["total"] = {"tps": round(total, 1)}
    base = report["baselines"].get("pgbench_N")
    if base and base["tps"]:
        report["ratios"] = {"mixed_tps/pgbench_N_tps": round(total / base["tps"], 3)}
    return report


async def scenario_ivr(h: Harness) -> dict[str, Any]:
    from bench.ivr import run_ivr

    report: dict[str, Any] = await run_ivr(h)
    return report


SCENARIOS = {"bank": scenario_bank, "post": scenario_post, "http": scenario_http,
             "mixed": scenario_mixed, "ivr": scenario_ivr}


async def run_scenario(name: str, opts: Options) -> dict[str, Any]:
    """Start a fresh system, run one scenario on it, check the books, stop it."""
    started = time.monotonic()
    async with Harness.open(opts) as h:
        report = await SCENARIOS[name](h)
        report["books"] = await h.books()
        wal_ready = h.wal_ready
    report["options"] = {"duration_s": opts.duration_s, "connections": opts.connections,
                         "rate": opts.rate, "depth": opts.depth, "customers": opts.customers,
                         "workers": opts.workers, "switch_nice": opts.switch_nice,
                         "wal_segments": opts.wal_segments, "wal_segments_ready": wal_ready}
    report["machine"] = machine()
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["status"] = "pass" if report["books"]["ok"] else "FAIL (books)"
    return report


def machine() -> dict[str, Any]:
    import os
    import platform

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, IndexError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory": mem,
            "python": platform.python_version(), "platform": platform.platform(),
            "postgres": _pg_version()}


def _pg_version() -> str:
    from switch.embedded import pg_bin_dir

    with contextlib.suppress(Exception):
        out = subprocess.run([str(pg_bin_dir() / "postgres"), "--version"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    return ""
