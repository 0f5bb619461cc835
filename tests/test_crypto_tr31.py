"""TR-31 version D key blocks: the published vector, psec both ways, tamper detection."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psec import tr31 as psec_tr31

from crypto.errors import KeyBlockError
from crypto.tr31 import KeyBlockHeader, KeyBlockProtection, unwrap, wrap

# TR-31:2018 annex A.7.4.
KBPK = bytes.fromhex("88E1AB2A2E3DD38C1FA039A536500CC8A87AB9D62DC92C01058FA79F44657DE6")
KEY = bytes.fromhex("3F419E1CB7079442AA37474C2EFBF8B8")
PAD = bytes.fromhex("1C2965473CE206BB855B01533782")
BLOCK = ("D0112P0AE00E0000B82679114F470F540165EDFBF7E250FCEA43F810D215F8D207E2E417C07156A27E8E"
         "31DA05F7425509593D03A457DC34")
P0 = KeyBlockHeader(key_usage="P0", algorithm="A", mode_of_use="E", exportability="E")


def test_published_vector_wraps_exactly() -> None:
    assert wrap(KBPK, P0, KEY, random=lambda n: PAD[:n]) == BLOCK


def test_published_vector_unwraps() -> None:
    header, key = unwrap(KBPK, BLOCK)
    assert key == KEY
    assert header == P0


@pytest.mark.parametrize("kbpk_len", [16, 24, 32])
@pytest.mark.parametrize("key_len", [16, 24, 32])
def test_psec_unwraps_ours_and_we_unwrap_psec(kbpk_len: int, key_len: int) -> None:
    kbpk = bytes(range(kbpk_len))
    key = bytes(range(100, 100 + key_len))
    header = KeyBlockHeader(key_usage="M6", algorithm="A", mode_of_use="C",
                            optional_blocks=(("KS", "00604B120F9292800000"),))
    ours = wrap(kbpk, header, key, masked_length=32)
    psec_header, psec_key = psec_tr31.unwrap(kbpk, ours)
    assert psec_key == key
    assert (psec_header.key_usage, psec_header.mode_of_use) == ("M6", "C")
    assert psec_header.blocks["KS"] == "00604B120F9292800000"
    theirs = psec_tr31.wrap(kbpk, "D0000P0AB00N0100KS1800604B120F9292800000", key)
    header2, key2 = unwrap(kbpk, theirs)
    assert key2 == key
    assert header2.key_usage == "P0" and header2.optional("KS") == "00604B120F9292800000"


def test_hmac_key_with_hash_block_and_long_optional_block() -> None:
    header = KeyBlockHeader(key_usage="V0", algorithm="H", mode_of_use="C",
                            optional_blocks=(("HM", "21"), ("XX", "y" * 300)))
    block = wrap(KBPK, header, bytes(range(32)))
    assert psec_tr31.unwrap(KBPK, block)[1] == bytes(range(32))
    assert unwrap(KBPK, block) == (header, bytes(range(32)))


def test_masking_hides_key_length() -> None:
    short = wrap(KBPK, P0, bytes(16), masked_length=32)
    long = wrap(KBPK, P0, bytes(32), masked_length=32)
    assert len(short) == len(long)
    assert unwrap(KBPK, short)[1] == bytes(16)


def test_every_single_character_change_is_detected() -> None:
    protection = KeyBlockProtection(KBPK)
    block = protection.wrap(P0, KEY)
    for i, ch in enumerate(block):
        for repl in {"0", "A", "F", "N"} - {ch, ch.lower()}:
            tampered = block[:i] + repl + block[i + 1:]
            with pytest.raises(KeyBlockError):
                protection.unwrap(tampered)


def test_wrong_kbpk_truncation_and_extension_refused() -> None:
    block = wrap(KBPK, P0, KEY)
    with pytest.raises(KeyBlockError) as info:
        unwrap(bytes(32), block)
    assert info.value.reason == "mac"
    for bad in (block[:-16], block + "0" * 16, block[:16], "", "B" + block[1:], "D01" + "é" * 13):
        with pytest.raises(KeyBlockError):
            unwrap(KBPK, bad)


def test_error_messages_carry_no_key_material() -> None:
    block = wrap(KBPK, P0, KEY)
    tampered = block[:-1] + ("0" if block[-1] != "0" else "1")
    with pytest.raises(KeyBlockError) as info:
        unwrap(KBPK, tampered)
    assert block[16:48] not in str(info.value)
    assert KEY.hex() not in str(info.value).lower()
    assert "masked" in repr(KeyBlockProtection(KBPK))


@pytest.mark.parametrize("kwargs", [
    {"key_usage": "p0"}, {"key_usage": "P"}, {"algorithm": "Q"}, {"mode_of_use": "Z"},
    {"exportability": "Q"}, {"key_version": "0"}, {"optional_blocks": (("PB", "00"),)},
    {"optional_blocks": (("K$", "00"),)}, {"optional_blocks": (("KS", "\x01"),)},
])
def test_header_validation(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"key_usage": "P0", "algorithm": "A", "mode_of_use": "E"}
    base.update(kwargs)
    with pytest.raises(KeyBlockError):
        KeyBlockHeader(**base)  # type: ignore[arg-type]


def test_aes_key_length_enforced() -> None:
    with pytest.raises(KeyBlockError):
        wrap(KBPK, P0, bytes(15))
    with pytest.raises(KeyBlockError):
        KeyBlockProtection(bytes(20))


@settings(max_examples=40, deadline=None)
@given(key=st.sampled_from([16, 24, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
       data=st.text(alphabet="ABCDEFGHIJ0123456789 ", max_size=40))
def test_roundtrip_property(key: bytes, data: str) -> None:
    header = KeyBlockHeader(key_usage="K0", algorithm="A", mode_of_use="B",
                            optional_blocks=(("TT", data),) if data else ())
    assert unwrap(KBPK, wrap(KBPK, header, key)) == (header, key)
