"""Batches: order, PIN generation in the HSM, the new-card file, reconciliation, stock-in.

Generation runs chunk by chunk (1000 serials, the HSM's limit per voucher-generate request),
with several HSM requests in flight; each chunk is one database transaction: its cards and
their `ordered` events by COPY, and its slice of the new-card file. A failed generation can be
resumed: chunks already written are skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from switch import db
from switch.business import iso_date
from switch.cards import states
from switch.cards.errors import Conflict, Gone, HsmUnavailable, InvalidInput, NotFound
from switch.cards.files import (
    CardBackParser,
    CardBackRecord,
    Reconciliation,
    new_card_header,
    new_card_record,
    reconcile_steps,
    trailer,
)
from switch.cards.jobs import Progress
from switch.cards.serials import MAX_SEQ, make_serial
from switch.cards.states import CardState
from switch.db import fence
from switch.hsm_client import HsmClient
from switch.keys import KeyRing
from switch.loop import all_or_cancel, in_slices, run_in_turns

log = logging.getLogger("gridpay.cards.batches")

CHUNK = 1000  # serials per HSM request
#: HSM requests in flight per generation job. Their answers tend to arrive together, and each
#: is about 4 ms of building rows on the event loop, run back to back: 6 held the loop 16 ms
#: (bench.cards, 200,000 cards, 2.48 s), 3 holds it 10 ms for 5 % more time (2.6 s)
IN_FLIGHT = 3
STOCK_SLICE = 50_000  # cards per stock-in transaction
WAREHOUSE = "warehouse"
MAX_QUANTITY = 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchOrder:
    face_value: int
    quantity: int
    expiry: dt.date
    manufacturer: str

    @classmethod
    def validate(cls, doc: Mapping[str, object], *, face_values: Sequence[int],
                 expiry_years: int, today: dt.date | None = None) -> BatchOrder:
        today = today or dt.date.today()
        fv = doc.get("face_value")
        if type(fv) is not int or fv not in face_values:
            raise InvalidInput(f"face_value must be one of {list(face_values)} (fen)",
                               code="invalid_face_value")
        qty = doc.get("quantity")
        if type(qty) is not int or not 1 <= qty <= MAX_QUANTITY:
            raise InvalidInput(f"quantity must be an integer from 1 to {MAX_QUANTITY}",
                               code="invalid_quantity")
        man = doc.get("manufacturer")
        if not isinstance(man, str) or not man or len(man) > 32 or "|" in man \
                or not man.isascii() or not man.isprintable():
            raise InvalidInput("manufacturer must be a name of up to 32 characters",
                               code="invalid_manufacturer")
        raw_exp = doc.get("expiry")
        if raw_exp is None:
            try:
                expiry = today.replace(year=today.year + expiry_years)
            except ValueError:  # 29 February
                expiry = today.replace(year=today.year + expiry_years, day=28)
        else:
            bad = InvalidInput("expiry must be a date YYYY-MM-DD", code="invalid_expiry")
            if not isinstance(raw_exp, str):
                raise bad
            try:
                expiry = iso_date(raw_exp)
            except ValueError:
                raise bad from None
            if expiry <= today:
                raise InvalidInput("expiry must be in the future", code="invalid_expiry")
        return cls(face_value=fv, quantity=qty, expiry=expiry, manufacturer=man)


async def create_batch(pool: asyncpg.Pool, order: BatchOrder, *, issuer: str, actor: str,
                       job_id: Any, today: dt.date | None = None, epoch: int | None = None
                       ) -> int:
    """Reserve a serial range and record the batch (`generating`); returns its id."""
    today = today or dt.date.today()
    prefix = f"{issuer}{today.year % 100:02d}"
    async with pool.acquire() as conn, conn.transaction():
        await fence(conn, epoch)
        # the counter moves only when the whole range fits (its CHECK would refuse it too,
        # but as a database error): no row back means the prefix has no room for the order
        # (a new prefix always has room: an order is at most MAX_QUANTITY cards)
        nxt = await conn.fetchval(
            "INSERT INTO card_serial_counters (prefix, next_seq) VALUES ($1, 1 + $2::bigint)"
            " ON CONFLICT (prefix) DO UPDATE"
            " SET next_seq = card_serial_counters.next_seq + $2::bigint"
            " WHERE card_serial_counters.next_seq + $2::bigint <= $3::bigint + 1"
            " RETURNING next_seq",
            prefix, order.quantity, MAX_SEQ)
        if nxt is None:
            left = await conn.fetchval(
                "SELECT $2::bigint + 1 - next_seq FROM card_serial_counters WHERE prefix = $1",
                prefix, MAX_SEQ)
            raise Conflict(f"the serial sequence of prefix {prefix} is exhausted: "
                           f"{max(0, int(left or 0))} serials are left, fewer than the "
                           f"{order.quantity} ordered", code="serials_exhausted")
        first = int(nxt) - order.quantity
        batch_id: int = await conn.fetchval(
            "INSERT INTO card_batches (face_value, quantity, expiry, manufacturer, prefix,"
            " first_seq, ordered_by, generate_job) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) RETURNING id",
            order.face_value, order.quantity, order.expiry, order.manufacturer, prefix, first,
            actor, job_id)
    return batch_id


async def batch_row(pool: asyncpg.Pool | asyncpg.Connection, batch_id: int) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM card_batches WHERE id = $1", batch_id)
    if row is None:
        raise NotFound(f"no batch {batch_id}", code="batch_not_found")
    return row


async def claim_for_resume(pool: asyncpg.Pool, batch_id: int, job_id: uuid.UUID,
                           epoch: int | None) -> int:
    """Take a failed batch back for generation by job `job_id` (one request wins); its
    quantity."""
    async with pool.acquire() as conn, conn.transaction():
        await fence(conn, epoch)
        qty = await conn.fetchval(
            "UPDATE card_batches SET status = 'generating', generate_job = $2"
            " WHERE id = $1 AND status = 'failed' RETURNING quantity", batch_id, job_id)
    if qty is None:
        row = await batch_row(pool, batch_id)
        raise Conflict(f"batch {batch_id} is {row['status']}; only a failed batch is resumed",
                       code="batch_state")
    return int(qty)


async def batch_view(pool: asyncpg.Pool, batch_id: int) -> dict[str, Any]:
    row = await batch_row(pool, batch_id)
    counts = {r["state"]: int(r["n"]) for r in await pool.fetch(
        f"SELECT {states.SHOWN_STATE} AS state, count(*) AS n FROM cards"  # noqa: S608
        " WHERE batch_id = $1 GROUP BY 1", batch_id, states.UNREDEEMED_VALUES)}
    first = make_serial(row["prefix"], row["first_seq"])
    last = make_serial(row["prefix"], row["first_seq"] + row["quantity"] - 1)
    return {"id": row["id"], "face_value": row["face_value"], "quantity": row["quantity"],
            "expiry": row["expiry"].isoformat(), "manufacturer": row["manufacturer"],
            "status": row["status"], "first_serial": first, "last_serial": last,
            "ordered_by": row["ordered_by"], "created_at": row["created_at"].isoformat(),
            "generate_job": str(row["generate_job"]) if row["generate_job"] else None,
            "new_card_file_sha256": row["file_sha256"],
            "new_card_file_purged": row["file_purged_at"] is not None,
            "counts": {s.value: counts.get(s.value, 0) for s in CardState},
            "reconciliation": _summary(row["reconciliation"])}


def _summary(rec: Any) -> Any:
    if not isinstance(rec, dict):
        return rec
    return {k: v for k, v in rec.items() if k != "discrepancies"}


# --- generation -------------------------------------------------------------------------------

async def generate(pool: asyncpg.Pool, hsm: HsmClient, keyring: KeyRing, batch_id: int,
                   progress: Progress, *, in_flight: int = IN_FLIGHT,
                   epoch: int | None = None) -> dict[str, Any]:
    """PINs in the HSM for every card of the batch; cards `ordered`; the new-card file.
    Every write is fenced by `epoch` (see `fence`)."""
    row = await batch_row(pool, batch_id)
    if row["status"] not in ("generating", "failed"):
        raise Conflict(f"batch {batch_id} is {row['status']}, not being generated",
                       code="batch_state")
    try:
        vvk = keyring.vvk
        print_key = keyring.print_key(row["manufacturer"])
    except KeyError:
        raise InvalidInput(f"no print key for manufacturer {row['manufacturer']}",
                           code="unknown_manufacturer") from None
    prefix, first, qty, face = row["prefix"], row["first_seq"], row["quantity"], row["face_value"]
    expiry, actor = row["expiry"], row["ordered_by"]
    done_chunks = {int(r["seq"]) for r in await pool.fetch(
        "SELECT seq FROM card_file_chunks WHERE batch_id = $1", batch_id)}
    n_chunks = (qty + CHUNK - 1) // CHUNK
    progress.add(sum(min(CHUNK, qty - s * CHUNK) for s in done_chunks))
    todo: asyncio.Queue[int] = asyncio.Queue()
    for s in range(n_chunks):
        if s not in done_chunks:
            todo.put_nowait(s)
    doc_id = str(batch_id)

    async def worker() -> None:
        while True:
            try:
                seq = todo.get_nowait()
            except asyncio.QueueEmpty:
                return
            lo = first + seq * CHUNK
            serials = [make_serial(prefix, q) for q in range(lo, min(lo + CHUNK, first + qty))]
            try:
                records = await hsm.voucher_generate(vvk, print_key, serials)
            except Exception as e:
                raise HsmUnavailable(f"voucher generation failed ({type(e).__name__})") from e
            if [r.serial for r in records] != serials:
                raise HsmUnavailable("the HSM answered for other serials")
            now = dt.datetime.now(dt.UTC)
            cards = [(r.serial, batch_id, face, "ordered", "manufacturer", expiry,
                      bytes.fromhex(r.tag), now) for r in records]
            events = [(r.serial, "ordered", actor, "batch ordered", "batch", doc_id, now)
                      for r in records]
            body = "".join(new_card_record(r.serial, face, r.encrypted_pin)
                           for r in records).encode("ascii")
            async with pool.acquire() as conn, conn.transaction():
                await fence(conn, epoch)
                await conn.copy_records_to_table(
                    "cards", records=cards,
                    columns=["serial", "batch_id", "face_value", "state", "location", "expiry",
                             "tag", "updated_at"])
                await conn.copy_records_to_table(
                    "card_events", records=events,
                    columns=["serial", "to_state", "actor", "reason", "doc_type", "doc_id",
                             "at"])
                await conn.execute(
                    "INSERT INTO card_file_chunks (batch_id, seq, cards, body)"
                    " VALUES ($1, $2, $3, $4)", batch_id, seq, len(records), body)
            progress.add(len(records))

    try:
        await all_or_cancel(worker() for _ in range(max(1, in_flight)))
        kcv = await hsm.key_check_value(print_key)
        digest = await _file_digest(pool, batch_id)
    except BaseException as e:
        if not db.is_fenced(e):  # a stale node writes nothing
            try:
                async with pool.acquire() as conn, conn.transaction():
                    await fence(conn, epoch)  # cancelled because the lease was lost, say
                    await conn.execute(
                        "UPDATE card_batches SET status = 'failed' WHERE id = $1", batch_id)
            except Exception as marking:
                if not db.is_fenced(marking):
                    raise
        raise
    async with pool.acquire() as conn, conn.transaction():
        await fence(conn, epoch)
        await conn.execute(
            "UPDATE card_batches SET status = 'ordered', file_sha256 = $2, print_key_kcv = $3"
            " WHERE id = $1", batch_id, digest, kcv)
    return {"batch_id": batch_id, "cards": qty, "new_card_file_sha256": digest}


async def _chunks(pool: asyncpg.Pool, batch_id: int, page: int = 20) -> AsyncIterator[bytes]:
    after = -1
    while True:
        rows = await pool.fetch(
            "SELECT seq, body FROM card_file_chunks WHERE batch_id = $1 AND seq > $2"
            " ORDER BY seq LIMIT $3", batch_id, after, page)
        if not rows:
            return
        for r in rows:
            yield bytes(r["body"])
        after = int(rows[-1]["seq"])


async def _file_digest(pool: asyncpg.Pool, batch_id: int) -> str:
    h = hashlib.sha256()
    async for body in _chunks(pool, batch_id):
        h.update(body)
    return h.hexdigest()


# The new-card files of the batches of `$1` (serials) whose every card is voided: erased, in
# the void's transaction. Such a batch never reaches stock-in (which erases the file of the
# others), and the file holds each card's PIN under the print key.
_ERASE_DEAD_FILES = """
WITH b AS (SELECT DISTINCT batch_id FROM cards WHERE serial = ANY($1::text[])),
dead AS (
  UPDATE card_batches cb SET file_purged_at = now()
    FROM b
   WHERE cb.id = b.batch_id AND cb.file_purged_at IS NULL
     AND cb.status NOT IN ('generating', 'failed')  -- its cards and file are still being made
     AND NOT EXISTS (SELECT 1 FROM cards c WHERE c.batch_id = cb.id AND c.state <> 'voided')
  RETURNING cb.id
)
DELETE FROM card_file_chunks f USING dead WHERE f.batch_id = dead.id"""


async def _erase_file(conn: states.Conn, batch_id: int) -> None:
    """Erase the batch's new-card file (its PINs, encrypted): nothing more will be stocked in."""
    await conn.execute("DELETE FROM card_file_chunks WHERE batch_id = $1", batch_id)
    await conn.execute("UPDATE card_batches SET file_purged_at = now()"
                       " WHERE id = $1 AND file_purged_at IS NULL", batch_id)


