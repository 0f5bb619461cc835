"""Every route of the node's OpenAPI document, fed malformed input: never a 500, always a
problem+json answer that a person can act on."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import aiohttp
from argon2 import PasswordHasher

from switch.node import Node
from tests.nodekit import api_key

_PATH_VALUES = ["x", "0", "-1", "%C2%B2", "a" * 300, "%00", "9" * 40, "1e3", "%2e%2e",
                "00000000-0000-0000-0000-000000000000"]
_QUERY_VALUES = ["", "x", "-1", "%C2%B2", "9" * 40, "%00", "1.5", "2026-13-45"]
_BODIES = [b"", b"null", b"[]", b'"s"', b"{}", b'{"a": 1}', b"{", b'{"x": "\\u0000"}',
           b"[" * 5000 + b"]" * 5000, b'{"a": ' + b"9" * 400 + b"}",
           b'{"amount": ' + b"9" * 5000 + b"}"]
_FIELD_VALUES: list[Any] = [None, True, -1, 0, 1.5, -0.0, 1e300, 2**64, "", "x" * 5000, [],
                            {}, "\u0000", "\u00b2", [1, 2], {"a": {"b": []}}]
_SLOW = re.compile(r"^/admin/v1/session$")  # argon2 on purpose: a few cases only


def _schema(doc: dict[str, Any], op: dict[str, Any]) -> dict[str, Any]:
    content: dict[str, Any] = op.get("requestBody", {}).get("content", {})
    first: dict[str, Any] = next(iter(content.values()), {})
    schema: dict[str, Any] = first.get("schema", {})
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if "oneOf" in schema:
        merged: dict[str, Any] = {"properties": {}, "required": []}
        for alt in schema["oneOf"]:
            merged["properties"].update(alt.get("properties", {}))
        return merged
    return schema


def _bodies(schema: dict[str, Any], slow: bool) -> list[bytes]:
    props = list(schema.get("properties", {}))
    base = {name: "x" for name in schema.get("required", props)}
    out = list(_BODIES)
    for name, value in itertools.product(props, _FIELD_VALUES):
        out.append(json.dumps({**base, name: value}).encode())  # orjson writes no 2**64
    return out[:6] if slow else out


async def test_no_route_answers_malformed_input_with_a_500(node: Node) -> None:
    base = f"http://127.0.0.1:{node.ports.http}"
    internet, ivr = await api_key(node.pool, "internet"), await api_key(node.pool, "ivr")
    await node.pool.execute(
        "INSERT INTO card_users (username, role, hall, password_hash) VALUES"
        " ('fuzz', 'card_admin', NULL, $1)", PasswordHasher().hash("fuzz-pass-1"))
    failures: list[str] = []
    sent = 0
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/admin/v1/session",
                          json={"username": "fuzz", "password": "fuzz-pass-1"}) as r:
            assert r.status == 201, await r.text()
            admin = (await r.json())["token"]
        async with s.get(base + "/v1/openapi.json") as r:
            doc = await r.json()
        assert len(doc["paths"]) > 20, sorted(doc["paths"])

        def auth(path: str) -> dict[str, str]:
            key = admin if path.startswith("/admin") else ivr if path.startswith("/ivr") \
                else internet
            return {"Authorization": f"Bearer {key}", "Idempotency-Key": "fuzz-1"}

        async def send(method: str, path: str, body: bytes | None) -> None:
            nonlocal sent
            sent += 1
            headers = auth(path)
            if body is not None:
                headers["Content-Type"] = "application/json"
            async with s.request(method, base + path, data=body, headers=headers) as r:
                raw = await r.read()
                ctype = r.headers.get("Content-Type", "")
                if r.status >= 500 and not (r.status == 503 and b"unavailable" in raw):
                    failures.append(f"{method} {path} {body!r:.80}: {r.status} {raw[:200]!r}")
                elif r.status >= 400 and not ctype.startswith("application/problem+json"):
                    failures.append(f"{method} {path}: {r.status} {ctype}")

        for template, ops in doc["paths"].items():
            params = re.findall(r"{([^}]+)}", template)
            for method, op in ops.items():
                if method not in ("get", "post", "put", "patch", "delete"):
                    continue
                slow = bool(_SLOW.match(template))
                paths = [template]
                if params:
                    paths = [re.sub(r"{[^}]+}", v, template) for v in _PATH_VALUES]
                query = [p["name"] for p in op.get("parameters", []) if p.get("in") == "query"]
                for path in paths:
                    if method in ("post", "put", "patch"):
                        for body in (_bodies(_schema(doc, op), slow) if path == paths[0]
                                     else _BODIES[:4]):
                            await send(method.upper(), path, body)
                    else:
                        await send(method.upper(), path, None)
                    for name, value in itertools.product(query, _QUERY_VALUES):
                        await send(method.upper(), f"{path}?{name}={value}", None)
        # every refused attempt was logged, strange input and all, and the chain still holds
        async with s.get(base + "/admin/v1/operation-log/verify", headers=auth("/admin")) as r:
            verified = await r.json()
    assert sent > 1000
    assert not failures, "\n".join(failures[:40])
    assert verified["ok"] is True and verified["entries"] > 100, verified
