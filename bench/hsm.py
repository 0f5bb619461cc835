"""Benchmark: MAC verifications per second through `HsmClient` (M8 on a pooled, pipelined
client). `python -m bench.hsm [--host H --port P] [--duration S] [--concurrency N]`; without a
port it starts the simulator as a child process and stops it afterwards."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from switch.hsm_client import HsmClient, HsmError

__all__ = ["main", "run"]

MESSAGE = b"0200" + bytes(range(120))  # about the size of a bank-link payment


async def run(host: str, port: int, duration_s: float, concurrency: int,
              *, pool_size: int = 2) -> dict[str, Any]:
    """Verify MACs for `duration_s` with `concurrency` workers; returns the figures."""
    async with HsmClient(host, port, pool_size=pool_size, timeout=5.0) as hsm:
        key = (await hsm.generate_key("M6")).key_block  # A0 under the LMK: no authorisation
        mac = await hsm.generate_mac(key, MESSAGE)
        latencies: list[float] = []
        errors = 0
        mismatches = 0
        deadline = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal errors, mismatches
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    ok = await hsm.verify_mac(key, MESSAGE, mac)
                except HsmError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
                mismatches += 0 if ok else 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return 0.0
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3)

    return {
        "benchmark": "hsm_mac_verify",
        "duration_s": round(elapsed, 3),
        "concurrency": concurrency,
        "pool_size": pool_size,
        "verifications": len(latencies),
        "verifications_per_s": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": pct(1.0),
        "errors": errors,
        "mismatches": mismatches,
    }


async def _with_simulator(duration_s: float, concurrency: int, pool_size: int
                          ) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hsm_sim", "--port", "0", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None  # noqa: S101
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        if not line.startswith(b"READY "):
            raise RuntimeError("the HSM simulator did not start")
        port = int(json.loads(line[6:])["port"])
        return await run("127.0.0.1", port, duration_s, concurrency, pool_size=pool_size)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.hsm", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pool-size", type=int, default=2)
    args = parser.parse_args(argv)
    import uvloop

    if args.port is None:
        result = uvloop.run(_with_simulator(args.duration, args.concurrency, args.pool_size))
    else:
        result = uvloop.run(run(args.host, args.port, args.duration, args.concurrency,
                                pool_size=args.pool_size))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
