"""The Internet / counter / partner HTTP API (`/v1`)."""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
import orjson
from aiohttp import web

from switch import db
from switch.clients import ApiClient, ClientDirectory, bearer_token
from switch.payments.accounts import Accounts, AccountsUnavailable, mask_name
from switch.payments.idempotency import Claim, ClaimState, IdempotencyCache
from switch.payments.ledger import (
    CommitInterrupted,
    Committed,
    Duplicate,
    Fenced,
    LedgerError,
    NotReversible,
    Outcome,
    PaymentRecord,
    PaymentRequest,
    PostingPath,
    fetch_duplicate,
    load_payment,
    reverse_in,
)
from switch.web.app import node_of, require_active
from switch.web.problems import (
    Problem,
    exactly,
    json_body,
    json_response,
    no_longer_active,
    one_header,
    unknown_fields,
)

if TYPE_CHECKING:
    from switch.node import Node

log = logging.getLogger("gridpay.http")

PAYMENT_CHANNELS = frozenset({"internet", "counter", "partner"})
METHODS = ("cash", "transfer", "bank_card", "wallet")
_ACCOUNT = re.compile(r"^[0-9]{10}$")
_IDEM_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True, slots=True)
class HttpPayments:
    """What the HTTP payment routes need from the node."""

    accounts: Accounts
    ledger: PostingPath
    idempotency: IdempotencyCache
    max_amount: int


def _svc(node: Node) -> HttpPayments:
    svc = node.components["http_payments"]
    assert isinstance(svc, HttpPayments)
    return svc


async def authenticate(request: web.Request, channels: frozenset[str]) -> ApiClient:
    node = node_of(request)
    # two keys in one request: which one is meant would be a guess
    key = bearer_token(one_header(request, "Authorization", "authorization_repeated"))
    if not key:
        raise Problem(401, "unauthenticated", "send the API key as 'Authorization: Bearer <key>'",
                      headers={"WWW-Authenticate": 'Bearer realm="gridpay"'})
    directory: ClientDirectory = node.components["clients"]
    client = await directory.authenticate(key)
    if client is None:
        raise Problem(401, "unauthenticated", "the API key is not known or has been revoked",
                      headers={"WWW-Authenticate": 'Bearer realm="gridpay", error="invalid_token"'})
    if client.channel not in channels:
        raise Problem(403, "wrong_channel",
                      f"a key of the {client.channel!r} channel cannot use this endpoint")
    return client


def _fmt_time(rec_time: datetime) -> str:
    return rec_time.isoformat(timespec="milliseconds")


def payment_doc(rec: PaymentRecord) -> dict[str, object]:
    doc: dict[str, object] = {
        "payment_id": str(rec.id),
        "receipt_no": rec.receipt_no,
        "account_no": rec.account_no,
        "amount": rec.amount,
        "method": rec.method,
        "channel": rec.channel,
        "business_date": rec.business_date.isoformat(),
        "status": "reversed" if rec.reversed_at else "confirmed",
        "posting": rec.posting,
        "created_at": _fmt_time(rec.created_at),
    }
    if rec.reference is not None:
        doc["reference"] = rec.reference
    if rec.reversed_at is not None:
        doc["reversed_at"] = _fmt_time(rec.reversed_at)
    return doc


def _idempotency_key(request: web.Request) -> str:
    key = one_header(request, "Idempotency-Key", "idempotency_key_missing")
    if key is None or not _IDEM_KEY.fullmatch(key):
        raise Problem(400, "idempotency_key_missing",
                      "send an Idempotency-Key header of 1 to 64 characters of [A-Za-z0-9_-]")
    return key


#: what a reference may not hold: controls (NUL, tabs, line feeds...), lone surrogates,
#: line and paragraph separators, and the marks that reorder text on a receipt or a screen
_UNFIT_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_DIRECTION_MARKS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                             "\u2066\u2067\u2068\u2069")


def _fit_reference(ref: str) -> bool:
    """The client's own text, in any script and with any kind of space (an ideographic space,
    a no-break space), but nothing that breaks a line or a log, or reorders what is shown."""
    if ref.isprintable():  # the common case, at C speed
        return True
    return not any(unicodedata.category(c) in _UNFIT_CATEGORIES or c in _DIRECTION_MARKS
                   for c in ref)


