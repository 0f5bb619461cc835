"""Figures from load-generator results, the table for people and the JSON for machines."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from bench.ceiling import format_ceiling
from bench.loadgen import new_histogram

__all__ = ["format_table", "summarise"]

PERCENTILES = (("p50_ms", 50.0), ("p90_ms", 90.0), ("p99_ms", 99.0), ("p999_ms", 99.9))


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stream name: throughput, latency percentiles (ms), codes, load-generator CPU."""
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_name[str(r["name"])].append(r)
    out: dict[str, dict[str, Any]] = {}
    for name, rs in by_name.items():
        hist = new_histogram()
        codes: dict[str, int] = defaultdict(int)
        for r in rs:
            hist.decode_and_add(r["hist"])
            for c, n in r["codes"].items():
                codes[c] += int(n)
        duration = max(float(r["duration_s"]) for r in rs)
        in_window = sum(int(r["completed_in_window"]) for r in rs)
        ok = sum(n for c, n in codes.items() if c in ("00", "200", "201"))
        fig: dict[str, Any] = {
            "workers": len(rs),
            "open_loop": bool(rs[0]["open_loop"]),
            "duration_s": duration,
            "issued": sum(int(r["issued"]) for r in rs),
            "completed": sum(int(r["completed"]) for r in rs),
            "tps": round(in_window / duration, 1) if duration else 0.0,
            "approved": ok,
            "error_rate": round(1 - ok / max(1, sum(codes.values())), 5),
            "codes": dict(sorted(codes.items())),
            "unanswered": sum(len(r["unanswered"]) for r in rs),
            "loadgen_cpu_s": round(sum(float(r["cpu_s"]) for r in rs), 2),
            "loadgen_build_cpu_s": round(sum(float(r["build_cpu_s"]) for r in rs), 2),
            # answers read after the clock stopped (the ISO generator decodes them then)
            "loadgen_settle_cpu_s": round(sum(float(r.get("settle_cpu_s", 0.0)) for r in rs), 2),
            "built_late": sum(int(r["built_late"]) for r in rs),
        }
        dialogs: dict[str, int] = defaultdict(int)
        for r in rs:
            for c, n in r.get("dialogs", {}).items():
                dialogs[c] += int(n)
        if dialogs:
            fig["dialogs"] = dict(dialogs)
        if any("cards_left" in r for r in rs):  # the fewest any worker had left: one that ran
            # out idled its callers before the clock stopped
            fig["cards_left"] = min(int(r.get("cards_left", 0)) for r in rs)
        for key, pct in PERCENTILES:
            fig[key] = round(hist.get_value_at_percentile(pct) / 1000, 3)
        fig["max_ms"] = round(hist.get_max_value() / 1000, 3)
        out[name] = fig
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def _once(value: Any, printed: list[Any]) -> Any:
    """`value`, unless it is empty or an equal one was printed already (then None)."""
    if not value or value in printed:
        return None
    printed.append(value)
    return value


