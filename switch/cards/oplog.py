"""The operation log: every administrative action, hash-chained.

entry hash = SHA-256(previous hash || canonical JSON of the entry), where the canonical JSON
is the entry's fields {seq, at, actor, action, objects, result} with sorted keys, no spaces,
`at` in UTC ISO 8601 with microseconds. The first entry's previous hash is 32 zero bytes.
One writer at a time: appending takes a transaction-level advisory lock. `card_oplog_head`
keeps the newest (seq, hash), so that deleting the last entries is detected too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from switch.cards.states import Conn
from switch.loop import in_slices

OPLOG_LOCK = 0x63617264  # "card"
GENESIS = bytes(32)


def canonical(seq: int, at: dt.datetime, actor: str, action: str, objects: Any,
              result: Any) -> bytes:
    doc = {"seq": seq, "at": at.astimezone(dt.UTC).isoformat(timespec="microseconds"),
           "actor": actor, "action": action, "objects": objects, "result": result}
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def entry_hash(prev: bytes, seq: int, at: dt.datetime, actor: str, action: str, objects: Any,
               result: Any) -> bytes:
    return hashlib.sha256(prev + canonical(seq, at, actor, action, objects, result)).digest()


def _as_stored(value: Any) -> Any:
    """`value` as JSON that jsonb gives back unchanged, so that the hash computed now is the
    one verification computes from the stored entry. jsonb keeps a number as a decimal: one
    written plainly comes back the same (1.25, 5.0), but an exponent is expanded (1e+16
    comes back 10000000000000000) and -0.0 comes back 0.0; such floats (which only a refused
    input carries) are logged as text. jsonb cannot hold a NUL character at all (a refused
    path such as /batches/%00/stock-in carries one): it is logged as the six characters
    `\\u0000`."""
    def plain(v: Any) -> Any:
        if isinstance(v, float):
            text = orjson.dumps(v)
            return v if b"e" not in text and text != b"-0.0" else text.decode()
        if isinstance(v, str) and "\x00" in v:  # jsonb holds no NUL: logged as the text \u0000
            return v.replace("\x00", "\\u0000")
        if isinstance(v, dict):
            return {plain(k): plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (a refused input)
        text = orjson.dumps(_shallow(value))
    return plain(orjson.loads(text))


_DEPTH = 32


def _shallow(v: Any, depth: int = 0) -> Any:
    """`v` with what lies deeper than `_DEPTH` levels replaced by a note: the log keeps that
    a value was refused, not all of it."""
    if isinstance(v, dict | list) and depth >= _DEPTH:
        return "(nested too deeply to log)"
    if isinstance(v, dict):
        return {k: _shallow(x, depth + 1) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_shallow(x, depth + 1) for x in v]
    return v


async def append(conn: Conn, *, actor: str, action: str,
                 objects: Mapping[str, Any], result: Mapping[str, Any]) -> int:
    """Append one entry (in its own transaction, or the caller's); returns its seq.

    `conn` must come from `switch.db.create_pool` (its jsonb codec encodes the objects).
    """
    obj = _as_stored(objects)  # what jsonb will give back on verify
    res = _as_stored(result)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", OPLOG_LOCK)
        head = await conn.fetchrow("SELECT seq, hash FROM card_oplog_head WHERE id = 1")
        seq = 1 if head is None else int(head["seq"]) + 1
        prev = GENESIS if head is None else bytes(head["hash"])
        at = dt.datetime.now(dt.UTC)
        h = entry_hash(prev, seq, at, actor, action, obj, res)
        await conn.execute(
            "INSERT INTO card_oplog (seq, at, actor, action, objects, result, prev_hash, hash)"
            " VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7, $8)",
            seq, at, actor, action, obj, res, prev, h)
        await conn.execute(
            "INSERT INTO card_oplog_head (id, seq, hash) VALUES (1, $1, $2)"
            " ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash",
            seq, h)
    return seq


@dataclass(frozen=True, slots=True, kw_only=True)
class Verification:
    ok: bool
    entries: int
    first_broken: int | None = None
    problem: str | None = None
    head_hash: str | None = None  # the newest entry's hash (hex), when the log verifies

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "entries": self.entries, "first_broken": self.first_broken,
                "problem": self.problem, "head_hash": self.head_hash}


async def verify(pool: asyncpg.Pool | Conn, *, page: int = 5000) -> Verification:
    """Walk the chain from the start; name the first entry that is edited or missing.

    The pages and the head record are read in one snapshot (a read-only REPEATABLE READ
    transaction, or the caller's): read apart, an entry appended between the last page and
    the head looked like entries deleted at the end of the log."""
    if isinstance(pool, asyncpg.Pool):
        async with pool.acquire() as con:
            return await verify(con, page=page)
    if pool.is_in_transaction():
        return await _walk(pool, page)
    async with pool.transaction(isolation="repeatable_read", readonly=True):
        return await _walk(pool, page)


async def _walk(pool: Conn, page: int) -> Verification:
    prev = GENESIS
    expected_seq = 1
    count = 0
    after = 0
    while True:
        rows = await pool.fetch(
            "SELECT seq, at, actor, action, objects, result, prev_hash, hash FROM card_oplog"
            " WHERE seq > $1 ORDER BY seq LIMIT $2", after, page)
        if not rows:
            break
        async for r in in_slices(rows):  # the node answers payments meanwhile
            seq = int(r["seq"])
            if seq != expected_seq:
                return Verification(ok=False, entries=count, first_broken=expected_seq,
                                    problem=f"entry {expected_seq} is missing (deleted); the "
                                    f"next entry present is {seq}")
            if bytes(r["prev_hash"]) != prev:
                return Verification(ok=False, entries=count, first_broken=seq,
                                    problem=f"entry {seq} does not link to entry {seq - 1}")
            objects, result = _json(r["objects"]), _json(r["result"])
            h = entry_hash(prev, seq, r["at"], r["actor"], r["action"], objects, result)
            if h != bytes(r["hash"]):
                return Verification(ok=False, entries=count, first_broken=seq,
                                    problem=f"entry {seq} was altered (its hash does not match "
                                    "its content)")
            prev = h
            expected_seq += 1
            count += 1
            after = seq
    head = await pool.fetchrow("SELECT seq, hash FROM card_oplog_head WHERE id = 1")
    if head is not None and (int(head["seq"]) != count or bytes(head["hash"]) != prev):
        missing = count + 1
        return Verification(ok=False, entries=count, first_broken=missing,
                            problem=f"entries from {missing} to {int(head['seq'])} are missing "
                            "(deleted at the end of the log)")
    if head is None and count:
        return Verification(ok=False, entries=count, first_broken=count,
                            problem="the log's head record is missing")
    if head is None and await pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM card_batches) OR EXISTS (SELECT 1 FROM card_events)"):
        # every batch is ordered through the log, so a log without a first entry beside
        # batches or card moves lost its entries and its head together
        return Verification(ok=False, entries=0, first_broken=1,
                            problem="the log is empty, but batches or card moves exist: its "
                            "entries and head were deleted")
    return Verification(ok=True, entries=count, head_hash=prev.hex() if count else None)


def _json(v: Any) -> Any:
    return orjson.loads(v) if isinstance(v, str | bytes) else v


async def entries(pool: asyncpg.Pool | Conn, *, after: int = 0,
                  limit: int = 100) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT seq, at, actor, action, objects, result, prev_hash, hash FROM card_oplog"
        " WHERE seq > $1 ORDER BY seq LIMIT $2", after, limit)
    return [{"seq": r["seq"], "at": r["at"].isoformat(), "actor": r["actor"],
             "action": r["action"], "objects": _json(r["objects"]),
             "result": _json(r["result"]), "prev_hash": bytes(r["prev_hash"]).hex(),
             "hash": bytes(r["hash"]).hex()} for r in rows]


async def main_verify(pool: asyncpg.Pool) -> int:
    """For `gridpay cards verify-log`: prints the result; exit status 0 if intact, 1 if not."""
    v = await verify(pool)
    print(orjson.dumps(v.as_dict()).decode())
    return 0 if v.ok else 1
