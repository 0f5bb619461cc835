"""`python -m bench SCENARIO [--duration S] [--connections N] [--rate R] [--json FILE]`.

Scenarios: codec, bank, post, http, ivr, mixed, failover, and all (every one in turn). Each
run starts its own system under test (services and one switch node, as child processes),
measures it against its baseline in the same run, and checks the books; the exit status is 1
when the books do not balance (or a scenario fails), 0 otherwise. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ALL = ("codec", "bank", "post", "http", "ivr", "mixed", "failover")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=(*ALL, "all", "hsm", "cards"))
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    p.add_argument("--connections", type=int, default=None,
                   help="connections per stream (default: per scenario)")
    p.add_argument("--rate", type=float, default=None,
                   help="open-loop rate per second (default: 70%% of the measured peak)")
    p.add_argument("--depth", type=int, default=24,
                   help="closed loop: requests in flight per link connection")
    p.add_argument("--workers", type=int, default=1, help="load-generator processes per stream")
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--pgbench-clients", type=int, default=16)
    p.add_argument("--switch-nice", type=int, default=0, metavar="N",
                   help="run the switch's event loop at this nice value (-10: ahead of the "
                        "databases, simulators and generators sharing its cores; needs root). "
                        "Reported beside the default figures, never instead of them")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the scenario N times, each on a fresh system, and end with each "
                        "goal's value in every run, its median and in how many runs it was met "
                        "(a figure such as the bank's 70 %% tail lands on either side of its "
                        "goal from one identical run to the next)")
    p.add_argument("--sustained", action="store_true",
                   help="bank: also find the highest rate whose forwarding to the billing "
                        "system keeps up (open-loop steps from 70 %% of the peak)")
    p.add_argument("--wal-segments", type=int, default=None, metavar="N",
                   help="WAL segments the fresh cluster gets ready for reuse before measuring, "
                        "as a server in service has them (default 48; 0: measure the fresh "
                        "cluster creating segments as it goes)")
    p.add_argument("--no-open-loop", action="store_true", help="skip the open-loop phase")
    p.add_argument("--no-baseline", action="store_true", help="skip the baselines")
    p.add_argument("--plot", metavar="PNG", help="bank: also draw the throughput-latency curve")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    return p


def _run_one(name: str, args: argparse.Namespace, rest: list[str]) -> tuple[dict[str, Any], bool]:
    from bench.report import format_table

    if name == "codec":
        from bench.codec import run as codec_run

        res = codec_run(min(args.duration, 4.0))
        ok = True
        goal = {"value": res["min_ratio"], "goal": ">= 3.0", "met": res["min_ratio"] >= 3.0}
        report = {"scenario": "codec", "status": "pass", **res,
                  "goals": {"codec_vs_pyiso8583_min_ratio": goal}}
        print("== codec ==  decode+encode messages/s")
        for d, f in res["dialects"].items():
            print(f"{d:<6} gridpay {f['gridpay_ops_s']:>10,}  pyiso8583 {f['pyiso8583_ops_s']:>9,}"
                  f"  ratio {f['ratio']}x")
        print(f"goal [{'MET ' if goal['met'] else 'MISS'}] codec ratio: {res['min_ratio']}"
              " (goal >= 3.0)")
        return report, ok
    if name == "failover":
        return _failover(args, rest)
    import uvloop

    from bench.scenarios import WAL_SEGMENTS, Options, run_scenario

    opts = Options(duration_s=args.duration, connections=args.connections, rate=args.rate,
                   depth=args.depth, customers=args.customers, workers=args.workers,
                   pgbench_clients=args.pgbench_clients, skip_open_loop=args.no_open_loop,
                   skip_baseline=args.no_baseline, switch_nice=args.switch_nice,
                   sustained=args.sustained,
                   wal_segments=(WAL_SEGMENTS if args.wal_segments is None
                                 else args.wal_segments))
    if name == "bank" and args.plot:
        from bench.curve import run_curve

        report = uvloop.run(run_curve(opts, Path(args.plot)))
    else:
        report = uvloop.run(run_scenario(name, opts))
    print(format_table(report), flush=True)
    return report, report.get("status") == "pass"


def _failover(args: argparse.Namespace, rest: list[str]) -> tuple[dict[str, Any], bool]:
    """The failover scenario is the fault-injection suite (bench/faults.py): each fault under
    bank, HTTP and IVR load, with the takeover time measured and the books checked."""
    from bench import faults

    argv = list(rest)
    if args.json:
        argv += ["--json", args.json + ".failover.json"]
    rc = int(faults.main(argv))
    return {"scenario": "failover", "status": "pass" if rc == 0 else "FAIL", "exit": rc}, rc == 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("hsm", "cards"):  # the standalone benchmarks
        module = __import__(f"bench.{argv[0]}", fromlist=["main"])
        return int(module.main(argv[1:]))
    args, rest = _parser().parse_known_args(argv)
    if rest and args.scenario != "failover":
        _parser().error(f"unrecognised arguments: {' '.join(rest)}")
    if args.repeat < 1:
        _parser().error("--repeat: at least 1")
    names = ALL if args.scenario == "all" else (args.scenario,)
    reports: list[dict[str, Any]] = []
    ok = True
    for name in names:
        runs: list[dict[str, Any]] = []
        for _ in range(args.repeat):
            try:
                report, good = _run_one(name, args, rest)
            except Exception as e:  # a scenario that cannot run fails the run, the rest go on
                report = {"scenario": name, "status": f"FAIL: {type(e).__name__}: {e}"}
                good = False
                print(f"== {name} ==  {report['status']}", flush=True)
            runs.append(report)
            ok = ok and good
        if args.repeat == 1:
            reports.append(runs[0])
            continue
        from bench.report import format_goals_over_runs, goals_over_runs

        over = goals_over_runs(runs)
        print(format_goals_over_runs(name, over, len(runs)), flush=True)
        reports.append({"scenario": name, "runs": runs, "goals_over_runs": over,
                        "status": "pass" if all(r.get("status") == "pass" for r in runs)
                        else "FAIL"})
    if args.json:
        doc: Any = reports[0] if len(reports) == 1 else {"scenarios": reports}
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
