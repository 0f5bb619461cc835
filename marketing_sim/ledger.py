"""The marketing system's books: accounts, postings and their allocation (no I/O).

Every account starts as seeded (:mod:`marketing_sim.customers`); only accounts that received a
posting get a mutable state.  A credit pays the oldest unpaid bills first, whole or in part, and
the rest becomes prepaid balance; the allocation is kept with the posting, so that a reversal
takes back exactly that: the amounts it paid on each bill become unpaid again, and its prepaid
part is removed.

Idempotency: a posting id seen before with the same content is a replay (the stored result is
returned, nothing is applied again); with other content it is a conflict.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final, Literal, get_args

from marketing_sim.customers import AccountStatus, Bill, CustomerBook

PostingKind = Literal["payment", "card_recharge", "reversal"]
POSTING_KINDS: Final[frozenset[str]] = frozenset(get_args(PostingKind))
MAX_AMOUNT: Final = 1_000_000_000_000
_POSTING_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_CHANNEL = re.compile(r"[\x21-\x7e]{1,64}")
_ACCOUNT_NO = re.compile(r"[0-9]{10}")


class LedgerError(Exception):
    """Base of the ledger's refusals; ``status`` is the HTTP status, ``code`` a stable name."""

    status: int = 400

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class InvalidPosting(LedgerError):
    """The posting is malformed or breaks a rule (400)."""

    status = 400


class UnknownAccount(LedgerError):
    """No such account (404)."""

    status = 404


class PostingConflict(LedgerError):
    """The posting id was used before with other content (409)."""

    status = 409


