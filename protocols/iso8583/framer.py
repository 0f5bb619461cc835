"""Sans-I/O framing: split a TCP byte stream into ISO 8583 frame bodies.

Feed bytes with :meth:`Framer.receive_data`, then call :meth:`Framer.next_frame` until it
returns :data:`NEED_DATA`. Zero-length frames are keep-alives: skipped and counted. A header
that is not a valid length, or announces more than ``max_frame`` bytes, raises
:class:`FramingError`; the stream cannot be trusted after that, so the connection must close
(the framer stays broken and raises again).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Final, Literal

from .dialect import Dialect
from .errors import FramingError

__all__ = ["NEED_DATA", "Framer", "NeedData"]


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`Framer.next_frame` when the buffer holds no complete frame.
NEED_DATA: Final = NeedData.NEED_DATA

_DEFAULT_MAX_BUFFER: Final = 1 << 20


class Framer:
    """Incremental frame splitter for one connection of one dialect."""

    __slots__ = (
        "dialect",
        "max_frame",
        "max_buffer",
        "keepalives",
        "frames",
        "_buf",
        "_pos",
        "_ascii",
        "_hsize",
        "_broken",
    )

    def __init__(
        self,
        dialect: Dialect,
        max_frame: int | None = None,
        *,
        max_buffer: int = _DEFAULT_MAX_BUFFER,
    ) -> None:
        self.dialect = dialect
        self.max_frame = dialect.max_frame if max_frame is None else max_frame
        self.max_buffer = max(max_buffer, self.max_frame + 4)
        self.keepalives = 0  # zero-length frames seen
        self.frames = 0  # frames returned
        self._buf = bytearray()
        self._pos = 0
        self._ascii = dialect.length_header == "ascii4"
        self._hsize = dialect.header_size
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the connection."""
        if self._broken is not None:
            raise FramingError(self._broken)
        if self.buffered + len(data) > self.max_buffer:
            self._fail(
                f"{self.buffered + len(data)} bytes buffered without being read as frames "
                f"(limit {self.max_buffer}); call next_frame() after each receive_data()"
            )
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next_frame(self) -> bytes | Literal[NeedData.NEED_DATA]:
        """The next complete frame body (without header), or :data:`NEED_DATA`."""
        if self._broken is not None:
            raise FramingError(self._broken)
        buf = self._buf
        hsize = self._hsize
        while True:
            pos = self._pos
            header = bytes(buf[pos : pos + hsize])
            if len(header) < hsize:
                self._compact()
                return NEED_DATA
            if self._ascii:
                if not header.isdigit():
                    self._fail(self._bad_ascii_hint(header))
                size = int(header)
            else:
                size = int.from_bytes(header, "big")
            if size > self.max_frame:
                self._fail(self._oversize_hint(header, size))
            if size == 0:
                self.keepalives += 1
                self._pos = pos + hsize
                continue
            end = pos + hsize + size
            if end > len(buf):
                self._compact()
                return NEED_DATA
            frame = bytes(buf[pos + hsize : end])
            self._pos = end
            self.frames += 1
            return frame

    def __iter__(self) -> Iterator[bytes]:
        """Every complete frame now in the buffer."""
        while True:
            frame = self.next_frame()
            if frame is NEED_DATA:
                return
            yield frame

    def frame(self, body: bytes) -> bytes:
        """``body`` with this dialect's length header (the sending direction)."""
        size = len(body)
        if size > self.max_frame:
            raise FramingError(f"refusing to send a {size}-byte frame (limit {self.max_frame})")
        if self._ascii:
            return b"%04d" % size + body
        return size.to_bytes(2, "big") + body

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0

    def _fail(self, message: str) -> None:
        self._broken = message
        self._buf.clear()
        self._pos = 0
        raise FramingError(message)

    def _oversize_hint(self, header: bytes, size: int) -> str:
        hint = ""
        if not self._ascii and header.isdigit():
            hint = (
                "; the header looks like ASCII digits: is the peer using 4-digit ASCII "
                "length headers (post dialect) on a binary-header port?"
            )
        elif header[:3] in (b"GET", b"POS", b"PUT", b"HEA"):
            hint = "; this looks like HTTP, not ISO 8583"
        return (
            f"length header {header.hex()} announces {size} bytes, more than the "
            f"{self.max_frame}-byte limit{hint}"
        )

    def _bad_ascii_hint(self, header: bytes) -> str:
        hint = ""
        if header[:1] in (b"\x00", b"\x01") or not header.isascii():
            hint = (
                "; it looks binary: is the peer using 2-byte binary length headers "
                "(bank dialect) on an ASCII-header port?"
            )
        elif header[:3] in (b"GET", b"POS", b"PUT", b"HEA"):
            hint = "; this looks like HTTP, not ISO 8583"
        return f"length header {header.hex()} is not 4 ASCII digits{hint}"
