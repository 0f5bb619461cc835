"""TR-31 (ANSI X9.143) key blocks, version `D`: AES key derivation binding method.

Layout of a block (ASCII):

    header (16 chars + optional blocks, a multiple of 16)
    | hex(AES-CBC(KBEK, iv=MAC, key data))
    | hex(MAC)                                   (16 bytes, 32 hex digits)

Key data is a 2-byte big-endian key length in bits, the key, then random padding to a multiple
of the AES block (more padding when the key length is masked). MAC = AES-CMAC(KBAK, header
ASCII || clear key data). KBEK and KBAK are derived from the key block protection key (KBPK)
with the CMAC-based KDF of SP 800-108 counter mode as TR-31 specifies: CMAC(KBPK, counter ||
usage (0000 encryption, 0001 MAC) || 00 || algorithm (0002/0003/0004 for AES-128/192/256) ||
key length in bits), one CMAC block per 128 bits of key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from crypto.cmac import AES_KEY_SIZES, aes_cmac, constant_time_equal
from crypto.errors import KeyBlockError

__all__ = [
    "ALGORITHMS",
    "EXPORTABILITY",
    "KEY_USAGES",
    "MODES_OF_USE",
    "KeyBlockHeader",
    "KeyBlockProtection",
    "unwrap",
    "wrap",
]

# The TR-31 codes this project uses or accepts (data, not if-chains). Numeric codes are
# reserved for proprietary use and accepted structurally.
KEY_USAGES: MappingProxyType[str, str] = MappingProxyType({
    "D0": "symmetric data encryption",
    "K0": "key encryption or wrapping (KEK)",
    "K1": "TR-31 key block protection key (KBPK)",
    "M6": "MAC, ISO 9797-1:2011 algorithm 5 (AES-CMAC)",
    "M7": "MAC, HMAC",
    "P0": "PIN encryption",
    "V0": "PIN verification, other algorithm (the voucher verification key)",
})
ALGORITHMS: MappingProxyType[str, str] = MappingProxyType({
    "A": "AES", "D": "DES", "E": "elliptic curve", "H": "HMAC", "R": "RSA", "S": "DSA",
    "T": "triple DES",
})
MODES_OF_USE: MappingProxyType[str, str] = MappingProxyType({
    "B": "encrypt and decrypt / wrap and unwrap", "C": "generate and verify",
    "D": "decrypt / unwrap only", "E": "encrypt / wrap only", "G": "generate only",
    "N": "no special restriction", "S": "signature only", "T": "sign and decrypt",
    "V": "verify only", "X": "derive keys", "Y": "create key variants",
})
EXPORTABILITY: MappingProxyType[str, str] = MappingProxyType({
    "E": "exportable under a trusted key", "N": "not exportable",
    "S": "sensitive: exportable under an untrusted key",
})

_VERSION = "D"
_BLOCK = 16
_MAC_HEX = 32
_MAX_LENGTH = 9999
_ALNUM2 = re.compile(r"[0-9A-Z]{2}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_HEX = re.compile(r"[0-9A-F]*")  # upper case only: the block is compared as text


def _code(value: str, table: MappingProxyType[str, str], field: str) -> None:
    if not (value in table or (len(value) == 1 and value.isdigit())):
        raise KeyBlockError("header", f"{field} {value!r} is not a known code")


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyBlockHeader:
    """The cleartext, authenticated header of a version D key block."""

    key_usage: str
    algorithm: str
    mode_of_use: str
    key_version: str = "00"
    exportability: str = "N"
    optional_blocks: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not _ALNUM2.fullmatch(self.key_usage):
            raise KeyBlockError("header", "key usage must be 2 upper-case alphanumerics")
        _code(self.algorithm, ALGORITHMS, "algorithm")
        _code(self.mode_of_use, MODES_OF_USE, "mode of use")
        _code(self.exportability, EXPORTABILITY, "exportability")
        if not _ALNUM2.fullmatch(self.key_version):
            raise KeyBlockError("header", "key version must be 2 upper-case alphanumerics")
        if len(self.optional_blocks) > 98:
            raise KeyBlockError("header", "too many optional blocks")
        for block_id, data in self.optional_blocks:
            if not _ALNUM2.fullmatch(block_id) or block_id == "PB":
                raise KeyBlockError("header", f"optional block id {block_id!r} is invalid")
            if not _PRINTABLE.fullmatch(data) or len(data) > 0xFFFF - 10:
                raise KeyBlockError("header", f"optional block {block_id} data is invalid")

    @property
    def version_id(self) -> str:
        return _VERSION

    def optional(self, block_id: str) -> str | None:
        for bid, data in self.optional_blocks:
            if bid == block_id:
                return data
        return None

    def _blocks_text(self) -> tuple[int, str]:
        parts: list[str] = []
        for block_id, data in self.optional_blocks:
            if len(data) + 4 <= 0xFF:
                parts.append(f"{block_id}{len(data) + 4:02X}{data}")
            else:
                parts.append(f"{block_id}0002{len(data) + 10:04X}{data}")
        text = "".join(parts)
        count = len(self.optional_blocks)
        if len(text) % _BLOCK:
            pad = (-(len(text) + 4)) % _BLOCK
            text += f"PB{pad + 4:02X}" + "0" * pad
            count += 1
        return count, text

    def encode(self, block_length: int) -> str:
        """The header text for a block of `block_length` characters."""
        count, blocks = self._blocks_text()
        return (
            f"{_VERSION}{block_length:04d}{self.key_usage}{self.algorithm}{self.mode_of_use}"
            f"{self.key_version}{self.exportability}{count:02d}00{blocks}"
        )

    def encoded_length(self) -> int:
        return 16 + len(self._blocks_text()[1])

    @classmethod
    def parse(cls, text: str) -> tuple[KeyBlockHeader, int]:
        """Parse the header at the start of `text`; returns it and its length in characters."""
        if len(text) < 16:
            raise KeyBlockError("length", "shorter than a header")
        if text[0] != _VERSION:
            raise KeyBlockError("header", "only version D key blocks are supported")
        count_text = text[12:14]
        if not count_text.isdigit() or not count_text.isascii():
            raise KeyBlockError("header", "optional block count must be 2 digits")
        if text[14:16] != "00":
            raise KeyBlockError("header", "reserved field must be 00")
        blocks: list[tuple[str, str]] = []
        pos = 16
        for _ in range(int(count_text)):
            block_id = text[pos:pos + 2]
            length_text = text[pos + 2:pos + 4]
            if len(block_id) != 2 or not _ALNUM2.fullmatch(block_id):
                raise KeyBlockError("header", "optional block id is invalid")
            if len(length_text) != 2 or not _HEX.fullmatch(length_text):
                raise KeyBlockError("header", "optional block length is invalid")
            length = int(length_text, 16)
            if length == 0:  # extended length: 00, length of length, length
                lol_text = text[pos + 4:pos + 6]
                if len(lol_text) != 2 or not _HEX.fullmatch(lol_text) or lol_text == "00":
                    raise KeyBlockError("header", "optional block length is invalid")
                width = 2 * int(lol_text, 16)
                ext_text = text[pos + 6:pos + 6 + width]
                if len(ext_text) != width or not _HEX.fullmatch(ext_text):
                    raise KeyBlockError("header", "optional block length is invalid")
                length, start = int(ext_text, 16), pos + 6 + width
            else:
                start = pos + 4
            end = pos + length
            if end < start or end > len(text):
                raise KeyBlockError("header", "optional block length is invalid")
            data = text[start:end]
            if not _PRINTABLE.fullmatch(data):
                raise KeyBlockError("header", "optional block data is not printable")
            if block_id != "PB":
                blocks.append((block_id, data))
            pos = end
        if pos % _BLOCK:
            raise KeyBlockError("header", "header length is not a multiple of 16")
        header = cls(
            key_usage=text[5:7],
            algorithm=text[7],
            mode_of_use=text[8],
            key_version=text[9:11],
            exportability=text[11],
            optional_blocks=tuple(blocks),
        )
        return header, pos


def _derive(kbpk: bytes) -> tuple[bytes, bytes]:
    algorithm = {16: 2, 24: 3, 32: 4}[len(kbpk)]
    bits = 8 * len(kbpk)
    out: list[bytes] = []
    for usage in (0, 1):
        material = b"".join(
            aes_cmac(kbpk, bytes([counter]) + usage.to_bytes(2, "big") + b"\x00"
                     + algorithm.to_bytes(2, "big") + bits.to_bytes(2, "big"))
            for counter in range(1, 1 + (len(kbpk) + 15) // 16)
        )
        out.append(material[:len(kbpk)])
    return out[0], out[1]


class KeyBlockProtection:
    """A key block protection key with its derived KBEK and KBAK (derived once)."""

    __slots__ = ("_kbak", "_kbek")

    def __init__(self, kbpk: bytes) -> None:
        if len(kbpk) not in AES_KEY_SIZES:
            raise KeyBlockError("key", "the KBPK must be an AES-128, -192 or -256 key")
        self._kbek, self._kbak = _derive(kbpk)

    def __repr__(self) -> str:
        return "KeyBlockProtection(<masked>)"

    def wrap(
        self,
        header: KeyBlockHeader,
        key: bytes,
        *,
        masked_length: int | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> str:
        """Wrap `key` under this KBPK with `header`.

        `masked_length` pads the key data as if the key were that long, hiding its real length.
        `random` supplies the padding (tests pass a fixed one for known-answer vectors).
        """
        if not key:
            raise KeyBlockError("key", "the key is empty")
        if header.algorithm == "A" and len(key) not in AES_KEY_SIZES:
            raise KeyBlockError("key", "an AES key must be 16, 24 or 32 bytes")
        target = max(len(key), masked_length or 0)
        pad_len = target - len(key) + (-(2 + target)) % _BLOCK
        clear = (8 * len(key)).to_bytes(2, "big") + key + random(pad_len)
        length = header.encoded_length() + 2 * len(clear) + _MAC_HEX
        if length > _MAX_LENGTH:
            raise KeyBlockError("length", "the key block would exceed 9999 characters")
        header_text = header.encode(length)
        mac = aes_cmac(self._kbak, header_text.encode("ascii") + clear)
        enc = Cipher(algorithms.AES(self._kbek), modes.CBC(mac)).encryptor()
        encrypted = enc.update(clear) + enc.finalize()
        return header_text + encrypted.hex().upper() + mac.hex().upper()

    def unwrap(self, block: str) -> tuple[KeyBlockHeader, bytes]:
        """Verify and decrypt a key block; `KeyBlockError` on any malformation or tamper."""
        if not block.isascii():
            raise KeyBlockError("encoding", "a key block is ASCII")
        length_text = block[1:5]
        if len(length_text) != 4 or not length_text.isdigit():
            raise KeyBlockError("length", "key block length must be 4 digits")
        if int(length_text) != len(block):
            raise KeyBlockError("length", "key block length does not match its header")
        if len(block) % _BLOCK:
            raise KeyBlockError("length", "key block length is not a multiple of 16")
        header, header_len = KeyBlockHeader.parse(block)
        body = block[header_len:]
        if len(body) < 2 * _BLOCK + _MAC_HEX or (len(body) - _MAC_HEX) % (2 * _BLOCK):
            raise KeyBlockError("length", "encrypted key data has an invalid length")
        if not _HEX.fullmatch(body):
            raise KeyBlockError("encoding", "encrypted key data and MAC must be hex")
        encrypted = bytes.fromhex(body[:-_MAC_HEX])
        received_mac = bytes.fromhex(body[-_MAC_HEX:])
        dec = Cipher(algorithms.AES(self._kbek), modes.CBC(received_mac)).decryptor()
        clear = dec.update(encrypted) + dec.finalize()
        mac = aes_cmac(self._kbak, block[:header_len].encode("ascii") + clear)
        if not constant_time_equal(mac, received_mac):
            raise KeyBlockError("mac", "authentication failed")
        bits = int.from_bytes(clear[:2], "big")
        if bits == 0 or bits % 8 or bits // 8 > len(clear) - 2:
            raise KeyBlockError("key", "the key length inside the block is invalid")
        key = clear[2:2 + bits // 8]
        if header.algorithm == "A" and len(key) not in AES_KEY_SIZES:
            raise KeyBlockError("key", "the AES key inside the block has an invalid length")
        return header, key


def wrap(
    kbpk: bytes,
    header: KeyBlockHeader,
    key: bytes,
    *,
    masked_length: int | None = None,
    random: Callable[[int], bytes] = os.urandom,
) -> str:
    """Wrap `key` into a version D key block under `kbpk`."""
    return KeyBlockProtection(kbpk).wrap(header, key, masked_length=masked_length, random=random)


def unwrap(kbpk: bytes, block: str) -> tuple[KeyBlockHeader, bytes]:
    """Verify and unwrap a version D key block under `kbpk`."""
    return KeyBlockProtection(kbpk).unwrap(block)
