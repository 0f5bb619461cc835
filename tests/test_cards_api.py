"""The admin API end to end: real PostgreSQL, the HSM simulator on a real socket, real HTTP.

The node shell is a stand-in (pool, settings, components, metrics, is_active): it is not what
is under test here; the routes, the card centre and the HSM are.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from argon2 import PasswordHasher

from crypto.pinblock import Format4Codec
from crypto.voucher import voucher_tag
from hsm_sim.server import load_dev_settings, start_server
from switch.business import BusinessCalendar
from switch.cards import api, states
from switch.cards.files import (
    card_back_header,
    card_back_record,
    parse_card_back,
    parse_new_card_file,
)
from switch.cards.manufacturer import manufacture
from switch.cards.openapi import ADMIN_OPENAPI_PATHS
from switch.cards.serials import SerialRange, make_serial
from switch.config import Settings, load_settings
from switch.hsm_client import HsmClient
from switch.keys import KeyRing, load_dev_keys, provision_dev_keys
from switch.lease import Role
from switch.metrics import Metrics
from switch.web.app import build_app

PASSWORD = "correct-horse-9"
A = "/admin/v1"
USERS = [("admin", "card_admin", None), ("admin2", "card_admin", None),
         ("appr", "approver", None), ("store", "storekeeper", None),
         ("hm1", "hall_manager", "H1"), ("hm2", "hall_manager", "H2"),
         ("cash1", "cashier", "H1"), ("cash2", "cashier", "H2"), ("aud", "auditor", None)]


@dataclass
class StandInNode:
    pool: asyncpg.Pool
    settings: Settings
    components: dict[str, Any] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    is_active: bool = True
    stopping: bool = False
    epoch: int = 0  # the lease row's epoch in a clean database

    @property
    def role(self) -> Role:  # a fenced node demotes itself
        return Role.ACTIVE if self.is_active else Role.STANDBY

    async def fenced(self) -> None:
        self.is_active = False


@pytest.fixture(scope="session")
async def hsm() -> AsyncIterator[tuple[HsmClient, KeyRing]]:
    server = await start_server(replace(load_dev_settings(), port=0))
    client = HsmClient("127.0.0.1", server.port, pool_size=2, timeout=10.0)
    await client.start()
    ring = await provision_dev_keys(client, load_dev_keys())
    try:
        yield client, ring
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="session")
def password_hash() -> str:
    return PasswordHasher().hash(PASSWORD)


@dataclass
class Api:
    client: TestClient[Any, Any]
    pool: asyncpg.Pool
    tokens: dict[str, str]

    async def h(self, user: str) -> dict[str, str]:
        """Log in on first use (argon2 is deliberately slow: only the users a test needs)."""
        if user not in self.tokens:
            resp = await self.client.post(f"{A}/session",
                                          json={"username": user, "password": PASSWORD})
            assert resp.status == 201
            self.tokens[user] = (await resp.json())["token"]
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    async def call(self, method: str, path: str, user: str | None, json: Any = None,
                   data: bytes | None = None, expect: int | None = None) -> Any:
        resp = await self.client.request(method, A + path, json=json, data=data,
                                         headers=await self.h(user) if user else {})
        body = await resp.read()
        if expect is not None:
            assert resp.status == expect, (resp.status, body[:600])
        if resp.content_type.endswith("json"):
            return await resp.json(content_type=None)
        return body


@pytest.fixture
async def admin_api(pool: asyncpg.Pool, hsm: tuple[HsmClient, KeyRing],
                    password_hash: str) -> AsyncIterator[Api]:
    settings = load_settings()
    node = StandInNode(pool=pool, settings=settings, components={"calendar": BusinessCalendar(
        settings.business.timezone, settings.business.cutover)})
    node.components.update(hsm=hsm[0], keyring=hsm[1], routes=[api.register])
    app = build_app(cast(Any, node))
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    await pool.executemany(
        "INSERT INTO card_users (username, role, hall, password_hash) VALUES ($1, $2, $3, $4)",
        [(u, r, h, password_hash) for u, r, h in USERS])
    try:
        yield Api(client, pool, {})
    finally:
        await client.close()


async def _order(api_: Api, quantity: int, face: int = 10000) -> dict[str, Any]:
    doc: dict[str, Any] = await api_.call(
        "POST", "/batches", "admin", json={"face_value": face, "quantity": quantity,
                                           "manufacturer": "acme"}, expect=201)
    return doc


async def _card_back(api_: Api, tmp: Path, batch: dict[str, Any], seed: int = 3
                     ) -> tuple[bytes, Any]:
    """The batch's new-card file through the manufacturer simulator: (card-back file, its
    summary)."""
    ncf = await api_.call("GET", f"/batches/{batch['id']}/new-card-file", "admin", expect=200)
    (tmp / "b.ncf").write_bytes(ncf)
    summary = manufacture(tmp / "b.ncf", tmp / "b.cbf", seed=seed)
    return (tmp / "b.cbf").read_bytes(), summary


async def _stocked_batch(api_: Api, tmp: Path, quantity: int
                         ) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    batch = await _order(api_, quantity)
    ncf = await api_.call("GET", f"/batches/{batch['id']}/new-card-file", "admin", expect=200)
    cbf, summary = await _card_back(api_, tmp, batch)
    report = await api_.call("POST", f"/batches/{batch['id']}/card-back-file", "admin",
                             data=cbf, expect=200)
    await api_.call("POST", f"/batches/{batch['id']}/stock-in", "admin", expect=200)
    return batch, ncf, {"summary": summary.as_dict(), "report": report}


async def _ended(api_: Api, job_id: str) -> dict[str, Any]:
    """The job once it has ended (polled, 20 s at most)."""
    job: dict[str, Any] = {}
    for _ in range(400):
        job = await api_.call("GET", f"/jobs/{job_id}", "admin", expect=200)
        if job["state"] in ("succeeded", "failed"):
            break
        await asyncio.sleep(0.05)
    return job


async def test_whole_workflow_end_to_end(admin_api: Api, tmp_path: Path) -> None:
    a = admin_api
    batch = await _order(a, 40)
    assert batch["status"] == "ordered" and batch["counts"]["ordered"] == 40
    assert batch["job"]["state"] == "succeeded"

    # the new-card file: integrity, and its PINs decrypt under the print key to the tags
    ncf_raw = await a.call("GET", f"/batches/{batch['id']}/new-card-file", "admin", expect=200)
    ncf = parse_new_card_file(ncf_raw.splitlines(keepends=True))
    assert len(ncf.records) == 40 and ncf.batch_id == batch["id"]
    dev = load_dev_keys()
    codec = Format4Codec(dev.print_key("acme"))
    pins = {r.serial: codec.decipher(r.encrypted_pin, r.serial) for r in ncf.records}
    assert all(re.fullmatch(r"[0-9]{12}", p) for p in pins.values())
    assert dev.voucher_verification_key is not None
    tags = {r["serial"]: bytes(r["tag"]) for r in await a.pool.fetch(
        "SELECT serial, tag FROM cards")}
    for serial, pin in pins.items():
        assert tags[serial] == voucher_tag(dev.voucher_verification_key, serial, pin)

    # manufacture with one defect of each kind, reconcile
    (tmp_path / "b.ncf").write_bytes(ncf_raw)
    summary = manufacture(tmp_path / "b.ncf", tmp_path / "b.cbf", missing=1, unexpected=1,
                          damaged=1, changed_face=1, seed=11)
    report = await a.call("POST", f"/batches/{batch['id']}/card-back-file", "admin",
                          data=(tmp_path / "b.cbf").read_bytes(), expect=200)
    assert report["counts"] == {"missing": 1, "unexpected": 1, "damaged": 1,
                                "face_value_changed": 1, "duplicate": 0}
    kinds = {(d["kind"], d["serial"]) for d in report["discrepancies"]}
    assert kinds == {("missing", summary.missing[0]), ("unexpected", summary.unexpected[0]),
                     ("damaged", summary.damaged[0]),
                     ("face_value_changed", summary.changed_face[0])}
    assert report["matched"] == 37
    again = await a.call("POST", f"/batches/{batch['id']}/card-back-file", "admin",
                         data=(tmp_path / "b.cbf").read_bytes(), expect=409)
    assert again["code"] == "batch_state"
    damaged = await a.call("GET", f"/cards/{summary.damaged[0]}", "aud", expect=200)
    assert damaged["state"] == "voided"
    assert damaged["history"][-1]["reason"] == "reconciliation: damaged"

    stocked = await a.call("POST", f"/batches/{batch['id']}/stock-in", "admin", expect=200)
    assert stocked["stocked_in"] == 37
    view = await a.call("GET", f"/batches/{batch['id']}", "aud", expect=200)
    assert view["counts"]["in_stock"] == 37 and view["counts"]["voided"] == 3
    gone = await a.call("GET", f"/batches/{batch['id']}/new-card-file", "admin", expect=410)
    assert gone["code"] == "file_purged"

    # request → approve → issue → sale
    req = await a.call("POST", "/requests", "hm1", json={"face_value": 10000, "quantity": 10},
                       expect=201)
    assert req["hall"] == "H1" and req["state"] == "pending"
    await a.call("POST", f"/requests/{req['id']}/issue", "store", expect=409)  # not approved
    bad_note = await a.call("POST", f"/requests/{req['id']}/approve", "appr", json={"note": 5},
                            expect=422)  # it was dropped, and the request approved
    assert bad_note["code"] == "invalid_note"
    await a.call("POST", f"/requests/{req['id']}/approve", "appr", expect=200)
    issue = await a.call("POST", f"/requests/{req['id']}/issue", "store", expect=201)
    assert issue["quantity"] == 10 and sum(r["count"] for r in issue["ranges"]) == 10
    first = issue["ranges"][0]
    assert first["first"] == min(s for s in pins if s not in summary.missing
                                 and s not in summary.damaged
                                 and s not in summary.changed_face)
    other = await a.call("POST", "/sales", "cash2", json={"ranges": [first]}, expect=409)
    assert other["code"] == "illegal_transition" and "issued at H1" in other["detail"]
    sale = await a.call("POST", "/sales", "cash1", json={"ranges": [first]}, expect=201)
    assert sale["quantity"] == first["count"]
    assert sale["total_face_value"] == 10000 * first["count"]
    resold = await a.call("POST", "/sales", "cash1", json={"serials": [first["first"]]},
                          expect=409)
    assert resold["refused"] == [{"serial": first["first"], "state": "sold"}]

    card = await a.call("GET", f"/cards/{first['first']}", "cash1", expect=200)
    assert [h["to"] for h in card["history"]] == ["ordered", "produced", "in_stock", "issued",
                                                   "sold"]
    assert card["history"][3]["document"] == {"type": "request", "id": str(req["id"])}
    inv = await a.call("GET", "/inventory", "aud", expect=200)
    assert inv["by_state"]["sold"] == first["count"] and inv["total"] == 40
    # a sold card past its date counts as expired at once, before any sweep marks it so
    past = "UPDATE cards SET expiry = expiry + $2::int WHERE serial = $1"
    await a.pool.execute(past, first["first"], -2000)
    inv = await a.call("GET", "/inventory", "aud", expect=200)
    assert inv["by_state"]["sold"] == first["count"] - 1 and inv["by_state"]["expired"] == 1
    assert inv["total"] == 40
    await a.pool.execute(past, first["first"], 2000)
    for bad in ("20261127", "2026-W48-5", "2026-02-30", "yesterday"):  # YYYY-MM-DD only
        refused = await a.call("GET", f"/recharges?date={bad}", "aud", expect=422)
        assert refused["code"] == "invalid_date"
    ledger = await a.call("GET", "/recharges", "aud", expect=200)  # today's business date
    assert ledger["count"] == 0 and len(ledger["date"]) == 10
    halls = await a.call("GET", "/reports/halls", "aud", expect=200)
    assert halls["sales"][0]["hall"] == "H1"

    # PINs never in the database: dump every card table and look for each clear PIN
    dump = bytearray()

    async def sink(chunk: bytes) -> None:
        dump.extend(chunk)

    async with a.pool.acquire() as conn:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND (tablename LIKE 'card%')")]
        for t in tables:
            await conn.copy_from_query(f'SELECT * FROM "{t}"', output=sink)
    text = bytes(dump)
    assert b"cards" and len(text) > 1000
    for pin in pins.values():
        assert pin.encode() not in text

    # the operation log saw every action, and is intact
    log = await a.call("GET", "/operation-log?limit=1000", "aud", expect=200)
    actions = [e["action"] for e in log["entries"]]
    for act in ("session.create", "batch.order", "batch.new_card_file",
                "batch.card_back_file", "batch.stock_in", "request.create", "request.decide",
                "request.issue", "sale.create"):
        assert act in actions
    assert (await a.call("GET", "/operation-log/verify", "aud", expect=200))["ok"] is True


async def test_a_batch_voided_whole_before_stock_in_loses_its_new_card_file(
        admin_api: Api) -> None:
    # such a batch never reaches stock-in, which erases the file (each card's PIN under the
    # print key) of the others: it was kept for good
    a = admin_api
    kept, dead = await _order(a, 4), await _order(a, 4)

    async def serials(batch: dict[str, Any]) -> list[str]:
        return [r["serial"] for r in await a.pool.fetch(
            "SELECT serial FROM cards WHERE batch_id = $1 ORDER BY serial", batch["id"])]

    await a.call("POST", "/voids", "admin", expect=200,
                 json={"reason": "damaged", "serials": (await serials(kept))[:1]})
    await a.call("POST", "/voids", "admin", expect=200,
                 json={"reason": "damaged", "serials": await serials(dead)})
    await a.call("GET", f"/batches/{kept['id']}/new-card-file", "admin", expect=200)
    gone = await a.call("GET", f"/batches/{dead['id']}/new-card-file", "admin", expect=410)
    assert gone["code"] == "file_purged"
    assert await a.pool.fetchval("SELECT count(*) FROM card_file_chunks WHERE batch_id = $1",
                                 dead["id"]) == 0
    assert (await a.call("GET", f"/batches/{dead['id']}", "aud",
                         expect=200))["new_card_file_purged"] is True
    # a batch still being generated keeps its chunks: its other cards are yet to come
    making = await _order(a, 4)
    await a.pool.execute("UPDATE card_batches SET status = 'generating' WHERE id = $1",
                         making["id"])
    await a.call("POST", "/voids", "admin", expect=200,
                 json={"reason": "damaged", "serials": await serials(making)})
    assert await a.pool.fetchval("SELECT file_purged_at FROM card_batches WHERE id = $1",
                                 making["id"]) is None


async def test_a_card_back_file_that_voids_every_card_erases_the_new_card_file(
        admin_api: Api, tmp_path: Path) -> None:
    # the batch will never be stocked in (which erases the others' files): the file, each
    # card's PIN under the print key, goes with the reconciliation that voids its last card
    a = admin_api
    batch = await _order(a, 3)
    good, _ = await _card_back(a, tmp_path, batch, seed=1)
    records = [r._replace(status="DAMAGED")
               for r in parse_card_back(good).records]
    body = b"".join(card_back_record(r) for r in records)
    data = (card_back_header(batch_id=batch["id"], count=3, manufacturer="acme",
                             created="2026-11-27T00:00:00+00:00") + body
            + f"T|3|{sum(r.face_value for r in records)}|"
              f"{hashlib.sha256(body).hexdigest()}\n".encode())
    rep = await a.call("POST", f"/batches/{batch['id']}/card-back-file", "admin", data=data,
                       expect=200)
    assert rep["matched"] == 0 and rep["counts"]["damaged"] == 3
    view = await a.call("GET", f"/batches/{batch['id']}", "aud", expect=200)
    assert view["counts"]["voided"] == 3 and view["new_card_file_purged"] is True
    assert (await a.call("GET", f"/batches/{batch['id']}/new-card-file", "admin",
                         expect=410))["code"] == "file_purged"
    assert await a.pool.fetchval("SELECT count(*) FROM card_file_chunks WHERE batch_id = $1",
                                 batch["id"]) == 0


async def test_refusals_of_odd_orders_and_voids_are_clear_and_leave_nothing_behind(
        admin_api: Api, tmp_path: Path) -> None:
    a = admin_api
    await _order(a, 1)
    # a prefix without room for the order: 409 serials_exhausted, not a database error, and
    # no job left queued for ever
    await a.pool.execute("UPDATE card_serial_counters SET next_seq = 999999999")
    jobs_before = await a.pool.fetchval("SELECT count(*) FROM card_jobs")
    out = await a.call("POST", "/batches", "admin", expect=409,
                       json={"face_value": 10000, "quantity": 5, "manufacturer": "acme"})
    assert out["code"] == "serials_exhausted" and "1 serials are left" in out["detail"]
    assert await a.pool.fetchval("SELECT count(*) FROM card_jobs") == jobs_before
    assert await a.pool.fetchval("SELECT max(next_seq) FROM card_serial_counters") == 999999999
    await a.pool.execute("UPDATE card_serial_counters SET next_seq = 2")
    # an expiry written otherwise than YYYY-MM-DD is refused, as its message says
    for expiry in (20301231, "20301231", "2030-W01-1", "2030-12-31T10:00"):
        out = await a.call("POST", "/batches", "admin", expect=422,
                           json={"face_value": 10000, "quantity": 1, "manufacturer": "acme",
                                 "expiry": expiry})
        assert out["code"] == "invalid_expiry"
    # a stocktake id out of range is a 422, not a database error
    await _stocked_batch(a, tmp_path, 2)
    serial = await a.pool.fetchval("SELECT min(serial) FROM cards WHERE state = 'in_stock'")
    for st in (2**63, 18446744073709551615, 0, -1):
        out = await a.call("POST", "/voids", "admin", expect=422,
                           json={"reason": "lost", "serials": [serial], "stocktake_id": st})
        assert out["code"] == "invalid_id"
    # a refused field nested deeper than the log can write is refused (422) and logged
    deep = b"[" * 300 + b"1" + b"]" * 300
    resp = await a.client.post(f"{A}/requests", data=b'{"face_value": ' + deep
                               + b', "quantity": 1}',
                               headers={**await a.h("hm1"), "Content-Type": "application/json"})
    assert resp.status == 422
    log = await a.call("GET", "/operation-log?limit=1000", "aud", expect=200)
    refused = [e for e in log["entries"] if e["action"] == "request.create"][-1]
    assert refused["result"]["code"] == "invalid_face_value"
    assert refused["objects"]["face_value"] == "(not valid: not logged)"
    assert (await a.call("GET", "/operation-log/verify", "aud", expect=200))["ok"] is True


async def test_the_operation_log_keeps_no_mistyped_secret(admin_api: Api) -> None:
    # what is typed in the wrong field (a password as the user name, a PIN as a serial) is
    # not kept: the log keeps what it is given for good, and auditors read it
    a = admin_api
    for username in ("S3cretPassw0rd", "admin"):
        bad = await a.client.post(f"{A}/session", json={"username": username,
                                                        "password": "wrong!"})
        assert bad.status == 401
    # malformed attempts are logged too (they were not)
    assert (await a.client.post(f"{A}/session", json={"username": "admin"})).status == 422
    assert (await a.client.post(f"{A}/session", data=b"{",
                                headers={"Content-Type": "application/json"})).status == 400
    for serials in (["73914862"], ["1302250000000001", "73914862"]):
        body = await a.call("POST", "/voids", "admin", expect=422,
                            json={"reason": "damaged", "serials": serials})
        assert body["code"] == "invalid_serial" and "73914862" not in body["detail"]
    # nor a PIN typed in the path where a serial goes
    assert (await a.call("POST", "/cards/739148627391/unlock", "appr",
                         expect=422))["code"] == "invalid_serial"
    # nor in a body's field that is not a serial (a reason, a location, a face value, a
    # quantity), nor a password typed as the manufacturer, which is not echoed either
    pin = 739148627391
    refusals = [
        ("/voids", "admin", {"reason": str(pin), "serials": [make_serial("130225", 1)]},
         "invalid_reason"),
        ("/stocktakes", "admin", {"location": str(pin), "serials": []}, "invalid_location"),
        ("/requests", "hm1", {"face_value": pin, "quantity": 1}, "invalid_face_value"),
        ("/requests", "hm1", {"face_value": 10000, "quantity": pin}, "invalid_quantity"),
        ("/batches", "admin", {"face_value": 10000, "quantity": 5,
                               "manufacturer": "S3cretPassw0rd"}, "unknown_manufacturer"),
    ]
    for path, user, doc, code in refusals:
        body = await a.call("POST", path, user, json=doc, expect=422)
        assert body["code"] == code, body
        assert str(pin) not in orjson.dumps(body).decode()
        assert "S3cretPassw0rd" not in orjson.dumps(body).decode()
    assert "acme" in body["detail"]  # the manufacturers that can be ordered from, instead
    # a hall's user is refused another hall without its code echoed (nor logged)
    body = await a.call("POST", "/stocktakes", "hm1", json={"location": str(pin),
                                                             "serials": []}, expect=403)
    assert body["code"] == "forbidden_hall" and str(pin) not in body["detail"]
    log = await a.call("GET", "/operation-log?limit=1000", "aud", expect=200)
    text = orjson.dumps(log).decode()
    assert "S3cretPassw0rd" not in text and "73914862" not in text and str(pin) not in text
    unlock = [e for e in log["entries"] if e["action"] == "card.unlock"]
    assert unlock and unlock[-1]["objects"]["serial"] == "(not a valid serial)"
    failed = [e["actor"] for e in log["entries"]
              if e["action"] == "session.create" and not e["result"]["ok"]]
    assert sorted(failed) == ["(unknown user)", "(unknown user)", "admin", "admin"]


async def test_maker_checker_roles_and_halls(admin_api: Api, tmp_path: Path) -> None:
    a = admin_api
    # authentication
    assert (await a.call("GET", "/inventory", None, expect=401))["code"] == "session_required"
    resp = await a.client.get(f"{A}/inventory", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401
    # the scheme in any case, as HTTP has it; two headers are refused, not one of them taken
    token = (await a.h("aud"))["Authorization"].partition(" ")[2]
    resp = await a.client.get(f"{A}/inventory", headers={"Authorization": f"bearer {token}"})
    assert resp.status == 200
    resp = await a.client.get(f"{A}/inventory", headers=[
        ("Authorization", f"Bearer {token}"), ("Authorization", "Bearer nope")])
    assert resp.status == 400 and (await resp.json())["code"] == "authorization_repeated"
    bad = await a.client.post(f"{A}/session", json={"username": "admin", "password": "wrong!"})
    assert bad.status == 401 and "wrong!" not in await bad.text()
    await a.h("admin2")
    await a.pool.execute("UPDATE card_sessions SET expires_at = now() - interval '1 s'"
                         " WHERE username = 'admin2'")
    assert (await a.call("GET", "/inventory", "admin2", expect=401))["code"] == \
        "session_invalid"

    # roles
    for user, method, path in (("cash1", "POST", "/batches"), ("aud", "POST", "/voids"),
                               ("hm1", "POST", "/sales"), ("store", "POST", "/requests"),
                               ("cash1", "GET", "/operation-log")):
        body = await a.call(method, path, user, json={}, expect=403)
        assert body["code"] == "forbidden_role"
    assert (await a.call("POST", "/batches", "admin",
                         json={"face_value": 1234, "quantity": 5, "manufacturer": "acme"},
                         expect=422))["code"] == "invalid_face_value"
    assert (await a.call("POST", "/batches", "admin",
                         json={"face_value": 5000, "quantity": 5, "manufacturer": "nobody"},
                         expect=422))["code"] == "unknown_manufacturer"
    assert (await a.call("GET", "/batches/999", "admin", expect=404))["code"] == \
        "batch_not_found"

    batch, _, _ = await _stocked_batch(a, tmp_path, 12)
    req = await a.call("POST", "/requests", "hm1", json={"face_value": 10000, "quantity": 4},
                       expect=201)
    # hall roles see only their hall, and request for it only (the hall named is not ignored)
    await a.call("GET", f"/requests/{req['id']}", "hm2", expect=403)
    other = await a.call("POST", "/requests", "hm1", expect=403,
                         json={"face_value": 10000, "quantity": 4, "hall": "H2"})
    assert other["code"] == "forbidden_hall"
    own = await a.call("POST", "/requests", "hm1", expect=201,
                       json={"face_value": 10000, "quantity": 1, "hall": "H1"})
    await a.call("POST", f"/requests/{own['id']}/reject", "appr", expect=200)
    assert (await a.call("POST", "/stocktakes", "hm1", json={"location": "H2"},
                         expect=403))["code"] == "forbidden_hall"
    # another hall's report is refused, not silently answered with the manager's own
    assert (await a.call("GET", "/reports/halls?hall=H2", "hm1",
                         expect=403))["code"] == "forbidden_hall"
    await a.call("GET", "/reports/halls?hall=H1", "hm1", expect=200)
    await a.call("GET", "/reports/halls", "hm1", expect=200)
    # maker-checker: the requester, later made an approver, still cannot approve it
    await a.pool.execute("UPDATE card_users SET role = 'approver', hall = NULL"
                         " WHERE username = 'hm1'")
    mc = await a.call("POST", f"/requests/{req['id']}/approve", "hm1", expect=403)
    assert mc["code"] == "maker_checker"
    assert (await a.call("GET", f"/requests/{req['id']}", "aud", expect=200))["state"] == \
        "pending"
    await a.call("POST", f"/requests/{req['id']}/reject", "appr", expect=200)
    await a.call("POST", f"/requests/{req['id']}/approve", "appr", expect=409)
    card = batch["first_serial"]
    assert (await a.call("GET", f"/cards/{card}", "cash1", expect=403))["code"] == \
        "forbidden_hall"

    # stocktake: two cards missing at the warehouse → void as lost needs an approver
    inv_serials = [r["serial"] for r in await a.pool.fetch(
        "SELECT serial FROM cards WHERE state = 'in_stock' ORDER BY serial")]
    st = await a.call("POST", "/stocktakes", "store",
                      json={"location": "warehouse", "serials": inv_serials[2:]}, expect=201)
    assert st["missing"] == inv_serials[:2] and st["unexpected"] == []
    assert st["expected"] == len(inv_serials) and st["counted"] == len(inv_serials) - 2
    # serials counted that should not be there: in byte order, each with what it is known as
    strays = [make_serial("999999", 5), make_serial("000001", 9)]
    odd = await a.call("POST", "/stocktakes", "store",
                       json={"location": "warehouse", "serials": [*strays, *inv_serials]},
                       expect=201)
    assert odd["missing"] == [] and odd["missing_count"] == 0
    assert odd["unexpected"] == [{"serial": s, "known_as": "unknown"} for s in sorted(strays)]
    void = await a.call("POST", "/voids", "admin", json={
        "reason": "lost", "serials": st["missing"], "stocktake_id": st["stocktake_id"]},
        expect=202)
    assert void["state"] == "pending_approval"
    assert await a.pool.fetchval("SELECT count(*) FROM cards WHERE state = 'voided'") == 0
    await a.call("POST", f"/voids/{void['void_id']}/approve", "admin", expect=403)
    done = await a.call("POST", f"/voids/{void['void_id']}/approve", "appr", expect=200)
    assert done["state"] == "done"
    assert await a.pool.fetchval("SELECT count(*) FROM cards WHERE state = 'voided'") == 2
    # other reasons void at once; an illegal one changes nothing
    await a.call("POST", "/voids", "admin", json={"reason": "damaged",
                                                 "serials": [inv_serials[2]]}, expect=200)
    refused = await a.call("POST", "/voids", "admin", json={
        "reason": "damaged", "serials": [inv_serials[2], inv_serials[3]]}, expect=409)
    assert refused["refused"] == [{"serial": inv_serials[2], "state": "voided"}]
    assert await a.pool.fetchval("SELECT state FROM cards WHERE serial = $1",
                                 inv_serials[3]) == "in_stock"
    # unlock is the approver's
    await a.pool.execute("UPDATE cards SET state = 'locked' WHERE serial = $1", inv_serials[4])
    await a.call("POST", f"/cards/{inv_serials[4]}/unlock", "admin", expect=403)
    out = await a.call("POST", f"/cards/{inv_serials[4]}/unlock", "appr", expect=200)
    assert out["state"] == "sold"
    # refused actions are logged too
    log = await a.call("GET", "/operation-log?limit=1000", "admin", expect=200)
    assert any(e["action"] == "request.decide" and e["result"].get("code") == "maker_checker"
               for e in log["entries"])


async def test_large_batches_run_as_jobs(admin_api: Api, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    a = admin_api
    monkeypatch.setattr(api, "SYNC_LIMIT", 10)
    resp = await a.client.post(f"{A}/batches", headers=await a.h("admin"), json={
        "face_value": 5000, "quantity": 2500, "manufacturer": "acme",
        "expiry": (dt.date.today() + dt.timedelta(days=30)).isoformat()})
    assert resp.status == 202
    doc = await resp.json()
    assert resp.headers["Location"] == f"{A}/jobs/{doc['job']['id']}"
    job = await _ended(a, doc["job"]["id"])
    assert job["state"] == "succeeded" and job["done"] == job["total"] == 2500
    assert job["progress"].startswith("[####")
    # the log said "accepted" at the start; how the job ended is logged too
    logged = await a.call("GET", "/operation-log?limit=100", "aud", expect=200)
    ended = [e for e in logged["entries"] if e["action"] == "job.finished"]
    assert [e["objects"]["job_id"] for e in ended] == [doc["job"]["id"]], ended
    assert ended[0]["actor"] == "admin" and ended[0]["result"]["ok"] is True
    assert ended[0]["result"]["done"] == 2500
    assert (await a.call("GET", "/operation-log/verify", "aud", expect=200))["ok"] is True
    view = await a.call("GET", f"/batches/{doc['batch_id']}", "admin", expect=200)
    assert view["counts"]["ordered"] == 2500 and view["status"] == "ordered"
    assert await a.pool.fetchval("SELECT count(DISTINCT tag) FROM cards") == 2500


async def test_a_job_that_outlasts_the_wait_is_accepted_not_failed(
        admin_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # an order below the job threshold is awaited; when the wait ran out first, the answer
    # was 503 job_failed while the job went on and made the batch: a client retrying the
    # "failed" order got a second batch
    a = admin_api
    monkeypatch.setattr(api, "SYNC_WAIT_S", 0.0)
    resp = await a.client.post(f"{A}/batches", headers=await a.h("admin"), json={
        "face_value": 5000, "quantity": 500, "manufacturer": "acme"})
    assert resp.status == 202, await resp.read()
    doc = await resp.json()
    assert resp.headers["Location"] == f"{A}/jobs/{doc['job']['id']}"
    job = await _ended(a, doc["job"]["id"])
    assert job["state"] == "succeeded"
    view = await a.call("GET", f"/batches/{doc['batch_id']}", "admin", expect=200)
    assert view["counts"]["ordered"] == 500
    logged = await a.call("GET", "/operation-log?limit=100", "aud", expect=200)
    entry = next(e for e in logged["entries"] if e["action"] == "batch.order")
    assert entry["result"]["ok"] is True and entry["result"]["status"] == 202, entry


def test_openapi_fragment_validates() -> None:
    from openapi_spec_validator import validate

    doc = {"openapi": "3.1.0", "info": {"title": "t", "version": "1"},
           "paths": ADMIN_OPENAPI_PATHS}
    validate(doc)
    assert "/admin/v1/batches/{id}/card-back-file" in ADMIN_OPENAPI_PATHS


async def test_an_action_and_its_log_entry_commit_together(admin_api: Api,
                                                           tmp_path: Path) -> None:
    a = admin_api
    await _stocked_batch(a, tmp_path, 4)
    serial = await a.pool.fetchval("SELECT min(serial) FROM cards WHERE state = 'in_stock'")
    # the operation log refuses the entry of a successful void: the void must not happen
    await a.pool.execute("""
        CREATE FUNCTION test_refuse_void_entry() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.action = 'void.create' AND (NEW.result->>'ok')::boolean THEN
                RAISE EXCEPTION 'the log refuses this entry (test)';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER test_refuse_void_entry BEFORE INSERT ON card_oplog
            FOR EACH ROW EXECUTE FUNCTION test_refuse_void_entry();""")
    try:
        resp = await a.client.post(f"{A}/voids", headers=await a.h("admin"),
                                   json={"reason": "damaged", "serials": [serial]})
        assert resp.status == 500
        assert await a.pool.fetchval("SELECT state FROM cards WHERE serial = $1",
                                     serial) == "in_stock"
        assert await a.pool.fetchval("SELECT count(*) FROM card_voids") == 0
    finally:
        await a.pool.execute("DROP TRIGGER test_refuse_void_entry ON card_oplog;"
                             " DROP FUNCTION test_refuse_void_entry()")
    # with the log writable again, the void and its one entry commit together
    void = await a.call("POST", "/voids", "admin",
                        json={"reason": "damaged", "serials": [serial]}, expect=200)
    assert await a.pool.fetchval("SELECT state FROM cards WHERE serial = $1",
                                 serial) == "voided"
    log = await a.call("GET", "/operation-log?limit=1000", "aud", expect=200)
    entries = [e for e in log["entries"] if e["action"] == "void.create"]
    assert len(entries) == 1
    assert entries[0]["result"] == {"ok": True, "status": 200, "void_id": void["void_id"],
                                    "state": "done"}
    assert entries[0]["objects"]["count"] == 1
    # a refused action is still logged, as a refusal, and changes nothing
    again = await a.call("POST", "/voids", "admin",
                         json={"reason": "damaged", "serials": [serial]}, expect=409)
    log = await a.call("GET", "/operation-log?limit=1000", "aud", expect=200)
    last = [e for e in log["entries"] if e["action"] == "void.create"][-1]
    assert last["result"]["ok"] is False and last["result"]["code"] == again["code"]
    assert (await a.call("GET", "/operation-log/verify", "aud", expect=200))["ok"] is True


async def test_a_stale_node_neither_expires_refuses_nor_logs(admin_api: Api,
                                                             tmp_path: Path) -> None:
    a = admin_api
    await _stocked_batch(a, tmp_path, 2)
    serial = await a.pool.fetchval("SELECT min(serial) FROM cards WHERE state = 'in_stock'")
    await a.pool.execute("UPDATE cards SET expiry = current_date - 1 WHERE serial = $1", serial)
    await a.h("admin")
    logged = await a.pool.fetchval("SELECT count(*) FROM card_oplog")
    await a.pool.execute("UPDATE node_lease SET epoch = epoch + 1")  # another node took over
    # the void would expire the card first (and then be refused): neither happens
    refused = await a.call("POST", "/voids", "admin",
                           json={"reason": "damaged", "serials": [serial]}, expect=503)
    assert refused["code"] == "standby"
    assert await a.pool.fetchval("SELECT state FROM cards WHERE serial = $1",
                                 serial) == "in_stock"
    assert await a.pool.fetchval("SELECT count(*) FROM card_voids") == 0
    assert await a.pool.fetchval("SELECT count(*) FROM card_oplog") == logged
    # and it knows it is no longer active
    again = await a.call("POST", "/voids", "admin",
                         json={"reason": "damaged", "serials": [serial]}, expect=503)
    assert again["code"] == "standby"


async def test_two_stock_ins_of_one_batch_at_once_one_is_refused(admin_api: Api,
                                                                  tmp_path: Path) -> None:
    """Both used to answer 200, one of them with no card moved; the second is now refused
    while the first runs, and the batch is stocked in once."""
    a = admin_api
    batch = await _order(a, 8)
    cbf, _ = await _card_back(a, tmp_path, batch, seed=7)
    await a.call("POST", f"/batches/{batch['id']}/card-back-file", "admin", data=cbf,
                 expect=200)
    path = f"/batches/{batch['id']}/stock-in"
    await a.h("admin")  # logged in before: the two requests arrive together
    async with a.pool.acquire() as con:  # the cards held: a stock-in waits, half done
        held = con.transaction()
        await held.start()
        await con.execute("SELECT 1 FROM cards WHERE batch_id = $1 FOR UPDATE", batch["id"])
        calls = [asyncio.create_task(a.call("POST", path, "admin")) for _ in range(2)]
        await asyncio.sleep(0.5)  # both past their look at the batch's status
        await held.rollback()
    first, second = await asyncio.gather(*calls)
    done = [r for r in (first, second) if "stocked_in" in r]
    refused = [r for r in (first, second) if "code" in r]
    assert len(done) == 1 and len(refused) == 1, (first, second)
    assert done[0]["stocked_in"] == 8
    assert refused[0]["code"] == "job_running", refused
    assert refused[0]["job_id"] in refused[0]["detail"]
    assert await a.pool.fetchval("SELECT count(*) FROM card_jobs WHERE kind = 'batch.stock_in'"
                                 " AND state = 'succeeded'") == 1
    assert await a.pool.fetchval("SELECT count(*) FROM cards WHERE state = 'in_stock'") == 8


async def test_a_stock_in_left_behind_by_a_runner_does_not_hold_its_batch(
        admin_api: Api, tmp_path: Path) -> None:
    """A job whose runner could not record its end (the database failed it) stays 'running'
    with nobody running it: after a while it no longer holds the batch."""
    from switch.cards import jobs

    a = admin_api
    batch = await _order(a, 4)
    cbf, _ = await _card_back(a, tmp_path, batch, seed=9)
    await a.call("POST", f"/batches/{batch['id']}/card-back-file", "admin", data=cbf,
                 expect=200)
    left = await jobs.create_job(a.pool, "batch.stock_in", total=4, actor="admin",
                                 object_id=str(batch["id"]))
    await a.pool.execute("UPDATE card_jobs SET state = 'running' WHERE id = $1", left)
    path = f"/batches/{batch['id']}/stock-in"
    held = await a.call("POST", path, "admin", expect=409)  # moved a moment ago: it holds
    assert held["code"] == "job_running" and held["job_id"] == str(left)
    await a.pool.execute("UPDATE card_jobs SET updated_at = now() - interval '1 minute'"
                         " WHERE id = $1", left)
    assert (await a.call("POST", path, "admin", expect=200))["stocked_in"] == 4
    row = await a.pool.fetchrow("SELECT state, error FROM card_jobs WHERE id = $1", left)
    assert row is not None and (row["state"], row["error"]) == ("failed", "interrupted")


async def test_a_stale_node_starts_no_job_and_a_fenced_job_answers_standby(
        admin_api: Api, tmp_path: Path) -> None:
    a = admin_api
    batch = await _order(a, 6)
    cbf, _ = await _card_back(a, tmp_path, batch, seed=5)
    await a.call("POST", f"/batches/{batch['id']}/card-back-file", "admin", data=cbf,
                 expect=200)
    logged = await a.pool.fetchval("SELECT count(*) FROM card_oplog")
    jobs_before = await a.pool.fetchval("SELECT count(*) FROM card_jobs")
    await a.pool.execute("UPDATE node_lease SET epoch = epoch + 1")  # another node took over
    refused = await a.call("POST", f"/batches/{batch['id']}/stock-in", "admin", expect=503)
    assert refused["code"] == "standby"
    assert await a.pool.fetchval("SELECT count(*) FROM cards WHERE state = 'in_stock'") == 0
    assert await a.pool.fetchval("SELECT count(*) FROM card_jobs") == jobs_before
    assert await a.pool.fetchval("SELECT count(*) FROM card_oplog") == logged
    # the job itself is fenced too: as if the lease moved while it ran
    from switch.cards import batches, jobs

    told: list[str] = []

    async def fenced() -> None:
        told.append("fenced")

    runner = jobs.JobRunner(a.pool, on_fenced=fenced)
    job_id = await jobs.create_job(a.pool, "batch.stock_in", total=6, actor="admin")
    stale = int(await a.pool.fetchval("SELECT epoch FROM node_lease")) - 1

    async def body(p: jobs.Progress) -> dict[str, Any]:
        return await batches.stock_in(a.pool, batch["id"], actor="admin", progress=p,
                                      epoch=stale)

    runner.start(job_id, 6, body)
    await runner.wait(job_id, 30)
    job = await jobs.get_job(a.pool, job_id)
    assert job["state"] == "failed" and job["result"] == {"code": "standby", "status": 503}
    assert await a.pool.fetchval("SELECT count(*) FROM cards WHERE state = 'in_stock'") == 0
    assert told == ["fenced"]  # the node is told, and steps down at once
    await runner.close()


async def test_a_stale_node_orders_no_batch(admin_api: Api) -> None:
    a = admin_api
    await a.h("admin")
    await a.pool.execute("UPDATE node_lease SET epoch = epoch + 1")  # another node took over
    refused = await a.call("POST", "/batches", "admin", json={
        "face_value": 10000, "quantity": 5, "manufacturer": "acme"}, expect=503)
    assert refused["code"] == "standby"
    assert await a.pool.fetchval("SELECT count(*) FROM card_batches") == 0
    assert await a.pool.fetchval("SELECT count(*) FROM card_jobs") == 0
    assert await a.pool.fetchval(
        "SELECT count(*) FROM card_oplog WHERE action = 'batch.order'") == 0


async def test_a_card_voided_before_its_card_back_file_does_not_block_the_batch(
        admin_api: Api, tmp_path: Path) -> None:
    a = admin_api
    batch = await _order(a, 5)
    await a.call("POST", "/voids", "admin",
                 json={"serials": [batch["first_serial"]], "reason": "damaged"}, expect=200)
    cbf, _ = await _card_back(a, tmp_path, batch, seed=1)
    await a.call("POST", f"/batches/{batch['id']}/card-back-file", "admin", data=cbf,
                 expect=200)
    view = await a.call("GET", f"/batches/{batch['id']}", "aud", expect=200)
    assert view["status"] == "reconciled"
    assert view["counts"]["produced"] == 4 and view["counts"]["voided"] == 1
    # the report counts the voided card as voided before the file, not as matched
    report = await a.pool.fetchval("SELECT reconciliation FROM card_batches WHERE id = $1",
                                   batch["id"])
    assert (report["matched"], report["voided_before"]) == (4, 1)


async def test_a_card_back_file_with_an_absurd_number_is_a_422(admin_api: Api) -> None:
    a = admin_api
    batch = await _order(a, 3)
    head = f"H|GRIDPAY-CARDBACK|1|{batch['id']}|1|acme|2026-11-26T10:00:00+00:00\n"
    body = head.encode() + \
        b"D|" + batch["first_serial"].encode() + b"|" + b"9" * 3000 + b"|1|OK|10000\n"
    refused = await a.call("POST", f"/batches/{batch['id']}/card-back-file", "admin",
                           data=body, expect=422)
    assert refused["code"] == "malformed_card_back_file" and "line 2" in refused["detail"]


async def test_a_card_back_file_of_another_maker_or_without_lines_is_refused(
        admin_api: Api, tmp_path: Path) -> None:
    a = admin_api
    batch = await _order(a, 3)
    good, _ = await _card_back(a, tmp_path, batch, seed=1)
    head, _, rest = good.partition(b"\n")
    fields = head.split(b"|")
    url = f"/batches/{batch['id']}/card-back-file"
    other = b"|".join([*fields[:5], b"evilco", fields[6]]) + b"\n" + rest
    refused = await a.call("POST", url, "admin", data=other, expect=422)
    assert refused["code"] == "wrong_manufacturer"
    undated = b"|".join([*fields[:6], b"not-a-date"]) + b"\n" + rest
    refused = await a.call("POST", url, "admin", data=undated, expect=422)
    assert refused["code"] == "malformed_card_back_file" and "line 1" in refused["detail"]
    endless = b"9" * (512 << 10)  # no newline: refused at the first long line
    refused = await a.call("POST", url, "admin", data=endless, expect=422)
    assert refused["code"] == "malformed_card_back_file" and "longer than" in refused["detail"]
    view = await a.call("GET", f"/batches/{batch['id']}", "aud", expect=200)
    assert view["status"] == "ordered"  # nothing changed
    await a.call("POST", url, "admin", data=good, expect=200)  # the real file still goes in


async def test_odd_input_gets_a_clear_answer_and_leaves_the_log_verifiable(
        admin_api: Api) -> None:
    a = admin_api
    # a NUL character, which PostgreSQL keeps in no text: the login query failed, a 500
    resp = await a.client.post(f"{A}/session", data=b'{"username": "a\\u0000", "password": "x"}',
                               headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["code"] == "invalid_text"
    # the same, 1 000 levels deep (orjson takes 1 024): the check recursed into a 500
    deep = b'{"username": ' + b"[" * 1000 + b'"\\u0000"' + b"]" * 1000 + b', "password": "x"}'
    resp = await a.client.post(f"{A}/session", data=deep,
                               headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["code"] == "invalid_text"
    # digits that str.isdigit() takes and int() does not: a ValueError, a 500
    refused = await a.call("GET", "/operation-log?limit=%C2%B2", "aud", expect=422)
    assert refused["code"] == "invalid_query"
    refused = await a.call("POST", "/batches/%C2%B2/stock-in", "admin", expect=422)
    assert refused["code"] == "invalid_id"
    # refused face values, logged as they came: -0.0 came back from jsonb as 0.0 and 1e+16
    # as 10000000000000000, so verification found the entries altered
    for face in (b"-0.0", b"1e16", b"0.5"):
        resp = await a.client.post(f"{A}/requests", data=b'{"face_value": ' + face
                                   + b', "quantity": 1}',
                                   headers={**await a.h("hm1"),
                                            "Content-Type": "application/json"})
        assert resp.status == 422, await resp.read()
    verified = await a.call("GET", "/operation-log/verify", "aud", expect=200)
    assert verified["ok"] is True, verified
    logged = await a.call("GET", "/operation-log?limit=100", "aud", expect=200)
    faces = [e["objects"].get("face_value") for e in logged["entries"]
             if e["action"] == "request.create"]
    assert faces == ["(not valid: not logged)"] * 3, faces  # refused values are not kept


async def test_an_order_cut_off_is_resumed_and_its_file_is_whole(admin_api: Api) -> None:
    # a stop or a switchover in the middle of generation left the batch failed with the
    # chunks made so far, and nothing took it up again
    from switch.cards import jobs

    a = admin_api
    batch = await _order(a, 2500)  # three chunks of the HSM's
    bid = batch["id"]
    whole = await a.call("GET", f"/batches/{bid}/new-card-file", "admin", expect=200)
    # as if cut off after its first chunk: the rest never written, the job orphaned
    await a.pool.execute("DELETE FROM card_file_chunks WHERE batch_id = $1 AND seq > 0", bid)
    await a.pool.execute("DELETE FROM card_events WHERE serial IN (SELECT serial FROM cards"
                         " WHERE batch_id = $1 ORDER BY serial OFFSET 1000)", bid)
    await a.pool.execute("DELETE FROM cards WHERE serial IN (SELECT serial FROM cards"
                         " WHERE batch_id = $1 ORDER BY serial OFFSET 1000)", bid)
    await a.pool.execute("UPDATE card_batches SET status = 'generating' WHERE id = $1", bid)
    await jobs.fail_interrupted(a.pool)  # what the node taking over does
    assert (await a.call("GET", f"/batches/{bid}", "aud", expect=200))["status"] == "failed"
    resumed = await a.client.post(f"{A}/batches/{bid}/resume", headers=await a.h("admin"))
    assert resumed.status == 202, await resumed.read()
    job = await _ended(a, (await resumed.json())["job"]["id"])
    assert job["state"] == "succeeded" and job["done"] == 2500, job
    view = await a.call("GET", f"/batches/{bid}", "aud", expect=200)
    assert view["status"] == "ordered" and view["counts"]["ordered"] == 2500
    assert view["generate_job"] == job["id"]  # the batch names the job that finished it
    again = await a.call("GET", f"/batches/{bid}/new-card-file", "admin", expect=200)
    ncf = parse_new_card_file(again.splitlines(keepends=True))
    assert len(ncf.records) == 2500
    assert again.splitlines()[:1001] == whole.splitlines()[:1001]  # the first chunk as made
    # only a failed batch is resumed, and only by a card admin
    refused = await a.call("POST", f"/batches/{bid}/resume", "admin", expect=409)
    assert refused["code"] == "batch_state"
    await a.call("POST", f"/batches/{bid}/resume", "aud", expect=403)
    await a.call("POST", "/batches/999999/resume", "admin", expect=404)


async def _issued_to_h1(a: Api, tmp: Path, quantity: int) -> list[str]:
    await _stocked_batch(a, tmp, quantity)
    req = await a.call("POST", "/requests", "hm1",
                       json={"face_value": 10000, "quantity": quantity}, expect=201)
    await a.call("POST", f"/requests/{req['id']}/approve", "appr", expect=200)
    issue = await a.call("POST", f"/requests/{req['id']}/issue", "store", expect=201)
    return [s for r in issue["ranges"] for s in SerialRange(r["first"], r["last"])]


async def test_an_unlock_takes_only_a_locked_card_and_a_sale_only_an_issued_one(
        admin_api: Api, tmp_path: Path) -> None:
    """Both end in `sold`, but an unlock of an unsold card would make a card nobody paid for
    redeemable, and a sale of a locked card would count it sold twice and skip the approver."""
    a = admin_api
    issued, locked = (await _issued_to_h1(a, tmp_path, 2))[:2]
    refused = await a.call("POST", f"/cards/{issued}/unlock", "appr", expect=409)
    assert refused["code"] == "illegal_transition"
    assert refused["refused"] == [{"serial": issued, "state": "issued"}]
    await a.call("POST", "/sales", "cash1", json={"serials": [locked]}, expect=201)
    async with a.pool.acquire() as con:
        assert await states.record_wrong_pin(con, locked, 1) == (1, True)
    resold = await a.call("POST", "/sales", "cash1", json={"serials": [locked]}, expect=409)
    assert resold["refused"] == [{"serial": locked, "state": "locked"}]
    assert await a.pool.fetchval("SELECT count(*) FROM card_sales") == 1
    rows = {r["serial"]: r["state"] for r in await a.pool.fetch(
        "SELECT serial, state FROM cards WHERE serial = ANY($1::text[])", [issued, locked])}
    assert rows == {issued: "issued", locked: "locked"}
    out = await a.call("POST", f"/cards/{locked}/unlock", "appr", expect=200)
    assert out["state"] == "sold"


async def test_a_card_back_file_after_the_expiry_date_expires_the_cards_and_erases_the_pins(
        admin_api: Api, tmp_path: Path) -> None:
    a = admin_api
    batch = await _order(a, 5)
    cbf, _ = await _card_back(a, tmp_path, batch)
    await a.pool.execute("UPDATE cards SET expiry = current_date - 1 WHERE batch_id = $1",
                         batch["id"])
    await a.pool.execute("UPDATE card_batches SET expiry = current_date - 1 WHERE id = $1",
                         batch["id"])
    report = await a.call("POST", f"/batches/{batch['id']}/card-back-file", "admin", data=cbf,
                          expect=200)
    assert (report["matched"], report["expired"]) == (5, 5)
    view = await a.call("GET", f"/batches/{batch['id']}", "aud", expect=200)
    assert view["status"] == "reconciled" and view["counts"]["expired"] == 5
    assert view["new_card_file_purged"] is True
    assert await a.pool.fetchval("SELECT count(*) FROM card_file_chunks WHERE batch_id = $1",
                                 batch["id"]) == 0


async def test_reports_and_approved_voids_treat_a_card_past_expiry_as_expired(
        admin_api: Api, tmp_path: Path) -> None:
    a = admin_api
    batch, _, _ = await _stocked_batch(a, tmp_path, 4)
    s1, s2, s3 = [r["serial"] for r in await a.pool.fetch(
        "SELECT serial FROM cards WHERE batch_id = $1 ORDER BY serial LIMIT 3", batch["id"])]
    void = await a.call("POST", "/voids", "admin", json={"serials": [s1], "reason": "lost"},
                        expect=202)
    other = await a.call("POST", "/voids", "admin", json={"serials": [s3], "reason": "lost"},
                         expect=202)
    await a.call("POST", f"/voids/{other['void_id']}/reject", "appr", expect=200)
    await a.pool.execute("UPDATE cards SET expiry = current_date - 1 WHERE serial = ANY($1)",
                         [s1, s2, s3])
    view = await a.call("GET", f"/batches/{batch['id']}", "aud", expect=200)
    inv = await a.call("GET", "/inventory", "aud", expect=200)
    assert view["counts"]["expired"] == inv["by_state"]["expired"] == 3
    assert view["counts"]["in_stock"] == 1
    # a refused approval (of a void already rejected) changes nothing, not even the lazy
    # expiry
    await a.call("POST", f"/voids/{other['void_id']}/approve", "appr", expect=409)
    assert await a.pool.fetchval("SELECT state FROM cards WHERE serial = $1", s3) == "in_stock"
    direct = await a.call("POST", "/voids", "admin",
                          json={"serials": [s2], "reason": "damaged"}, expect=409)
    approved = await a.call("POST", f"/voids/{void['void_id']}/approve", "appr", expect=409)
    assert direct["refused"] == [{"serial": s2, "state": "expired"}]
    assert approved["refused"] == [{"serial": s1, "state": "expired"}]
    assert {r["state"] for r in await a.pool.fetch(
        "SELECT state FROM cards WHERE serial = ANY($1::text[])", [s1, s2])} == {"expired"}


async def test_a_card_back_file_far_larger_than_its_batch_is_refused_while_read(
        admin_api: Api) -> None:
    """A 3-card batch takes at most 1 006 records (every card twice, and 1 000 serials that are
    not its own): a larger file is refused as it is read, not held in memory whole."""
    a = admin_api
    batch = await _order(a, 3)
    first = batch["first_serial"]
    rec = b"D|" + first.encode() + b"|1|1|OK|10000\n"
    n = 5000
    for announced in (n, 3):  # refused by the header's count, or by the records themselves
        head = (f"H|GRIDPAY-CARDBACK|1|{batch['id']}|{announced}|acme|"
                "2026-11-26T10:00:00+00:00\n").encode()
        body = head + rec * n + f"T|{n}|{n * 10000}|{'0' * 64}\n".encode()
        refused = await a.call("POST", f"/batches/{batch['id']}/card-back-file", "admin",
                               data=body, expect=422)
        assert refused["code"] == "malformed_card_back_file"
        where = "line 1" if announced == n else "line 1008"
        assert where in refused["detail"] and "1006" in refused["detail"], refused["detail"]
    view = await a.call("GET", f"/batches/{batch['id']}", "aud", expect=200)
    assert view["status"] == "ordered" and view["counts"]["ordered"] == 3