def _validate_payment(body: dict[str, object]) -> tuple[str, int, str, str | None]:
    """The request's own form (the same body is always judged the same). The amount limit and
    the account's status can change between a payment and its retry: `_refusal` judges them,
    after the stored answer of a retry has had its chance."""
    account = body.get("account_no")
    if not isinstance(account, str) or not _ACCOUNT.fullmatch(account):
        raise Problem(400, "invalid_account_no", "account_no must be a string of 10 digits")
    amount = body.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise Problem(400, "invalid_amount_type",
                      "amount must be a JSON integer in fen (e.g. 12050 for 120.50 yuan)")
    if amount < 0:
        raise Problem(400, "invalid_amount_type", "amount cannot be negative")
    method = body.get("method")
    if method not in METHODS:
        raise Problem(400, "invalid_method", f"method must be one of {', '.join(METHODS)}")
    ref = body.get("reference")
    if ref is not None and (not isinstance(ref, str) or not 1 <= len(ref) <= 64
                            or not _fit_reference(ref)):
        raise Problem(400, "invalid_reference",
                      "reference must be a string of 1 to 64 characters, without control "
                      "characters, line breaks or text-direction marks")
    unknown = set(body) - {"account_no", "amount", "method", "reference"}
    if unknown:
        raise Problem(400, "unknown_field",
                      unknown_fields(unknown, "account_no, amount, method and reference"))
    if amount == 0:
        raise Problem(422, "invalid_amount", "amount must be at least 1 fen")
    assert isinstance(method, str)
    return account, amount, method, ref


def _over_limit(svc: HttpPayments) -> Problem:
    return Problem(422, "invalid_amount", f"amount must be from 1 to {svc.max_amount} fen",
                   max_amount=svc.max_amount)


async def _refusal(svc: HttpPayments, account: str, amount: int) -> Problem | None:
    """Why a new payment cannot be taken now (amount limit, account status), or None."""
    if amount > svc.max_amount:
        return _over_limit(svc)
    try:
        status = await svc.accounts.status(account)
    except AccountsUnavailable:
        return Problem(503, "account_unverifiable",
                       "the account cannot be checked right now; retry shortly",
                       headers={"Retry-After": "2"})
    if status is None:
        return Problem(404, "account_not_found", f"no customer account {account}")
    if status != "active":
        return Problem(422, "account_closed", f"account {account} is closed")
    return None


def _replay(status: int, body: bytes) -> web.Response:
    ctype = "application/json" if status < 400 else "application/problem+json"
    return web.Response(status=status, body=body, content_type=ctype,
                        headers={"Idempotent-Replayed": "true"})


