"""The switch's client for the marketing (billing) system's HTTP interface.

Errors say what the caller may do next:

- :class:`MarketingUnavailable`: connection refused or dropped, timeout, 5xx, or an answer that
  cannot be read. The outcome is unknown: retry with the same ``posting_id`` (postings are
  idempotent on it).
- :class:`MarketingRejected`: a 4xx other than 409. Permanent: retrying will not help.
- :class:`MarketingConflict`: 409, the ``posting_id`` was used before with other content.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple, Self, TypeVar, get_args
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import orjson

from switch.keepalive import AnswerTooLarge, KeepAlivePool
from switch.loop import SLICE, in_slices

log = logging.getLogger("gridpay.marketing")

#: the shape of the posting ids this switch makes (other systems post to the billing system
#: too): P payment, C card recharge, R reversal, then the 18-digit receipt number
OUR_POSTING_IDS: Final = re.compile(r"^[PCR][0-9]{18}$")

PostingKind = Literal["payment", "card_recharge", "reversal"]
AccountStatus = Literal["active", "closed"]
POSTING_KINDS: Final[frozenset[str]] = frozenset(get_args(PostingKind))
ACCOUNT_STATUSES: Final[frozenset[str]] = frozenset(get_args(AccountStatus))
_JSON_HEADERS: Final = {"Content-Type": "application/json", "Accept": "application/json"}
#: Largest answer the reconciliation reads: a whole day's postings come in one answer (the
#: contract pages nothing), about 250 bytes each, so this holds some four million of them.
DAY_LIST_MAX_ANSWER: Final = 1 << 30
#: The time a reconciliation's request may take (a day's postings, several MB).
RECON_TIMEOUT_S: Final = 60.0


class MarketingError(Exception):
    """Base of every error of the marketing-system client."""


class MarketingUnavailable(MarketingError):
    """No usable answer (refused, dropped, timed out, 5xx, unreadable): outcome unknown."""


class AnsweredForAnother(MarketingUnavailable):
    """A posting's answer names another posting: the connection it came on is out of step."""


class MarketingRejected(MarketingError):
    """The marketing system refused the request for good (4xx other than 409)."""

    def __init__(self, status: int, body: object) -> None:
        self.status = status
        self.body = body
        code = body.get("code") if isinstance(body, dict) else None
        super().__init__(f"marketing system rejected the request: {status} {code or ''}".strip())

    @property
    def code(self) -> str | None:
        """The problem's machine-readable ``code``, when the body carries one."""
        code = self.body.get("code") if isinstance(self.body, dict) else None
        return code if isinstance(code, str) else None


class MarketingConflict(MarketingError):
    """409: the posting id was already used with other content."""

    def __init__(self, body: object) -> None:
        self.status = 409
        self.body = body
        super().__init__("marketing system: posting_id already used with other content")


def _is_account_no(text: str) -> bool:
    return len(text) == 10 and text.isascii() and text.isdigit()


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    """A customer account as the marketing system shows it; ``bills`` are (period, fen)."""

    account_no: str
    name: str = field(repr=False)
    address: str = field(repr=False)
    status: AccountStatus
    arrears: int
    prepaid_balance: int
    bills: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        _check_account(self.account_no, self.status, self.arrears, self.prepaid_balance)


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountSummary:
    """An account as listed for the switch's mirror (everything but the address)."""

    account_no: str
    name: str = field(repr=False)
    status: AccountStatus
    # the contract asks the list for number, name and status only: a system that lists
    # balances too keeps the mirror's fallback answers whole; None when it does not
    arrears: int | None = None
    prepaid_balance: int | None = None
    bills: tuple[tuple[str, int], ...] | None = None

    def __post_init__(self) -> None:
        _check_account(self.account_no, self.status, self.arrears, self.prepaid_balance)


def _check_account(account_no: str, status: str, arrears: int | None,
                   prepaid: int | None) -> None:
    if not _is_account_no(account_no):
        raise ValueError("account_no must be 10 digits")
    if status not in ACCOUNT_STATUSES:
        raise ValueError(f"unknown account status {status!r}")
    if (arrears or 0) < 0 or (prepaid or 0) < 0:
        raise ValueError("arrears and prepaid balance cannot be negative")


