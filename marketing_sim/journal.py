"""The simulator's durable journal of postings: SQLite in WAL mode, written by one thread.

Only postings are stored (each with its allocation); at start the journal is read back in order
and re-applied to the seeded books, which rebuilds every changed balance.  Writes are grouped:
every posting accepted while the previous batch was being written goes into the next
transaction, so that one ``fsync`` covers many postings.  ``synchronous=FULL`` makes SQLite sync
the WAL at every commit, so a posting is on disk before its 201 leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Final

import orjson

from marketing_sim.ledger import Allocation, PostedCredit, PostingRequest

FILE_NAME: Final = "marketing.sqlite3"
_MAX_BATCH: Final = 2_000

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS postings (
    seq INTEGER PRIMARY KEY,
    posting_id TEXT NOT NULL UNIQUE,
    account_no TEXT NOT NULL,
    amount INTEGER NOT NULL,
    kind TEXT NOT NULL,
    original_posting_id TEXT,
    channel TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    business_date TEXT NOT NULL,
    allocation BLOB NOT NULL,
    arrears_after INTEGER NOT NULL,
    prepaid_balance_after INTEGER NOT NULL
);
"""
_INSERT: Final = "INSERT INTO postings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_Row = tuple[int, str, str, int, str, str | None, str, str, str, bytes, int, int]


class JournalError(Exception):
    """The journal cannot be opened or written."""


def _row(posted: PostedCredit) -> _Row:
    request = posted.request
    return (
        posted.seq,
        request.posting_id,
        request.account_no,
        request.amount,
        request.kind,
        request.original_posting_id,
        request.channel,
        request.occurred_at.isoformat(),
        request.business_date.isoformat(),
        orjson.dumps(posted.allocation.to_json()),
        posted.arrears_after,
        posted.prepaid_balance_after,
    )


def _posted(row: _Row) -> PostedCredit:
    seq, posting_id, account_no, amount, kind, original, channel, occurred, _, alloc, arr, pre = row
    return PostedCredit(
        seq=seq,
        request=PostingRequest(
            posting_id=posting_id,
            account_no=account_no,
            amount=amount,
            kind=kind,  # type: ignore[arg-type]
            original_posting_id=original,
            channel=channel,
            occurred_at=datetime.fromisoformat(occurred),
        ),
        allocation=Allocation.from_json(orjson.loads(alloc)),
        arrears_after=arr,
        prepaid_balance_after=pre,
    )


class SqliteJournal:
    """Append-only posting journal; ``append`` resolves once the posting is durable."""

    def __init__(self, data_dir: Path, *, identity: dict[str, str]) -> None:
        self._path = data_dir / FILE_NAME
        self._identity = identity
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="marketing-journal")
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[PostedCredit, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    # --- worker-thread side -------------------------------------------------------------------

    def _open_sync(self) -> list[PostedCredit]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise JournalError(f"cannot put {self._path} in WAL mode")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not stored:
                db.executemany("INSERT INTO meta VALUES (?, ?)", sorted(self._identity.items()))
            elif stored != self._identity:
                raise JournalError(
                    f"{self._path} was made with {stored}, not {self._identity}: "
                    "use another data directory"
                )
            rows = db.execute("SELECT * FROM postings ORDER BY seq").fetchall()
        except BaseException:
            db.close()
            raise
        self._db = db
        return [_posted(row) for row in rows]

    def _write_sync(self, rows: list[_Row]) -> None:
        db = self._db
        if db is None:
            raise JournalError("the journal is closed")
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_INSERT, rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- event-loop side ----------------------------------------------------------------------

    async def open(self) -> list[PostedCredit]:
        """Open (creating if needed) and return every stored posting in order."""
        loop = asyncio.get_running_loop()
        try:
            postings = await loop.run_in_executor(self._executor, self._open_sync)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open {self._path}: {exc}") from exc
        self._writer = asyncio.create_task(self._write_batches(), name="marketing-journal")
        return postings

    def append(self, posted: PostedCredit) -> asyncio.Future[None]:
        """Queue ``posted``; the future resolves once it is committed (or fails with the error)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closing:
            future.set_exception(JournalError("the journal is closed"))
            return future
        self._pending.append((posted, future))
        self._wakeup.set()
        return future

    async def _write_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[:_MAX_BATCH]
                del self._pending[:_MAX_BATCH]
                try:
                    await loop.run_in_executor(
                        self._executor, self._write_sync, [_row(p) for p, _ in batch]
                    )
                except Exception as exc:  # noqa: BLE001 - every waiter must learn of it
                    error = JournalError(f"cannot write the journal: {exc}")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
            if self._closing:
                return

    async def close(self) -> None:
        """Write what is queued, then close."""
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._writer, timeout=30)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_sync)
        self._executor.shutdown(wait=True)
