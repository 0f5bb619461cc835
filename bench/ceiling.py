"""How far the HTTP and IVR ratios could go on this machine, measured in the same run.

The `http` and `ivr` goals compare the switch with a minimal aiohttp handler that needs no
database, no Redis and no billing system. On a small machine those other processes share the
cores with the switch, so part of the machine is spent before the switch runs a line of its own.
`ceiling` puts a number on it, from two phases of one run:

- what the minimal handler's own process spent per request (aiohttp's request and response
  work: no switch built on aiohttp can spend less per request), and
- what every process other than the switch spent per completed request while the switch was
  loaded (PostgreSQL, Redis, the billing and HSM simulators, the load generator).

Their sum is the least CPU a request can cost the machine; the cores divided by it is the most
requests per second it could carry, even if the switch cost no more than the handler. Divided by
the handler's rate, that is the highest ratio this run's machine allows. The same figures give
the switch's budget: the CPU per request it may spend for the goal's rate to fit in the cores
beside the rest, to set against what it spent (`switch_cpu_ms`).

The figure leans in the switch's favour: the other processes' CPU is counted inside the phase
only (postings still queued for the billing system at its end cost more later), and all the
cores are assumed usable. It leans against it in one way: PostgreSQL's group commits grow with
the rate, so its CPU per payment would fall somewhat at a higher rate.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["REST", "ceiling", "format_ceiling"]

#: the processes that serve a switch's request besides the switch itself
REST = ("postgres", "redis", "marketing", "hsm", "loadgen")


def ceiling(handler: dict[str, Any], handler_cpu: dict[str, float], phase: dict[str, Any],
            cpu: dict[str, float], *, goal: float, cores: int | None = None
            ) -> dict[str, Any] | None:
    """The highest ratio to `handler` this machine allows (see the module's text), or None when
    a phase completed nothing or the handler's CPU was not seen."""
    cores = cores or os.cpu_count() or 1
    served, done = int(handler.get("completed") or 0), int(phase.get("completed") or 0)
    handler_s = float(handler_cpu.get("baseline_server") or 0.0)
    if served <= 0 or done <= 0 or handler_s <= 0 or not handler.get("tps"):
        return None
    per_request_ms = 1000 * handler_s / served
    rest = {k: round(1000 * float(cpu.get(k) or 0.0) / done, 4) for k in REST}
    rest_ms = sum(rest.values())
    tps = cores * 1000 / (per_request_ms + rest_ms)
    ratio = tps / float(handler["tps"])
    budget_ms = cores * 1000 / (goal * float(handler["tps"])) - rest_ms
    return {"cores": cores, "handler_cpu_ms": round(per_request_ms, 4),
            "rest_cpu_ms": round(rest_ms, 4), "rest_by_process_ms": rest,
            "switch_cpu_ms": round(1000 * float(cpu.get("switch") or 0.0) / done, 4),
            "switch_budget_ms": round(budget_ms, 4),
            "max_tps": round(tps, 1), "max_ratio": round(ratio, 3), "goal": goal,
            "reachable": ratio >= goal}


def format_ceiling(c: dict[str, Any], unit: str = "request") -> str:
    """One line for the report's table."""
    rest = ", ".join(f"{k} {v:.3f}" for k, v in c["rest_by_process_ms"].items() if v > 0)
    verdict = ("within reach" if c["reachable"]
               else "out of reach on this machine, whatever the switch does")
    return (f"ceiling: the rest of the machine spent {c['rest_cpu_ms']:.3f} ms of CPU per "
            f"{unit} ({rest}) and the minimal handler {c['handler_cpu_ms']:.3f} ms; "
            f"{c['cores']} cores carry at most {c['max_tps']:.0f}/s of that, "
            f"{c['max_ratio']:g}x the handler: the goal ({c['goal']:g}x) is {verdict}. "
            f"For the goal the switch could spend {c['switch_budget_ms']:.3f} ms a {unit}; "
            f"it spent {c['switch_cpu_ms']:.3f}")