async def create_payment(request: web.Request) -> web.Response:
    node = require_active(request)
    svc = _svc(node)
    client = await authenticate(request, PAYMENT_CHANNELS)
    key = _idempotency_key(request)
    body = await json_body(request, fields_checked=True)  # NUL: invalid_reference, say
    amount_read = body.get("amount")
    if isinstance(amount_read, float) and abs(amount_read) >= 2**63:
        # orjson reads an integer beyond 64 bits as a float: read the body again exactly, so
        # that such an amount is judged an integer over the limit (422), and only a number
        # written with a fraction or an exponent is refused as no integer (400). A body
        # nested deeper than Python's json takes (orjson takes 1 024 levels) stays a 400.
        exact = exactly(await request.read())  # (read already: aiohttp keeps it)
        if isinstance(exact, dict):
            body = exact
    account, amount, method, ref = _validate_payment(body)
    if amount >= 2**63:  # beyond what any limit or the ledger's bigint can be: no payment
        raise _over_limit(svc)
    canonical = orjson.dumps({"account_no": account, "amount": amount, "method": method,
                              "reference": ref}, option=orjson.OPT_SORT_KEYS)
    req_hash = hashlib.sha256(canonical).hexdigest()
    scope = f"http:{client.id}:{key}"

    # A refusal (over the limit, an account unknown, closed or not checkable now) is decided
    # before Redis is asked anything: a claim made for a refused request could outlive it (a
    # Redis that stalled runs the claim late, after the refusal had nothing to release), and
    # a corrected retry under the same key would be told 409 or 422 for the claim's lifetime.
    # Redis may also have forgotten a payment made with this key while the account was closed
    # or the limit lowered since: PostgreSQL gives a late retry its stored answer instead.
    refusal = await _refusal(svc, account, amount)
    if refusal is not None:
        # (a database error here answers 503, never the refusal: the payment may have been
        # made, and a refusal would tell its retry it was not)
        earlier = await fetch_duplicate(node.pool, scope)
        if earlier is not None:
            return await _answer_stored(svc, scope, earlier, req_hash)
        # not committed, but maybe under way: a first request still in flight is answered
        # 409 as the contract has it, and another body's key 422 (read, not claimed)
        try:
            seen = await svc.idempotency.peek(scope)
        except Exception:  # Redis is only the fast path
            seen = None
        if seen is not None:
            return _answer_held(seen, req_hash)
        raise refusal

    claim_failed = False
    try:
        claim = await svc.idempotency.claim(scope, req_hash)
    except Exception:  # Redis is only the fast path: PostgreSQL decides
        claim, claim_failed = None, True
    if claim is not None and claim.state is not ClaimState.CLAIMED:
        if claim.state is ClaimState.IN_FLIGHT:
            # a request still being processed, or one that ended without Redis hearing of it
            # (a claim that a stalled Redis ran late; another body's claim that Redis failed
            # to replace with the key's stored answer): PostgreSQL knows, whatever the body
            earlier = await _held(node, scope)
            if earlier is not None:
                return await _answer_stored(svc, scope, earlier, req_hash)
        return _answer_held(claim, req_hash)
    claimed = claim is not None

    outcome: Outcome
    try:
        outcome = await _record(svc, client, scope, req_hash, account, amount, method, ref)
    except BaseException:
        if claimed:
            try:
                await svc.idempotency.release(scope)
            except Exception:  # noqa: S110 - the claim expires by itself
                pass
        raise

    if not isinstance(outcome, Committed):
        return await _answer_stored(svc, scope, outcome, req_hash)
    assert outcome.status_code is not None and outcome.response is not None
    # not waited for (a Redis round trip less per payment): queued ahead of any retry's claim
    if not svc.idempotency.complete_soon(scope, req_hash, outcome.status_code,
                                         outcome.response) and not claim_failed:
        # no live connection to queue it on: stored before answering, as it used to be (not
        # when this request's claim already failed: Redis is out of reach or stalled, and a
        # claim it runs late is resolved by PostgreSQL, above)
        try:
            await svc.idempotency.complete(scope, req_hash, outcome.status_code,
                                           outcome.response)
        except Exception:  # noqa: S110 - PostgreSQL already holds the answer
            pass
    return web.Response(status=outcome.status_code, body=outcome.response,
                        content_type="application/json")


async def _record(svc: HttpPayments, client: ApiClient, scope: str, req_hash: str,
                  account: str, amount: int, method: str, ref: str | None) -> Outcome:
    """Record the payment (or find the key's earlier holder) through the posting path."""

    def render(rec: PaymentRecord) -> tuple[int, bytes]:
        return 201, orjson.dumps(payment_doc(rec))

    preq = PaymentRequest(
        dedup_key=scope, request_hash=bytes.fromhex(req_hash), channel=client.channel,
        method=method, account_no=account, amount=amount, client_id=client.id,
        reference=ref, render=render)
    try:
        return await svc.ledger.submit(preq)
    except Fenced:
        raise no_longer_active() from None
    except CommitInterrupted as e:  # the switch stopped, or the database went away, while
        # the commit was under way: it may have happened
        raise _outcome_unknown("payment", e) from None
    except LedgerError:
        raise Problem(503, "unavailable", "the payment could not be recorded; nothing was "
                      "charged; retry with the same Idempotency-Key",
                      headers={"Retry-After": "1"}) from None


