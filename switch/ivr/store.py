"""Call state in Redis, shared by both nodes of the pair, and short Redis locks.

A call is one Redis hash `ivr:call:<call_id>` with two fields: `v`, a version that grows by one
per saved turn, and `doc`, JSON (the dialog's `Call`, the last turn given, and what identifies
the last input so that a retry is answered, not counted again). Every save is a compare-and-set
on `v` in Lua and renews the expiry (`call_idle_s`), so that an idle call is forgotten and two
writers can never overwrite each other's turn.

Turns of one call are serialized with a lock (`SET NX PX`, released by a compare-and-delete
script, as redis-py's lock does). The lock only keeps turns in order; the version check makes a
lapsed lock harmless; limits and redemption are decided in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from switch.ivr.dialog import Call
from switch.redis_pipe import RedisPipe

__all__ = ["CallStore", "HeldCall", "LockNotAcquired", "RedisLock", "StoreConflict",
           "StoredCall"]

T = TypeVar("T")

_TOKENS: list[str] = []
os.register_at_fork(after_in_child=_TOKENS.clear)  # a child never repeats its parent's tokens


def _token() -> str:
    """A lock owner's token: 128 random bits, drawn from one read of the OS's random source
    per 256 tokens (`secrets.token_hex` makes a getrandom() system call for each)."""
    if not _TOKENS:
        raw = os.urandom(16 * 256).hex()
        _TOKENS.extend(raw[i:i + 32] for i in range(0, len(raw), 32))
    return _TOKENS.pop()


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: the call, its turn lock; ARGV: version read, new version, doc, idle s, lock token
# ('' to keep the lock), then any number of field, value pairs saved beside the doc (the
# answers to earlier inputs, see `CallStore.save`). The compare-and-set save and the lock's
# release in one round trip.
_SAVE = """
local saved = 0
local v = redis.call('HGET', KEYS[1], 'v')
if (v or '0') == ARGV[1] then
    redis.call('HSET', KEYS[1], 'v', ARGV[2], 'doc', ARGV[3])
    for i = 6, #ARGV, 2 do
        redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
    saved = 1
end
if ARGV[5] ~= '' and redis.call('GET', KEYS[2]) == ARGV[5] then
    redis.call('DEL', KEYS[2])
end
return saved
"""

# KEYS: the turn lock, the call; ARGV: token, lock ttl ms, n, then n stale tokens (of turns
# of this node that failed on Redis: their lock, if it holds one of them, is let go first),
# then any fields to read beside the call. Takes the lock and, only then, reads the call:
# {1, version, doc, fields...} (nil for what is not there), or {0} when the lock is held.
_HOLD = """
local n = tonumber(ARGV[3])
if n > 0 then
    local holder = redis.call('GET', KEYS[1])
    for i = 4, 3 + n do
        if holder == ARGV[i] then
            redis.call('DEL', KEYS[1])
            break
        end
    end
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    local got = redis.call('HMGET', KEYS[2], 'v', 'doc', unpack(ARGV, 4 + n))
    table.insert(got, 1, 1)
    return got
end
return {0}
"""


#: The IVR's short locks in Redis: a call's turn, a card's redemption.
CALL_LOCK_PREFIX = "ivr:call-lock:"
CARD_LOCK_PREFIX = "ivr:card-lock:"


class LockNotAcquired(Exception):
    """Someone else holds the lock and did not release it in time."""


class StoreConflict(Exception):
    """The call was saved by someone else since it was read (its version moved)."""


async def _take(attempt: Callable[[], Awaitable[T | None]], key: str, wait_s: float,
                poll_s: float) -> T:
    """Run `attempt` until it takes the lock `key` (returns something), backing off from
    `poll_s` to 0.1 s; `LockNotAcquired` once `wait_s` has passed."""
    deadline = time.monotonic() + wait_s
    while (got := await attempt()) is None:
        if time.monotonic() >= deadline:
            raise LockNotAcquired(key)
        await asyncio.sleep(poll_s)
        poll_s = min(poll_s * 2, 0.1)
    return got


class RedisLock:
    """One lock per critical section: `SET key token NX PX ttl`, released only by its owner."""

    def __init__(self, redis: RedisPipe, key: str, *, ttl_ms: int) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self._release = redis.register_script(_RELEASE)

    async def acquire(self, wait_s: float, poll_s: float = 0.01) -> str:
        """Take the lock within `wait_s` (else `LockNotAcquired`); returns the owner's token."""
        token = _token()

        async def attempt() -> str | None:
            taken = await self.redis.set(self.key, token, nx=True, px=self.ttl_ms)
            return token if taken else None

        return await _take(attempt, self.key, wait_s, poll_s)

    async def release(self, token: str) -> bool:
        """Release the lock if this token still owns it (it expires by itself otherwise);
        whether Redis could be asked."""
        try:
            await self._release(keys=[self.key], args=[token])
        except Exception:
            return False
        return True

    @contextlib.asynccontextmanager
    async def hold(self, wait_s: float) -> AsyncIterator[None]:
        token = await self.acquire(wait_s)
        try:
            yield
        finally:
            await self.release(token)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredCall:
    """A call as stored: its state, the last turn given, and what identifies the last input."""

    call: Call
    turn: dict[str, Any]
    version: int = 0
    start_hash: str = ""
    input_key: str | None = None
    input_hash: str | None = None
    input_step: str | None = None  # the step the last input was answered at (for its replay)
    hung_up: bool = False

    def doc(self) -> bytes:
        # orjson writes the Call dataclass itself (what `Call.as_json` gives, without
        # dataclasses.asdict's deep copy)
        return orjson.dumps({"call": self.call, "turn": self.turn,
                             "start_hash": self.start_hash, "input_key": self.input_key,
                             "input_hash": self.input_hash, "input_step": self.input_step,
                             "hung_up": self.hung_up})

    @classmethod
    def parse(cls, version: int, raw: bytes) -> StoredCall:
        d = orjson.loads(raw)
        return cls(call=Call.from_json(d["call"]), turn=d["turn"], version=version,
                   start_hash=d["start_hash"], input_key=d["input_key"],
                   input_hash=d["input_hash"], input_step=d.get("input_step"),
                   hung_up=d["hung_up"])


