"""The card state machine: ONE transition table, and the database operations that apply it.

Every move of a card goes through `transition` (a list of serials) or `transition_batch` (the
cards of one batch in one state): a single conditional UPDATE whose WHERE clause is the table
(`state = ANY(allowed sources)`, plus the expiry and location conditions), with one
`card_events` row per card in the same statement. If any card named cannot move, the savepoint
is rolled back and `IllegalTransition` names each refused serial with its state: all or nothing.

The IVR uses `card_status`, `card_view` and `record_wrong_pin`, and records a recharge in one
statement with its payment (`RECHARGE_GATE`, `RECHARGE_MOVE`, `RECHARGE_RESULT`), asking
`redemption_refused` why when it cannot. `redeem_card` is the same move for a caller that
already holds a transaction (it also marks a card found past expiry as expired); its SQL and
`RECHARGE_MOVE` must change together.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from switch import db
from switch.cards.errors import IllegalTransition, InvalidInput

#: A connection, or one borrowed from a pool.
Conn = asyncpg.Connection | PoolConnectionProxy


class CardState(StrEnum):
    ORDERED = "ordered"
    PRODUCED = "produced"
    IN_STOCK = "in_stock"
    ISSUED = "issued"
    SOLD = "sold"
    REDEEMED = "redeemed"
    VOIDED = "voided"
    LOCKED = "locked"
    EXPIRED = "expired"


S = CardState


@dataclass(frozen=True, slots=True)
class Edge:
    """One permitted move: `source` → `target` by `event`."""

    source: CardState
    target: CardState
    event: str


#: The whole state machine. Nothing else decides whether a card may move.
TRANSITIONS: tuple[Edge, ...] = (
    Edge(S.ORDERED, S.PRODUCED, "reconcile"),
    Edge(S.PRODUCED, S.IN_STOCK, "stock_in"),
    Edge(S.IN_STOCK, S.ISSUED, "issue"),
    Edge(S.ISSUED, S.SOLD, "sell"),
    Edge(S.SOLD, S.REDEEMED, "redeem"),
    Edge(S.ORDERED, S.VOIDED, "void"),
    Edge(S.PRODUCED, S.VOIDED, "void"),
    Edge(S.IN_STOCK, S.VOIDED, "void"),
    Edge(S.ISSUED, S.VOIDED, "void"),
    Edge(S.SOLD, S.LOCKED, "lock"),
    Edge(S.LOCKED, S.SOLD, "unlock"),
    *(Edge(s, S.EXPIRED, "expire")
      for s in (S.ORDERED, S.PRODUCED, S.IN_STOCK, S.ISSUED, S.SOLD, S.LOCKED)),
)

#: Targets that a card past its expiry date can still reach (everything else needs it valid).
EXPIRY_EXEMPT: frozenset[CardState] = frozenset({S.VOIDED, S.EXPIRED, S.LOCKED})

#: States in which a card is not yet redeemed and not dead: these expire.
UNREDEEMED: frozenset[CardState] = frozenset(
    e.source for e in TRANSITIONS if e.target is S.EXPIRED)


def _sources() -> Mapping[CardState, frozenset[CardState]]:
    out: dict[CardState, set[CardState]] = {s: set() for s in CardState}
    for e in TRANSITIONS:
        out[e.target].add(e.source)
    return MappingProxyType({k: frozenset(v) for k, v in out.items()})


#: target → the states a card may be in to move there.
ALLOWED_FROM: Mapping[CardState, frozenset[CardState]] = _sources()


def can_move(source: CardState, target: CardState) -> bool:
    return source in ALLOWED_FROM[target]


def sources_of(target: CardState, event: str) -> frozenset[CardState]:
    """The states from which `event` moves a card to `target` (a sale takes an issued card, an
    unlock a locked one, though both end in `sold`)."""
    found = frozenset(e.source for e in TRANSITIONS if e.target is target and e.event == event)
    if not found:
        raise ValueError(f"no card moves to {target.value} by {event!r}")
    return found


def diagram() -> str:
    """The state machine as a Mermaid state diagram (the docs' figure is generated from it)."""
    lines = ["stateDiagram-v2", f"    [*] --> {S.ORDERED.value}"]
    for e in TRANSITIONS:
        lines.append(f"    {e.source.value} --> {e.target.value}: {e.event}")
    lines.append(f"    {S.REDEEMED.value} --> [*]")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class Document:
    """What a move belongs to: a batch, request, sale, stocktake, void, call..."""

    type: str
    id: str

    def __post_init__(self) -> None:
        if not self.type or not self.id:
            raise InvalidInput("a card event needs a document type and id")


# --- moving cards -----------------------------------------------------------------------------

_MOVE = """
WITH old AS (
    SELECT serial, state FROM cards WHERE serial = ANY($1::text[]) FOR UPDATE
), moved AS (
    UPDATE cards c
       SET state = $2, location = COALESCE($5::text, c.location), updated_at = now(),
           failed_pin_count = CASE WHEN $9::bool THEN 0 ELSE c.failed_pin_count END
      FROM old
     WHERE c.serial = old.serial AND old.state = ANY($3::text[])
       AND ($4::bool OR c.expiry >= current_date)
       AND ($6::text IS NULL OR c.location = $6::text)
    RETURNING c.serial, old.state AS from_state
), ev AS (
    INSERT INTO card_events (serial, from_state, to_state, actor, reason, doc_type, doc_id)
    SELECT serial, from_state, $2, $7, $8, $10, $11 FROM moved
    RETURNING 1
)
SELECT count(*) FROM ev
"""


async def transition(conn: Conn, serials: Sequence[str], to: CardState, *, event: str,
                     actor: str, reason: str, doc: Document, location: str | None = None,
                     at_location: str | None = None, reset_pin_count: bool = False) -> int:
    """Move every card in `serials` to `to` by `event`, or none of them (raises
    `IllegalTransition`): only from the states that this event moves to `to`.

    `location` sets the cards' new location; `at_location` additionally requires every card to
    be there now (a cashier sells only the cards of their own hall). Returns the count moved.
    """
    sources = sources_of(to, event)
    wanted = list(dict.fromkeys(serials))
    if not wanted:
        raise InvalidInput("no cards named", code="no_cards")
    allowed = sorted(s.value for s in sources)
    exempt = to in EXPIRY_EXEMPT
    try:
        async with conn.transaction():
            moved: int = await conn.fetchval(
                _MOVE, wanted, to.value, allowed, exempt, location, at_location, actor,
                reason, reset_pin_count, doc.type, doc.id)
            if moved != len(wanted):
                raise _Rollback()
    except _Rollback:
        raise IllegalTransition(to.value, await _refusals(conn, wanted, to, sources,
                                                          at_location)) from None
    return moved


class _Rollback(Exception):
    pass


async def _refusals(conn: Conn, serials: list[str], to: CardState,
                    allowed: frozenset[CardState], at_location: str | None) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT serial, state, location, expiry < current_date AS past FROM cards"
        " WHERE serial = ANY($1::text[])", serials)
    found = {r["serial"]: r for r in rows}
    out: dict[str, str] = {}
    for s in serials:
        r = found.get(s)
        if r is None:
            out[s] = "unknown"
        elif CardState(r["state"]) not in allowed:
            out[s] = r["state"]
        elif r["past"] and to not in EXPIRY_EXEMPT:
            out[s] = f"{r['state']}, past expiry"
        elif at_location is not None and r["location"] != at_location:
            out[s] = f"{r['state']} at {r['location']}"
    return out


