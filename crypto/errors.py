"""The crypto layer's one error base and its subclasses.

Messages never carry key material, PINs or PIN blocks: they name what was wrong (a field, a
length, a reason code) and nothing else.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["CryptoError", "KeyBlockError", "LmkError", "PinBlockError"]


class CryptoError(Exception):
    """Base of every error raised by `crypto`."""


class LmkError(CryptoError):
    """An LMK component is malformed or does not match its check value."""


KeyBlockReason = Literal["header", "length", "encoding", "mac", "key"]


class KeyBlockError(CryptoError):
    """A TR-31 key block is malformed, tampered with, or under another protection key.

    `reason`: `header` (header fields invalid), `length` (lengths inconsistent), `encoding`
    (not hex / not ASCII), `mac` (authentication failed: tampered or wrong KBPK), `key` (the
    decrypted key data is inconsistent).
    """

    def __init__(self, reason: KeyBlockReason, detail: str) -> None:
        super().__init__(f"key block {reason} error: {detail}")
        self.reason: KeyBlockReason = reason


PinBlockReason = Literal["format", "pin_length", "value", "pan"]


class PinBlockError(CryptoError):
    """A PIN block (or the PIN or PAN given to build one) is not valid.

    `reason`: `format` (wrong format code or size), `pin_length` (PIN shorter than 4 or longer
    than 12 digits), `value` (the block does not contain a valid PIN), `pan` (the PAN is not
    usable). The message never contains the PIN or the block.
    """

    def __init__(self, reason: PinBlockReason, detail: str) -> None:
        super().__init__(f"PIN block {reason} error: {detail}")
        self.reason: PinBlockReason = reason