@dataclass(frozen=True, slots=True, kw_only=True)
class Posting:
    """A credit to post: ``posting_id`` is the idempotency key, ``amount`` in fen."""

    posting_id: str
    account_no: str
    amount: int
    kind: PostingKind
    channel: str
    occurred_at: datetime
    original_posting_id: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.posting_id) <= 64:
            raise ValueError("posting_id must be 1 to 64 characters")
        if not _is_account_no(self.account_no):
            raise ValueError("account_no must be 10 digits")
        if not isinstance(self.amount, int) or isinstance(self.amount, bool) or self.amount <= 0:
            raise ValueError("amount must be a positive integer in fen")
        if self.kind not in POSTING_KINDS:
            raise ValueError(f"unknown posting kind {self.kind!r}")
        if (self.kind == "reversal") != (self.original_posting_id is not None):
            raise ValueError("original_posting_id is required for a reversal, and only for one")
        if not self.channel:
            raise ValueError("channel must not be empty")
        if self.occurred_at.utcoffset() is None:
            raise ValueError("occurred_at must be timezone-aware")

    @property
    def business_date(self) -> date:
        return self.occurred_at.date()

    def to_json(self) -> dict[str, object]:
        return _posting_json(self.posting_id, self.account_no, self.amount, self.kind,
                             self.channel, self.occurred_at, self.original_posting_id)


def _posting_json(posting_id: str, account_no: str, amount: int, kind: str, channel: str,
                  occurred_at: datetime, original_posting_id: str | None) -> dict[str, object]:
    """A posting as the contract's ``POST /postings`` body."""
    return {
        "posting_id": posting_id,
        "account_no": account_no,
        "amount": amount,
        "kind": kind,
        "original_posting_id": original_posting_id,
        "channel": channel,
        "occurred_at": occurred_at.isoformat(),
    }


class PostingResult(NamedTuple):
    """The marketing system's answer; ``replayed`` is true for a 200 (posted before).

    A named tuple, not a frozen dataclass: the relay makes one per forwarded posting, and a
    tuple is made in a fraction of the time."""

    posting_id: str
    arrears_after: int
    prepaid_balance_after: int
    replayed: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class PostingRecord:
    """A posting as listed for reconciliation, with the balances right after it."""

    posting: Posting
    business_date: date
    # the contract fixes no more of a listed posting than the posting itself: None when a
    # system leaves its balances out
    arrears_after: int | None = None
    prepaid_balance_after: int | None = None


def _bills(raw: Any) -> tuple[tuple[str, int], ...]:
    return tuple((_str(b["period"]), _int(b["amount"])) for b in raw)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("expected an integer")
    return value


def _account(body: Mapping[str, Any]) -> Account:
    return Account(
        account_no=_str(body["account_no"]),
        name=_str(body["name"]),
        address=_str(body["address"]),
        status=body["status"],
        arrears=_int(body["arrears"]),
        prepaid_balance=_int(body["prepaid_balance"]),
        bills=_bills(body["bills"]),
    )


T = TypeVar("T")


def _opt(body: Mapping[str, Any], name: str, read: Callable[[Any], T]) -> T | None:
    """A field the contract does not require: read when present, else None."""
    return None if body.get(name) is None else read(body[name])


def _summary(body: Mapping[str, Any]) -> AccountSummary:
    return AccountSummary(
        account_no=_str(body["account_no"]),
        name=_str(body["name"]),
        status=body["status"],
        arrears=_opt(body, "arrears", _int),
        prepaid_balance=_opt(body, "prepaid_balance", _int),
        bills=_opt(body, "bills", _bills),
    )


def _record(body: Mapping[str, Any], listed_for: date) -> PostingRecord:
    original = body.get("original_posting_id")
    day = _opt(body, "business_date", lambda v: date.fromisoformat(_str(v)))
    return PostingRecord(
        posting=Posting(
            posting_id=_str(body["posting_id"]),
            account_no=_str(body["account_no"]),
            amount=_int(body["amount"]),
            kind=body["kind"],
            original_posting_id=None if original is None else _str(original),
            channel=_str(body["channel"]),
            occurred_at=datetime.fromisoformat(_str(body["occurred_at"])),
        ),
        business_date=listed_for if day is None else day,
        arrears_after=_opt(body, "arrears_after", _int),
        prepaid_balance_after=_opt(body, "prepaid_balance_after", _int),
    )


