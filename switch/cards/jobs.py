"""Background jobs (batch generation, reconciliation, stock-in): asyncio tasks in the node,
with their state and progress in `card_jobs` so that any node can show them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from switch import db
from switch.cards import oplog
from switch.cards.errors import CardError, Conflict, NotFound

log = logging.getLogger("gridpay.cards.jobs")

FLUSH_S = 0.5


@dataclass(slots=True)
class Progress:
    """Handed to a job's body: count work done; flushed to the database twice a second."""

    job_id: uuid.UUID
    total: int
    done: int = 0
    _flushed: float = field(default=0.0)
    epoch: int | None = None  # the lease epoch the job runs under (its records are fenced)

    def add(self, n: int) -> None:
        self.done += n


JobBody = Callable[[Progress], Awaitable[Mapping[str, Any]]]


#: a job queued or running that no runner of the active node holds, and that has not moved
#: for this long, was left behind by a runner that could not record its end (the database
#: failed it): it no longer holds its batch
ORPHAN_AFTER_S = 30.0

_INSERT_JOB = db.fenced(6, """
INSERT INTO card_jobs (id, kind, object_id, total, created_by)
SELECT $1, $2, $3, $4, $5 FROM {fence}""")

_FAIL_ORPHANS = db.fenced(4, """
UPDATE card_jobs SET state = 'failed', error = 'interrupted', finished_at = now()
  FROM {fence}
 WHERE kind = $1 AND object_id = $2 AND state IN ('queued', 'running')
   AND NOT id = ANY($3::uuid[]) AND updated_at < now() - make_interval(secs => $5)""")


async def create_job(pool: asyncpg.Pool | asyncpg.Connection, kind: str, *, total: int,
                     actor: str, object_id: str | None = None, epoch: int | None = None,
                     running: Collection[uuid.UUID] = ()) -> uuid.UUID:
    """Record a job; with `epoch`, fenced like the job's own writes (see `db.fence`).
    A reconciliation or stock-in of a batch that has one of its kind queued or running is
    refused (409 `job_running`, naming that job), unless that job is an orphan: not among
    the jobs `running` on this node and still for `ORPHAN_AFTER_S`."""
    job_id = uuid.uuid4()
    for orphans_left in (False, True):
        try:
            await pool.execute(_INSERT_JOB, job_id, kind, object_id, total, actor, epoch)
            return job_id
        except asyncpg.UniqueViolationError:
            if orphans_left or await pool.execute(
                    _FAIL_ORPHANS, kind, object_id, list(running), epoch,
                    ORPHAN_AFTER_S) == "UPDATE 0":
                raise await _job_running(pool, kind, object_id) from None
            # the batch was held by an orphan, now failed: once more
    raise AssertionError("not reached")  # pragma: no cover


async def _job_running(pool: asyncpg.Pool | asyncpg.Connection, kind: str,
                       object_id: str | None) -> Conflict:
    """409 `job_running`, naming the job of `kind` that holds `object_id`."""
    holder = await pool.fetchval(
        "SELECT id FROM card_jobs WHERE kind = $1 AND object_id = $2"
        " AND state IN ('queued', 'running') LIMIT 1", kind, object_id)
    what = f"a {kind.removeprefix('batch.').replace('_', '-')} of batch {object_id}"
    if holder is None:  # it ended between the two statements
        return Conflict(f"{what} was under way a moment ago; look at the batch again",
                        code="job_running")
    return Conflict(f"{what} is already under way (job {holder}); follow it with"
                    f" GET /jobs/{holder}", code="job_running", extra={"job_id": str(holder)})


async def get_job(pool: asyncpg.Pool, job_id: str | uuid.UUID) -> dict[str, Any]:
    try:
        jid = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(job_id)
    except ValueError:
        raise NotFound(f"no job {job_id}", code="job_not_found") from None
    row = await pool.fetchrow("SELECT * FROM card_jobs WHERE id = $1", jid)
    if row is None:
        raise NotFound(f"no job {job_id}", code="job_not_found")
    return job_doc(row)


