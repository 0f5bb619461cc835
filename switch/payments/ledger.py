"""The ledger and its posting path: every channel's payments end here.

A payment is recorded in one database transaction together with its deduplication key and its
outbox row (the credit to forward to the marketing system). The key's primary key is the fence
that makes a duplicate impossible, whatever Redis says.

Concurrent payments share commits: `PostingPath.submit` queues a request, and a committer task
takes everything queued so far into a single transaction (group commit), so that one fsync
serves many payments under load and none waits for a timer when the switch is idle. Four
committers run at once, each with its own connection: while one batch waits for its fsync the
next is already being written (PostgreSQL flushes concurrent commits together). Measured at
the bank peak on two cores, four carried 4-5 % more than two, and six no more than four.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from switch import db
from switch.business import BusinessCalendar
from switch.metrics import Metrics

if TYPE_CHECKING:
    from switch.db import Conn

log = logging.getLogger("gridpay.ledger")


class LedgerError(Exception):
    """Base of the ledger's errors."""


class Fenced(LedgerError):
    """This node's lease epoch is stale: the database refused the write."""


class CommitInterrupted(LedgerError):
    """The switch stopped, or the database went away, while this payment's commit was under
    way: it may or may not have been recorded (a repeat with the same key tells)."""


class NotReversible(LedgerError):
    def __init__(self, reason: str, code: str = "not_reversible") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentRequest:
    """One payment to record. `dedup_key` names its idempotency scope."""

    dedup_key: str
    request_hash: bytes
    channel: str
    method: str
    account_no: str
    amount: int
    kind: str = "payment"  # or 'card_recharge'
    client_id: uuid.UUID | None = None
    institution_id: str | None = None
    reference: str | None = None
    stan: str | None = None
    transmitted: str | None = None
    rrn: str | None = None
    terminal_id: str | None = None
    card_serial: str | None = None
    caller: str | None = None
    # builds the (status, body) stored with the key for byte-exact replays
    render: Callable[[PaymentRecord], tuple[int, bytes]] | None = None
    # told the record once it is numbered and its group commit's statement sent, so that
    # work which needs only the record (a link signs its approval) runs while the commit
    # does; whatever it starts must be discarded unless the payment comes back Committed
    # with this record. Only the group commit (`submit`) calls it, never a statement inside
    # a caller's transaction, where Committed would not yet mean durable.
    numbered: Callable[[PaymentRecord], None] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.amount, bool) or not isinstance(self.amount, int) or self.amount <= 0:
            raise ValueError("amount must be a positive integer in fen")
        if len(self.account_no) != 10 or not self.account_no.isdigit():
            raise ValueError("account_no must be 10 digits")


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentRecord:
    id: uuid.UUID
    receipt_no: str
    approval_code: str
    posting_id: str
    channel: str
    method: str
    account_no: str
    amount: int
    business_date: date
    created_at: datetime
    client_id: uuid.UUID | None = None
    institution_id: str | None = None
    reference: str | None = None
    reversed_at: datetime | None = None
    posting: str = "pending"


