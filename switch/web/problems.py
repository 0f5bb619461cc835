"""RFC 9457 problem details: every HTTP error the switch gives has a stable `code`."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import orjson
from aiohttp import web

from switch import db

log = logging.getLogger("gridpay.http")
T = TypeVar("T")

PROBLEM_TYPE = "https://gridpay.example/problems/"
CONTENT_TYPE = "application/problem+json"

_TITLES = {
    400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
    405: "Method not allowed", 408: "Request timeout", 409: "Conflict", 413: "Payload too large",
    415: "Unsupported media type", 417: "Expectation failed", 422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal error", 503: "Service unavailable", 504: "Gateway timeout",
}


class Problem(Exception):
    """Raise anywhere in a handler; rendered as application/problem+json."""

    def __init__(self, status: int, code: str, detail: str, *, title: str | None = None,
                 headers: dict[str, str] | None = None, close: bool = False,
                 **extra: object) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or _TITLES.get(status, "Error")
        self.headers = headers or {}
        self.close = close  # the connection is closed after the answer
        self.extra = extra

    def body(self) -> dict[str, object]:
        return {"type": PROBLEM_TYPE + self.code.replace("_", "-"), "title": self.title,
                "status": self.status, "detail": self.detail, "code": self.code, **self.extra}

    def response(self) -> web.Response:
        resp = web.Response(status=self.status, body=orjson.dumps(self.body()),
                            content_type=CONTENT_TYPE, headers=self.headers)
        if self.close:
            resp.force_close()
        return resp


def no_longer_active() -> Problem:
    """503 `standby` for a request this node began as the active one and may no longer finish
    (the lease moved on): nothing was done, and the caller retries on the active node."""
    return Problem(503, "standby", "this node is no longer active; retry on the active node",
                   headers={"Retry-After": "1"})


def problem_for(request: web.Request, e: Exception) -> web.StreamResponse:
    """The problem+json answer for an exception out of a handler (re-raises an HTTP redirect
    or success, which aiohttp answers itself)."""
    if isinstance(e, Problem):
        return e.response()
    if isinstance(e, web.HTTPException):
        if e.status < 400:
            raise e
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            e.status, "http_error")
        # the path is not echoed: it may hold what was pasted in the wrong place (a key)
        detail = {404: "no resource at this path",
                  405: "this method is not allowed on this resource"}.get(e.status, e.reason)
        # a 405 says which methods the resource takes (RFC 9110 requires it)
        allow = e.headers.get("Allow") if e.status == 405 else None
        return Problem(e.status, code, detail,
                       headers={"Allow": allow} if allow is not None else None).response()
    # PostgreSQL down or out of reach, or a connection to another service this request needs
    # failing or timing out (db.unavailable takes OSError and TimeoutError): wait and retry
    if db.unavailable(e):
        log.warning("request not completed: a service it needs is unavailable",
                    extra={"path": request.path, "error": type(e).__name__})
        return Problem(503, "unavailable", "a service this request needs (the database, "
                       "Redis, the HSM or the billing system) is unavailable; retry shortly (a "
                       "request that changes something may or may not have taken effect: "
                       "look before repeating one that has no key of its own)",
                       headers={"Retry-After": "2"}).response()
    log.exception("unhandled error in HTTP handler", extra={"path": request.path})
    return Problem(500, "internal_error",
                   "the request could not be completed; nothing was changed unless a "
                   "later GET shows otherwise").response()


#: how long a request's body may take to arrive (or, for a file sent in chunks, how long the
#: next chunk may take): a client that announces a body and stops sending would otherwise
#: hold its connection, and the handler waiting for it, for ever
BODY_TIMEOUT_S = 30.0


async def read_within(reading: Awaitable[T]) -> T:
    """`reading` (a read of the request's body), or 408 `request_timeout` when the client
    has not sent it within `BODY_TIMEOUT_S` (the connection is then closed)."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            return await reading
    except TimeoutError:
        raise Problem(408, "request_timeout",
                      f"the request's body did not arrive within {BODY_TIMEOUT_S:g} s; "
                      "send it again whole", close=True) from None


async def json_body(request: web.Request, max_bytes: int = 65536, *,
                    fields_checked: bool = False) -> dict[str, object]:
    """The request's JSON object, or a 400/415 problem that says what is wrong. A NUL
    character anywhere is refused (`invalid_text`), unless `fields_checked`: the caller checks
    every field and key itself, with codes that name the field."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise Problem(413, "payload_too_large", f"the body must be at most {max_bytes} bytes")
    ctype = request.content_type
    if ctype not in ("application/json", "application/problem+json"):
        raise Problem(415, "unsupported_media_type", "send the body as application/json")
    if (request.charset or "utf-8").lower() not in ("utf-8", "utf8"):
        # JSON between systems is UTF-8 (RFC 8259): a body declared in another charset was
        # read as UTF-8 all the same, so a name or a reference in it came out wrong
        raise Problem(415, "unsupported_media_type",
                      "send the JSON body in UTF-8: Content-Type application/json without a "
                      "charset, or with charset=utf-8")
    # a body that came whole with its headers (the common case) cannot keep anyone waiting:
    # no timer for it
    raw = await (request.read() if request.content.is_eof()
                 else read_within(request.read()))
    if len(raw) > max_bytes:
        raise Problem(413, "payload_too_large", f"the body must be at most {max_bytes} bytes")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        # orjson refuses a number beyond a double's range (an integer of 310 digits, say),
        # which is valid JSON: read such a body exactly, so that its fields are judged for
        # what they are (an amount over the limit is a 422, not a malformed body)
        doc = exactly(raw) if "infinity" in e.msg else None
        if doc is None:
            raise Problem(400, "malformed_json",
                          f"the body is not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict):
        raise Problem(400, "malformed_json", "the body must be a JSON object")
    if _names_twice(raw, doc):
        # which of the two counts is a guess, and a proxy or gateway in front may have taken
        # the other one: {"amount": 100, "amount": 100000}
        raise Problem(400, "malformed_json", "a member name appears twice in one object of "
                      "the body; send each once")
    # JSON can spell a NUL character only as this escape
    if not fields_checked and b"\\u0000" in raw and _has_nul(doc):
        raise Problem(400, "invalid_text", "text in the body must not contain NUL (\\u0000) "
                      "characters")
    return doc


#: digits beyond which an integer read by `exactly` is kept only as "too large": Python
#: refuses to convert more than 4 300, and no field takes more than a few dozen
_MAX_INT_DIGITS = 40
_TOO_LARGE: int = 10**_MAX_INT_DIGITS


def _bounded_int(text: str) -> int:
    if len(text) - text.startswith("-") <= _MAX_INT_DIGITS:
        return int(text)
    return -_TOO_LARGE if text.startswith("-") else _TOO_LARGE


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python's json takes them


def exactly(raw: bytes, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None
            ) -> object:
    """`raw` parsed with integers of any length (kept as they are up to 40 digits, larger
    ones as 10^40 with their sign), objects made by `object_pairs_hook` when given; None when
    it is not JSON after all."""
    try:
        return json.loads(raw, parse_int=_bounded_int, parse_constant=_no_constant,
                          object_pairs_hook=object_pairs_hook)
    except (ValueError, RecursionError):
        return None


def _parts(doc: object) -> Iterator[object]:
    """Every object, array, string and number of a parsed JSON document (member names not
    included), walked with a stack, not recursion: orjson takes bodies 1 024 levels deep."""
    todo = [doc]
    while todo:
        item = todo.pop()
        yield item
        if isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)


_NAME_END = re.compile(rb'"[ \t\n\r]*:')


def _names_twice(raw: bytes, doc: object) -> bool:
    """Whether an object of the document `raw` (parsed: `doc`, where a repeated name kept its
    last value) names a member twice. Every member name in `raw` ends with a quote, maybe
    whitespace, and a colon, so as many of those as the parsed members means no name was
    repeated (the common case, one scan); more (a repeat, or a string holding such text)
    are told apart by reading the body again, member by member."""
    members = sum(len(item) for item in _parts(doc) if isinstance(item, dict))
    if len(_NAME_END.findall(raw)) == members:
        return False
    repeated = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeated
        out = dict(items)
        repeated = repeated or len(out) != len(items)
        return out

    # not JSON to the standard library (orjson read it): the finer reading is not to be had
    return exactly(raw, pairs) is not None and repeated


def _has_nul(doc: object) -> bool:
    """Whether a NUL character is in any string (key or value) of a parsed JSON document:
    PostgreSQL stores none in text or jsonb, so such a body would fail deep inside a
    handler instead of being refused here."""
    return any((isinstance(item, str) and "\x00" in item)
               or (isinstance(item, dict) and any("\x00" in k for k in item))
               for item in _parts(doc))


def one_header(request: web.Request, name: str, code: str) -> str | None:
    """The value of header `name`, None when absent; sent more than once, a 400 `code` (which
    of them counts would be a guess)."""
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise Problem(400, code, f"send one {name} header, not several")
    return values[0] if values else None


def unknown_fields(names: set[str], allowed: str) -> str:
    """The detail of a refusal of unknown members: how many, and the ones allowed. The names
    sent are not echoed (a secret pasted as a member name would come back)."""
    return f"{len(names)} unknown field(s): the body takes {allowed} only"


def json_response(doc: object, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json",
                        headers=headers)
