"""What the switch answers to each request on a bank or post-office link.

`LinkService.handle(link, body)` takes one frame body and returns the response body (or None
when nothing can be answered). No sockets here: the server feeds it frames, the tests can too.

Order of checks, for every request: decode (30) → sign-on (91) → institution (58) → MAC (63) →
content rules (30 / 12) → transaction type enabled (58) → the transaction itself.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from protocols.iso8583 import (
    Codec,
    DecodeError,
    EncodeError,
    Message,
    OriginalData,
    Tlv,
    ValidationError,
    validate_required,
)
from switch import db
from switch.business import BusinessCalendar
from switch.config import Institution
from switch.hsm_client import HsmError
from switch.links import iso_dedup_key
from switch.payments.accounts import Accounts, AccountsUnavailable, mask_name
from switch.payments.ledger import (
    CommitInterrupted,
    Committed,
    Duplicate,
    Fenced,
    LedgerError,
    NotReversible,
    PaymentRecord,
    PaymentRequest,
    PostingPath,
    fetch_duplicate,
    load_payment,
    reverse_in,
)

if TYPE_CHECKING:
    from switch.keys import KeyRing
    from switch.metrics import Metrics
    from switch.node import Node

log = logging.getLogger("gridpay.links")

# Fields a response echoes from its request (field 48 tag 01 is echoed separately).
ECHO = (3, 4, 7, 11, 12, 13, 32, 37, 41, 49)
RESPONSE_MTI = {"0800": "0810", "0200": "0210", "0420": "0430", "0421": "0430",
                "0500": "0510"}
MAC_MTIS = frozenset({"0210", "0430", "0510"})
#: signing the answer of a recorded payment or reversal: tries, and the pause before the next
MAC_ATTEMPTS = 3
MAC_RETRY_S = 0.2


def _validate(msg: Message, *, mac: bool = True) -> None:
    """The contract's content rules for a request (`validate_required`), as a `Decline`."""
    try:
        validate_required(msg, "request", mac=mac)
    except ValidationError as e:
        raise Decline(e.response_code, f"field {e.field}: {e.reason}") from None


def _tx_kind(msg: Message) -> str | None:
    """The transaction a request is (`TX_TYPE`); field 3 tells the 0200s apart, and a reversal
    is only of a bill payment (any other processing code is no transaction of ours)."""
    proc = msg.fields.get(3) if msg.mti in ("0200", "0420", "0421") else None
    return TX_TYPE.get((msg.mti, proc if isinstance(proc, str) else None))


def _recorded(req: Message, code: str) -> bool:
    """Whether an answer with `code` to `req` tells of a payment or reversal recorded in the
    ledger (such an answer may never be turned into a refusal)."""
    return code == "00" and _tx_kind(req) in ("payment", "reversal")


def _speakable(text: str, encoding: str) -> str:
    """`text` with what the link's text encoding cannot carry replaced by `?` (a customer name
    with a character outside GBK, say): the answer is still sent."""
    return text.encode(encoding, "replace").decode(encoding)


TX_TYPE = {("0200", "310000"): "inquiry", ("0200", "500000"): "payment",
           ("0420", "500000"): "reversal", ("0421", "500000"): "reversal",
           ("0500", None): "reconciliation"}


class LinkState(enum.StrEnum):
    CONNECTED = "connected"
    SIGNED_ON = "signed_on"
    SIGNED_OFF = "signed_off"
    CLOSED = "closed"


#: network management code (field 70) → the state it leads to, from each state
SIGN_TRANSITIONS: dict[tuple[LinkState, str], LinkState] = {
    (LinkState.CONNECTED, "001"): LinkState.SIGNED_ON,
    (LinkState.SIGNED_ON, "001"): LinkState.SIGNED_ON,
    (LinkState.SIGNED_OFF, "001"): LinkState.SIGNED_ON,
    (LinkState.SIGNED_ON, "002"): LinkState.SIGNED_OFF,
    (LinkState.CONNECTED, "002"): LinkState.SIGNED_OFF,
    (LinkState.SIGNED_OFF, "002"): LinkState.SIGNED_OFF,
}


