"""The one error hierarchy of the ISO 8583 layer.

Every error here is safe to log: messages name fields and describe what is wrong, they never
carry a field's value. :class:`DecodeError.masked_raw` shows the MTI and bitmaps in hex and the
layout of the fields (number and length), never their contents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .message import Message

__all__ = [
    "DecodeError",
    "DialectError",
    "EncodeError",
    "FramingError",
    "Iso8583Error",
    "ValidationError",
]


class Iso8583Error(Exception):
    """Base of every error raised by :mod:`protocols.iso8583`."""


class DialectError(Iso8583Error):
    """A dialect table (TOML or embedded) is malformed."""


class FramingError(Iso8583Error):
    """The byte stream cannot be split into frames any more: close the connection."""


class EncodeError(Iso8583Error):
    """A message cannot be encoded (a bug on our side, never the peer's)."""

    def __init__(self, field: int | None, reason: str) -> None:
        self.field = field
        self.reason = reason
        where = "message" if field is None else f"field {field}"
        super().__init__(f"cannot encode {where}: {reason}")


class DecodeError(Iso8583Error):
    """A frame body is not a valid message of the dialect.

    ``field`` is the first field found wrong (``None`` for the MTI or a bitmap),
    ``response_code`` the field 39 code to answer with, ``masked_raw`` a layout safe to log,
    and ``partial`` the message as far as it could be read (MTI and every field that decoded
    cleanly, including fields after a field whose content, but not length, was wrong), or
    ``None`` when not even the MTI could be read.
    """

    def __init__(
        self,
        field: int | None,
        reason: str,
        *,
        response_code: str = "30",
        masked_raw: str = "",
        partial: Message | None = None,
    ) -> None:
        self.field = field
        self.reason = reason
        self.response_code = response_code
        self.masked_raw = masked_raw
        self.partial = partial
        where = "message" if field is None else f"field {field}"
        super().__init__(f"{where}: {reason}")

    def __repr__(self) -> str:
        return (
            f"DecodeError(field={self.field!r}, response_code={self.response_code!r}, "
            f"reason={self.reason!r})"
        )


class ValidationError(Iso8583Error):
    """A well-formed message breaks the contract's per-message rules (fields present, content).

    ``response_code`` is what field 39 of the answer should say (``30`` format error, or ``12``
    for an unknown processing code).
    """

    def __init__(self, field: int | None, reason: str, response_code: str = "30") -> None:
        self.field = field
        self.reason = reason
        self.response_code = response_code
        where = "message" if field is None else f"field {field}"
        super().__init__(f"{where}: {reason}")
