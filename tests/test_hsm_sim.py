"""The HSM simulator over a real socket: every command, its error codes, framing abuse,
pipelining, many connections, authorisation, key separation and no leaks."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crypto.cmac import kcv, mac8
from crypto.lmk import combine_lmk
from crypto.pinblock import decipher_format4, encipher_format4
from crypto.tr31 import KeyBlockHeader, unwrap, wrap
from crypto.voucher import voucher_tag
from hsm_sim.server import HsmServer, HsmSettings, start_server
from hsm_sim.wire import FieldReader, data_field, key_block_field
from tests.nodekit import HSM_SETTINGS

SETTINGS = HSM_SETTINGS  # the conftest's hsm_server runs these
LMK = combine_lmk(SETTINGS.lmk_components)
SERIAL = "1302250000000019"
SERIAL2 = "1302250000000027"


class Raw:
    """A bare client: frames in, frames out, nothing else."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.n = 0

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, message: bytes) -> None:
        self.writer.write(len(message).to_bytes(2, "big") + message)

    async def read(self) -> bytes:
        length = int.from_bytes(await asyncio.wait_for(self.reader.readexactly(2), 5), "big")
        return await asyncio.wait_for(self.reader.readexactly(length), 5)

    async def call(self, command: str, fields: bytes = b"") -> tuple[str, FieldReader]:
        self.n += 1
        header = f"{self.n % 10000:04d}".encode()
        self.send(header + command.encode() + fields)
        reply = await self.read()
        assert reply[:4] == header
        assert reply[4:6] == (command[0] + chr(ord(command[1]) + 1)).encode()
        return reply[6:8].decode(), FieldReader(reply, 8)

    async def code(self, command: str, fields: bytes = b"") -> str:
        return (await self.call(command, fields))[0]

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def raw(hsm_server: HsmServer) -> AsyncIterator[Raw]:
    conn = await Raw.open(hsm_server.port)
    yield conn
    await conn.close()


def lmk_block(usage: str, algorithm: str, mode: str, key: bytes, export: str = "N",
              blocks: tuple[tuple[str, str], ...] = ()) -> str:
    """A key block under the dev LMK, built outside the HSM (test only)."""
    return wrap(LMK, KeyBlockHeader(key_usage=usage, algorithm=algorithm, mode_of_use=mode,
                                    exportability=export, optional_blocks=blocks), key)


KB = key_block_field
MAC_KEY = bytes(range(16))
PIN_KEY = bytes(range(16, 32))
PRINT_KEY = bytes(range(32, 48))
VVK = bytes(range(48, 80))
KEK = bytes(range(80, 112))
MAC_C = lmk_block("M6", "A", "C", MAC_KEY)
MAC_G = lmk_block("M6", "A", "G", MAC_KEY)
MAC_V = lmk_block("M6", "A", "V", MAC_KEY)
PIN_B = lmk_block("P0", "A", "B", PIN_KEY)
PRINT_E = lmk_block("P0", "A", "E", PRINT_KEY, export="E")
VVK_C = lmk_block("V0", "H", "C", VVK, blocks=(("HM", "21"),))
KEK_B = lmk_block("K1", "A", "B", KEK)
KEK_E = lmk_block("K0", "A", "E", KEK)
KEK_D = lmk_block("K0", "A", "D", KEK)


async def test_nc_diagnostics(raw: Raw, hsm_server: HsmServer) -> None:
    code, r = await raw.call("NC")
    assert code == "00"
    assert r.text(6) == kcv(LMK).hex().upper() == hsm_server.lmk_kcv
    assert r.raw(r.remaining).decode() == SETTINGS.firmware
    assert await raw.code("NC", b"X") == "80"


async def test_b2_echo(raw: Raw) -> None:
    code, r = await raw.call("B2", data_field(b"\x00hello\xff"))
    assert (code, r.raw(r.remaining)) == ("00", b"\x00hello\xff")
    assert await raw.code("B2", b"0010abc") == "80"
    assert await raw.code("B2", b"00G1a") == "15"
    assert await raw.code("B2", b"0001ab") == "80"


async def test_unknown_command_is_68(raw: Raw) -> None:
    assert await raw.code("ZZ") == "68"
    assert await raw.code("A1") == "68"


