"""The IVR channel's HTTP API (`/ivr/v1`): validation, authentication, and the problem each
error becomes. The dialog and its effects live in `switch.ivr.dialog` and `switch.ivr.service`.

Requests:

- `POST /ivr/v1/calls` `{"call_id", "ani", "dnis", "lang"}` → 201 and the first turn (the same
  start retried before any input: 200, the same turn, `Idempotent-Replayed: true`);
- `POST /ivr/v1/calls/{call_id}/input` with exactly one of `{"digits"}`, `{"pin_block"}`,
  `{"event": "timeout"}` → 200 and the next turn. An optional `Idempotency-Key` header makes a
  retried input safe: the same key and input get the stored turn again;
- `DELETE /ivr/v1/calls/{call_id}` → 200 and a closing turn (the caller hung up).

`call_id` is 1 to 64 of `A-Z a-z 0-9 . _ : -`; `ani` and `dnis` 1 to 20 digits; `digits` 1 to
32 of `0-9 * #`; `pin_block` 32 hex characters (an AES format-4 block). Nothing in an error body
echoes an input.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from redis.exceptions import RedisError

from switch.ivr.dialog import Call, Digits, Input, PinBlock, Timeout
from switch.ivr.service import (
    CallBusy,
    CallEnded,
    CallExists,
    CallNotFound,
    InputKeyReused,
    IvrService,
    NodeFenced,
    TurnAnswer,
)
from switch.redis_pipe import RedisPipeError
from switch.web.app import require_active
from switch.web.payments import authenticate
from switch.web.problems import (
    Problem,
    json_body,
    json_response,
    no_longer_active,
    one_header,
    unknown_fields,
)

if TYPE_CHECKING:
    from switch.node import Node

__all__ = ["IVR_CHANNELS", "IVR_OPENAPI", "register"]

IVR_CHANNELS = frozenset({"ivr"})
_CALL_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_NUMBER = re.compile(r"^[0-9]{1,20}$")
_DIGITS = re.compile(r"^[0-9*#]{1,32}$")
_PIN_BLOCK = re.compile(r"^[0-9A-Fa-f]{32}$")
# wide enough for the recommended `<call_id>-<n>` with any call_id (up to 64 characters)
_IDEM_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")
_MAX_BODY = 4096

T = TypeVar("T")


def _svc(node: Node) -> IvrService:
    svc = node.components["ivr"]
    assert isinstance(svc, IvrService)
    return svc


def _call_id(request: web.Request) -> str:
    call_id = request.match_info["call_id"]
    if not _CALL_ID.fullmatch(call_id):
        raise Problem(400, "invalid_call_id",
                      "call_id must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'")
    return call_id


def parse_start(body: dict[str, object]) -> Call:
    unknown = set(body) - {"call_id", "ani", "dnis", "lang"}
    if unknown:
        raise Problem(400, "unknown_field",
                      unknown_fields(unknown, "call_id, ani, dnis and lang"))
    call_id, ani, dnis, lang = (body.get(k) for k in ("call_id", "ani", "dnis", "lang"))
    if not isinstance(call_id, str) or not _CALL_ID.fullmatch(call_id):
        raise Problem(400, "invalid_call_id",
                      "call_id must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'")
    if not isinstance(ani, str) or not _NUMBER.fullmatch(ani):
        raise Problem(400, "invalid_ani", "ani must be the caller's number: 1 to 20 digits")
    if not isinstance(dnis, str) or not _NUMBER.fullmatch(dnis):
        raise Problem(400, "invalid_dnis", "dnis must be the number called: 1 to 20 digits")
    if lang not in ("zh", "en"):
        raise Problem(400, "invalid_lang", "lang must be 'zh' or 'en'")
    assert isinstance(lang, str)
    return Call(call_id=call_id, ani=ani, dnis=dnis, lang=lang)


def parse_input(body: dict[str, object]) -> Input:
    kinds = set(body) & {"digits", "pin_block", "event"}
    unknown = set(body) - {"digits", "pin_block", "event"}
    if unknown:
        raise Problem(400, "unknown_field",
                      unknown_fields(unknown, "one of digits, pin_block or event"))
    if len(kinds) != 1:
        raise Problem(400, "invalid_input",
                      "send exactly one of 'digits', 'pin_block' or 'event'")
    if "digits" in body:
        digits = body["digits"]
        if not isinstance(digits, str) or not _DIGITS.fullmatch(digits):
            raise Problem(400, "invalid_digits",
                          "digits must be 1 to 32 characters of 0-9, '*' and '#'")
        return Digits(digits)
    if "pin_block" in body:
        block = body["pin_block"]
        if not isinstance(block, str) or not _PIN_BLOCK.fullmatch(block):
            raise Problem(400, "invalid_pin_block",
                          "pin_block must be 32 hexadecimal characters (an AES format-4 PIN "
                          "block)")
        return PinBlock(block)
    if body["event"] != "timeout":
        raise Problem(400, "invalid_event", "the only event is 'timeout'")
    return Timeout()


def _idempotency_key(request: web.Request) -> str | None:
    key = one_header(request, "Idempotency-Key", "idempotency_key_invalid")
    if key is not None and not _IDEM_KEY.fullmatch(key):
        raise Problem(400, "idempotency_key_invalid",
                      "Idempotency-Key must be 1 to 100 characters of A-Z, a-z, 0-9, '.', "
                      "'_', ':', '-'")
    return key


async def _run(work: Awaitable[T]) -> T:
    try:
        return await work
    except CallNotFound:
        raise Problem(404, "call_not_found",
                      "no such call (never started, or forgotten after being idle)") from None
    except CallExists:
        raise Problem(409, "call_exists", "a call with this call_id is already under way") \
            from None
    except CallEnded:
        raise Problem(409, "call_ended", "the call has ended and takes no more input") from None
    except CallBusy:
        raise Problem(409, "turn_in_progress",
                      "another input of this call is being processed; retry the same input",
                      headers={"Retry-After": "1"}) from None
    except InputKeyReused:
        raise Problem(422, "idempotency_key_reused",
                      "this Idempotency-Key was used with another input") from None
    except NodeFenced:
        raise no_longer_active() from None
    except (RedisError, RedisPipeError, OSError):
        raise Problem(503, "unavailable", "call state is unavailable; retry shortly",
                      headers={"Retry-After": "1"}) from None


def _answer(ans: TurnAnswer, status: int = 200) -> web.Response:
    if ans.replayed:
        return json_response(ans.turn, 200, headers={"Idempotent-Replayed": "true"})
    return json_response(ans.turn, status)


async def start_call(request: web.Request) -> web.Response:
    node = require_active(request)
    await authenticate(request, IVR_CHANNELS)
    call = parse_start(await json_body(request, _MAX_BODY, fields_checked=True))
    return _answer(await _run(_svc(node).start_call(call)), 201)


async def send_input(request: web.Request) -> web.Response:
    node = require_active(request)
    await authenticate(request, IVR_CHANNELS)
    call_id = _call_id(request)
    key = _idempotency_key(request)
    inp = parse_input(await json_body(request, _MAX_BODY, fields_checked=True))
    return _answer(await _run(_svc(node).send(call_id, inp, key)))


async def hang_up(request: web.Request) -> web.Response:
    node = require_active(request)
    await authenticate(request, IVR_CHANNELS)
    call_id = _call_id(request)
    return _answer(await _run(_svc(node).hang_up(call_id)))


def register(app: web.Application) -> None:
    app.router.add_post("/ivr/v1/calls", start_call)
    app.router.add_post("/ivr/v1/calls/{call_id}/input", send_input)
    app.router.add_delete("/ivr/v1/calls/{call_id}", hang_up)


# --- OpenAPI -----------------------------------------------------------------------------------

def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {
        "schema": {"$ref": "#/components/schemas/Problem"}}}}


def _turn_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/IvrTurn"}}}}


_CALL_ID_PARAM: dict[str, Any] = {
    "name": "call_id", "in": "path", "required": True,
    "schema": {"type": "string", "pattern": _CALL_ID.pattern}}
_IDEM: dict[str, Any] = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "makes a retried input safe: the same key and input get the same turn",
    "schema": {"type": "string", "pattern": _IDEM_KEY.pattern}}
_COMMON_ERRORS: dict[str, Any] = {
    "400": _err("Malformed request"), "401": _err("Missing or unknown API key"),
    "403": _err("Key of another channel than ivr"), "503": _err("Standby node or unavailable"),
}

IVR_OPENAPI: dict[str, Any] = {
    "paths": {
        "/ivr/v1/calls": {"post": {
            "operationId": "ivrStartCall", "summary": "A call starts: the first turn",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/IvrCallStart"}}}},
            "responses": {"201": _turn_response("The first turn"),
                          "200": _turn_response("The same start again: the same first turn"),
                          "409": _err("The call id is in use"), **_COMMON_ERRORS}}},
        "/ivr/v1/calls/{call_id}/input": {"post": {
            "operationId": "ivrInput", "summary": "What the caller entered: the next turn",
            "parameters": [_CALL_ID_PARAM, _IDEM],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/IvrInput"}}}},
            "responses": {"200": _turn_response("The next turn"),
                          "404": _err("No such call"),
                          "409": _err("Call ended, or another input in progress"),
                          "422": _err("Idempotency-Key reused with another input"),
                          **_COMMON_ERRORS}}},
        "/ivr/v1/calls/{call_id}": {"delete": {
            "operationId": "ivrHangUp", "summary": "The caller hung up",
            "parameters": [_CALL_ID_PARAM],
            "responses": {"200": _turn_response("The closing turn"),
                          "404": _err("No such call"), **_COMMON_ERRORS}}},
    },
    "schemas": {
        "IvrCallStart": {
            "type": "object", "additionalProperties": False,
            "required": ["call_id", "ani", "dnis", "lang"],
            "properties": {"call_id": {"type": "string", "pattern": _CALL_ID.pattern},
                           "ani": {"type": "string", "pattern": _NUMBER.pattern},
                           "dnis": {"type": "string", "pattern": _NUMBER.pattern},
                           "lang": {"type": "string", "enum": ["zh", "en"]}}},
        "IvrInput": {"oneOf": [
            {"type": "object", "additionalProperties": False, "required": ["digits"],
             "properties": {"digits": {"type": "string", "pattern": _DIGITS.pattern}}},
            {"type": "object", "additionalProperties": False, "required": ["pin_block"],
             "properties": {"pin_block": {"type": "string", "pattern": _PIN_BLOCK.pattern,
                                          "description": "ISO 9564 format 4 under the IVR "
                                                         "PIN key, card serial as PAN"}}},
            {"type": "object", "additionalProperties": False, "required": ["event"],
             "properties": {"event": {"type": "string", "enum": ["timeout"]}}}]},
        "IvrTurn": {
            "type": "object", "required": ["call_id", "step", "prompts", "collect", "hangup"],
            "properties": {
                "call_id": {"type": "string"}, "step": {"type": "string"},
                "prompts": {"type": "array", "items": {
                    "type": "object", "required": ["id", "text"],
                    "properties": {"id": {"type": "string"}, "text": {"type": "string"}}}},
                "collect": {"type": "object",
                            "required": ["kind", "min", "max", "terminator", "timeout_s"],
                            "properties": {"kind": {"enum": ["digits", "pin", "none"]},
                                           "min": {"type": "integer"},
                                           "max": {"type": "integer"},
                                           "terminator": {"type": ["string", "null"]},
                                           "timeout_s": {"type": "integer"}}},
                "hangup": {"type": "boolean"}}},
    },
}