_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")


def _skip_whitespace(text: str, at: int) -> int:
    """Where the JSON whitespace from `at` on ends."""
    m = _WHITESPACE.match(text, at)
    return at if m is None else m.end()


#: finds where a value ends; what the value is, orjson says (`_element`)
_ELEMENT_DECODER: Final = json.JSONDecoder()


async def _parse_in_turns(raw: bytes) -> Any:
    """The JSON document `raw`, read with a turn for the event loop every `SLICE` elements of
    its list (the document itself, or a member of it: the contract fixes no shape).

    A day's postings come as one document (the contract has no pages): hundreds of megabytes
    on a busy date, which one call to orjson took 0.6 s per 300 000 postings to parse, all
    that time holding the node's loop and the payments it answers. Here the standard
    library's scanner finds where each element of the list ends, and orjson parses that
    element: the values are orjson's, as they were (numbers beyond 64 bits, floats beyond a
    double's range and the rest of its rules), at about 3.1 times its cost, once a day."""
    try:
        text = raw.decode("utf-8")
        try:
            value, at = await _value_in_turns(text, _skip_whitespace(text, 0), 0)
        except RecursionError:  # nested deeper than the standard library's scanner goes:
            return orjson.loads(raw)  # orjson's own limit decides, as it did
        if _skip_whitespace(text, at) != len(text):
            raise ValueError("data after the document")
        return value
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int over the limit
        raise MarketingUnavailable("marketing system sent a body that is not JSON") from exc


async def _value_in_turns(text: str, at: int, depth: int) -> tuple[Any, int]:
    """The JSON value that starts at `at`, and where it ends. The document's object (depth 0)
    is read member by member and an array at depth 0 or 1 element by element, with turns for
    the loop; anything deeper is parsed whole."""
    if depth <= 1 and text.startswith("[", at):
        out: list[Any] = []
        at = _skip_whitespace(text, at + 1)
        if text.startswith("]", at):
            return out, at + 1
        while True:
            value, at = _element(text, at)
            out.append(value)
            if len(out) % SLICE == 0:
                await asyncio.sleep(0)
            at = _skip_whitespace(text, at)
            if text.startswith("]", at):
                return out, at + 1
            at = _after(text, at, ",")
    if depth == 0 and text.startswith("{", at):
        obj: dict[str, Any] = {}
        at = _skip_whitespace(text, at + 1)
        if text.startswith("}", at):
            return obj, at + 1
        while True:
            key, at = _element(text, at)
            if not isinstance(key, str):
                raise ValueError("an object's member names are strings")
            at = _after(text, _skip_whitespace(text, at), ":")
            obj[key], at = await _value_in_turns(text, at, depth + 1)
            at = _skip_whitespace(text, at)
            if text.startswith("}", at):
                return obj, at + 1
            at = _after(text, at, ",")
    return _element(text, at)


def _element(text: str, at: int) -> tuple[Any, int]:
    """The JSON value that starts at `at`, as orjson parses it, and where it ends (found by
    the standard library's scanner)."""
    _, end = _ELEMENT_DECODER.raw_decode(text, at)
    return orjson.loads(text[at:end]), end


def _after(text: str, at: int, separator: str) -> int:
    """Past `separator` at `at` and the whitespace after it (a ValueError if it is not there)."""
    if not text.startswith(separator, at):
        raise ValueError(f"expected {separator!r} at character {at}")
    return _skip_whitespace(text, at + 1)