@dataclass(frozen=True, slots=True)
class Committed:
    record: PaymentRecord
    status_code: int | None
    response: bytes | None


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The key was already taken: by an earlier payment, or a remembered reversal."""

    kind: str
    request_hash: bytes
    payment_id: uuid.UUID | None
    status_code: int | None
    response: bytes | None


Outcome = Committed | Duplicate


@dataclass(slots=True)
class _Pending:
    request: PaymentRequest
    future: asyncio.Future[Outcome]


def time_ordered_ids(n: int) -> list[uuid.UUID]:
    """`n` payment ids as UUIDv7 (RFC 9562): the Unix time in milliseconds, then 74 random
    bits, all from one read of the OS's random source (`uuid4()` makes a system call per id).
    Ids of a later millisecond sort after those of an earlier one (within one millisecond the
    order is random; a clock stepped back breaks the order, never uniqueness), so the payments'
    primary key grows at its right edge instead of at a random leaf: fewer pages touched per
    insert, and far fewer full-page images after a checkpoint. The id reveals the millisecond
    it was made, as `created_at` does."""
    head = (time.time_ns() // 1_000_000).to_bytes(6, "big")
    rand = os.urandom(10 * n)
    out: list[uuid.UUID] = []
    for i in range(0, 10 * n, 10):
        r = rand[i:i + 10]
        # version 7 in the high nibble of byte 6, variant 0b10 in the top bits of byte 8
        out.append(uuid.UUID(bytes=head + bytes((0x70 | (r[0] & 0x0F), r[1],
                                                  0x80 | (r[2] & 0x3F))) + r[3:]))
    return out


def posting_id_for(kind: str, receipt_no: str) -> str:
    return {"payment": "P", "card_recharge": "C", "reversal": "R"}[kind] + receipt_no


class ReceiptNumbers:
    """Receipt numbers: business date + a 10-digit number taken in blocks of 1000."""

    BLOCK = 1000

    def __init__(self) -> None:
        self._next = 0
        self._end = 0

    async def take(self, conn: Conn, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self._next >= self._end:
                start = int(await conn.fetchval("SELECT nextval('receipt_seq')"))
                self._next, self._end = start, start + self.BLOCK
            k = min(n - len(out), self._end - self._next)
            out.extend(range(self._next, self._next + k))
            self._next += k
        return out


# One statement records a whole batch: the fence, the keys (the first writer of a key wins;
# the others are returned as duplicates afterwards), the payments of the keys won, and their
# outbox rows. One round trip and one implicit transaction, whatever the batch size. The batch
# travels as one JSON array (orjson on our side, json_to_recordset on the server's): encoding
# 25 typed arrays cost asyncpg about three times the CPU per payment. Binary values go as hex.
# The statement is made of parts so that `record_statement` can add to it ($1 and $2 are ours).
_FENCE = "fence AS (SELECT gridpay_fence($2::bigint))"
_BATCH = """t AS MATERIALIZED (
  SELECT * FROM json_to_recordset($1::json) AS t(
    k text, h text, p uuid, s int, r text, receipt text, channel text, client uuid, inst text,
    method text, acct text, amount bigint, bdate date, ref text, approval text, stan text,
    f7 text, rrn text, term text, serial text, caller text, at timestamptz, posting_id text,
    kind text)
)"""
_KEYS = """k AS (
  INSERT INTO dedup_keys (key, kind, request_hash, payment_id, status_code, response)
  SELECT t.k, 'payment', decode(t.h, 'hex'), t.p, t.s, decode(t.r, 'hex') FROM t, {gate}
  ON CONFLICT (key) DO NOTHING
  RETURNING key, payment_id
)"""
_PAYMENTS = """pay AS (
  INSERT INTO payments (id, receipt_no, dedup_key, channel, client_id, institution_id, method,
                        account_no, amount, business_date, reference, approval_code, stan,
                        transmitted, rrn, terminal_id, card_serial, caller, created_at, epoch)
  SELECT t.p, t.receipt, t.k, t.channel, t.client, t.inst, t.method, t.acct, t.amount, t.bdate,
         t.ref, t.approval, t.stan, t.f7, t.rrn, t.term, t.serial, t.caller, t.at, $2::bigint
    FROM t JOIN k ON k.key = t.k
  RETURNING id, account_no, amount, channel, created_at
)"""
_OUTBOX = """INSERT INTO outbox (posting_id, kind, payment_id, account_no, amount, channel,
                    occurred_at)
SELECT t.posting_id, t.kind, pay.id, pay.account_no, pay.amount, pay.channel, pay.created_at
  FROM pay JOIN t ON t.p = pay.id
