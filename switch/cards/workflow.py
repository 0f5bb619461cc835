"""The documents that move cards after stock-in: voids, stocktakes, requests and issues, sales,
unlocks; and the reports (a card's history, inventory, the recharge ledger)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import asyncpg

from switch import db
from switch.business import iso_date
from switch.cards import states
from switch.cards.batches import erase_files_of_voided_batches
from switch.cards.errors import Conflict, Forbidden, InvalidInput, NotFound
from switch.cards.serials import (
    SerialRange,
    compress,
    expand_steps,
    not_a_serial,
    valid_serial,
)
from switch.cards.states import UNREDEEMED_VALUES, CardState, Document
from switch.cards.users import HALL_ROLES, Role, User
from switch.loop import run_in_turns

#: Called with the connection and the action's result as the last step of the action's own
#: transaction, so that what it writes (the operation log's entry) commits with the action or
#: not at all. Each action's transactions start with `db.fence(conn, epoch)` when given
#: the node's lease epoch (and so does the lazy expiry some of them run first).
Audit = Callable[[states.Conn, dict[str, Any]], Awaitable[None]]


async def _audited(audit: Audit | None, conn: states.Conn, out: dict[str, Any]
                   ) -> dict[str, Any]:
    if audit is not None:
        await audit(conn, out)
    return out


VOID_REASONS = ("damaged", "lost", "defective", "stolen", "inspection", "other")
#: Voids for these reasons wait for an approver (maker-checker).
VOID_NEEDS_APPROVAL = frozenset({"lost"})
WAREHOUSE = "warehouse"


async def cards_of(doc: Mapping[str, object], limit: int = 1_000_000) -> list[str]:
    """Serials named by `serials` (a list) and `ranges` (a list of {first, last}), expanded
    with turns for the event loop (up to a million of them)."""
    raw_serials = doc.get("serials", [])
    raw_ranges = doc.get("ranges", [])
    if not isinstance(raw_serials, list) or not all(isinstance(s, str) for s in raw_serials):
        raise InvalidInput("serials must be a list of 16-digit strings", code="invalid_serial")
    if not isinstance(raw_ranges, list):
        raise InvalidInput("ranges must be a list of {first, last}", code="invalid_range")
    ranges: list[SerialRange] = []
    for r in raw_ranges:
        if not isinstance(r, dict) or not isinstance(r.get("first"), str) \
                or not isinstance(r.get("last"), str):
            raise InvalidInput("each range is {\"first\": serial, \"last\": serial}",
                               code="invalid_range")
        ranges.append(SerialRange(r["first"], r["last"]))
    out = await run_in_turns(expand_steps(raw_serials, ranges, limit))
    if not out:
        raise InvalidInput("name at least one card (serials or ranges)", code="no_cards")
    return out


def _ranges(serials: Sequence[str]) -> list[dict[str, object]]:
    return [r.as_dict() for r in compress(serials)]


# --- voids ------------------------------------------------------------------------------------

async def void_cards(pool: asyncpg.Pool, user: User, serials: Sequence[str], reason: str, *,
                     note: str | None = None, stocktake_id: int | None = None,
                     audit: Audit | None = None, epoch: int | None = None) -> dict[str, Any]:
    """Void now, or (reason `lost`) record a void waiting for an approver."""
    if reason not in VOID_REASONS:
        raise InvalidInput(f"reason must be one of {', '.join(VOID_REASONS)}",
                           code="invalid_reason")
    pending = reason in VOID_NEEDS_APPROVAL
    async with pool.acquire() as conn:
        await states.expire_fenced(conn, serials, user.username, epoch)
        async with conn.transaction():
            await db.fence(conn, epoch)
            if stocktake_id is not None and await conn.fetchval(
                    "SELECT 1 FROM card_stocktakes WHERE id = $1", stocktake_id) is None:
                raise NotFound(f"no stocktake {stocktake_id}", code="stocktake_not_found")
            void_id: int = await conn.fetchval(
                "INSERT INTO card_voids (reason, note, serials, state, stocktake_id,"
                " requested_by, done_at) VALUES ($1, $2, $3, $4, $5, $6,"
                " CASE WHEN $7::bool THEN NULL ELSE now() END) RETURNING id",
                reason, note, list(serials), "pending_approval" if pending else "done",
                stocktake_id, user.username, pending)
            doc = Document(type="void", id=str(void_id))
            if pending:
                # Check now that every card could be voided; the approval does it.
                dry = conn.transaction()
                await dry.start()
                try:
                    await states.transition(conn, serials, CardState.VOIDED, event="void",
                                            actor=user.username, reason=reason, doc=doc)
                finally:
                    await dry.rollback()
            else:
                await states.transition(conn, serials, CardState.VOIDED, event="void",
                                        actor=user.username,
                                        reason=reason if not note else f"{reason}: {note}",
                                        doc=doc)
                await erase_files_of_voided_batches(conn, serials)
            return await _audited(audit, conn, {
                "void_id": void_id, "state": "pending_approval" if pending else "done",
                "reason": reason, "count": len(serials), "ranges": _ranges(serials)})


async def approve_void(pool: asyncpg.Pool, user: User, void_id: int, *, approve: bool = True,
                       audit: Audit | None = None, epoch: int | None = None) -> dict[str, Any]:
    async with pool.acquire() as conn:
        if approve:
            # a card past its expiry date is expired, not voided, as with a direct void; only
            # for an approval that the checks below will let through (a refused one changes
            # nothing)
            serials = await conn.fetchval(
                "SELECT serials FROM card_voids WHERE id = $1 AND state = 'pending_approval'"
                " AND requested_by <> $2", void_id, user.username)
            if serials:
                await states.expire_fenced(conn, serials, user.username, epoch)
        async with conn.transaction():
            await db.fence(conn, epoch)
            row = await conn.fetchrow("SELECT * FROM card_voids WHERE id = $1 FOR UPDATE", void_id)
            if row is None:
                raise NotFound(f"no void {void_id}", code="void_not_found")
            if row["state"] != "pending_approval":
                raise Conflict(f"void {void_id} is {row['state']}", code="void_state")
            if row["requested_by"] == user.username:
                raise Forbidden("the approver of a void cannot be its requester",
                                code="maker_checker")
            if approve:
                await states.transition(conn, row["serials"], CardState.VOIDED, event="void",
                                        actor=user.username,
                                        reason=f"{row['reason']} (approved by {user.username})",
                                        doc=Document(type="void", id=str(void_id)))
                await erase_files_of_voided_batches(conn, row["serials"])
            await conn.execute(
                "UPDATE card_voids SET state = $2, approved_by = $3, done_at = now() WHERE id = $1",
                void_id, "done" if approve else "rejected", user.username)
            return await _audited(audit, conn, {"void_id": void_id,
                                                "state": "done" if approve else "rejected",
                                                "count": len(row["serials"])})


# --- stocktakes -------------------------------------------------------------------------------

async def known_location(pool: asyncpg.Pool, location: str) -> bool:
    """The warehouse, or a hall that card-centre users belong to or cards are kept at."""
    if location == WAREHOUSE:
        return True
    if not location or len(location) > 32:
        return False
    return bool(await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM card_users WHERE hall = $1)"
        " OR EXISTS (SELECT 1 FROM cards WHERE location = $1"
        " AND state IN ('in_stock', 'issued'))", location))


#: a stocktake's comparison at a location ($1) of the serials counted ($2): how many cards
#: should be there (in stock there, or issued to it), which of them were not counted, and
#: which counted serials are not among them, each list in byte order (as Python sorts)
_STOCKTAKE = """
WITH stock AS (SELECT serial FROM cards
                WHERE location = $1 AND state IN ('in_stock', 'issued')),
     counted AS (SELECT unnest($2::text[]) AS serial)
