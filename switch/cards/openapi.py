"""OpenAPI 3.1 path items of the admin API, generated from one table (merged into
`/v1/openapi.json` by the HTTP layer). Schemas are inline so that the fragment stands alone;
authentication (`Authorization: Bearer <token>` from `POST /admin/v1/session`) is described
in each operation."""

from __future__ import annotations

from typing import Any

_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}
_SERIAL: dict[str, Any] = {"type": "string", "pattern": "^[0-9]{16}$"}
_RANGE: dict[str, Any] = {"type": "object", "required": ["first", "last"],
                          "properties": {"first": _SERIAL, "last": _SERIAL,
                                         "count": _INT}}
_CARDS: dict[str, Any] = {"serials": {"type": "array", "items": _SERIAL},
                          "ranges": {"type": "array", "items": _RANGE}}
_OBJ: dict[str, Any] = {"type": "object", "additionalProperties": True}
_JOB: dict[str, Any] = {
    "type": "object", "required": ["id", "kind", "state", "done", "total"],
    "properties": {"id": {"type": "string", "format": "uuid"}, "kind": _STR,
                   "object_id": {"type": ["string", "null"]},
                   "state": {"enum": ["queued", "running", "succeeded", "failed"]},
                   "done": _INT, "total": _INT, "percent": {"type": "number"},
                   "error": {"type": ["string", "null"]}, "result": {},
                   "progress": _STR}}
_ACCEPTED: dict[str, Any] = {"type": "object", "properties": {"batch_id": _INT, "job": _JOB}}
_PROBLEM: dict[str, Any] = {
    "type": "object", "required": ["type", "title", "status", "code"],
    "properties": {"type": _STR, "title": _STR, "status": _INT, "detail": _STR, "code": _STR}}
_BATCH: dict[str, Any] = {
    "type": "object",
    "properties": {"id": _INT, "face_value": _INT, "quantity": _INT,
                   "expiry": {"type": "string", "format": "date"}, "manufacturer": _STR,
                   "status": {"enum": ["generating", "ordered", "failed", "reconciled",
                                       "stocked"]},
                   "first_serial": _SERIAL, "last_serial": _SERIAL,
                   "counts": {"type": "object", "additionalProperties": _INT}}}
_RECON: dict[str, Any] = {
    "type": "object",
    "properties": {"batch_id": _INT, "expected": _INT, "received": _INT, "matched": _INT,
                   "voided_before": _INT, "expired": _INT,
                   "counts": {"type": "object", "additionalProperties": _INT},
                   "discrepancies": {"type": "array", "items": {
                       "type": "object", "properties": {
                           "serial": _STR, "detail": _STR,
                           "kind": {"enum": ["missing", "unexpected", "damaged",
                                             "face_value_changed", "duplicate"]}}}}}}


