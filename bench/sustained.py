"""The bank rate the switch sustains with its forwarding kept up: `bench bank --sustained`.

The closed-loop peak counts payments answered; the relay forwards them to the billing system
afterwards, and at that peak it falls behind. This search counts only what is both answered
and forwarded: open-loop phases, each started with the relay's queue empty, at 70 % of the
peak and up in steps of 5 % of it (or down, when 70 % is already too much); a phase is kept up
when the relay's queue grew by no more than 2 % of the phase's payments (and nothing failed).
The figure is the highest rate kept up next to one that was not, as a ratio to `pgbench -N`
in the same run.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from bench.books import wait_drained
from bench.scenarios import Harness

__all__ = ["kept_up", "run_sustained"]

START, STEP, LAST, FLOOR = 0.70, 0.05, 1.0, 0.40
#: the relay's queue may grow by this share of a phase's payments and still count as kept up
SLACK = 0.02
#: ... or by this many, whichever is more: the postings in flight when the queue is read
IN_FLIGHT = 100
#: the phase must also have been answered at this share of the rate it was offered
ANSWERED = 0.97
DRAIN_S = 120.0


def kept_up(fig: dict[str, Any], offered: float | None = None) -> bool:
    """Did a phase's relay keep up with it, every payment answered and approved (see the
    module's text)?"""
    backlog = fig.get("db", {}).get("relay_backlog")
    if not backlog:  # the queue could not be read: not a phase to vouch for
        return False
    grew = backlog[1] - backlog[0]
    answered = offered is None or fig.get("tps", 0) >= ANSWERED * offered
    return bool(fig.get("error_rate", 1) == 0 and not fig.get("unanswered") and answered
                and grew <= max(IN_FLIGHT, SLACK * fig.get("completed", 0)))


async def _step(h: Harness, peak_tps: float, frac: float) -> dict[str, Any]:
    rate = max(10.0, frac * peak_tps)
    step: dict[str, Any] = {"offered": round(rate, 1), "fraction": round(frac, 2),
                            "kept_up": False}
    try:  # each step begins with the relay's queue empty
        con = await asyncpg.connect(h.db)
        try:
            drained, waited, left = await wait_drained(con, DRAIN_S)
        finally:
            await con.close()
    except (OSError, asyncpg.PostgresError) as e:
        drained, waited, left = False, 0.0, -1
        step["error"] = f"{type(e).__name__}: {e}"
    if not drained:  # the search ends here, and what the run found so far is kept
        step.setdefault("error", f"the relay did not drain within {DRAIN_S:.0f} s "
                                 f"({left} postings left)")
        return step
    step["drained_first_s"] = round(waited, 1)
    figs, _ = await h.load(h.iso_specs("bank", name="sustained", connections=8, rate=rate))
    f = figs["sustained"]
    step.update(tps=f["tps"], forwarded_tps=f.get("forwarded_tps"), p99_ms=f["p99_ms"],
                unanswered=f.get("unanswered", 0),
                relay_backlog=f.get("db", {}).get("relay_backlog"), kept_up=kept_up(f, rate))
    return step


async def run_sustained(h: Harness, peak_tps: float) -> dict[str, Any]:
    """Search the highest rate whose forwarding keeps up (see the module's text): up from
    70 % of the peak while each step keeps up, or, when 70 % does not, down until one does
    (not below `FLOOR`)."""
    steps: list[dict[str, Any]] = [await _step(h, peak_tps, START)]
    best: dict[str, Any] | None = steps[0] if steps[0]["kept_up"] else None
    frac = START
    if best is not None:
        while frac + STEP <= LAST + 1e-9:
            frac += STEP
            steps.append(await _step(h, peak_tps, frac))
            if not steps[-1]["kept_up"]:
                break
            best = steps[-1]
    elif "error" not in steps[0]:
        while frac - STEP >= FLOOR - 1e-9:
            frac -= STEP
            steps.append(await _step(h, peak_tps, frac))
            if steps[-1]["kept_up"] or "error" in steps[-1]:
                best = steps[-1] if steps[-1]["kept_up"] else None
                break
    # every step up to the peak kept up: the figure is a lower bound of what it sustains
    bound = best is not None and best is steps[-1] and best["fraction"] >= LAST - 1e-9
    return {"steps": steps, "best": best, "lower_bound": bound}
