"""The `ivr` scenario: IVR servers walking card-recharge dialogs through the switch.

Each worker process runs `switch.ivr.simulator.IvrSimulator` (the IVR side: digits, and PINs
encrypted as format-4 PIN blocks under the IVR's PIN key), with `connections` callers in
flight, each recharging one test card after another until the clock runs out. The figure is
dialog turns per second (every HTTP exchange of a dialog is one turn), with the latency of
each turn; the baseline is the minimal aiohttp handler loaded by the HTTP load generator.

The test cards are made for the run: sold, face value 100.00 yuan, with random PINs whose
keyed tags are computed under the dev voucher-verification key, as the HSM computes them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg

from bench.loadgen import LoadSpec, gc_paused, new_histogram
from switch.keepalive import KeepAlivePool

if TYPE_CHECKING:
    from bench.scenarios import Harness

__all__ = ["ivr_worker", "make_cards", "run_ivr"]

PREFIX = "130225"
FACE = 10_000


async def make_cards(database_url: str, n: int, first_seq: int = 1
                     ) -> list[tuple[str, str]]:
    """`n` sold cards with known PINs: [(serial, pin)]."""
    from crypto.voucher import voucher_tag
    from switch.cards.serials import make_serial
    from switch.keys import load_dev_keys

    vvk = load_dev_keys().voucher_verification_key
    assert vvk is not None
    cards = [(make_serial(PREFIX, first_seq + i), f"{secrets.randbelow(10**12):012d}")
             for i in range(n)]
    expiry = dt.date.today() + dt.timedelta(days=365)
    con = await asyncpg.connect(database_url)
    try:
        async with con.transaction():
            batch = await con.fetchval(
                "INSERT INTO card_batches (face_value, quantity, expiry, manufacturer, prefix,"
                " first_seq, ordered_by, status) VALUES ($1, $2, $3, 'acme', $4, $5, 'bench',"
                " 'stocked') RETURNING id", FACE, n, expiry, PREFIX, first_seq)
            await con.copy_records_to_table(
                "cards", columns=["serial", "batch_id", "face_value", "state", "location",
                                  "expiry", "tag"],
                records=[(s, batch, FACE, "sold", "H1", expiry, voucher_tag(vvk, s, p))
                         for s, p in cards])
    finally:
        await con.close()
    return cards


async def ivr_worker(spec: LoadSpec, pipe: Connection) -> None:
    """A load-generator process of IVR callers (run by `bench.loadgen`)."""
    from switch.ivr.simulator import IvrSimulator, IvrSimulatorError
    from switch.keys import load_dev_keys

    hist = new_histogram()
    status: Counter[str] = Counter()
    dialogs: Counter[str] = Counter()
    approved: list[str] = []
    unanswered: list[str] = []
    window = {"end": 0.0, "turns": 0, "in_window": 0}

    # the turns go over kept-alive connections parsed in C (switch.keepalive), as cheap for
    # the load generator as the HTTP scenario's, so that it does not take the CPU the switch
    # is measured on
    pool = KeepAlivePool(f"http://{spec.host}:{spec.port}", size=spec.connections,
                         timeout_s=spec.timeout_s)

    class TimedIvr(IvrSimulator):
        async def _send(self, method: str, path: str, data: bytes | None,
                        headers: dict[str, str]) -> tuple[int, bytes]:
            extra = dict(headers)
            ctype = extra.pop("Content-Type", "application/json")
            return await pool.request(method, path, data, content_type=ctype, headers=extra)

        async def _request(self, method: str, path: str, body: dict[str, str] | None = None,
                           key: str | None = None) -> dict[str, Any]:
            t0 = time.monotonic()
            try:
                doc = await super()._request(method, path, body, key)
            except IvrSimulatorError as e:
                status[str(e.status)] += 1
                raise
            now = time.monotonic()
            hist.record_value(max(1, int((now - t0) * 1e6)))
            status["200"] += 1
            window["turns"] += 1
            if now <= window["end"]:
                window["in_window"] += 1
            return doc

    base = f"http://{spec.host}:{spec.port}"
    sim = TimedIvr(base, spec.api_key, load_dev_keys().ivr_pin_key)
    cards = list(spec.cards)
    pipe.send({"ready": True})
    msg = await asyncio.to_thread(pipe.recv)
    start = float(msg["start"])
    window["end"] = start + spec.duration_s
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    with gc_paused():  # no cyclic collection pausing the callers while the clock runs
        cpu1 = time.process_time()
        next_card = {"i": 0}

        async def caller(n: int) -> None:
            while time.monotonic() < window["end"] and next_card["i"] < len(cards):
                serial, pin = cards[next_card["i"]]
                next_card["i"] += 1
                ani = f"139{spec.worker:02d}{next_card['i']:06d}"
                acct = spec.accounts[next_card["i"] % len(spec.accounts)]
                try:
                    result = await sim.recharge(ani, acct, serial, pin)
                except (IvrSimulatorError, aiohttp.ClientError, OSError, TimeoutError) as e:
                    dialogs[type(e).__name__] += 1
                    unanswered.append(f"card:{serial}")  # the outcome is not known
                    continue
                dialogs[result.outcome] += 1
                if result.ok:
                    approved.append(f"card:{serial}")

        await asyncio.gather(*(caller(i) for i in range(spec.connections)))
        cpu2 = time.process_time()
    await sim.close()
    await pool.close()
    pipe.send({
        "name": spec.name, "worker": spec.worker, "issued": window["turns"],
        "completed": window["turns"], "completed_in_window": window["in_window"],
        "duration_s": spec.duration_s, "codes": dict(status), "dialogs": dict(dialogs),
        "hist": hist.encode(), "approved": approved, "unanswered": unanswered,
        "cpu_s": round(cpu2 - cpu1, 3), "build_cpu_s": 0.0, "built_late": 0,
        "open_loop": False, "cards_left": len(cards) - next_card["i"],
    })
    await asyncio.to_thread(pipe.recv)


async def run_ivr(h: Harness) -> dict[str, Any]:
    from bench.baseline import pgbench
    from bench.scenarios import against_handler, aiohttp_baseline

    o = h.opts
    callers = o.connections or 32
    report: dict[str, Any] = {"scenario": "ivr", "phases": {}, "baselines": {}, "goals": {},
                              "notes": []}
    if not o.skip_baseline:
        await aiohttp_baseline(h, report, callers)
        report["baselines"]["pgbench_N"] = await pgbench(h.db, o.duration_s, o.pgbench_clients)
    # a generous number of cards: more than the switch could recharge in the time (a dialog
    # is about eight turns; 1 500 dialogs a second would be 12 000 turns a second)
    n_cards = int(max(400, 1500 * o.duration_s))
    workers = max(1, o.workers)
    cards = await make_cards(h.db, n_cards)
    cid, key = await h.api_key("ivr")
    per = n_cards // workers
    specs = [LoadSpec(kind="ivr", name="ivr", host="127.0.0.1", port=h.stack.ports["http"],
                      connections=max(1, callers // workers), duration_s=o.duration_s,
                      worker=i, accounts=h.accounts, api_key=key, client_id=cid,
                      cards=tuple(cards[i * per:(i + 1) * per]), timeout_s=15.0)
             for i in range(workers)]
    figs, cpu = await h.load(specs)
    fig = figs["ivr"]
    fig["turns_per_s"] = fig["tps"]
    if not fig.get("cards_left"):
        report["notes"].append("the callers ran out of cards before the phase ended: the "
                               "turns' rate is a floor, not the switch's peak")
    report["phases"]["ivr turns (closed loop)"] = fig
    report["cpu"] = cpu
    against_handler(report, "ivr_turns", fig, cpu, 0.3)
    pg = report["baselines"].get("pgbench_N")
    if pg and pg["tps"]:
        report.setdefault("ratios", {})["ivr_turns/pgbench_N_tps"] = round(
            fig["tps"] / pg["tps"], 3)
    report["notes"].append("turns are driven by switch.ivr.simulator's dialogs over "
                           "switch.keepalive connections; its CPU is the loadgen figure")
    return report
