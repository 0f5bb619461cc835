"""The simulator's working-key cache: served keys are always the right ones, whatever was
cached before, and a block that is bad or used for the wrong purpose is refused every time.

Over a real socket where the answer is what matters, and on `HsmCore` directly (real crypto)
where the bound of the cache is.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator

import pytest

from crypto.cmac import kcv, mac8
from crypto.pinblock import encipher_format4
from crypto.tr31 import KeyBlockHeader, unwrap, wrap
from crypto.voucher import voucher_tag
from hsm_sim.core import HsmCore
from hsm_sim.server import HsmServer, start_server
from hsm_sim.wire import data_field
from hsm_sim.wire import key_block_field as KB
from tests.nodekit import HSM_SETTINGS
from tests.test_hsm_sim import (
    LMK,
    MAC_C,
    MAC_KEY,
    MAC_V,
    PIN_B,
    PIN_KEY,
    VVK,
    VVK_C,
    Raw,
    lmk_block,
)

CACHE = 8  # small, so that the tests below go well past it
SERIAL = "1302250000000019"
DATA = b"0200" + bytes(range(120))


@pytest.fixture
async def small_cache() -> AsyncIterator[HsmServer]:
    settings = dataclasses.replace(HSM_SETTINGS, key_cache_size=CACHE)
    async with await start_server(settings) as srv:
        yield srv


@pytest.fixture
async def raw(small_cache: HsmServer) -> AsyncIterator[Raw]:
    conn = await Raw.open(small_cache.port)
    yield conn
    await conn.close()


async def test_each_block_gets_its_own_key_past_the_cache_size(raw: Raw) -> None:
    blocks: list[str] = []
    for _ in range(5 * CACHE):
        code, r = await raw.call("A0", b"0M6CN")
        assert code == "00"
        blocks.append(r.key_block())
    keys = {block: unwrap(LMK, block)[1] for block in blocks}
    assert len(set(keys.values())) == len(blocks)
    rng = random.Random(5)
    for _ in range(3):  # in a new order each round: hits, misses and evictions mixed
        order = blocks[:]
        rng.shuffle(order)
        for i, block in enumerate(order):
            data = DATA + bytes([i])
            code, r = await raw.call("M6", KB(block) + data_field(data))
            assert (code, r.hex(16)) == ("00", mac8(keys[block], data))
            right = mac8(keys[block], data).hex().encode()
            other = mac8(keys[order[i - 1]], data).hex().encode()
            assert await raw.code("M8", KB(block) + data_field(data) + right) == "00"
            assert await raw.code("M8", KB(block) + data_field(data) + other) == "01"
            code, r = await raw.call("BU", KB(block))
            assert (code, r.text(6)) == ("00", kcv(keys[block]).hex().upper())


async def test_bad_blocks_are_refused_after_a_good_one_was_cached(raw: Raw) -> None:
    assert await raw.code("M6", KB(MAC_C) + data_field(DATA)) == "00"  # now cached
    body_tampered = MAC_C[:20] + ("0" if MAC_C[20] != "0" else "1") + MAC_C[21:]
    mac_tampered = MAC_C[:-1] + ("0" if MAC_C[-1] != "0" else "1")
    usage_tampered = MAC_C[:5] + "P0" + MAC_C[7:]
    mode_tampered = MAC_C[:8] + "G" + MAC_C[9:]
    other_lmk = wrap(bytes(32), KeyBlockHeader(key_usage="M6", algorithm="A",
                                               mode_of_use="C"), MAC_KEY)
    for _ in range(2):  # a refusal is not cached either
        for bad in (body_tampered, mac_tampered, usage_tampered, mode_tampered, other_lmk):
            assert await raw.code("M6", KB(bad) + data_field(DATA)) == "10"
            assert await raw.code("BU", KB(bad)) == "10"
        assert await raw.code("M6", KB(MAC_C)[:-4] + data_field(DATA)) == "80"
        assert await raw.code("M6", b"SD01X" + MAC_C[5:].encode() + data_field(DATA)) == "A4"
    code, r = await raw.call("M6", KB(MAC_C) + data_field(DATA))
    assert (code, r.hex(16)) == ("00", mac8(MAC_KEY, DATA))


async def test_a_cached_key_is_checked_for_its_use_every_time(raw: Raw) -> None:
    mac = mac8(MAC_KEY, DATA).hex().encode()
    pin_block = encipher_format4(PIN_KEY, "1234", SERIAL).hex().encode()
    tag = voucher_tag(VVK, SERIAL, "1234").hex().encode()
    zv_tail = b"48" + SERIAL.encode() + pin_block + tag
    for _ in range(3):
        assert await raw.code("M8", KB(MAC_V) + data_field(DATA) + mac) == "00"
        assert await raw.code("M6", KB(MAC_V) + data_field(DATA)) == "A8"  # verify-only
        assert await raw.code("ZV", KB(PIN_B) + KB(VVK_C) + zv_tail) == "00"
        assert await raw.code("M6", KB(PIN_B) + data_field(DATA)) == "A6"  # PIN key, MAC use
        assert await raw.code("ZV", KB(MAC_C) + KB(VVK_C) + zv_tail) == "A6"
        assert await raw.code("ZV", KB(PIN_B) + KB(PIN_B) + zv_tail) == "A6"
        assert await raw.code("M6", KB(VVK_C) + data_field(DATA)) == "A6"


async def test_pin_verification_with_a_cached_pin_key_stays_exact(raw: Raw) -> None:
    rng = random.Random(9)
    for i in range(60):
        pin = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 12)))
        tag = voucher_tag(VVK, SERIAL, pin).hex().encode()
        right = encipher_format4(PIN_KEY, pin, SERIAL).hex().encode()
        wrong_pin = pin[:-1] + ("0" if pin[-1] != "0" else "1")
        wrong = encipher_format4(PIN_KEY, wrong_pin, SERIAL).hex().encode()
        block, expected = (right, "00") if i % 2 else (wrong, "01")
        assert await raw.code("ZV", KB(PIN_B) + KB(VVK_C) + b"48" + SERIAL.encode()
                              + block + tag) == expected


def test_the_cache_is_bounded_and_never_shows_a_key() -> None:
    core = HsmCore(LMK, authorised=False, cache_size=4)
    keys = [bytes([i]) * 16 for i in range(1, 21)]
    blocks = [lmk_block("M6", "A", "C", key) for key in keys]
    for _ in range(2):
        for n, (key, block) in enumerate(zip(keys, blocks, strict=True)):
            answer = core.handle(f"{n:04d}".encode() + b"M6" + KB(block) + data_field(DATA))
            assert answer[4:8] == b"M700"
            assert answer[8:] == mac8(key, DATA).hex().upper().encode()
            assert core.cached_keys <= 4
    shown = repr(core) + "".join(repr(w) for w in core._cache.values())
    for key in keys:
        assert key.hex() not in shown.lower()
    assert "M6" in shown


def test_cache_size_setting_is_validated() -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(HSM_SETTINGS, key_cache_size=0)