def _outcome_unknown(what: str, error: BaseException) -> Problem:
    """The 503 for a write whose commit may or may not have happened (logged): repeating the
    same request is safe (a payment's key, a reversal's payment id) and gets its answer."""
    log.warning("write not confirmed: its outcome is not known",
                extra={"write": what, "error": type(error).__name__})
    again = ("send the same request again with the same Idempotency-Key"
             if what == "payment" else "send the same reversal again")
    return Problem(503, "unavailable",
                   f"the database did not complete the {what}; it may or may not have been "
                   f"recorded: {again} to get its answer", headers={"Retry-After": "1"})


async def _held(node: Node, scope: str) -> Duplicate | None:
    """The payment PostgreSQL holds under `scope`, if any (None too when it cannot say)."""
    try:
        return await fetch_duplicate(node.pool, scope)
    except Exception:
        return None


async def _answer_stored(svc: HttpPayments, scope: str, earlier: Duplicate,
                         req_hash: str) -> web.Response:
    """The answer for a key PostgreSQL already holds: its stored answer again (same body), or
    422 (another body). Redis is told the stored answer under the first body's hash, replacing
    this request's claim: the next retry is answered there, and a claim made under another
    body's hash never outlives this request (it would answer the right body 422 and the wrong
    one 409 until it expired)."""
    status, body = earlier.status_code, earlier.response
    try:
        if status is not None and body is not None:
            await svc.idempotency.complete(scope, earlier.request_hash.hex(), status, body)
        else:
            await svc.idempotency.release(scope)
    except Exception:  # noqa: S110 - Redis is the fast path; PostgreSQL answers without it
        pass
    if status is None or body is None or earlier.request_hash.hex() != req_hash:
        raise _reused()
    return _replay(status, body)


def _answer_held(held: Claim, req_hash: str) -> web.Response:
    """The answer to a request whose key Redis holds for another request (not this one's
    claim): that one's answer again (same body, done), 409 (same body, in flight), else 422."""
    if held.request_hash != req_hash:
        raise _reused()
    if held.state is ClaimState.DONE:
        return _replay(held.status, held.body)
    raise Problem(409, "request_in_progress",
                  "a request with this Idempotency-Key is still being processed; "
                  "retry in a moment", headers={"Retry-After": "1"})


def _reused() -> Problem:
    return Problem(422, "idempotency_key_reused",
                   "this Idempotency-Key was used with a different request body")


def _payment_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["payment_id"])
    except ValueError:
        raise Problem(404, "payment_not_found", "no such payment") from None


#: channels whose clients are separate organisations: each sees only its own payments (the
#: counters of the utility's halls, and its portal, share theirs within the channel)
PRIVATE_CHANNELS = frozenset({"partner"})


def _owns(client: ApiClient, channel: str, client_id: object) -> bool:
    """May `client` read or reverse a payment made through `channel` by `client_id`? Only
    the channel that made it; for a partner, only the partner that made it."""
    if channel != client.channel:
        return False
    return channel not in PRIVATE_CHANNELS or str(client_id) == str(client.id)


async def get_payment(request: web.Request) -> web.Response:
    node = require_active(request)  # the standby answers no payment request, reads included
    client = await authenticate(request, PAYMENT_CHANNELS)
    rec = await load_payment(node.pool, _payment_id(request))
    if rec is None or not _owns(client, rec.channel, rec.client_id):
        raise Problem(404, "payment_not_found", "no such payment")
    return json_response(payment_doc(rec))


