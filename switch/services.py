"""The services a node uses: the configured ones, or embedded ones started under GRIDPAY_HOME.

PostgreSQL and Redis run from pip-installed binaries (see `switch.embedded`); the HSM and
marketing-system simulators run as child processes of their own (`gridpay hsm`,
`gridpay marketing`), so that each can fail, be stopped or be slowed on its own, as the real
ones can.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson

from switch.config import Settings
from switch.embedded import (
    EmbeddedError,
    EmbeddedPostgres,
    EmbeddedRedis,
    _preexec,
    stop_process,
)
from switch.node import ServiceUrls
from switch.replication import ReplicatedPostgres

log = logging.getLogger("gridpay.services")


class ChildService:
    """A gridpay subcommand run as a child process that prints one `READY {json}` line."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, object] = {}

    def start(self, timeout: float = 60.0) -> dict[str, object]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        errf = self.log_path.open("ab")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "switch.cli", *self.args], stdout=subprocess.PIPE,
            stderr=errf, stdin=subprocess.DEVNULL, env=env,
            preexec_fn=_preexec(None, None, signal.SIGTERM),  # noqa: PLW1509
        )
        errf.close()
        assert self.proc.stdout is not None
        found: list[dict[str, object]] = []

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("READY ") and not found:
                    found.append(orjson.loads(line[6:]))
            # keep draining until the child exits so that it never blocks on a full pipe

        threading.Thread(target=read, daemon=True, name=f"{self.name}-stdout").start()
        deadline = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None:
                raise EmbeddedError(f"{self.name} exited with {self.proc.returncode}; "
                                    f"see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedError(f"{self.name} did not report READY in {timeout}s")
            time.sleep(0.02)
        self.ready = found[0]
        return self.ready

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, signal.SIGTERM, timeout)


class Services:
    """Starts whatever is not configured; `stop()` stops exactly what it started."""

    def __init__(self, settings: Settings, *, replicated: bool = False) -> None:
        self.settings = settings
        self.home = settings.node.home
        self.replicated = replicated
        self.pg: EmbeddedPostgres | ReplicatedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        self.hsm: ChildService | None = None
        self.marketing: ChildService | None = None

    def start(self) -> ServiceUrls:
        s = self.settings.services
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            db = s.database_url
            if not db:
                if self.replicated:  # primary + synchronous standby (RPO 0)
                    self.pg = ReplicatedPostgres(self.home / "postgres-pair")
                else:
                    self.pg = EmbeddedPostgres(self.home / "postgres")
                self.pg.start()
                db = self.pg.url
            rurl = s.redis_url
            if not rurl:
                self.redis = EmbeddedRedis(self.home / "redis")
                self.redis.start()
                rurl = self.redis.url
            hsm = s.hsm_addr
            if not hsm:
                self.hsm = ChildService("hsm", ["hsm", "--host", "127.0.0.1", "--port", "0"],
                                        self.home / "logs" / "hsm.log")
                info = self.hsm.start()
                hsm = f"127.0.0.1:{info['port']}"
            mkt = s.marketing_url
            if not mkt:
                self.marketing = ChildService(
                    "marketing",
                    ["marketing", "--host", "127.0.0.1", "--port", "0",
                     "--data-dir", str(self.home / "marketing"),
                     "--customers", str(s.marketing_customers), "--seed", str(s.marketing_seed)],
                    self.home / "logs" / "marketing.log")
                info = self.marketing.start()
                mkt = f"http://127.0.0.1:{info['port']}"
        except BaseException:
            self.stop()
            raise
        return ServiceUrls(database=db, redis=rurl, hsm=hsm, marketing=mkt)

    def stop(self) -> None:
        for svc in (self.marketing, self.hsm):
            if svc is not None:
                with contextlib.suppress(Exception):
                    svc.stop()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.stop()
