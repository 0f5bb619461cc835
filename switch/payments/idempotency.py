"""The Redis fast path for idempotency keys: one round trip claims a key or returns its answer.

Redis is only the fast path: PostgreSQL's `dedup_keys` primary key is the fence, so a flushed
or restarted Redis can cost a database round trip, never a duplicate payment.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from switch.redis_pipe import RedisPipe

# KEYS[1] = the key; ARGV[1] = request hash (hex); ARGV[2] = claim ttl ms
# returns {'claimed'} | {'inflight', hash} | {'done', hash, status, body}
_CLAIM = """
local v = redis.call('HGETALL', KEYS[1])
if #v == 0 then
  redis.call('HSET', KEYS[1], 'state', 'inflight', 'hash', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'claimed'}
end
local h = {}
for i = 1, #v, 2 do h[v[i]] = v[i + 1] end
if h['state'] == 'done' then
  return {'done', h['hash'], h['status'], h['body']}
end
return {'inflight', h['hash']}
"""


# KEYS[1] = the key; ARGV = hash, status, body, ttl s: the stored answer, in one command
_COMPLETE = """
redis.call('HSET', KEYS[1], 'state', 'done', 'hash', ARGV[1], 'status', ARGV[2], 'body', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


class ClaimState(enum.Enum):
    CLAIMED = "claimed"
    IN_FLIGHT = "inflight"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Claim:
    state: ClaimState
    request_hash: str = ""
    status: int = 0
    body: bytes = b""


class IdempotencyCache:
    def __init__(self, redis: RedisPipe, *, ttl_s: int, claim_ttl_ms: int = 30_000,
                 prefix: str = "gp:idem:") -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.claim_ttl_ms = claim_ttl_ms
        self.prefix = prefix
        self._claim = redis.register_script(_CLAIM)
        self._complete = redis.register_script(_COMPLETE)

    async def claim(self, key: str, request_hash: str) -> Claim:
        r = await self._claim(keys=[self.prefix + key], args=[request_hash, self.claim_ttl_ms])
        state = ClaimState(r[0].decode() if isinstance(r[0], bytes) else r[0])
        if state is ClaimState.CLAIMED:
            return Claim(state)
        h = r[1].decode() if isinstance(r[1], bytes) else str(r[1])
        if state is ClaimState.DONE:
            return Claim(state, h, int(r[2]), bytes(r[3]))
        return Claim(state, h)

    async def peek(self, key: str) -> Claim | None:
        """What Redis holds under `key` (in flight, or done with its answer), without
        claiming it; None when nothing."""
        r = await self.redis.execute("HGETALL", self.prefix + key)
        h = {r[i].decode(): r[i + 1] for i in range(0, len(r), 2)} if r else {}
        if "state" not in h or "hash" not in h:
            return None
        if h["state"] == b"done":
            return Claim(ClaimState.DONE, h["hash"].decode(), int(h["status"]),
                         bytes(h["body"]))
        return Claim(ClaimState.IN_FLIGHT, h["hash"].decode())

    async def complete(self, key: str, request_hash: str, status: int, body: bytes) -> None:
        await self._complete(keys=[self.prefix + key],
                             args=[request_hash, status, body, self.ttl_s])

    def complete_soon(self, key: str, request_hash: str, status: int, body: bytes) -> bool:
        """`complete` without waiting for Redis: the stored answer is queued on the shared
        connection before the caller sends its own answer, so a retry (whose claim can only
        be sent after the client has read that answer, on the same connection) finds it.
        False when there is no live connection to queue it on: then nothing was sent, and the
        caller awaits `complete` instead (a claim sent once the connection is back could
        otherwise overtake it)."""
        return self._complete.send_nowait(keys=[self.prefix + key],
                                          args=[request_hash, status, body, self.ttl_s])

    async def release(self, key: str) -> None:
        await self.redis.delete(self.prefix + key)
