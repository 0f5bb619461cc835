"""`make demo`: the whole system on its embedded services, every channel driven once.

Starts `gridpay up` on a fresh data directory (embedded PostgreSQL and Redis, the HSM and
marketing-system simulators), then plays, in order: the Internet portal and a service-hall
counter (HTTP API), a bank and the post office (ISO 8583 links), the card centre (a batch from
order to sale), and a customer recharging by telephone with one of those cards (IVR). It waits
until every credit has reached the marketing system, checks the books, prints a summary and
stops everything it started.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from switch.business import filing_dates
from switch.marketing_client import MarketingClient
from switch.payments.ledger import ledger_dates

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "demo-password-1"  # noqa: S105 - the demo's throwaway users


class Demo:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDPAY_")}
        self.env.update({"GRIDPAY_HOME": str(home), "GRIDPAY_HTTP_PORT": "0",
                         "GRIDPAY_BANK_PORT": "0", "GRIDPAY_POST_PORT": "0",
                         "GRIDPAY_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
        self.proc: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}
        self.rows: list[tuple[str, str, str]] = []

    def say(self, text: str) -> None:
        print(f"  {text}", flush=True)

    def row(self, channel: str, what: str, result: str) -> None:
        self.rows.append((channel, what, result))
        self.say(f"{channel:<10} {what:<42} {result}")

    # -- the system ----------------------------------------------------------------------

    def start(self) -> None:
        log = (self.home / "gridpay.log").open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "switch.cli", "up"], cwd=ROOT,
                                     env=self.env, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"gridpay up failed; see {self.home / 'gridpay.log'}")
            if line.startswith("READY "):
                self.ready = orjson.loads(line[6:])
                return
        raise SystemExit("gridpay up did not become ready in time")

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return rc

    def gridpay(self, *args: str, stdin: str | None = None) -> str:
        out = subprocess.run([sys.executable, "-m", "switch.cli", *args], cwd=ROOT,
                             env=self.env, input=stdin, capture_output=True, text=True,
                             timeout=120, check=False)
        if out.returncode != 0:
            raise SystemExit(f"gridpay {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.ready['ports']['http']}"

    # -- channels ------------------------------------------------------------------------

    async def accounts(self, s: aiohttp.ClientSession) -> list[str]:
        async with s.get(self.ready["services"]["marketing"] + "/accounts",
                         params={"limit": "200"}) as r:
            body = await r.json()
        active = [a for a in body["accounts"] if a["status"] == "active"]
        active.sort(key=lambda a: -a["arrears"])  # customers with bills to pay first
        return [a["account_no"] for a in active]

    async def internet_and_counter(self, s: aiohttp.ClientSession, acct: str) -> None:
        for channel, method, amount in (("internet", "wallet", 8850), ("counter", "cash", 20000)):
            key = self.gridpay("clients", "add", f"demo-{channel}", "--channel",
                               channel).strip().splitlines()[-1]
            h = {"Authorization": f"Bearer {key}"}
            async with s.get(f"{self.http}/v1/accounts/{acct}", headers=h) as r:
                acc = await r.json()
            self.row(channel, f"account {acct} ({acc['name']})",
                     f"arrears {acc['arrears'] / 100:.2f}")
            body = {"account_no": acct, "amount": amount, "method": method}
            async with s.post(f"{self.http}/v1/payments", json=body,
                              headers={**h, "Idempotency-Key": f"demo-{channel}"}) as r:
                pay = await r.json()
                self.row(channel, f"pay {amount / 100:.2f} by {method}",
                         f"{r.status} receipt {pay['receipt_no']}")
            async with s.post(f"{self.http}/v1/payments", json=body,
                              headers={**h, "Idempotency-Key": f"demo-{channel}"}) as r:
                self.row(channel, "same request again (a retry)",
                         f"{r.status} replayed={r.headers.get('Idempotent-Replayed')}")
        key = self.gridpay("clients", "add", "demo-internet-2", "--channel",
                           "internet").strip().splitlines()[-1]
        h = {"Authorization": f"Bearer {key}", "Idempotency-Key": "demo-reversal"}
        async with s.post(f"{self.http}/v1/payments", headers=h,
                          json={"account_no": acct, "amount": 100, "method": "bank_card"}) as r:
            pid = (await r.json())["payment_id"]
        async with s.post(f"{self.http}/v1/payments/{pid}/reversal", headers=h) as r:
            self.row("internet", "pay 1.00, then reverse it", f"{r.status} "
                     f"{(await r.json())['status']}")

    async def links(self, acct: str) -> None:
        from switch.keys import load_dev_keys
        from switch.links.client import BankClient

        keys = dict(load_dev_keys().institution_mac)
        for dialect, inst, name in (("bank", "01020000", "bank"), ("post", "01000000", "post")):
            port = self.ready["ports"][dialect]
            async with BankClient("127.0.0.1", port, dialect=dialect, institution=inst,
                                  mac_key=keys[inst]) as c:
                r = await c.sign_on()
                self.row(name, f"sign on as {inst}", f"39={r.fields[39]!s}")
                r = await c.request(c.inquiry(acct))
                self.row(name, "bill inquiry", f"39={r.fields[39]!s} due "
                         f"{int(str(r.fields[4])) / 100:.2f}")
                pay = c.payment(acct, 12345)
                r = await c.request(pay)
                tlv = r.tlv()
                self.row(name, "bill payment 123.45",
                         f"39={r.fields[39]!s} receipt {tlv.get('06') if tlv else ''}")
                r = await c.request(pay)
                self.row(name, "retransmission of the same payment", f"39={r.fields[39]!s}")
                small = c.payment(acct, 500)
                await c.request(small)
                r = await c.request(c.reversal(small))
                self.row(name, "payment 5.00 then reversal (0420)", f"39={r.fields[39]!s}")
                today = time.strftime("%m%d")
                r = await c.request(c.reconciliation(str(r.fields.get(15, today)), 2, 1,
                                                     12845, 500))
                self.row(name, "reconciliation 0500 (2 paid, 1 reversed)",
                         f"39={r.fields[39]!s}")
                if c.bad_macs:
                    raise SystemExit("a response MAC did not verify")

    async def cards(self, s: aiohttp.ClientSession) -> list[tuple[str, str]]:
        """A batch from order to sale; returns (serial, PIN) of the sold cards."""
        from crypto.pinblock import Format4Codec
        from switch.cards.files import parse_new_card_file
        from switch.cards.manufacturer import manufacture
        from switch.cards.serials import luhn_digit
        from switch.keys import load_dev_keys

        for user, role, hall in (("admin", "card_admin", None), ("approver", "approver", None),
                                 ("keeper", "storekeeper", None),
                                 ("manager", "hall_manager", "H01"),
                                 ("cashier", "cashier", "H01")):
            args = ["users", "add", user, "--role", role, "--password-stdin"]
            if hall:
                args += ["--hall", hall]
            self.gridpay(*args, stdin=PASSWORD + "\n")
        tokens: dict[str, str] = {}
        base = f"{self.http}/admin/v1"

        async def call(user: str, method: str, path: str, **kw: Any) -> Any:
            if user not in tokens:
                async with s.post(f"{base}/session",
                                  json={"username": user, "password": PASSWORD}) as r:
                    tokens[user] = (await r.json())["token"]
            async with s.request(method, base + path,
                                 headers={"Authorization": f"Bearer {tokens[user]}"},
                                 **kw) as r:
                if r.status >= 400:
                    raise SystemExit(f"{method} {path}: {r.status} {await r.text()}")
                if r.content_type.endswith("json"):
                    return await r.json()
                return await r.read()

        batch = await call("admin", "POST", "/batches", json={
            "face_value": 10000, "quantity": 50, "manufacturer": "acme"})
        self.row("cards", "order 50 cards of 100.00 (PINs made in the HSM)",
                 f"batch {batch['id']}")
        ncf = await call("admin", "GET", f"/batches/{batch['id']}/new-card-file")
        (self.home / "batch.ncf").write_bytes(ncf)
        manufacture(self.home / "batch.ncf", self.home / "batch.cbf", damaged=1, seed=5)
        report = await call("admin", "POST", f"/batches/{batch['id']}/card-back-file",
                            data=(self.home / "batch.cbf").read_bytes())
        self.row("cards", "manufacturer returns cards (1 damaged)",
                 f"matched {report['matched']}, discrepancies {len(report['discrepancies'])}")
        stocked = await call("admin", "POST", f"/batches/{batch['id']}/stock-in")
        self.row("cards", "stock in", f"{stocked['stocked_in']} in stock")
        req = await call("manager", "POST", "/requests", json={"face_value": 10000,
                                                               "quantity": 5})
        await call("approver", "POST", f"/requests/{req['id']}/approve")
        issue = await call("keeper", "POST", f"/requests/{req['id']}/issue")
        self.row("cards", "hall H01 requests 5, approved, issued", f"{issue['quantity']} issued")
        sale = await call("cashier", "POST", "/sales", json={"ranges": issue["ranges"]})
        self.row("cards", "cashier sells them", f"{sale['quantity']} sold")
        verify = await call("admin", "GET", "/operation-log/verify")
        self.row("cards", "operation log hash chain", "intact" if verify["ok"] else "BROKEN")
        parsed = parse_new_card_file(ncf.splitlines(keepends=True))
        codec = Format4Codec(load_dev_keys().print_key("acme"))
        pins = {r.serial: codec.decipher(r.encrypted_pin, r.serial) for r in parsed.records}
        sold = []
        for rng in issue["ranges"]:
            first = int(rng["first"][:-1])
            for i in range(rng["count"]):
                body = str(first + i)
                serial = body + luhn_digit(body)
                sold.append((serial, pins[serial]))
        return sold

    async def ivr(self, acct: str, card: tuple[str, str]) -> None:
        try:
            from switch.ivr.simulator import IvrSimulator
        except ModuleNotFoundError:
            self.row("ivr", "card recharge by telephone", "not available in this build")
            return
        from switch.keys import load_dev_keys

        key = self.gridpay("clients", "add", "demo-ivr", "--channel",
                           "ivr").strip().splitlines()[-1]
        sim = IvrSimulator(self.http, key, load_dev_keys().ivr_pin_key)
        try:
            result = await sim.recharge("13800138000", acct, card[0], card[1])
        finally:
            await sim.close()
        turn = next((t for t in result.turns if t.get("step") == "result"), result.last)
        spoken = " ".join(p["text"] for p in turn["prompts"])[:90]
        self.row("ivr", f"recharge card {card[0][:4]}…{card[0][-4:]} by phone",
                 f"{result.outcome} receipt {result.receipt_no}")
        self.row("ivr", "what the caller heard", spoken)

    async def books(self, s: aiohttp.ClientSession) -> bool:
        """Wait for store-and-forward to drain, then compare the ledger with the marketing
        system."""
        import asyncpg

        pool = await asyncpg.create_pool(self.ready["services"]["database"], min_size=1,
                                         max_size=2)
        assert pool is not None
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                pending = await pool.fetchval("SELECT count(*) FROM outbox WHERE state <> 'sent'")
                if pending == 0:
                    break
                await asyncio.sleep(0.2)
            ids = [r["posting_id"] for r in await pool.fetch("SELECT posting_id FROM outbox")]
            n_pay = await pool.fetchval("SELECT count(*) FROM payments")
            n_rev = await pool.fetchval("SELECT count(*) FROM reversals")
            dates = filing_dates(await ledger_dates(pool))
        finally:
            await pool.close()
        found: set[str] = set()
        async with MarketingClient.for_reconciliation(
                self.ready["services"]["marketing"]) as marketing:
            for d in dates:
                found |= {rec.posting.posting_id for rec in await marketing.postings_for_date(d)}
        there = sum(pid in found for pid in ids)
        self.row("books", f"{n_pay} payments + {n_rev} reversals = {len(ids)} credits",
                 f"{there} in the marketing system, {pending} pending")
        return there == len(ids) and pending == 0


async def _drive(demo: Demo) -> bool:
    async with aiohttp.ClientSession() as s:
        accounts = await demo.accounts(s)
        await demo.internet_and_counter(s, accounts[0])
        await demo.links(accounts[1])
        sold = await demo.cards(s)
        await demo.ivr(accounts[2], sold[0])
        return await demo.books(s)


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="gridpay-demo-"))
    demo = Demo(home)
    print("gridpay demo: starting the switch on embedded PostgreSQL and Redis ...", flush=True)
    started = time.monotonic()
    ok = False
    try:
        demo.start()
        r = demo.ready
        print(f"  node {r['node_id']} is {r['role']}: HTTP :{r['ports']['http']}, "
              f"bank link :{r['ports']['bank']}, post link :{r['ports']['post']}")
        print(f"  database {r['services']['database']}")
        print(f"  redis {r['services']['redis']}, HSM {r['services']['hsm']}, "
              f"marketing system {r['services']['marketing']}\n", flush=True)
        ok = asyncio.run(_drive(demo))
    finally:
        rc = demo.stop()
        print(f"\n  gridpay stopped (exit {rc}) after {time.monotonic() - started:.1f} s")
        if ok:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"  logs kept in {home}")
    width = max(len(w) for _, w, _ in demo.rows)
    print("\nSummary")
    print(f"  {'channel':<10} {'what':<{width}}  result")
    for ch, what, res in demo.rows:
        print(f"  {ch:<10} {what:<{width}}  {res}")
    print("\n  books balance: every credit reached the marketing system exactly once"
          if ok else "\n  books DO NOT balance")
    return 0 if ok and rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
