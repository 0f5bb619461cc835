"""API clients: one key per client and channel, shown once, stored only as a hash.

Keys are 256-bit random tokens, so a plain SHA-256 is the right hash (a slow password hash
would only slow every request without adding strength); lookups are by that hash.
"""

from __future__ import annotations

import hashlib
import secrets
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


class ClientDirectory:
    """Key → client, cached in memory (keys are looked up on every request)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._cache: dict[bytes, ApiClient | None] = {}

    async def authenticate(self, key: str) -> ApiClient | None:
        if not key or len(key) > 200:
            return None
        h = hash_key(key)
        if h in self._cache:
            return self._cache[h]
        row = await self.pool.fetchrow(
            "SELECT id, name, channel FROM api_clients WHERE key_hash = $1 AND revoked_at IS NULL",
            h,
        )
        client = ApiClient(row["id"], row["name"], row["channel"]) if row else None
        if client is not None:  # unknown keys are not cached: a new client works at once
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[h] = client
        return client
