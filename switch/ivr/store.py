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
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from switch.ivr.dialog import Call
from switch.redis_pipe import RedisPipe

__all__ = ["CallStore", "LockNotAcquired", "RedisLock", "StoreConflict", "StoredCall"]

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

_SAVE = """
local v = redis.call('HGET', KEYS[1], 'v')
if (v or '0') ~= ARGV[1] then
    return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'doc', ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""


class LockNotAcquired(Exception):
    """Someone else holds the lock and did not release it in time."""


class StoreConflict(Exception):
    """The call was saved by someone else since it was read (its version moved)."""


class RedisLock:
    """One lock per critical section: `SET key token NX PX ttl`, released only by its owner."""

    def __init__(self, redis: RedisPipe, key: str, *, ttl_ms: int) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self._release = redis.register_script(_RELEASE)

    async def acquire(self, wait_s: float, poll_s: float = 0.01) -> str:
        """Take the lock within `wait_s` (else `LockNotAcquired`); returns the owner's token."""
        token = secrets.token_hex(16)
        deadline = time.monotonic() + wait_s
        while not await self.redis.set(self.key, token, nx=True, px=self.ttl_ms):
            if time.monotonic() >= deadline:
                raise LockNotAcquired(self.key)
            await asyncio.sleep(poll_s)
            poll_s = min(poll_s * 2, 0.1)
        return token

    async def release(self, token: str) -> None:
        """Release the lock if this token still owns it (it expires by itself otherwise)."""
        with contextlib.suppress(Exception):
            await self._release(keys=[self.key], args=[token])

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
    hung_up: bool = False

    def doc(self) -> bytes:
        return orjson.dumps({"call": self.call.as_json(), "turn": self.turn,
                             "start_hash": self.start_hash, "input_key": self.input_key,
                             "input_hash": self.input_hash, "hung_up": self.hung_up})

    @classmethod
    def parse(cls, version: int, raw: bytes) -> StoredCall:
        d = orjson.loads(raw)
        return cls(call=Call.from_json(d["call"]), turn=d["turn"], version=version,
                   start_hash=d["start_hash"], input_key=d["input_key"],
                   input_hash=d["input_hash"], hung_up=d["hung_up"])


class CallStore:
    def __init__(self, redis: RedisPipe, *, idle_s: int, lock_ttl_ms: int = 15000) -> None:
        self.redis = redis
        self.idle_s = idle_s
        self.lock_ttl_ms = lock_ttl_ms
        self._save = redis.register_script(_SAVE)

    @staticmethod
    def key(call_id: str) -> str:
        return f"ivr:call:{call_id}"

    def lock(self, call_id: str) -> RedisLock:
        return RedisLock(self.redis, f"ivr:call-lock:{call_id}", ttl_ms=self.lock_ttl_ms)

    async def load(self, call_id: str) -> StoredCall | None:
        raw = await self.redis.hmget(self.key(call_id), ["v", "doc"])
        version, doc = raw[0], raw[1]
        if version is None or doc is None:
            return None
        return StoredCall.parse(int(version), doc.encode() if isinstance(doc, str) else doc)

    async def save(self, stored: StoredCall) -> StoredCall:
        """Write `stored` over the version it was read at (0: a new call); returns it with its
        new version, or raises `StoreConflict`."""
        new = stored.version + 1
        ok = await self._save(keys=[self.key(stored.call.call_id)],
                              args=[str(stored.version), str(new), stored.doc(), self.idle_s])
        if not ok:
            raise StoreConflict(stored.call.call_id)
        return dataclasses.replace(stored, version=new)
