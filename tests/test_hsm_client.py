"""The switch's HSM client and the dev key ceremony, against the real simulator over TCP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import signal
import sys
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from prometheus_client import CollectorRegistry

from bench.hsm import run as bench_run
from crypto.cmac import kcv, mac8
from crypto.lmk import LmkComponent
from crypto.pinblock import decipher_format4, encipher_format4
from crypto.tr31 import KeyBlockHeader, unwrap, wrap
from crypto.voucher import voucher_tag
from hsm_sim.server import HsmServer, start_server
from switch.hsm_client import (
    HsmClient,
    HsmError,
    HsmTimeout,
    HsmUnavailable,
    KeyBlock,
    VoucherRecord,
)
from switch.keys import (
    KeyProvisioningError,
    KeyRing,
    dev_keys_json,
    load_dev_keys,
    provision_dev_keys,
)
from tests.nodekit import HSM_SETTINGS

SETTINGS = HSM_SETTINGS  # the conftest's hsm_server runs these
DEV = load_dev_keys()
SERIALS = [f"1302250{i:08d}9" for i in range(3)]


@pytest.fixture
async def hsm(hsm_server: HsmServer) -> AsyncIterator[HsmClient]:
    async with HsmClient("127.0.0.1", hsm_server.port, pool_size=2, timeout=2.0) as client:
        yield client


@pytest.fixture
async def ring(hsm: HsmClient) -> KeyRing:
    return await provision_dev_keys(hsm, DEV)


async def test_diagnostics_and_echo(hsm: HsmClient, hsm_server: HsmServer) -> None:
    assert await hsm.diagnostics() == (hsm_server.lmk_kcv, SETTINGS.firmware)
    assert await hsm.echo(b"\x00\x01hello") == b"\x00\x01hello"
    assert hsm.connected >= 1


async def test_generate_export_import_roundtrip(hsm: HsmClient, ring: KeyRing) -> None:
    kek = ring.block("kek:acme")  # K0, wrap only
    generated = await hsm.generate_key("P0", export_under=ring.block("kek:ceremony"))
    assert generated.exported_block is not None
    assert await hsm.key_check_value(generated.key_block) == generated.kcv
    exported, check = await hsm.export_key(kek, generated.key_block)
    assert check == generated.kcv
    # the manufacturer (holding its clear KEK) gets the same key
    _, clear = unwrap(dict(DEV.manufacturer_kek)["acme"], exported.text)
    assert kcv(clear).hex().upper() == generated.kcv
    # re-import what was exported under the ceremony KEK
    block, check2 = await hsm.import_key(ring.block("kek:ceremony"), generated.exported_block,
                                         expected_kcv=generated.kcv)
    assert check2 == generated.kcv and block.key_usage == "P0"


async def test_dev_ceremony_keys_match_the_clear_test_keys(hsm: HsmClient,
                                                           ring: KeyRing) -> None:
    assert set(ring.names()) >= {"kek:ceremony", "mac:01020000", "mac:01000000", "pin:ivr",
                                 "vvk", "print:acme", "kek:acme", "print_export:acme"}
    for institution in ("01020000", "01000000"):
        data = b"0200" + institution.encode() + bytes(100)
        mac = await hsm.generate_mac(ring.mac_key(institution), data)
        assert mac == mac8(DEV.mac_key(institution), data)
        assert await hsm.verify_mac(ring.mac_key(institution), data, mac)
        assert not await hsm.verify_mac(ring.mac_key(institution), data + b"!", mac)
        assert ring.entry(f"mac:{institution}").kcv == kcv(DEV.mac_key(institution)).hex().upper()
    # the manufacturer recovers its print key from the exported block
    kek = dict(DEV.manufacturer_kek)["acme"]
    assert unwrap(kek, ring.block("print_export:acme").text)[1] == DEV.print_key("acme")
    rows = ring.as_rows()
    assert KeyRing.from_rows(rows) == ring


async def test_key_separation_through_the_client(hsm: HsmClient, ring: KeyRing) -> None:
    with pytest.raises(HsmError) as info:
        await hsm.generate_mac(ring.ivr_pin_key, b"data")
    assert (info.value.code, info.value.command) == ("A6", "M6")
    block = encipher_format4(DEV.ivr_pin_key, "123456789012", SERIALS[0]).hex()
    with pytest.raises(HsmError) as info:
        await hsm.voucher_verify(ring.mac_key("01020000"), ring.vvk, SERIALS[0], block,
                                 "00" * 32)
    assert info.value.code == "A6"
    # the message names the code and command, never the data
    assert "A6" in str(info.value) and "ZV" in str(info.value)
    assert block not in str(info.value) and ring.vvk.text not in str(info.value)


async def test_voucher_generate_and_verify(hsm: HsmClient, ring: KeyRing) -> None:
    serials = [f"1302250{i:08d}9" for i in range(2500)]  # three requests, sent concurrently
    records = await hsm.voucher_generate(ring.vvk, ring.print_key("acme"), serials)
    assert [r.serial for r in records] == serials
    vvk = DEV.voucher_verification_key
    assert vvk is not None
    for record in records[::250]:
        pin = decipher_format4(DEV.print_key("acme"), bytes.fromhex(record.encrypted_pin),
                               record.serial)
        assert bytes.fromhex(record.tag) == voucher_tag(vvk, record.serial, pin)
        good = encipher_format4(DEV.ivr_pin_key, pin, record.serial).hex()
        assert await hsm.voucher_verify(ring.ivr_pin_key, ring.vvk, record.serial, good,
                                        record.tag)
        wrong_pin = str((int(pin) + 1) % 10**12).zfill(12)
        bad = encipher_format4(DEV.ivr_pin_key, wrong_pin, record.serial).hex()
        assert not await hsm.voucher_verify(ring.ivr_pin_key, ring.vvk, record.serial, bad,
                                            record.tag)
        assert pin not in repr(record) and record.encrypted_pin not in repr(record)


async def test_reprs_are_masked(hsm: HsmClient, ring: KeyRing) -> None:
    generated = await hsm.generate_key("M6")
    for text in (repr(generated), str(generated.key_block), repr(ring), repr(DEV)):
        assert generated.key_block.text not in text
        assert ring.vvk.text not in text
        for _, key in DEV.institution_mac:
            assert key.hex().upper() not in text.upper()
    shown = repr(VoucherRecord("1", "A1B2C3D4E5", "F6A7B8C9D0"))
    assert "A1B2C3D4E5" not in shown and "F6A7B8C9D0" not in shown
    with pytest.raises(ValueError):
        KeyBlock("not a block")


async def test_metrics(hsm_server: HsmServer) -> None:
    registry = CollectorRegistry()
    async with HsmClient("127.0.0.1", hsm_server.port, registry=registry) as client:
        await client.echo(b"x")
        with pytest.raises(HsmError):
            await client.key_check_value(KeyBlock("D0016P0AB00N0000"))
    assert registry.get_sample_value(
        "gridpay_hsm_requests_total", {"command": "B2", "result": "00"}) == 1.0
    assert registry.get_sample_value(
        "gridpay_hsm_requests_total", {"command": "BU", "result": "80"}) == 1.0
    assert registry.get_sample_value(
        "gridpay_hsm_request_seconds_count", {"command": "B2"}) == 1.0


async def test_fail_fast_when_down_and_recovery(hsm_server: HsmServer) -> None:
    port = hsm_server.port
    registry = CollectorRegistry()
    client = HsmClient("127.0.0.1", port, timeout=2.0, registry=registry)
    await client.start()
    try:
        assert await client.echo(b"up") == b"up"
        hsm_server.close()
        await hsm_server.wait_closed()
        started = time.perf_counter()
        for _ in range(50):
            with pytest.raises(HsmUnavailable):
                await client.echo(b"down")
        assert time.perf_counter() - started < 0.5  # no request waited for its timeout
        assert registry.get_sample_value(
            "gridpay_hsm_requests_total", {"command": "B2", "result": "unavailable"}) == 50
        # the simulator comes back on the same port: the client reconnects by itself
        async with await start_server(dataclasses.replace(SETTINGS, port=port)):
            deadline = time.monotonic() + 3.0
            while True:
                try:
                    assert await client.echo(b"again") == b"again"
                    break
                except HsmUnavailable:
                    assert time.monotonic() < deadline, "no reconnection within 3 s"
                    await asyncio.sleep(0.05)
    finally:
        await client.close()


async def test_unreachable_at_start_fails_fast() -> None:
    client = HsmClient("127.0.0.1", 1, timeout=2.0)
    await client.start()  # does not raise
    started = time.perf_counter()
    with pytest.raises(HsmUnavailable) as info:
        await client.diagnostics()
    assert info.value.command == "NC"
    assert time.perf_counter() - started < 0.3
    await client.close()


async def test_timeout_when_the_hsm_does_not_answer() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1 << 16):  # swallow requests, never answer
            pass
        writer.close()

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with HsmClient("127.0.0.1", port, pool_size=1, timeout=0.2) as client:
            started = time.perf_counter()
            with pytest.raises(HsmTimeout):
                await client.echo(b"hello?")
            assert 0.15 < time.perf_counter() - started < 1.0
    finally:
        srv.close()


async def test_concurrent_requests_share_pipelined_connections(hsm: HsmClient) -> None:
    results = await asyncio.gather(*(hsm.echo(f"{i}".encode()) for i in range(2000)))
    assert results == [f"{i}".encode() for i in range(2000)]
    assert hsm.connected <= 2


async def test_ceremony_refuses_an_hsm_with_another_lmk(hsm_server: HsmServer) -> None:
    other = dataclasses.replace(DEV, lmk_components=tuple(reversed(DEV.lmk_components)))
    assert other.dev_lmk_kcv == DEV.dev_lmk_kcv  # XOR is commutative: same LMK
    fake = LmkComponent(value_hex="11" * 32, kcv_hex=kcv(bytes([0x11]) * 32).hex())
    foreign = dataclasses.replace(SETTINGS, lmk_components=(fake, DEV.lmk_components[0]))
    async with await start_server(foreign) as srv, HsmClient("127.0.0.1", srv.port) as client:
        with pytest.raises(KeyProvisioningError):
            await provision_dev_keys(client, DEV)


async def test_ceremony_needs_authorised_state() -> None:
    async with await start_server(dataclasses.replace(SETTINGS, authorised=False)) as srv, \
            HsmClient("127.0.0.1", srv.port) as client:
        with pytest.raises(HsmError) as info:
            await provision_dev_keys(client, DEV)
        assert info.value.code == "17"


def test_dev_keys_json_refused_unless_dev_lmk() -> None:
    with pytest.raises(KeyProvisioningError):
        dev_keys_json(DEV, lmk_is_dev=False)
    doc = orjson.loads(dev_keys_json(DEV, lmk_is_dev=True))
    assert doc["test_only"] is True
    assert doc["institution_mac"]["01020000"]["key"] == DEV.mac_key("01020000").hex().upper()
    assert set(doc) >= {"ivr_pin_key", "manufacturer_print", "manufacturer_kek"}


def test_load_dev_keys_refuses_a_non_dev_config(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "prod.toml"
    path.write_text("[hsm]\ndev_lmk = false\n[dev_keys]\n")
    with pytest.raises(KeyProvisioningError):
        load_dev_keys(path)


def test_dev_key_blocks_built_by_crypto_are_importable() -> None:
    # The ceremony's wrapping under the KEK is plain TR-31: psec-independent sanity check.
    block = wrap(DEV.ceremony_kek, KeyBlockHeader(key_usage="M6", algorithm="A",
                                                  mode_of_use="C"), DEV.mac_key("01020000"))
    assert unwrap(DEV.ceremony_kek, block)[1] == DEV.mac_key("01020000")


async def test_bench_run_measures_mac_verifications(hsm_server: HsmServer) -> None:
    result = await bench_run("127.0.0.1", hsm_server.port, 0.3, 8)
    assert result["verifications"] > 0 and result["errors"] == 0
    assert result["mismatches"] == 0 and result["verifications_per_s"] > 0


async def test_gridpay_hsm_main_ready_line_and_clean_exit() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hsm_sim", "--port", "0", "--authorised",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.startswith(b"READY ")
        info = json.loads(line[6:])
        async with HsmClient("127.0.0.1", int(info["port"])) as client:
            kcv_, _ = await client.diagnostics()
            assert kcv_ == DEV.dev_lmk_kcv
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