@pytest.mark.parametrize(("usage", "mode", "alg", "length"), [
    ("P0", "B", "A", 16), ("M6", "C", "A", 16), ("V0", "C", "H", 32), ("K0", "B", "A", 32),
    ("K1", "E", "A", 32),
])
async def test_a0_generates_each_usage(raw: Raw, usage: str, mode: str, alg: str,
                                       length: int) -> None:
    code, r = await raw.call("A0", f"0{usage}{mode}N".encode())
    assert code == "00"
    header, key = unwrap(LMK, r.key_block())
    assert (header.key_usage, header.mode_of_use, header.algorithm) == (usage, mode, alg)
    assert len(key) == length
    assert r.text(6) == kcv(key).hex().upper()
    r.end()


async def test_a0_with_export_under_kek(raw: Raw) -> None:
    code, r = await raw.call("A0", b"1P0EE" + KB(KEK_B))
    assert code == "00"
    _, key = unwrap(LMK, r.key_block())
    header, exported = unwrap(KEK, r.key_block())
    assert exported == key and header.key_usage == "P0"
    assert r.text(6) == kcv(key).hex().upper()


@pytest.mark.parametrize(("fields", "error"), [
    (b"0X9CN", "04"),          # unknown key type
    (b"0P0CN", "A8"),          # mode of use not permitted for a PIN key
    (b"0P0BQ", "A4"),          # exportability invalid
    (b"2P0BN", "15"),          # A0 mode
    (b"0P0B", "80"),           # truncated
    (b"1P0BN" + KB(KEK_B), "29"),   # export of a non-exportable key
    (b"1P0BE" + KB(MAC_C), "A6"),   # a MAC key is not a KEK
    (b"1P0BE" + KB(KEK_D), "A8"),   # an unwrap-only KEK cannot wrap
    (b"0P0BN" + b"junk", "80"),
])
async def test_a0_errors(raw: Raw, fields: bytes, error: str) -> None:
    assert await raw.code("A0", fields) == error


async def test_key_management_needs_authorised_state() -> None:
    settings = dataclasses.replace(SETTINGS, authorised=False)
    async with await start_server(settings) as srv:
        conn = await Raw.open(srv.port)
        try:
            assert await conn.code("A0", b"0P0BN") == "00"  # generating under the LMK is free
            assert await conn.code("A0", b"1P0BE" + KB(KEK_B)) == "17"
            under_kek = wrap(KEK, KeyBlockHeader(key_usage="P0", algorithm="A",
                                                 mode_of_use="B"), PIN_KEY)
            assert await conn.code("A6", KB(KEK_B) + KB(under_kek)) == "17"
            assert await conn.code("A8", KB(KEK_B) + KB(PRINT_E)) == "17"
        finally:
            await conn.close()


@pytest.mark.parametrize("written", ['"false"', '"no"', '"0"', "1", '""'])
def test_an_authorised_state_not_written_as_a_boolean_is_refused_at_start(
        tmp_path: Path, written: str) -> None:
    """Any non-empty value used to read as true: `authorised = "false"` started an HSM that
    imports and exports keys."""
    from hsm_sim.server import DEV_CONFIG, load_settings

    text = DEV_CONFIG.read_text()
    for name in ("authorised", "dev_lmk"):
        path = tmp_path / f"{name}.toml"
        path.write_text(re.sub(rf"^{name} = true", f"{name} = {written}", text, flags=re.M))
        with pytest.raises(ValueError, match=f"{name} must be true or false"):
            load_settings(path)
    assert load_settings(DEV_CONFIG).authorised is True