async def erase_files_of_voided_batches(conn: states.Conn,
                                        serials: Sequence[str]) -> None:
    """Erase the new-card files of the batches of `serials` whose every card is voided."""
    await conn.execute(_ERASE_DEAD_FILES, list(serials))


async def new_card_file(pool: asyncpg.Pool, batch_id: int) -> AsyncIterator[bytes]:
    """The batch's new-card file, streamed: header, records (from the chunks), trailer."""
    row = await batch_row(pool, batch_id)
    if row["status"] == "generating":
        raise Conflict(f"batch {batch_id} is still generating; its file is not ready",
                       code="file_not_ready")
    if row["status"] == "failed":
        raise Conflict(f"batch {batch_id} failed while generating and has no file; order a "
                       "new batch", code="file_not_ready")
    if row["file_purged_at"] is not None:
        raise Gone(f"the new-card file of batch {batch_id} was erased (at stock-in, or when "
                   "every card of the batch had been voided)", code="file_purged")
    yield new_card_header(batch_id=batch_id, face_value=row["face_value"],
                          count=row["quantity"], manufacturer=row["manufacturer"],
                          created=row["created_at"].astimezone(dt.UTC).isoformat(
                              timespec="seconds"),
                          print_kcv=row["print_key_kcv"] or "", expiry=row["expiry"].isoformat())
    async for body in _chunks(pool, batch_id):
        yield body
    yield trailer(row["quantity"], row["quantity"] * row["face_value"], row["file_sha256"])


