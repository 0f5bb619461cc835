"""The benchmark harness, run tiny: a real system (services and a switch node as child
processes), a real load generator process, the books check passing, and failing when the books
are broken."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import pytest

from bench.books import check_books
from bench.ceiling import ceiling, format_ceiling
from bench.cpu import CpuSnapshot, cpu_split
from bench.loadgen import LoadSpec, WorkerPool
from bench.report import format_table, summarise
from bench.scenarios import (
    Harness,
    Options,
    against_handler,
    aiohttp_baseline,
    baseline_server,
)

# nice 1: that --switch-nice reaches the switch (a positive value needs no privilege)
# 20 WAL segments: the cluster keeps 16 of them behind (`wal_keep_size`), the rest are recycled
OPTS = Options(duration_s=1.0, customers=500, depth=4, skip_open_loop=True, skip_baseline=True,
               switch_nice=1, wal_segments=20)


@pytest.fixture(scope="module")
async def harness() -> AsyncIterator[Harness]:
    async with Harness.open(OPTS) as h:
        yield h


async def test_bank_load_and_the_books_balance(harness: Harness) -> None:
    figs, cpu = await harness.load(harness.iso_specs("bank", name="bank", connections=2))
    bank = figs["bank"]
    assert bank["approved"] > 0 and bank["tps"] > 0
    assert set(bank["codes"]) == {"00"}
    assert bank["p50_ms"] > 0 and bank["max_ms"] >= bank["p99_ms"] >= bank["p50_ms"]
    assert cpu["switch"] > 0 and "loadgen" in cpu
    # the switch's own histograms were read off its /metrics around the phase
    assert bank["switch"]["link request"] > 0 and bank["switch"]["commit size"] >= 1
    # what PostgreSQL wrote meanwhile: the ledger's rows cost WAL, a few hundred bytes at least
    assert bank["db"]["wal_mb"] > 0 and bank["db"]["wal_bytes_per_tx"] > 300
    # the segments created are read (PostgreSQL 18 and later; None before); whether the ones
    # made ready are reused is the WAL test's, which controls the statistics' flushes
    con = await asyncpg.connect(harness.db)
    try:
        reads_wal_io = await con.fetchval("SHOW server_version_num") >= "180000"
    finally:
        await con.close()
    assert isinstance(bank["db"]["wal_segments_created"], int) == reads_wal_io
    # every commit waited for a WAL flush, and the harness timed them (track_wal_io_timing)
    if reads_wal_io:
        assert bank["db"]["wal_fsyncs"] > 0 and bank["db"]["wal_fsync_ms"] > 0
    books = await harness.books()
    assert books["ok"], books["problems"]
    assert books["ledger_payments"] == books["approved_responses"] == bank["approved"]
    assert books["marketing_postings"] == books["ledger_payments"]
    table = format_table({"scenario": "bank", "status": "pass", "phases": {"bank": bank},
                          "books": books})
    assert "books: balance" in table


async def test_the_sustained_search_steps_up_while_the_relay_keeps_up(harness: Harness
                                                                     ) -> None:
    from bench import sustained

    # a rate this low is kept up at every step: the search goes to 100 % and reports it
    found = await sustained.run_sustained(harness, peak_tps=60.0)
    fractions = [st["fraction"] for st in found["steps"]]
    assert fractions == [0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
    assert all(st["kept_up"] for st in found["steps"]) and found["best"] is found["steps"][-1]
    assert all(st["relay_backlog"] is not None for st in found["steps"])
    table = format_table({"scenario": "bank", "status": "pass", "sustained": found})
    assert table.count(": kept up") == 7 and "(a lower bound)" in table
    books = await harness.books()
    assert books["ok"], books["problems"]


async def test_the_switch_runs_at_the_nice_value_asked_for_and_the_report_says_so(
        harness: Harness) -> None:
    import os

    assert harness.stack.switch is not None
    assert os.getpriority(os.PRIO_PROCESS, harness.stack.switch.pid) == 1
    table = format_table({"scenario": "bank", "status": "pass", "options": {"switch_nice": 1}})
    assert "nice 1" in table and "not the default figures" in table
    assert "nice" not in format_table({"scenario": "bank", "status": "pass",
                                       "options": {"switch_nice": 0}})


async def test_http_payments_count_in_the_books(harness: Harness) -> None:
    figs, _ = await harness.load(await harness.http_specs(name="http", connections=2))
    assert figs["http"]["approved"] > 0 and set(figs["http"]["codes"]) == {"201"}
    books = await harness.books()
    assert books["ok"], books["problems"]


async def test_an_ivr_phase_reports_its_recharges_not_its_turns_as_postings(
        harness: Harness) -> None:
    from bench.ivr import run_ivr

    before = len(harness.approved)
    report = await run_ivr(harness)
    fig = report["phases"]["ivr turns (closed loop)"]
    recharged = len(harness.approved) - before
    assert recharged > 0 and fig["completed"] > 2 * recharged  # a dialog is several turns
    # the callers never ran out of cards: a phase that did would understate the turns' rate
    assert fig["cards_left"] > 0 and not any("ran out" in n for n in report["notes"])
    # the relay forwarded the recharges (not one posting per turn), and the WAL is shared by
    # the recharges that wrote it
    assert 0 < fig["forwarded_tps"] <= 1.2 * recharged / fig["duration_s"]
    assert fig["db"]["wal_bytes_per_tx"] > 300
    assert (await harness.books())["ok"]


async def test_broken_books_fail(harness: Harness) -> None:
    urls = harness.stack.urls
    # a payment a client was told is approved but the ledger does not hold
    told = [*harness.approved, "iso:01020000:999999:0101000000"]
    books = await check_books(urls["database"], urls["marketing"], told, harness.unanswered,
                              drain_timeout_s=5)
    assert not books.ok and "not in the ledger" in books.problems[0]
    # a posting the switch believes sent that the marketing system never got
    con = await asyncpg.connect(urls["database"])
    try:
        await con.execute(
            "INSERT INTO outbox (posting_id, kind, payment_id, account_no, amount, channel,"
            " occurred_at, state) SELECT 'PBENCHFAKE', 'payment', id, account_no, amount,"
            " channel, created_at, 'sent' FROM payments LIMIT 1")
        books = await check_books(urls["database"], urls["marketing"], harness.approved,
                                  harness.unanswered, drain_timeout_s=5)
        assert not books.ok
        assert any("never reached the marketing system" in p for p in books.problems)
    finally:
        await con.execute("DELETE FROM outbox WHERE posting_id = 'PBENCHFAKE'")
        await con.close()


async def test_open_loop_against_the_baseline_handler() -> None:
    async with baseline_server() as port:
        spec = LoadSpec(kind="http", name="base", host="127.0.0.1", port=port, connections=2,
                        duration_s=0.5, rate=200, prebuild=200, accounts=("0000000001",))
        pool = WorkerPool([spec])
        try:
            await pool.ready()
            before = CpuSnapshot.take(pool.pids)
            pool.go()
            results = await pool.results(30)
            after = CpuSnapshot.take(pool.pids)
        finally:
            pool.close()
    fig = summarise(results)["base"]
    assert fig["open_loop"] and fig["codes"] == {"201": fig["completed"]}
    assert 60 <= fig["completed"] <= 110  # 200/s for half a second, on schedule
    assert "idle" in cpu_split(before, after, pool.pids)


async def test_the_fresh_cluster_gets_wal_segments_ready_and_reuses_them(
        harness: Harness) -> None:
    from bench.scenarios import _DB_STATS, _WAL_AHEAD, warm_wal

    assert harness.wal_ready >= 3
    con = await asyncpg.connect(harness.db)
    try:
        if await con.fetchval("SHOW server_version_num") < "180000":
            pytest.skip("WAL in pg_stat_io: PostgreSQL 18 and later")
        if await con.fetchval(_WAL_AHEAD) < 3:  # earlier tests used them: ready some again
            assert await warm_wal(con, 20) >= 3
        ready = await con.fetchval(_WAL_AHEAD)
        created = await con.fetchval(f"SELECT wal_created FROM ({_DB_STATS}) s")
        for _ in range(3):  # three segment switches: into segments made ready, none created
            await con.execute("SELECT pg_logical_emit_message(false, 'test', 'x')")
            await con.execute("SELECT pg_switch_wal()")
        await con.execute("SELECT pg_stat_force_next_flush()")
        await con.execute("SELECT 1")  # the flush happens at the end of a statement
        assert await con.fetchval(f"SELECT wal_created FROM ({_DB_STATS}) s") == created
        # past the segments made ready, the same switches create segments (the test's check)
        for _ in range(ready):
            await con.execute("SELECT pg_logical_emit_message(false, 'test', 'x')")
            await con.execute("SELECT pg_switch_wal()")
        await con.execute("SELECT pg_stat_force_next_flush()")
        await con.execute("SELECT 1")
        assert await con.fetchval(f"SELECT wal_created FROM ({_DB_STATS}) s") > created
    finally:
        await con.close()


async def test_a_checkpoint_during_a_phase_is_reported(harness: Harness) -> None:
    # checkpoints every 0.2 s for as long as the load runs, so that some fall inside its 1 s
    # window whenever the window begins (one checkpoint 0.4 s after the call could come
    # before it, on a slow machine where starting the load generator takes longer)
    stop = asyncio.Event()

    async def checkpoints() -> None:
        con = await asyncpg.connect(harness.db)
        try:
            while not stop.is_set():
                await con.execute("CHECKPOINT")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
        finally:
            await con.close()

    task = asyncio.create_task(checkpoints())
    try:
        figs, _ = await harness.load(harness.iso_specs("bank", name="ckpt", connections=2))
    finally:
        stop.set()
        await task
    db = figs["ckpt"]["db"]
    assert db["checkpoints_started"] >= 1 and db["checkpoint_running"] is True
    # and what the switch's own histograms say of the phase
    inside = figs["ckpt"]["switch"]
    assert inside["link request"] > 0 and inside["group commit"] > 0
    assert inside["commit size"] >= 1 and "http request" not in inside
    # and what the relay forwarded meanwhile is reported with the phase (its arithmetic is
    # tested on fixed figures below)
    assert "forwarded_tps" in figs["ckpt"]
    assert "a checkpoint was writing" in format_table(
        {"scenario": "bank", "phases": {"ckpt": figs["ckpt"]}})


def test_what_the_relay_forwarded_is_the_payments_less_the_backlog_growth() -> None:
    from bench.scenarios import forwarded_rate

    assert forwarded_rate(8000, [0, 3000], 8.0) == 625.0  # fell behind by 3000
    assert forwarded_rate(8000, [2000, 0], 8.0) == 1250.0  # caught up as well
    assert forwarded_rate(10, [0, 50], 1.0) == 0.0  # never negative


def test_switch_activity_from_two_scrapes() -> None:
    from bench.scenarios import parse_histograms, switch_activity

    def scrape(n: int, seconds: float) -> str:
        return (
            "# HELP gridpay_group_commit_seconds time of one group commit\n"
            f"gridpay_group_commit_seconds_sum {seconds}\n"
            f"gridpay_group_commit_seconds_count {n}\n"
            f'gridpay_hsm_request_seconds_sum{{command="M8"}} {seconds / 2}\n'
            f'gridpay_hsm_request_seconds_count{{command="M8"}} {n}\n'
            f'gridpay_hsm_request_seconds_sum{{command="M6"}} 99\n'
            f'gridpay_hsm_request_seconds_count{{command="M6"}} 5\n'
            f'gridpay_http_request_seconds_sum{{route="/metrics"}} {seconds}\n'
            f'gridpay_http_request_seconds_count{{route="/metrics"}} {n}\n'
            f"gridpay_group_commit_size_sum {n * 10}\n"
            f"gridpay_group_commit_size_count {n}\n")

    before, after = parse_histograms(scrape(10, 0.05)), parse_histograms(scrape(30, 0.25))
    # 20 commits took 0.2 s: 10 ms each; the verifications half that; no MAC in the phase,
    # and the scrapes themselves (/metrics) are not an HTTP request of the load
    assert switch_activity(before, after) == {"group commit": 10.0, "HSM verify": 5.0,
                                              "commit size": 10.0}
    assert switch_activity(None, after) == {}


def test_switch_tail_from_bucket_counts() -> None:
    from bench.scenarios import parse_histograms, switch_tail

    def scrape(n: int, fast: int, lag_n: int, lag_fast: int) -> str:
        # two label sets of the link histogram (summed), and a bucket bound we do not read
        lines = []
        for mti in ("0200", "0800"):
            lines += [
                f'gridpay_link_request_seconds_bucket{{institution="B1",mti="{mti}",le="0.01"}} 1',
                f'gridpay_link_request_seconds_bucket{{institution="B1",mti="{mti}",le="0.02"}} '
                f"{fast}",
                f'gridpay_link_request_seconds_sum{{institution="B1",mti="{mti}"}} 1.5',
                f'gridpay_link_request_seconds_count{{institution="B1",mti="{mti}"}} {n}',
            ]
        lines += [f'gridpay_event_loop_lag_seconds_bucket{{le="0.01"}} {lag_fast}',
                  f"gridpay_event_loop_lag_seconds_count {lag_n}",
                  "gridpay_event_loop_lag_seconds_sum 0.1",
                  'gridpay_http_request_seconds_bucket{route="/metrics",le="0.02"} 0',
                  f'gridpay_http_request_seconds_count{{route="/metrics"}} {n}']
        return "\n".join(lines) + "\n"

    before = parse_histograms(scrape(100, 100, 10, 10))
    after = parse_histograms(scrape(600, 590, 210, 209))
    # 1000 link requests in the phase (two label sets), 980 of them within 20 ms: 2 % slower;
    # 200 lag readings, one over 10 ms; the scrapes' own /metrics requests are not counted
    assert switch_tail(before, after) == {"link request > 20 ms": 2.0, "loop lag > 10 ms": 0.5}
    assert switch_tail(before, None) == {}


def test_histograms_from_a_typed_exposition() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from bench.scenarios import parse_histograms

    reg = CollectorRegistry()
    link = Histogram("gridpay_link_request_seconds", "link", ["institution"], registry=reg,
                     buckets=(0.01, 0.02, 0.05))
    for inst, v in (("B1", 0.005), ("B1", 0.03), ("B2", 0.015), ("B2", 0.1)):
        link.labels(inst).observe(v)
    http = Histogram("gridpay_http_request_seconds", "http", ["route"], registry=reg,
                     buckets=(0.02,))
    http.labels("/v1/payments").observe(0.004)
    http.labels("/metrics").observe(1.0)
    got = parse_histograms(generate_latest(reg).decode())
    s, n, fast = got["link request"]
    assert (n, fast) == (4, 2) and s == pytest.approx(0.15)
    assert got["http request"] == pytest.approx((0.004, 1, 1))  # /metrics is not /v1/
    assert parse_histograms("gridpay_link_request_seconds_sum{oops 1\n") == {}


def test_phase_db_activity_from_two_readings() -> None:
    from bench.scenarios import db_activity

    before: dict[str, Any] = {"wal": 1_000_000, "started": 3, "written": 500,
                              "vacuuming": 0, "pending": 0, "tables": {"outbox": (2, 5)}}
    after = {**before, "wal": 3_000_000, "pending": 40}
    quiet = db_activity(before, after, 1000)
    assert quiet == {"wal_mb": 2.0, "wal_fsyncs": None, "wal_fsync_ms": None,
                     "wal_bytes_per_tx": 2000, "wal_segments_created": None,
                     "checkpoints_started": 0,
                     "checkpoint_buffers_written": 0, "checkpoint_running": False,
                     "autovacuum_running": False, "relay_backlog": [0, 40],
                     "autovacuumed": [], "autoanalyzed": []}
    busy = db_activity(before, {**after, "tables": {
        "outbox": (3, 5), "payments": (0, 1)}}, 1000)
    assert busy["autovacuumed"] == ["outbox"] and busy["autoanalyzed"] == ["payments"]
    assert busy["autovacuum_running"] is True
    spread = db_activity(before, {**after, "written": 900}, 1000)
    assert spread["checkpoint_running"] is True  # one begun earlier, still writing
    analysed = {**after, "tables": {"outbox": (2, 6)}}  # one autoanalyze ended meanwhile
    assert db_activity(before, analysed, 1000)["autovacuum_running"] is True
    assert db_activity(before, {**after, "vacuuming": 1}, 1000)["autovacuum_running"] is True
    assert db_activity(None, before, 10) == {}
    created = db_activity({**before, "wal_created": 7}, {**after, "wal_created": 10}, 1000)
    assert created["wal_segments_created"] == 3
    table = format_table({"scenario": "bank", "status": "pass", "phases": {"p": {
        "tps": 1, "db": created}}})
    assert "3 new WAL segments" in table
    # WAL flushes and their mean time (the time only with track_wal_io_timing on)
    flushed = db_activity({**before, "fsyncs": 100, "fsync_ms": 40.0},
                          {**after, "fsyncs": 600, "fsync_ms": 340.0}, 1000)
    assert flushed["wal_fsyncs"] == 500 and flushed["wal_fsync_ms"] == 0.6
    untimed = db_activity({**before, "fsyncs": 100, "fsync_ms": None},
                          {**after, "fsyncs": 600, "fsync_ms": None}, 1000)
    assert untimed["wal_fsyncs"] == 500 and untimed["wal_fsync_ms"] is None
    table = format_table({"scenario": "bank", "status": "pass", "phases": {
        "p": {"tps": 1, "db": flushed}, "q": {"tps": 1, "db": untimed}}})
    assert "500 WAL flushes of 0.6 ms each on average" in table
    assert "500 WAL flushes, no checkpoint" in table


def test_a_phase_keeps_up_when_the_relay_queue_grew_by_at_most_two_percent() -> None:
    from bench.sustained import kept_up

    def phase(first: int, last: int, completed: int = 50_000, errors: float = 0.0,
              unanswered: int = 0, tps: float = 5_000.0) -> dict[str, object]:
        return {"completed": completed, "error_rate": errors, "unanswered": unanswered,
                "tps": tps, "db": {"relay_backlog": [first, last]}}

    assert kept_up(phase(0, 0), 5_000.0)
    assert kept_up(phase(0, 1_000), 5_000.0)  # 2 % of 50 000
    assert not kept_up(phase(0, 1_001), 5_000.0)
    assert kept_up(phase(0, 90, completed=1_000), 100.0)  # under the postings in flight
    assert kept_up(phase(4_000, 0), 5_000.0)  # it caught up on what an earlier phase left
    assert not kept_up(phase(0, 0, errors=0.001), 5_000.0)  # a failed payment
    assert not kept_up(phase(0, 0, unanswered=3), 5_000.0)  # a payment never answered
    assert not kept_up(phase(0, 0, tps=4_800.0), 5_000.0)  # answered below what was offered
    assert not kept_up({"completed": 10, "error_rate": 0.0, "db": {}})  # queue not read


@pytest.mark.parametrize(("limit", "tried", "best"), [
    (0.82, [0.7, 0.75, 0.8, 0.85], 0.8),  # up while kept up
    (0.56, [0.7, 0.65, 0.6, 0.55], 0.55),  # 70 % already too much: down until kept up
    (0.30, [0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4], None),  # never, down to the floor
    (2.00, [0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0], 1.0),  # kept up all the way
])
async def test_the_sustained_search_goes_up_or_down_from_70_percent(
        monkeypatch: pytest.MonkeyPatch, limit: float, tried: list[float],
        best: float | None) -> None:
    from bench import sustained

    async def step(h: object, peak: float, frac: float) -> dict[str, object]:
        # the load phase itself is measured elsewhere: here, a relay that keeps up below `limit`
        return {"fraction": round(frac, 2), "kept_up": frac <= limit + 1e-9}

    monkeypatch.setattr(sustained, "_step", step)
    found = await sustained.run_sustained(cast(Any, None), 1000.0)
    assert [st["fraction"] for st in found["steps"]] == tried
    assert (found["best"] or {}).get("fraction") == best
    assert found["lower_bound"] is (best == 1.0)  # kept up all the way: only a lower bound


async def test_the_sustained_search_stops_at_a_step_it_could_not_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import sustained

    async def step(h: object, peak: float, frac: float) -> dict[str, object]:
        if frac > 0.77:  # the relay would not drain before this step
            return {"fraction": round(frac, 2), "kept_up": False,
                    "error": "TimeoutError: the relay did not drain within 120 s"}
        return {"fraction": round(frac, 2), "kept_up": True, "tps": 1.0, "p99_ms": 1.0,
                "relay_backlog": None}

    monkeypatch.setattr(sustained, "_step", step)
    found = await sustained.run_sustained(cast(Any, None), 1000.0)
    assert [st["fraction"] for st in found["steps"]] == [0.7, 0.75, 0.8]
    assert found["best"]["fraction"] == 0.75 and not found["lower_bound"]
    table = format_table({"scenario": "bank", "status": "pass", "sustained": found})
    assert "not run (TimeoutError" in table and "relay backlog ? -> ?" in table


def test_the_ceiling_is_the_cores_over_the_least_cpu_a_request_costs() -> None:
    handler = {"completed": 27_000, "tps": 27_000.0}
    phase = {"completed": 5_000}
    # the handler's process: 1/30 ms a request; the rest: 0.17 ms a payment
    cpu = {"switch": 1.0, "postgres": 0.5, "redis": 0.1, "marketing": 0.15, "loadgen": 0.1,
           "idle": 3.0, "not_ours": 2.0}
    top = ceiling(handler, {"baseline_server": 0.9, "loadgen": 0.4}, phase, cpu, goal=0.4,
                  cores=2)
    assert top is not None
    assert top["handler_cpu_ms"] == pytest.approx(1 / 30, abs=1e-4)
    assert top["rest_cpu_ms"] == pytest.approx(0.17)
    assert top["max_tps"] == pytest.approx(2000 / (1 / 30 + 0.17), rel=1e-3)  # 9 836/s
    assert top["max_ratio"] == pytest.approx(0.364, abs=1e-3) and not top["reachable"]
    # 0.4 x 27 000/s on two cores leaves 0.185 ms a payment, 0.015 ms beside the rest
    assert top["switch_budget_ms"] == pytest.approx(2000 / 10_800 - 0.17, abs=1e-4)
    assert top["switch_cpu_ms"] == pytest.approx(0.2)
    line = format_ceiling(top, "payment")
    assert "0.364x" in line and "out of reach" in line and "postgres 0.100" in line
    assert ceiling(handler, {"baseline_server": 0.9}, phase, cpu, goal=0.3,
                   cores=2)["reachable"]  # type: ignore[index]
    # nothing to divide by: no figure rather than a wrong one
    assert ceiling(handler, {"baseline_server": 0.9}, {"completed": 0}, cpu, goal=0.4) is None
    assert ceiling(handler, {"loadgen": 0.4}, phase, cpu, goal=0.4) is None


async def test_the_ceiling_from_a_real_run_names_the_processes_it_adds(harness: Harness
                                                                      ) -> None:
    report: dict[str, Any] = {"scenario": "http", "phases": {}, "baselines": {}, "goals": {}}
    await aiohttp_baseline(harness, report, 2)
    figs, cpu = await harness.load(await harness.http_specs(name="http", connections=2))
    against_handler(report, "http_tps", figs["http"], cpu, 0.4)
    assert report["goals"]["http_tps_vs_aiohttp_minimal"]["goal"] == ">= 0.4"
    assert report["ratios"]["http_tps/aiohttp_minimal_tps"] > 0
    top = report.get("ceiling")
    assert top is not None, (report["cpu_baseline"], cpu)
    # the handler's process and the database were seen under the roles the figure adds
    assert top["handler_cpu_ms"] > 0 and top["rest_by_process_ms"]["postgres"] > 0
    assert top["switch_cpu_ms"] > 0
    assert top["max_tps"] > 0 and "ceiling:" in format_table(
        {"scenario": "http", "status": "pass", "ceiling": top})
    assert (await harness.books())["ok"]


def test_goals_over_repeated_runs_give_every_value_the_median_and_how_often_met() -> None:
    from bench.report import format_goals_over_runs, goals_over_runs

    def run(p99: float | None, ratio: float) -> dict[str, Any]:
        goals: dict[str, Any] = {"bank_tps_vs_pgbench_N": {"value": ratio, "goal": ">= 1.0",
                                                           "met": ratio >= 1.0}}
        if p99 is not None:  # a run whose open loop did not run has no such goal
            goals["p99_ms_at_70pct_open_loop"] = {"value": p99, "goal": "<= 20.0",
                                                  "met": p99 <= 20.0}
        return {"scenario": "bank", "goals": goals}

    over = goals_over_runs([run(14.0, 1.2), run(46.9, 1.3), run(19.4, 0.9), run(None, 1.1)])
    tail = over["p99_ms_at_70pct_open_loop"]
    assert tail == {"values": [14.0, 46.9, 19.4], "median": 19.4, "goal": "<= 20.0",
                    "met": 2, "runs": 3}
    tps = over["bank_tps_vs_pgbench_N"]
    assert tps["median"] == 1.15 and tps["met"] == 3 and tps["runs"] == 4
    text = format_goals_over_runs("bank", over, 4)
    assert "== bank: goals over 4 runs ==" in text
    assert ("p99_ms_at_70pct_open_loop: met in 2 of 3, median 19.4 (goal <= 20.0); "
            "runs: 14, 46.9, 19.4") in text


def test_repeat_runs_a_scenario_on_its_own_and_sums_its_goals_up(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from bench.__main__ import main

    out = tmp_path / "codec.json"
    assert main(["codec", "--repeat", "2", "--duration", "0.4", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["scenario"] == "codec" and doc["status"] == "pass" and len(doc["runs"]) == 2
    over = doc["goals_over_runs"]["codec_vs_pyiso8583_min_ratio"]
    assert over["runs"] == 2 and over["values"] == [
        r["goals"]["codec_vs_pyiso8583_min_ratio"]["value"] for r in doc["runs"]]
    assert "== codec: goals over 2 runs ==" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["codec", "--repeat", "0"])


async def test_a_phase_reading_has_no_flush_time_when_the_server_does_not_time_flushes(
        pool: asyncpg.Pool) -> None:
    # PostgreSQL counts 0 ms of flushing when it does not time them: read as 0, the phase
    # line said "of 0.0 ms each on average"
    from bench.scenarios import _DB_STATS

    async def flush_ms(con: Any) -> object:
        row = await con.fetchrow(_DB_STATS)
        assert row is not None
        return row["wal_fsync_ms"]

    async with pool.acquire() as con:
        try:
            await con.execute("SET track_wal_io_timing = off")
            assert await flush_ms(con) is None
            await con.execute("SET track_wal_io_timing = on")
            assert await flush_ms(con) is not None
        finally:
            await con.execute("RESET track_wal_io_timing")