_MOVE_BATCH = """
WITH moved AS (
    UPDATE cards SET state = $3, location = COALESCE($4::text, location), updated_at = now()
     WHERE batch_id = $1 AND state = $2 AND serial BETWEEN $5 AND $6
       AND NOT (serial = ANY($7::text[]))
       AND ($8::bool OR expiry >= current_date)
       AND (NOT $11::bool OR expiry < current_date)
    RETURNING serial
), ev AS (
    INSERT INTO card_events (serial, from_state, to_state, actor, reason, doc_type, doc_id)
    SELECT serial, $2, $3, $9, $10, 'batch', $1::text FROM moved
    RETURNING 1
)
SELECT count(*) FROM ev
"""


async def transition_batch(conn: Conn, batch_id: int, source: CardState,
                           to: CardState, *, actor: str, reason: str,
                           location: str | None = None, exclude: Sequence[str] = (),
                           first: str = "0" * 16, last: str = "9" * 16) -> int:
    """Move the cards of a batch that are in `source` (within [first, last], minus `exclude`).
    Only cards still valid move, except to an exempt target; and only cards past their
    expiry date are expired.

    Used for whole-batch steps (reconciliation, stock-in), in slices for progress.
    """
    if not can_move(source, to):
        raise IllegalTransition(to.value, {f"batch {batch_id}": source.value})
    n: int = await conn.fetchval(_MOVE_BATCH, batch_id, source.value, to.value, location,
                                 first, last, list(exclude), to in EXPIRY_EXEMPT, actor, reason,
                                 to is CardState.EXPIRED)
    return n


