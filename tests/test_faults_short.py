"""The short fault suite (`bench.faults`): real node processes, real services, real faults.

Each fault runs under a steady load of HTTP payments (and reversals); after each one the books
must balance: every approved payment in the ledger once, the marketing system credited once per
payment and once per reversal, nothing lost, nothing doubled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bench.faults import SHORT, FaultResult, run_suite


def _explain(results: list[FaultResult]) -> str:
    return "\n".join(f"{r.name}: passed={r.passed} takeover={r.takeover_s} notes={r.notes} "
                     f"violations={r.violations}" for r in results)


async def test_short_fault_suite(clean_db: str, clean_redis: str, tmp_path: Path) -> None:
    """kill -9 and SIGSTOP of the active node, Redis flushed, the marketing system timing out
    after committing: the takeover after kill -9 within 3 s, the books exact."""
    results = await run_suite(SHORT, tmp_path, database_url=clean_db, redis_url=clean_redis)
    assert [r.name for r in results] == list(SHORT.faults)
    assert all(r.passed for r in results), _explain(results)
    by = {r.name: r for r in results}
    kill = by["kill9_active"]
    assert kill.takeover_s is not None and kill.takeover_s <= 3.0, _explain(results)
    stop = by["sigstop_active"]
    assert stop.notes["demoted"] and stop.notes["readyz_after"] == 503, _explain(results)
    assert stop.notes["stale_epoch_write"].startswith("refused"), _explain(results)
    assert all(r.approved > 0 for r in results)


async def test_database_primary_killed(tmp_path: Path) -> None:
    """The primary PostgreSQL dies under load; its synchronous standby is promoted; nothing
    approved is lost (RPO 0) and payments resume."""
    cfg = dataclasses.replace(SHORT, faults=("db_primary_kill",), replicated=True)
    results = await run_suite(cfg, tmp_path)
    (r,) = results
    assert r.passed and not r.notes.get("skipped"), _explain(results)
    assert r.notes["before"]["sync_state"] == "sync"
    assert r.takeover_s is not None and r.approved > 0
