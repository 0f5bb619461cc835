"""The fault-injection suite: `python -m bench.faults [--short] [--only F,...] [--json FILE]`.

A standby pair of real switch processes (`python -m switch.cli switch`) runs against services
this harness starts on loopback: PostgreSQL (by default a primary with a synchronous streaming
standby, `switch.replication`), Redis, the HSM simulator and the marketing-system simulator.
Each fault is injected under a steady load (HTTP payments with a few reversals, plus bank and
IVR load when those channels are installed); every operation is recorded, including those whose
outcome the client never learnt. After each fault the harness settles the unknown outcomes by
asking again with the same idempotency key, drains the store-and-forward queue and checks the
books:

* every approved transaction is in the ledger exactly once, and no approved answer was lost;
* the marketing system holds exactly one credit per approved transaction, and one reversal per
  reversed one (so, net, one credit per approved transaction less reversals);
* no card was redeemed twice, no posting became a dead letter;
* for faults that move the lease, the takeover time: from the fault to the first approved
  answer from the other node.

Everything is seeded (`--seed`), every wait is bounded, and nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import asyncpg
import orjson
import redis.asyncio as aioredis

from hsm_sim.server import HsmServer, HsmSettings, load_dev_settings, start_server
from marketing_sim.app import MarketingSettings, MarketingSim
from marketing_sim.app import start as start_marketing
from switch import db
from switch.business import filing_dates
from switch.clients import create_client
from switch.embedded import EmbeddedPostgres, EmbeddedRedis, _preexec, free_port
from switch.keys import load_dev_keys
from switch.links import iso_dedup_key
from switch.replication import ReplicatedPostgres
from switch.standby import TakeoverClock, lease_state

REPO = Path(__file__).resolve().parent.parent

# -- configuration -----------------------------------------------------------------------------

ALL_FAULTS = ("kill9_active", "sigstop_active", "redis_flush", "redis_restart", "marketing_down",
              "marketing_slow", "marketing_timeout_after_commit", "hsm_down",
              "db_primary_kill")
#: the faults that need services this harness owns (not shared test fixtures)
OWNED_SERVICE_FAULTS = frozenset({"redis_restart", "db_primary_kill"})


@dataclass(frozen=True, slots=True, kw_only=True)
class SuiteConfig:
    seed: int = 1
    faults: tuple[str, ...] = ALL_FAULTS
    http_rate: float = 60.0          # HTTP payments a second, all workers together
    http_workers: int = 8
    reversal_share: float = 0.05     # share of approved HTTP payments reversed at once
    bank_rate: float = 40.0          # bank 0200s a second (when the links are installed)
    ivr_rate: float = 4.0            # IVR recharge calls a second (when the IVR is installed)
    warm_s: float = 2.0              # load before the fault
    fault_s: float = 3.0             # how long a lasting fault lasts
    settle_s: float = 2.0            # load after healing
    op_deadline_s: float = 12.0      # an operation retries this long, then counts as unknown
    attempt_timeout_s: float = 2.0   # one HTTP attempt
    drain_timeout_s: float = 40.0
    takeover_limit_s: float = 3.0
    replicated: bool = True
    customers: int = 3000

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(ALL_FAULTS)
        if unknown:
            raise ValueError(f"unknown faults: {sorted(unknown)}")
        if self.http_rate <= 0 or self.http_workers <= 0:
            raise ValueError("http_rate and http_workers must be positive")


SHORT = SuiteConfig(faults=("kill9_active", "sigstop_active", "redis_flush",
                            "marketing_timeout_after_commit"),
                    http_rate=40.0, http_workers=6, warm_s=1.0, fault_s=2.0, settle_s=1.0,
                    op_deadline_s=10.0, replicated=False)

NODE_CONFIG = """
[node]
shutdown_grace_s = 3.0