def _decode(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    """The whole body, unless it is over `cap` bytes (then `AnswerTooLarge`)."""
    if response.content_length is not None and response.content_length > cap:
        raise AnswerTooLarge(f"an answer over {cap} bytes")
    parts: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > cap:
            raise AnswerTooLarge(f"an answer over {cap} bytes")
        parts.append(chunk)
    return b"".join(parts)


# what the ledger's bigint columns hold: a figure outside it (one the marketing system cannot
# mean) would make the whole batch's mark fail, again and again
_BIGINT_MIN, _BIGINT_MAX = -(2 ** 63), 2 ** 63 - 1


def check_base_url(url: str) -> None:
    """ValueError unless `url` is an http(s) URL with a host (the value is not echoed: it
    may carry a password)."""
    parts = urlsplit(url)
    try:
        port = parts.port  # ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        port = 0
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise ValueError("the billing system's URL must be http(s)://host[:port], with a port "
                         "from 1 to 65535")


def _unavailable(exc: BaseException) -> MarketingUnavailable:
    """What a failed request means to the caller: the outcome is unknown."""
    if isinstance(exc, AnswerTooLarge):
        error = MarketingUnavailable(f"marketing system sent {exc}")
    else:
        error = MarketingUnavailable(f"marketing system unreachable: {type(exc).__name__}")
    error.__cause__ = exc
    return error


#: A posting ready to send: its id and its JSON body (`encode_posting`).
EncodedPosting = tuple[str, bytes]


def encode_posting(*, posting_id: str, account_no: str, amount: int, kind: str, channel: str,
                   occurred_at: datetime, original_posting_id: str | None) -> bytes:
    """The JSON body of ``POST /postings``, as `Posting.to_json` gives it, built straight
    from the fields. For postings already checked when they were made (the relay's, read
    back from the outbox): the marketing system refuses a malformed one, and the relay
    files it as a dead letter."""
    return orjson.dumps(_posting_json(posting_id, account_no, amount, kind, channel,
                                      occurred_at, original_posting_id))


class MarketingClient:
    """Talks to the marketing system at ``base_url``; ``timeout`` (s) bounds each request,
    ``posting_timeout`` (default: ``timeout``) each posting's: an account lookup has a caller
    waiting, a posting only the relay, and a billing system slower than the lookup's timeout
    must still be able to take its postings."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 1.0,
        posting_timeout: float | None = None,
        session: aiohttp.ClientSession | None = None,
        connections: int = 16,
        pipeline: int = 1,
        max_answer: int = 16 << 20,
        lookup_connections: int = 32,
    ) -> None:
        posting_timeout = timeout if posting_timeout is None else posting_timeout
        if timeout <= 0 or posting_timeout <= 0 or max_answer < 1:
            raise ValueError("timeouts and max_answer must be positive")
        check_base_url(base_url)
        # an answer is held in memory whole: a larger one is refused as unreadable
        self._max_answer = max_answer
        self._connections = connections  # postings in flight at once (`post_many`)
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._post_timeout = aiohttp.ClientTimeout(total=posting_timeout)
        self._session = session
        self._owns_session = session is None
        # requests (one posting per payment, account lookups) go over kept-alive connections
        # read by httptools (switch/keepalive.py); aiohttp for https or a session given
        # postings may be pipelined (`pipeline` per connection, `connections` in flight in
        # all) on connections of their own, so that a live account lookup never waits
        # behind a batch of postings being made durable
        self._pool: KeepAlivePool | None = None
        self._post_pool: KeepAlivePool | None = None
        if session is None and self._base_url.startswith("http://"):
            # with pipelining (or a timeout of their own) the postings have connections of
            # their own, and the lookups at most `lookup_connections` (the relay's window is
            # not theirs to follow); otherwise postings and lookups share `connections`
            apart = pipeline > 1 or posting_timeout != timeout
            lookups = min(connections, lookup_connections) if apart else connections
            self._pool = KeepAlivePool(self._base_url, size=lookups, timeout_s=timeout,
                                       max_body=max_answer)
            self._post_pool = self._pool
            if apart:
                self._post_pool = KeepAlivePool(
                    self._base_url, size=-(-connections // pipeline),
                    timeout_s=posting_timeout, pipeline=pipeline, max_body=max_answer)

    @classmethod
    def for_reconciliation(cls, base_url: str) -> Self:
        """A client for the daily reconciliation, which reads whole days of postings: a
        request may take `RECON_TIMEOUT_S`, and an answer be up to `DAY_LIST_MAX_ANSWER`."""
        return cls(base_url, timeout=RECON_TIMEOUT_S, max_answer=DAY_LIST_MAX_ANSWER)

    @property
    def base_url(self) -> str:
        return self._base_url

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client made it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None
        if self._pool is not None:
            await self._pool.close()
        if self._post_pool is not None and self._post_pool is not self._pool:
            await self._post_pool.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: object = None,
        pool: KeepAlivePool | None = None,
        limit: aiohttp.ClientTimeout | None = None,
    ) -> tuple[int, bytes]:
        # a body given as bytes is JSON already (`encode_posting`)
        data = body if body is None or isinstance(body, bytes) else orjson.dumps(body)
        pool = pool or self._pool
        try:
            if pool is not None:
                query = f"?{urlencode(params)}" if params else ""
                status, raw = await pool.request(method, path + query, data)
            else:
                async with self._get_session().request(
                    method, self._base_url + path, params=params, data=data,
                    headers=_JSON_HEADERS, timeout=limit or self._timeout,
                ) as response:
                    raw = await _read_capped(response, self._max_answer)
                    status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:  # incl. ConnectionError
            raise _unavailable(exc) from exc
        return status, raw  # the callers hand any status they do not expect to `_refuse`

    @staticmethod
    def _refuse(status: int, raw: bytes) -> MarketingError:
        if status == 409:
            return MarketingConflict(_decode(raw))
        if status in (408, 425, 429) or status >= 500:
            # timeout, too early, too many, or the server's own failure: try again later
            return MarketingUnavailable(f"marketing system answered {status}")
        if 400 <= status < 500:
            return MarketingRejected(status, _decode(raw))
        return MarketingUnavailable(f"marketing system answered an unexpected {status}")

    @staticmethod
    def _parse(raw: bytes) -> Any:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise MarketingUnavailable("marketing system sent a body that is not JSON") from exc

    async def get_account(self, account_no: str) -> Account | None:
        """The account, or ``None`` when the marketing system does not know it."""
        if not _is_account_no(account_no):
            raise ValueError("account_no must be 10 digits")
        status, raw = await self._request("GET", f"/accounts/{quote(account_no)}")
        if status == 404:
            return None
        if status != 200:
            raise self._refuse(status, raw)
        try:
            account = _account(self._parse(raw))
        except (KeyError, TypeError, ValueError) as exc:
            raise MarketingUnavailable("marketing system sent a malformed account") from exc
        if account.account_no != account_no:  # never another customer's account
            raise MarketingUnavailable("marketing system answered for another account")
        return account

    async def list_accounts(
        self, after: str | None = None, limit: int = 1000
    ) -> tuple[list[AccountSummary], str | None]:
        """Up to ``limit`` accounts after ``after`` in account-number order, and the next cursor
        (``None`` at the end)."""
        params = {"limit": str(limit)}
        if after is not None:
            params["after"] = after
        status, raw = await self._request("GET", "/accounts", params=params)
        if status != 200:
            raise self._refuse(status, raw)
        try:
            body = self._parse(raw)
            # the contract fixes what a listed account says, not the page's shape: the list
            # itself, or an object with "accounts" and (optionally) "next_after"
            items = body if isinstance(body, list) else body["accounts"]
            summaries = [_summary(item) for item in items]
            if isinstance(body, dict) and "next_after" in body:
                next_after = None if body["next_after"] is None else _str(body["next_after"])
                if next_after is not None and not _is_account_no(next_after):
                    raise ValueError("next_after is not an account number")
            elif summaries and len(summaries) <= limit:
                # no cursor given: go on after the last account until a page comes back empty
                # (a system may cap its pages below our limit: a short page is no end)
                next_after = summaries[-1].account_no
            else:  # empty: the end; longer than asked: a system that does not page at all
                next_after = None
        except (KeyError, TypeError, ValueError) as exc:
            raise MarketingUnavailable("marketing system sent a malformed account list") from exc
        return summaries, next_after

    async def post(self, posting: Posting) -> PostingResult:
        """Credit ``posting``; safe to repeat with the same posting after MarketingUnavailable."""
        status, raw = await self._request("POST", "/postings", body=posting.to_json(),
                                          pool=self._post_pool, limit=self._post_timeout)
        return self._posting_result(posting.posting_id, status, raw)

    async def post_many(self, postings: Sequence[EncodedPosting]
                        ) -> list[PostingResult | MarketingError]:
        """Credit each posting (its id and its body from `encode_posting`), `connections` of
        them in flight at once; each one's result or error, in order. The errors are those
        `post` raises, and every posting is safe to repeat after `MarketingUnavailable`.

        The relay's path: the postings of a batch go out together over the pipelined
        connections, with no task per posting."""
        pool = self._post_pool
        if pool is None:  # aiohttp: one request each
            gate = asyncio.Semaphore(self._connections)

            async def one(posting_id: str, body: bytes) -> PostingResult | MarketingError:
                async with gate:
                    try:
                        status, raw = await self._request("POST", "/postings", body=body,
                                                          limit=self._post_timeout)
                        return self._posting_result(posting_id, status, raw)
                    except MarketingError as e:
                        return e

            return list(await asyncio.gather(*(one(p, b) for p, b in postings)))
        # Each answer is read as it comes: one that names another posting shows its pipelined
        # connection out of step (a server or a middlebox that answered one request twice),
        # and then no later answer on it can be trusted, a refusal (which names no posting)
        # least of all: the pool closes it and sends what it carried again elsewhere.
        read: list[PostingResult | MarketingError | None] = [None] * len(postings)

        def check(i: int, answer: tuple[int, bytes]) -> bool:
            try:
                read[i] = self._posting_result(postings[i][0], *answer)
            except AnsweredForAnother:
                return False
            except MarketingError as e:
                read[i] = e
            return True

        answers = await pool.request_many("POST", "/postings", [b for _, b in postings],
                                          window=self._connections, check=check)
        out: list[PostingResult | MarketingError] = []
        for answer, result in zip(answers, read, strict=True):
            if isinstance(answer, BaseException):
                out.append(_unavailable(answer))
            else:  # an answer the check took: it read it
                assert result is not None
                out.append(result)
        return out

    def _posting_result(self, posting_id: str, status: int, raw: bytes) -> PostingResult:
        if status not in (200, 201):
            raise self._refuse(status, raw)
        body = self._parse(raw)
        try:
            answered = body["posting_id"]
            arrears = body["arrears_after"]
            prepaid = body["prepaid_balance_after"]
        except (KeyError, TypeError) as exc:
            raise MarketingUnavailable("marketing system sent a malformed posting result") from exc
        if type(arrears) is not int or type(prepaid) is not int \
                or not (_BIGINT_MIN <= arrears <= _BIGINT_MAX) \
                or not (_BIGINT_MIN <= prepaid <= _BIGINT_MAX):  # not a bool, and storable
            raise MarketingUnavailable("marketing system sent a malformed posting result")
        if answered != posting_id:
            raise AnsweredForAnother("marketing system answered for another posting")
        return PostingResult(posting_id, arrears, prepaid, status == 200)

    async def postings_for_date(self, business_date: date) -> list[PostingRecord]:
        """Every posting of ``business_date``, in the order the marketing system accepted them."""
        status, raw = await self._request(
            "GET", "/postings", params={"date": business_date.isoformat()}
        )
        if status != 200:
            raise self._refuse(status, raw)
        body = await _parse_in_turns(raw)
        try:
            # the list itself, or an object with "postings" (the contract fixes no shape);
            # anything that cannot be listed is a malformed answer
            items = list(body if isinstance(body, list) else body["postings"])
        except (KeyError, TypeError) as exc:
            raise MarketingUnavailable("marketing system sent a malformed posting list") from exc
        out: list[PostingRecord] = []
        unread = 0
        # a day's list can hold hundreds of thousands: read with turns for the event loop
        async for item in in_slices(items):
            # a record that cannot be read is left out when it is another system's posting
            # (an id or a kind of its own), not the whole day; one that carries an id of our
            # shape refuses the list, as any malformed list is (reconciling without it would
            # report it missing, or hide a stray)
            try:
                out.append(_record(item, business_date))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                pid = item.get("posting_id") if isinstance(item, dict) else None
                if not isinstance(pid, str) or OUR_POSTING_IDS.fullmatch(pid):
                    raise MarketingUnavailable(
                        "marketing system sent a malformed posting list") from exc
                unread += 1
        if unread and not out:  # nothing readable at all: not a list of postings
            raise MarketingUnavailable("marketing system sent a malformed posting list")
        if unread:
            log.warning("postings of the marketing system's list left out: unreadable",
                        extra={"business_date": business_date.isoformat(), "count": unread})
        return out
