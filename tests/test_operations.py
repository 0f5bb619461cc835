"""`gridpay up` as an operator runs it: READY line, health, graceful stop, crash recovery, and
the one-shot commands against its embedded database."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDPAY_")}
    env.update({"GRIDPAY_HOME": str(home), "GRIDPAY_HTTP_PORT": "0", "GRIDPAY_BANK_PORT": "0",
                "GRIDPAY_POST_PORT": "0", "GRIDPAY_MARKETING_CUSTOMERS": "2000",
                "PYTHONUNBUFFERED": "1"})
    return env


def _gridpay(*args: str, home: Path, stdin: str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "switch.cli", *args], cwd=ROOT, env=_env(home),
                          input=stdin, capture_output=True, text=True, timeout=timeout)


class Up:
    def __init__(self, home: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "switch.cli", "up"], cwd=ROOT,
                                     env=_env(home), stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.ready: dict[str, Any] = {}
        deadline = time.monotonic() + 120
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"gridpay up exited with {self.proc.wait()}")
            if line.startswith("READY "):
                self.ready = orjson.loads(line[6:])
                return
        raise AssertionError("no READY line")

    def stop(self, sig: int = signal.SIGTERM, within_s: float = 15) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(within_s)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.ready['ports']['http']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback
                return int(r.status), r.read()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read()


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for c in children:
        out.add(int(c))
        out |= _descendants(int(c))
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            os.kill(p, 0)
            stat = Path(f"/proc/{p}/stat").read_text()
            if ") Z " not in stat:
                alive.add(p)
        except (OSError, ProcessLookupError):
            pass
    return alive


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "home"


@pytest.mark.timeout(240)
def test_up_ready_health_and_graceful_stop(home: Path) -> None:
    up = Up(home)
    r = up.ready
    assert r["role"] == "active" and r["node_id"] and r["home"] == str(home)
    assert all(isinstance(r["ports"][k], int) and r["ports"][k] > 0
               for k in ("http", "bank", "post"))
    assert r["services"]["database"].startswith("postgresql://")
    assert up.get("/healthz")[0] == 200
    status, body = up.get("/readyz")
    assert status == 200, body
    assert b"gridpay_node_active 1.0" in up.get("/metrics")[1]
    children = _descendants(up.proc.pid)
    assert len(children) >= 4  # postgres, redis, hsm, marketing (and postgres' own workers)

    # one-shot commands against the running embedded database
    out = _gridpay("clients", "add", "portal", "--channel", "internet", home=home)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("gp_") and len(key) > 30
    # a second key under the same name (a rotation) is told what revoking by name does
    out = _gridpay("clients", "add", "portal", "--channel", "internet", home=home)
    assert out.returncode == 0 and "1 other key(s) in force" in out.stderr, out.stderr
    for bad in ("", " portal", "x" * 65, "tab\there"):
        out = _gridpay("clients", "add", bad, "--channel", "internet", home=home)
        assert out.returncode == 2 and "1 to 64 printable" in out.stderr, (bad, out.stderr)
    out = _gridpay("clients", "revoke", "portal", home=home)
    assert out.returncode == 0 and "2 key(s) revoked" in out.stdout, out.stderr
    out = _gridpay("clients", "revoke", "portal", home=home)  # nothing left to revoke
    assert out.returncode == 1 and "no client named" in out.stderr
    out = _gridpay("dev", "keys", "--json", home=home)
    assert out.returncode == 0 and "01020000" in out.stdout
    day = time.strftime("%Y-%m-%d")
    out = _gridpay("recon", "export", "--institution", "01020000", "--date", day, home=home)
    assert out.returncode == 0 and out.stdout.startswith("H|01020000|")
    out = _gridpay("recon", "export", "--institution", "99", "--date", day, home=home)
    assert out.returncode == 2 and "no institution" in out.stderr
    out = _gridpay("recon", "export", "--institution", "01020000", "--date",
                   day.replace("-", ""), home=home)  # YYYY-MM-DD only
    assert out.returncode == 2 and "is not YYYY-MM-DD" in out.stderr
    for far in ("0001-01-01", "9999-12-31"):  # a date whose neighbours are no dates
        out = _gridpay("recon", "marketing", "--date", far, "--dry-run",
                       "--marketing-url", "http://127.0.0.1:9", home=home)
        assert out.returncode == 2 and "years 1900 to 9998" in out.stderr, out.stderr
    out = _gridpay("recon", "export", "--institution", "01020000", "--date", day,
                   "--out", str(home / "no-such-dir" / "recon.txt"), home=home)
    assert out.returncode == 2 and "cannot write" in out.stderr
    assert "Traceback" not in out.stderr
    # a marketing system that cannot be read is not "differences found" (1): 2, and why
    out = _gridpay("recon", "marketing", "--date", day, "--dry-run",
                   "--marketing-url", "http://127.0.0.1:9", home=home)
    assert out.returncode == 2 and "cannot be read now" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    out = _gridpay("users", "add", "alice", "--role", "card_admin", "--password-stdin",
                   home=home, stdin="correct horse battery staple\n")
    assert out.returncode == 0, out.stderr
    # gridpay's --config after the command's own options (it was passed on to them)
    conf = home / "extra.toml"
    conf.write_text("[business]\nmax_amount = 400000\n")
    out = _gridpay("users", "add", "carol", "--role", "auditor", "--password-stdin",
                   "--config", str(conf), home=home, stdin="correct horse battery staple\n")
    assert out.returncode == 0, out.stderr

    started = time.monotonic()
    assert up.stop() == 0
    assert time.monotonic() - started < 10
    time.sleep(0.5)
    assert _alive(children) == set(), "processes left behind after SIGTERM"


@pytest.mark.timeout(240)
def test_kill_9_then_up_again_on_the_same_home(home: Path) -> None:
    up = Up(home)
    children = _descendants(up.proc.pid)
    assert up.stop(signal.SIGKILL, 5) == -signal.SIGKILL
    deadline = time.monotonic() + 20
    while _alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive(children) == set(), "children outlived a kill -9 of gridpay up"
    again = Up(home)  # same data directory: starts cleanly on the same data
    try:
        # The dead process's lease may not have expired yet: the new one waits it out (it
        # cannot know the old one is dead), then becomes active.
        deadline = time.monotonic() + 15
        while again.get("/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert again.get("/readyz")[0] == 200
    finally:
        assert again.stop() == 0


def test_bad_configuration_names_key_and_value(home: Path) -> None:
    env = _env(home)
    env["GRIDPAY_HTTP_PORT"] = "99999"
    out = subprocess.run([sys.executable, "-m", "switch.cli", "up"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "listen.http_port" in out.stderr and "99999" in out.stderr


def test_a_refused_service_url_is_printed_without_its_password(home: Path) -> None:
    env = _env(home)
    env["GRIDPAY_REDIS_URL"] = "rediss://:R3disPW@h:6380/0"  # TLS: not taken
    out = subprocess.run([sys.executable, "-m", "switch.cli", "switch"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "services.redis_url" in out.stderr, out.stderr
    assert "R3disPW" not in out.stderr and "rediss://:***@h:6380/0" in out.stderr


def test_a_switch_whose_database_refuses_says_which_service(home: Path) -> None:
    env = _env(home)
    env.update(GRIDPAY_DATABASE_URL="postgresql://app:Db5ecret@127.0.0.1:1/gridpay",
               GRIDPAY_REDIS_URL="redis://127.0.0.1:1/0", GRIDPAY_HSM_ADDR="127.0.0.1:1",
               GRIDPAY_MARKETING_URL="http://127.0.0.1:1")
    out = subprocess.run([sys.executable, "-m", "switch.cli", "switch"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "the database cannot be reached" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "Db5ecret" not in out.stderr


def test_a_malformed_database_url_on_the_command_line_gets_a_message(home: Path) -> None:
    for cmd in ("lease", "switchover"):
        for url in ("postgresql://u:Pw5ecret@127.0.0.1:notaport/x",
                    "postgresql://u:Pw5ecret@127.0.0.1:5432/x?sslmode=bogus"):
            out = _gridpay(cmd, "--database-url", url, home=home, timeout=60)
            assert out.returncode == 2, (cmd, url, out.stderr)
            assert "database URL is not one" in out.stderr, out.stderr
            assert "Traceback" not in out.stderr and "Pw5ecret" not in out.stderr


def test_what_the_machine_refuses_is_one_line_not_a_traceback(home: Path,
                                                               tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    env = _env(afile / "home")  # a home under a file
    out = subprocess.run([sys.executable, "-m", "switch.cli", "migrate"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Not a directory" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    env = _env(home)
    env["GRIDPAY_DATABASE_URL"] = "postgresql://postgres:Pw5ecret@127.0.0.1:1/gridpay"
    for args in (("migrate",), ("clients", "add", "web", "--channel", "internet"),
                 ("cards", "verify-log"), ("forwarder", "status")):
        out = subprocess.run([sys.executable, "-m", "switch.cli", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (args, out.stderr)
        assert "cannot be used: ConnectionRefusedError" in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr and "Pw5ecret" not in out.stderr


async def test_lease_and_switchover_tell_a_database_without_the_schema_from_one_out_of_reach(
        home: Path, database_url: str) -> None:
    import asyncpg

    con = await asyncpg.connect(database_url)
    try:
        if not await con.fetchval("SELECT 1 FROM pg_database WHERE datname = 'no_schema'"):
            await con.execute("CREATE DATABASE no_schema")
    finally:
        await con.close()
    bare = database_url.rpartition("/")[0] + "/no_schema"
    env = _env(home)
    for args in (("lease",), ("switchover", "--timeout", "1")):
        env["GRIDPAY_DATABASE_URL"] = bare
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "switch.cli", *args],
                                      cwd=ROOT, env=dict(env), capture_output=True, text=True,
                                      timeout=60)
        assert out.returncode == 2, (args, out.stderr)
        assert "holds no gridpay schema" in out.stderr and "gridpay migrate" in out.stderr
        assert "cannot be reached" not in out.stderr and "Traceback" not in out.stderr
        env["GRIDPAY_DATABASE_URL"] = "postgresql://postgres@127.0.0.1:1/gridpay"
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "switch.cli", *args],
                                      cwd=ROOT, env=dict(env), capture_output=True, text=True,
                                      timeout=60)
        assert out.returncode == 2 and "cannot be reached" in out.stderr, (args, out.stderr)


def test_recon_marketing_names_what_is_wrong_with_its_billing_url(home: Path) -> None:
    for url in ("not-a-url", "ftp://h/x", "http://", "http://u:pw@127.0.0.1:99999",
                "http://h:notaport"):
        out = _gridpay("recon", "marketing", "--date", "2026-11-27", "--marketing-url", url,
                       home=home, timeout=60)
        assert out.returncode == 2 and "must be http(s)://host" in out.stderr, (url, out.stderr)
        assert "Traceback" not in out.stderr and ":pw@" not in out.stderr
    out = _gridpay("recon", "marketing", "--date", "2026-11-27", home=home, timeout=60)
    assert out.returncode == 2 and "READY line" in out.stderr, out.stderr


async def test_card_job_follow_ends_with_the_job_and_an_unknown_job_is_named(
        home: Path, pool: Any, clean_db: str) -> None:
    import uuid

    job = uuid.uuid4()
    await pool.execute("INSERT INTO card_jobs (id, kind, state, done, total, created_by)"
                       " VALUES ($1, 'batch.generate', 'succeeded', 10, 10, 'admin')", job)
    env = _env(home)
    env["GRIDPAY_DATABASE_URL"] = clean_db

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "switch.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=30)

    # it followed a finished job for ever
    out = await asyncio.to_thread(cli, "cards", "job", str(job), "--follow")
    assert out.returncode == 0 and "succeeded" in out.stdout, (out.stdout, out.stderr)
    for unknown in ("nosuch", str(uuid.uuid4())):
        out = await asyncio.to_thread(cli, "cards", "job", unknown)
        assert out.returncode == 2 and f"no job {unknown}" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_up_on_a_port_in_use_says_so(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = _env(home)
        env["GRIDPAY_HTTP_PORT"] = str(taken.getsockname()[1])
        out = subprocess.run([sys.executable, "-m", "switch.cli", "up"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "address already in use" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_services_ready_line_masks_the_passwords_of_configured_services(home: Path) -> None:
    env = _env(home)
    env.update(GRIDPAY_DATABASE_URL="postgresql://gp:DbS3cret@127.0.0.1:1/gridpay",
               GRIDPAY_REDIS_URL="redis://:RedisS3cret@127.0.0.1:1/0",
               GRIDPAY_HSM_ADDR="127.0.0.1:1",
               GRIDPAY_MARKETING_URL="http://m:MktS3cret@127.0.0.1:1")
    with subprocess.Popen([sys.executable, "-m", "switch.cli", "services"], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # nothing to start: every service is configured
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert line.startswith("READY "), line
    ready = orjson.loads(line[6:])
    assert "S3cret" not in line
    assert ready["database"] == "postgresql://gp:***@127.0.0.1:1/gridpay"
    assert ready["marketing"] == "http://m:***@127.0.0.1:1"


def test_the_config_option_is_taken_before_or_after_the_command(home: Path,
                                                                 tmp_path: Path) -> None:
    # `gridpay up --config x.toml` was refused ("unrecognized arguments"): only the form
    # before the command worked
    bad = tmp_path / "bad.toml"
    bad.write_text("[business]\nmax_amount = -5\n")
    for args in (("--config", str(bad), "switch"), ("switch", "--config", str(bad)),
                 ("switch", f"--config={bad}"),
                 ("users", "add", "bob", "--role", "cashier", "--hall", "H1",
                  "--password-stdin", "--config", str(bad))):
        out = _gridpay(*args, home=home, timeout=60)
        assert out.returncode == 2, (args, out.stderr)
        assert "business.max_amount = -5" in out.stderr, (args, out.stderr)


def test_switch_without_services_says_what_is_missing(home: Path) -> None:
    out = _gridpay("switch", home=home, timeout=60)
    assert out.returncode == 2 and "GRIDPAY_DATABASE_URL" in out.stderr


def _http(method: str, url: str, body: dict[str, Any] | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method, headers={
        "Content-Type": "application/json", **(headers or {})},
        data=orjson.dumps(body) if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            return int(r.status), orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), orjson.loads(e.read())


@pytest.mark.timeout(240)
def test_kill_9_right_after_a_201_loses_nothing(home: Path) -> None:
    up = Up(home)
    key = _gridpay("clients", "add", "p", "--channel", "internet",
                   home=home).stdout.strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {key}"}
    _, accounts = _http("GET", up.ready["services"]["marketing"] + "/accounts?limit=50")
    acct = next(a["account_no"] for a in accounts["accounts"] if a["status"] == "active")
    base = f"http://127.0.0.1:{up.ready['ports']['http']}"
    st, pay = _http("POST", base + "/v1/payments",
                    {"account_no": acct, "amount": 4200, "method": "cash"},
                    {**auth, "Idempotency-Key": "crash-1"})
    assert st == 201
    assert up.stop(signal.SIGKILL, 5) == -signal.SIGKILL  # right after the 201
    again = Up(home)
    try:
        base = f"http://127.0.0.1:{again.ready['ports']['http']}"
        deadline = time.monotonic() + 30
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st, doc = _http("GET", f"{base}/v1/payments/{pay['payment_id']}", headers=auth)
            if st == 503 and doc["code"] == "standby":  # the killed node's lease runs out
                time.sleep(0.2)
                continue
            assert st == 200
            if doc["posting"] == "posted":
                break
            time.sleep(0.2)
        assert doc["posting"] == "posted"
        # the retry after the crash gets the original answer, and nothing new is posted
        st, replay = _http("POST", base + "/v1/payments",
                           {"account_no": acct, "amount": 4200, "method": "cash"},
                           {**auth, "Idempotency-Key": "crash-1"})
        assert st == 201 and replay == pay
        mkt = again.ready["services"]["marketing"]
        found = 0
        for day in {pay["business_date"], pay["created_at"][:10]}:
            _, listing = _http("GET", f"{mkt}/postings?date={day}")
            found += sum(1 for p in listing["postings"]
                         if p["posting_id"] == "P" + pay["receipt_no"])
        assert found == 1  # credited exactly once in the marketing system
    finally:
        assert again.stop() == 0