[forwarder]
backoff_initial_s = 0.1
backoff_max_s = 1.0
"""


class SuiteError(Exception):
    """The suite could not run (as opposed to a fault that broke the books)."""


# -- the node processes --------------------------------------------------------------------------


class NodeProcess:
    """One `gridpay switch` child process."""

    def __init__(self, node_id: str, home: Path, env: dict[str, str], config: Path) -> None:
        # fixed link ports, as a bank front-end is configured with both nodes' addresses
        self.bank_port = free_port()
        self.post_port = free_port()
        self.node_id = node_id
        self.home = home
        self.env = env
        self.config = config
        self.log_path = home / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self._ready_seen = threading.Event()
        self.paused = False
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.env)
        env.update({"GRIDPAY_HOME": str(self.home), "GRIDPAY_NODE_ID": self.node_id,
                    "GRIDPAY_HTTP_PORT": "0", "GRIDPAY_BANK_PORT": str(self.bank_port),
                    "GRIDPAY_POST_PORT": str(self.post_port),
                    "PYTHONUNBUFFERED": "1"})
        self.ready = {}
        self._ready_seen.clear()
        with self.log_path.open("ab") as logf:
            # Popen from the loop's own thread: the parent-death signal follows that thread
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "switch.cli", "--config", str(self.config), "switch"],
                stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL, env=env,
                cwd=str(REPO), preexec_fn=_preexec(None, None, signal.SIGKILL),  # noqa: PLW1509
            )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True,
                                        name=f"{self.node_id}-stdout")
        self._reader.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with proc.stdout:  # closed at EOF, when the process is gone
            for raw in proc.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("READY ") and not self._ready_seen.is_set():
                    self.ready = orjson.loads(line[6:])
                    self._ready_seen.set()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None

    async def wait_ready(self, within_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        while not self._ready_seen.is_set():
            if self.proc is None or self.proc.poll() is not None:
                raise SuiteError(f"{self.node_id} exited before READY; see {self.log_path}")
            if time.monotonic() > deadline:
                raise SuiteError(f"{self.node_id} not READY within {within_s}s")
            await asyncio.sleep(0.02)
        return self.ready

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ready['ports']['http']}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._join_reader()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    async def stop(self, within_s: float = 15.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            await asyncio.to_thread(self._join_reader)
            return
        if self.paused:
            self.resume()
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, within_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 5)
        await asyncio.to_thread(self._join_reader)

    def log_lines(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with contextlib.suppress(OSError):
            for raw in self.log_path.read_bytes().splitlines():
                with contextlib.suppress(orjson.JSONDecodeError):
                    doc = orjson.loads(raw)
                    if isinstance(doc, dict):
                        out.append(doc)
        return out


# -- the cluster ---------------------------------------------------------------------------------


class Cluster:
    """Services (owned, or given as URLs) plus two node processes, `node-a` and `node-b`."""

    def __init__(self, root: Path, cfg: SuiteConfig, *, database_url: str | None = None,
                 redis_url: str | None = None) -> None:
        self.root = root
        self.cfg = cfg
        self.pg: EmbeddedPostgres | ReplicatedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        self.database_url = database_url or ""
        self.redis_url = redis_url or ""
        self.hsm: HsmServer | None = None
        self.hsm_settings: HsmSettings | None = None
        self.marketing: MarketingSim | None = None
        self.nodes: dict[str, NodeProcess] = {}
        self.api_key = ""
        self.api_client_id = ""
        self.pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.database_url:
            if self.cfg.replicated:
                self.pg = ReplicatedPostgres(self.root / "pg")
            else:
                self.pg = EmbeddedPostgres(self.root / "pg")
            self.pg.start()
            self.database_url = self.pg.url
        if not self.redis_url:
            self.redis = EmbeddedRedis(self.root / "redis")
            self.redis.start()
            self.redis_url = self.redis.url
        self.hsm_settings = dataclasses.replace(load_dev_settings(), host="127.0.0.1", port=0)
        self.hsm = await start_server(self.hsm_settings)
        self.hsm_settings = dataclasses.replace(self.hsm_settings, port=self.hsm.port)
        self.marketing = await start_marketing(MarketingSettings(
            host="127.0.0.1", port=0, data_dir=self.root / "marketing",
            customers=self.cfg.customers, seed=42))
        conn = await asyncpg.connect(self.database_url)
        try:
            await db.migrate(conn)
        finally:
            await conn.close()
        self.pool = await db.create_pool(self.database_url, min_size=1, max_size=4)
        client_id, self.api_key = await create_client(self.pool, "fault-suite", "internet")
        self.api_client_id = str(client_id)
        config = self.root / "node.toml"
        config.write_text(NODE_CONFIG)
        env = {"GRIDPAY_DATABASE_URL": self.database_url, "GRIDPAY_REDIS_URL": self.redis_url,
               "GRIDPAY_HSM_ADDR": f"127.0.0.1:{self.hsm.port}",
               "GRIDPAY_MARKETING_URL": self.marketing.url, "GRIDPAY_LOG_LEVEL": "INFO"}
        for nid in ("node-a", "node-b"):
            self.nodes[nid] = NodeProcess(nid, self.root / nid, env, config)
        self.nodes["node-a"].start()
        await self.nodes["node-a"].wait_ready()
        self.nodes["node-b"].start()
        await self.nodes["node-b"].wait_ready()

    async def holder(self) -> tuple[str | None, int]:
        assert self.pool is not None
        async with self.pool.acquire(timeout=5) as con:
            st = await lease_state(con)  # type: ignore[arg-type]
        return (st.holder if st.expires_in_s > 0 else None), st.epoch

    async def wait_pair(self, within_s: float = 60.0) -> str:
        """Both nodes running and READY, one of them holding the lease; returns the holder."""
        deadline = time.monotonic() + within_s
        for node in self.nodes.values():
            if not node.alive:
                node.start()
            await node.wait_ready(max(1.0, deadline - time.monotonic()))
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                holder, _ = await self.holder()
                if holder in self.nodes:
                    return holder
            await asyncio.sleep(0.05)
        raise SuiteError("no node holds the lease")

    async def restart_hsm(self) -> None:
        assert self.hsm_settings is not None
        self.hsm = await start_server(self.hsm_settings)

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes.values()), return_exceptions=True)
        if self.pool is not None:
            await self.pool.close()
        if self.marketing is not None:
            await self.marketing.close()
        if self.hsm is not None:
            self.hsm.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.hsm.wait_closed(), 5)
        if self.redis is not None:
            self.redis.stop()
        if self.pg is not None:
            self.pg.stop()


# -- recording operations ------------------------------------------------------------------------


@dataclass(slots=True)
class Op:
    """One operation as its client saw it."""

    channel: str                 # 'http', 'http-reversal', 'bank', 'ivr'
    key: str                     # idempotency key (or STAN, or card serial)
    account: str
    amount: int
    fault: str
    started: float
    outcome: str = "unknown"     # 'approved', 'declined', 'unknown'
    ended: float = 0.0
    node: str = ""
    payment_id: str = ""
    receipt: str = ""
    code: str = ""
    attempts: int = 0
    resolved: bool = False       # the outcome was learnt only by asking again afterwards
    extra: dict[str, Any] = field(default_factory=dict)


class Recorder:
    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.clock = TakeoverClock()
        self.fault = ""

    def new(self, channel: str, key: str, account: str, amount: int) -> Op:
        op = Op(channel, key, account, amount, self.fault, time.monotonic())
        self.ops.append(op)
        return op

    def approved(self, op: Op, node: str) -> None:
        op.outcome, op.node, op.ended = "approved", node, time.monotonic()
        self.clock.approved(node, op.ended, started=op.started)


class LoadGenerator(Protocol):
    """A source of steady load: runs until `stop` is set, then settles its unknowns."""

    name: str

    async def run(self, stop: asyncio.Event) -> None: ...

    async def resolve(self, deadline_s: float) -> None: ...


# -- HTTP payments -------------------------------------------------------------------------------

_RETRY_CODES = frozenset({"standby", "unavailable", "account_unverifiable", "request_in_progress"})


class HttpPaymentLoad:
    """Internet payments through `/v1/payments`, with a share reversed straight away.

    Like a real client with both nodes' addresses: it sends to the node that last approved, and
    on 503 `standby`, a connection error or a timeout it retries the same Idempotency-Key on the
    other node, until `op_deadline_s`; past that the outcome is unknown."""

    name = "http"

    def __init__(self, cluster: Cluster, rec: Recorder, rng: random.Random,
                 accounts: Sequence[str]) -> None:
        self.cluster = cluster
        self.rec = rec
        self.rng = rng
        self.accounts = list(accounts)
        self.cfg = cluster.cfg
        self.prefer = "node-a"
        self._session: aiohttp.ClientSession | None = None

    def _order(self) -> list[str]:
        names = list(self.cluster.nodes)
        names.sort(key=lambda n: n != self.prefer)
        return names

    async def _call(self, method: str, path: str, key: str, body: dict[str, Any] | None,
                    deadline: float) -> tuple[str, int, dict[str, Any], int]:
        """(node, status, document, attempts); status 0 when the deadline passed."""
        assert self._session is not None
        attempts = 0
        headers = {"Authorization": f"Bearer {self.cluster.api_key}", "Idempotency-Key": key}
        while time.monotonic() < deadline:
            for name in self._order():
                node = self.cluster.nodes[name]
                if not node.ready or time.monotonic() >= deadline:
                    continue
                attempts += 1
                try:
                    timeout = aiohttp.ClientTimeout(total=self.cfg.attempt_timeout_s)
                    async with self._session.request(method, node.http_url + path, json=body,
                                                     headers=headers, timeout=timeout) as r:
                        raw = await r.read()
                        status = r.status
                except (aiohttp.ClientError, TimeoutError, OSError):
                    continue
                doc: dict[str, Any] = {}
                with contextlib.suppress(orjson.JSONDecodeError):
                    parsed = orjson.loads(raw)
                    if isinstance(parsed, dict):
                        doc = parsed
                if status < 400 or (status < 500 and doc.get("code") not in _RETRY_CODES):
                    if status < 400:
                        self.prefer = name
                    return name, status, doc, attempts
                if doc.get("code") == "request_in_progress":
                    break  # the same node will answer once the first attempt is done
            await asyncio.sleep(0.03 + self.rng.random() * 0.03)
        return "", 0, {}, attempts

    async def pay(self, op: Op, deadline: float) -> None:
        body = {"account_no": op.account, "amount": op.amount, "method": "cash"}
        node, status, doc, n = await self._call("POST", "/v1/payments", op.key, body, deadline)
        op.attempts += n
        if status == 201:
            op.payment_id = str(doc.get("payment_id", ""))
            op.receipt = str(doc.get("receipt_no", ""))
            self.rec.approved(op, node)
        elif status:
            op.outcome, op.code, op.ended = "declined", str(doc.get("code", status)), \
                time.monotonic()

    async def reverse(self, op: Op, deadline: float) -> None:
        pid = op.extra["payment_id"]
        node, status, doc, n = await self._call("POST", f"/v1/payments/{pid}/reversal", op.key,
                                                None, deadline)
        op.attempts += n
        if status == 200 and doc.get("status") == "reversed":
            op.payment_id = pid
            self.rec.approved(op, node)
        elif status:
            op.outcome, op.code, op.ended = "declined", str(doc.get("code", status)), \
                time.monotonic()

    async def _worker(self, i: int, stop: asyncio.Event) -> None:
        rng = random.Random(self.rng.random())
        gap = self.cfg.http_workers / self.cfg.http_rate
        await asyncio.sleep(rng.random() * gap)
        while not stop.is_set():
            began = time.monotonic()
            op = self.rec.new("http", f"f{uuid.UUID(int=rng.getrandbits(128)).hex}",
                              rng.choice(self.accounts), rng.randint(100, 500_000))
            op.extra["dedup_key"] = f"http:{self.cluster.api_client_id}:{op.key}"
            await self.pay(op, time.monotonic() + self.cfg.op_deadline_s)
            if op.outcome == "approved" and rng.random() < self.cfg.reversal_share:
                rev = self.rec.new("http-reversal", f"r{op.key[1:]}", op.account, op.amount)
                rev.extra["payment_id"] = op.payment_id
                rev.extra["dedup_key"] = op.extra["dedup_key"]
                await self.reverse(rev, time.monotonic() + self.cfg.op_deadline_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(),
                                       max(0.0, gap - (time.monotonic() - began)))

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as self._session:
            await asyncio.gather(*(self._worker(i, stop) for i in range(self.cfg.http_workers)))
        self._session = None

    async def resolve(self, deadline_s: float) -> None:
        todo = [op for op in self.rec.ops
                if op.outcome == "unknown" and op.channel in ("http", "http-reversal")]
        if not todo:
            return
        deadline = time.monotonic() + deadline_s
        async with aiohttp.ClientSession() as self._session:
            for op in todo:
                op.resolved = True
                if op.channel == "http":
                    await self.pay(op, deadline)
                else:
                    await self.reverse(op, deadline)
        self._session = None


async def active_accounts(marketing_url: str, n: int = 400) -> list[str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(marketing_url + "/accounts", params={"limit": "1000"},
                         timeout=aiohttp.ClientTimeout(total=10)) as r:
            body = await r.json()
    out = [str(a["account_no"]) for a in body["accounts"] if a["status"] == "active"]
    if not out:
        raise SuiteError("the marketing simulator has no active account")
    return out[:n]


# -- bank payments (ISO 8583 over the bank link) -----------------------------------------------

BANK_INSTITUTION = "01020000"
_BANK_RETRY = frozenset({"91", "96"})


class BankPaymentLoad:
    """A bank front-end: one signed-on, pipelined connection to whichever node accepts it.

    A payment with no answer (link closed, timeout) or answered 91/96 is sent again unchanged
    (same STAN and transmission time) on the current link, reconnecting to either node; the
    switch answers a retransmission with the original result. Past `op_deadline_s` it is
    unknown; `resolve` asks once more the same way."""

    name = "bank"

    def __init__(self, cluster: Cluster, rec: Recorder, rng: random.Random,
                 accounts: Sequence[str], mac_key: bytes) -> None:
        from switch.links.client import BankClient

        self.cluster = cluster
        self.rec = rec
        self.rng = rng
        self.accounts = list(accounts)
        self.cfg = cluster.cfg
        self.mac_key = mac_key
        # builds every message (one STAN counter for the whole run); never connects
        self.builder = BankClient("127.0.0.1", 0, dialect="bank", institution=BANK_INSTITUTION,
                                  mac_key=mac_key, stan_start=rng.randint(1, 500_000))
        self._link: Any = None
        self._link_node = ""
        self._lock = asyncio.Lock()

    async def _connected(self, deadline: float) -> tuple[Any, str]:
        from switch.links.client import BankClient

        async with self._lock:
            if self._link is not None and not getattr(self._link, "_closed", False):
                return self._link, self._link_node
            if self._link is not None:
                with contextlib.suppress(Exception):
                    await self._link.close()
                self._link = None
            while time.monotonic() < deadline:
                for name, node in self.cluster.nodes.items():
                    c = BankClient("127.0.0.1", node.bank_port, dialect="bank",
                                   institution=BANK_INSTITUTION, mac_key=self.mac_key,
                                   timeout=self.cfg.attempt_timeout_s,
                                   stan_start=self.rng.randint(500_001, 999_999))
                    try:
                        await c.connect()
                        if (await c.sign_on()).fields.get(39) == "00":
                            self._link, self._link_node = c, name
                            return c, name
                    except Exception:  # noqa: S110 - refused (standby) or closed: next node
                        pass
                    with contextlib.suppress(Exception):
                        await c.close()
                await asyncio.sleep(0.05)
            raise TimeoutError("no node accepts the bank link")

    async def pay(self, op: Op, deadline: float) -> None:
        msg = op.extra["message"]
        frame = self.builder.encode(msg)
        while time.monotonic() < deadline:
            link = None
            try:
                link, node = await self._connected(deadline)
                op.attempts += 1
                resp = await link.request(msg, frame=frame)
            except Exception:
                # no answer: this node may be hung; the next attempt reconnects to either node
                async with self._lock:
                    if link is not None and self._link is link:
                        self._link = None
                        with contextlib.suppress(Exception):
                            await link.close()
                await asyncio.sleep(0.03)
                continue
            code = str(resp.fields.get(39, ""))
            if code == "00":
                tlv = resp.fields.get(48)
                op.receipt = str(tlv.get("06") or "") if tlv is not None else ""
                self.rec.approved(op, node)
                return
            if code not in _BANK_RETRY:
                op.outcome, op.code, op.ended = "declined", code, time.monotonic()
                return
            await asyncio.sleep(0.05)

    async def _worker(self, stop: asyncio.Event, workers: int) -> None:
        rng = random.Random(self.rng.random())
        gap = workers / self.cfg.bank_rate
        await asyncio.sleep(rng.random() * gap)
        while not stop.is_set():
            began = time.monotonic()
            acct, amount = rng.choice(self.accounts), rng.randint(100, 500_000)
            msg = self.builder.payment(acct, amount)
            stan, sent_at = str(msg.fields[11]), str(msg.fields[7])
            op = self.rec.new("bank", f"{stan}:{sent_at}", acct, amount)
            op.extra["message"] = msg
            op.extra["dedup_key"] = iso_dedup_key(BANK_INSTITUTION, stan, sent_at)
            await self.pay(op, time.monotonic() + self.cfg.op_deadline_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, gap - (time.monotonic() - began)))

    async def run(self, stop: asyncio.Event) -> None:
        workers = 4
        try:
            await asyncio.gather(*(self._worker(stop, workers) for _ in range(workers)))
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._link is not None:
            with contextlib.suppress(Exception):
                await self._link.close()
            self._link = None

    async def resolve(self, deadline_s: float) -> None:
        todo = [op for op in self.rec.ops if op.outcome == "unknown" and op.channel == "bank"]
        deadline = time.monotonic() + deadline_s
        try:
            for op in todo:
                op.resolved = True
                await self.pay(op, deadline)
        finally:
            await self._close()


# -- IVR card recharges -----------------------------------------------------------------------

_IVR_RETRY = frozenset({"standby", "unavailable", "turn_in_progress"})


class IvrRechargeLoad:
    """IVR servers walking card-recharge dialogs (`/ivr/v1`), with both nodes' addresses.

    Every input carries an Idempotency-Key; an input with no answer, or answered 503, is sent
    again with the same key to either node (the call's state is shared, so a call started on
    one node continues on the other). One call in ten tries a card that an earlier call already
    recharged, and must be refused (`card_used`)."""

    name = "ivr"

    def __init__(self, cluster: Cluster, rec: Recorder, rng: random.Random,
                 accounts: Sequence[str], cards: list[tuple[str, str]], api_key: str,
                 pin_key: bytes) -> None:
        from crypto.pinblock import Format4Codec

        self.cluster = cluster
        self.rec = rec
        self.rng = rng
        self.accounts = list(accounts)
        self.cards = cards
        self.used: list[tuple[str, str]] = []
        self.cfg = cluster.cfg
        self.api_key = api_key
        self._pin_codec = Format4Codec(pin_key)  # the PIN block an IVR builds, PAN = serial
        self.prefer = "node-a"
        self._session: aiohttp.ClientSession | None = None
        self._ani = itertools.count(13900000000 + rng.randint(0, 9_000_000))

    async def _send(self, method: str, path: str, body: dict[str, str] | None,
                    key: str | None, deadline: float) -> tuple[str, int, dict[str, Any]]:
        assert self._session is not None
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        while time.monotonic() < deadline:
            for name in sorted(self.cluster.nodes, key=lambda n: n != self.prefer):
                node = self.cluster.nodes[name]
                if not node.ready or time.monotonic() >= deadline:
                    continue
                try:
                    timeout = aiohttp.ClientTimeout(total=self.cfg.attempt_timeout_s)
                    async with self._session.request(method, node.http_url + path, json=body,
                                                     headers=headers, timeout=timeout) as r:
                        raw, status = await r.read(), r.status
                except (aiohttp.ClientError, TimeoutError, OSError):
                    continue
                doc: dict[str, Any] = {}
                with contextlib.suppress(orjson.JSONDecodeError):
                    parsed = orjson.loads(raw)
                    if isinstance(parsed, dict):
                        doc = parsed
                if status < 500 and doc.get("code") not in _IVR_RETRY:
                    if status < 400:
                        self.prefer = name
                    return name, status, doc
            await asyncio.sleep(0.03 + self.rng.random() * 0.03)
        return "", 0, {}

    def _steps(self, op: Op) -> list[tuple[str, dict[str, str]]]:
        serial, pin = op.extra["serial"], op.extra["pin"]
        return [("menu", {"digits": "1"}), ("enter_account", {"digits": op.account + "#"}),
                ("confirm_account", {"digits": "1"}),
                ("enter_card_serial", {"digits": serial + "#"}),
                ("enter_pin", {"pin_block": self._pin_codec.encipher(pin, serial).hex().upper()}),
                ("confirm_recharge", {"digits": "1"})]

    async def recharge(self, op: Op, deadline: float) -> None:
        """Walks (or resumes) the dialog of `op`; its progress is kept in `op.extra`."""
        from switch.ivr.simulator import spoken_digits

        call_id = op.extra["call_id"]
        if not op.extra.get("started"):
            node, status, doc = await self._send(
                "POST", "/ivr/v1/calls",
                {"call_id": call_id, "ani": op.extra["ani"], "dnis": "95598", "lang": "zh"},
                None, deadline)
            if status == 0:
                return
            if status >= 400 and doc.get("code") != "call_exists":
                op.outcome, op.code, op.ended = "declined", str(doc.get("code")), \
                    time.monotonic()
                return
            op.extra["started"] = True
            op.extra["turn"] = doc if status < 400 else {"step": "menu", "hangup": False,
                                                          "prompts": []}
        steps = self._steps(op)
        while op.extra.get("i", 0) < len(steps):
            i = op.extra.get("i", 0)
            expected, body = steps[i]
            turn = op.extra["turn"]
            if turn.get("step") != expected or turn.get("hangup"):
                prompts = turn.get("prompts") or [{"id": turn.get("step")}]
                op.outcome, op.code, op.ended = "declined", str(prompts[0]["id"]), \
                    time.monotonic()
                await self._send("DELETE", f"/ivr/v1/calls/{call_id}", None, None,
                                 time.monotonic() + 2)
                return
            op.attempts += 1
            node, status, doc = await self._send("POST", f"/ivr/v1/calls/{call_id}/input",
                                                 body, f"{call_id}-{i + 1}", deadline)
            if status == 0:
                return  # unknown for now: resumed by `resolve`
            if status >= 400:
                op.outcome, op.code, op.ended = "declined", str(doc.get("code")), \
                    time.monotonic()
                return
            op.extra["turn"], op.extra["i"] = doc, i + 1
            op.extra["node"] = node
        turn = op.extra["turn"]
        if turn.get("step") != "result":
            prompts = turn.get("prompts") or [{"id": turn.get("step")}]
            op.outcome, op.code, op.ended = "declined", str(prompts[0]["id"]), time.monotonic()
            return
        for p in turn.get("prompts", []):
            if p.get("id") == "result_txn":
                op.receipt = spoken_digits(str(p.get("text", "")), "zh")
        self.rec.approved(op, op.extra.get("node", ""))
        self.used.append((op.extra["serial"], op.extra["pin"]))
        await self._send("POST", f"/ivr/v1/calls/{call_id}/input", {"digits": "9"},
                         f"{call_id}-{len(steps) + 1}", time.monotonic() + 2)

    async def _worker(self, stop: asyncio.Event, workers: int) -> None:
        rng = random.Random(self.rng.random())
        gap = workers / self.cfg.ivr_rate
        await asyncio.sleep(rng.random() * gap)
        while not stop.is_set():
            began = time.monotonic()
            again = bool(self.used) and rng.random() < 0.1
            if not again and not self.cards:
                return  # out of cards
            serial, pin = rng.choice(self.used) if again else self.cards.pop()
            op = self.rec.new("ivr", serial, rng.choice(self.accounts), 0)
            op.extra.update({"serial": serial, "pin": pin, "call_id": f"fs-{uuid.uuid4().hex}",
                             "ani": str(next(self._ani)), "dedup_key": f"card:{serial}",
                             "reuse": again})
            await self.recharge(op, time.monotonic() + self.cfg.op_deadline_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, gap - (time.monotonic() - began)))

    async def run(self, stop: asyncio.Event) -> None:
        workers = 4
        async with aiohttp.ClientSession() as self._session:
            await asyncio.gather(*(self._worker(stop, workers) for _ in range(workers)))
        self._session = None

    async def resolve(self, deadline_s: float) -> None:
        todo = [op for op in self.rec.ops if op.outcome == "unknown" and op.channel == "ivr"]
        if not todo:
            return
        deadline = time.monotonic() + deadline_s
        async with aiohttp.ClientSession() as self._session:
            for op in todo:
                op.resolved = True
                await self.recharge(op, deadline)
        self._session = None


async def make_cards(pool: asyncpg.Pool, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` sold cards with known PINs (tags computed as the HSM does, under the dev VVK)."""
    from datetime import date, timedelta

    from crypto.voucher import voucher_tag
    from switch.cards.serials import make_serial
    from switch.keys import load_dev_keys

    vvk = load_dev_keys().voucher_verification_key
    assert vvk is not None
    rng = random.Random(seed)
    first = 500_000 + rng.randint(0, 400_000)
    expiry = date.today() + timedelta(days=365)
    batch = await pool.fetchval(
        "INSERT INTO card_batches (face_value, quantity, expiry, manufacturer, prefix,"
        " first_seq, ordered_by, status) VALUES (10000, $1, $2, 'acme', '130226', $3,"
        " 'fault-suite', 'stocked') RETURNING id", n, expiry, first)
    cards = [(make_serial("130226", first + i), f"{rng.randrange(10**12):012d}")
             for i in range(n)]
    await pool.executemany(
        "INSERT INTO cards (serial, batch_id, face_value, state, location, expiry, tag)"
        " VALUES ($1, $2, 10000, 'sold', 'H1', $3, $4)",
        [(serial, batch, expiry, voucher_tag(vvk, serial, pin)) for serial, pin in cards])
    return cards


