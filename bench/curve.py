"""The throughput-latency curve of the bank link: `python -m bench bank --plot FILE.png`.

It runs the `bank` scenario (baseline, closed-loop peak, books), then open-loop phases at 20 %,
40 %, 60 %, 70 %, 80 %, 90 % and 100 % of the measured peak, and draws p50/p99/p99.9 against
the achieved rate (matplotlib, from the `bench` extra; without it the figures are still in the
report and the JSON).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.scenarios import Harness, Options, machine, scenario_bank

__all__ = ["plot", "run_curve"]

FRACTIONS = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0)


async def run_curve(opts: Options, png: Path) -> dict[str, Any]:
    started = time.monotonic()
    async with Harness.open(opts) as h:
        report = await scenario_bank(h)
        peak = next(iter(report["phases"].values()))["tps"]
        points: list[dict[str, Any]] = []
        for frac in FRACTIONS:
            rate = max(10.0, frac * peak)
            figs, _ = await h.load(h.iso_specs("bank", name="curve", connections=8, rate=rate))
            f = figs["curve"]
            db = f.get("db", {})
            points.append({"offered": round(rate, 1), "fraction": frac, "tps": f["tps"],
                           "p50_ms": f["p50_ms"], "p99_ms": f["p99_ms"],
                           "p999_ms": f["p999_ms"], "max_ms": f["max_ms"],
                           "error_rate": f["error_rate"],
                           "checkpoint_running": db.get("checkpoint_running"),
                           "autovacuum_running": db.get("autovacuum_running"),
                           "wal_bytes_per_tx": db.get("wal_bytes_per_tx"),
                           "relay_backlog": db.get("relay_backlog"),
                           "autovacuumed": db.get("autovacuumed"),
                           "autoanalyzed": db.get("autoanalyzed")})
        report["curve"] = points
        report["books"] = await h.books()
    report.setdefault("options", {})["switch_nice"] = opts.switch_nice
    report["machine"] = machine()
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["status"] = "pass" if report["books"]["ok"] else "FAIL (books)"
    try:
        plot(points, peak, png)
        report["plot"] = str(png)
    except ImportError:
        report.setdefault("notes", []).append("matplotlib is not installed: no plot drawn")
    return report


def plot(points: list[dict[str, Any]], peak: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    xs = [p["tps"] for p in points]
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
        ax.plot(xs, [p[key] for p in points], marker="o", label=label)
    ck = [p for p in points if p.get("checkpoint_running")]
    if ck:  # phases during which PostgreSQL was writing a checkpoint
        ax.scatter([p["tps"] for p in ck], [p["p99_ms"] for p in ck], s=160, facecolors="none",
                   edgecolors="red", label="a checkpoint was writing")
    ax.axhline(20.0, color="grey", linestyle="--", linewidth=1, label="p99 goal (20 ms)")
    ax.axvline(peak, color="black", linestyle=":", linewidth=1, label="closed-loop peak")
    ax.set_yscale("log")
    ax.set_xlabel("bank payments per second (open loop, achieved)")
    ax.set_ylabel("latency, ms (from the scheduled send time)")
    ax.set_title("gridpay bank link: throughput vs latency (2 cores, everything on one box)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