RETURNING payment_id"""
_RECORD = f"WITH {_FENCE},\n{_BATCH},\n{_KEYS.format(gate='fence')},\n{_PAYMENTS}\n{_OUTBOX}"


def record_statement(*, gate: str, ctes: str, result: str) -> str:
    """A statement that records one prepared batch (see `PostingPath.record_one`) together with
    more writes: `gate` is a CTE named ``gate`` (it may read ``fence``), and the keys are only
    taken for a batch row when it yields a row; `ctes` (which may read ``t`` and ``k``, the keys
    won) run in the same statement; `result` is the final SELECT, one row whose ``recorded``
    column says whether the payment was recorded. $1 and $2 are the ledger's; the caller's
    parameters start at $3."""
    return (f"WITH {_FENCE},\n{_BATCH},\n{gate},\n{_KEYS.format(gate='gate')},\n{ctes},\n"
            f"{_PAYMENTS},\nob AS (\n{_OUTBOX}\n)\n{result}")


@dataclass(frozen=True, slots=True)
class Prepared:
    """Payments numbered and rendered, ready for one statement (`batch` is $1)."""

    requests: Sequence[PaymentRequest]
    records: list[PaymentRecord]
    renders: list[tuple[int | None, bytes | None]]
    batch: str


class PostingPath:
    """Group-committing writer of payments (active node only)."""

    def __init__(self, pool: asyncpg.Pool, calendar: BusinessCalendar, metrics: Metrics,
                 epoch: Callable[[], int], *, max_batch: int = 256, committers: int = 4,
                 on_fenced: Callable[[], Awaitable[None]] | None = None,
                 on_committed: Callable[[], None] | None = None,
                 on_paid: Callable[[str, int], None] | None = None) -> None:
        self.pool = pool
        self.calendar = calendar
        self.metrics = metrics
        self.epoch = epoch
        self.max_batch = max_batch
        self.receipts = ReceiptNumbers()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._committers = committers
        self._on_fenced = on_fenced
        self._on_committed = on_committed
        self._on_paid = on_paid  # (account, amount) of each payment recorded, on every path
        self._receipt_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()

    def start(self) -> None:
        if not self._tasks:
            # kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11
            self._loop = asyncio.get_running_loop()
            self._tasks = [asyncio.create_task(self._committer(), name=f"committer-{i}")
                           for i in range(self._committers)]

    async def stop(self, grace_s: float = 10.0) -> None:
        """Finish what is queued (for `grace_s` at most), then stop the committers."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), grace_s)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        while not self._queue.empty():  # nothing may wait for ever
            p = self._queue.get_nowait()
            if not p.future.done():
                p.future.set_exception(LedgerError("the switch is stopping"))

    async def submit(self, request: PaymentRequest) -> Outcome:
        if not self._tasks or self._loop is None:
            raise LedgerError("the posting path is not running on this node")
        fut: asyncio.Future[Outcome] = self._loop.create_future()
        await self._queue.put(_Pending(request, fut))
        return await fut

    async def _committer(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            except asyncio.CancelledError:
                self._done(batch)
                for p in batch:  # the statement may have been sent, even committed
                    if not p.future.done():
                        p.future.set_exception(CommitInterrupted("the switch is stopping"))
                raise
            except Exception as e:
                fenced = db.is_fenced(e)
                err: Exception = e
                if fenced:
                    err = Fenced("this node is no longer active")
                elif db.unavailable(e):  # the database went away under the statement, which
                    # may have committed: the outcome is unknown, as when the switch stops
                    err = CommitInterrupted("the database went away during the commit")
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                if fenced and self._on_fenced is not None:
                    await self._on_fenced()
                elif not fenced:
                    log.error("group commit failed", extra={"size": len(batch),
                                                             "error": type(e).__name__})
            self._done(batch)

    def _done(self, batch: list[_Pending]) -> None:
        for _ in batch:
            self._queue.task_done()

    async def _commit(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        # the same key twice in one batch: only the first goes in; the rest resolve as duplicates
        seen: set[str] = set()
        unique: list[_Pending] = []
        later: list[_Pending] = []
        for p in batch:
            (later if p.request.dedup_key in seen else unique).append(p)
            seen.add(p.request.dedup_key)
        # one lock order for every batch, so that two committers never deadlock on keys
        unique.sort(key=lambda p: p.request.dedup_key)
        async with self.pool.acquire() as con:
            results = await self.record_in(con, [p.request for p in unique], numbered=True)
            for p, r in zip(unique, results, strict=True):
                if not p.future.done():
                    p.future.set_result(r)
            for p in later:
                dup = await fetch_duplicate(con, p.request.dedup_key)
                if not p.future.done():
                    if dup is None:
                        p.future.set_exception(LedgerError("duplicate key vanished"))
                    else:
                        p.future.set_result(dup)
        self.metrics.group_commit_size.observe(len(batch))
        self.metrics.group_commit_latency.observe(time.perf_counter() - started)
        if self._on_committed is not None:
            self._on_committed()

    async def record_in(self, con: Conn, requests: Sequence[PaymentRequest], *,
                        numbered: bool = False) -> list[Outcome]:
        """Record payments: in one statement of their own (fenced by this node's epoch), or
        inside the caller's transaction when there is one. `numbered`: tell the requests'
        `numbered` hooks their records; only for a statement of its own, whose Committed
        outcome means durable (the group commit's)."""
        if not requests:
            return []
        prep = await self.prepare(con, requests, numbered=numbered)
        rows = await con.fetch(_RECORD, prep.batch, self.epoch())
        won = {r["payment_id"] for r in rows}
        out: list[Outcome] = []
        for i, (q, r) in enumerate(zip(requests, prep.records, strict=True)):
            if r.id in won:
                out.append(self._committed(prep, i))
            else:
                dup = await fetch_duplicate(con, q.dedup_key)
                if dup is None:  # cannot happen: ON CONFLICT saw a row
                    raise LedgerError("duplicate key vanished")
                out.append(dup)
        return out

    async def record_one(self, con: Conn, request: PaymentRequest, statement: str,
                         *args: object) -> Outcome | None:
        """Record `request` with `statement` (from `record_statement`) and its parameters
        `args` ($3...): Committed when recorded, else the key's earlier holder (Duplicate), or
        None when the key is free and the gate let nothing through."""
        prep = await self.prepare(con, [request])
        recorded = await con.fetchval(statement, prep.batch, self.epoch(), *args)
        if recorded:
            return self._committed(prep, 0)
        return await fetch_duplicate(con, request.dedup_key)

    def _committed(self, prep: Prepared, i: int) -> Committed:
        status, body = prep.renders[i]
        request = prep.requests[i]
        self.metrics.child(self.metrics.payments, request.channel).inc()
        if self._on_paid is not None:
            self._on_paid(request.account_no, request.amount)
        return Committed(prep.records[i], status, body)

    async def prepare(self, con: Conn, requests: Sequence[PaymentRequest], *,
                      numbered: bool = False) -> Prepared:
        """Number, date and render `requests`, and encode them as one statement parameter;
        with `numbered`, their hooks are told their records right after the statement is
        sent (a callback of the next loop turn: the caller sends it first)."""
        now = datetime.now(UTC)
        bdate = self.calendar.date_at(now)
        async with self._receipt_lock:
            numbers = await self.receipts.take(con, len(requests))
        records: list[PaymentRecord] = []
        renders: list[tuple[int | None, bytes | None]] = []
        ids = time_ordered_ids(len(requests))
        day = f"{bdate.year:04d}{bdate.month:02d}{bdate.day:02d}"  # strftime costs 2 µs a call
        for i, (req, n) in enumerate(zip(requests, numbers, strict=True)):
            receipt = f"{day}{n:010d}"[-20:]
            rec = PaymentRecord(
                id=ids[i], receipt_no=receipt,
                approval_code=f"{n % 1_000_000:06d}",
                posting_id=posting_id_for(req.kind, receipt), channel=req.channel,
                method=req.method, account_no=req.account_no, amount=req.amount,
                business_date=bdate, created_at=now, client_id=req.client_id,
                institution_id=req.institution_id, reference=req.reference,
            )
            records.append(rec)
            renders.append(req.render(rec) if req.render else (None, None))
            if numbered and req.numbered is not None:
                assert self._loop is not None  # numbered: only the committers, once started
                self._loop.call_soon(_tell_numbered, req.numbered, rec)
        batch = orjson.dumps([{
            # orjson writes our uuid.UUID itself, faster than str() (asyncpg's UUIDs, as in
            # client ids read from the database, it does not know: those go as str)
            "k": q.dedup_key, "h": q.request_hash.hex(), "p": r.id, "s": st,
            "r": body.hex() if body is not None else None, "receipt": r.receipt_no,
            "channel": q.channel, "inst": q.institution_id,
            "client": str(q.client_id) if q.client_id is not None else None,
            "method": q.method, "acct": q.account_no, "amount": q.amount,
            "bdate": r.business_date, "ref": q.reference, "approval": r.approval_code,
            "stan": q.stan, "f7": q.transmitted, "rrn": q.rrn, "term": q.terminal_id,
            "serial": q.card_serial, "caller": q.caller, "at": r.created_at,
            "posting_id": r.posting_id, "kind": q.kind,
        } for q, r, (st, body) in zip(requests, records, renders, strict=True)])
        return Prepared(requests, records, renders, batch.decode())


def _tell_numbered(hook: Callable[[PaymentRecord], None], rec: PaymentRecord) -> None:
    try:
        hook(rec)
    except Exception as e:  # an aid to the caller: never the batch's failure
        log.warning("numbered hook failed", extra={"error": type(e).__name__,
                                                   "receipt_no": rec.receipt_no})


async def fetch_duplicate(con: Conn | asyncpg.Pool, key: str) -> Duplicate | None:
    row = await con.fetchrow(
        "SELECT kind, request_hash, payment_id, status_code, response FROM dedup_keys"
        " WHERE key = $1", key)
    if row is None:
        return None
    return Duplicate(row["kind"], bytes(row["request_hash"]), row["payment_id"],
                     row["status_code"], bytes(row["response"]) if row["response"] else None)


_PAYMENT_COLS = """
p.id, p.receipt_no, p.approval_code, p.channel, p.method, p.account_no, p.amount,
p.business_date, p.created_at, p.client_id, p.institution_id, p.reference, p.reversed_at,
o.posting_id, o.state AS outbox_state
"""


def _record(row: Any) -> PaymentRecord:
    state = row["outbox_state"]
    posting = {"sent": "posted", "dead": "failed"}.get(state, "pending")
    return PaymentRecord(
        id=row["id"], receipt_no=row["receipt_no"], approval_code=row["approval_code"] or "",
        posting_id=row["posting_id"], channel=row["channel"], method=row["method"],
        account_no=row["account_no"], amount=row["amount"], business_date=row["business_date"],
        created_at=row["created_at"], client_id=row["client_id"],
        institution_id=row["institution_id"], reference=row["reference"],
        reversed_at=row["reversed_at"], posting=posting,
    )


async def load_payment(con: Conn | asyncpg.Pool,
                       payment_id: uuid.UUID) -> PaymentRecord | None:
    row = await con.fetchrow(
        f"SELECT {_PAYMENT_COLS} FROM payments p"  # noqa: S608 - a constant column list
        " JOIN outbox o ON o.payment_id = p.id AND o.kind <> 'reversal' WHERE p.id = $1",
        payment_id)
    return _record(row) if row else None


async def reverse_in(con: Conn, payment_id: uuid.UUID, *, calendar: BusinessCalendar,
                     channel: str, epoch: int, amount: int | None = None,
                     institution_id: str | None = None, stan: str | None = None,
                     transmitted: str | None = None) -> tuple[PaymentRecord, bool, date]:
    """Reverse a payment inside the caller's fenced transaction.

    Returns the payment, whether this call reversed it (False: it already was), and the
    business date the reversal is booked on. Raises `NotReversible` for another business date
    or a different amount.

    The business date is read once the payment is locked, from the same clock reading that
    stamps the reversal: read before (as the caller's "today"), a reversal approved just after
    the cut-over was booked on the old date, and its answer named the new one.
    """
    row = await con.fetchrow(
        "SELECT id, business_date, amount, reversed_at, receipt_no, account_no, channel"
        " FROM payments WHERE id = $1 FOR UPDATE", payment_id)
    if row is None:
        raise NotReversible("no such payment", "payment_not_found")
    # a different amount is refused even when the payment is reversed already: that is not
    # a repeat of the reversal made
    if amount is not None and amount != row["amount"]:
        raise NotReversible("the amount differs from the original payment's", "amount_differs")
    if row["reversed_at"] is not None:
        rec = await load_payment(con, payment_id)
        assert rec is not None
        booked = await con.fetchval(
            "SELECT business_date FROM reversals WHERE payment_id = $1", payment_id)
        return rec, False, booked if booked is not None else calendar.date_at(row["reversed_at"])
    now = datetime.now(UTC)
    today = calendar.date_at(now)
    if row["business_date"] != today:
        raise NotReversible(f"the payment belongs to business date {row['business_date']}, "
                            f"today is {today}; only same-day payments can be reversed")
    await con.execute("UPDATE payments SET reversed_at = $2 WHERE id = $1", payment_id, now)
    await con.execute(
        "INSERT INTO reversals (payment_id, business_date, channel, institution_id, stan,"
        " transmitted, created_at, epoch) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        payment_id, today, channel, institution_id, stan, transmitted, now, epoch)
    await con.execute(
        "INSERT INTO outbox (posting_id, kind, payment_id, account_no, amount,"
        " original_posting_id, channel, occurred_at)"
        " SELECT 'R' || p.receipt_no, 'reversal', p.id, p.account_no, p.amount, o.posting_id,"
        "        $2, $3"
        "   FROM payments p JOIN outbox o ON o.payment_id = p.id AND o.kind <> 'reversal'"
        "  WHERE p.id = $1", payment_id, channel, now)
    rec = await load_payment(con, payment_id)
    assert rec is not None
    return rec, True, today


async def ledger_dates(conn: asyncpg.Pool | asyncpg.Connection) -> list[date]:
    """The business dates the ledger holds a payment or a reversal on (see
    `switch.business.filing_dates` for the billing system's dates to read with them)."""
    return [r["d"] for r in await conn.fetch(
        "SELECT business_date AS d FROM payments UNION SELECT business_date FROM reversals")]
