"""API clients: one key per client and channel, shown once, stored only as a hash.

Keys are 256-bit random tokens, so a plain SHA-256 is the right hash (a slow password hash
would only slow every request without adding strength); lookups are by that hash.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass

import asyncpg

KEY_PREFIX = "gp_"


@dataclass(frozen=True, slots=True)
class ApiClient:
    id: uuid.UUID
    name: str
    channel: str


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def create_client(pool: asyncpg.Pool, name: str, channel: str) -> tuple[uuid.UUID, str]:
    client_id = uuid.uuid4()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    await pool.execute(
        "INSERT INTO api_clients (id, name, channel, key_prefix, key_hash)"
        " VALUES ($1, $2, $3, $4, $5)",
        client_id, name, channel, key[:7], hash_key(key),
    )
    return client_id, key


async def revoke_client(pool: asyncpg.Pool, name_or_id: str) -> int:
    """Revoke the keys of the clients named (or with the id) `name_or_id`; how many. Every
    node stops accepting them within `CACHE_TTL_S`."""
    try:
        by_id: uuid.UUID | None = uuid.UUID(name_or_id)
    except ValueError:
        by_id = None
    status = await pool.execute(
        "UPDATE api_clients SET revoked_at = now()"
        " WHERE (name = $1 OR id = $2) AND revoked_at IS NULL", name_or_id, by_id)
    return int(status.split()[-1])


#: how long a node trusts its cached answer for a key: a key revoked (on either node, or
#: directly in the database) stops working within this time
CACHE_TTL_S = 30.0


class ClientDirectory:
    """Key → client, cached in memory for `ttl_s` (keys are looked up on every request)."""

    def __init__(self, pool: asyncpg.Pool, *, ttl_s: float = CACHE_TTL_S) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self._cache: dict[bytes, tuple[ApiClient, float]] = {}

    async def authenticate(self, key: str) -> ApiClient | None:
        # keys are URL-safe ASCII; anything else (a header that is not UTF-8 arrives here with
        # surrogates, which cannot even be encoded) is simply not a key
        if not key or len(key) > 200 or not key.isascii():
            return None
        h = hash_key(key)
        hit = self._cache.get(h)
        if hit is not None and time.monotonic() - hit[1] < self.ttl_s:
            return hit[0]
        row = await self.pool.fetchrow(
            "SELECT id, name, channel FROM api_clients WHERE key_hash = $1 AND revoked_at IS NULL",
            h,
        )
        client = ApiClient(row["id"], row["name"], row["channel"]) if row else None
        if client is None:  # unknown or revoked: not cached, so a new client works at once
            self._cache.pop(h, None)
        else:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[h] = (client, time.monotonic())
        return client
