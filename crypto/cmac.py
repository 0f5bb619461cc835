"""AES-CMAC (NIST SP 800-38B), key check values and constant-time comparison."""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms

__all__ = ["AES_KEY_SIZES", "aes_cmac", "constant_time_equal", "kcv", "mac8"]

AES_KEY_SIZES = frozenset({16, 24, 32})
_ZERO_BLOCK = bytes(16)


def _check_key(key: bytes) -> None:
    if len(key) not in AES_KEY_SIZES:
        raise ValueError(f"AES key must be 16, 24 or 32 bytes, got {len(key)}")


def aes_cmac(key: bytes, data: bytes) -> bytes:
    """The full 16-byte AES-CMAC of `data` under `key`."""
    _check_key(key)
    c = cmac.CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


def mac8(key: bytes, data: bytes) -> bytes:
    """AES-CMAC truncated to its first 8 bytes (the MAC of the bank links)."""
    return aes_cmac(key, data)[:8]


def kcv(key: bytes) -> bytes:
    """Key check value: the first 3 bytes of AES-CMAC over one block of zeros."""
    return aes_cmac(key, _ZERO_BLOCK)[:3]


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare two byte strings in time independent of where they differ."""
    return hmac.compare_digest(a, b)