async def test_a6_import_and_errors(raw: Raw) -> None:
    header = KeyBlockHeader(key_usage="M6", algorithm="A", mode_of_use="C")
    under_kek = wrap(KEK, header, MAC_KEY)
    check = kcv(MAC_KEY).hex().upper().encode()
    code, r = await raw.call("A6", KB(KEK_B) + KB(under_kek) + check)
    assert code == "00"
    assert unwrap(LMK, r.key_block()) == (header, MAC_KEY)
    assert r.text(6).encode() == check
    assert await raw.code("A6", KB(KEK_B) + KB(under_kek)) == "00"  # KCV optional
    assert await raw.code("A6", KB(KEK_B) + KB(under_kek) + b"000000") == "10"
    tampered = under_kek[:-1] + ("0" if under_kek[-1] != "0" else "1")
    assert await raw.code("A6", KB(KEK_B) + KB(tampered)) == "10"
    assert await raw.code("A6", KB(PIN_B) + KB(under_kek)) == "A6"  # PIN key is not a KEK
    assert await raw.code("A6", KB(KEK_E) + KB(under_kek)) == "A8"  # wrap-only KEK
    d0 = wrap(KEK, KeyBlockHeader(key_usage="D0", algorithm="A", mode_of_use="B"), MAC_KEY)
    assert await raw.code("A6", KB(KEK_B) + KB(d0)) == "04"
    tdes = wrap(KEK, KeyBlockHeader(key_usage="P0", algorithm="T", mode_of_use="B"), MAC_KEY)
    assert await raw.code("A6", KB(KEK_B) + KB(tdes)) == "A7"
    bad_mode = wrap(KEK, KeyBlockHeader(key_usage="M6", algorithm="A", mode_of_use="B"),
                    MAC_KEY)
    assert await raw.code("A6", KB(KEK_B) + KB(bad_mode)) == "A8"
    assert await raw.code("A6", KB(KEK_B) + KB(under_kek) + b"0000") == "80"
    assert await raw.code("A6", KB(KEK_B) + KB(under_kek) + b"XYZXYZ") == "15"


async def test_a8_export_and_errors(raw: Raw) -> None:
    code, r = await raw.call("A8", KB(KEK_E) + KB(PRINT_E))
    assert code == "00"
    header, key = unwrap(KEK, r.key_block())
    assert key == PRINT_KEY and header.key_usage == "P0"
    assert r.text(6) == kcv(PRINT_KEY).hex().upper()
    assert await raw.code("A8", KB(KEK_E) + KB(MAC_C)) == "29"   # not exportable
    assert await raw.code("A8", KB(KEK_D) + KB(PRINT_E)) == "A8"  # unwrap-only KEK
    assert await raw.code("A8", KB(MAC_C) + KB(PRINT_E)) == "A6"


async def test_bu_and_key_block_field_errors(raw: Raw) -> None:
    code, r = await raw.call("BU", KB(MAC_C))
    assert (code, r.text(6)) == ("00", kcv(MAC_KEY).hex().upper())
    assert await raw.code("BU", b"T" + MAC_C.encode()) == "15"
    assert await raw.code("BU", b"SD0X12") == "A4"
    assert await raw.code("BU", KB(MAC_C)[:-5]) == "80"
    tampered = MAC_C[:20] + ("0" if MAC_C[20] != "0" else "1") + MAC_C[21:]
    assert await raw.code("BU", KB(tampered)) == "10"
    header_tampered = MAC_C[:5] + "P0" + MAC_C[7:]
    assert await raw.code("BU", KB(header_tampered)) == "10"
    assert await raw.code("BU", KB(wrap(bytes(32), KeyBlockHeader(
        key_usage="M6", algorithm="A", mode_of_use="C"), MAC_KEY))) == "10"  # other LMK
    assert await raw.code("BU", b"SX0016P0AB00N0000") == "A4"
    # authentic blocks of keys this HSM cannot hold: a refusal, not an internal error
    assert await raw.code("BU", KB(lmk_block("D0", "D", "B", bytes(8)))) == "A7"
    assert await raw.code("BU", KB(lmk_block("V0", "H", "C", bytes(20)))) == "10"
    assert await raw.code("A8", KB(KEK_E) + KB(lmk_block("V0", "H", "C", bytes(20),
                                                          export="E"))) == "10"
    # the block is text: a block in lower case is not the block that was issued
    body = MAC_C[1:] if MAC_C.startswith("S") else MAC_C
    lower = body[:16] + body[16:].lower()
    assert lower != body and await raw.code("BU", b"S" + lower.encode()) == "15"
    assert (await raw.call("B2", data_field(b"ok")))[0] == "00"  # the connection carries on


