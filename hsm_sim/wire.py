"""The HSM host-command wire format, shared by the simulator and the switch's client (sans-I/O).

Frame: 2-byte big-endian length, then the message. Request message: 4-character header,
2-character command code, fields. Response message: the same header, the response code (the
command code with its second character advanced by one), a 2-character error code, fields.

Field encodings used by the commands (see docs/hsm.md):

- key block: `S` followed by a TR-31 block; the block's own 4-digit length (characters 2-5 of
  the block) says where it ends;
- variable data: 4 upper-case hex digits giving the byte length, then the bytes;
- fixed fields: so many ASCII characters (digits, hex digits or codes).
"""

from __future__ import annotations

from binascii import unhexlify
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "COMMANDS",
    "MAX_MESSAGE",
    "MIN_MESSAGE",
    "CommandInfo",
    "FieldError",
    "FieldReader",
    "data_field",
    "encode_frame",
    "key_block_field",
    "response_code",
]

MAX_MESSAGE = 0xFFFF  # what a 2-byte length can describe
MIN_MESSAGE = 6  # header + command code
KEY_BLOCK_PREFIX = b"S"


@dataclass(frozen=True, slots=True)
class CommandInfo:
    code: str
    response: str
    name: str
    extension: bool = False


def response_code(command: bytes) -> bytes:
    """`NC` -> `ND`: the command code with its second character advanced by one."""
    if len(command) != 2:
        raise ValueError("a command code is 2 characters")
    return command[:1] + bytes([(command[1] + 1) % 256])


def _info(code: str, name: str, extension: bool = False) -> CommandInfo:
    return CommandInfo(code, response_code(code.encode()).decode(), name, extension)


COMMANDS: MappingProxyType[str, CommandInfo] = MappingProxyType({
    c.code: c for c in (
        _info("NC", "diagnostics"),
        _info("B2", "echo"),
        _info("A0", "generate key"),
        _info("A6", "import key"),
        _info("A8", "export key"),
        _info("BU", "key check value"),
        _info("M6", "generate MAC"),
        _info("M8", "verify MAC"),
        _info("ZG", "voucher generate", extension=True),
        _info("ZV", "voucher verify", extension=True),
    )
})


def encode_frame(message: bytes) -> bytes:
    if len(message) > MAX_MESSAGE:
        raise ValueError("message too long for a 2-byte length")
    return len(message).to_bytes(2, "big") + message


def key_block_field(block: str) -> bytes:
    return KEY_BLOCK_PREFIX + block.encode("ascii")


def data_field(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("data too long")
    return f"{len(data):04X}".encode() + data


class FieldError(Exception):
    """A field could not be read; `code` is the HSM error code it maps to."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{detail} (error {code})")
        self.code = code


# Character classes, as the bytes `bytes.translate` deletes: a field is of a class when nothing
# is left of it after deleting them (one pass in C, no set built per field).
_HEXDIGITS = b"0123456789ABCDEFabcdef"
_DIGITS = b"0123456789"
_GRAPHIC = bytes(range(0x21, 0x7F))  # printable ASCII without the space


class FieldReader:
    """Reads the fields of one message in order; errors carry the HSM error code."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self._data = data
        self._pos = pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def raw(self, n: int) -> bytes:
        pos = self._pos
        end = pos + n
        if n < 0 or end > len(self._data):
            raise FieldError("80", "field truncated")
        self._pos = end
        return self._data[pos:end]

    def text(self, n: int) -> str:
        raw = self.raw(n)
        if raw.translate(None, _GRAPHIC):
            raise FieldError("15", "field is not printable ASCII")
        return raw.decode("ascii")

    def digits(self, n: int) -> str:
        raw = self.raw(n)
        if raw.translate(None, _DIGITS):
            raise FieldError("15", "field is not numeric")
        return raw.decode("ascii")

    def hex(self, n_chars: int) -> bytes:
        raw = self.raw(n_chars)
        if n_chars % 2 or raw.translate(None, _HEXDIGITS):
            raise FieldError("15", "field is not hex")
        return unhexlify(raw)

    def data(self) -> bytes:
        """Variable data: 4 hex digits of byte length, then the bytes."""
        length = int.from_bytes(self.hex(4), "big")
        return self.raw(length)

    def key_block(self) -> str:
        """`S` + a TR-31 block, delimited by the block's own length field."""
        if self.raw(1) != KEY_BLOCK_PREFIX:
            raise FieldError("15", "key block field must start with S")
        pos = self._pos
        if len(self._data) - pos < 5:
            raise FieldError("80", "key block truncated")
        length_text = self._data[pos + 1:pos + 5]
        if length_text.translate(None, _DIGITS):
            raise FieldError("A4", "key block length is not numeric")
        length = int(length_text)
        if length < 16:
            raise FieldError("A4", "key block shorter than its header")
        block = self.raw(length)
        if not block.isascii():
            raise FieldError("15", "key block is not ASCII")
        return block.decode("ascii")

    def optional_hex(self, n_chars: int) -> bytes | None:
        return None if self.remaining == 0 else self.hex(n_chars)

    def end(self) -> None:
        if self.remaining:
            raise FieldError("80", "unexpected data after the last field")