# --- reconciliation and stock-in ---------------------------------------------------------------

async def feed_card_back(parser: CardBackParser, lines: Iterable[bytes]) -> None:
    """Feed `lines` (each with its newline) to `parser`, with turns for the event loop in
    between (`in_slices`): a megabyte of a card-back file already received is 25 000 lines, and a
    whole file up to two million, which the node's payments must not wait behind."""
    async for line in in_slices(lines):
        parser.feed(line)


async def reconcile_batch(pool: asyncpg.Pool, batch_id: int, records: Sequence[CardBackRecord],
                          *, actor: str, file_batch_id: int | None = None,
                          progress: Progress | None = None,
                          epoch: int | None = None) -> Reconciliation:
    """Match the card-back file: matched cards → produced, the batch's cards in discrepancy →
    voided with the reconciliation as the reason. Once per batch."""
    row = await batch_row(pool, batch_id)
    if file_batch_id is not None and file_batch_id != batch_id:
        raise InvalidInput(f"the card-back file is for batch {file_batch_id}, not {batch_id}",
                           code="wrong_batch")
    if row["status"] != "ordered":
        raise Conflict(f"batch {batch_id} is {row['status']}; a card-back file is taken once, "
                       "for an ordered batch", code="batch_state")
    # a turn for the event loop every few milliseconds of comparing: a million-card file
    # takes about two seconds of CPU, which the node's payments must not wait behind
    rec = await run_in_turns(reconcile_steps(
        batch_id=batch_id, prefix=row["prefix"], first_seq=row["first_seq"],
        quantity=row["quantity"], face_value=row["face_value"], records=records))
    to_void = rec.to_void()
    by_kind: dict[str, list[str]] = {}
    for serial, kind in to_void.items():
        by_kind.setdefault(kind, []).append(serial)
    async with pool.acquire() as conn, conn.transaction():
        await fence(conn, epoch)
        locked = await conn.fetchval(
            "SELECT id FROM card_batches WHERE id = $1 AND status = 'ordered' FOR UPDATE",
            batch_id)
        if locked is None:
            raise Conflict(f"batch {batch_id} was reconciled meanwhile", code="batch_state")
        # cards voided before the file came (a void of an ordered card is allowed) stay voided:
        # neither voided again nor counted among the cards the file matches
        already = {r["serial"] for r in await conn.fetch(
            "SELECT serial FROM cards WHERE batch_id = $1 AND state = 'voided'", batch_id)}
        before = len(already - to_void.keys())
        rec = dataclasses.replace(rec, matched=rec.matched - before, voided_before=before)
        for kind, serials in sorted(by_kind.items()):
            todo = [s for s in serials if s not in already]
            if todo:
                await states.transition(conn, todo, CardState.VOIDED, event="void", actor=actor,
                                        reason=f"reconciliation: {kind}",
                                        doc=states.Document(type="batch", id=str(batch_id)))
        # a file that comes after the cards' expiry date makes them expired, not produced
        exclude = list(to_void)
        expired = await states.transition_batch(
            conn, batch_id, CardState.ORDERED, CardState.EXPIRED, actor=actor,
            reason="past expiry date", exclude=exclude)
        moved = await states.transition_batch(
            conn, batch_id, CardState.ORDERED, CardState.PRODUCED, actor=actor,
            reason="reconciled with the card-back file", exclude=exclude)
        if moved + expired != rec.matched:
            raise Conflict(f"batch {batch_id}: {moved + expired} cards matched in the database,"
                           f" {rec.matched} in the file", code="reconciliation_mismatch")
        rec = dataclasses.replace(rec, expired=expired)
        await conn.execute("UPDATE card_batches SET status = 'reconciled', reconciliation = $2"
                           " WHERE id = $1", batch_id, rec.as_dict())
        if not moved:  # every card voided or expired: nothing will be stocked in, so the
            # file (its PINs, encrypted) goes now, as with any void that completes a batch
            await _erase_file(conn, batch_id)
    if progress is not None:
        progress.add(row["quantity"])
    return rec