async def test_m6_m8_mac(raw: Raw) -> None:
    data = b"0200" + bytes(range(256))
    code, r = await raw.call("M6", KB(MAC_C) + data_field(data))
    mac = r.hex(16)
    assert (code, mac) == ("00", mac8(MAC_KEY, data))
    assert await raw.code("M8", KB(MAC_C) + data_field(data) + mac.hex().encode()) == "00"
    assert await raw.code("M8", KB(MAC_V) + data_field(data) + mac.hex().encode()) == "00"
    wrong = bytes([mac[0] ^ 1]) + mac[1:]
    assert await raw.code("M8", KB(MAC_C) + data_field(data) + wrong.hex().encode()) == "01"
    assert await raw.code("M8", KB(MAC_C) + data_field(data + b"x") + mac.hex().encode()) == "01"
    assert await raw.code("M6", KB(MAC_G) + data_field(data)) == "00"
    assert await raw.code("M6", KB(MAC_V) + data_field(data)) == "A8"   # verify-only key
    assert await raw.code("M8", KB(MAC_G) + data_field(data) + mac.hex().encode()) == "A8"
    assert await raw.code("M8", KB(MAC_C) + data_field(data) + b"ZZ" * 8) == "15"
    assert await raw.code("M8", KB(MAC_C) + data_field(data) + b"00") == "80"


async def test_key_separation(raw: Raw) -> None:
    data = data_field(b"payload")
    # a PIN key for a MAC: refused (usage)
    assert await raw.code("M6", KB(PIN_B) + data) == "A6"
    assert await raw.code("M8", KB(PIN_B) + data + b"00" * 8) == "A6"
    # a MAC key for a PIN: refused (usage)
    block = encipher_format4(PIN_KEY, "1234", SERIAL).hex().encode()
    tag = voucher_tag(VVK, SERIAL, "1234").hex().encode()
    assert await raw.code("ZV", KB(MAC_C) + KB(VVK_C) + b"48" + SERIAL.encode() + block
                          + tag) == "A6"
    assert await raw.code("ZG", KB(VVK_C) + KB(MAC_C) + b"120001" + SERIAL.encode()) == "A6"
    # a MAC key as voucher verification key, and an HMAC key as a MAC key
    assert await raw.code("ZG", KB(MAC_C) + KB(PRINT_E) + b"120001" + SERIAL.encode()) == "A6"
    assert await raw.code("M6", KB(VVK_C) + data) == "A6"
    # a KEK is not a PIN key
    assert await raw.code("ZG", KB(VVK_C) + KB(KEK_B) + b"120001" + SERIAL.encode()) == "A6"


async def test_zg_voucher_generate(raw: Raw) -> None:
    serials = [f"1302250{i:08d}9" for i in range(1000)]
    code, r = await raw.call("ZG", KB(VVK_C) + KB(PRINT_E) + b"121000"
                             + "".join(serials).encode())
    assert code == "00"
    pins = set()
    for serial in serials:
        tag, block = r.raw(32), r.raw(16)
        pin = decipher_format4(PRINT_KEY, block, serial)
        assert len(pin) == 12 and pin.isdigit()
        assert tag == voucher_tag(VVK, serial, pin)
        pins.add(pin)
    r.end()
    assert len(pins) == 1000


@pytest.mark.parametrize(("tail", "error"), [
    (b"130001" + SERIAL.encode(), "24"),
    (b"030001" + SERIAL.encode(), "24"),
    (b"120000", "15"),
    (b"121001" + SERIAL.encode() * 1001, "15"),
    (b"120002" + SERIAL.encode(), "80"),
    (b"120001" + b"13022500000000A9", "15"),
    (b"1X0001" + SERIAL.encode(), "15"),
])
async def test_zg_errors(raw: Raw, tail: bytes, error: str) -> None:
    assert await raw.code("ZG", KB(VVK_C) + KB(PRINT_E) + tail) == error


async def test_zg_print_key_must_encrypt(raw: Raw) -> None:
    decrypt_only = lmk_block("P0", "A", "D", PRINT_KEY)
    assert await raw.code("ZG", KB(VVK_C) + KB(decrypt_only) + b"120001"
                          + SERIAL.encode()) == "A8"


