"""Card centre benchmark: order a batch (PINs in the HSM), write its new-card file,
manufacture it, reconcile the card-back file and stock it in; cards/s per phase, and the
longest the event loop went without a turn in each phase (a node runs these jobs on the loop
that answers its payments, so a long stall there is every channel's latency).

    python -m bench.cards [--cards 100000] [--database-url URL] [--in-flight 3]

The HSM simulator runs as its own process (as in production), the database is the one in
GRIDPAY_TEST_DATABASE_URL / --database-url or an embedded PostgreSQL in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from switch import db
from switch.cards import batches
from switch.cards.files import CardBackParser
from switch.cards.jobs import Progress
from switch.cards.manufacturer import manufacture
from switch.hsm_client import HsmClient
from switch.keys import load_dev_keys, provision_dev_keys
from switch.loop import tune_gc


@contextlib.contextmanager
def hsm_process() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-m", "hsm_sim", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if line.startswith("READY "):
                yield int(orjson.loads(line[6:])["port"])
                break
        else:
            raise RuntimeError("the HSM simulator did not start")
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from switch.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="gridpay-bench-") as d:
        pg = EmbeddedPostgres(Path(d) / "pg")
        pg.start()
        try:
            yield pg.url
        finally:
            pg.stop()


class LoopWatch:
    """The longest the event loop went without running a 1 ms timer, since the last `take`.

    Not `switch.loop.watch_lag`, which a node's lag metric uses: that reads the loop's clock,
    which uvloop keeps in whole milliseconds, and stalls of a few are what this measures."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - t - 0.001)

    async def take(self) -> float:
        await asyncio.sleep(0.002)  # a turn for the timer, so that a stall just ended counts
        worst, self.worst = self.worst, 0.0
        return worst

    def close(self) -> None:
        self._task.cancel()


async def run(cards: int, url: str, port: int, in_flight: int, workdir: Path) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    pool = await db.create_pool(url, min_size=2, max_size=in_flight + 4)
    hsm = HsmClient("127.0.0.1", port, pool_size=2, timeout=30.0)
    await hsm.start()
    tune_gc()  # as a node does once it has started: its stalls are what is measured
    phases: dict[str, float] = {}
    stalls: dict[str, float] = {}
    watch = LoopWatch()
    try:
        ring = await provision_dev_keys(hsm, load_dev_keys())
        order = batches.BatchOrder.validate(
            {"face_value": 10000, "quantity": cards, "manufacturer": "acme"},
            face_values=(5000, 10000, 20000, 50000), expiry_years=3)
        job = uuid.uuid4()
        await pool.execute("INSERT INTO card_jobs (id, kind, total, created_by)"
                           " VALUES ($1, 'bench', $2, 'bench')", job, cards)
        t0 = time.perf_counter()
        batch_id = await batches.create_batch(pool, order, issuer="1302", actor="bench",
                                              job_id=job)
        await batches.generate(pool, hsm, ring, batch_id, Progress(job_id=job, total=cards),
                               in_flight=in_flight)
        phases["order_and_generate"] = time.perf_counter() - t0
        stalls["order_and_generate"] = await watch.take()

        t0 = time.perf_counter()
        ncf = workdir / f"batch-{batch_id}.ncf"
        with ncf.open("wb") as fh:
            async for chunk in batches.new_card_file(pool, batch_id):
                fh.write(chunk)
        phases["new_card_file"] = time.perf_counter() - t0
        stalls["new_card_file"] = await watch.take()

        t0 = time.perf_counter()
        cbf = workdir / f"batch-{batch_id}.cbf"
        manufacture(ncf, cbf, missing=3, damaged=2, changed_face=1, unexpected=1)
        phases["manufacturer_simulator"] = time.perf_counter() - t0
        await watch.take()  # the simulator stands for the manufacturer: not the node's stall

        t0 = time.perf_counter()
        parser = CardBackParser()
        with cbf.open("rb") as fh:
            await batches.feed_card_back(parser, fh)
        rec = await batches.reconcile_batch(pool, batch_id, parser.result().records,
                                            actor="bench")
        phases["card_back_and_reconcile"] = time.perf_counter() - t0
        stalls["card_back_and_reconcile"] = await watch.take()

        t0 = time.perf_counter()
        out = await batches.stock_in(pool, batch_id, actor="bench")
        phases["stock_in"] = time.perf_counter() - t0
        stalls["stock_in"] = await watch.take()
    finally:
        watch.close()
        await hsm.close()
        await pool.close()
    switch_total = sum(v for k, v in phases.items() if k != "manufacturer_simulator")
    return {"cards": cards, "in_flight": in_flight,
            "seconds": {k: round(v, 2) for k, v in phases.items()},
            "cards_per_s": {k: round(cards / v) for k, v in phases.items()},
            "switch_total_s": round(switch_total, 2),
            "worst_loop_stall_ms": {k: round(v * 1000, 1) for k, v in stalls.items()},
            "reconciliation": rec.counts(), "matched": rec.matched,
            "stocked_in": out["stocked_in"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.cards")
    p.add_argument("--cards", type=int, default=100_000)
    p.add_argument("--in-flight", type=int, default=batches.IN_FLIGHT)
    p.add_argument("--database-url", default=os.environ.get("GRIDPAY_TEST_DATABASE_URL"))
    a = p.parse_args(argv)
    import uvloop

    with database(a.database_url) as url, hsm_process() as port, \
            tempfile.TemporaryDirectory(prefix="gridpay-cards-") as work:
        result = uvloop.run(run(a.cards, url, port, a.in_flight, Path(work)))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
