"""ISO 9564-1 PIN blocks: format 4 (AES) and the clear layouts of formats 0 and 3.

Format 4 (16 bytes, AES):
    PIN field  = `4` | PIN length | PIN digits | `A` fill to 16 nibbles | 8 random bytes
    PAN field  = (PAN length - 12) | PAN digits left-justified | `0` fill to 32 nibbles
                 (a PAN shorter than 12 digits is left-padded with zeros to 12, nibble 0)
    block      = E(K, E(K, PIN field) XOR PAN field)

Formats 0 and 3 (8 bytes, for the triple-DES era bank links):
    PIN field  = `0` | length | digits | `F` fill     (format 0)
                 `3` | length | digits | random fill from A-F   (format 3)
    PAN field  = `0000` | the 12 rightmost PAN digits excluding the check digit
    block      = PIN field XOR PAN field, then triple-DES under the PIN key.

Triple DES comes from `cryptography`'s `decrepit` module (kept only for legacy interop); a
double-length key is expanded to K1K2K1, which is the same cipher, because two-key TDES
objects are deprecated there. No error message contains a PIN or a block.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from crypto.cmac import AES_KEY_SIZES
from crypto.errors import PinBlockError

__all__ = [
    "Format4Codec",
    "decipher_format4",
    "decode_format0",
    "decode_format3",
    "decode_pin_field4",
    "encipher_format4",
    "encode_format0",
    "encode_format3",
    "encode_pan_field4",
    "encode_pin_field4",
    "tdes_decrypt_block",
    "tdes_encrypt_block",
]

MIN_PIN, MAX_PIN = 4, 12
_DIGITS = frozenset("0123456789")


def _check_pin(pin: str) -> None:
    if not (MIN_PIN <= len(pin) <= MAX_PIN):
        raise PinBlockError("pin_length", f"a PIN has {MIN_PIN} to {MAX_PIN} digits")
    if not set(pin) <= _DIGITS:
        raise PinBlockError("value", "a PIN is digits only")


def _check_pan(pan: str, max_len: int = 19) -> None:
    if not (1 <= len(pan) <= max_len) or not set(pan) <= _DIGITS:
        raise PinBlockError("pan", f"a PAN is 1 to {max_len} digits")


# --- format 4 -------------------------------------------------------------------------------

def encode_pin_field4(pin: str, random8: bytes | None = None) -> bytes:
    """The 16-byte clear PIN field of format 4."""
    _check_pin(pin)
    rnd = secrets.token_bytes(8) if random8 is None else random8
    if len(rnd) != 8:
        raise PinBlockError("format", "the random part is 8 bytes")
    nibbles = f"4{len(pin):X}{pin}".ljust(16, "A")
    return bytes.fromhex(nibbles) + rnd


def encode_pan_field4(pan: str) -> bytes:
    """The 16-byte PAN field of format 4."""
    _check_pan(pan)
    digits = pan.rjust(12, "0")
    return bytes.fromhex(f"{len(digits) - 12:X}{digits}".ljust(32, "0"))


def decode_pin_field4(field: bytes) -> str:
    """The PIN in a clear format-4 PIN field (`PinBlockError` if it is not well formed)."""
    if len(field) != 16:
        raise PinBlockError("format", "a format 4 PIN field is 16 bytes")
    nibbles = field[:8].hex().upper()
    if nibbles[0] != "4":
        raise PinBlockError("format", "the control field is not 4")
    length = int(nibbles[1], 16)
    if not (MIN_PIN <= length <= MAX_PIN):
        raise PinBlockError("pin_length", "the PIN length is out of range")
    pin = nibbles[2:2 + length]
    if not set(pin) <= _DIGITS or set(nibbles[2 + length:]) - {"A"}:
        raise PinBlockError("value", "the PIN field is not valid")
    return pin


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


class Format4Codec:
    """Enciphers and deciphers format-4 PIN blocks under one AES key.

    Keeps one ECB encryptor and decryptor for the key, so a batch of thousands of blocks costs
    no more than the block operations themselves.
    """

    __slots__ = ("_dec", "_enc")

    def __init__(self, key: bytes) -> None:
        if len(key) not in AES_KEY_SIZES:
            raise PinBlockError("format", "a format 4 key is an AES key")
        cipher = Cipher(algorithms.AES(key), modes.ECB())  # noqa: S305 - single-block primitive
        self._enc = cipher.encryptor()
        self._dec = cipher.decryptor()

    def __repr__(self) -> str:
        return "Format4Codec(<masked>)"

    def encipher(self, pin: str, pan: str, *, random8: bytes | None = None) -> bytes:
        pan_field = encode_pan_field4(pan)
        first = self._enc.update(encode_pin_field4(pin, random8))
        return self._enc.update(_xor(first, pan_field))

    def decipher(self, block: bytes, pan: str) -> str:
        if len(block) != 16:
            raise PinBlockError("format", "a format 4 PIN block is 16 bytes")
        pan_field = encode_pan_field4(pan)
        intermediate = _xor(self._dec.update(block), pan_field)
        return decode_pin_field4(self._dec.update(intermediate))


def encipher_format4(key: bytes, pin: str, pan: str, *, random8: bytes | None = None) -> bytes:
    """A format-4 PIN block for `pin` and `pan` under the AES `key`."""
    return Format4Codec(key).encipher(pin, pan, random8=random8)


def decipher_format4(key: bytes, block: bytes, pan: str) -> str:
    """The PIN inside a format-4 PIN block (`PinBlockError` when it is not valid)."""
    return Format4Codec(key).decipher(block, pan)


# --- formats 0 and 3 (clear layouts) ---------------------------------------------------------

def _pan_field03(pan: str) -> bytes:
    _check_pan(pan)
    body = pan[:-1][-12:].rjust(12, "0")
    return bytes.fromhex("0000" + body)


def _random_fill(n: int) -> str:
    return "".join(secrets.choice("ABCDEF") for _ in range(n))


def encode_format0(pin: str, pan: str) -> bytes:
    """The clear 8-byte ISO format 0 PIN block."""
    _check_pin(pin)
    field = bytes.fromhex(f"0{len(pin):X}{pin}".ljust(16, "F"))
    return _xor(field, _pan_field03(pan))


def encode_format3(pin: str, pan: str, *, fill: Callable[[int], str] = _random_fill) -> bytes:
    """The clear 8-byte ISO format 3 PIN block (fill nibbles random in A-F)."""
    _check_pin(pin)
    head = f"3{len(pin):X}{pin}"
    field = bytes.fromhex(head + fill(16 - len(head)))
    return _xor(field, _pan_field03(pan))


def _decode03(block: bytes, pan: str, control: str, fill: frozenset[str]) -> str:
    if len(block) != 8:
        raise PinBlockError("format", "a format 0/3 PIN block is 8 bytes")
    nibbles = _xor(block, _pan_field03(pan)).hex().upper()
    if nibbles[0] != control:
        raise PinBlockError("format", f"the control field is not {control}")
    length = int(nibbles[1], 16)
    if not (MIN_PIN <= length <= MAX_PIN):
        raise PinBlockError("pin_length", "the PIN length is out of range")
    pin = nibbles[2:2 + length]
    if not set(pin) <= _DIGITS or set(nibbles[2 + length:]) - fill:
        raise PinBlockError("value", "the PIN field is not valid")
    return pin


def decode_format0(block: bytes, pan: str) -> str:
    return _decode03(block, pan, "0", frozenset("F"))


def decode_format3(block: bytes, pan: str) -> str:
    return _decode03(block, pan, "3", frozenset("ABCDEF"))


def _tdes(key: bytes) -> Cipher[modes.ECB]:
    if len(key) == 16:
        key = key + key[:8]
    if len(key) != 24:
        raise PinBlockError("format", "a triple-DES key is 16 or 24 bytes")
    return Cipher(TripleDES(key), modes.ECB())  # noqa: S305 - single-block primitive


def tdes_encrypt_block(key: bytes, block: bytes) -> bytes:
    """Encrypt one 8-byte (format 0/3) PIN block with triple DES."""
    if len(block) != 8:
        raise PinBlockError("format", "a format 0/3 PIN block is 8 bytes")
    enc = _tdes(key).encryptor()
    return enc.update(block) + enc.finalize()


def tdes_decrypt_block(key: bytes, block: bytes) -> bytes:
    """Decrypt one 8-byte (format 0/3) PIN block with triple DES."""
    if len(block) != 8:
        raise PinBlockError("format", "a format 0/3 PIN block is 8 bytes")
    dec = _tdes(key).decryptor()
    return dec.update(block) + dec.finalize()

