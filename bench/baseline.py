"""Baselines measured in the same run as the switch, on the same machine.

- `pgbench -N` (the "simple update" TPC-B-like transaction: one UPDATE, one SELECT, one INSERT,
  one commit with fsync) on the same PostgreSQL server, in a database of its own.
- A minimal aiohttp JSON handler (`python -m bench.baseline`): it parses the JSON body and
  answers JSON, on uvloop, access log off, the way the switch's HTTP listener runs. It is loaded
  by the same load generator as the switch.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import asyncpg

__all__ = ["main", "pgbench"]


def _pgbench_bin() -> str:
    from switch.embedded import pg_bin_dir

    return str(pg_bin_dir() / "pgbench")


async def _ensure_db(database_url: str, name: str) -> str:
    con = await asyncpg.connect(database_url)
    try:
        exists = await con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()
    base, _, _ = database_url.rpartition("/")
    return f"{base}/{name}"


async def pgbench(database_url: str, duration_s: float, clients: int, *, scale: int = 10,
                  threads: int = 2) -> dict[str, Any]:
    """Initialise (once) and run `pgbench -N` for `duration_s`; its TPS and latency."""
    url = await _ensure_db(database_url, "pgbench")
    con = await asyncpg.connect(url)
    try:
        ready = await con.fetchval("SELECT to_regclass('pgbench_accounts') IS NOT NULL")
    finally:
        await con.close()
    if not ready:
        await asyncio.to_thread(subprocess.run,
                                [_pgbench_bin(), "-i", "-q", "-s", str(scale), url],
                                check=True, capture_output=True, timeout=300)
    args = [_pgbench_bin(), "-N", "-n", "-c", str(clients), "-j", str(threads), "-T",
            str(max(1, round(duration_s))), "-r", url]
    proc = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True,
                                   timeout=duration_s + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed: {proc.stderr.strip()[-300:]}")
    tps = re.search(r"tps = ([0-9.]+)", proc.stdout)
    lat = re.search(r"latency average = ([0-9.]+) ms", proc.stdout)
    n = re.search(r"number of transactions actually processed: ([0-9]+)", proc.stdout)
    return {"tps": float(tps.group(1)) if tps else 0.0,
            "latency_avg_ms": float(lat.group(1)) if lat else None,
            "transactions": int(n.group(1)) if n else None, "clients": clients,
            "threads": threads, "duration_s": max(1, round(duration_s)), "scale": scale,
            "command": " ".join(args[:-1]) + " <db>"}


# -- the minimal aiohttp handler --------------------------------------------------------------


def _app() -> Any:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"ok": True, "account_no": body.get("account_no"),
                                  "amount": body.get("amount")}, status=201)

    app = web.Application()
    app.router.add_post("/v1/payments", handle)
    return app


async def _serve(host: str, port: int) -> None:
    import signal

    from aiohttp import web

    runner = web.AppRunner(_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = int(sockets[0].getsockname()[1]) if sockets else port
    print(f'READY {{"port": {bound}}}', flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.baseline",
                                description="a minimal aiohttp JSON handler (the HTTP baseline)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)
    import uvloop

    uvloop.run(_serve(a.host, a.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
