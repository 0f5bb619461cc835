"""Card-centre users, roles, sessions and the permission table.

Passwords are hashed with argon2id (argon2-cffi's defaults); a session is a 256-bit random
bearer token that exists only in the client's hands: the database keeps its SHA-256.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import TextIO

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from switch.cards import oplog
from switch.cards.errors import Forbidden, InvalidInput, Unauthenticated
from switch.clients import bearer_token, hash_key


class Role(StrEnum):
    CARD_ADMIN = "card_admin"
    HALL_MANAGER = "hall_manager"
    APPROVER = "approver"
    STOREKEEPER = "storekeeper"
    CASHIER = "cashier"
    AUDITOR = "auditor"


#: Roles that act for one service hall (and must have one).
HALL_ROLES = frozenset({Role.HALL_MANAGER, Role.CASHIER})
R = Role
_READERS = frozenset({R.CARD_ADMIN, R.APPROVER, R.STOREKEEPER, R.AUDITOR})

#: action → roles allowed. Hall roles are further limited to their own hall by the handlers.
PERMISSIONS: Mapping[str, frozenset[Role]] = MappingProxyType({
    "batch.order": frozenset({R.CARD_ADMIN}),
    "batch.resume": frozenset({R.CARD_ADMIN}),
    "batch.read": _READERS,
    "batch.new_card_file": frozenset({R.CARD_ADMIN}),
    "batch.card_back_file": frozenset({R.CARD_ADMIN}),
    "batch.stock_in": frozenset({R.CARD_ADMIN}),
    "void.create": frozenset({R.CARD_ADMIN}),
    "void.approve": frozenset({R.APPROVER}),
    "void.read": _READERS,
    "stocktake.create": frozenset({R.CARD_ADMIN, R.STOREKEEPER, R.HALL_MANAGER}),
    "request.create": frozenset({R.HALL_MANAGER}),
    "request.decide": frozenset({R.APPROVER}),
    "request.issue": frozenset({R.STOREKEEPER}),
    "request.read": _READERS | {R.HALL_MANAGER},
    "sale.create": frozenset({R.CASHIER}),
    "card.unlock": frozenset({R.APPROVER}),
    "card.read": _READERS | HALL_ROLES,
    "inventory.read": _READERS | HALL_ROLES,
    "recharges.read": frozenset({R.CARD_ADMIN, R.APPROVER, R.AUDITOR}),
    "oplog.read": frozenset({R.CARD_ADMIN, R.AUDITOR}),
    "job.read": frozenset({R.CARD_ADMIN, R.STOREKEEPER, R.AUDITOR}),
})

_USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_HALL = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
MIN_PASSWORD = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class User:
    username: str
    role: Role
    hall: str | None

    def may(self, action: str) -> bool:
        return self.role in PERMISSIONS[action]

    def require(self, action: str) -> None:
        if not self.may(action):
            raise Forbidden(f"role {self.role} may not do {action}", code="forbidden_role")

    def require_hall(self, hall: str) -> None:
        """Hall roles act only at their own hall."""
        if self.role in HALL_ROLES and self.hall != hall:
            # what was asked for is not echoed: the detail is kept in the operation log, and
            # a value typed in the wrong field (a card's PIN) matches a hall code's form
            raise Forbidden(f"user {self.username} acts for hall {self.hall} only",
                            code="forbidden_hall")


def _hasher() -> PasswordHasher:
    return PasswordHasher()  # argon2id with the library's recommended parameters


def validate_user(username: str, role: str, hall: str | None, password: str) -> Role:
    if not _USERNAME.fullmatch(username):
        raise InvalidInput("a username is 1 to 64 of A-Z a-z 0-9 _ . @ -",
                           code="invalid_username")
    try:
        r = Role(role)
    except ValueError:
        raise InvalidInput(f"role must be one of {', '.join(Role)}", code="invalid_role") \
            from None
    if (r in HALL_ROLES) != (hall is not None):
        raise InvalidInput(f"role {r} {'needs' if r in HALL_ROLES else 'takes no'} hall",
                           code="invalid_hall")
    if hall is not None and not _HALL.fullmatch(hall):
        raise InvalidInput("a hall code is 1 to 32 of A-Z a-z 0-9 _ . -", code="invalid_hall")
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"a password has at least {MIN_PASSWORD} characters",
                           code="weak_password")
    return r


async def add_user(pool: asyncpg.Pool, username: str, role: str, hall: str | None,
                   password: str, *, actor: str = "cli") -> User:
    """Create a user (or replace the role, hall and password of an existing one), and append
    `user.add` to the operation log in the same transaction: who may approve is part of the
    maker-checker record. The entry names the user, the role and hall before and after; never
    the password or its hash."""
    r = validate_user(username, role, hall, password)
    digest = await asyncio.to_thread(_hasher().hash, password)
    async with pool.acquire() as conn, conn.transaction():
        before = await conn.fetchrow(
            "SELECT role, hall, disabled_at IS NOT NULL AS disabled FROM card_users"
            " WHERE username = $1 FOR UPDATE", username)
        await conn.execute(
            "INSERT INTO card_users (username, role, hall, password_hash)"
            " VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (username) DO UPDATE SET role = EXCLUDED.role, hall = EXCLUDED.hall,"
            " password_hash = EXCLUDED.password_hash, disabled_at = NULL",
            username, r.value, hall, digest)
        await oplog.append(
            conn, actor=actor, action="user.add",
            objects={"username": username, "role": r.value, "hall": hall},
            result={"ok": True, "created": before is None,
                    **({"role_before": before["role"], "hall_before": before["hall"],
                        "was_disabled": before["disabled"]} if before is not None else {})})
    return User(username=username, role=r, hall=hall)


_DUMMY_HASH: list[str] = []


def _verify(stored: str | None, password: str) -> bool:
    ph = _hasher()
    if stored is None:  # same work for an unknown user: no timing oracle on usernames
        if not _DUMMY_HASH:
            _DUMMY_HASH.append(ph.hash(secrets.token_hex(16)))
        stored = _DUMMY_HASH[0]
        try:
            ph.verify(stored, password)
        except (VerificationError, InvalidHashError):
            pass
        return False
    try:
        return ph.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    token: str
    user: User
    expires_at: dt.datetime

    def __repr__(self) -> str:
        return f"Session(user={self.user.username!r}, token=<masked>, expires_at={self.expires_at})"


async def login(pool: asyncpg.Pool, username: str, password: str, ttl_s: int) -> Session:
    row = await pool.fetchrow(
        "SELECT username, role, hall, password_hash FROM card_users"
        " WHERE username = $1 AND disabled_at IS NULL", username)
    ok = await asyncio.to_thread(_verify, None if row is None else row["password_hash"],
                                 password)
    if row is None or not ok:
        raise Unauthenticated("unknown user or wrong password", code="invalid_credentials")
    token = secrets.token_urlsafe(32)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ttl_s)
    await pool.execute(
        "INSERT INTO card_sessions (token_hash, username, expires_at) VALUES ($1, $2, $3)",
        hash_key(token), username, expires)
    await pool.execute("DELETE FROM card_sessions WHERE expires_at < now() - interval '1 day'")
    return Session(token=token, user=User(username=row["username"], role=Role(row["role"]),
                                          hall=row["hall"]), expires_at=expires)


async def authenticate(pool: asyncpg.Pool, authorization: str | None) -> User:
    """The user of a `Bearer <token>` header (401 if missing, unknown or expired)."""
    token = bearer_token(authorization)
    if token is None:
        raise Unauthenticated("log in with POST /admin/v1/session and send "
                              "Authorization: Bearer <token>", code="session_required")
    if not token or len(token) > 128:
        raise Unauthenticated("unknown or expired session", code="session_invalid")
    row = await pool.fetchrow(
        "SELECT u.username, u.role, u.hall FROM card_sessions s"
        " JOIN card_users u USING (username)"
        " WHERE s.token_hash = $1 AND s.expires_at > now() AND u.disabled_at IS NULL",
        hash_key(token))
    if row is None:
        raise Unauthenticated("unknown or expired session", code="session_invalid")
    return User(username=row["username"], role=Role(row["role"]), hall=row["hall"])


async def logout(pool: asyncpg.Pool, authorization: str | None) -> None:
    token = bearer_token(authorization)
    if token is not None:
        await pool.execute("DELETE FROM card_sessions WHERE token_hash = $1", hash_key(token))


def parse_users_add(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gridpay users add",
                                description="add a card-centre user (password on stdin)")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=[r.value for r in Role])
    p.add_argument("--hall", default=None)
    p.add_argument("--password-stdin", action="store_true", required=True,
                   help="read the password from the first line of standard input")
    return p.parse_args(list(argv))


async def main_users_add(argv: Sequence[str], pool: asyncpg.Pool,
                         stdin: TextIO | None = None) -> int:
    """`gridpay users add NAME --role ROLE [--hall HALL] --password-stdin`."""
    args = parse_users_add(argv)
    password = (stdin or sys.stdin).readline().rstrip("\r\n")
    try:
        user = await add_user(pool, args.name, args.role, args.hall, password)
    except InvalidInput as e:
        print(f"gridpay users add: {e.detail}", file=sys.stderr)
        return 2
    print(f"user {user.username} ({user.role}{', hall ' + user.hall if user.hall else ''}) "
          "saved")
    return 0
