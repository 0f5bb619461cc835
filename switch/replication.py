"""PostgreSQL as a primary with a synchronous streaming standby (PostgreSQL's own replication).

`ReplicatedPostgres` runs two embedded servers under one root directory: `primary/` and
`standby/`. The standby is a `pg_basebackup` copy of the primary that streams its WAL; the
primary lists it in `synchronous_standby_names`, so a commit returns only once the standby has
flushed it (RPO 0: an approved payment survives the loss of the primary).

Clients use `url`, a multi-host libpq URL with `target_session_attrs=read-write`: asyncpg tries
the hosts in order and keeps the one that accepts writes, so after `promote_standby()` the same
URL reaches the new primary without reconfiguring anything.

This is for a single machine (tests, the fault suite, the demo). In production, run PostgreSQL
under an HA manager (Patroni, see docs/standby.md) and give the switch the same kind of URL.

After a failover the old primary must never start again as a primary: its data directory may
hold a tail of WAL the new primary never saw. `rebuild_old_primary()` turns it into the new
primary's synchronous standby from a fresh base backup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from switch.embedded import EmbeddedError, EmbeddedPostgres, PostgresOptions, pg_bin_dir

log = logging.getLogger("gridpay.replication")

STANDBY_NAME = "gridpay_standby"
_STATUS = (
    "SELECT coalesce(sync_state, ''), coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn),"
    " 0)::bigint FROM pg_stat_replication WHERE application_name = 'gridpay_standby'"
)


class ReplicationError(EmbeddedError):
    """The replicated pair could not be set up, checked or failed over."""


@dataclass(frozen=True, slots=True)
class ReplicationStatus:
    """What the current primary says about its standby."""

    primary_port: int
    standby_connected: bool
    sync_state: str          # 'sync', 'async', 'potential', or '' when not connected
    replay_lag_bytes: int


class ReplicatedPostgres:
    """A primary and its synchronous standby on 127.0.0.1, under `root`."""

    def __init__(self, root: Path, *, synchronous: bool = True) -> None:
        self.root = root
        self.synchronous = synchronous
        opts = PostgresOptions(replication=True)
        self._servers = [EmbeddedPostgres(root / "primary", options=opts),
                         EmbeddedPostgres(root / "standby", options=opts)]
        self._primary = 0  # index of the server that is (or was last) the primary
        self.promoted = False

    # -- addresses -------------------------------------------------------------------------

    @property
    def primary(self) -> EmbeddedPostgres:
        return self._servers[self._primary]

    @property
    def standby(self) -> EmbeddedPostgres:
        return self._servers[1 - self._primary]

    @property
    def url(self) -> str:
        """Both servers, the writable one chosen at connect time."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self._servers)
        return f"postgresql://postgres@{hosts}/gridpay?target_session_attrs=read-write"

    # -- life ------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the primary, build the standby if needed, start it and wait until it is the
        primary's synchronous standby."""
        primary, standby = self.primary, self.standby
        try:
            primary.start(timeout)
            if not (standby.data / "PG_VERSION").exists():
                self._base_backup(primary, standby)
            standby.start(timeout)
            if self.synchronous:
                primary.psql(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
                primary.psql("SELECT pg_reload_conf()")
            self.wait_streaming(timeout)
        except BaseException:
            self.stop()
            raise

    def _base_backup(self, source: EmbeddedPostgres, target: EmbeddedPostgres) -> None:
        target._prepare()  # port, directory, owner (same package: a deliberate friend call)
        if target.data.exists():
            shutil.rmtree(target.data)
        log.info("taking a base backup for the standby", extra={"data_dir": str(target.data)})
        target._run([str(pg_bin_dir() / "pg_basebackup"), "-h", "127.0.0.1",
                     "-p", str(source.port), "-U", "postgres", "-D", str(target.data),
                     "-X", "stream", "-R", "--checkpoint=fast", "--no-sync"])
        # name the stream so that the primary's synchronous_standby_names matches it
        with (target.data / "postgresql.auto.conf").open("a") as f:
            f.write(f"\nprimary_conninfo = 'host=127.0.0.1 port={source.port} user=postgres "
                    f"application_name={STANDBY_NAME}'\n")

    def status(self) -> ReplicationStatus:
        out = self.primary.psql(_STATUS)
        if not out:
            return ReplicationStatus(self.primary.port, False, "", 0)
        state, lag = out.splitlines()[0].split("|")
        return ReplicationStatus(self.primary.port, True, state, int(lag))

    def wait_streaming(self, timeout: float = 30.0) -> ReplicationStatus:
        """Wait until the standby streams (synchronously, when `synchronous`)."""
        want = "sync" if self.synchronous else "async"
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st.standby_connected and st.sync_state == want:
                return st
            if time.monotonic() > deadline:
                raise ReplicationError(f"the standby is not streaming ({st})")
            time.sleep(0.05)

    def kill_primary(self) -> None:
        """The primary's machine dies: SIGKILL to the postmaster and all its backends."""
        proc = self.primary.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # it runs in its own session (setsid)
        proc.wait(10)
        self.primary.proc = None
        (self.primary.data / "postmaster.pid").unlink(missing_ok=True)

    def promote_standby(self, timeout: float = 30.0) -> float:
        """Promote the standby to primary; returns the seconds it took to accept writes."""
        started = time.monotonic()
        standby = self.standby
        standby.psql(f"SELECT pg_promote(true, {int(timeout)})")
        deadline = started + timeout
        while standby.psql("SELECT pg_is_in_recovery()") != "f":
            if time.monotonic() > deadline:
                raise ReplicationError("the standby did not leave recovery in time")
            time.sleep(0.02)
        self._primary = 1 - self._primary
        self.promoted = True
        log.warning("standby promoted to primary", extra={"port": standby.port})
        return time.monotonic() - started

    def rebuild_old_primary(self, timeout: float = 60.0) -> None:
        """Make the old (stopped) primary the new primary's synchronous standby again."""
        old = self.standby
        if old.proc is not None and old.proc.poll() is None:
            raise ReplicationError("the old primary is still running: stop it first")
        self._base_backup(self.primary, old)
        old.start(timeout)
        if self.synchronous:
            self.primary.psql(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
            self.primary.psql("SELECT pg_reload_conf()")
        self.wait_streaming(timeout)

    def stop(self) -> None:
        for server in (self.primary, self.standby):
            with contextlib.suppress(Exception):
                server.stop()