async def reverse_payment(request: web.Request) -> web.Response:
    node = require_active(request)
    client = await authenticate(request, PAYMENT_CHANNELS)
    key = _idempotency_key(request)
    pid = _payment_id(request)
    cal = node.components["calendar"]
    try:
        async with node.pool.acquire() as con, con.transaction():
            await db.fence(con, node.epoch)
            owner = await con.fetchrow("SELECT channel, client_id FROM payments WHERE id = $1",
                                       pid)
            if owner is None or not _owns(client, owner["channel"], owner["client_id"]):
                raise Problem(404, "payment_not_found", "no such payment")
            prior = await con.fetchrow(_REVERSAL_KEY, client.id, key)
            if prior is not None:
                return _reversal_replayed(prior, pid)
            rec, done, _ = await reverse_in(con, pid, calendar=cal, channel=client.channel,
                                            epoch=node.epoch)
            first = None if done else await con.fetchval(_FIRST_REVERSAL_ANSWER, pid)
            # a reversal repeated under another key: the first one's answer, byte for byte
            body = bytes(first) if first is not None else orjson.dumps(payment_doc(rec))
            if not await con.fetchval(_REVERSAL_KEY_TAKE, client.id, key, pid, body):
                # the same key in a request that committed meanwhile: its answer
                prior = await con.fetchrow(_REVERSAL_KEY, client.id, key)
                assert prior is not None
                return _reversal_replayed(prior, pid)
    except NotReversible as e:
        raise Problem(409, "not_reversible", e.reason) from None
    except Problem:
        raise
    except Exception as e:
        if db.is_fenced(e):
            await node.fenced()
            raise no_longer_active() from None
        if db.unavailable(e):
            raise _outcome_unknown("reversal", e) from None
        raise
    if done:
        _svc(node).accounts.forget(rec.account_no)
        node.metrics.child(node.metrics.reversals, client.channel).inc()
        fwd = node.components.get("forwarder")
        if fwd is not None:
            fwd.wake()
    return web.Response(body=body, content_type="application/json",
                        headers={"Idempotent-Replayed": "true"} if first is not None else None)


# A reversal's Idempotency-Key, with the answer it got (`reversal_keys`): the same key again
# gets that answer byte for byte, and the same key for another payment is refused
_REVERSAL_KEY = "SELECT payment_id, response FROM reversal_keys WHERE client_id = $1 AND key = $2"
_FIRST_REVERSAL_ANSWER = """
SELECT response FROM reversal_keys WHERE payment_id = $1 ORDER BY created_at, key LIMIT 1"""
_REVERSAL_KEY_TAKE = """
INSERT INTO reversal_keys (client_id, key, payment_id, response) VALUES ($1, $2, $3, $4)
ON CONFLICT DO NOTHING RETURNING true"""


def _reversal_replayed(prior: asyncpg.Record, pid: uuid.UUID) -> web.Response:
    if prior["payment_id"] != pid:
        raise Problem(422, "idempotency_key_reused",
                      "this Idempotency-Key was used to reverse another payment")
    return web.Response(body=bytes(prior["response"]), content_type="application/json",
                        headers={"Idempotent-Replayed": "true"})


async def get_account(request: web.Request) -> web.Response:
    node = require_active(request)
    await authenticate(request, PAYMENT_CHANNELS)
    account = request.match_info["account_no"]
    if not _ACCOUNT.fullmatch(account):
        raise Problem(400, "invalid_account_no", "account_no must be 10 digits")
    try:
        view = await _svc(node).accounts.lookup(account)
    except AccountsUnavailable:
        raise Problem(503, "account_unavailable", "the marketing system and the mirror are "
                      "both unavailable; retry shortly", headers={"Retry-After": "2"}) from None
    if view is None:
        raise Problem(404, "account_not_found", f"no customer account {account}")
    return json_response({
        "account_no": view.account_no,
        "name": mask_name(view.name),
        "status": view.status,
        "arrears": view.arrears,
        "prepaid_balance": view.prepaid_balance,
        "bills": [{"period": p, "amount": a} for p, a in view.bills],
        "as_of": view.as_of.isoformat(timespec="seconds"),
        "stale": view.stale,
    })


async def openapi(request: web.Request) -> web.Response:
    from switch.web.openapi import document

    return json_response(document(node_of(request)))


def register(app: web.Application) -> None:
    app.router.add_get("/v1/accounts/{account_no}", get_account)
    app.router.add_post("/v1/payments", create_payment)
    app.router.add_get("/v1/payments/{payment_id}", get_payment)
    app.router.add_post("/v1/payments/{payment_id}/reversal", reverse_payment)
    app.router.add_get("/v1/openapi.json", openapi)