def _body(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": required, "properties": props}}}}


_TEXT_BODY: dict[str, Any] = {"required": True,
                              "content": {"text/plain": {"schema": {"type": "string"}}}}

# (method, path, summary, roles, request body, success status, success schema)
_OPS: tuple[tuple[str, str, str, str, dict[str, Any] | None, str, dict[str, Any]], ...] = (
    ("post", "/session", "Log in: a bearer token for the other calls", "anyone",
     _body({"username": _STR, "password": _STR}, ["username", "password"]), "201",
     {"type": "object", "properties": {"token": _STR, "token_type": _STR,
                                       "expires_at": _STR, "user": _OBJ}}),
    ("post", "/batches", "Order a batch (PINs generated in the HSM; a job)", "card_admin",
     _body({"face_value": _INT, "quantity": {"type": "integer", "minimum": 1,
                                             "maximum": 1000000},
            "expiry": {"type": "string", "format": "date"}, "manufacturer": _STR},
           ["face_value", "quantity", "manufacturer"]), "201", _BATCH),
    ("get", "/batches/{id}", "A batch with its counts per state", "card_admin, approver, "
     "storekeeper, auditor", None, "200", _BATCH),
    ("get", "/batches/{id}/new-card-file", "The new-card file (docs/card-files.md)",
     "card_admin", None, "200", {"type": "string"}),
    ("post", "/batches/{id}/card-back-file", "Upload the card-back file; the reconciliation",
     "card_admin", _TEXT_BODY, "200", _RECON),
    ("post", "/batches/{id}/stock-in", "Stock in the matched cards at the warehouse",
     "card_admin", None, "200", _OBJ),
    ("post", "/batches/{id}/resume", "Generate the rest of a batch whose order was cut off "
     "(status failed): 202 and its job", "card_admin", None, "202", _OBJ),
    ("post", "/voids", "Void cards (reason `lost` waits for an approver: 202)", "card_admin",
     _body({**_CARDS, "reason": {"enum": ["damaged", "lost", "defective", "stolen",
                                          "inspection", "other"]},
            "note": _STR, "stocktake_id": _INT}, ["reason"]), "200", _OBJ),
    ("post", "/voids/{id}/approve", "Approve a pending void (not by its requester)", "approver",
     None, "200", _OBJ),
    ("post", "/voids/{id}/reject", "Reject a pending void", "approver", None, "200", _OBJ),
    ("post", "/stocktakes", "Upload a count at a location; missing and unexpected cards",
     "card_admin, storekeeper, hall_manager (own hall)",
     _body({**_CARDS, "location": _STR}, ["location"]), "201", _OBJ),
    ("post", "/requests", "Request cards for the hall", "hall_manager",
     _body({"face_value": _INT, "quantity": _INT,
            "hall": {**_STR, "description": "optional; the user's own hall, else 403"}},
           ["face_value", "quantity"]), "201", _OBJ),
    ("get", "/requests/{id}", "A request (and its issue)", "readers, hall_manager (own hall)",
     None, "200", _OBJ),
    ("post", "/requests/{id}/approve", "Approve a request (not by its requester)", "approver",
     None, "200", _OBJ),
    ("post", "/requests/{id}/reject", "Reject a request", "approver", None, "200", _OBJ),
    ("post", "/requests/{id}/issue", "Issue an approved request from stock", "storekeeper",
     None, "201", _OBJ),
    ("post", "/sales", "Sell issued cards at the cashier's hall", "cashier",
     _body(_CARDS, []), "201", _OBJ),
    ("post", "/cards/{serial}/unlock", "Unlock a locked card", "approver", None, "200", _OBJ),
    ("get", "/cards/{serial}", "A card and its full history", "all roles (hall roles: own hall)",
     None, "200", _OBJ),
    ("get", "/inventory", "Counts by state, face value and location", "all roles", None, "200",
     _OBJ),
    ("get", "/reports/halls", "Issues and sales by hall", "all roles", None, "200", _OBJ),
    ("get", "/recharges", "The recharge ledger of a day (?date=YYYY-MM-DD)",
     "card_admin, approver, auditor", None, "200", _OBJ),
    ("get", "/operation-log", "The operation log (?after=SEQ&limit=N)", "card_admin, auditor",
     None, "200", _OBJ),
    ("get", "/operation-log/verify", "Check the operation log's hash chain",
     "card_admin, auditor", None, "200",
     {"type": "object", "properties": {"ok": {"type": "boolean"}, "entries": _INT,
                                       "first_broken": {"type": ["integer", "null"]},
                                       "head_hash": {"type": ["string", "null"]},
                                       "problem": {"type": ["string", "null"]}}}),
    ("get", "/jobs/{id}", "A background job and its progress", "card_admin, storekeeper, "
     "auditor", None, "200", _JOB),
)

_JOB_OPS = {("post", "/batches"), ("post", "/batches/{id}/card-back-file"),
            ("post", "/batches/{id}/stock-in"), ("post", "/batches/{id}/resume")}


def _paths() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, path, summary, roles, body, status, schema in _OPS:
        params = [{"name": name, "in": "path", "required": True, "schema": _STR}
                  for name in ("id", "serial") if "{" + name + "}" in path]
        responses: dict[str, Any] = {
            status: {"description": "success", "content": {
                "text/plain" if schema == {"type": "string"} else "application/json":
                    {"schema": schema}}},
            "default": {"description": "error (401 no session, 403 role or hall, 404, 409 "
                        "illegal transition, 422 validation)",
                        "content": {"application/problem+json": {"schema": _PROBLEM}}}}
        if (method, path) in _JOB_OPS:
            responses["202"] = {"description": "accepted as a background job (100,000 cards "
                                "or more)", "content": {"application/json": {
                                    "schema": _ACCEPTED}}}
        op: dict[str, Any] = {
            "summary": summary,
            "description": f"Roles: {roles}." + ("" if path == "/session" else
                                                 " Needs Authorization: Bearer <token>."),
            "operationId": "admin_" + method + path.replace("/", "_").replace("{", "")
            .replace("}", "").replace("-", "_"),
            "tags": ["card centre"], "responses": responses}
        if params:
            op["parameters"] = params
        if body is not None:
            op["requestBody"] = body
        out.setdefault("/admin/v1" + path, {})[method] = op
    return out


#: OpenAPI 3.1 path items of `/admin/v1`.
ADMIN_OPENAPI_PATHS: dict[str, Any] = _paths()
