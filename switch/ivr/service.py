"""The IVR's I/O shell: runs the dialog's effects against Redis, PostgreSQL, the HSM and the
marketing system, and keeps each call's turns in order.

Per input: take the call's lock, read the call, answer a retried input from what was stored,
ask the dialog what it needs (`plan`), do it (a `Fact`), let the dialog decide (`advance`),
save the call with a compare-and-set, release the lock.

Guarantees, and where they come from:

- A PIN is checked only by the HSM (`voucher_verify`); the switch sees the PIN block, which it
  passes on and never stores, logs or returns.
- A wrong PIN is counted in ONE fenced transaction: a row in `ivr_pin_failures` keyed by
  (call, hash of the PIN block), so that a retried input is not counted again; the card's count
  (`record_wrong_pin`, which locks the card at the limit); and the caller number's count over
  24 hours under a per-number advisory lock, which blocks the number at the limit
  (`ivr_ani_blocks`). Parallel calls cannot get around any of the three; a Redis flush lifts
  none of them.
- A card is redeemed at most once: a Redis lock on the serial keeps racing calls apart (fast
  path), and one fenced transaction records the payment with the key `card:<serial>` and moves
  the card sold → redeemed; if the card cannot move, the transaction is rolled back. The key
  makes a second redemption impossible whatever Redis says; a retry of the same call finds its
  own payment and gets the original result.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from switch import db
from switch.cards.states import (
    CARD_BY_SERIAL,
    CARD_COLUMNS,
    RECHARGE_GATE,
    RECHARGE_MOVE,
    RECHARGE_RESULT,
    CardState,
    card_view,
    expire_fenced,
    record_wrong_pin,
    refused_and_marked,
)
from switch.hsm_client import HsmError
from switch.ivr import dialog
from switch.ivr.dialog import (
    AccountFact,
    AniBlocked,
    Busy,
    Call,
    CardFact,
    Digits,
    Fact,
    Input,
    Limits,
    LookupAccount,
    LookupCard,
    NotFound,
    PinBlock,
    PinFact,
    Redeem,
    RedeemFact,
    Step,
    Timeout,
    VerifyPin,
)
from switch.ivr.store import (
    CARD_LOCK_PREFIX,
    CallStore,
    HeldCall,
    LockNotAcquired,
    RedisLock,
    StoreConflict,
    StoredCall,
)
from switch.payments.accounts import AccountsUnavailable, mask_name
from switch.payments.ledger import (
    Committed,
    Duplicate,
    PaymentRequest,
    fetch_duplicate,
    load_payment,
    record_statement,
)

if TYPE_CHECKING:
    from switch.node import Node

log = logging.getLogger("gridpay.ivr")

__all__ = ["CallBusy", "CallEnded", "CallExists", "CallNotFound", "InputKeyReused", "IvrError",
           "IvrService", "NodeFenced", "TurnAnswer"]


class IvrError(Exception):
    """Base of the IVR shell's errors (each maps to one HTTP problem)."""


class CallNotFound(IvrError):
    """No such call (never started, or forgotten after being idle)."""


class CallExists(IvrError):
    """A call with this id is already under way."""


class CallEnded(IvrError):
    """The call has ended; it takes no more input."""


class CallBusy(IvrError):
    """Another turn of this call is being processed; retry the same input."""


class InputKeyReused(IvrError):
    """The same Idempotency-Key came with another input."""


class NodeFenced(IvrError):
    """This node lost the lease: the write was refused; it is demoting itself."""


@dataclass(frozen=True, slots=True)
class TurnAnswer:
    turn: dict[str, Any]
    replayed: bool = False


_REDEEM_OUTCOMES = {"state:redeemed": "used", "state:locked": "locked",
                    "state:voided": "voided", "state:expired": "expired", "expired": "expired",
                    "unknown": "unknown"}

_RECHARGE = record_statement(gate=RECHARGE_GATE, ctes=RECHARGE_MOVE, result=RECHARGE_RESULT)
#: how old the copy of the blocked caller numbers may be at the start of a call
BLOCKS_REFRESH_S = 2.0
_BLOCKS_IN_FORCE = ("SELECT ani, extract(epoch FROM blocked_until) AS until FROM ivr_ani_blocks"
                    " WHERE blocked_until > now()")
