"""ISO 9564 PIN blocks: format 4 known answer and psec cross-checks; formats 0 and 3."""

from __future__ import annotations

import secrets
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psec import des as psec_des
from psec import pinblock as psec_pinblock

from crypto.errors import PinBlockError
from crypto.pinblock import (
    Format4Codec,
    decipher_format4,
    decode_format0,
    decode_format3,
    decode_pin_field4,
    encipher_format4,
    encode_format0,
    encode_format3,
    encode_pan_field4,
    encode_pin_field4,
    tdes_decrypt_block,
    tdes_encrypt_block,
)

KEY = bytes.fromhex("00112233445566778899AABBCCDDEEFF")


def test_format4_published_example() -> None:
    # Worked example of the paysec-pinblock crate documentation (random part all FF).
    block = encipher_format4(KEY, "1234", "1234567890123456789", random8=b"\xff" * 8)
    assert block.hex().upper() == "28B41FDDD29B743E93124BD8E32D921E"
    assert decipher_format4(KEY, block, "1234567890123456789") == "1234"


def test_format4_fields_match_the_standard_layout() -> None:
    assert encode_pin_field4("1234", b"\x00" * 8).hex().upper() == \
        "441234AAAAAAAAAA" + "00" * 8
    assert encode_pan_field4("1302250000000019").hex() == "41302250000000019" + "0" * 15
    assert encode_pan_field4("123456789012").hex() == "0123456789012" + "0" * 19
    assert encode_pan_field4("12345").hex() == "0000000012345" + "0" * 19
    assert encode_pin_field4("1234") != encode_pin_field4("1234")  # random part


@pytest.mark.parametrize("key_len", [16, 24, 32])
@pytest.mark.parametrize("pan", ["1302250000000019", "123456789012", "1234567890123456789"])
def test_format4_psec_both_ways(key_len: int, pan: str) -> None:
    key = secrets.token_bytes(key_len)
    for pin in ("1234", "987654", "123456789012"):
        ours = encipher_format4(key, pin, pan)
        assert psec_pinblock.decipher_pinblock_iso_4(key, ours, pan) == pin
        theirs = psec_pinblock.encipher_pinblock_iso_4(key, pin, pan)
        assert decipher_format4(key, theirs, pan) == pin


def test_format4_wrong_pan_or_key_does_not_give_the_pin() -> None:
    block = encipher_format4(KEY, "123456789012", "1302250000000019")
    for key, pan in ((KEY, "1302250000000027"), (bytes(16), "1302250000000019")):
        try:
            assert decipher_format4(key, block, pan) != "123456789012"
        except PinBlockError:
            pass


@pytest.mark.parametrize(("field", "reason"), [
    (bytes.fromhex("341234AAAAAAAAAA") + bytes(8), "format"),
    (bytes.fromhex("431234AAAAAAAAAA") + bytes(8), "pin_length"),
    (bytes.fromhex("4D1234AAAAAAAAAA") + bytes(8), "pin_length"),
    (bytes.fromhex("44123BAAAAAAAAAA") + bytes(8), "value"),
    (bytes.fromhex("441234AAAAAAAAAB") + bytes(8), "value"),
    (bytes(8), "format"),
])
def test_format4_decode_errors(field: bytes, reason: str) -> None:
    with pytest.raises(PinBlockError) as info:
        decode_pin_field4(field)
    assert info.value.reason == reason
    assert "1234" not in str(info.value)


def test_pin_and_pan_validation() -> None:
    for pin in ("123", "1234567890123", "12a4"):
        with pytest.raises(PinBlockError):
            encipher_format4(KEY, pin, "1302250000000019")
    with pytest.raises(PinBlockError):
        encipher_format4(KEY, "1234", "13022500000000191234")
    with pytest.raises(PinBlockError):
        Format4Codec(bytes(8))
    assert "masked" in repr(Format4Codec(KEY))


def test_format0_matches_psec_and_iso_example() -> None:
    block = encode_format0("1234", "4321987654321098")
    assert block.hex().upper() == "04122D789ABCDEF6"
    assert block == psec_pinblock.encode_pinblock_iso_0("1234", "4321987654321098")
    assert decode_format0(block, "4321987654321098") == "1234"
    assert psec_pinblock.decode_pinblock_iso_0(block, "4321987654321098") == "1234"


def test_format3_psec_both_ways() -> None:
    pan = "5555555551234567"
    for pin in ("1234", "12345678", "123456789012"):
        ours = encode_format3(pin, pan)
        assert psec_pinblock.decode_pinblock_iso_3(ours, pan) == pin
        assert decode_format3(psec_pinblock.encode_pinblock_iso_3(pin, pan), pan) == pin
    with pytest.raises(PinBlockError):
        decode_format3(encode_format0("1234", pan), pan)
    with pytest.raises(PinBlockError):
        decode_format0(encode_format3("1234", pan), pan)


@pytest.mark.parametrize("key_len", [16, 24])
def test_tdes_block_encryption_matches_psec(key_len: int) -> None:
    key = secrets.token_bytes(key_len)
    clear = encode_format0("4321", "4321987654321098")
    ours = tdes_encrypt_block(key, clear)
    with warnings.catch_warnings():  # psec uses the deprecated TripleDES import path
        warnings.simplefilter("ignore")
        theirs = psec_des.encrypt_tdes_ecb(key, clear)
    assert ours == theirs
    assert tdes_decrypt_block(key, ours) == clear


@settings(max_examples=60, deadline=None)
@given(pin=st.from_regex(r"[0-9]{4,12}", fullmatch=True),
       pan=st.from_regex(r"[0-9]{12,19}", fullmatch=True))
def test_format4_roundtrip_property(pin: str, pan: str) -> None:
    codec = Format4Codec(KEY)
    assert codec.decipher(codec.encipher(pin, pan), pan) == pin
