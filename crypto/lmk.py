"""The local master key: formed inside the HSM by XOR of at least two components.

Each component is entered with its key check value and refused if the value does not match,
the way a key custodian's component is checked at a ceremony.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from crypto.cmac import constant_time_equal, kcv
from crypto.errors import LmkError

__all__ = ["LMK_SIZE", "LmkComponent", "combine_lmk"]

LMK_SIZE = 32  # AES-256
_HEX = re.compile(r"[0-9A-Fa-f]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class LmkComponent:
    """One custodian's LMK component (64 hex digits) and its check value (6 hex digits)."""

    value_hex: str
    kcv_hex: str

    def __post_init__(self) -> None:
        if len(self.value_hex) != 2 * LMK_SIZE or not _HEX.fullmatch(self.value_hex):
            raise LmkError(f"an LMK component must be {2 * LMK_SIZE} hex digits")
        if len(self.kcv_hex) != 6 or not _HEX.fullmatch(self.kcv_hex):
            raise LmkError("an LMK component check value must be 6 hex digits")

    def __repr__(self) -> str:
        return f"LmkComponent(value_hex=<masked>, kcv_hex={self.kcv_hex.upper()!r})"

    @property
    def value(self) -> bytes:
        return bytes.fromhex(self.value_hex)


def combine_lmk(components: Sequence[LmkComponent]) -> bytes:
    """XOR the components into the LMK after checking each component's check value.

    Raises `LmkError` with the (1-based) position of the first component that fails; the
    message carries no key material.
    """
    if len(components) < 2:
        raise LmkError("the LMK needs at least two components")
    lmk = bytes(LMK_SIZE)
    for position, component in enumerate(components, start=1):
        value = component.value
        if not constant_time_equal(kcv(value), bytes.fromhex(component.kcv_hex)):
            raise LmkError(f"LMK component {position}: check value does not match")
        lmk = bytes(a ^ b for a, b in zip(lmk, value, strict=True))
    if lmk == bytes(LMK_SIZE):
        raise LmkError("the LMK components cancel out")
    return lmk
