"""The OpenAPI 3.1 document served at /v1/openapi.json."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from switch.node import Node


def _problem_ref() -> dict[str, Any]:
    return {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _err(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": _problem_ref()}


_IDEM_HEADER = {
    "name": "Idempotency-Key", "in": "header", "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
    "description": "The client's key for this request; a retry with the same key and body "
                   "gets the stored answer.",
}

_PAYMENT = {
    "type": "object",
    "required": ["payment_id", "receipt_no", "account_no", "amount", "method", "channel",
                 "business_date", "status", "posting", "created_at"],
    "properties": {
        "payment_id": {"type": "string", "format": "uuid"},
        "receipt_no": {"type": "string", "maxLength": 20},
        "account_no": {"type": "string", "pattern": "^[0-9]{10}$"},
        "amount": {"type": "integer", "minimum": 1, "description": "fen"},
        "method": {"type": "string", "enum": ["cash", "transfer", "bank_card", "wallet"]},
        "channel": {"type": "string", "enum": ["internet", "counter", "partner"]},
        "business_date": {"type": "string", "format": "date"},
        "status": {"type": "string", "enum": ["confirmed", "reversed"]},
        "posting": {"type": "string", "enum": ["pending", "posted", "failed"]},
        "reference": {"type": "string", "maxLength": 64},
        "created_at": {"type": "string", "format": "date-time"},
        "reversed_at": {"type": "string", "format": "date-time"},
    },
}


def document(node: Node | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "gridpay payment API", "version": "1.0.0",
                 "description": "Internet, service-hall counter and partner payments of "
                                "electricity bills. Amounts are integers in fen."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/v1/accounts/{account_no}": {"get": {
                "operationId": "getAccount", "summary": "A customer's account",
                "parameters": [{"name": "account_no", "in": "path", "required": True,
                                "schema": {"type": "string", "pattern": "^[0-9]{10}$"}}],
                "responses": {
                    "200": {"description": "The account", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Account"}}}},
                    "400": _err("Malformed account number"),
                    "401": _err("Missing or unknown API key"),
                    "403": _err("Key of another channel"),
                    "404": _err("Unknown account"),
                    "503": _err("Marketing system and mirror unavailable, or standby node"),
                }}},
            "/v1/payments": {"post": {
                "operationId": "createPayment", "summary": "Pay an electricity account",
                "parameters": [_IDEM_HEADER],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/PaymentRequest"}}}},
                "responses": {
                    "201": {"description": "Confirmed (durably recorded); credited later",
                            "headers": {"Idempotent-Replayed": {
                                "schema": {"type": "string", "enum": ["true"]}}},
                            "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/Payment"}}}},
                    "400": _err("Malformed body or Idempotency-Key"),
                    "401": _err("Missing or unknown API key"),
                    "403": _err("Key of another channel"),
                    "404": _err("Unknown account"),
                    "409": _err("The same key is still being processed"),
                    "413": _err("Body over the size limit"),
                    "415": _err("Body not application/json, or not in UTF-8"),
                    "417": _err("An Expect header other than 100-continue"),
                    "422": _err("Closed account, invalid amount, or key reused with another "
                                "body"),
                    "503": _err("Standby node or temporarily unavailable"),
                }}},
            "/v1/payments/{payment_id}": {"get": {
                "operationId": "getPayment", "summary": "A payment and its posting state",
                "parameters": [{"name": "payment_id", "in": "path", "required": True,
                                "schema": {"type": "string", "format": "uuid"}}],
                "responses": {
                    "200": {"description": "The payment", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Payment"}}}},
                    "401": _err("Missing or unknown API key"),
                    "403": _err("Key of another channel"),
                    "404": _err("No such payment for this channel (a partner: its own only)"),
                    "503": _err("Standby node or temporarily unavailable"),
                }}},
            "/v1/payments/{payment_id}/reversal": {"post": {
                "operationId": "reversePayment", "summary": "Reverse a same-day payment",
                "parameters": [{"name": "payment_id", "in": "path", "required": True,
                                "schema": {"type": "string", "format": "uuid"}}, _IDEM_HEADER],
                "responses": {
                    "200": {"description": "The reversed payment (repeated, with its key or "
                                           "another: the first answer, byte for byte)",
                            "headers": {"Idempotent-Replayed": {
                                "schema": {"type": "string", "enum": ["true"]}}},
                            "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/Payment"}}}},
                    "400": _err("Missing Idempotency-Key"),
                    "401": _err("Missing or unknown API key"),
                    "403": _err("Key of another channel"),
                    "404": _err("No such payment for this channel (a partner: its own only)"),
                    "409": _err("Another business date: not reversible"),
                    "422": _err("Idempotency-Key used to reverse another payment"),
                    "503": _err("Standby node or temporarily unavailable"),
                }}},
            "/v1/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document", "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1 document",
                                      "content": {"application/json": {
                                          "schema": {"type": "object"}}}}}}},
            "/healthz": {"get": {"operationId": "healthz", "summary": "Liveness",
                                 "security": [], "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"operationId": "readyz", "security": [],
                                "summary": "Ready for traffic: services reachable, node active",
                                "responses": {"200": {"description": "ready"},
                                              "503": {"description": "not ready or standby"}}}},
            "/metrics": {"get": {"operationId": "metrics", "security": [],
                                 "summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text exposition format",
                                                       "content": {"text/plain": {
                                                           "schema": {"type": "string"}}}}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {"type": "object",
                            "required": ["type", "title", "status", "detail", "code"],
                            "properties": {"type": {"type": "string"},
                                           "title": {"type": "string"},
                                           "status": {"type": "integer"},
                                           "detail": {"type": "string"},
                                           "code": {"type": "string"}}},
                "Account": {"type": "object",
                            "required": ["account_no", "name", "status", "arrears",
                                         "prepaid_balance", "bills", "as_of", "stale"],
                            "properties": {
                                "account_no": {"type": "string", "pattern": "^[0-9]{10}$"},
                                "name": {"type": "string", "description": "masked"},
                                "status": {"type": "string", "enum": ["active", "closed"]},
                                "arrears": {"type": "integer"},
                                "prepaid_balance": {"type": "integer"},
                                "bills": {"type": "array", "items": {
                                    "type": "object", "required": ["period", "amount"],
                                    "properties": {"period": {"type": "string"},
                                                   "amount": {"type": "integer"}}}},
                                "as_of": {"type": "string", "format": "date-time"},
                                "stale": {"type": "boolean"}}},
                "PaymentRequest": {
                    "type": "object", "additionalProperties": False,
                    "required": ["account_no", "amount", "method"],
                    "properties": {
                        "account_no": {"type": "string", "pattern": "^[0-9]{10}$"},
                        "amount": {"type": "integer", "minimum": 1, "description": "fen"},
                        "method": {"type": "string",
                                   "enum": ["cash", "transfer", "bank_card", "wallet"]},
                        "reference": {"type": "string", "minLength": 1, "maxLength": 64}}},
                "Payment": _PAYMENT,
            },
        },
    }
    if node is not None:
        for extra in node.components.get("openapi_paths", []):
            doc["paths"].update(extra.get("paths", {}))
            doc["components"]["schemas"].update(extra.get("schemas", {}))
    return doc