async def stock_in(pool: asyncpg.Pool, batch_id: int, *, actor: str,
                   progress: Progress | None = None, epoch: int | None = None
                   ) -> dict[str, Any]:
    """produced → in_stock at the warehouse, in slices; then erase the new-card file."""
    row = await batch_row(pool, batch_id)
    if row["status"] != "reconciled":
        raise Conflict(f"batch {batch_id} is {row['status']}; stock-in follows reconciliation",
                       code="batch_state")
    prefix, first, qty = row["prefix"], row["first_seq"], row["quantity"]
    total = 0
    for lo in range(first, first + qty, STOCK_SLICE):
        hi = min(lo + STOCK_SLICE, first + qty) - 1
        async with pool.acquire() as conn, conn.transaction():
            await fence(conn, epoch)
            total += await states.transition_batch(
                conn, batch_id, CardState.PRODUCED, CardState.IN_STOCK, actor=actor,
                reason="stocked in", location=WAREHOUSE, first=make_serial(prefix, lo),
                last=make_serial(prefix, hi))
        if progress is not None:
            progress.add(hi - lo + 1)
    async with pool.acquire() as conn, conn.transaction():
        await fence(conn, epoch)
        await _erase_file(conn, batch_id)
        await conn.execute("UPDATE card_batches SET status = 'stocked' WHERE id = $1", batch_id)
    return {"batch_id": batch_id, "stocked_in": total, "location": WAREHOUSE}