@dataclass(slots=True)
class Link:
    """One connection's state, owned by the server."""

    dialect: str
    codec: Codec
    peer: str
    candidates: tuple[Institution, ...]
    #: binds the link to an institution chosen at sign-on, within that institution's
    #: connection limit (False: at the limit, not bound); the server's
    bind: Callable[[Institution], bool]
    institution: Institution | None = None
    state: LinkState = LinkState.CONNECTED
    opened_at: float = field(default_factory=time.monotonic)

    def network(self, code: str) -> bool:
        nxt = SIGN_TRANSITIONS.get((self.state, code))
        if nxt is None:
            return False
        self.state = nxt
        return True


class _Unanswered(Exception):
    """A request to leave without an answer: its outcome is not known (see `_payment`)."""


class Decline(Exception):  # noqa: N818 - a decision, not a failure
    """Answer with this response code (and nothing posted)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _tlv_01(msg: Message) -> str | None:
    t = msg.fields.get(48)
    if isinstance(t, Tlv):
        return t.get("01")
    return None


def _amount12(v: int) -> str:
    return f"{v:012d}"


class _Signed(Message):
    """An approval whose MAC was asked of the HSM while its payment was being committed:
    `mac_input` is what was signed, `mac` the HSM's answer (a task)."""

    __slots__ = ("mac_input", "mac")

    def __init__(self, resp: Message, mac_input: bytes, mac: asyncio.Task[bytes]) -> None:
        super().__init__(resp.mti, resp.fields)
        self.mac_input = mac_input
        self.mac = mac