def _vacuum(d: dict[str, Any]) -> str:
    """What the autovacuum daemon did during a phase, as a clause of its line."""
    text = ", autovacuum ran" if d.get("autovacuum_running") else ""
    for what in ("autovacuumed", "autoanalyzed"):
        if d.get(what):
            text += f" ({what} {', '.join(d[what])})"
    return text


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of one scenario's report."""
    lines = [f"== {report['scenario']} ==  ({report.get('status', '?')})"]
    nice = report.get("options", {}).get("switch_nice")
    if nice:
        lines.append(f"(the switch ran at nice {nice}, ahead of the rest of the test bed: not "
                     "the default figures)")
    if report.get("options", {}).get("wal_segments") == 0:
        lines.append("(a fresh cluster's WAL: new segments are created during the phases, "
                     "which a cluster in service would reuse; not the default figures)")
    phases = report.get("phases", {})
    if phases:
        cols = ("tps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "error_rate",
                "loadgen_cpu_s")
        lines.append(f"{'phase':<28}" + "".join(f"{c:>13}" for c in cols))
        printed: list[Any] = []  # streams of one load share their readings: printed once
        for name, fig in phases.items():
            lines.append(f"{name:<28}" + "".join(f"{_fmt(fig.get(c, '')):>13}" for c in cols))
            codes = fig.get("codes")
            if codes and set(codes) - {"00", "200", "201"}:
                lines.append(f"{'':<28}codes {codes}")
            db = _once(fig.get("db"), printed)
            if db:
                ckpt = ("a checkpoint was writing" if db["checkpoint_running"]
                        else "no checkpoint")
                vac = _vacuum(db)
                per_tx = (f" ({db['wal_bytes_per_tx']} B per payment)"
                          if db.get("wal_bytes_per_tx") is not None else "")
                created = db.get("wal_segments_created")
                segs = ("" if created is None else
                        f", {created} new WAL segment{'' if created == 1 else 's'}")
                flushes = ""
                if db.get("wal_fsyncs"):
                    took = (f" of {db['wal_fsync_ms']} ms each on average"
                            if db.get("wal_fsync_ms") is not None else "")
                    flushes = f", {db['wal_fsyncs']} WAL flushes{took}"
                lines.append(f"{'':<28}postgres: WAL {db['wal_mb']} MB{per_tx}{segs}"
                             f"{flushes}, {ckpt}{vac}")
                if "relay_backlog" in db:
                    first, last = db["relay_backlog"]
                    rate = (f"; forwarded meanwhile about {_fmt(fig['forwarded_tps'])}/s"
                            if "forwarded_tps" in fig else "")
                    lines.append(f"{'':<28}relay: {first} postings still to forward at the "
                                 f"start, {last} at the end{rate}")
            inside = _once(fig.get("switch"), printed)
            if inside:
                lines.append(f"{'':<28}inside the switch, mean: " + ", ".join(
                    f"{k} {v:g}" + ("" if k == "commit size" else " ms")
                    for k, v in inside.items()))
            tail = _once(fig.get("switch_over"), printed)
            if tail:
                lines.append(f"{'':<28}inside the switch, share slower: " + ", ".join(
                    f"{k} {v:g} %" for k, v in tail.items()))
    for pt in report.get("curve", []):
        ckpt = ", a checkpoint was writing" if pt.get("checkpoint_running") else ""
        ckpt += _vacuum(pt)
        if pt.get("relay_backlog"):
            ckpt += ", relay backlog {} -> {}".format(*pt["relay_backlog"])
        lines.append(f"curve {pt['fraction']:.0%} of peak: {_fmt(pt['tps'])}/s, p50 "
                     f"{_fmt(pt['p50_ms'])} ms, p99 {_fmt(pt['p99_ms'])} ms{ckpt}")
    sustained = report.get("sustained")
    for st in (sustained or {}).get("steps", []):
        if "error" in st:
            lines.append(f"sustained {st['fraction']:.0%} of peak: not run ({st['error']}); "
                         "the search stopped there")
            continue
        verdict = "kept up" if st["kept_up"] else "fell behind"
        backlog = st.get("relay_backlog") or ["?", "?"]
        unanswered = f", {st['unanswered']} unanswered" if st.get("unanswered") else ""
        lines.append(f"sustained {st['fraction']:.0%} of peak: {_fmt(st['tps'])}/s answered, "
                     f"about {_fmt(st.get('forwarded_tps'))}/s forwarded, p99 "
                     f"{_fmt(st['p99_ms'])} ms{unanswered}, relay backlog {backlog[0]} -> "
                     f"{backlog[1]}: {verdict}")
    if sustained is not None and sustained.get("best") is None:
        lines.append("sustained: no step kept up")
    elif sustained is not None and sustained.get("lower_bound"):
        lines.append("sustained: every step up to the peak kept up (a lower bound)")
    for name, b in report.get("baselines", {}).items():
        shown = {k: v for k, v in b.items() if k in ("tps", "latency_avg_ms", "clients",
                                                    "ratio_base", "per_s")}
        lines.append(f"baseline {name:<19} {shown}")
    if report.get("ratios"):
        lines.append("ratios: " + ", ".join(f"{k} {v:g}" for k, v in report["ratios"].items()))
    for name, g in report.get("goals", {}).items():
        mark = "MET " if g["met"] else "MISS"
        lines.append(f"goal [{mark}] {name}: {_fmt(g['value'])} (goal {g['goal']})")
    top = report.get("ceiling")
    if top:
        lines.append(format_ceiling(top, "turn" if report["scenario"] == "ivr" else "payment"))
    cpu = report.get("cpu")
    if cpu:
        lines.append("cpu seconds by process: " + ", ".join(f"{k} {v}" for k, v in cpu.items()))
    books = report.get("books")
    if books is not None:
        verdict = "balance" if books["ok"] else "DO NOT BALANCE: " + "; ".join(books["problems"])
        lines.append(f"books: {verdict} (approved {books.get('approved_responses')}, ledger "
                     f"{books.get('ledger_payments')}, marketing "
                     f"{books.get('marketing_postings')}, drained in {books.get('drain_s')} s)")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def goals_over_runs(reports: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each goal of repeated runs of one scenario (`--repeat`): its value in every run that
    measured it, the median, and in how many runs it was met. A figure that lands on either
    side of its goal from one identical run to the next (the bank's 70 % tail does, see
    docs/performance.md) is judged by this, not by one run."""
    values: dict[str, list[float]] = defaultdict(list)
    met: dict[str, int] = defaultdict(int)
    goal: dict[str, str] = {}
    for report in reports:
        for name, g in report.get("goals", {}).items():
            if not isinstance(g.get("value"), (int, float)):
                continue  # a run that could not measure it (a phase skipped or failed)
            values[name].append(float(g["value"]))
            met[name] += bool(g.get("met"))
            goal[name] = str(g.get("goal", ""))
    out: dict[str, dict[str, Any]] = {}
    for name, vs in values.items():
        out[name] = {"values": vs, "median": round(statistics.median(vs), 3),
                     "goal": goal[name], "met": met[name], "runs": len(vs)}
    return out


def format_goals_over_runs(scenario: str, over: dict[str, dict[str, Any]], runs: int) -> str:
    lines = [f"== {scenario}: goals over {runs} runs =="]
    for name, g in over.items():
        vals = ", ".join(_fmt(v) for v in g["values"])
        lines.append(f"{name}: met in {g['met']} of {g['runs']}, median {_fmt(g['median'])} "
                     f"(goal {g['goal']}); runs: {vals}")
    return "\n".join(lines)