def _field(body: Mapping[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidPosting("invalid_field", f"{name} must be a {kind.__name__}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class PostingRequest:
    """A credit as the switch sends it; validated when built."""

    posting_id: str
    account_no: str
    amount: int
    kind: PostingKind
    original_posting_id: str | None
    channel: str
    occurred_at: datetime

    def __post_init__(self) -> None:
        if not _POSTING_ID.fullmatch(self.posting_id):
            raise InvalidPosting("invalid_field", "posting_id must be 1-64 of [A-Za-z0-9._:-]")
        if not _ACCOUNT_NO.fullmatch(self.account_no):
            raise InvalidPosting("invalid_field", "account_no must be 10 digits")
        if isinstance(self.amount, bool) or not 0 < self.amount <= MAX_AMOUNT:
            raise InvalidPosting("invalid_amount", "amount must be a positive integer in fen")
        if self.kind not in POSTING_KINDS:
            raise InvalidPosting("invalid_field", "kind must be payment, card_recharge or reversal")
        if self.kind == "reversal":
            if self.original_posting_id is None:
                raise InvalidPosting("invalid_field", "a reversal needs original_posting_id")
            if not _POSTING_ID.fullmatch(self.original_posting_id):
                raise InvalidPosting("invalid_field", "original_posting_id is malformed")
        elif self.original_posting_id is not None:
            raise InvalidPosting("invalid_field", "original_posting_id is only for a reversal")
        if not _CHANNEL.fullmatch(self.channel):
            raise InvalidPosting("invalid_field", "channel must be 1-64 printable characters")
        if self.occurred_at.utcoffset() is None:
            raise InvalidPosting("invalid_field", "occurred_at must carry a UTC offset")

    @classmethod
    def from_json(cls, body: object) -> PostingRequest:
        """Build from a decoded JSON body; unknown members are ignored."""
        if not isinstance(body, dict):
            raise InvalidPosting("invalid_body", "the body must be a JSON object")
        original = body.get("original_posting_id")
        if original is not None and not isinstance(original, str):
            raise InvalidPosting("invalid_field", "original_posting_id must be a string")
        occurred_text = _field(body, "occurred_at", str)
        try:
            occurred_at = datetime.fromisoformat(occurred_text)
        except ValueError:
            raise InvalidPosting("invalid_field", "occurred_at must be ISO 8601") from None
        return cls(
            posting_id=_field(body, "posting_id", str),
            account_no=_field(body, "account_no", str),
            amount=_field(body, "amount", int),
            kind=_field(body, "kind", str),
            original_posting_id=original,
            channel=_field(body, "channel", str),
            occurred_at=occurred_at,
        )

    @property
    def business_date(self) -> date:
        """The date part of ``occurred_at`` in its own offset."""
        return self.occurred_at.date()

    def content(self) -> tuple[object, ...]:
        """What must match for a repeat to be a replay (the offset counts, not only the instant)."""
        return (
            self.posting_id,
            self.account_no,
            self.amount,
            self.kind,
            self.original_posting_id,
            self.channel,
            self.occurred_at.isoformat(),
        )

    def to_json(self) -> dict[str, object]:
        return {
            "posting_id": self.posting_id,
            "account_no": self.account_no,
            "amount": self.amount,
            "kind": self.kind,
            "original_posting_id": self.original_posting_id,
            "channel": self.channel,
            "occurred_at": self.occurred_at.isoformat(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Allocation:
    """Where a credit went: amounts paid per bill period, and the prepaid part (all >= 0)."""

    bills: tuple[tuple[str, int], ...]
    prepaid: int

    def total(self) -> int:
        return sum(amount for _, amount in self.bills) + self.prepaid

    def to_json(self) -> dict[str, object]:
        return {
            "bills": [{"period": period, "amount": amount} for period, amount in self.bills],
            "prepaid": self.prepaid,
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Allocation:
        return cls(
            bills=tuple((str(b["period"]), int(b["amount"])) for b in body["bills"]),
            prepaid=int(body["prepaid"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PostedCredit:
    """An accepted posting with its allocation (for a reversal: what it took back)."""

    seq: int
    request: PostingRequest
    allocation: Allocation
    arrears_after: int
    prepaid_balance_after: int

    def result_json(self) -> dict[str, object]:
        """The body of the 201 (and of every replay)."""
        return {
            "posting_id": self.request.posting_id,
            "arrears_after": self.arrears_after,
            "prepaid_balance_after": self.prepaid_balance_after,
        }

    def record_json(self) -> dict[str, object]:
        """The posting as listed for reconciliation."""
        return {
            **self.request.to_json(),
            "business_date": self.request.business_date.isoformat(),
            "arrears_after": self.arrears_after,
            "prepaid_balance_after": self.prepaid_balance_after,
            "allocation": self.allocation.to_json(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountView:
    """An account as the marketing system shows it now."""

    account_no: str
    name: str
    address: str
    status: AccountStatus
    bills: tuple[Bill, ...]
    prepaid_balance: int

    @property
    def arrears(self) -> int:
        return sum(bill.amount for bill in self.bills)

    def to_json(self, *, with_address: bool = True) -> dict[str, object]:
        body: dict[str, object] = {"account_no": self.account_no, "name": self.name}
        if with_address:
            body["address"] = self.address
        body.update(
            status=self.status,
            arrears=self.arrears,
            prepaid_balance=self.prepaid_balance,
            bills=[{"period": b.period, "amount": b.amount} for b in self.bills],
        )
        return body


class _AccountState:
    """The changing part of an account: outstanding amount per bill, and prepaid balance."""

    __slots__ = ("outstanding", "prepaid")

    def __init__(self, bills: Iterable[Bill], prepaid: int) -> None:
        self.outstanding: dict[str, int] = {bill.period: bill.amount for bill in bills}
        self.prepaid = prepaid

    @property
    def arrears(self) -> int:
        return sum(self.outstanding.values())

    def allocate(self, amount: int) -> Allocation:
        paid: list[tuple[str, int]] = []
        left = amount
        for period in sorted(self.outstanding):
            if left == 0:
                break
            owed = self.outstanding[period]
            if owed > 0:
                take = min(owed, left)
                paid.append((period, take))
                left -= take
        return Allocation(bills=tuple(paid), prepaid=left)

    def apply(self, allocation: Allocation, sign: int) -> None:
        for period, amount in allocation.bills:
            self.outstanding[period] -= sign * amount
        self.prepaid += sign * allocation.prepaid

    def can_apply(self, allocation: Allocation, sign: int) -> bool:
        for period, amount in allocation.bills:
            owed = self.outstanding.get(period)
            if owed is None or owed - sign * amount < 0:
                return False
        return self.prepaid + sign * allocation.prepaid >= 0


class Ledger:
    """Accounts and postings in memory; the caller makes each accepted posting durable."""

    __slots__ = ("_book", "_states", "_postings", "_reversed_by", "_by_date", "_next_seq")

    def __init__(self, book: CustomerBook) -> None:
        self._book = book
        self._states: dict[str, _AccountState] = {}
        self._postings: dict[str, PostedCredit] = {}
        self._reversed_by: dict[str, str] = {}
        self._by_date: dict[date, list[PostedCredit]] = {}
        self._next_seq = 1

    @property
    def book(self) -> CustomerBook:
        return self._book

    def __len__(self) -> int:
        return len(self._postings)

    def _view(self, index: int) -> AccountView:
        customer = self._book.customer(index)
        state = self._states.get(customer.account_no)
        if state is None:
            bills, prepaid = customer.bills, customer.prepaid_balance
        else:
            bills = tuple(
                Bill(period=period, amount=owed)
                for period, owed in sorted(state.outstanding.items())
                if owed > 0
            )
            prepaid = state.prepaid
        return AccountView(
            account_no=customer.account_no,
            name=customer.name,
            address=customer.address,
            status=customer.status,
            bills=bills,
            prepaid_balance=prepaid,
        )

    def account(self, account_no: str) -> AccountView | None:
        index = self._book.index_of(account_no)
        return None if index is None else self._view(index)

    def accounts_after(self, after: str | None, limit: int) -> tuple[list[AccountView], str | None]:
        """Up to ``limit`` accounts after ``after`` in account-number order, and the next cursor."""
        start = 0 if after is None else self._book.first_index_after(after)
        stop = min(start + limit, self._book.count)
        views = [self._view(index) for index in range(start, stop)]
        next_after = views[-1].account_no if views and stop < self._book.count else None
        return views, next_after

    def posting(self, posting_id: str) -> PostedCredit | None:
        return self._postings.get(posting_id)

    def postings_on(self, business_date: date) -> list[PostedCredit]:
        return list(self._by_date.get(business_date, ()))

    def _state(self, account_no: str) -> _AccountState:
        state = self._states.get(account_no)
        if state is None:
            index = self._book.index_of(account_no)
            if index is None:
                raise UnknownAccount("account_not_found", "no such account")
            customer = self._book.customer(index)
            state = _AccountState(customer.bills, customer.prepaid_balance)
            self._states[account_no] = state
        return state

    def post(self, request: PostingRequest) -> tuple[PostedCredit, bool]:
        """Apply a posting; returns it and whether it is new (``False``: a replay)."""
        earlier = self._postings.get(request.posting_id)
        if earlier is not None:
            if earlier.request.content() != request.content():
                raise PostingConflict(
                    "posting_id_reused", "this posting_id was used with other content"
                )
            return earlier, False
        state = self._state(request.account_no)  # UnknownAccount when there is none
        if request.kind == "reversal":
            allocation = self._check_reversal(request)
            sign = -1
        else:
            allocation = state.allocate(request.amount)
            sign = 1
        state.apply(allocation, sign)
        posted = PostedCredit(
            seq=self._next_seq,
            request=request,
            allocation=allocation,
            arrears_after=state.arrears,
            prepaid_balance_after=state.prepaid,
        )
        self._record(posted)
        return posted, True

    def _check_reversal(self, request: PostingRequest) -> Allocation:
        assert request.original_posting_id is not None
        original = self._postings.get(request.original_posting_id)
        if original is None:
            raise InvalidPosting("original_not_found", "the original posting is unknown")
        if original.request.kind == "reversal":
            raise InvalidPosting("cannot_reverse_reversal", "a reversal cannot be reversed")
        if original.request.account_no != request.account_no:
            raise InvalidPosting("reversal_account_mismatch", "the original is on another account")
        if original.request.amount != request.amount:
            raise InvalidPosting(
                "reversal_amount_mismatch", "a reversal's amount must equal the original's"
            )
        if request.original_posting_id in self._reversed_by:
            raise InvalidPosting("already_reversed", "the original posting is already reversed")
        return original.allocation

    def _record(self, posted: PostedCredit) -> None:
        request = posted.request
        self._postings[request.posting_id] = posted
        if request.kind == "reversal" and request.original_posting_id is not None:
            self._reversed_by[request.original_posting_id] = request.posting_id
        self._by_date.setdefault(request.business_date, []).append(posted)
        self._next_seq = max(self._next_seq, posted.seq + 1)

    def restore(self, posted: PostedCredit) -> None:
        """Re-apply a posting read back from the journal (in its original order)."""
        if posted.request.posting_id in self._postings:
            raise InvalidPosting("journal_corrupt", "a posting id appears twice in the journal")
        sign = -1 if posted.request.kind == "reversal" else 1
        state = self._state(posted.request.account_no)
        if not state.can_apply(posted.allocation, sign):
            raise InvalidPosting("journal_corrupt", "the journal does not match the seeded books")
        state.apply(posted.allocation, sign)
        self._record(posted)