# --- expiry -----------------------------------------------------------------------------------

_EXPIRE = """
WITH old AS (
    SELECT serial, state FROM cards
     WHERE serial = ANY($1::text[]) AND state = ANY($2::text[]) AND expiry < current_date
     FOR UPDATE
), moved AS (
    UPDATE cards c SET state = 'expired', updated_at = now() FROM old
     WHERE c.serial = old.serial RETURNING c.serial, old.state AS from_state
), ev AS (
    INSERT INTO card_events (serial, from_state, to_state, actor, reason, doc_type, doc_id)
    SELECT serial, from_state, 'expired', $3, 'past expiry date', 'expiry', current_date::text
      FROM moved
    RETURNING 1
)
SELECT count(*) FROM ev
"""

UNREDEEMED_VALUES = sorted(s.value for s in UNREDEEMED)  # as query parameters


#: A card's state as reports show it (SQL; $2 binds UNREDEEMED_VALUES): past its expiry date
#: and not redeemed, it is expired before the sweep has marked it so, as its own view says.
SHOWN_STATE = ("CASE WHEN state = ANY($2::text[]) AND expiry < current_date THEN 'expired'"
               " ELSE state END")


async def expire_touched(conn: Conn, serials: Sequence[str],
                         actor: str = "system") -> int:
    """Mark as expired those of `serials` that are past expiry and not redeemed (lazy)."""
    n: int = await conn.fetchval(_EXPIRE, list(serials), UNREDEEMED_VALUES, actor)
    return n


async def expire_fenced(conn: Conn, serials: Sequence[str], actor: str,
                        epoch: int | None) -> int:
    """`expire_touched` in a transaction of its own, fenced by `epoch` (the active node's
    write only; None: unfenced, as for a one-shot command)."""
    async with conn.transaction():
        await db.fence(conn, epoch)
        return await expire_touched(conn, serials, actor)


async def sweep_expired(pool: asyncpg.Pool, *, actor: str = "sweep", chunk: int = 10000,
                        max_rounds: int = 1000) -> int:
    """Expire every unredeemed card past its expiry date, `chunk` cards per transaction."""
    total = 0
    for _ in range(max_rounds):
        async with pool.acquire() as conn, conn.transaction():
            serials = [r["serial"] for r in await conn.fetch(
                "SELECT serial FROM cards WHERE state = ANY($1::text[])"
                " AND expiry < current_date LIMIT $2", UNREDEEMED_VALUES, chunk)]
            if not serials:
                break
            total += await expire_touched(conn, serials, actor)
    return total


# --- for the IVR ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class CardView:
    """A card as the IVR needs it. `tag` (the HSM's keyed tag) is never shown in a repr."""

    serial: str
    batch_id: int
    face_value: int
    state: CardState
    location: str
    expiry: dt.date
    failed_pin_count: int
    tag: bytes = field(repr=False)

    @property
    def redeemable(self) -> bool:
        return self.state is CardState.SOLD


