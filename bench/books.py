"""The books check that every benchmark run must pass, whatever its speed.

1. Every payment a load generator was told is approved is in the switch's ledger exactly once.
2. The ledger holds nothing else but payments whose answer never came back (a timeout: the
   client cannot know, a bank would reverse or ask).
3. Once the store-and-forward relay has drained (nothing pending, nothing dead), the marketing
   system holds exactly one posting per posting id of the outbox (credits and reversals), and
   nothing else; its net credit equals the ledger's payments minus its reversals.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg

from switch.business import filing_dates
from switch.payments.ledger import ledger_dates

__all__ = ["Books", "check_books", "wait_drained"]


@dataclass(slots=True)
class Books:
    ok: bool
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, **self.figures}


async def wait_drained(con: asyncpg.Connection, timeout_s: float) -> tuple[bool, float, int]:
    """Wait until the outbox has nothing pending; (drained, seconds waited, pending left)."""
    t0 = time.monotonic()
    pending = 0
    while True:
        pending = int(await con.fetchval("SELECT count(*) FROM outbox WHERE state = 'pending'"))
        if pending == 0:
            return True, time.monotonic() - t0, 0
        if time.monotonic() - t0 > timeout_s:
            return False, time.monotonic() - t0, pending
        await asyncio.sleep(0.2)


async def marketing_postings(url: str, dates: Iterable[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        for d in dates:
            async with s.get(url + "/postings", params={"date": d}) as r:
                r.raise_for_status()
                out.extend((await r.json())["postings"])
    return out


async def check_books(database_url: str, marketing_url: str, approved: Iterable[str],
                      unanswered: Iterable[str], *, drain_timeout_s: float = 120.0) -> Books:
    approved_keys = list(approved)
    unanswered_set = set(unanswered)
    problems: list[str] = []
    figures: dict[str, Any] = {}
    con = await asyncpg.connect(database_url)
    try:
        # 1 and 2: the ledger against what the clients were told
        rows = await con.fetch("SELECT dedup_key FROM payments")
        ledger = Counter(r["dedup_key"] for r in rows)
        told = Counter(approved_keys)
        figures["approved_responses"] = len(approved_keys)
        figures["ledger_payments"] = len(rows)
        missing = [k for k in told if ledger[k] == 0]
        doubled = [k for k, n in ledger.items() if n > 1]
        extra = [k for k in ledger if k not in told and k not in unanswered_set]
        if missing:
            problems.append(f"{len(missing)} approved payments are not in the ledger "
                            f"(e.g. {missing[0]})")
        if doubled:
            problems.append(f"{len(doubled)} payments are in the ledger more than once")
        if extra:
            problems.append(f"{len(extra)} ledger payments were never approved to a client "
                            f"(e.g. {extra[0]})")
        figures["unanswered"] = len(unanswered_set)
        figures["unanswered_in_ledger"] = sum(1 for k in unanswered_set if ledger[k])
        # 3: the marketing system, once drained
        drained, waited, pending = await wait_drained(con, drain_timeout_s)
        figures["drain_s"] = round(waited, 2)
        if not drained:
            problems.append(f"the outbox did not drain in {drain_timeout_s:.0f} s "
                            f"({pending} postings still pending)")
        dead = int(await con.fetchval("SELECT count(*) FROM outbox WHERE state = 'dead'"))
        if dead:
            problems.append(f"{dead} postings are dead letters")
        outbox = await con.fetch("SELECT posting_id, kind, amount FROM outbox")
        dates = [d.isoformat() for d in filing_dates(await ledger_dates(con))]
        totals = await con.fetchrow(
            "SELECT coalesce(sum(amount) FILTER (WHERE reversed_at IS NULL), 0) AS net,"
            "       count(*) FILTER (WHERE reversed_at IS NOT NULL) AS reversed FROM payments")
        assert totals is not None
    finally:
        await con.close()
    postings = await marketing_postings(marketing_url, dates)
    theirs = Counter(str(p["posting_id"]) for p in postings)
    ours = {str(r["posting_id"]) for r in outbox}
    figures["outbox_postings"] = len(ours)
    figures["marketing_postings"] = len(postings)
    figures["reversals"] = int(totals["reversed"])
    not_there = [p for p in ours if theirs[p] == 0]
    twice = [p for p, n in theirs.items() if n > 1]
    strangers = [p for p in theirs if p not in ours]
    if not_there:
        problems.append(f"{len(not_there)} postings never reached the marketing system "
                        f"(e.g. {not_there[0]})")
    if twice:
        problems.append(f"{len(twice)} postings are in the marketing system more than once")
    if strangers:
        problems.append(f"{len(strangers)} marketing postings have no outbox row")
    net = sum(int(p["amount"]) * (-1 if p["kind"] == "reversal" else 1) for p in postings)
    figures["marketing_net_fen"] = net
    figures["ledger_net_fen"] = int(totals["net"])
    if net != int(totals["net"]):
        problems.append(f"marketing net credit {net} fen differs from the ledger's "
                        f"{int(totals['net'])} fen")
    return Books(ok=not problems, problems=problems, figures=figures)
