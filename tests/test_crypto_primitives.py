"""AES-CMAC known answers, KCV, LMK components, voucher tags."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from psec import aes as psec_aes
from psec import mac as psec_mac
from psec import tools as psec_tools
from psec import tr31 as psec_tr31

from crypto.cmac import aes_cmac, constant_time_equal, kcv, mac8
from crypto.errors import LmkError, PinBlockError
from crypto.lmk import LmkComponent, combine_lmk
from crypto.voucher import TAG_LABEL, generate_pin, voucher_tag, voucher_tag_matches

# NIST SP 800-38B, appendix D.1 (AES-128) and D.3 (AES-256).
M = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710")
K128 = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
K256 = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
NIST = [
    (K128, 0, "bb1d6929e95937287fa37d129b756746"),
    (K128, 16, "070a16b46b4d4144f79bdd9dd04a287c"),
    (K128, 40, "dfa66747de9ae63030ca32611497c827"),
    (K128, 64, "51f0bebf7e3b9d92fc49741779363cfe"),
    (K256, 0, "028962f61b7bf89efc6b551f4667d983"),
    (K256, 16, "28a7023f452e8f82bd4bf28d8c37c35c"),
    (K256, 40, "aaf3d8f1de5640c232f5b169b9c911e6"),
    (K256, 64, "e1992190549f6ed5696a2c056c315410"),
]


@pytest.mark.parametrize(("key", "length", "expected"), NIST)
def test_aes_cmac_nist_vectors(key: bytes, length: int, expected: str) -> None:
    assert aes_cmac(key, M[:length]).hex() == expected
    assert mac8(key, M[:length]).hex() == expected[:16]


def _psec_cmac_of_full_blocks(key: bytes, data: bytes) -> bytes:
    """CMAC built from psec's pieces (CBC-MAC with the last full block XOR subkey K1)."""
    k1, _ = psec_tr31.KeyBlock(key)._derive_aes_cmac_subkey(key)
    data = data[:-16] + psec_tools.xor(data[-16:], k1)
    return psec_mac.generate_cbc_mac(key, data, 1, 16, psec_mac.Algorithm.AES)


@pytest.mark.parametrize("key", [K128, K256, bytes(range(24))])
def test_kcv_is_cmac_of_zero_block_cross_checked_with_psec(key: bytes) -> None:
    assert kcv(key) == _psec_cmac_of_full_blocks(key, bytes(16))[:3]
    assert len(kcv(key)) == 3
    # and it is not the legacy "encrypt a zero block" check value
    assert kcv(key) != psec_aes.encrypt_aes_ecb(key, bytes(16))[:3]


def test_tr31_published_kcv() -> None:
    # TR-31:2018 A.7.4 key and its published AES-CMAC check value.
    assert kcv(bytes.fromhex("3F419E1CB7079442AA37474C2EFBF8B8")).hex().upper() == "08793E"


def test_cmac_rejects_bad_key_length() -> None:
    with pytest.raises(ValueError):
        aes_cmac(b"short", b"x")


def test_constant_time_equal() -> None:
    assert constant_time_equal(b"abc", b"abc")
    assert not constant_time_equal(b"abc", b"abd")
    assert not constant_time_equal(b"abc", b"ab")


def _component(value: bytes) -> LmkComponent:
    return LmkComponent(value_hex=value.hex(), kcv_hex=kcv(value).hex())


def test_lmk_is_xor_of_checked_components() -> None:
    a, b, c = bytes([1]) * 32, bytes([2]) * 32, bytes([4]) * 32
    assert combine_lmk([_component(a), _component(b)]) == bytes([3]) * 32
    assert combine_lmk([_component(a), _component(b), _component(c)]) == bytes([7]) * 32


def test_lmk_refuses_wrong_kcv_one_component_or_cancelling() -> None:
    a, b = bytes([1]) * 32, bytes([2]) * 32
    bad = LmkComponent(value_hex=b.hex(), kcv_hex=kcv(a).hex())
    with pytest.raises(LmkError, match="component 2"):
        combine_lmk([_component(a), bad])
    with pytest.raises(LmkError):
        combine_lmk([_component(a)])
    with pytest.raises(LmkError):
        combine_lmk([_component(a), _component(a)])
    with pytest.raises(LmkError):
        LmkComponent(value_hex="00" * 16, kcv_hex="000000")


def test_lmk_component_repr_is_masked() -> None:
    comp = _component(bytes(range(32)))
    assert bytes(range(32)).hex() not in repr(comp).lower()


def test_voucher_tag_encoding_is_as_documented() -> None:
    vvk = bytes(range(32))
    expected = hmac.new(vvk, TAG_LABEL + b"\x00" + b"1302250000000019" + b"\x00" + b"123456789012",
                        hashlib.sha256).digest()
    assert voucher_tag(vvk, "1302250000000019", "123456789012") == expected
    assert voucher_tag_matches(vvk, "1302250000000019", "123456789012", expected)
    assert not voucher_tag_matches(vvk, "1302250000000019", "123456789013", expected)
    assert not voucher_tag_matches(vvk, "1302250000000027", "123456789012", expected)
    with pytest.raises(PinBlockError):
        voucher_tag(vvk, "13022500000000AB", "123456789012")


def test_generate_pin_is_12_random_digits() -> None:
    pins = {generate_pin() for _ in range(200)}
    assert len(pins) == 200
    assert all(len(p) == 12 and p.isdigit() for p in pins)
    with pytest.raises(PinBlockError):
        generate_pin(13)