async def test_zv_voucher_verify(raw: Raw) -> None:
    pin = "402917365810"
    tag = voucher_tag(VVK, SERIAL, pin).hex().encode()
    block = encipher_format4(PIN_KEY, pin, SERIAL).hex().encode()

    async def zv(key: str, fmt: bytes, serial: str, pb: bytes, t: bytes) -> str:
        return await raw.code("ZV", KB(key) + KB(VVK_C) + fmt + serial.encode() + pb + t)

    assert await zv(PIN_B, b"48", SERIAL, block, tag) == "00"
    wrong = encipher_format4(PIN_KEY, "402917365811", SERIAL).hex().encode()
    assert await zv(PIN_B, b"48", SERIAL, wrong, tag) == "01"
    assert await zv(PIN_B, b"48", SERIAL2, block, tag) == "01"       # other card
    assert await zv(PIN_B, b"48", SERIAL, b"00" * 16, tag) == "01"    # garbage block
    other_key = encipher_format4(PRINT_KEY, pin, SERIAL).hex().encode()
    assert await zv(PIN_B, b"48", SERIAL, other_key, tag) == "01"
    assert await zv(PIN_B, b"01", SERIAL, block, tag) == "23"
    assert await zv(PIN_B, b"48", SERIAL, block[:-2], tag) == "80"
    assert await zv(PIN_B, b"48", SERIAL, b"G" * 32, tag) == "15"
    assert await zv(PRINT_E, b"48", SERIAL, block, tag) == "A8"      # encrypt-only key
    assert await raw.code("ZV", KB(PIN_B) + KB(MAC_C) + b"48" + SERIAL.encode() + block
                          + tag) == "A6"
    # a V0 key whose header names another hash, or none, is not an HMAC-SHA-256 key
    for blocks in ((("HM", "10"),), ()):
        sha1 = lmk_block("V0", "H", "C", VVK, blocks=blocks)
        assert await raw.code("ZV", KB(PIN_B) + KB(sha1) + b"48" + SERIAL.encode() + block
                              + tag) == "A7"
        assert await raw.code("ZG", KB(sha1) + KB(PRINT_E) + b"120001"
                              + SERIAL.encode()) == "A7"


async def test_a6_imports_a_voucher_key_only_as_hmac_sha256(raw: Raw) -> None:
    def vvk_under_kek(blocks: tuple[tuple[str, str], ...]) -> str:
        return wrap(KEK, KeyBlockHeader(key_usage="V0", algorithm="H", mode_of_use="C",
                                        optional_blocks=blocks), VVK)

    assert await raw.code("A6", KB(KEK_B) + KB(vvk_under_kek((("HM", "21"),)))) == "00"
    assert await raw.code("A6", KB(KEK_B) + KB(vvk_under_kek((("HM", "10"),)))) == "A7"
    assert await raw.code("A6", KB(KEK_B) + KB(vvk_under_kek(()))) == "A7"


async def test_invalid_length_header_closes_only_that_connection(hsm_server: HsmServer) -> None:
    bad = await Raw.open(hsm_server.port)
    bad.writer.write(b"\x00\x03abc")
    assert await asyncio.wait_for(bad.reader.read(10), 5) == b""
    await bad.close()
    good = await Raw.open(hsm_server.port)
    assert await good.code("NC") == "00"
    await good.close()


