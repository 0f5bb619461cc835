"""The card centre's admin API under `/admin/v1` (see docs/card-centre.md).

Every call but `POST /admin/v1/session` needs `Authorization: Bearer <token>` and is checked
against the user's role (and hall). Errors are problem+json with stable codes. Every action
that changes something (and every login and file download) is appended to the operation log,
refused ones included.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from switch import db
from switch.cards import batches, jobs, oplog, workflow
from switch.cards.errors import CardError, Conflict, HsmUnavailable, InvalidInput
from switch.cards.files import CardBackParser
from switch.cards.openapi import ADMIN_OPENAPI_PATHS
from switch.cards.serials import digits, valid_serial
from switch.cards.states import Conn
from switch.cards.users import User, authenticate, login, logout
from switch.web.app import NODE, node_of, require_active
from switch.web.problems import (
    Problem,
    json_body,
    json_response,
    no_longer_active,
    one_header,
    read_within,
)

if TYPE_CHECKING:
    from switch.node import Node

__all__ = ["ADMIN_OPENAPI_PATHS", "CARD_JOBS", "PREFIX", "SYNC_LIMIT", "register"]

PREFIX = "/admin/v1"
#: Below this many cards a job is awaited and the call answers with its result.
SYNC_LIMIT = 100_000
SYNC_WAIT_S = 100.0
MAX_CARD_BACK_BYTES = 128 * 1024 * 1024
BIG_BODY = 8 * 1024 * 1024

CARD_JOBS: web.AppKey[jobs.JobRunner] = web.AppKey("card_jobs", jobs.JobRunner)


@dataclass(slots=True)
class Ctx:
    request: web.Request
    node: Node
    user: User
    action: str = ""
    objects: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    #: the HTTP status the success entry recorded, which `answer` gives the response; set
    #: when that entry was written inside the action's own transaction
    status: int | None = None

    @property
    def audited(self) -> bool:
        """The success entry was written inside the action's own transaction."""
        return self.status is not None

    @property
    def pool(self) -> Any:
        return self.node.pool

    def audit(self, status: int | Callable[[dict[str, Any]], int],
              result: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None
              ) -> workflow.Audit:
        """The hook a workflow action calls as the last step of its own transaction: it fills
        the entry's result from what the action returns (`result`) and appends the success
        entry there, so that the action and its entry commit together or not at all."""
        async def hook(conn: Conn, out: dict[str, Any]) -> None:
            if result is not None:
                self.result.update(result(out))
            st = status(out) if callable(status) else status
            await oplog.append(conn, actor=self.user.username, action=self.action,
                               objects=self.objects,
                               result={"ok": True, "status": st, **self.result})
            self.status = st
        return hook

    def answer(self, out: dict[str, Any],
               headers: dict[str, str] | None = None) -> web.StreamResponse:
        """An audited action's answer, with the HTTP status its log entry recorded (stated
        once, in `audit`)."""
        assert self.status is not None, "answer() follows an action that called its audit"
        return json_response(out, status=self.status, headers=headers)


Body = Callable[[Ctx], Awaitable[web.StreamResponse]]


def _problem(e: CardError) -> Problem:
    p = Problem(e.status, e.code, e.detail)
    p.extra = dict(e.extra)
    return p


async def _log(node: Node, actor: str, action: str, objects: dict[str, Any],
               result: dict[str, Any], *, fenced: bool = False) -> None:
    """Append an entry in a transaction of its own. `fenced` (the actions only the active node
    may take): under the lease epoch, and a node that lost the lease logs nothing and steps
    down."""
    async with node.pool.acquire() as conn:
        try:
            async with conn.transaction():
                if fenced:
                    await db.fence(conn, node.epoch)
                await oplog.append(conn, actor=actor, action=action, objects=objects,
                                   result=result)
        except Exception as e:
            if not (fenced and db.is_fenced(e)):
                raise
            await node.fenced()