def _stored(version: bytes | None, doc: bytes | None) -> StoredCall | None:
    return None if version is None or doc is None else StoredCall.parse(int(version), doc)


@dataclass(slots=True)
class HeldCall:
    """A call whose turn lock this node holds, with the call as it was read under the lock."""

    call_id: str
    token: str
    stored: StoredCall | None
    fields: tuple[bytes | None, ...] = ()  # the fields asked for beside the call, in order
    released: bool = False


#: calls whose failed turns' tokens a store keeps at most (the oldest go first)
STALE_CALLS_KEPT = 10_000


class CallStore:
    def __init__(self, redis: RedisPipe, *, idle_s: int, lock_ttl_ms: int = 15000) -> None:
        self.redis = redis
        self.idle_s = idle_s
        self.lock_ttl_ms = lock_ttl_ms
        self._save = redis.register_script(_SAVE)
        self._hold = redis.register_script(_HOLD)
        # call id -> tokens of its turns that failed on Redis here, each with when its lock
        # would expire: a stalled Redis may have run such a turn's hold after it had given up
        # (or never run its release), leaving the call locked under a token no turn knows,
        # and the caller's retries told "turn in progress" until the lock expired. The next
        # hold of the call lets go of a lock held under one of them.
        self._stale: dict[str, list[tuple[str, float]]] = {}

    def _failed(self, call_id: str, token: str) -> None:
        tokens = self._stale.pop(call_id, [])  # re-inserted: the newest at the end
        tokens.append((token, time.monotonic() + self.lock_ttl_ms / 1000))
        self._stale[call_id] = tokens
        while len(self._stale) > STALE_CALLS_KEPT:
            del self._stale[next(iter(self._stale))]

    def _stale_tokens(self, call_id: str) -> list[str]:
        tokens = self._stale.get(call_id)
        if not tokens:
            return []
        now = time.monotonic()
        live = [(t, until) for t, until in tokens if until > now]
        if live:
            self._stale[call_id] = live
        else:
            del self._stale[call_id]
        return [t for t, _ in live]

    @staticmethod
    def key(call_id: str) -> str:
        return f"ivr:call:{call_id}"

    @staticmethod
    def lock_key(call_id: str) -> str:
        return f"{CALL_LOCK_PREFIX}{call_id}"

    async def hold(self, call_id: str, wait_s: float, poll_s: float = 0.01, *,
                   fields: tuple[str, ...] = ()) -> HeldCall:
        """Take the call's turn lock within `wait_s` (else `LockNotAcquired`) and read the call,
        and any `fields` saved beside it, in one round trip when the lock is free."""
        token = _token()
        keys = [self.lock_key(call_id), self.key(call_id)]

        async def attempt() -> HeldCall | None:
            stale = self._stale_tokens(call_id)
            try:
                r = await self._hold(keys=keys, args=[token, self.lock_ttl_ms, len(stale),
                                                      *stale, *fields])
            except Exception:
                self._failed(call_id, token)  # Redis may yet run it
                raise
            if r[0] != 1:
                return None
            self._stale.pop(call_id, None)
            return HeldCall(call_id, token, _stored(r[1], r[2]), tuple(r[3:]))

        return await _take(attempt, keys[0], wait_s, poll_s)

    async def release(self, held: HeldCall) -> None:
        """Give the turn lock back (it expires by itself if this fails)."""
        if not held.released:
            lock = RedisLock(self.redis, self.lock_key(held.call_id), ttl_ms=self.lock_ttl_ms)
            if not await lock.release(held.token):
                self._failed(held.call_id, held.token)
            held.released = True

    async def load(self, call_id: str) -> StoredCall | None:
        """The call as stored, without taking its lock."""
        version, doc = await self.redis.hmget(self.key(call_id), ["v", "doc"])
        return _stored(version, doc)

    async def save(self, stored: StoredCall, *, release: HeldCall | None = None,
                   fields: tuple[tuple[str, bytes], ...] = ()) -> StoredCall:
        """Write `stored` over the version it was read at (0: a new call), and `fields` (name,
        value) beside it; returns it with its new version, or raises `StoreConflict`. With
        `release`, gives that turn lock back in the same round trip (saved or not)."""
        new = stored.version + 1
        call_id = stored.call.call_id
        args: list[str | int | bytes] = [str(stored.version), str(new), stored.doc(),
                                         self.idle_s,
                                         release.token if release is not None else ""]
        for name, value in fields:
            args += (name, value)
        ok = await self._save(keys=[self.key(call_id), self.lock_key(call_id)], args=args)
        if release is not None:
            release.released = True
        if not ok:
            raise StoreConflict(stored.call.call_id)
        return dataclasses.replace(stored, version=new)