#: what `card_view` reads from a row of ``cards``
CARD_COLUMNS = ("serial, batch_id, face_value, state, location, expiry, failed_pin_count, tag,"
                " expiry < current_date AS past")


#: one card's row, as `card_view` reads it ($1: the serial)
CARD_BY_SERIAL = f"SELECT {CARD_COLUMNS} FROM cards WHERE serial = $1"  # noqa: S608


async def card_status(pool: asyncpg.Pool | Conn, serial: str) -> CardView | None:
    """The card, or None if unknown. A card past expiry and unredeemed shows as `expired`."""
    row = await pool.fetchrow(CARD_BY_SERIAL, serial)
    return None if row is None else card_view(row)


def card_view(row: asyncpg.Record) -> CardView:
    """The view of a row holding `CARD_COLUMNS`."""
    state = CardState(row["state"])
    if row["past"] and state in UNREDEEMED:
        state = CardState.EXPIRED
    return CardView(serial=row["serial"], batch_id=row["batch_id"], face_value=row["face_value"],
                    state=state, location=row["location"], expiry=row["expiry"],
                    failed_pin_count=row["failed_pin_count"], tag=bytes(row["tag"]))


_WRONG_PIN = """
WITH old AS (
    SELECT serial, state, failed_pin_count FROM cards WHERE serial = $1 FOR UPDATE
), upd AS (
    UPDATE cards c
       SET failed_pin_count = c.failed_pin_count + 1,
           state = CASE WHEN c.failed_pin_count + 1 >= $2 THEN 'locked' ELSE c.state END,
           updated_at = now()
      FROM old
     WHERE c.serial = old.serial AND old.state = 'sold'
    RETURNING c.serial, old.state AS from_state, c.state AS to_state, c.failed_pin_count
), ev AS (
    INSERT INTO card_events (serial, from_state, to_state, actor, reason, doc_type, doc_id)
    SELECT serial, from_state, to_state, $3,
           'wrong PIN (' || failed_pin_count || ' of ' || $2 || ')', 'call', $4 FROM upd
)
SELECT (SELECT failed_pin_count FROM upd) AS n, (SELECT to_state FROM upd) AS st,
       (SELECT failed_pin_count FROM old) AS old_n, (SELECT state FROM old) AS old_st
"""


async def record_wrong_pin(conn: Conn, serial: str, max_tries: int, *,
                           actor: str = "ivr", call_id: str = "-") -> tuple[int, bool]:
    """Count one wrong PIN for a sold card; at `max_tries` it becomes `locked`.

    Returns (failed count, locked). A card not in `sold` is not counted (its current count and
    whether it is locked are returned). One statement: safe under concurrent calls.
    """
    if max_tries < 1:
        raise InvalidInput("max_tries must be at least 1")
    row = await conn.fetchrow(_WRONG_PIN, serial, max_tries, actor, call_id)
    if row is None or row["old_st"] is None:
        return 0, False
    if row["n"] is None:
        return int(row["old_n"]), row["old_st"] == CardState.LOCKED.value
    return int(row["n"]), row["st"] == CardState.LOCKED.value


@dataclass(frozen=True, slots=True, kw_only=True)
class Redemption:
    redeemed: bool
    face_value: int
    reason: str  # "ok", "unknown", "state:<state>", "expired", "face_value_mismatch"


# the same move as RECHARGE_MOVE below, with its values as parameters: change both together
_REDEEM = """
WITH r AS (
    UPDATE cards SET state = 'redeemed', updated_at = now()
     WHERE serial = $1 AND state = 'sold' AND expiry >= current_date
       AND ($3::bigint IS NULL OR face_value = $3::bigint)
    RETURNING serial, face_value
), ev AS (
    INSERT INTO card_events (serial, from_state, to_state, actor, reason, doc_type, doc_id)
    SELECT serial, 'sold', 'redeemed', $4, 'recharge of account ' || $2, 'recharge', $5 FROM r
), led AS (
    INSERT INTO card_recharges (serial, account_no, amount, channel, caller, txn_no,
                                payment_id, at)
    SELECT serial, $2, face_value, $6, $7, $5, $8, COALESCE($9::timestamptz, now()) FROM r
)
SELECT face_value FROM r
"""


