"""The system under test, started the way an operator starts it: `gridpay services` (embedded
PostgreSQL and Redis, the HSM and marketing simulators, each its own process) and one
`gridpay switch` node, as child processes in a throw-away home directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = ["Child", "Stack", "StackError", "running_stack"]


class StackError(Exception):
    """The system under test could not be started."""


class Child:
    """A child process that prints one `READY {json}` line on stdout when it is up."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def start(self, timeout: float = 120.0) -> dict[str, Any]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as err:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=err,
                                         stdin=subprocess.DEVNULL, env=self.env)
        found: list[dict[str, Any]] = []

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("READY ") and not found:
                    found.append(orjson.loads(line[6:]))

        self._reader = threading.Thread(target=read, daemon=True, name=f"{self.name}-stdout")
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None:
                raise StackError(f"{self.name} exited with {self.proc.returncode}; "
                                 f"see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(f"{self.name} did not report READY in {timeout:.0f} s; "
                                 f"see {self.log_path}")
            time.sleep(0.02)
        self.ready = found[0]
        return self.ready

    def stop(self, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)  # it reads to the end of the pipe, then stops
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class Stack:
    """Services plus one switch node; `urls` and `ports` are filled in by `start()`."""

    home: Path
    customers: int = 20_000
    log_level: str = "WARNING"
    switch_nice: int = 0  # applied to the switch's main thread (its event loop) once it is up
    urls: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    services: Child | None = None
    switch: Child | None = None

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDPAY_")}
        env.update(PYTHONUNBUFFERED="1", GRIDPAY_HOME=str(self.home),
                   GRIDPAY_LOG_LEVEL=self.log_level,
                   GRIDPAY_MARKETING_CUSTOMERS=str(self.customers))
        env.update(extra)
        return env

    def start(self) -> None:
        self.services = Child("services", [sys.executable, "-m", "switch.cli", "services"],
                              self._env(), self.home / "logs" / "bench-services.log")
        ready = self.services.start()
        self.urls = {k: str(v) for k, v in ready.items()}
        self.start_switch()

    def start_switch(self) -> None:
        env = self._env(GRIDPAY_DATABASE_URL=self.urls["database"],
                        GRIDPAY_REDIS_URL=self.urls["redis"], GRIDPAY_HSM_ADDR=self.urls["hsm"],
                        GRIDPAY_MARKETING_URL=self.urls["marketing"], GRIDPAY_HTTP_PORT="0",
                        GRIDPAY_BANK_PORT="0", GRIDPAY_POST_PORT="0")
        self.switch = Child("switch", [sys.executable, "-m", "switch.cli", "switch"], env,
                            self.home / "logs" / "bench-switch.log")
        ready = self.switch.start()
        self.ports = {k: int(v) for k, v in ready["ports"].items() if v}
        if self.switch_nice:
            try:  # Linux: the main thread's own, which is the thread that runs the loop
                os.setpriority(os.PRIO_PROCESS, self.switch.pid, self.switch_nice)
            except OSError as e:
                raise StackError(f"cannot set the switch's nice value to {self.switch_nice}: "
                                 f"{e.strerror} (a negative value needs root)") from e

    def stop(self) -> None:
        for child in (self.switch, self.services):
            if child is not None:
                with contextlib.suppress(Exception):
                    child.stop()


@contextlib.contextmanager
def running_stack(customers: int = 20_000, home: Path | None = None,
                  log_level: str = "WARNING") -> Iterator[Stack]:
    with contextlib.ExitStack() as es:
        if home is None:
            home = Path(es.enter_context(tempfile.TemporaryDirectory(prefix="gridpay-bench-")))
        stack = Stack(home, customers=customers, log_level=log_level)
        es.callback(stack.stop)
        stack.start()
        yield stack
