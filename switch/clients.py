"""API clients: one key per client and channel, shown once, stored only as a hash.

Keys are 256-bit random tokens, so a plain SHA-256 is the right hash (a slow password hash
would only slow every request without adding strength); lookups are by that hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
import uuid
from dataclasses import dataclass

import asyncpg

from switch import db
from switch.loop import cancel_and_wait

KEY_PREFIX = "gp_"

log = logging.getLogger("gridpay.clients")


@dataclass(frozen=True, slots=True)
class ApiClient:
    id: uuid.UUID  # the client's, shared by all its keys (not a key's own id)
    name: str
    channel: str


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case, as
    HTTP has it), stripped; None when the header is absent or of another scheme."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


def valid_client_name(name: str) -> bool:
    """A client's name: 1 to 64 printable characters, no space at either end."""
    return 1 <= len(name) <= 64 and name.isprintable() and name == name.strip()


async def create_client(pool: asyncpg.Pool, name: str, channel: str) -> tuple[uuid.UUID, str]:
    """A new key for the client `name` (created with it the first time): (the key's id, the
    key). A client is one identity whatever key it uses, so a key added under a name while
    another is in force shares its client id (a rotation: a retry sent with the new key is
    replayed, not paid again). A client's first key's id is the client's id. A name in force
    is one channel's."""
    if not valid_client_name(name):
        raise ValueError("a client's name is 1 to 64 printable characters, without a space at "
                         "either end")
    key_id = uuid.uuid4()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    async with pool.acquire() as con, con.transaction():
        # one add per name at a time: two at once would make two clients of one name
        await db.lock_name(con, "api-client:" + name)
        # the client is the one whose key is in force under this name; a name whose keys
        # were all revoked is a new client (it may be another party: it inherits nothing)
        first = await con.fetchrow(
            "SELECT client_id, channel FROM api_clients WHERE name = $1"
            " AND revoked_at IS NULL ORDER BY created_at DESC, id LIMIT 1", name)
        if first is not None and first["channel"] != channel:
            raise ValueError(f"the client {name} is of the {first['channel']} channel; a key "
                             "of another channel needs another name")
        await con.execute(
            "INSERT INTO api_clients (id, client_id, name, channel, key_prefix, key_hash)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            key_id, first["client_id"] if first is not None else key_id, name, channel,
            key[:7], hash_key(key),
        )
    return key_id, key


async def revoke_client(pool: asyncpg.Pool, name_or_id: str) -> int:
    """Revoke the keys of the clients named (or with the id) `name_or_id`; how many. A node
    listening for changes refuses them at once, any other within `CACHE_TTL_S`."""
    try:
        by_id: uuid.UUID | None = uuid.UUID(name_or_id)
    except ValueError:
        by_id = None
    status = await pool.execute(
        "UPDATE api_clients SET revoked_at = now()"
        " WHERE (name = $1 OR id = $2) AND revoked_at IS NULL", name_or_id, by_id)
    return int(status.split()[-1])


#: how long a node trusts its cached answer for a key when it is not listening for changes
#: (its listening connection is down): a key revoked stops working within this time
CACHE_TTL_S = 30.0

#: the channel a change to `api_clients` is announced on (migration 0050)
CHANGED_CHANNEL = "gridpay_api_clients"

#: how long to wait before listening again after the connection was lost or refused
LISTEN_RETRY_S = 2.0


class ClientDirectory:
    """Key → client, cached in memory (keys are looked up on every request).

    The cache is dropped whenever the database announces a change to the clients (see
    `listen`), so a revoked key is refused at once; while that announcement cannot be heard,
    an answer is trusted for `ttl_s` at most."""

    def __init__(self, pool: asyncpg.Pool, *, ttl_s: float = CACHE_TTL_S) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self._cache: dict[bytes, tuple[ApiClient, float]] = {}
        # counts the changes heard: a lookup that heard one while it read does not cache
        # what it read (the row may be from before the change)
        self._changes = 0
        self._listener: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    def listen(self, dsn: str) -> None:
        """Listen for changes to the clients on a connection of its own (made again when
        lost; a database in recovery refuses LISTEN, and is asked again later)."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(dsn), name="api-client-changes")

    async def close(self) -> None:
        await cancel_and_wait(self._listener)
        self._listener = None

    def _changed(self, *_: object) -> None:
        self._changes += 1
        self._cache.clear()

    async def _listen(self, dsn: str) -> None:
        refused = False
        while True:
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(dsn, timeout=5)
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANGED_CHANNEL, self._changed)
                self._changed()  # whatever changed while nobody listened
                self.listening.set()
                refused = False
                await lost.wait()
            except Exception as e:  # whatever it is, listen again later
                # (asyncpg has errors outside its PostgresError and InterfaceError families:
                # every host in recovery for a read-write URL is an InternalClientError)
                if not refused:  # once per outage, not every retry
                    log.warning("not listening for API client changes: a revoked key may "
                                "still be taken until its cached answer expires",
                                extra={"error": type(e).__name__, "expires_s": self.ttl_s})
                refused = True
            finally:
                self.listening.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)
            await asyncio.sleep(LISTEN_RETRY_S)

    async def authenticate(self, key: str) -> ApiClient | None:
        # keys are URL-safe ASCII; anything else (a header that is not UTF-8 arrives here with
        # surrogates, which cannot even be encoded) is simply not a key
        if not key or len(key) > 200 or not key.isascii():
            return None
        h = hash_key(key)
        hit = self._cache.get(h)
        if hit is not None and time.monotonic() - hit[1] < self.ttl_s:
            return hit[0]
        changes = self._changes
        row = await self.pool.fetchrow(
            "SELECT client_id, name, channel FROM api_clients"
            " WHERE key_hash = $1 AND revoked_at IS NULL",
            h,
        )
        client = ApiClient(row["client_id"], row["name"], row["channel"]) if row else None
        if client is None:  # unknown or revoked: not cached, so a new client works at once
            self._cache.pop(h, None)
        elif changes == self._changes:  # (a change heard meanwhile: good for this request only)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[h] = (client, time.monotonic())
        return client
