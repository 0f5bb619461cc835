"""Where the machine's CPU went during a measurement: every process, grouped by role.

On a small machine the load generator, the switch, PostgreSQL and the simulators share the same
cores, so a throughput figure means little without the split. `CpuSnapshot.take()` reads
`/proc` (user + system time of every process, and the machine's idle time); the difference of
two snapshots, grouped by `classify`, is the split over that interval.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuSnapshot", "classify", "cpu_split"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_times(pid_dir: Path) -> tuple[float, str, str, int] | None:
    try:
        stat = (pid_dir / "stat").read_text()
        cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'
    head, _, rest = stat.rpartition(")")
    comm = head.partition("(")[2]
    parts = rest.split()
    utime, stime = int(parts[11]), int(parts[12])
    return (utime + stime) / _TICK, comm, cmdline, int(parts[1])


def classify(comm: str, cmdline: str, loadgen: Collection[int], pid: int) -> str:
    """The role of one process, from its command line."""
    if pid in loadgen:
        return "loadgen"
    if pid == os.getpid():
        return "harness"
    if comm.startswith("postgres") or comm == "postmaster":
        return "postgres"
    if comm.startswith("redis"):
        return "redis"
    if comm == "pgbench":
        return "pgbench"
    if "switch.cli switch" in cmdline or "gridpay switch" in cmdline:
        return "switch"
    if "switch.cli hsm" in cmdline or "hsm_sim" in cmdline:
        return "hsm"
    if "switch.cli marketing" in cmdline or "marketing_sim" in cmdline:
        return "marketing"
    if "bench.baseline" in cmdline:
        return "baseline_server"
    if "bench.loadgen" in cmdline or "multiprocessing" in cmdline:
        return "loadgen"
    return "other"


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    at: float
    idle_s: float
    total_s: float
    procs: dict[int, tuple[float, str]]
    parents: dict[int, int]

    def ours(self) -> set[int]:
        """This process and every process descended from it."""
        children: dict[int, list[int]] = {}
        for pid, ppid in self.parents.items():
            children.setdefault(ppid, []).append(pid)
        out: set[int] = set()
        todo = [os.getpid()]
        while todo:
            pid = todo.pop()
            if pid not in out:
                out.add(pid)
                todo.extend(children.get(pid, ()))
        return out

    @classmethod
    def take(cls, loadgen: Collection[int] = ()) -> CpuSnapshot:
        procs: dict[int, tuple[float, str]] = {}
        parents: dict[int, int] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            t = _proc_times(d)
            if t is not None:
                pid = int(d.name)
                procs[pid] = (t[0], classify(t[1], t[2], loadgen, pid))
                parents[pid] = t[3]
        idle = total = 0.0
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            values = [int(v) / _TICK for v in fields]
            idle = values[3] + (values[4] if len(values) > 4 else 0.0)
            total = sum(values[:8])
        except (OSError, ValueError, IndexError):
            pass
        return cls(time.monotonic(), idle, total, procs, parents)


def cpu_split(before: CpuSnapshot, after: CpuSnapshot,
              loadgen: Collection[int] = ()) -> dict[str, float]:
    """CPU seconds per role between two snapshots, plus `idle` and `cores_busy` (average).

    Only processes descended from this one are ours; the rest of the machine (other users of a
    shared machine) is reported as `not_ours`."""
    out: dict[str, float] = {}
    ours = after.ours() | before.ours()
    for pid, (t, role) in after.procs.items():
        if pid in loadgen:
            role = "loadgen"
        elif pid not in ours:
            role = "not_ours"
        t0 = before.procs.get(pid, (0.0, role))[0]
        out[role] = out.get(role, 0.0) + max(0.0, t - t0)
    # processes that ended between the snapshots (load generators, pgbench) count too
    for pid, (_, role) in before.procs.items():
        if pid not in after.procs:
            out.setdefault(role, out.get(role, 0.0))
    wall = max(after.at - before.at, 1e-9)
    result = {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0.005}
    result["idle"] = round(after.idle_s - before.idle_s, 2)
    result["wall_s"] = round(wall, 2)
    result["cores_busy"] = round(((after.total_s - before.total_s)
                                  - (after.idle_s - before.idle_s)) / wall, 2)
    return result