# the PIN step's reads: is the caller number blocked, and the card (all NULL when unknown)
_PIN_STEP = (
    "SELECT (SELECT blocked_until > now() FROM ivr_ani_blocks WHERE ani = $2) AS ani_blocked,"  # noqa: S608 - a constant column list
    f" c.* FROM (VALUES (1)) AS one(x) LEFT JOIN (SELECT {CARD_COLUMNS} FROM cards"
    " WHERE serial = $1) AS c ON true")
_BLOCK_ANI = """
INSERT INTO ivr_ani_blocks (ani, failures, blocked_at, blocked_until)
VALUES ($1, $2, now(), now() + interval '24 hours')
ON CONFLICT (ani) DO UPDATE
   SET failures = EXCLUDED.failures, blocked_at = now(), blocked_until = EXCLUDED.blocked_until
RETURNING extract(epoch FROM blocked_until)
"""


class _KeyedLocks:
    """One asyncio lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            users = self._locks[key][1] - 1
            if users:
                self._locks[key] = (lock, users)
            else:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


def _recharge_key(effect: Redeem) -> str:
    """The idempotency key of a card's recharge: one per card, whichever call redeems it."""
    return f"card:{effect.serial}"


def _recharge_hash(call: Call, effect: Redeem) -> bytes:
    """What identifies a call's recharge of a card (the request hash of its payment)."""
    return hashlib.sha256(f"{call.call_id}|{effect.serial}|{effect.account_no}".encode()).digest()


async def _earlier_recharge(con: Any, earlier: Duplicate, request_hash: bytes
                            ) -> RedeemFact | None:
    """The card's recharge held by its key, when it is the one `request_hash` names (this
    call's own, committed earlier); None for another call's."""
    if earlier.request_hash != request_hash or earlier.payment_id is None:
        return None
    rec = await load_payment(con, earlier.payment_id)
    if rec is None:
        return None
    return RedeemFact(outcome="ok", amount=rec.amount, receipt_no=rec.receipt_no)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _input_hash(call_id: str, inp: Input, step: Step) -> str:
    """What identifies an input for replays. Digits at the PIN step are never hashed (they
    might be a PIN the IVR should not have sent in clear). Digits elsewhere keep 24 bits of a
    hash salted by the call: a caller who types the card's 12-digit PIN at the serial step
    leaves about 60 000 candidates in Redis, not one (a full hash of 10^12 values is undone in
    minutes). A retry with other digits under the same key still differs with odds of 1 in
    16 million, and then gets its earlier answer again, which is all a collision can do."""
    if isinstance(inp, PinBlock):
        return _pin_hash(inp)
    if isinstance(inp, Timeout):
        return _sha("t")
    if dialog.STEPS[step].entry == "pin":
        return _sha("d:<at pin step>")
    return "d:" + _sha(f"{call_id}|{inp.value}")[:6]


def _same_input(kept: str | None, call_id: str, inp: Input, step: Step) -> bool:
    """Whether `kept` identifies this input: as this version hashes it, or (digits kept by a
    version before the salted form, on a call alive across an upgrade) as that one did. The
    older form is only computed to compare, never stored."""
    if kept == _input_hash(call_id, inp, step):
        return True
    return (kept is not None and len(kept) == 64 and isinstance(inp, Digits)
            and dialog.STEPS[step].entry != "pin" and kept == _sha("d:" + inp.value))


# Every input of a call is remembered beside it, under its Idempotency-Key and (a PIN block)
# under its hash, with the step it was answered at and the turn it got: a late retry of an
# earlier input, after the call has moved on, gets that turn again instead of being taken
# as a new input (a "1" that once confirmed an account must not confirm a recharge later).
# They expire with the call.
def _key_field(key: str | None) -> str | None:
    return None if key is None else f"k:{key}"


def _pin_hash(block: PinBlock) -> str:
    return _sha("p:" + block.hex.lower())


def _pin_field(inp: Input) -> str | None:
    return f"p:{_pin_hash(inp)}" if isinstance(inp, PinBlock) else None


def hangup_turn(call_id: str) -> dict[str, Any]:
    return {"call_id": call_id, "step": Step.GOODBYE.value, "prompts": [],
            "collect": dialog.NOTHING.as_json(), "hangup": True}