async def test_mutated_frames_get_error_codes_never_a_crash(raw: Raw) -> None:
    data = b"0200ABCDEF"
    valid = [
        b"NC", b"B2" + data_field(data), b"A0" + b"0M6CN", b"BU" + KB(MAC_C),
        b"M6" + KB(MAC_C) + data_field(data),
        b"M8" + KB(MAC_C) + data_field(data) + mac8(MAC_KEY, data).hex().encode(),
        b"A6" + KB(KEK_B) + KB(wrap(KEK, KeyBlockHeader(key_usage="M6", algorithm="A",
                                                        mode_of_use="C"), MAC_KEY)),
        b"A8" + KB(KEK_E) + KB(PRINT_E),
        b"ZG" + KB(VVK_C) + KB(PRINT_E) + b"120001" + SERIAL.encode(),
        b"ZV" + KB(PIN_B) + KB(VVK_C) + b"48" + SERIAL.encode() + b"00" * 16 + b"11" * 32,
    ]
    rng = random.Random(20240611)
    sent = 0
    for _ in range(600):
        body = bytearray(rng.choice(valid))
        action = rng.randrange(4)
        if action == 0:
            for _ in range(rng.randint(1, 4)):
                body[rng.randrange(len(body))] = rng.randrange(256)
        elif action == 1:
            del body[rng.randrange(2, len(body) + 1):]
        elif action == 2:
            body += bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        else:
            pos = rng.randrange(len(body))
            body[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        header = f"{sent:04d}".encode()
        raw.send(header + bytes(body))
        reply = await raw.read()
        assert reply[:4] == header
        assert len(reply) >= 8 and reply[6:8] != b"41"
        sent += 1
    assert await raw.code("NC") == "00"


async def test_pipelining_on_one_connection(raw: Raw) -> None:
    n = 1000
    for i in range(n):
        raw.send(f"{i:04d}".encode() + b"B2" + data_field(f"msg-{i}".encode()))
        if i % 3 == 0:
            raw.send(b"P" + f"{i:03d}".encode()[-3:] + b"M6" + KB(MAC_C) + data_field(b"x"))
    await raw.writer.drain()
    for i in range(n):
        reply = await raw.read()
        assert reply[:4] == f"{i:04d}".encode()
        assert reply[6:] == b"00" + f"msg-{i}".encode()
        if i % 3 == 0:
            mac_reply = await raw.read()
            assert mac_reply[4:8] == b"M700"
            assert mac_reply[8:] == mac8(MAC_KEY, b"x").hex().upper().encode()


async def test_many_connections(hsm_server: HsmServer) -> None:
    async def client(i: int) -> None:
        conn = await Raw.open(hsm_server.port)
        try:
            for j in range(20):
                code, r = await conn.call("B2", data_field(f"{i}/{j}".encode()))
                assert (code, r.raw(r.remaining)) == ("00", f"{i}/{j}".encode())
        finally:
            await conn.close()

    await asyncio.gather(*(client(i) for i in range(40)))


async def test_no_pin_key_or_pin_block_in_logs_or_responses(
        raw: Raw, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    code, r = await raw.call("ZG", KB(VVK_C) + KB(PRINT_E) + b"120002"
                             + (SERIAL + SERIAL2).encode())
    assert code == "00"
    reply_bytes = r.raw(r.remaining)
    tag, print_block = reply_bytes[:32], reply_bytes[32:48]
    pin = decipher_format4(PRINT_KEY, print_block, SERIAL)
    ivr_block = encipher_format4(PIN_KEY, pin, SERIAL).hex().upper()
    replies = [reply_bytes]
    for pb in (ivr_block, encipher_format4(PIN_KEY, "000000000000", SERIAL).hex().upper()):
        raw.send(b"LEAK" + b"ZV" + KB(PIN_B) + KB(VVK_C) + b"48" + SERIAL.encode()
                 + pb.encode() + tag.hex().upper().encode())
        replies.append(await raw.read())
    assert replies[1][4:8] == b"ZW00" and replies[2][4:8] == b"ZW01"
    assert len(replies[1]) == len(replies[2]) == 8  # match / no match, nothing else
    logged = caplog.text + " ".join(str(rec.__dict__) for rec in caplog.records)
    assert caplog.records  # the server did log the commands
    secrets_ = [pin, ivr_block, print_block.hex(), PIN_KEY.hex(), PRINT_KEY.hex(), VVK.hex(),
                LMK.hex()]
    for secret in secrets_:
        assert secret.lower() not in logged.lower()
        for reply in replies:
            assert secret.encode() not in reply
            assert secret.lower().encode() not in reply.lower()
    assert pin.encode() not in reply_bytes


def test_settings_validation() -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(SETTINGS, port=70000)
    with pytest.raises(ValueError):
        HsmSettings(lmk_components=SETTINGS.lmk_components[:1])
    assert SETTINGS.lmk_components[0].value_hex not in repr(SETTINGS)