# -- the books -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Books:
    ok: bool = True
    approved: int = 0
    reversed: int = 0
    ledger_payments: int = 0
    ledger_reversals: int = 0
    marketing_credits: int = 0
    marketing_reversals: int = 0
    unknown: int = 0
    violations: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.ok = False
        if len(self.violations) < 20:
            self.violations.append(what)


async def drain(pool: asyncpg.Pool, timeout_s: float) -> dict[str, int]:
    """Wait until the outbox holds nothing pending; returns the final counts."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await pool.fetch("SELECT state, count(*) AS n FROM outbox GROUP BY state")
        counts = {str(r["state"]): int(r["n"]) for r in rows}
        if counts.get("pending", 0) == 0 or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.1)


async def check_books(cluster: Cluster, ops: Sequence[Op]) -> Books:
    assert cluster.pool is not None and cluster.marketing is not None
    b = Books()
    pool = cluster.pool
    counts = await drain(pool, cluster.cfg.drain_timeout_s)
    if counts.get("pending", 0):
        b.fail(f"outbox not drained: {counts.get('pending')} pending")
    if counts.get("dead", 0):
        b.fail(f"dead letters: {counts['dead']}")
    rows = await pool.fetch(
        "SELECT p.id::text AS id, p.dedup_key, p.receipt_no, p.reversed_at IS NOT NULL AS rev,"
        " p.business_date, p.card_serial FROM payments p")
    ledger = {r["id"]: r for r in rows}
    by_key = {r["dedup_key"]: r for r in rows}
    b.ledger_payments = len(rows)
    b.ledger_reversals = sum(1 for r in rows if r["rev"])
    dup_keys = await pool.fetch("SELECT dedup_key FROM payments GROUP BY dedup_key"
                                " HAVING count(*) > 1")
    for r in dup_keys:
        b.fail(f"idempotency key posted twice: {r['dedup_key']}")
    dup_cards = await pool.fetch("SELECT card_serial FROM payments WHERE card_serial IS NOT NULL"
                                 " GROUP BY card_serial HAVING count(*) > 1")
    for r in dup_cards:
        b.fail(f"card redeemed twice: {r['card_serial']}")
    seen: dict[str, Op] = {}
    for op in ops:
        if op.outcome == "unknown":
            b.unknown += 1
            continue
        if op.outcome != "approved":
            continue
        if op.extra.get("reuse"):
            b.fail(f"card redeemed twice: {op.key}")
            continue
        if op.channel.endswith("reversal"):
            b.reversed += 1
            row = ledger.get(op.payment_id) or by_key.get(op.extra.get("dedup_key", ""))
            if row is None or not row["rev"]:
                b.fail(f"confirmed reversal not in the ledger: {op.key}")
            continue
        b.approved += 1
        row = ledger.get(op.payment_id) or by_key.get(op.extra.get("dedup_key", ""))
        if row is not None:
            op.payment_id = row["id"]
        if row is None:
            b.fail(f"approved answer lost: {op.channel} {op.key} {op.payment_id}")
            continue
        if row["receipt_no"] != op.receipt and op.receipt:
            b.fail(f"receipt differs for {op.payment_id}")
        if op.extra.get("dedup_key") and row["dedup_key"] != op.extra["dedup_key"]:
            b.fail(f"{op.key} answered with another operation's payment")
        other = seen.get(op.payment_id)
        if other is not None and other.key != op.key:
            b.fail(f"one payment answered for two operations: {op.payment_id}")
        seen[op.payment_id] = op
    # payments nobody was told about: possible only for outcomes still unknown
    orphans = len(set(ledger) - set(seen))
    if orphans > b.unknown:
        b.fail(f"{orphans} payments in the ledger that no client saw approved")
    # the marketing system: exactly the outbox, once each
    outbox = await pool.fetch("SELECT posting_id, kind, amount, state FROM outbox")
    dates = filing_dates(r["business_date"] for r in rows)
    posted: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as s:
        for d in dates:
            async with s.get(cluster.marketing.url + "/postings",
                             params={"date": d.isoformat()},
                             timeout=aiohttp.ClientTimeout(total=30)) as resp:
                body = await resp.json()
            for p in body["postings"]:
                if p["posting_id"] in posted:
                    b.fail(f"marketing holds a posting twice: {p['posting_id']}")
                posted[p["posting_id"]] = p
    b.marketing_credits = sum(1 for p in posted.values() if p["kind"] != "reversal")
    b.marketing_reversals = sum(1 for p in posted.values() if p["kind"] == "reversal")
    for r in outbox:
        p = posted.get(r["posting_id"])
        if p is None:
            b.fail(f"not credited in the marketing system: {r['posting_id']} ({r['state']})")
        elif p["amount"] != r["amount"] or p["kind"] != r["kind"]:
            b.fail(f"credited differently: {r['posting_id']}")
    extra = set(posted) - {r["posting_id"] for r in outbox}
    if extra:
        b.fail(f"{len(extra)} marketing postings the switch never made")
    if b.marketing_credits != b.ledger_payments:
        b.fail(f"marketing credits {b.marketing_credits} != ledger payments {b.ledger_payments}")
    if b.marketing_reversals != b.ledger_reversals:
        b.fail(f"marketing reversals {b.marketing_reversals} != ledger reversals "
               f"{b.ledger_reversals}")
    return b


# -- the faults ----------------------------------------------------------------------------------


@dataclass(slots=True)
class FaultResult:
    name: str
    ops: int = 0
    approved: int = 0
    declined: int = 0
    unknown_at_first: int = 0
    unknown_left: int = 0
    takeover_s: float | None = None
    books_ok: bool = False
    violations: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.books_ok and self.unknown_left == 0 and not self.notes.get("failed")


FaultFn = Callable[["Suite", FaultResult], Awaitable[None]]


async def _watch_lease(suite: Suite, res: FaultResult, epoch: int, within_s: float) -> None:
    """Notes when the lease moved past `epoch`, counted from the fault."""
    for _ in range(int(within_s / 0.02)):
        with contextlib.suppress(Exception):
            holder, now = await suite.cluster.holder()
            if holder is not None and now > epoch:
                at = suite.rec.clock.fault_at or time.monotonic()
                res.notes["lease_taken_s"] = round(time.monotonic() - at, 3)
                res.notes["new_holder"] = holder
                return
        await asyncio.sleep(0.02)


async def _wait_takeover(suite: Suite, res: FaultResult, within_s: float = 15.0) -> None:
    for _ in range(int(within_s / 0.02)):
        if suite.rec.clock.seconds is not None:
            break
        await asyncio.sleep(0.02)
    res.takeover_s = suite.rec.clock.seconds
    if res.takeover_s is None:
        res.notes["failed"] = f"no approval from another node within {within_s}s"


async def fault_kill9_active(suite: Suite, res: FaultResult) -> None:
    active = await suite.cluster.wait_pair()
    _, epoch = await suite.cluster.holder()
    suite.rec.clock.mark(active)
    suite.cluster.nodes[active].kill()
    res.notes["killed"] = active
    watch = asyncio.create_task(_watch_lease(suite, res, epoch, 15.0))
    await _wait_takeover(suite, res)
    await watch
    if res.takeover_s is not None and res.takeover_s > suite.cfg.takeover_limit_s:
        res.notes["failed"] = f"takeover {res.takeover_s:.2f}s > {suite.cfg.takeover_limit_s}s"
    suite.cluster.nodes[active].start()  # it comes back as the standby
    await suite.cluster.nodes[active].wait_ready()


def _demotions(node: NodeProcess, since_lines: int) -> list[str]:
    return [str(d.get("reason")) for d in node.log_lines()[since_lines:]
            if d.get("msg") == "demoting to standby"]


async def fault_sigstop_active(suite: Suite, res: FaultResult) -> None:
    active = await suite.cluster.wait_pair()
    node = suite.cluster.nodes[active]
    before = len(node.log_lines())
    _, epoch = await suite.cluster.holder()
    suite.rec.clock.mark(active)
    node.pause()
    res.notes["paused"] = active
    pause_s = suite.cfg.fault_s + 2.0  # the default lease is 2 s: well beyond it
    watch = asyncio.create_task(_watch_lease(suite, res, epoch, pause_s + 10))
    await _wait_takeover(suite, res, within_s=pause_s + 10)
    await watch
    left = pause_s - (time.monotonic() - (suite.rec.clock.fault_at or 0.0))
    if left > 0:
        await asyncio.sleep(left)
    node.resume()
    # the woken node must find itself fenced (lease lost, or a refused write) and demote
    deadline = time.monotonic() + 5.0
    reasons: list[str] = []
    while time.monotonic() < deadline:
        reasons = _demotions(node, before)
        if reasons:
            break
        await asyncio.sleep(0.05)
    res.notes["demoted"] = reasons
    holder, new_epoch = await suite.cluster.holder()
    res.notes["epoch"] = [epoch, new_epoch]
    if not reasons:
        res.notes["failed"] = "the paused node did not demote itself after SIGCONT"
    elif holder == active:
        res.notes["failed"] = "the paused node still holds the lease"
    async with aiohttp.ClientSession() as s:
        async with s.get(node.http_url + "/readyz",
                         timeout=aiohttp.ClientTimeout(total=5)) as r:
            res.notes["readyz_after"] = r.status
            if r.status != 503:
                res.notes["failed"] = f"the demoted node answers /readyz {r.status}"
    # its stale epoch is refused by the database
    assert suite.cluster.pool is not None
    try:
        async with suite.cluster.pool.acquire() as con, con.transaction():
            await con.execute("SELECT gridpay_fence($1)", epoch)
        res.notes["failed"] = "the stale epoch was not fenced"
    except asyncpg.PostgresError as e:
        res.notes["stale_epoch_write"] = f"refused ({e.sqlstate})"


async def fault_redis_flush(suite: Suite, res: FaultResult) -> None:
    r = aioredis.from_url(suite.cluster.redis_url)
    try:
        await r.flushall()
    finally:
        await r.aclose()
    res.notes["flushed"] = True
    await asyncio.sleep(suite.cfg.fault_s)


async def fault_redis_restart(suite: Suite, res: FaultResult) -> None:
    redis = suite.cluster.redis
    if redis is None:
        res.notes["skipped"] = "Redis is not owned by the suite"
        return
    await asyncio.to_thread(redis.stop)
    await asyncio.sleep(min(1.0, suite.cfg.fault_s))
    await asyncio.to_thread(redis.start)
    res.notes["restarted"] = True
    await asyncio.sleep(suite.cfg.fault_s)


async def _marketing(suite: Suite, res: FaultResult, **faults: Any) -> None:
    sim = suite.cluster.marketing
    assert sim is not None
    await sim.set_faults(**faults)
    res.notes["marketing_faults"] = faults
    await asyncio.sleep(suite.cfg.fault_s)
    await sim.clear_faults()


async def fault_marketing_down(suite: Suite, res: FaultResult) -> None:
    await _marketing(suite, res, down=True)


async def fault_marketing_slow(suite: Suite, res: FaultResult) -> None:
    await _marketing(suite, res, latency_ms=1500)  # beyond the switch's 0.8 s timeout


async def fault_marketing_timeout_after_commit(suite: Suite, res: FaultResult) -> None:
    await _marketing(suite, res, timeout_after_commit_rate=0.5, hold_ms=1500)


async def fault_hsm_down(suite: Suite, res: FaultResult) -> None:
    hsm = suite.cluster.hsm
    assert hsm is not None
    hsm.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(hsm.wait_closed(), 5)
    res.notes["down_s"] = suite.cfg.fault_s
    await asyncio.sleep(suite.cfg.fault_s)
    await suite.cluster.restart_hsm()


async def fault_db_primary_kill(suite: Suite, res: FaultResult) -> None:
    pg = suite.cluster.pg
    if not isinstance(pg, ReplicatedPostgres) or pg.promoted:
        res.notes["skipped"] = "needs a replicated database (not yet failed over)"
        return
    st = await asyncio.to_thread(pg.status)
    res.notes["before"] = {"sync_state": st.sync_state}
    suite.rec.clock.mark("", only_new=True)  # any node; operations sent after the kill
    pg.kill_primary()
    await asyncio.sleep(0.5)  # an HA manager notices and decides
    res.notes["promote_s"] = round(await asyncio.to_thread(pg.promote_standby), 3)
    await _wait_takeover(suite, res, within_s=20)
    await asyncio.sleep(suite.cfg.fault_s)


FAULTS: dict[str, FaultFn] = {
    "kill9_active": fault_kill9_active,
    "sigstop_active": fault_sigstop_active,
    "redis_flush": fault_redis_flush,
    "redis_restart": fault_redis_restart,
    "marketing_down": fault_marketing_down,
    "marketing_slow": fault_marketing_slow,
    "marketing_timeout_after_commit": fault_marketing_timeout_after_commit,
    "hsm_down": fault_hsm_down,
    "db_primary_kill": fault_db_primary_kill,
}


# -- the suite -----------------------------------------------------------------------------------


LoadFactory = Callable[["Suite"], Awaitable[LoadGenerator]]


async def _http_load(suite: Suite) -> LoadGenerator:
    return HttpPaymentLoad(suite.cluster, suite.rec, random.Random(suite.cfg.seed),
                           suite.accounts)


async def _bank_load(suite: Suite) -> LoadGenerator:
    mac = suite.keys.mac_key(BANK_INSTITUTION)
    return BankPaymentLoad(suite.cluster, suite.rec, random.Random(suite.cfg.seed + 1),
                           suite.accounts, mac)


async def _ivr_load(suite: Suite) -> LoadGenerator:
    cluster = suite.cluster
    assert cluster.pool is not None
    _, key = await create_client(cluster.pool, "fault-suite-ivr", "ivr")
    n = int(suite.cfg.ivr_rate * len(suite.cfg.faults) * 40) + 50
    cards = await make_cards(cluster.pool, n, suite.cfg.seed)
    return IvrRechargeLoad(cluster, suite.rec, random.Random(suite.cfg.seed + 2),
                           suite.accounts, cards, key, suite.keys.ivr_pin_key)


#: load generators by name
LOADS: dict[str, LoadFactory] = {"http": _http_load, "bank": _bank_load, "ivr": _ivr_load}


class Suite:
    def __init__(self, cluster: Cluster, cfg: SuiteConfig) -> None:
        self.cluster = cluster
        self.cfg = cfg
        self.rec = Recorder()
        self.loads: list[LoadGenerator] = []
        self.results: list[FaultResult] = []
        self.accounts: list[str] = []  # active customer accounts, read once for every load
        self.keys = load_dev_keys()

    async def prepare(self) -> None:
        assert self.cluster.marketing is not None
        self.accounts = await active_accounts(self.cluster.marketing.url)
        self.loads = [await make(self) for make in LOADS.values()]

    async def run_fault(self, name: str) -> FaultResult:
        res = FaultResult(name)
        started = time.monotonic()
        await self.cluster.wait_pair()
        self.rec.fault = name
        self.rec.clock = TakeoverClock()
        first = len(self.rec.ops)
        stop = asyncio.Event()
        runs = [asyncio.create_task(load.run(stop), name=f"load-{load.name}")
                for load in self.loads]
        try:
            await asyncio.sleep(self.cfg.warm_s)
            await FAULTS[name](self, res)
            await asyncio.sleep(self.cfg.settle_s)
        finally:
            stop.set()
            done, pending = await asyncio.wait(runs, timeout=self.cfg.op_deadline_s + 10)
            for t in pending:
                t.cancel()
            for t in done:
                if t.exception() is not None:
                    res.notes["failed"] = f"load failed: {t.exception()!r}"
        mine = self.rec.ops[first:]
        res.unknown_at_first = sum(1 for op in mine if op.outcome == "unknown")
        await self.cluster.wait_pair()
        for load in self.loads:
            await load.resolve(self.cfg.op_deadline_s + 10)
        res.ops = len(mine)
        res.approved = sum(1 for op in mine if op.outcome == "approved")
        res.declined = sum(1 for op in mine if op.outcome == "declined")
        res.unknown_left = sum(1 for op in mine if op.outcome == "unknown")
        res.notes["channels"] = _channel_figures(mine)
        books = await check_books(self.cluster, self.rec.ops)
        res.books_ok = books.ok
        res.violations = books.violations
        res.notes["books"] = {"approved": books.approved, "reversed": books.reversed,
                              "ledger": books.ledger_payments,
                              "marketing_credits": books.marketing_credits,
                              "marketing_reversals": books.marketing_reversals}
        res.seconds = round(time.monotonic() - started, 2)
        self.results.append(res)
        return res


def _channel_figures(ops: Sequence[Op]) -> dict[str, dict[str, Any]]:
    """Per channel: operations, approvals, and the p50/p99/max seconds an approval took
    (retries included: this is what the fault cost the client)."""
    out: dict[str, dict[str, Any]] = {}
    for ch in sorted({op.channel for op in ops}):
        mine = [op for op in ops if op.channel == ch]
        waits = sorted(op.ended - op.started for op in mine
                       if op.outcome == "approved" and not op.resolved)
        fig: dict[str, Any] = {"ops": len(mine),
                               "approved": sum(1 for op in mine if op.outcome == "approved")}
        declined: dict[str, int] = {}
        for op in mine:
            if op.outcome == "declined":
                declined[op.code] = declined.get(op.code, 0) + 1
        if declined:
            fig["declined"] = declined
        if waits:
            fig["p50_s"] = round(waits[len(waits) // 2], 3)
            fig["p99_s"] = round(waits[min(len(waits) - 1, int(len(waits) * 0.99))], 3)
            fig["max_s"] = round(waits[-1], 3)
        out[ch] = fig
    return out


async def run_suite(cfg: SuiteConfig, root: Path, *, database_url: str | None = None,
                    redis_url: str | None = None,
                    report: Callable[[FaultResult], None] | None = None) -> list[FaultResult]:
    """Start a cluster under `root`, run every fault of `cfg` in order, stop everything."""
    if database_url is not None or redis_url is not None:
        blocked = OWNED_SERVICE_FAULTS & set(cfg.faults)
        if blocked:
            raise SuiteError(f"faults {sorted(blocked)} need services owned by the suite")
    cluster = Cluster(root, cfg, database_url=database_url, redis_url=redis_url)
    suite = Suite(cluster, cfg)
    try:
        await cluster.start()
        await suite.prepare()
        for name in cfg.faults:
            res = await suite.run_fault(name)
            if report is not None:
                report(res)
    finally:
        await cluster.stop()
    return suite.results


# -- output --------------------------------------------------------------------------------------


def _fmt_takeover(r: FaultResult) -> str:
    return "-" if r.takeover_s is None else f"{r.takeover_s:.2f}s"


def table(results: Sequence[FaultResult]) -> str:
    head = ("| fault | ops | approved | declined | unknown (first → left) | takeover | books "
            "| result |\n|---|---:|---:|---:|---|---:|---|---|")
    lines = [head]
    for r in results:
        verdict = ("skipped" if r.notes.get("skipped") else "pass" if r.passed else "FAIL")
        lines.append(f"| {r.name} | {r.ops} | {r.approved} | {r.declined} | "
                     f"{r.unknown_at_first} → {r.unknown_left} | {_fmt_takeover(r)} | "
                     f"{'ok' if r.books_ok else 'BROKEN'} | {verdict} |")
    return "\n".join(lines)


def to_json(cfg: SuiteConfig, results: Sequence[FaultResult]) -> dict[str, Any]:
    return {"config": {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in dataclasses.asdict(cfg).items()},
            "results": [{**dataclasses.asdict(r), "passed": r.passed} for r in results]}


DOC_START = "<!-- fault-suite results: start -->"
DOC_END = "<!-- fault-suite results: end -->"


def results_markdown(cfg: SuiteConfig, results: Sequence[FaultResult]) -> str:
    lines = [f"Run of {time.strftime('%Y-%m-%d %H:%M %Z')}, seed {cfg.seed}, "
             f"{'replicated' if cfg.replicated else 'single'} PostgreSQL, load "
             f"{cfg.http_rate:g} HTTP + {cfg.bank_rate:g} bank payments/s + {cfg.ivr_rate:g} "
             "IVR recharges/s, faults lasting "
             f"{cfg.fault_s:g} s.", "", table(results), "",
             "| fault | channel | ops | approved | p50 | p99 | max |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for ch, fig in r.notes.get("channels", {}).items():
            lines.append(f"| {r.name} | {ch} | {fig['ops']:g} | {fig['approved']:g} | "
                         f"{fig.get('p50_s', 0):.3f}s | {fig.get('p99_s', 0):.3f}s | "
                         f"{fig.get('max_s', 0):.3f}s |")
    notes = [f"- `{r.name}`: " + ", ".join(
        f"{k} {v}" for k, v in r.notes.items() if k not in ("channels", "books"))
        for r in results]
    return "\n".join([*lines, "", *notes])


def update_doc(path: Path, cfg: SuiteConfig, results: Sequence[FaultResult]) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{DOC_START}\n{results_markdown(cfg, results)}\n{DOC_END}"
    if DOC_START in text and DOC_END in text:
        head, rest = text.split(DOC_START, 1)
        text = head + block + rest.split(DOC_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n")[0])
    p.add_argument("--short", action="store_true", help="the short version run by `make test`")
    p.add_argument("--only", default="", help=f"comma-separated faults of: {','.join(ALL_FAULTS)}")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="HTTP payments a second")
    p.add_argument("--no-replication", action="store_true",
                   help="one PostgreSQL server (db_primary_kill is then skipped)")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--doc", type=Path, default=None,
                   help="rewrite the results block of this Markdown file (docs/reliability.md)")
    args = p.parse_args(argv)
    cfg = SHORT if args.short else SuiteConfig()
    changes: dict[str, Any] = {}
    if args.only:
        changes["faults"] = tuple(f.strip() for f in args.only.split(",") if f.strip())
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.rate is not None:
        changes["http_rate"] = args.rate
    if args.no_replication:
        changes["replicated"] = False
    cfg = dataclasses.replace(cfg, **changes)
    root = Path(tempfile.mkdtemp(prefix="gridpay-faults-"))

    def report(r: FaultResult) -> None:
        print(f"{r.name}: {'pass' if r.passed else 'FAIL'} ops={r.ops} approved={r.approved} "
              f"unknown={r.unknown_at_first}->{r.unknown_left} takeover={_fmt_takeover(r)} "
              f"({r.seconds}s) {orjson.dumps(r.notes, default=str).decode()}"
              + (f" violations={r.violations}" if r.violations else ""), flush=True)

    import logging

    import uvloop

    # the harness's own pool complains loudly while the database fails over: keep it quiet
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # clients that gave up
    try:
        results = uvloop.run(run_suite(cfg, root, report=report))
    finally:
        if args.keep:
            print(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(table(results))
    if args.doc:
        update_doc(args.doc, cfg, results)
    if args.json:
        args.json.write_bytes(orjson.dumps(to_json(cfg, results), default=str,
                                           option=orjson.OPT_INDENT_2))
    return 0 if all(r.passed or r.notes.get("skipped") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