class IvrService:
    """The IVR channel of one node (state shared with the other node through Redis)."""

    def __init__(self, node: Node, *, effect_timeout_s: float = 8.0,
                 turn_wait_s: float = 5.0) -> None:
        self.node = node
        s = node.settings.ivr
        self.limits = Limits(pin_tries_per_call=s.pin_tries_per_call,
                             pin_tries_per_card=s.pin_tries_per_card,
                             account_tries=s.account_tries_per_call)
        self.ani_limit = s.ani_failures_per_day
        self.store = CallStore(node.redis_pipe, idle_s=s.call_idle_s)
        self.effect_timeout_s = effect_timeout_s
        self.turn_wait_s = turn_wait_s
        # the blocked caller numbers, as a copy for the start of a call (see `_ani_blocked`)
        self.blocks_refresh_s = BLOCKS_REFRESH_S
        self._blocks: dict[str, float] = {}  # number -> blocked until (time.time())
        self._blocks_read_at = -1e9  # time.monotonic() of the last read
        self._blocks_reading: asyncio.Future[None] | None = None
        # the PIN step of one caller number, and of one card, one call at a time (see
        # `_verify_pin`)
        self._pin_steps = _KeyedLocks()

    # -- the three requests ---------------------------------------------------------------

    async def start_call(self, call: Call) -> TurnAnswer:
        start_hash = _sha(f"{call.ani}|{call.dnis}|{call.lang}")
        async with self._held(call.call_id) as held:
            stored = held.stored
            if stored is not None:
                if stored.start_hash == start_hash and stored.version == 1:
                    return TurnAnswer(stored.turn, replayed=True)  # a retried start
                raise CallExists(call.call_id)
            blocked = await self._ani_blocked(call.ani)
            call, turn = dialog.start(call, ani_blocked=blocked)
            doc = turn.as_json(call.call_id)
            await self._save(StoredCall(call=call, turn=doc, start_hash=start_hash), held)
            self.node.metrics.child(self.node.metrics.ivr_turns, turn.step.value).inc()
            return TurnAnswer(doc)

    async def send(self, call_id: str, inp: Input, idempotency_key: str | None) -> TurnAnswer:
        # what this input was answered with, if it came before: by its key, and a PIN block
        # by itself (never the same twice: 8 random bytes), whichever input of the call it was
        key_field = _key_field(idempotency_key)
        pin_field = _pin_field(inp)
        asked = tuple(f for f in (key_field, pin_field) if f is not None)
        async with self._held(call_id, asked) as held:
            stored = held.stored
            if stored is None:
                raise CallNotFound(call_id)
            ihash = _input_hash(call_id, inp, stored.call.step)
            earlier = dict(zip(asked, held.fields, strict=True))
            # An input answered before gets the turn it got then. Its answer kept beside the
            # call comes first: the call's own last turn may have moved on since (a hang-up
            # replaces it with the closing turn, and a confirmation's retry must still hear
            # its result).
            keyed = earlier.get(key_field) if key_field is not None else None
            if keyed is not None:
                prior = orjson.loads(keyed)
                # judged as it was when first answered (digits hash differently at the PIN
                # step)
                if not _same_input(prior["h"], call_id, inp, Step(prior["s"])):
                    raise InputKeyReused(call_id)
                return TurnAnswer(prior["t"], replayed=True)
            pinned = earlier.get(pin_field) if pin_field is not None else None
            if pinned is not None:
                return TurnAnswer(orjson.loads(pinned)["t"], replayed=True)
            # a call saved by a version that kept only its last input's answer (none is left
            # call_idle_s after an upgrade: this and the input_* fields can then go)
            if idempotency_key is not None and stored.input_key == idempotency_key:
                at = Step(stored.input_step) if stored.input_step else stored.call.step
                if not _same_input(stored.input_hash, call_id, inp, at):
                    raise InputKeyReused(call_id)
                return TurnAnswer(stored.turn, replayed=True)
            if isinstance(inp, PinBlock) and stored.input_hash == ihash:
                return TurnAnswer(stored.turn, replayed=True)
            if stored.call.ended:
                raise CallEnded(call_id)
            call = stored.call
            effect = dialog.plan(call, inp, self.limits)
            fact = await self._perform(effect, call, ihash) if effect is not None else None
            call, turn = dialog.advance(call, inp, fact, self.limits)
            doc = turn.as_json(call_id)
            step = stored.call.step.value
            new = dataclasses.replace(stored, call=call, turn=doc, input_key=idempotency_key,
                                      input_hash=ihash, input_step=step)
            answer = orjson.dumps({"h": ihash, "s": step, "t": doc})
            fields = tuple((f, answer) for f in asked)
            try:
                await self.store.save(new, release=held, fields=fields)
            except StoreConflict:
                if not (isinstance(fact, RedeemFact) and fact.outcome == "ok"):
                    raise CallBusy(call_id) from None
                # The recharge is committed: the caller must hear its result even though the
                # call's state vanished meanwhile (a Redis flush or restart). Put it back.
                log.warning("call state lost after a committed recharge; answering anyway",
                            extra={"call_id": call_id})
                with contextlib.suppress(Exception):
                    await self.store.save(dataclasses.replace(new, version=0), fields=fields)
            self.node.metrics.child(self.node.metrics.ivr_turns, turn.step.value).inc()
            return TurnAnswer(doc)

    async def hang_up(self, call_id: str) -> TurnAnswer:
        async with self._held(call_id) as held:
            stored = held.stored
            if stored is None:
                raise CallNotFound(call_id)
            if stored.hung_up:
                return TurnAnswer(stored.turn, replayed=True)
            doc = hangup_turn(call_id)
            await self._save(dataclasses.replace(stored, call=dialog.hang_up(stored.call),
                                                 turn=doc, hung_up=True), held)
            self.node.metrics.ivr_turns.labels("hangup").inc()
            return TurnAnswer(doc)

    # -- plumbing -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _held(self, call_id: str, fields: tuple[str, ...] = ()
                    ) -> AsyncIterator[HeldCall]:
        """The call's turn lock, and the call (and `fields` beside it) read under it
        (`CallBusy` if another turn does not finish in time). Turns of one call run one at a
        time."""
        try:
            held = await self.store.hold(call_id, self.turn_wait_s, fields=fields)
        except LockNotAcquired:
            raise CallBusy(call_id) from None
        try:
            yield held
        finally:
            await self.store.release(held)  # nothing to do when the save gave it back

    async def _save(self, stored: StoredCall, held: HeldCall) -> None:
        """Save the call and give its turn lock back, in one round trip."""
        try:
            await self.store.save(stored, release=held)
        except StoreConflict:
            raise CallBusy(stored.call.call_id) from None

    async def _ani_blocked(self, ani: str) -> bool:
        """Whether the caller number is blocked, at the start of a call: from a copy of the
        blocks read at most `blocks_refresh_s` ago (one query for every call in that time, not
        one per call). A block this node sets is in the copy at once; one set by the other node
        reaches it within `blocks_refresh_s`, and until then the PIN step, which always asks the
        database, refuses the number. A failed read counts as "not blocked" for the same
        reason."""
        if time.monotonic() - self._blocks_read_at >= self.blocks_refresh_s:
            try:
                await self._read_blocks()
            except Exception as e:
                log.warning("caller-number blocks not read", extra={"error": type(e).__name__})
        until = self._blocks.get(ani)
        return until is not None and until > time.time()

    async def _read_blocks(self) -> None:
        """Read the blocks in force; concurrent callers share one read."""
        reading = self._blocks_reading
        if reading is not None:
            await asyncio.shield(reading)
            return
        reading = self._blocks_reading = asyncio.get_running_loop().create_future()
        try:
            rows = await self.node.pool.fetch(_BLOCKS_IN_FORCE, timeout=2.0)
            self._blocks = {r["ani"]: float(r["until"]) for r in rows}
            self._blocks_read_at = time.monotonic()
            reading.set_result(None)
        except BaseException as e:
            # the callers that share the read see it fail (not cancelled: only this one was)
            reading.set_exception(e if isinstance(e, Exception)
                                  else RuntimeError("the read of the blocks was interrupted"))
            reading.exception()  # retrieved here; each sharer gets it raised as well
            raise
        finally:
            self._blocks_reading = None

    async def _perform(self, effect: dialog.Effect, call: Call, ihash: str) -> Fact:
        try:
            async with asyncio.timeout(self.effect_timeout_s):
                if isinstance(effect, LookupAccount):
                    return await self._lookup_account(effect.account_no)
                if isinstance(effect, LookupCard):
                    return await self._lookup_card(effect.serial)
                if isinstance(effect, VerifyPin):
                    return await self._verify_pin(call, effect, ihash)
                return await self._redeem(call, effect)
        except NodeFenced:
            raise
        except Exception as e:
            if db.is_fenced(e):
                await self.node.fenced()
                raise NodeFenced(call.call_id) from None
            if isinstance(effect, Redeem):
                # the failure may have come after the recharge committed (a timeout while the
                # card lock was given back, say): the caller must hear that it is done
                done = await self._own_recharge(call, effect)
                if done is not None:
                    return done
            log.warning("IVR effect failed; the caller is told the service is busy",
                        extra={"call_id": call.call_id, "effect": type(effect).__name__,
                               "error": type(e).__name__})
            return Busy()

    async def _own_recharge(self, call: Call, effect: Redeem) -> RedeemFact | None:
        """This call's recharge of the card, if it was committed; None if not (or unknown)."""
        try:
            async with asyncio.timeout(self.effect_timeout_s):
                earlier = await fetch_duplicate(self.node.pool, _recharge_key(effect))
                if earlier is None:
                    return None
                return await _earlier_recharge(self.node.pool, earlier,
                                               _recharge_hash(call, effect))
        except Exception:
            return None

    async def _lookup_account(self, account_no: str) -> Fact:
        try:
            view = await self.node.components["accounts"].lookup(account_no)
        except AccountsUnavailable:
            return Busy()
        if view is None:
            return NotFound()
        return AccountFact(account_no=view.account_no, name=mask_name(view.name),
                           status=view.status, arrears=view.arrears,
                           prepaid=view.prepaid_balance)

    async def _lookup_card(self, serial: str) -> Fact:
        row = await self.node.pool.fetchrow(CARD_BY_SERIAL, serial)
        if row is None:
            return NotFound()
        return await self._card_fact(row)

    async def _card_fact(self, row: Any) -> CardFact:
        """What a card read from `row` tells the caller. A card found past its expiry and
        not redeemed is marked `expired` on the way, as every other path does (fenced: a
        refusal is handled as any effect's, by `_perform`)."""
        card = card_view(row)
        if card.state is CardState.EXPIRED and row["state"] != CardState.EXPIRED.value:
            async with self.node.pool.acquire() as con:  # the active node's write only
                await expire_fenced(con, [card.serial], "ivr", self.node.epoch)
        return CardFact(state=card.state.value, face_value=card.face_value)

    async def _verify_pin(self, call: Call, effect: VerifyPin, ihash: str) -> Fact:
        # A guess is checked against the limits, verified and counted before the next guess
        # on the same caller number or the same card is even checked: guesses sent in
        # parallel calls would otherwise all reach the HSM before any was counted, and a right
        # one among them would be told so after the card had locked or the number had been
        # blocked. Only the active node takes PIN steps, so locks of this process suffice.
        # (Always the number first, then the card: no two steps wait for each other.)
        async with self._pin_steps.hold("ani:" + call.ani), \
                self._pin_steps.hold("card:" + effect.serial):
            return await self._verify_pin_locked(call, effect, ihash)

    async def _verify_pin_locked(self, call: Call, effect: VerifyPin, ihash: str) -> Fact:
        # the strict caller-number check and the card in one round trip; an error raises,
        # which refuses the PIN
        row = await self.node.pool.fetchrow(_PIN_STEP, effect.serial, call.ani)
        if row is None:  # cannot happen: the statement always returns its one row
            return Busy()
        if row["ani_blocked"]:
            return AniBlocked()
        if row["serial"] is None:
            return NotFound()
        card = card_view(row)
        if card.state is not CardState.SOLD:
            return await self._card_fact(row)
        ring = self.node.components.get("keyring")
        if ring is None:
            return Busy()
        try:
            match = await self.node.components["hsm"].voucher_verify(
                ring.ivr_pin_key, ring.vvk, effect.serial, effect.pin_block.hex.upper(),
                card.tag)
        except (HsmError, OSError, TimeoutError) as e:
            log.warning("HSM did not verify a card PIN; nothing counted",
                        extra={"call_id": call.call_id, "error": type(e).__name__})
            return Busy()
        if match:
            return PinFact(match=True)
        return await self._count_wrong_pin(call, effect.serial, bytes.fromhex(ihash))

    async def _count_wrong_pin(self, call: Call, serial: str, attempt: bytes) -> Fact:
        node = self.node
        blocked_until: float | None = None  # set when this attempt blocks the number
        fact: Fact
        async with node.pool.acquire() as con, con.transaction():
            await db.fence(con, node.epoch)
            # one caller number at a time: count-and-block is atomic across parallel calls
            await db.lock_name(con, "ivr-ani:" + call.ani)
            fresh = await con.fetchval(
                "INSERT INTO ivr_pin_failures (call_id, attempt, ani, serial)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true",
                call.call_id, attempt, call.ani, serial)
            # the caller number's count, whatever became of the card meanwhile: every wrong PIN
            # from the number counts towards its block
            failures = int(await con.fetchval(
                "SELECT count(*) FROM ivr_pin_failures"
                " WHERE ani = $1 AND at > now() - interval '24 hours'", call.ani))
            blocked = failures >= self.ani_limit
            if blocked and fresh:
                blocked_until = float(await con.fetchval(_BLOCK_ANI, call.ani, failures))
                log.warning("caller number blocked for 24 hours after wrong PINs",
                            extra={"call_id": call.call_id, "failures": failures})
            card = await con.fetchrow(
                "SELECT state, face_value, failed_pin_count FROM cards WHERE serial = $1"
                " FOR UPDATE", serial)
            if card is None:
                fact = NotFound()
            elif card["state"] != CardState.SOLD.value:
                # locked (or redeemed) by another call meanwhile: not counted on the card
                if card["state"] == CardState.LOCKED.value and not fresh:
                    fact = PinFact(match=False, card_failures=int(card["failed_pin_count"]),
                                   card_locked=True, ani_blocked=blocked)  # a retry
                elif blocked:
                    fact = AniBlocked()
                else:
                    fact = CardFact(state=card["state"], face_value=int(card["face_value"]))
            else:
                count, locked = int(card["failed_pin_count"]), False
                if fresh:
                    count, locked = await record_wrong_pin(
                        con, serial, self.limits.pin_tries_per_card, actor="ivr",
                        call_id=call.call_id)
                if locked:
                    log.warning("card locked after wrong PINs", extra={"call_id": call.call_id})
                fact = PinFact(match=False, card_failures=count, card_locked=locked,
                               ani_blocked=blocked, ani_left=self.ani_limit - failures)
        if blocked_until is not None:  # committed: the copy read at call starts has it at once
            self._blocks[call.ani] = blocked_until
        return fact

    async def _redeem(self, call: Call, effect: Redeem) -> Fact:
        lock = RedisLock(self.node.redis_pipe, f"{CARD_LOCK_PREFIX}{effect.serial}", ttl_ms=10000)
        try:
            async with lock.hold(wait_s=3.0):
                return await self._redeem_locked(call, effect)
        except LockNotAcquired:
            return Busy()

    async def _redeem_locked(self, call: Call, effect: Redeem) -> Fact:
        node = self.node
        ledger = node.components["ledger"]
        request_hash = _recharge_hash(call, effect)
        request = PaymentRequest(
            kind="card_recharge", dedup_key=_recharge_key(effect), request_hash=request_hash,
            channel="ivr", method="card", account_no=effect.account_no,
            amount=effect.face_value, card_serial=effect.serial, caller=call.ani)
        fact: Fact
        async with node.pool.acquire() as con:
            # one statement, fenced by this node's epoch: the payment, its key and outbox row,
            # and the card's move, all or nothing (one round trip instead of four)
            outcome = await ledger.record_one(con, request, _RECHARGE, effect.serial,
                                              effect.face_value, "ivr")
            if outcome is None:  # the card was not redeemable: nothing written
                async with con.transaction():  # a card past its date is marked, fenced
                    await db.fence(con, node.epoch)
                    refused = await refused_and_marked(con, effect.serial, "ivr")
                said = _REDEEM_OUTCOMES.get(refused.reason, "busy")
                return Busy() if said == "busy" else RedeemFact(outcome=said)
            if not isinstance(outcome, Committed):
                # this call's own redemption, committed before its answer was lost; or used
                own = await _earlier_recharge(con, outcome, request_hash)
                return own if own is not None else RedeemFact(outcome="used")
        rec = outcome.record
        fact = RedeemFact(outcome="ok", amount=rec.amount, receipt_no=rec.receipt_no)
        node.metrics.redemptions.inc()
        node.components["forwarder"].wake()
        log.info("card redeemed", extra={"call_id": call.call_id, "receipt_no": rec.receipt_no,
                                         "amount": rec.amount})
        return fact