def _retrieved(task: asyncio.Task[bytes]) -> None:
    """A signature nobody will use (the payment was not committed as numbered): its error,
    if any, is read here so that it is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True, slots=True)
class LinkContext:
    """What the service needs from the node."""

    accounts: Accounts
    ledger: PostingPath
    calendar: BusinessCalendar
    metrics: Metrics
    keyring: Callable[[], KeyRing | None]
    hsm_mac: Callable[[object, bytes], Coroutine[Any, Any, bytes]]
    hsm_verify: Callable[[object, bytes, bytes], Awaitable[bool]]
    epoch: Callable[[], int]
    on_fenced: Callable[[], Awaitable[None]]
    on_posted: Callable[[], None]
    pool: asyncpg.Pool
    max_amount: int


class LinkService:
    def __init__(self, ctx: LinkContext) -> None:
        self.ctx = ctx
        # made by the node on its loop, which is kept: asyncio.ensure_future() and
        # asyncio.get_running_loop() cost a getpid() system call each on Python 3.11
        self._loop = asyncio.get_running_loop()

    # -- entry point ---------------------------------------------------------------------

    async def handle(self, link: Link, body: bytes) -> bytes | None:
        started = time.perf_counter()
        codec = link.codec
        try:
            msg, mac_input = codec.decode_with_mac_input(body)
        except DecodeError as e:
            partial = e.partial
            log.info("malformed frame", extra={"dialect": link.dialect, "field": e.field,
                                                "reason": e.reason, "raw": e.masked_raw})
            self.ctx.metrics.link_errors.labels(link.dialect, "malformed").inc()
            if partial is None or 11 not in partial.fields:
                return None
            if partial.mti not in RESPONSE_MTI:  # an unknown request, and malformed too
                return self._unknown(codec, partial)
            resp = self._response(partial, "30")
            return await self._finish(link, partial, resp, started)
        if msg.mti not in RESPONSE_MTI:
            self.ctx.metrics.link_errors.labels(link.dialect, "unexpected_mti").inc()
            if 11 in msg.fields:
                return self._unknown(codec, msg)
            return None
        try:
            resp = await self._dispatch(link, msg, mac_input)
        except Decline as d:
            resp = self._response(msg, d.code)
            log.info("request declined", extra={"mti": msg.mti, "response_code": d.code,
                                                "reason": d.reason, "stan": msg.fields.get(11)})
        except _Unanswered as u:
            log.warning("request not answered: its outcome is not known",
                        extra={"mti": msg.mti, "stan": msg.fields.get(11), "reason": str(u)})
            return None
        except Exception as e:
            # anything unforeseen (a database error, ...) is a system malfunction, answered as
            # one: what failed before its commit recorded nothing
            log.error("request failed", extra={"mti": msg.mti, "stan": msg.fields.get(11),
                                               "error": type(e).__name__})
            resp = self._response(msg, "96")
        return await self._finish(link, msg, resp, started)

    @staticmethod
    def _unknown(codec: Codec, msg: Message) -> bytes | None:
        """A request of a message type outside the contract: 12 (invalid transaction). A
        response or advice we never asked for is dropped."""
        if len(msg.mti) != 4 or not msg.mti.isdigit() or msg.mti[2] not in "02":
            return None
        resp = Message(msg.mti[:2] + str(int(msg.mti[2]) + 1) + msg.mti[3],
                       {k: v for k, v in msg.fields.items() if k in (7, 11, 32)})
        resp.fields[39] = "12"
        try:
            return codec.encode(resp)
        except Exception:  # echo fields that cannot be encoded back: nothing to answer with
            return None

    async def _finish(self, link: Link, req: Message, resp: Message, started: float
                      ) -> bytes | None:
        inst = link.institution.id if link.institution else "unknown"
        code = str(resp.fields.get(39, "00"))
        try:
            out = await self._seal(link, req, resp, code)
        except EncodeError as e:
            # a value from elsewhere that the dialect cannot carry (arrears of 10^12 fen or
            # more from a billing system gone wrong, say): never left unanswered for that
            self.ctx.metrics.link_errors.labels(link.dialect, "unencodable_answer").inc()
            if _recorded(req, code):
                # a 96 would tell the bank it failed while the credit goes on
                log.error("recorded transaction's answer could not be encoded; not answered",
                          extra={"mti": req.mti, "stan": req.fields.get(11),
                                 "field": e.field, "reason": e.reason})
                return None
            log.error("answer could not be encoded: answered 96 instead",
                      extra={"mti": req.mti, "stan": req.fields.get(11),
                             "response_code": code, "field": e.field, "reason": e.reason})
            code = "96"
            out = await self._seal(link, req, self._response(req, code), code)
        m = self.ctx.metrics
        m.child(m.link_transactions, inst, req.mti, code).inc()
        m.child(m.link_latency, inst, req.mti).observe(time.perf_counter() - started)
        return out

    async def _seal(self, link: Link, req: Message, resp: Message, code: str) -> bytes | None:
        """`resp` encoded, with its MAC when the link asks for one."""
        codec = link.codec
        needs_mac = (resp.mti in MAC_MTIS and code != "63" and link.institution is not None
                     and link.institution.mac)
        if not needs_mac:
            return codec.encode(resp)
        assert link.institution is not None
        if type(resp) is _Signed:
            try:
                return codec.append_mac(resp.mac_input, await resp.mac)
            except (HsmError, OSError, KeyError, TimeoutError):
                # signed again below, with the retries a recorded payment gets
                self.ctx.metrics.link_errors.labels(link.dialect, "early_signature_failed").inc()
        ring = self.ctx.keyring()
        data = codec.mac_input(resp)
        recorded = _recorded(req, code)
        tries = MAC_ATTEMPTS if recorded else 1
        for attempt in range(1, tries + 1):
            try:
                if ring is None:
                    raise HsmError("68", "M6")
                mac = await self.ctx.hsm_mac(ring.mac_key(link.institution.id), data)
                return codec.append_mac(data, mac)
            except (HsmError, OSError, KeyError, TimeoutError):
                if attempt < tries:
                    await asyncio.sleep(MAC_RETRY_S * attempt)
        if recorded:
            # The payment or reversal is recorded: answering 96 would tell the bank it failed
            # while the credit goes on, and a bank that tries again under a new STAN would pay
            # twice. Say nothing: the bank retransmits (answered from the ledger, signed if the
            # HSM is back) or reverses on its timeout, and either way the books agree.
            log.error("recorded transaction's answer could not be signed; not answered",
                      extra={"mti": req.mti, "stan": req.fields.get(11),
                             "institution": link.institution.id})
            self.ctx.metrics.link_errors.labels(link.dialect, "unsigned_answer").inc()
            return None
        # nothing was recorded: the bank will reject an unsigned answer anyway, so say why
        resp.fields[39] = "96"
        return codec.encode(resp)

    def _response(self, req: Message, code: str, day: date | None = None) -> Message:
        """The response to `req` with `code`; field 15 is `day` (default: today's business
        date), but a 0510 echoes the date its 0500 asked about, when it could be read."""
        fields = {k: req.fields[k] for k in ECHO if k in req.fields}
        if 90 in req.fields and req.mti in ("0420", "0421"):
            fields[90] = req.fields[90]
        if 70 in req.fields and req.mti == "0800":
            fields[70] = req.fields[70]
        acct = _tlv_01(req)
        if acct is not None:
            fields[48] = Tlv.of(("01", acct))
        fields[39] = code
        if req.mti == "0500":
            if 15 in req.fields:  # the 0510 echoes the date asked about, declined or not
                fields[15] = req.fields[15]
        else:  # an 0810 too, declined or not: 15 is mandatory there
            cal = self.ctx.calendar
            fields[15] = cal.settlement_mmdd(day or cal.today())
        return Message(RESPONSE_MTI[req.mti], fields)

    # -- checks --------------------------------------------------------------------------

    async def _dispatch(self, link: Link, msg: Message, mac_input: bytes | None) -> Message:
        if msg.mti == "0800":
            return self._network(link, msg)
        if link.state is not LinkState.SIGNED_ON:
            raise Decline("91", "not signed on")
        inst = self._institution(link, msg)
        if inst.mac:
            await self._verify_mac(inst, msg, mac_input)
        _validate(msg, mac=inst.mac)
        rrn = msg.fields.get(37)
        if isinstance(rrn, str) and "|" in rrn:
            # the daily reconciliation file carries 37 as it came, between '|' separators
            raise Decline("30", "field 37 holds '|', which the reconciliation file cannot carry")
        kind = _tx_kind(msg)
        if kind is None:
            raise Decline("12", "unknown transaction")
        if kind not in inst.transactions:
            raise Decline("58", f"{kind} is not enabled for institution {inst.id}")
        if kind == "inquiry":
            return await self._inquiry(msg, link.codec.dialect.text_encoding)
        if kind == "payment":
            return await self._payment(inst, msg, link.codec)
        if kind == "reversal":
            return await self._reversal(inst, msg)
        return await self._reconciliation(inst, msg)

    def _institution(self, link: Link, msg: Message) -> Institution:
        f32 = msg.fields.get(32)
        if not isinstance(f32, str):
            raise Decline("30", "field 32 missing")
        if link.institution is not None:
            if link.institution.id != f32:
                raise Decline("58", "field 32 does not match this link's institution")
            return link.institution
        raise Decline("58", "this link has no institution")

    async def _verify_mac(self, inst: Institution, msg: Message, mac_input: bytes | None) -> None:
        mac = msg.fields.get(128 if 128 in msg.fields else 64)
        if mac_input is None or not isinstance(mac, bytes):
            raise Decline("63", "MAC missing")
        ring = self.ctx.keyring()
        try:
            if ring is None:
                raise HsmError("68", "M8")
            ok = await self.ctx.hsm_verify(ring.mac_key(inst.id), mac_input, mac)
        except (HsmError, OSError, TimeoutError):
            raise Decline("96", "HSM unavailable: MAC cannot be verified") from None
        except KeyError:
            raise Decline("96", "no MAC key for this institution") from None
        if not ok:
            self.ctx.metrics.link_errors.labels(inst.dialect, "bad_mac").inc()
            raise Decline("63", "MAC does not verify")

    # -- network management ---------------------------------------------------------------

    def _network(self, link: Link, msg: Message) -> Message:
        _validate(msg)  # 7, 11, 32 and 70 are mandatory in an 0800 (a 30 otherwise)
        code = msg.fields.get(70)
        f32 = msg.fields.get(32)
        assert isinstance(code, str) and isinstance(f32, str)
        if link.institution is None:
            match = [i for i in link.candidates if i.id == f32]
            if not match:
                raise Decline("58", "field 32 names no institution allowed on this link")
            # an address that several institutions share: the link is theirs, and counted
            # against their connection limit, from the sign-on on. An echo (or a sign-off)
            # before it is answered and takes no slot: it would lock the institution's real
            # connection out.
            if code == "001":
                if not link.bind(match[0]):
                    raise Decline("58", "the institution is at its connection limit")
                link.institution = match[0]
        elif link.institution.id != f32:
            raise Decline("58", "field 32 does not match this link's institution")
        if code == "301":
            return self._response(msg, "00")
        if not link.network(code):
            raise Decline("12", f"unknown network management code {code}")
        if link.institution is not None:  # a change of a bound link's state
            log.info("link state", extra={"institution": link.institution.id,
                                          "state": str(link.state), "peer": link.peer})
        return self._response(msg, "00")

    # -- inquiry --------------------------------------------------------------------------

    async def _inquiry(self, msg: Message, encoding: str) -> Message:
        acct = _tlv_01(msg)
        assert acct is not None
        try:
            view = await self.ctx.accounts.lookup(acct)
        except AccountsUnavailable:
            raise Decline("91", "marketing system and mirror both unavailable") from None
        if view is None:
            raise Decline("14", "no such account")
        if view.status != "active":
            raise Decline("57", "account closed")
        resp = self._response(msg, "00")
        resp.fields[4] = _amount12(view.arrears)
        resp.fields[48] = Tlv.of(("01", acct), ("02", _speakable(mask_name(view.name), encoding)),
                                 ("03", _amount12(view.arrears)),
                                 ("04", _amount12(view.prepaid_balance)),
                                 ("05", f"{min(len(view.bills), 99):02d}"))
        return resp

    # -- payment --------------------------------------------------------------------------

    async def _payment(self, inst: Institution, msg: Message, codec: Codec) -> Message:
        encoding = codec.dialect.text_encoding
        f = msg.fields
        acct = _tlv_01(msg)
        assert acct is not None
        amount = int(str(f[4]))
        stan, f7 = str(f[11]), str(f[7])
        key = iso_dedup_key(inst.id, stan, f7)
        content = orjson.dumps([f.get(3), f.get(4), acct, f.get(37)])
        req_hash = hashlib.sha256(content).digest()
        # A retransmission is answered before anything else, even if the rules changed since:
        # every decline below first looks the key up (`_decline`), and on the way to an
        # approval a key already taken comes back from the ledger as a duplicate (replayed
        # below), so the common case costs no extra database round trip.
        if amount <= 0 or amount > min(inst.max_amount, self.ctx.max_amount):
            return await self._decline(key, msg, req_hash, "13",
                                       "amount zero or above the limit")
        try:
            prof = await self.ctx.accounts.profile(acct)
        except AccountsUnavailable:
            return await self._decline(key, msg, req_hash, "91",
                                       "account cannot be checked now")
        if prof is None:
            return await self._decline(key, msg, req_hash, "14", "no such account")
        if prof.status != "active":
            return await self._decline(key, msg, req_hash, "57", "account closed")
        name, arrears = _speakable(mask_name(prof.name), encoding), prof.arrears

        def render(rec: object) -> tuple[int, bytes]:
            return 0, orjson.dumps({"02": name, "03": _amount12(arrears)})

        def approval(rec: PaymentRecord) -> Message:
            resp = self._response(msg, "00", rec.business_date)
            resp.fields[38] = rec.approval_code
            resp.fields[48] = Tlv.of(("01", acct), ("02", name), ("03", _amount12(arrears)),
                                     ("06", rec.receipt_no))
            return resp

        # The approval is signed while the payment is committed, not after: the HSM's round
        # trip (a few ms on a busy machine) then overlaps the commit's instead of adding to
        # it. It is sent only if the payment commits with the very record it was built from;
        # otherwise it is dropped unseen. The price: a request that turns out not to commit
        # (a retransmission answered from the ledger, a failed batch) costs one MAC for
        # nothing, so retransmissions cost the HSM two.
        signing: list[tuple[PaymentRecord, _Signed]] = []
        ring = self.ctx.keyring() if inst.mac else None

        def numbered(rec: PaymentRecord) -> None:
            assert ring is not None
            resp = approval(rec)
            data = codec.mac_input(resp)
            task = self._loop.create_task(self.ctx.hsm_mac(ring.mac_key(inst.id), data))
            task.add_done_callback(_retrieved)
            signing.append((rec, _Signed(resp, data, task)))

        preq = PaymentRequest(
            dedup_key=key, request_hash=req_hash, channel=inst.dialect, method="bank_transfer",
            account_no=acct, amount=amount, institution_id=inst.id, stan=stan, transmitted=f7,
            rrn=str(f.get(37, "")), terminal_id=str(f[41]) if 41 in f else None, render=render,
            numbered=numbered if ring is not None else None)
        try:
            outcome = await self.ctx.ledger.submit(preq)
        except Fenced:
            return await self._decline(key, msg, req_hash, "91",
                                       "this node is no longer active")
        except CommitInterrupted:
            # the switch stopped, or the database went away, while the commit was under way:
            # it may have happened, so a 96
            # could tell the bank "declined" of a payment that is credited. Say nothing: the
            # bank retransmits (answered from the ledger by the node that carries on) or
            # reverses on its timeout, and either way the books agree.
            raise _Unanswered("the commit was cut short (the switch stopping, or the database "
                              "going away)") from None
        except LedgerError:
            return await self._decline(key, msg, req_hash, "96",
                                       "the payment could not be recorded")
        if not isinstance(outcome, Committed):
            return await self._replay(msg, outcome, req_hash)
        rec = outcome.record
        self.ctx.on_posted()
        for numbered_rec, signed in signing:
            if numbered_rec is rec:
                return signed
        return approval(rec)

    async def _decline(self, key: str, msg: Message, req_hash: bytes, code: str,
                       reason: str) -> Message:
        """Decline with `code`, unless the key is already taken: then answer as before."""
        try:
            prior = await self._prior(key)
        except Exception:  # the database cannot answer: the decline stands
            prior = None
        if prior is not None:
            return await self._replay(msg, prior, req_hash)
        raise Decline(code, reason)

    async def _prior(self, key: str) -> Duplicate | None:
        return await fetch_duplicate(self.ctx.pool, key)

    async def _replay(self, msg: Message, prior: Duplicate, req_hash: bytes) -> Message:
        if prior.kind == "reversal_marker":
            raise Decline("94", "a reversal for this identity came first: declined")
        if prior.request_hash != req_hash or prior.payment_id is None:
            raise Decline("94", "same identity, different content")
        rec = await load_payment(self.ctx.pool, prior.payment_id)
        assert rec is not None
        extra = orjson.loads(prior.response) if prior.response else {}
        resp = self._response(msg, "00", rec.business_date)
        resp.fields[38] = rec.approval_code
        acct = _tlv_01(msg) or rec.account_no
        resp.fields[48] = Tlv.of(("01", acct), ("02", extra.get("02", "*")),
                                 ("03", extra.get("03", _amount12(0))), ("06", rec.receipt_no))
        return resp

    # -- reversal -------------------------------------------------------------------------

    async def _reversal(self, inst: Institution, msg: Message) -> Message:
        f = msg.fields
        try:
            orig = OriginalData.parse(str(f[90]))
        except ValueError:
            raise Decline("30", "field 90 is not 42 digits") from None
        if orig.mti != "0200" or not orig.names_acquirer(inst.id):
            raise Decline("12", "field 90 does not name a payment of this institution")
        key = iso_dedup_key(inst.id, orig.stan, orig.transmission)
        amount = int(str(f[4]))
        day = None  # the business date the reversal is booked on, for field 15
        marker_hash = hashlib.sha256(b"reversal:" + str(f[11]).encode()
                                     + str(f[7]).encode()).digest()
        try:
            async with self.ctx.pool.acquire() as con, con.transaction():
                await db.fence(con, self.ctx.epoch())
                inserted = await con.fetchval(
                    "INSERT INTO dedup_keys (key, kind, request_hash) VALUES ($1,"
                    " 'reversal_marker', $2) ON CONFLICT (key) DO NOTHING RETURNING true",
                    key, marker_hash)
                if inserted:
                    receipt = f"U{orig.stan}{orig.transmission}"
                    done = False
                else:
                    row = await con.fetchrow(
                        "SELECT kind, payment_id FROM dedup_keys WHERE key = $1", key)
                    assert row is not None  # the insert above conflicted with it
                    if row["kind"] == "reversal_marker":
                        receipt = f"U{orig.stan}{orig.transmission}"
                        done = False
                    else:
                        rec, done, day = await reverse_in(
                            con, row["payment_id"], calendar=self.ctx.calendar,
                            channel=inst.dialect,
                            epoch=self.ctx.epoch(), amount=amount, institution_id=inst.id,
                            stan=str(f[11]), transmitted=str(f[7]))
                        receipt = rec.receipt_no
                        if done:
                            self.ctx.accounts.forget(rec.account_no)
        except NotReversible as e:
            raise Decline("12", e.reason) from None
        except Exception as e:
            if db.is_fenced(e):
                await self.ctx.on_fenced()
                raise Decline("91", "this node is no longer active") from None
            raise
        if done:
            self.ctx.metrics.reversals.labels(inst.dialect).inc()
            self.ctx.on_posted()
        resp = self._response(msg, "00", day)
        resp.fields[48] = Tlv.of(("01", _tlv_01(msg) or ""), ("06", receipt))
        return resp

    # -- reconciliation -------------------------------------------------------------------

    async def _reconciliation(self, inst: Institution, msg: Message) -> Message:
        f = msg.fields
        try:
            day = self.ctx.calendar.date_from_mmdd(str(f[15]))
        except ValueError:
            raise Decline("30", "field 15 is not a date") from None
        ours = await institution_totals(self.ctx.pool, inst.id, day)
        theirs = (int(str(f[74])), int(str(f[75])), int(str(f[86])), int(str(f[87])))
        code = "00" if theirs == ours else "95"
        resp = self._response(msg, code)  # field 15 echoed
        resp.fields[74] = f"{ours[0]:010d}"
        resp.fields[75] = f"{ours[1]:010d}"
        resp.fields[86] = f"{ours[2]:016d}"
        resp.fields[87] = f"{ours[3]:016d}"
        return resp


async def institution_totals(pool: asyncpg.Pool, inst_id: str,
                             day: date) -> tuple[int, int, int, int]:
    """(payments count, reversals count, payments amount, reversals amount) of one date."""
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM payments WHERE institution_id = $1 AND business_date = $2)"
        "         AS n_pay,"
        "       (SELECT coalesce(sum(amount), 0) FROM payments"
        "         WHERE institution_id = $1 AND business_date = $2) AS a_pay,"
        "       (SELECT count(*) FROM reversals r WHERE r.institution_id = $1"
        "         AND r.business_date = $2) AS n_rev,"
        "       (SELECT coalesce(sum(p.amount), 0) FROM reversals r JOIN payments p"
        "         ON p.id = r.payment_id WHERE r.institution_id = $1 AND r.business_date = $2)"
        "         AS a_rev", inst_id, day)
    assert row is not None  # aggregates always give one row
    return int(row["n_pay"]), int(row["n_rev"]), int(row["a_pay"]), int(row["a_rev"])


def link_context(node: Node) -> LinkContext:
    comps = node.components
    hsm = comps["hsm"]

    def keyring() -> KeyRing | None:
        ring = comps.get("keyring")
        return ring

    forwarder = comps["forwarder"]
    return LinkContext(
        accounts=comps["accounts"], ledger=comps["ledger"], calendar=comps["calendar"],
        metrics=node.metrics, keyring=keyring, hsm_mac=hsm.generate_mac,
        hsm_verify=hsm.verify_mac, epoch=lambda: node.epoch, on_fenced=node.fenced,
        on_posted=forwarder.wake, pool=node.pool, max_amount=node.settings.business.max_amount,
    )