SELECT (SELECT count(*) FROM stock),
       ARRAY(SELECT s FROM (SELECT serial FROM stock EXCEPT SELECT serial FROM counted) d(s)
             ORDER BY s COLLATE "C"),
       ARRAY(SELECT s FROM (SELECT serial FROM counted EXCEPT SELECT serial FROM stock) d(s)
             ORDER BY s COLLATE "C")"""


async def stocktake(pool: asyncpg.Pool, user: User, location: str, counted: Sequence[str], *,
                    known: bool, audit: Audit | None = None,
                    epoch: int | None = None) -> dict[str, Any]:
    """Compare the serials `counted` (distinct, as `cards_of` gives them) at `location` with
    the cards that should be there. `known`: what `known_location` said of it (the caller
    asks first, for its audit)."""
    user.require_hall(location)  # first: a hall's user learns nothing of other halls' codes
    if not known:
        raise InvalidInput("location is the warehouse or a hall that has users or cards",
                           code="invalid_location")
    if user.role is Role.STOREKEEPER and location != WAREHOUSE:
        raise Forbidden("a storekeeper counts the warehouse", code="forbidden_hall")
    async with pool.acquire() as conn, conn.transaction():
        await db.fence(conn, epoch)
        # Compared by PostgreSQL: a warehouse holds up to millions of cards, which as Python
        # sets (and their sorting) held the node's event loop most of a second
        compared = await conn.fetchrow(_STOCKTAKE, location, counted)
        assert compared is not None  # a SELECT of three values: one row
        expected, missing, unexpected = compared
        where = {r["serial"]: f"{r['state']} at {r['location']}" for r in await conn.fetch(
            "SELECT serial, state, location FROM cards WHERE serial = ANY($1::text[])",
            unexpected)}
        st_id: int = await conn.fetchval(
            "INSERT INTO card_stocktakes (location, counted, expected, missing, unexpected,"
            " counted_by) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            location, len(counted), expected, missing, unexpected, user.username)
        return await _audited(audit, conn, {
            "stocktake_id": st_id, "location": location, "counted": len(counted),
            "expected": expected, "missing_count": len(missing),
            "unexpected_count": len(unexpected), "missing": missing,
            "missing_ranges": _ranges(missing),
            "unexpected": [{"serial": s, "known_as": where.get(s, "unknown")}
                           for s in unexpected]})


# --- requests and issues ----------------------------------------------------------------------

def _request_doc(r: asyncpg.Record) -> dict[str, Any]:
    return {"id": r["id"], "hall": r["hall"], "face_value": r["face_value"],
            "quantity": r["quantity"], "state": r["state"], "requested_by": r["requested_by"],
            "decided_by": r["decided_by"], "note": r["note"],
            "created_at": r["created_at"].isoformat()}


MAX_REQUEST_QUANTITY = 1_000_000


def valid_face_value(value: object, face_values: Sequence[int]) -> bool:
    return type(value) is int and value in face_values


def valid_request_quantity(value: object) -> bool:
    return type(value) is int and 1 <= value <= MAX_REQUEST_QUANTITY


async def create_request(pool: asyncpg.Pool, user: User, face_value: object, quantity: object,
                         face_values: Sequence[int], *, audit: Audit | None = None,
                         epoch: int | None = None) -> dict[str, Any]:
    if not valid_face_value(face_value, face_values):
        raise InvalidInput(f"face_value must be one of {list(face_values)}",
                           code="invalid_face_value")
    if not valid_request_quantity(quantity):
        raise InvalidInput(f"quantity must be an integer from 1 to {MAX_REQUEST_QUANTITY}",
                           code="invalid_quantity")
    assert user.hall is not None  # noqa: S101 - hall roles always have one
    async with pool.acquire() as conn, conn.transaction():
        await db.fence(conn, epoch)
        row = await conn.fetchrow(
            "INSERT INTO card_requests (hall, face_value, quantity, requested_by)"
            " VALUES ($1, $2, $3, $4) RETURNING *", user.hall, face_value, quantity,
            user.username)
        assert row is not None  # noqa: S101
        return await _audited(audit, conn, _request_doc(row))


async def get_request(pool: asyncpg.Pool, user: User, request_id: int) -> dict[str, Any]:
    row = await pool.fetchrow("SELECT * FROM card_requests WHERE id = $1", request_id)
    if row is None:
        raise NotFound(f"no request {request_id}", code="request_not_found")
    user.require_hall(row["hall"])
    doc = _request_doc(row)
    issue = await pool.fetchrow("SELECT * FROM card_issues WHERE request_id = $1", request_id)
    if issue is not None:
        doc["issue"] = {"id": issue["id"], "ranges": issue["ranges"],
                        "issued_by": issue["issued_by"], "at": issue["at"].isoformat()}
    return doc


async def decide_request(pool: asyncpg.Pool, user: User, request_id: int, *, approve: bool,
                         note: str | None = None, audit: Audit | None = None,
                         epoch: int | None = None) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        await db.fence(conn, epoch)
        row = await conn.fetchrow("SELECT * FROM card_requests WHERE id = $1 FOR UPDATE",
                                  request_id)
        if row is None:
            raise NotFound(f"no request {request_id}", code="request_not_found")
        if row["requested_by"] == user.username:
            raise Forbidden("the approver of a request cannot be its requester",
                            code="maker_checker")
        if row["state"] != "pending":
            raise Conflict(f"request {request_id} is already {row['state']}",
                           code="request_state")
        new = await conn.fetchrow(
            "UPDATE card_requests SET state = $2, decided_by = $3, decided_at = now(),"
            " note = $4 WHERE id = $1 RETURNING *", request_id,
            "approved" if approve else "rejected", user.username, note)
        assert new is not None  # noqa: S101
        return await _audited(audit, conn, _request_doc(new))


async def issue_request(pool: asyncpg.Pool, user: User, request_id: int, *,
                        audit: Audit | None = None, epoch: int | None = None
                        ) -> dict[str, Any]:
    """Issue an approved request from the warehouse: oldest batch first, in serial order (so
    whole contiguous ranges where the stock allows)."""
    async with pool.acquire() as conn, conn.transaction():
        await db.fence(conn, epoch)
        row = await conn.fetchrow("SELECT * FROM card_requests WHERE id = $1 FOR UPDATE",
                                  request_id)
        if row is None:
            raise NotFound(f"no request {request_id}", code="request_not_found")
        if row["state"] != "approved":
            raise Conflict(f"request {request_id} is {row['state']}, not approved",
                           code="request_state")
        picked = [r["serial"] for r in await conn.fetch(
            "SELECT serial FROM cards WHERE state = 'in_stock' AND location = $1"
            " AND face_value = $2 AND expiry >= current_date"
            " ORDER BY batch_id, serial LIMIT $3 FOR UPDATE",
            WAREHOUSE, row["face_value"], row["quantity"])]
        if len(picked) < row["quantity"]:
            raise Conflict(f"only {len(picked)} cards of {row['face_value']} fen in stock for "
                           f"a request of {row['quantity']}", code="insufficient_stock")
        await states.transition(conn, picked, CardState.ISSUED, event="issue",
                                actor=user.username,
                                reason=f"issued to hall {row['hall']}",
                                doc=Document(type="request", id=str(request_id)),
                                location=row["hall"], at_location=WAREHOUSE)
        ranges = _ranges(picked)
        issue_id: int = await conn.fetchval(
            "INSERT INTO card_issues (request_id, hall, face_value, quantity, ranges, issued_by)"
            " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id", request_id, row["hall"],
            row["face_value"], len(picked), ranges, user.username)
        await conn.execute("UPDATE card_requests SET state = 'issued' WHERE id = $1",
                           request_id)
        return await _audited(audit, conn, {
            "issue_id": issue_id, "request_id": request_id, "hall": row["hall"],
            "face_value": row["face_value"], "quantity": len(picked), "ranges": ranges})


# --- sales and unlocks ------------------------------------------------------------------------

async def sell(pool: asyncpg.Pool, user: User, serials: Sequence[str], *,
               audit: Audit | None = None, epoch: int | None = None) -> dict[str, Any]:
    if user.role is not Role.CASHIER or user.hall is None:
        raise Forbidden("only a cashier sells, at their hall", code="forbidden_role")
    async with pool.acquire() as conn:
        await states.expire_fenced(conn, serials, user.username, epoch)
        async with conn.transaction():
            await db.fence(conn, epoch)
            sale_id: int = await conn.fetchval(
                "INSERT INTO card_sales (hall, cashier, quantity, total_face, ranges)"
                " VALUES ($1, $2, $3, 0, '[]') RETURNING id", user.hall, user.username,
                len(serials))
            await states.transition(conn, serials, CardState.SOLD, event="sell",
                                    actor=user.username,
                                    reason=f"sold at hall {user.hall}",
                                    doc=Document(type="sale", id=str(sale_id)),
                                    at_location=user.hall)
            total: int = await conn.fetchval(
                "SELECT COALESCE(sum(face_value), 0) FROM cards WHERE serial = ANY($1::text[])",
                list(serials))
            ranges = _ranges(serials)
            await conn.execute("UPDATE card_sales SET total_face = $2, ranges = $3 WHERE id = $1",
                               sale_id, total, ranges)
            return await _audited(audit, conn, {
                "sale_id": sale_id, "hall": user.hall, "quantity": len(serials),
                "total_face_value": int(total), "ranges": ranges})


async def unlock(pool: asyncpg.Pool, user: User, serial: str, *,
                 audit: Audit | None = None, epoch: int | None = None) -> dict[str, Any]:
    if not valid_serial(serial):
        raise not_a_serial("the serial")
    async with pool.acquire() as conn:
        await states.expire_fenced(conn, [serial], user.username, epoch)
        async with conn.transaction():
            await db.fence(conn, epoch)
            await states.transition(conn, [serial], CardState.SOLD, event="unlock",
                                    actor=user.username,
                                    reason="unlocked", doc=Document(type="unlock", id=serial),
                                    reset_pin_count=True)
            return await _audited(audit, conn, {"serial": serial,
                                                "state": CardState.SOLD.value})


# --- reports ----------------------------------------------------------------------------------

async def card_history(pool: asyncpg.Pool, user: User, serial: str) -> dict[str, Any]:
    if not valid_serial(serial):
        raise not_a_serial("the serial")
    view = await states.card_status(pool, serial)
    if view is None:
        raise NotFound(f"no card {serial}", code="card_not_found")
    if user.role in HALL_ROLES and view.location != user.hall:
        raise Forbidden(f"card {serial} is not at hall {user.hall}", code="forbidden_hall")
    events = await pool.fetch(
        "SELECT from_state, to_state, actor, reason, doc_type, doc_id, at FROM card_events"
        " WHERE serial = $1 ORDER BY id", serial)
    return {"serial": view.serial, "batch_id": view.batch_id, "face_value": view.face_value,
            "state": view.state.value, "location": view.location,
            "expiry": view.expiry.isoformat(), "failed_pin_count": view.failed_pin_count,
            "history": [{"from": e["from_state"], "to": e["to_state"], "actor": e["actor"],
                         "reason": e["reason"],
                         "document": {"type": e["doc_type"], "id": e["doc_id"]},
                         "at": e["at"].isoformat()} for e in events]}


async def inventory(pool: asyncpg.Pool, user: User) -> dict[str, Any]:
    hall = user.hall if user.role in HALL_ROLES else None
    # a card past its expiry date is counted as expired before the sweep has marked it so,
    # as a card's own view shows it
    rows = await pool.fetch(
        f"SELECT {states.SHOWN_STATE} AS state, face_value, location, count(*) AS n"  # noqa: S608
        " FROM cards WHERE $1::text IS NULL OR location = $1"
        " GROUP BY 1, face_value, location ORDER BY 1, face_value, location",
        hall, UNREDEEMED_VALUES)
    items = [{"state": r["state"], "face_value": r["face_value"], "location": r["location"],
              "count": int(r["n"])} for r in rows]
    by_state: dict[str, int] = {}
    for i in items:
        by_state[str(i["state"])] = by_state.get(str(i["state"]), 0) + int(str(i["count"]))
    return {"items": items, "by_state": by_state, "total": sum(by_state.values())}


# The recharges of a business date: each belongs to the date of its payment (the business date
# in force when it was approved, which moves at the cut-over, not at midnight). The `at` range
# (the day before to the day after, local time) only lets the index narrow the search; a
# recharge recorded without a payment goes by its local date.
_RECHARGES_OF = """
SELECT r.serial, r.account_no, r.amount, r.at, r.channel, r.caller, r.txn_no, r.payment_id
  FROM card_recharges r LEFT JOIN payments p ON p.id = r.payment_id
 WHERE r.at >= ($1::date - 1)::timestamp AT TIME ZONE $2
   AND r.at < ($1::date + 2)::timestamp AT TIME ZONE $2
   AND coalesce(p.business_date, (r.at AT TIME ZONE $2)::date) = $1
 ORDER BY r.at, r.id"""


async def recharges(pool: asyncpg.Pool, day: str, tz: str = "UTC") -> dict[str, Any]:
    """The recharge ledger of business date `day` (YYYY-MM-DD)."""
    try:
        date = iso_date(day)
    except ValueError:
        raise InvalidInput("date must be YYYY-MM-DD", code="invalid_date") from None
    rows = await pool.fetch(_RECHARGES_OF, date, tz)
    lines = [{"serial": r["serial"], "account_no": r["account_no"], "amount": r["amount"],
              "at": r["at"].isoformat(), "channel": r["channel"], "caller": r["caller"],
              "transaction_no": r["txn_no"],
              "payment_id": str(r["payment_id"]) if r["payment_id"] else None} for r in rows]
    return {"date": date.isoformat(), "count": len(lines),
            "total": sum(int(str(x["amount"])) for x in lines), "recharges": lines}


async def hall_report(pool: asyncpg.Pool, user: User, hall: str | None) -> dict[str, Any]:
    """Issues and sales by hall (a hall role sees its own hall only: another hall asked for is
    refused, not silently swapped for its own)."""
    if user.role in HALL_ROLES:
        if hall is not None:
            user.require_hall(hall)
        hall = user.hall
    issues = await pool.fetch(
        "SELECT hall, face_value, count(*) AS docs, sum(quantity) AS cards FROM card_issues"
        " WHERE $1::text IS NULL OR hall = $1 GROUP BY hall, face_value ORDER BY 1, 2", hall)
    sales = await pool.fetch(
        "SELECT hall, count(*) AS docs, sum(quantity) AS cards, sum(total_face) AS total"
        " FROM card_sales WHERE $1::text IS NULL OR hall = $1 GROUP BY hall ORDER BY 1", hall)
    return {"issues": [{"hall": r["hall"], "face_value": r["face_value"], "issues": r["docs"],
                        "cards": int(r["cards"])} for r in issues],
            "sales": [{"hall": r["hall"], "sales": r["docs"], "cards": int(r["cards"]),
                       "total_face_value": int(r["total"])} for r in sales]}