async def redeem_card(conn: Conn, serial: str, account_no: str, *,
                      amount_expected: int | None = None, actor: str = "ivr",
                      payment_id: object = None, txn_no: str, caller: str | None = None,
                      channel: str = "ivr", at: dt.datetime | None = None) -> Redemption:
    """sold → redeemed plus its recharge-ledger line, in the caller's transaction.

    Returns whether it happened; when not, `reason` says why and nothing was written (except
    that a card found past its expiry is marked `expired`).
    """
    face = await conn.fetchval(_REDEEM, serial, account_no, amount_expected, actor, txn_no,
                               channel, caller, payment_id, at)
    if face is not None:
        return Redemption(redeemed=True, face_value=int(face), reason="ok")
    return await refused_and_marked(conn, serial, actor)


async def refused_and_marked(conn: Conn, serial: str, actor: str) -> Redemption:
    """Why `serial` could not be redeemed just now; a card found past its expiry is marked
    `expired` on the way (the lazy expiry every redemption does), in the caller's
    transaction."""
    refused = await redemption_refused(conn, serial)
    if refused.reason == "expired":
        await expire_touched(conn, [serial], actor)
    return refused


async def redemption_refused(conn: Conn | asyncpg.Pool, serial: str) -> Redemption:
    """Why `serial` could not be redeemed just now (reads only; an unredeemed card past its
    expiry answers "expired" without being marked)."""
    row = await conn.fetchrow(
        "SELECT state, face_value, expiry < current_date AS past FROM cards WHERE serial = $1",
        serial)
    if row is None:
        return Redemption(redeemed=False, face_value=0, reason="unknown")
    if row["past"] and CardState(row["state"]) in UNREDEEMED:
        return Redemption(redeemed=False, face_value=int(row["face_value"]), reason="expired")
    if row["state"] != CardState.SOLD.value:
        return Redemption(redeemed=False, face_value=int(row["face_value"]),
                          reason=f"state:{row['state']}")
    return Redemption(redeemed=False, face_value=int(row["face_value"]),
                      reason="face_value_mismatch")


# A card recharge recorded in one statement with its payment (`switch.payments.ledger.
# record_statement`, whose batch row is `t` and whose keys won are `k`): the gate lets the
# payment's key be taken only while card $3 is sold, unexpired and of face value $4 (as the
# statement's snapshot sees it); `card` then moves it with its event (actor $5) and its line in
# the recharge ledger. If the card changed meanwhile, the key is won but the card does not
# move, and `gridpay_recharged` aborts the statement: both happen, or neither.
RECHARGE_GATE = """gate AS MATERIALIZED (
  SELECT 1 FROM fence, cards
   WHERE serial = $3 AND state = 'sold' AND expiry >= current_date AND face_value = $4::bigint
)"""
RECHARGE_MOVE = """card AS (
  UPDATE cards c SET state = 'redeemed', updated_at = now()
    FROM k
   WHERE c.serial = $3 AND c.state = 'sold' AND c.expiry >= current_date
     AND c.face_value = $4::bigint
  RETURNING c.serial, c.face_value
), ev AS (
  INSERT INTO card_events (serial, from_state, to_state, actor, reason, doc_type, doc_id)
  SELECT card.serial, 'sold', 'redeemed', $5, 'recharge of account ' || t.acct, 'recharge',
         t.receipt
    FROM card, t
), led AS (
  INSERT INTO card_recharges (serial, account_no, amount, channel, caller, txn_no,
                              payment_id, at)
  SELECT card.serial, t.acct, card.face_value, t.channel, t.caller, t.receipt, t.p, t.at
    FROM card, t
)"""
RECHARGE_RESULT = ("SELECT gridpay_recharged((SELECT count(*) FROM k), (SELECT count(*) FROM card))"
                   " AS recorded")