def job_doc(row: asyncpg.Record) -> dict[str, Any]:
    total = int(row["total"])
    done = int(row["done"])
    return {"id": str(row["id"]), "kind": row["kind"], "object_id": row["object_id"],
            "state": row["state"], "done": done, "total": total,
            "percent": round(100.0 * done / total, 1) if total else 100.0,
            "error": row["error"], "result": row["result"], "created_by": row["created_by"],
            "created_at": row["created_at"].isoformat(),
            "updated_at": row["updated_at"].isoformat(),
            "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None}


def render_progress(job: Mapping[str, Any], width: int = 40) -> str:
    """One line for a terminal: `[#####-----]  52.0%  520000/1000000  running  generate`."""
    total = int(job.get("total") or 0)
    done = int(job.get("done") or 0)
    frac = min(1.0, done / total) if total else 1.0
    filled = int(round(frac * width))
    line = (f"[{'#' * filled}{'-' * (width - filled)}] {100 * frac:5.1f}%  {done}/{total}  "
            f"{job.get('state')}  {job.get('kind')}")
    if job.get("error"):
        line += f"  error: {job['error']}"
    return line


# a job's record is changed only under the lease epoch it runs under ($2; NULL: not fenced)
_MARK_RUNNING = db.fenced(2, """
UPDATE card_jobs SET state = 'running', updated_at = now() FROM {fence}
 WHERE id = $1""")
_FLUSH = db.fenced(2, """
UPDATE card_jobs SET done = $3, updated_at = now() FROM {fence}
 WHERE id = $1 AND state = 'running'""")


class JobRunner:
    """Runs job bodies as tasks; cancels them when closed (the job is then marked failed)."""

    def __init__(self, pool: asyncpg.Pool, *,
                 on_fenced: Callable[[], Awaitable[None]] | None = None) -> None:
        self._pool = pool
        self._tasks: dict[uuid.UUID, asyncio.Task[None]] = {}
        # told when a job finds another node holds the lease, as the posting path and the
        # relay tell it: the node steps down at once instead of at its next lease renewal
        self._on_fenced = on_fenced

    def start(self, job_id: uuid.UUID, total: int, body: JobBody, *,
              epoch: int | None = None) -> asyncio.Task[None]:
        """Run `body` as job `job_id`; the job's own records (its state, its end in the
        operation log) are fenced by `epoch` (the lease epoch it was started under), like
        the body's writes: a node that lost the lease meanwhile writes none of them."""
        task = asyncio.create_task(self._run(job_id, total, body, epoch),
                                   name=f"card-job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job_id, None))
        return task

    def running(self) -> frozenset[uuid.UUID]:
        """The jobs this runner has under way."""
        return frozenset(self._tasks)

    async def wait(self, job_id: uuid.UUID, limit_s: float) -> bool:
        """Wait up to `limit_s` seconds for the job to finish; True if it did."""
        task = self._tasks.get(job_id)
        if task is None:
            return True
        done, _ = await asyncio.wait({task}, timeout=limit_s)
        return bool(done)

    async def _flush(self, p: Progress) -> None:
        await self._pool.execute(_FLUSH, p.job_id, p.epoch, p.done)

    async def _run(self, job_id: uuid.UUID, total: int, body: JobBody,
                   epoch: int | None = None) -> None:
        progress = Progress(job_id=job_id, total=total, epoch=epoch)
        try:
            await self._pool.execute(_MARK_RUNNING, job_id, epoch)
        except Exception as e:
            if not db.is_fenced(e):
                raise
            log.warning("card job not started: this node is no longer active",
                        extra={"job": str(job_id)})
            if self._on_fenced is not None:
                await self._on_fenced()
            return

        async def flusher() -> None:
            while True:
                await asyncio.sleep(FLUSH_S)
                with contextlib.suppress(Exception):
                    await self._flush(progress)

        ticker = asyncio.create_task(flusher())
        started = time.perf_counter()
        try:
            result = await body(progress)
        except asyncio.CancelledError:
            await self._finish(job_id, progress, "failed",
                               error="interrupted (the node stopped or lost the active role)")
            raise
        except CardError as e:
            await self._finish(job_id, progress, "failed", error=e.detail,
                               result={"code": e.code, "status": e.status, **e.extra})
        except Exception as e:
            if db.is_fenced(e):  # another node took the lease: the caller hears 503 standby
                log.warning("card job stopped: this node is no longer active",
                            extra={"job": str(job_id)})
                try:
                    await self._finish(job_id, progress, "failed",
                                       error="this node is no longer active",
                                       result={"code": "standby", "status": 503})
                finally:
                    if self._on_fenced is not None:
                        await self._on_fenced()
            else:
                log.exception("card job failed", extra={"job": str(job_id)})
                await self._finish(job_id, progress, "failed", error=type(e).__name__)
        else:
            doc = dict(result)
            doc.setdefault("seconds", round(time.perf_counter() - started, 3))
            await self._finish(job_id, progress, "succeeded", result=doc)
        finally:
            ticker.cancel()
            with contextlib.suppress(BaseException):
                await ticker

    async def _finish(self, job_id: uuid.UUID, p: Progress, state: str, *,
                      error: str | None = None, result: Mapping[str, Any] | None = None) -> None:
        # Fenced by the job's epoch: a node that was paused and wakes up after another took
        # the lease has its job cancelled, and must not overwrite what the new active node
        # recorded of it ("interrupted") nor log its end.
        try:
            async with self._pool.acquire() as con, con.transaction():
                await db.fence(con, p.epoch)
                row = await con.fetchrow(
                    "UPDATE card_jobs SET state = $2, done = $3, error = $4, result = $5,"
                    " updated_at = now(), finished_at = now() WHERE id = $1"
                    " AND state IN ('queued', 'running')"
                    " RETURNING kind, object_id, created_by",
                    job_id, state, p.done, error, None if result is None else dict(result))
        except Exception as e:
            if not db.is_fenced(e):
                raise
            log.warning("a card job's end was not recorded: this node is no longer active",
                        extra={"job": str(job_id), "state": state})
            return
        if row is None:
            return
        # The operation log said "accepted" when the job began; how it ended goes there too
        # (counts and codes: the whole report stays with the job). Not logged is not lost:
        # the job's own record holds it.
        try:
            async with self._pool.acquire() as con, con.transaction():
                await db.fence(con, p.epoch)
                await oplog.append(
                    con, actor=row["created_by"], action="job.finished",
                    objects={"job_id": str(job_id), "kind": row["kind"],
                             "object_id": row["object_id"]},
                    result={"ok": state == "succeeded", "state": state, "done": p.done,
                            **({"error": error} if error else {}),
                            **{k: v for k, v in (result or {}).items()
                               if isinstance(v, str | int | float | bool)}})
        except Exception as e:
            log.warning("a card job's end was not written to the operation log",
                        extra={"job": str(job_id), "error": type(e).__name__})

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)


async def fail_interrupted(pool: asyncpg.Pool,
                           running: Collection[uuid.UUID] = (), *,
                           epoch: int | None = None) -> int:
    """At start: jobs left running by a node that stopped are marked failed, and so are the
    batches they were generating (which `POST /batches/{id}/resume` takes up again). The jobs
    `running` here are not: a node takes requests as soon as it is active, so a job may have
    begun before this runs. With `epoch`, fenced: a node that was paused right after taking
    the lease, and wakes up after another took it, fails none of that node's jobs."""
    mine = list(running)
    async with pool.acquire() as con, con.transaction():
        await db.fence(con, epoch)
        status: str = await con.execute(
            "UPDATE card_jobs SET state = 'failed', error = 'interrupted', finished_at = now()"
            " WHERE state IN ('queued', 'running') AND NOT id = ANY($1::uuid[])", mine)
        await con.execute(
            "UPDATE card_batches SET status = 'failed' WHERE status = 'generating'"
            " AND (generate_job IS NULL OR NOT generate_job = ANY($1::uuid[]))", mine)
    return int(status.split()[-1])
