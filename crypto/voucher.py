"""Recharge-card PINs and their keyed tags.

The tag is HMAC-SHA-256 under the voucher verification key (VVK) over this exact byte string:

    b"gridpay-voucher-v1" || 0x00 || serial (ASCII digits) || 0x00 || PIN (ASCII digits)

The fixed label separates this use of the key from any other; the zero bytes make the
encoding unambiguous for any serial and PIN length. The tag is 32 bytes and cannot be
reversed into the PIN without the VVK, which exists only inside the HSM.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from crypto.cmac import constant_time_equal
from crypto.errors import PinBlockError

__all__ = ["TAG_LABEL", "TAG_SIZE", "generate_pin", "voucher_tag", "voucher_tag_matches"]

TAG_LABEL = b"gridpay-voucher-v1"
TAG_SIZE = 32
_DIGITS = frozenset("0123456789")


def _message(serial: str, pin: str) -> bytes:
    if not serial or not set(serial) <= _DIGITS:
        raise PinBlockError("pan", "a card serial is digits only")
    if not (4 <= len(pin) <= 12) or not set(pin) <= _DIGITS:
        raise PinBlockError("pin_length", "a PIN has 4 to 12 digits")
    return TAG_LABEL + b"\x00" + serial.encode("ascii") + b"\x00" + pin.encode("ascii")


def voucher_tag(vvk: bytes, serial: str, pin: str) -> bytes:
    """The 32-byte keyed tag of a card (serial, PIN) under the voucher verification key."""
    if len(vvk) < 16:
        raise ValueError("the voucher verification key must be at least 16 bytes")
    return hmac.new(vvk, _message(serial, pin), hashlib.sha256).digest()


def voucher_tag_matches(vvk: bytes, serial: str, pin: str, tag: bytes) -> bool:
    """Whether `tag` is the tag of (serial, PIN), compared in constant time."""
    return constant_time_equal(voucher_tag(vvk, serial, pin), tag)


def generate_pin(length: int = 12) -> str:
    """A uniformly random PIN of `length` digits from the OS CSPRNG."""
    if not 4 <= length <= 12:
        raise PinBlockError("pin_length", "a PIN has 4 to 12 digits")
    return str(secrets.randbelow(10**length)).zfill(length)