def _handler(action: str, *, changes: bool, logged: bool | None = None
             ) -> Callable[[Body], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Authenticate, authorise `action`, run, map errors, append to the operation log."""
    log_it = changes if logged is None else logged

    def deco(fn: Body) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            node = require_active(request) if changes else node_of(request)
            try:
                user = await authenticate(node.pool, one_header(request, "Authorization",
                                                                    "authorization_repeated"))
            except CardError as e:
                raise _problem(e) from None
            ctx = Ctx(request=request, node=node, user=user, action=action,
                      objects=_path_objects(request))
            try:
                user.require(action)
                resp = await fn(ctx)
            except CardError as e:
                # (a refusal comes before the hook: the hook is its transaction's last step)
                if log_it:
                    await _log(node, user.username, action, ctx.objects,
                               {"ok": False, "status": e.status, "code": e.code,
                                "detail": e.detail}, fenced=changes)
                raise _problem(e) from None
            except Problem as p:
                if p.status == 503 and p.code == "standby":  # a job refused by the fence
                    await node.fenced()
                    raise
                if log_it:
                    await _log(node, user.username, action, ctx.objects,
                               {"ok": False, "status": p.status, "code": p.code},
                               fenced=changes)
                raise
            except Exception as e:
                if not db.is_fenced(e):
                    raise
                # the lease moved on: nothing was written, and a stale node logs nothing
                await node.fenced()
                raise no_longer_active() from None
            if log_it and not ctx.audited:  # actions that do not log in their transaction
                await _log(node, user.username, action, ctx.objects,
                           {"ok": True, "status": resp.status, **ctx.result}, fenced=changes)
            return resp
        handle.__name__ = fn.__name__
        return handle
    return deco


#: what the operation log keeps of a value that was refused: the log is kept for good, and
#: a value typed into the wrong field may be anything (a card's PIN, a password)
NOT_LOGGED = "(not valid: not logged)"


def _path_objects(request: web.Request) -> dict[str, Any]:
    """The path's values as the operation log keeps them: a card serial only when it is one
    (a mistyped one may be the PIN from the same card, and the log is kept for good)."""
    return {k: v if k != "serial" or valid_serial(v) else "(not a valid serial)"
            for k, v in request.match_info.items()}


def _int_id(ctx: Ctx, name: str = "id") -> int:
    raw = ctx.request.match_info[name]
    if not digits(raw) or len(raw) > 18:
        raise InvalidInput(f"{name} must be a positive integer", code="invalid_id")
    return int(raw)


def _hsm(node: Node) -> tuple[Any, Any]:
    hsm = node.components.get("hsm")
    keyring = node.components.get("keyring")
    if hsm is None or keyring is None:
        raise HsmUnavailable("the HSM or its key ring is not configured on this node")
    return hsm, keyring


async def _run_job(ctx: Ctx, kind: str, total: int, object_id: str,
                   body: jobs.JobBody, *, sync: bool) -> tuple[uuid.UUID, dict[str, Any]]:
    runner = ctx.request.app[CARD_JOBS]
    job_id = await jobs.create_job(ctx.pool, kind, total=total, actor=ctx.user.username,
                                   object_id=object_id, epoch=ctx.node.epoch,
                                   running=runner.running())
    runner.start(job_id, total, body, epoch=ctx.node.epoch)
    if sync:
        await runner.wait(job_id, SYNC_WAIT_S)
    return job_id, await jobs.get_job(ctx.pool, job_id)


def _job_accepted(job: dict[str, Any], extra: dict[str, Any]) -> web.Response:
    return json_response({**extra, "job": job}, status=202,
                         headers={"Location": f"{PREFIX}/jobs/{job['id']}"})


def _awaited(job: dict[str, Any], extra: dict[str, Any], *,
             sync: bool = True) -> web.Response | None:
    """The answer for a job run in the background (not `sync`) or awaited and still running
    (202 with its job: it goes on, and the work it does must not be reported as failed, or a
    client retrying a failed order would order a second batch); its error if it failed;
    None when it succeeded, for the caller to answer with its result."""
    if not sync or job["state"] in ("queued", "running"):
        return _job_accepted(job, extra)
    if job["state"] != "succeeded":
        raise _job_failed(job)
    return None


def _job_failed(job: dict[str, Any]) -> Problem:
    """The error of a job that was awaited: the card error it failed with, if any."""
    res = job.get("result") or {}
    if job["state"] == "failed" and isinstance(res, dict) and "code" in res:
        p = Problem(int(res.get("status", 409)), str(res["code"]), str(job["error"]))
        p.extra = {k: v for k, v in res.items() if k not in ("code", "status")}
        p.extra["job_id"] = job["id"]
        return p
    return Problem(409, "job_failed",
                   f"job {job['id']} {job['state']}: {job['error'] or 'no reason recorded'}",
                   job_id=job["id"])


# --- session ----------------------------------------------------------------------------------

#: the operation log's actor for a failed log-in under a name that is no user's
UNKNOWN_USER = "(unknown user)"


async def create_session(request: web.Request) -> web.Response:
    node = node_of(request)
    username: object = None

    async def refused(code: str) -> None:
        # every refused attempt is logged, malformed ones too; a name that is not a user's is
        # not kept: it may be a password typed in the wrong field, and the log keeps what it
        # is given for good
        known = isinstance(username, str) and await node.pool.fetchval(
            "SELECT true FROM card_users WHERE username = $1", username[:64])
        actor = username[:64] if known and isinstance(username, str) else UNKNOWN_USER
        await _log(node, actor, "session.create", {}, {"ok": False, "code": code})

    try:
        doc = await json_body(request)
        username, password = doc.get("username"), doc.get("password")
        if not isinstance(username, str) or not isinstance(password, str) or not username:
            raise Problem(422, "validation_failed",
                          "username and password are required strings")
    except Problem as p:
        await refused(p.code)
        raise
    try:
        session = await login(node.pool, username[:64], password,
                              node.settings.cards.session_ttl_s)
    except CardError as e:
        await refused(e.code)
        raise _problem(e) from None
    await _log(node, username, "session.create", {}, {"ok": True})
    return json_response({"token": session.token, "token_type": "Bearer",
                          "expires_at": session.expires_at.isoformat(),
                          "user": {"username": session.user.username,
                                   "role": session.user.role.value,
                                   "hall": session.user.hall}}, status=201)


async def delete_session(request: web.Request) -> web.Response:
    node = node_of(request)
    await logout(node.pool, request.headers.get("Authorization"))
    return web.Response(status=204)


# --- batches ----------------------------------------------------------------------------------

def _generation(ctx: Ctx, hsm: Any, keyring: Any, batch_id: int) -> jobs.JobBody:
    """The body of a job generating batch `batch_id` (from its first chunk not written)."""
    pool, epoch = ctx.pool, ctx.node.epoch

    async def body(p: jobs.Progress) -> Mapping[str, Any]:
        return await batches.generate(pool, hsm, keyring, batch_id, p, epoch=epoch)

    return body


@_handler("batch.resume", changes=True)
async def resume_batch(ctx: Ctx) -> web.StreamResponse:
    """Generate the rest of a batch whose order was cut off (a stop, a switchover, the HSM):
    the chunks already written (each with its cards, in one transaction) are kept."""
    batch_id = _int_id(ctx)
    hsm, keyring = _hsm(ctx.node)
    pool, epoch = ctx.pool, ctx.node.epoch
    quantity = int((await batches.batch_row(pool, batch_id))["quantity"])  # 404 first
    # the job exists before the batch is claimed for it: a node that has just become active
    # fails the generating batches of jobs not its own (`jobs.fail_interrupted`)
    job_id = await jobs.create_job(pool, "batch.generate", total=quantity,
                                   actor=ctx.user.username, object_id=str(batch_id),
                                   epoch=epoch)
    ctx.result["job_id"] = str(job_id)
    try:
        await batches.claim_for_resume(pool, batch_id, job_id, epoch)
    except CardError as e:
        await pool.execute("UPDATE card_jobs SET state = 'failed', error = $2,"
                           " finished_at = now() WHERE id = $1", job_id, e.code)
        raise

    ctx.request.app[CARD_JOBS].start(
        job_id, quantity, _generation(ctx, hsm, keyring, batch_id), epoch=epoch)
    return _job_accepted(await jobs.get_job(pool, job_id), {"batch_id": batch_id})


@_handler("batch.order", changes=True)
async def order_batch(ctx: Ctx) -> web.StreamResponse:
    doc = await json_body(ctx.request)
    cards = ctx.node.settings.cards
    # the utility's date, as a card's expiry is judged by (see `db.local_time`)
    today = dt.datetime.now(ctx.node.settings.business.timezone).date()
    order = batches.BatchOrder.validate(doc, face_values=cards.face_values,
                                        expiry_years=cards.expiry_years, today=today)
    ctx.objects.update(face_value=order.face_value, quantity=order.quantity,
                       manufacturer=NOT_LOGGED, expiry=order.expiry.isoformat())
    hsm, keyring = _hsm(ctx.node)
    try:
        keyring.print_key(order.manufacturer)
    except KeyError:
        # neither logged nor echoed: what was typed may be anything (a password, a PIN)
        known = sorted(n.removeprefix("print:") for n in keyring.names()
                       if n.startswith("print:"))
        raise InvalidInput("no print key for the manufacturer given; the manufacturers with "
                           f"one are: {', '.join(known) or 'none'}",
                           code="unknown_manufacturer") from None
    ctx.objects["manufacturer"] = order.manufacturer
    pool = ctx.pool
    epoch = ctx.node.epoch
    job_id = await jobs.create_job(pool, "batch.generate", total=order.quantity,
                                   actor=ctx.user.username, epoch=epoch)
    try:
        batch_id = await batches.create_batch(pool, order, issuer=cards.issuer,
                                              actor=ctx.user.username, job_id=job_id,
                                              today=today, epoch=epoch)
    except BaseException:  # no batch, so no job: nobody was told of it, and it would stay
        # queued for good
        with contextlib.suppress(Exception):
            await pool.execute("DELETE FROM card_jobs WHERE id = $1 AND state = 'queued'",
                               job_id)
        raise
    await pool.execute("UPDATE card_jobs SET object_id = $2 WHERE id = $1", job_id,
                       str(batch_id))
    ctx.objects["batch_id"] = batch_id
    ctx.result["job_id"] = str(job_id)
    runner = ctx.request.app[CARD_JOBS]

    runner.start(job_id, order.quantity, _generation(ctx, hsm, keyring, batch_id),
                 epoch=epoch)
    if order.quantity >= SYNC_LIMIT:
        job = await jobs.get_job(pool, job_id)
        return _job_accepted(job, {"batch_id": batch_id})
    await runner.wait(job_id, SYNC_WAIT_S)
    job = await jobs.get_job(pool, job_id)
    if (accepted := _awaited(job, {"batch_id": batch_id})) is not None:
        return accepted
    view = await batches.batch_view(pool, batch_id)
    return json_response({**view, "job": job}, status=201,
                         headers={"Location": f"{PREFIX}/batches/{batch_id}"})


@_handler("batch.read", changes=False)
async def get_batch(ctx: Ctx) -> web.StreamResponse:
    return json_response(await batches.batch_view(ctx.pool, _int_id(ctx)))


@_handler("batch.new_card_file", changes=False, logged=True)
async def get_new_card_file(ctx: Ctx) -> web.StreamResponse:
    batch_id = _int_id(ctx)
    stream = batches.new_card_file(ctx.pool, batch_id)
    first = await anext(stream)  # raises the batch's errors before any byte is sent
    resp = web.StreamResponse(status=200, headers={
        "Content-Type": "text/plain; charset=us-ascii",
        "Content-Disposition": f'attachment; filename="batch-{batch_id}.ncf"'})
    await resp.prepare(ctx.request)
    await resp.write(first)
    async for chunk in stream:
        await resp.write(chunk)
    await resp.write_eof()
    return resp


MAX_CARD_BACK_LINE = 4096  # a record is about 40 bytes, the header under 100


def card_back_limit(quantity: int) -> int:
    """The most records a card-back file of a batch of `quantity` cards may hold: every card
    twice over, and room for serials that are not the batch's. More is not a manufacturer's
    report of this batch, and is refused while reading rather than held in memory."""
    return 2 * quantity + 1000


async def _read_card_back(request: web.Request, max_records: int) -> CardBackParser:
    parser = CardBackParser(max_records)
    size = 0
    rest = b""
    while chunk := await read_within(request.content.read(1 << 20)):
        size += len(chunk)
        if size > MAX_CARD_BACK_BYTES:
            raise Problem(413, "payload_too_large",
                          f"a card-back file is at most {MAX_CARD_BACK_BYTES} bytes")
        if b"\n" not in chunk:
            # an unfinished line only grows: copied once per chunk, the cost would grow with
            # the square of its length (a file without newlines)
            rest += chunk
            if len(rest) > MAX_CARD_BACK_LINE:
                raise InvalidInput(f"a line of the card-back file is longer than "
                                   f"{MAX_CARD_BACK_LINE} bytes",
                                   code="malformed_card_back_file")
            continue
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        await batches.feed_card_back(parser, (line + b"\n" for line in lines))
    if rest:
        parser.feed(rest)
    return parser


@_handler("batch.card_back_file", changes=True)
async def upload_card_back(ctx: Ctx) -> web.StreamResponse:
    batch_id = _int_id(ctx)
    row = await batches.batch_row(ctx.pool, batch_id)
    if row["status"] != "ordered":
        raise Conflict(f"batch {batch_id} is {row['status']}; a card-back file is taken once, "
                       "for an ordered batch", code="batch_state")
    cbf = (await _read_card_back(ctx.request, card_back_limit(row["quantity"]))).result()
    ctx.objects.update(batch_id=batch_id, records=len(cbf.records))
    if cbf.batch_id != batch_id:
        raise InvalidInput(f"the card-back file is for batch {cbf.batch_id}, not {batch_id}",
                           code="wrong_batch")
    if cbf.manufacturer != row["manufacturer"]:
        raise InvalidInput(f"the card-back file is from manufacturer {cbf.manufacturer!r}; "
                           f"batch {batch_id} was ordered from {row['manufacturer']!r}",
                           code="wrong_manufacturer")
    pool, user, epoch = ctx.pool, ctx.user.username, ctx.node.epoch

    async def body(p: jobs.Progress) -> dict[str, Any]:
        rec = await batches.reconcile_batch(pool, batch_id, cbf.records, actor=user,
                                            file_batch_id=cbf.batch_id, progress=p,
                                            epoch=epoch)
        return rec.as_dict()

    sync = row["quantity"] < SYNC_LIMIT
    job_id, job = await _run_job(ctx, "batch.reconcile", row["quantity"], str(batch_id), body,
                                 sync=sync)
    ctx.result["job_id"] = str(job_id)
    if (accepted := _awaited(job, {"batch_id": batch_id}, sync=sync)) is not None:
        return accepted
    report = job["result"]
    ctx.result["counts"] = report.get("counts")
    ctx.result["matched"] = report.get("matched")
    return json_response(report)


@_handler("batch.stock_in", changes=True)
async def stock_in(ctx: Ctx) -> web.StreamResponse:
    batch_id = _int_id(ctx)
    row = await batches.batch_row(ctx.pool, batch_id)
    ctx.objects["batch_id"] = batch_id
    if row["status"] != "reconciled":
        raise Conflict(f"batch {batch_id} is {row['status']}; stock-in follows reconciliation",
                       code="batch_state")
    pool, user, epoch = ctx.pool, ctx.user.username, ctx.node.epoch

    async def body(p: jobs.Progress) -> dict[str, Any]:
        return await batches.stock_in(pool, batch_id, actor=user, progress=p, epoch=epoch)

    sync = row["quantity"] < SYNC_LIMIT
    job_id, job = await _run_job(ctx, "batch.stock_in", row["quantity"], str(batch_id), body,
                                 sync=sync)
    ctx.result["job_id"] = str(job_id)
    if (accepted := _awaited(job, {"batch_id": batch_id}, sync=sync)) is not None:
        return accepted
    ctx.result["stocked_in"] = job["result"].get("stocked_in")
    return json_response(job["result"])


# --- voids, stocktakes ------------------------------------------------------------------------

@_handler("void.create", changes=True)
async def create_void(ctx: Ctx) -> web.StreamResponse:
    doc = await json_body(ctx.request, BIG_BODY)
    reason = doc.get("reason")
    note = doc.get("note")
    st = doc.get("stocktake_id")
    if not isinstance(reason, str):
        raise InvalidInput("reason is required", code="invalid_reason")
    if note is not None and (not isinstance(note, str) or len(note) > 500):
        raise InvalidInput("note is a string of up to 500 characters", code="invalid_note")
    if st is not None and (type(st) is not int or not 1 <= st < 2**63):
        raise InvalidInput("stocktake_id is a positive integer (a stocktake's id)",
                           code="invalid_id")
    serials = await workflow.cards_of(doc)
    ctx.objects.update(reason=reason if reason in workflow.VOID_REASONS else NOT_LOGGED,
                       count=len(serials),
                       ranges=[r for r in workflow._ranges(serials)][:100])
    def status(out: dict[str, Any]) -> int:
        return 202 if out["state"] == "pending_approval" else 200

    out = await workflow.void_cards(
        ctx.pool, ctx.user, serials, reason, note=note, stocktake_id=st, epoch=ctx.node.epoch,
        audit=ctx.audit(status, lambda o: {"void_id": o["void_id"], "state": o["state"]}))
    return ctx.answer(out)


async def _decide_void(ctx: Ctx, approve: bool) -> web.StreamResponse:
    void_id = _int_id(ctx)
    out = await workflow.approve_void(
        ctx.pool, ctx.user, void_id, approve=approve, epoch=ctx.node.epoch,
        audit=ctx.audit(200, lambda o: {"state": o["state"], "count": o["count"]}))
    return ctx.answer(out)


@_handler("void.approve", changes=True)
async def approve_void(ctx: Ctx) -> web.StreamResponse:
    return await _decide_void(ctx, True)


@_handler("void.approve", changes=True)
async def reject_void(ctx: Ctx) -> web.StreamResponse:
    return await _decide_void(ctx, False)


@_handler("stocktake.create", changes=True)
async def create_stocktake(ctx: Ctx) -> web.StreamResponse:
    doc = await json_body(ctx.request, BIG_BODY)
    location = doc.get("location")
    if not isinstance(location, str):
        raise InvalidInput("location is required", code="invalid_location")
    if not doc.get("serials") and not doc.get("ranges"):
        counted: list[str] = []
    else:
        counted = await workflow.cards_of(doc)
    known = await workflow.known_location(ctx.pool, location)
    ctx.objects.update(location=location if known else NOT_LOGGED, counted=len(counted))
    out = await workflow.stocktake(
        ctx.pool, ctx.user, location, counted, epoch=ctx.node.epoch, known=known,
        audit=ctx.audit(201, lambda o: {"stocktake_id": o["stocktake_id"],
                                        "missing": o["missing_count"],
                                        "unexpected": o["unexpected_count"]}))
    return ctx.answer(out)


# --- requests, issues, sales, unlocks ---------------------------------------------------------

@_handler("request.create", changes=True)
async def create_request(ctx: Ctx) -> web.StreamResponse:
    doc = await json_body(ctx.request)
    face, qty = doc.get("face_value"), doc.get("quantity")
    ctx.objects.update(
        face_value=face if workflow.valid_face_value(face, ctx.node.settings.cards.face_values)
        else NOT_LOGGED,
        quantity=qty if workflow.valid_request_quantity(qty) else NOT_LOGGED,
        hall=ctx.user.hall)
    hall = doc.get("hall")  # optional: a hall role asks for its own hall, and only for it
    if hall is not None:
        ctx.user.require_hall(str(hall))
    out = await workflow.create_request(
        ctx.pool, ctx.user, doc.get("face_value"), doc.get("quantity"),
        ctx.node.settings.cards.face_values, epoch=ctx.node.epoch,
        audit=ctx.audit(201, lambda o: {"request_id": o["id"]}))
    return ctx.answer(out, headers={"Location": f"{PREFIX}/requests/{out['id']}"})


@_handler("request.read", changes=False)
async def get_request(ctx: Ctx) -> web.StreamResponse:
    return json_response(await workflow.get_request(ctx.pool, ctx.user, _int_id(ctx)))


async def _decide(ctx: Ctx, approve: bool) -> web.StreamResponse:
    note: str | None = None
    if ctx.request.can_read_body:
        doc = await json_body(ctx.request)
        raw = doc.get("note")
        if raw is not None and (not isinstance(raw, str) or len(raw) > 500):
            raise InvalidInput("note is a string of up to 500 characters", code="invalid_note")
        note = raw
    out = await workflow.decide_request(ctx.pool, ctx.user, _int_id(ctx), approve=approve,
                                        note=note, epoch=ctx.node.epoch,
                                        audit=ctx.audit(200, lambda o: {"state": o["state"]}))
    return ctx.answer(out)


@_handler("request.decide", changes=True)
async def approve_request(ctx: Ctx) -> web.StreamResponse:
    return await _decide(ctx, True)


@_handler("request.decide", changes=True)
async def reject_request(ctx: Ctx) -> web.StreamResponse:
    return await _decide(ctx, False)


@_handler("request.issue", changes=True)
async def issue_request(ctx: Ctx) -> web.StreamResponse:
    out = await workflow.issue_request(
        ctx.pool, ctx.user, _int_id(ctx), epoch=ctx.node.epoch,
        audit=ctx.audit(201, lambda o: {"issue_id": o["issue_id"], "quantity": o["quantity"],
                                        "ranges": o["ranges"][:100]}))
    return ctx.answer(out)


@_handler("sale.create", changes=True)
async def create_sale(ctx: Ctx) -> web.StreamResponse:
    doc = await json_body(ctx.request, BIG_BODY)
    serials = await workflow.cards_of(doc, limit=100_000)
    ctx.objects.update(count=len(serials), ranges=workflow._ranges(serials)[:100],
                       hall=ctx.user.hall)
    out = await workflow.sell(
        ctx.pool, ctx.user, serials, epoch=ctx.node.epoch,
        audit=ctx.audit(201, lambda o: {"sale_id": o["sale_id"],
                                        "total_face_value": o["total_face_value"]}))
    return ctx.answer(out)


@_handler("card.unlock", changes=True)
async def unlock_card(ctx: Ctx) -> web.StreamResponse:
    out = await workflow.unlock(ctx.pool, ctx.user, ctx.request.match_info["serial"],
                                epoch=ctx.node.epoch, audit=ctx.audit(200))
    return ctx.answer(out)


# --- reads ------------------------------------------------------------------------------------

@_handler("card.read", changes=False)
async def get_card(ctx: Ctx) -> web.StreamResponse:
    return json_response(await workflow.card_history(ctx.pool, ctx.user,
                                                     ctx.request.match_info["serial"]))


@_handler("inventory.read", changes=False)
async def get_inventory(ctx: Ctx) -> web.StreamResponse:
    return json_response(await workflow.inventory(ctx.pool, ctx.user))


@_handler("inventory.read", changes=False)
async def get_hall_report(ctx: Ctx) -> web.StreamResponse:
    return json_response(await workflow.hall_report(ctx.pool, ctx.user,
                                                    ctx.request.query.get("hall")))


@_handler("recharges.read", changes=False)
async def get_recharges(ctx: Ctx) -> web.StreamResponse:
    tz = str(ctx.node.settings.business.timezone)
    # by default today's business date (it moves at the cut-over, as the ledger's dates do)
    day = ctx.request.query.get("date") or ctx.node.components["calendar"].today().isoformat()
    return json_response(await workflow.recharges(ctx.pool, day, tz))


def _query_int(ctx: Ctx, name: str, default: int, hi: int) -> int:
    raw = ctx.request.query.get(name)
    if raw is None:
        return default
    if not digits(raw) or not 0 <= int(raw) <= hi:
        raise InvalidInput(f"{name} must be an integer from 0 to {hi}", code="invalid_query")
    return int(raw)


@_handler("oplog.read", changes=False)
async def get_oplog(ctx: Ctx) -> web.StreamResponse:
    after = _query_int(ctx, "after", 0, 10**15)
    limit = _query_int(ctx, "limit", 100, 1000)
    items = await oplog.entries(ctx.pool, after=after, limit=limit)
    return json_response({"entries": items,
                          "next_after": items[-1]["seq"] if items else None})


@_handler("oplog.read", changes=False)
async def verify_oplog(ctx: Ctx) -> web.StreamResponse:
    return json_response((await oplog.verify(ctx.pool)).as_dict())


@_handler("job.read", changes=False)
async def get_job(ctx: Ctx) -> web.StreamResponse:
    job = await jobs.get_job(ctx.pool, ctx.request.match_info["id"])
    return json_response({**job, "progress": jobs.render_progress(job)})


# --- wiring -----------------------------------------------------------------------------------

def register(app: web.Application) -> None:
    """Add the admin routes and the job runner (closed with the application)."""
    node = app[NODE]

    async def runner_ctx(a: web.Application) -> AsyncIterator[None]:
        runner = a[CARD_JOBS]
        yield
        with contextlib.suppress(Exception):
            await runner.close()

    runner = node.components.get("card_jobs")
    app[CARD_JOBS] = runner if isinstance(runner, jobs.JobRunner) else jobs.JobRunner(
        node.pool, on_fenced=node.fenced)
    app.cleanup_ctx.append(runner_ctx)
    p = PREFIX
    r = app.router
    r.add_post(f"{p}/session", create_session)
    r.add_delete(f"{p}/session", delete_session)
    r.add_post(f"{p}/batches", order_batch)
    r.add_post(f"{p}/batches/{{id}}/resume", resume_batch)
    r.add_get(f"{p}/batches/{{id}}", get_batch)
    r.add_get(f"{p}/batches/{{id}}/new-card-file", get_new_card_file)
    r.add_post(f"{p}/batches/{{id}}/card-back-file", upload_card_back)
    r.add_post(f"{p}/batches/{{id}}/stock-in", stock_in)
    r.add_post(f"{p}/voids", create_void)
    r.add_post(f"{p}/voids/{{id}}/approve", approve_void)
    r.add_post(f"{p}/voids/{{id}}/reject", reject_void)
    r.add_post(f"{p}/stocktakes", create_stocktake)
    r.add_post(f"{p}/requests", create_request)
    r.add_get(f"{p}/requests/{{id}}", get_request)
    r.add_post(f"{p}/requests/{{id}}/approve", approve_request)
    r.add_post(f"{p}/requests/{{id}}/reject", reject_request)
    r.add_post(f"{p}/requests/{{id}}/issue", issue_request)
    r.add_post(f"{p}/sales", create_sale)
    r.add_post(f"{p}/cards/{{serial}}/unlock", unlock_card)
    r.add_get(f"{p}/cards/{{serial}}", get_card)
    r.add_get(f"{p}/inventory", get_inventory)
    r.add_get(f"{p}/reports/halls", get_hall_report)
    r.add_get(f"{p}/recharges", get_recharges)
    r.add_get(f"{p}/operation-log", get_oplog)
    r.add_get(f"{p}/operation-log/verify", verify_oplog)
    r.add_get(f"{p}/jobs/{{id}}", get_job)
