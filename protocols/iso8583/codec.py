"""Sans-I/O ISO 8583 codec: frame bodies (bytes after the length header) to messages and back.

Speed comes from compiling the dialect once: every field gets a specialised decoder and encoder
closure, and the list of closures for a given bitmap (decode) or a given set of field numbers
(encode) is computed once and cached. Validation is never skipped.

Decoding keeps going after a field whose *content* is wrong but whose length is known (bad
digits, bad text, bad TLV) so that :attr:`DecodeError.partial` holds every readable field, in
particular 7, 11 and 32 needed to echo a format error. It stops at the first *structural*
error (truncation, bad length prefix, unknown field) since the following bytes cannot be
located any more.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from operator import itemgetter
from typing import Final

from .dialect import Dialect, FieldSpec
from .errors import DecodeError, EncodeError
from .message import FieldValue, Message, Tlv

__all__ = ["Codec", "MacFunction", "format_tlv", "parse_tlv"]

MacFunction = Callable[[bytes], bytes]

MAC_SIZE: Final = 8
_CACHE_LIMIT: Final = 2048

# C0 controls and DEL. Safe on raw bytes for GBK and UTF-8: their multi-byte sequences never
# use bytes below 0x40 (GBK trail bytes) or 0x80 (UTF-8), so a match is always a control char.
_CTRL = re.compile(rb"[\x00-\x1f\x7f]")
_HEX_DIGITS = b"0123456789abcdefABCDEF"
# Value of a packed BCD byte, -1 when a nibble is not a decimal digit.
_BCD_VALUE: Final = tuple(
    (b >> 4) * 10 + (b & 15) if (b >> 4) < 10 and (b & 15) < 10 else -1 for b in range(256)
)


class _Bad(Exception):
    """Internal: a field is wrong. ``resume`` is where the next field starts, when known."""

    __slots__ = ("reason", "resume", "field")

    def __init__(self, reason: str, resume: int | None = None) -> None:
        self.reason = reason
        self.resume = resume
        self.field: int | None = None


# A decoder reads its field at pos, stores the value in out, returns where the next field
# starts; an encoder returns its field's wire bytes from the message's fields.
_Decoder = Callable[[bytes, int, dict[int, FieldValue]], int]
_Encoder = Callable[[dict[int, FieldValue]], bytes]


def _new_message(mti: str, fields: dict[int, FieldValue]) -> Message:
    msg = Message.__new__(Message)
    msg.mti = mti
    msg.fields = fields
    return msg


def _new_tlv(items: tuple[tuple[str, str], ...]) -> Tlv:
    tlv = Tlv.__new__(Tlv)
    object.__setattr__(tlv, "items", items)
    return tlv


# ---------------------------------------------------------------------------------------------
# Field 48 TLV


_TextDecode = Callable[[bytes], tuple[str, int]]
_TextEncode = Callable[[str], tuple[bytes, int]]


def parse_tlv(raw: bytes, encoding: str) -> Tlv:
    """Parse TLV bytes (2-digit tag, 3-digit byte length, value) into a :class:`Tlv`.

    Raises ``ValueError`` (with a reason that never quotes a value) when malformed.
    """
    return _parse_tlv(raw, codecs.lookup(encoding).decode)


def format_tlv(tlv: Tlv, encoding: str) -> bytes:
    """Encode a :class:`Tlv`; item lengths count bytes in ``encoding``.

    Raises ``ValueError`` when a value exceeds 999 bytes, ``UnicodeEncodeError`` when it
    cannot be encoded.
    """
    return _format_tlv(tlv, codecs.lookup(encoding).encode)


_TLV_LENGTH: Final = {f"{i:03d}": i for i in range(1000)}


def _parse_tlv(raw: bytes, decode: _TextDecode) -> Tlv:
    # Headers are read from a latin-1 view (one char per byte, so offsets stay byte offsets).
    # ASCII values are sliced from it too; any other value is decoded from its own bytes.
    text = raw.decode("latin-1")
    items: dict[str, str] = {}
    count = 0
    i = 0
    n = len(raw)
    while i < n:
        tag = text[i : i + 2]
        size = _TLV_LENGTH.get(text[i + 2 : i + 5])
        if size is None or not tag.isdecimal():
            raise ValueError(f"TLV item at offset {i} has no 2-digit tag and 3-digit length")
        start = i + 5
        i = start + size
        if i > n:
            raise ValueError(f"TLV tag {tag} runs past the end of the field")
        value = text[start:i]
        if not value.isascii():
            try:
                value = decode(raw[start:i])[0]
            except UnicodeDecodeError:
                raise ValueError(f"TLV tag {tag} is not valid text") from None
        items[tag] = value
        count += 1
    if len(items) != count:
        raise ValueError("a TLV tag appears twice")
    return _new_tlv(tuple(items.items()))


def _format_tlv(tlv: Tlv, encode: _TextEncode) -> bytes:
    out: list[str] = []
    ascii_only = True
    for tag, value in tlv.items:
        if value.isascii():
            size = len(value)
        else:
            size = len(encode(value)[0])
            ascii_only = False
        if size > 999:
            raise ValueError(f"TLV tag {tag} value is {size} bytes, more than 999")
        out.append(f"{tag}{size:03d}{value}")
    text = "".join(out)
    return text.encode() if ascii_only else encode(text)[0]


# ---------------------------------------------------------------------------------------------
# Field compilers


def _prefix_reader(dialect: Dialect, spec: FieldSpec) -> tuple[int, Callable[[bytes, int], int]]:
    """(prefix size, function reading the length value at pos) for a variable field."""
    ll = spec.length_type == "llvar"
    if dialect.length_prefix_encoding == "bcd":
        if ll:

            def read_bcd1(body: bytes, pos: int) -> int:
                if pos >= len(body):
                    raise _Bad("length prefix truncated")
                value = _BCD_VALUE[body[pos]]
                if value < 0:
                    raise _Bad("length prefix is not packed BCD")
                return value

            return 1, read_bcd1

        def read_bcd2(body: bytes, pos: int) -> int:
            digits = body[pos : pos + 2].hex()
            if len(digits) != 4:
                raise _Bad("length prefix truncated")
            if not digits.isdigit():
                raise _Bad("length prefix is not packed BCD")
            return int(digits)

        return 2, read_bcd2

    size = 2 if ll else 3

    def read_ascii(body: bytes, pos: int) -> int:
        digits = body[pos : pos + size]
        if len(digits) != size:
            raise _Bad("length prefix truncated")
        if not digits.isdigit():
            raise _Bad("length prefix is not ASCII digits")
        return int(digits)

    return size, read_ascii


def _prefix_table(dialect: Dialect, spec: FieldSpec) -> tuple[bytes, ...]:
    """Encoded length prefix for every allowed length (index = length)."""
    ll = spec.length_type == "llvar"
    if dialect.length_prefix_encoding == "bcd":
        fmt = "{:02d}" if ll else "{:04d}"
        return tuple(bytes.fromhex(fmt.format(i)) for i in range(spec.max_length + 1))
    fmt = "{:02d}" if ll else "{:03d}"
    return tuple(fmt.format(i).encode("ascii") for i in range(spec.max_length + 1))


def _value_decoder(dialect: Dialect, spec: FieldSpec) -> Callable[[bytes], FieldValue]:
    """Turns a field's exact raw bytes into its value (raises ``_Bad`` without resume)."""
    encoding = dialect.text_encoding
    decode_text = codecs.lookup(encoding).decode
    ctrl = _CTRL.search
    if spec.structure == "tlv":

        def tlv_value(raw: bytes) -> FieldValue:
            if ctrl(raw):
                raise _Bad("control character in TLV data")
            try:
                return _parse_tlv(raw, decode_text)
            except ValueError as exc:
                raise _Bad(str(exc)) from None

        return tlv_value
    if spec.kind == "an":

        def an_value(raw: bytes) -> FieldValue:
            if not raw.isascii() or ctrl(raw):
                raise _Bad("an field holds a character that is not printable ASCII")
            return raw.decode("ascii")

        return an_value
    if spec.kind == "ans":

        def ans_value(raw: bytes) -> FieldValue:
            if ctrl(raw):
                raise _Bad("control character in text field")
            try:
                return raw.decode("ascii") if raw.isascii() else decode_text(raw)[0]
            except UnicodeDecodeError:
                raise _Bad(f"text is not valid {encoding}") from None

        return ans_value
    if spec.kind == "b":
        return bytes
    raise AssertionError("numeric fields are decoded by _numeric_decoder")  # pragma: no cover


def _numeric_decoder(dialect: Dialect, spec: FieldSpec) -> _Decoder:
    maximum = spec.max_length
    number = spec.number
    if spec.length_type == "fixed":
        if dialect.numeric_encoding == "bcd":
            nbytes = (maximum + 1) // 2
            nhex = nbytes * 2
            if maximum & 1:

                def fixed_bcd_odd(body: bytes, pos: int, out: dict[int, FieldValue]) -> int:
                    end = pos + nbytes
                    digits = body[pos:end].hex()
                    if len(digits) != nhex:
                        raise _Bad("truncated")
                    if not digits.isdigit():
                        raise _Bad("not packed BCD digits", end)
                    if digits[0] != "0":
                        raise _Bad("left pad nibble of odd-length BCD is not 0", end)
                    out[number] = digits[1:]
                    return end

                return fixed_bcd_odd

            def fixed_bcd(body: bytes, pos: int, out: dict[int, FieldValue]) -> int:
                end = pos + nbytes
                digits = body[pos:end].hex()
                if len(digits) != nhex:
                    raise _Bad("truncated")
                if not digits.isdigit():
                    raise _Bad("not packed BCD digits", end)
                out[number] = digits
                return end

            return fixed_bcd

        def fixed_ascii(body: bytes, pos: int, out: dict[int, FieldValue]) -> int:
            end = pos + maximum
            raw = body[pos:end]
            if len(raw) != maximum:
                raise _Bad("truncated")
            if not raw.isdigit():
                raise _Bad("numeric field holds a non-digit", end)
            out[number] = raw.decode("ascii")
            return end

        return fixed_ascii

    psize, read_prefix = _prefix_reader(dialect, spec)
    if dialect.numeric_encoding == "bcd":

        def var_bcd(body: bytes, pos: int, out: dict[int, FieldValue]) -> int:
            count = read_prefix(body, pos)
            start = pos + psize
            end = start + (count + 1) // 2
            if end > len(body):
                raise _Bad("truncated")
            if count > maximum:
                raise _Bad(f"{count} digits, more than {maximum}", end)
            if count == 0:
                raise _Bad("empty numeric field", end)
            digits = body[start:end].hex()
            if not digits.isdigit():
                raise _Bad("not packed BCD digits", end)
            if count & 1:
                if digits[0] != "0":
                    raise _Bad("left pad nibble of odd-length BCD is not 0", end)
                out[number] = digits[1:]
                return end
            out[number] = digits
            return end

        return var_bcd

    def var_ascii(body: bytes, pos: int, out: dict[int, FieldValue]) -> int:
        count = read_prefix(body, pos)
        start = pos + psize
        end = start + count
        if end > len(body):
            raise _Bad("truncated")
        if count > maximum:
            raise _Bad(f"{count} digits, more than {maximum}", end)
        raw = body[start:end]
        if not raw.isdigit():
            raise _Bad("numeric field holds a non-digit" if raw else "empty numeric field", end)
        out[number] = raw.decode("ascii")
        return end

    return var_ascii


def _field_decoder(dialect: Dialect, spec: FieldSpec) -> _Decoder:
    if spec.kind == "n":
        return _numeric_decoder(dialect, spec)
    value_of = _value_decoder(dialect, spec)
    maximum = spec.max_length
    number = spec.number
    if spec.length_type == "fixed":
        if spec.kind == "b":

            def fixed_binary(body: bytes, pos: int, out: dict[int, FieldValue]) -> int:
                end = pos + maximum
                raw = body[pos:end]
                if len(raw) != maximum:
                    raise _Bad("truncated")
                out[number] = raw
                return end

            return fixed_binary

        def fixed_text(body: bytes, pos: int, out: dict[int, FieldValue]) -> int:
            end = pos + maximum
            raw = body[pos:end]
            if len(raw) != maximum:
                raise _Bad("truncated")
            try:
                out[number] = value_of(raw)
                return end
            except _Bad as bad:
                bad.resume = end
                raise

        return fixed_text

    psize, read_prefix = _prefix_reader(dialect, spec)

    def variable(body: bytes, pos: int, out: dict[int, FieldValue]) -> int:
        count = read_prefix(body, pos)
        start = pos + psize
        end = start + count
        if end > len(body):
            raise _Bad("truncated")
        if count > maximum:
            raise _Bad(f"{count} bytes, more than {maximum}", end)
        try:
            out[number] = value_of(body[start:end])
            return end
        except _Bad as bad:
            bad.resume = end
            raise

    return variable


def _field_encoder(dialect: Dialect, spec: FieldSpec) -> _Encoder:
    number = spec.number
    maximum = spec.max_length
    fixed = spec.length_type == "fixed"
    prefixes = () if fixed else _prefix_table(dialect, spec)
    encoding = dialect.text_encoding
    encode_text = codecs.lookup(encoding).encode
    ctrl = _CTRL.search

    if spec.kind == "n":
        bcd = dialect.numeric_encoding == "bcd"

        def numeric(fields: dict[int, FieldValue]) -> bytes:
            value = fields[number]
            if type(value) is not str:
                raise _Bad("numeric field value must be str")
            count = len(value)
            if fixed:
                if count != maximum:
                    raise _Bad(f"{count} digits, expected exactly {maximum}")
            elif count > maximum:
                raise _Bad(f"{count} digits, more than {maximum}")
            if not (value.isascii() and value.isdigit()):
                raise _Bad("numeric field holds a non-digit" if value else "empty numeric field")
            data = bytes.fromhex("0" + value if count & 1 else value) if bcd else value.encode()
            return data if fixed else prefixes[count] + data

        return numeric

    if spec.kind == "b":

        def binary(fields: dict[int, FieldValue]) -> bytes:
            value = fields[number]
            if type(value) is not bytes:
                if not isinstance(value, bytearray | memoryview):
                    raise _Bad("binary field value must be bytes")
                value = bytes(value)
            count = len(value)
            if fixed:
                if count != maximum:
                    raise _Bad(f"{count} bytes, expected exactly {maximum}")
                return value
            if count > maximum:
                raise _Bad(f"{count} bytes, more than {maximum}")
            return prefixes[count] + value

        return binary

    if spec.structure == "tlv":

        def tlv(fields: dict[int, FieldValue]) -> bytes:
            value = fields[number]
            if type(value) is not Tlv:
                raise _Bad("TLV field value must be a Tlv")
            try:
                data = _format_tlv(value, encode_text)
            except (ValueError, UnicodeEncodeError):
                raise _Bad(f"TLV value not encodable in {encoding} or too long") from None
            if ctrl(data):
                raise _Bad("control character in TLV data")
            count = len(data)
            if count > maximum or fixed and count != maximum:
                raise _Bad(f"{count} bytes, more than {maximum}")
            return data if fixed else prefixes[count] + data

        return tlv

    an = spec.kind == "an"

    def text(fields: dict[int, FieldValue]) -> bytes:
        value = fields[number]
        if type(value) is not str:
            raise _Bad("text field value must be str")
        elif an:
            if not value.isascii():
                raise _Bad("an field holds a character that is not printable ASCII")
            data = value.encode()
        else:
            try:
                data = value.encode() if value.isascii() else encode_text(value)[0]
            except UnicodeEncodeError:
                raise _Bad(f"text not encodable in {encoding}") from None
        if ctrl(data):
            raise _Bad("control character in text field")
        count = len(data)
        if fixed:
            if count != maximum:
                raise _Bad(f"{count} bytes, expected exactly {maximum}")
            return data
        if count > maximum:
            raise _Bad(f"{count} bytes, more than {maximum}")
        return prefixes[count] + data

    return text


# ---------------------------------------------------------------------------------------------
# Steps: a plan is a sequence of steps; a step is one field or a run of consecutive fixed-length
# fields checked in bulk (one slice, one digit check). When the bulk check fails, the run falls
# back to its fields' own decoders/encoders, which find the exact field and reason.

_Step = _Decoder
_EncStep = _Encoder


def _run_fallback(singles: tuple[tuple[int, _Decoder], ...]) -> _Step:
    def slow(body: bytes, pos: int, out: dict[int, FieldValue]) -> int:
        first: _Bad | None = None
        for number, decoder in singles:
            try:
                pos = decoder(body, pos, out)
            except _Bad as bad:
                bad.field = number
                if first is None:
                    first = bad
                if bad.resume is None:
                    first.resume = None
                    raise first from None
                pos = bad.resume
        if first is not None:
            first.resume = pos
            raise first
        return pos

    return slow


def _enc_run_fallback(singles: tuple[tuple[int, _Encoder], ...]) -> _EncStep:
    def slow(fields: dict[int, FieldValue]) -> bytes:
        parts = []
        for number, encoder in singles:
            try:
                parts.append(encoder(fields))
            except _Bad as bad:
                bad.field = number
                raise
        return b"".join(parts)

    return slow


def _bcd_run(specs: list[FieldSpec], decoders: dict[int, _Decoder]) -> _Step:
    """Consecutive fixed numeric fields, packed BCD: one hex() and one isdigit()."""
    layout: list[tuple[int, int, int]] = []
    pads: list[int] = []
    at = 0
    for spec in specs:
        size = spec.max_length + (spec.max_length & 1)
        if spec.max_length & 1:
            pads.append(at)
        layout.append((spec.number, at + (spec.max_length & 1), at + size))
        at += size
    nbytes, nhex = at // 2, at
    pad_at = tuple(pads)
    fields = tuple(layout)
    slow = _run_fallback(tuple((s.number, decoders[s.number]) for s in specs))

    def bcd_run(body: bytes, pos: int, out: dict[int, FieldValue]) -> int:
        end = pos + nbytes
        digits = body[pos:end].hex()
        if len(digits) == nhex and digits.isdigit():
            for p in pad_at:
                if digits[p] != "0":
                    return slow(body, pos, out)
            for number, a, b in fields:
                out[number] = digits[a:b]
            return end
        return slow(body, pos, out)

    return bcd_run


def _numeric_ranges(specs: list[FieldSpec]) -> tuple[tuple[int, int], ...]:
    """Merged [a, b) character ranges of the numeric fields of an ASCII text run."""
    ranges: list[list[int]] = []
    at = 0
    for spec in specs:
        if spec.kind == "n":
            if ranges and ranges[-1][1] == at:
                ranges[-1][1] = at + spec.max_length
            else:
                ranges.append([at, at + spec.max_length])
        at += spec.max_length
    return tuple((a, b) for a, b in ranges)


def _text_run(specs: list[FieldSpec], decoders: dict[int, _Decoder]) -> _Step:
    """Consecutive fixed fields that are ASCII on the wire (an, ans, ASCII n): one slice."""
    ranges = _numeric_ranges(specs)
    layout: list[tuple[int, int, int]] = []
    at = 0
    for spec in specs:
        layout.append((spec.number, at, at + spec.max_length))
        at += spec.max_length
    total = at
    fields = tuple(layout)
    ctrl = _CTRL.search
    slow = _run_fallback(tuple((s.number, decoders[s.number]) for s in specs))

    def text_run(body: bytes, pos: int, out: dict[int, FieldValue]) -> int:
        end = pos + total
        raw = body[pos:end]
        if len(raw) == total and raw.isascii() and not ctrl(raw):
            text = raw.decode("ascii")
            for a, b in ranges:
                if not text[a:b].isdigit():
                    return slow(body, pos, out)
            for number, a, b in fields:
                out[number] = text[a:b]
            return end
        return slow(body, pos, out)

    return text_run


def _bcd_enc_run(specs: list[FieldSpec], encoders: dict[int, _Encoder]) -> _EncStep:
    getter = itemgetter(*(s.number for s in specs))
    sizes = tuple(s.max_length for s in specs)
    template = "".join("0%s" if s.max_length & 1 else "%s" for s in specs)
    slow = _enc_run_fallback(tuple((s.number, encoders[s.number]) for s in specs))

    def bcd_enc_run(fields: dict[int, FieldValue]) -> bytes:
        values = getter(fields)
        try:
            if tuple(map(len, values)) == sizes:
                digits = template % values
                if digits.isascii() and digits.isdigit():
                    return bytes.fromhex(digits)
        except TypeError:
            pass
        return slow(fields)

    return bcd_enc_run


def _text_enc_run(specs: list[FieldSpec], encoders: dict[int, _Encoder]) -> _EncStep:
    getter = itemgetter(*(s.number for s in specs))
    sizes = tuple(s.max_length for s in specs)
    ranges = _numeric_ranges(specs)
    ctrl = _CTRL.search
    slow = _enc_run_fallback(tuple((s.number, encoders[s.number]) for s in specs))

    def text_enc_run(fields: dict[int, FieldValue]) -> bytes:
        values = getter(fields)
        try:
            if tuple(map(len, values)) == sizes:
                text = "".join(values)
                if text.isascii():
                    for a, b in ranges:
                        if not text[a:b].isdigit():
                            return slow(fields)
                    data = text.encode()
                    if not ctrl(data):
                        return data
        except TypeError:
            pass
        return slow(fields)

    return text_enc_run


def _run_kind(dialect: Dialect, spec: FieldSpec) -> str:
    """Which bulk run a field can join: "bcd", "text" or "" (none)."""
    if spec.length_type != "fixed" or spec.structure:
        return ""
    if spec.kind == "n":
        return "bcd" if dialect.numeric_encoding == "bcd" else "text"
    if spec.kind in ("an", "ans"):
        return "text"
    return ""


# ---------------------------------------------------------------------------------------------
# Plans


class _DecodePlan:
    __slots__ = ("steps", "error_field", "error_reason", "numbers", "mac_size", "fields_start")

    def __init__(
        self,
        steps: tuple[tuple[int, _Step], ...],
        error_field: int | None,
        error_reason: str,
        numbers: tuple[int, ...],
        mac_size: int,
        fields_start: int,
    ) -> None:
        self.steps = steps  # (first field number of the step, step)
        self.error_field = error_field
        self.error_reason = error_reason
        self.numbers = numbers  # every field the bitmap announces, in order
        self.mac_size = mac_size  # size of the MAC field when present (it is last), else 0
        self.fields_start = fields_start  # offset of the first field (after the bitmaps)


class _EncodePlan:
    __slots__ = ("bitmap", "steps")

    def __init__(self, bitmap: bytes, steps: tuple[tuple[int, _EncStep], ...]) -> None:
        self.bitmap = bitmap
        self.steps = steps


class Codec:
    """Encode and decode message bodies of one :class:`Dialect`. Thread-compatible, no I/O."""

    __slots__ = (
        "dialect",
        "_decoders",
        "_encoders",
        "_dplans",
        "_eplans",
        "_mplans",
        "_binary_bitmap",
        "_bcd_mti",
        "_mti_size",
        "_ascii_header",
        "_mac_sizes",
    )

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._decoders = {s.number: _field_decoder(dialect, s) for s in dialect.fields}
        self._encoders = {s.number: _field_encoder(dialect, s) for s in dialect.fields}
        self._dplans: dict[int, _DecodePlan] = {}
        self._eplans: dict[tuple[object, ...], _EncodePlan] = {}
        self._mplans: dict[tuple[object, ...], _EncodePlan] = {}
        self._binary_bitmap = dialect.bitmap_encoding == "binary"
        self._bcd_mti = dialect.mti_encoding == "bcd"
        self._mti_size = 2 if self._bcd_mti else 4
        self._ascii_header = dialect.length_header == "ascii4"
        self._mac_sizes: dict[int, int] = {}
        for number in (64, 128):
            spec = dialect.by_number.get(number)
            if spec is not None and spec.kind == "b" and spec.length_type == "fixed":
                self._mac_sizes[number] = spec.max_length

    def __repr__(self) -> str:
        return f"Codec(dialect={self.dialect.name!r})"

    # -- framing --------------------------------------------------------------------------

    def frame(self, body: bytes) -> bytes:
        """``body`` with the dialect's length header in front."""
        size = len(body)
        if size > self.dialect.max_frame:
            raise EncodeError(
                None, f"{size} bytes exceed the {self.dialect.max_frame}-byte frame limit"
            )
        if self._ascii_header:
            return b"%04d" % size + body
        return size.to_bytes(2, "big") + body

    def encode_frame(self, msg: Message) -> bytes:
        """Encode ``msg`` and add the length header."""
        return self.frame(self.encode(msg))

    # -- decoding -------------------------------------------------------------------------

    def decode(self, body: bytes) -> Message:
        """Decode one frame body; raises :class:`DecodeError` on anything invalid."""
        return self.decode_with_mac_input(body)[0]

    def decode_with_mac_input(self, body: bytes) -> tuple[Message, bytes | None]:
        """Decode, and return the bytes the MAC covers (``None`` when there is no MAC field).

        The MAC field is 64 without a secondary bitmap, 128 with one; it is always the last
        field, so the covered bytes are the body without its last 8 bytes.
        """
        if type(body) is not bytes:
            body = bytes(body)
        try:
            return self._decode(body)
        except DecodeError:
            raise
        except (IndexError, ValueError, TypeError, UnicodeError, OverflowError) as exc:
            # Unreachable by design; a last line of defence so that only Iso8583Error escapes.
            raise DecodeError(
                None, f"malformed message ({type(exc).__name__})", masked_raw=self._dump(body)
            ) from None

    def _decode(self, body: bytes) -> tuple[Message, bytes | None]:
        msize = self._mti_size
        raw_mti = body[:msize]
        if self._bcd_mti:
            mti = raw_mti.hex()
            ok = len(mti) == 4 and mti.isdigit()
        else:
            ok = len(raw_mti) == 4 and raw_mti.isdigit()
            mti = raw_mti.decode("latin-1")
        if not ok:
            raise DecodeError(None, "MTI is not four digits", masked_raw=self._dump(body))
        if self._binary_bitmap:
            primary = body[msize : msize + 8]
            if len(primary) != 8:
                raise self._early_error(body, mti, "primary bitmap truncated")
            bitmap = int.from_bytes(primary, "big") << 64
            if bitmap >> 127:
                secondary = body[msize + 8 : msize + 16]
                if len(secondary) != 8:
                    raise self._early_error(body, mti, "secondary bitmap truncated", 1)
                bitmap |= int.from_bytes(secondary, "big")
        else:
            primary = body[msize : msize + 16]
            if len(primary) != 16 or primary.translate(None, _HEX_DIGITS):
                raise self._early_error(body, mti, "primary bitmap is not 16 hex digits")
            bitmap = int(primary, 16) << 64
            if bitmap >> 127:
                secondary = body[msize + 16 : msize + 32]
                if len(secondary) != 16 or secondary.translate(None, _HEX_DIGITS):
                    raise self._early_error(body, mti, "secondary bitmap is not 16 hex digits", 1)
                bitmap |= int(secondary, 16)
        plan = self._dplans.get(bitmap)
        if plan is None:
            plan = self._decode_plan(bitmap)
        pos = plan.fields_start
        fields: dict[int, FieldValue] = {}
        error: _Bad | None = None
        for number, step in plan.steps:
            try:
                pos = step(body, pos, fields)
            except _Bad as bad:
                if bad.field is None:
                    bad.field = number
                if error is None:
                    error = bad
                if bad.resume is None:
                    break
                pos = bad.resume
        else:
            if error is None:
                if plan.error_field is not None:
                    error = _Bad(plan.error_reason)
                    error.field = plan.error_field
                elif pos != len(body):
                    raise DecodeError(
                        None,
                        f"{len(body) - pos} bytes after the last field",
                        masked_raw=self._dump(body, plan),
                        partial=_new_message(mti, fields),
                    )
        if error is not None:
            raise DecodeError(
                error.field,
                error.reason,
                masked_raw=self._dump(body, plan),
                partial=_new_message(mti, fields),
            )
        msg = _new_message(mti, fields)
        if plan.mac_size:
            return msg, body[: len(body) - plan.mac_size]
        return msg, None

    def _early_error(
        self, body: bytes, mti: str, reason: str, field: int | None = None
    ) -> DecodeError:
        return DecodeError(
            field, reason, masked_raw=self._dump(body), partial=_new_message(mti, {})
        )

    def _decode_plan(self, bitmap: int) -> _DecodePlan:
        numbers = tuple(n for n in range(2, 129) if bitmap >> (128 - n) & 1)
        secondary = bool(bitmap >> 127)
        known: list[FieldSpec] = []
        error_field: int | None = None
        error_reason = ""
        for number in numbers:
            spec = self.dialect.by_number.get(number)
            if spec is None:
                error_field = number
                error_reason = (
                    "tertiary bitmaps are not supported"
                    if number == 65
                    else f"field {number} is not defined in the {self.dialect.name} dialect"
                )
                break
            known.append(spec)
        if error_field is None:
            if secondary and not any(n > 64 for n in numbers):
                error_field, error_reason = 1, "secondary bitmap present but empty"
            elif secondary and 64 in numbers:
                error_field = 64
                error_reason = "field 64 with a secondary bitmap (the MAC goes in 128)"
        steps: list[tuple[int, _Step]] = []
        for kind, group in self._groups(known):
            if kind == "bcd":
                steps.append((group[0].number, _bcd_run(group, self._decoders)))
            elif kind == "text":
                steps.append((group[0].number, _text_run(group, self._decoders)))
            else:
                number = group[0].number
                steps.append((number, self._decoders[number]))
        mac_field = 128 if secondary else 64
        mac_size = self._mac_sizes.get(mac_field, 0) if numbers and numbers[-1] == mac_field else 0
        fields_start = self._mti_size + (8 if self._binary_bitmap else 16) * (2 if secondary else 1)
        plan = _DecodePlan(tuple(steps), error_field, error_reason, numbers, mac_size, fields_start)
        if len(self._dplans) >= _CACHE_LIMIT:
            self._dplans.clear()
        self._dplans[bitmap] = plan
        return plan

    def _groups(self, specs: list[FieldSpec]) -> list[tuple[str, list[FieldSpec]]]:
        """Split fields (in wire order) into bulk runs of 2+ fields and single fields."""
        groups: list[tuple[str, list[FieldSpec]]] = []
        for spec in specs:
            kind = _run_kind(self.dialect, spec)
            if kind and groups and groups[-1][0] == kind:
                groups[-1][1].append(spec)
            else:
                groups.append((kind, [spec]))
        return [(kind if len(group) > 1 else "", group) for kind, group in groups]

    def _dump(self, body: bytes, plan: _DecodePlan | None = None) -> str:
        """A description of a bad frame that is safe to log.

        Once a frame is malformed, nothing says where its secrets are (a wrong bitmap shifts a
        PAN into a "harmless" field), so field contents are never shown: only the MTI and
        bitmap bytes in hex, then each field located, as ``number:length``, and the size of the
        part that could not be located.
        """
        head = plan.fields_start if plan is not None else self._mti_size
        out = [body[:head].hex()]
        pos = head
        if plan is not None:
            scratch: dict[int, FieldValue] = {}
            located: list[str] = []
            for number in plan.numbers:
                decoder = self._decoders.get(number)
                if decoder is None:
                    break
                try:
                    end = decoder(body, pos, scratch)
                except _Bad as bad:
                    if bad.resume is None:
                        break
                    end = bad.resume
                located.append(f"{number}:{end - pos}")
                pos = end
            out.append(" fields=[" + " ".join(located) + "]")
        out.append(f" unlocated={max(len(body) - pos, 0)}B total={len(body)}B")
        return "".join(out)

    # -- encoding -------------------------------------------------------------------------

    def encode(self, msg: Message) -> bytes:
        """Encode a message body (no length header); raises :class:`EncodeError`."""
        key = tuple(msg.fields)
        plan = self._eplans.get(key)
        if plan is None:
            plan = self._encode_plan(key)
        return self._emit(msg, plan)

    def mac_field(self, msg: Message) -> int:
        """Where the MAC of ``msg`` goes: 128 when it has a secondary bitmap, else 64."""
        return 128 if any(n > 64 and n != 128 for n in msg.fields) else 64

    def mac_input(self, msg: Message) -> bytes:
        """The bytes the MAC covers: ``msg`` encoded with the MAC bit set, up to the MAC field.

        Any MAC value already in ``msg`` (64 or 128) is ignored. Finish with
        :meth:`append_mac`; the message is encoded only once.
        """
        key = tuple(msg.fields)
        plan = self._mplans.get(key)
        if plan is None:
            plan = self._mac_plan(key)
        return self._emit(msg, plan)

    def _emit(self, msg: Message, plan: _EncodePlan) -> bytes:
        """MTI, bitmap and the fields of `plan` (from `_encode_plan` or `_mac_plan`)."""
        fields = msg.fields
        parts = [self._mti_bytes(msg.mti), plan.bitmap]
        number = 0
        try:
            for number, step in plan.steps:  # noqa: B007 - number names the failing field
                parts.append(step(fields))
        except _Bad as bad:
            raise EncodeError(number if bad.field is None else bad.field, bad.reason) from None
        return b"".join(parts)

    @staticmethod
    def append_mac(mac_input: bytes, mac: bytes) -> bytes:
        """The full body: ``mac_input`` (from :meth:`mac_input`) followed by the 8-byte MAC."""
        if type(mac) is not bytes or len(mac) != MAC_SIZE:
            raise EncodeError(None, f"a MAC must be {MAC_SIZE} bytes")
        return mac_input + mac

    def encode_with_mac(self, msg: Message, mac_fn: MacFunction) -> bytes:
        """Encode once, computing the MAC with ``mac_fn(mac_input) -> 8 bytes``."""
        data = self.mac_input(msg)
        return self.append_mac(data, mac_fn(data))

    def _mti_bytes(self, mti: str) -> bytes:
        if type(mti) is not str:
            raise EncodeError(None, "MTI must be a str")
        if self._bcd_mti:
            if len(mti) == 4 and mti.isascii() and mti.isdigit():
                return bytes.fromhex(mti)
        else:
            raw = mti.encode("ascii", "replace")
            if len(raw) == 4 and raw.isdigit():
                return raw
        raise EncodeError(None, "MTI must be four digits")

    def _bitmap_bytes(self, numbers: list[int]) -> bytes:
        bitmap = 0
        secondary = numbers[-1] > 64 if numbers else False
        if secondary:
            bitmap |= 1 << 127
        for number in numbers:
            bitmap |= 1 << (128 - number)
        if not secondary:
            bitmap >>= 64
        size = 16 if secondary else 8
        if self._binary_bitmap:
            return bitmap.to_bytes(size, "big")
        return b"%0*X" % (size * 2, bitmap)

    def _checked_specs(self, key: tuple[object, ...]) -> list[FieldSpec]:
        specs: list[FieldSpec] = []
        for number in key:
            spec = self.dialect.by_number.get(number) if type(number) is int else None
            if spec is None:
                raise EncodeError(
                    number if type(number) is int else None,
                    f"field {number!r} is not defined in the {self.dialect.name} dialect",
                )
            specs.append(spec)
        specs.sort(key=lambda s: s.number)
        return specs

    def _enc_steps(self, specs: list[FieldSpec]) -> tuple[tuple[int, _EncStep], ...]:
        steps: list[tuple[int, _EncStep]] = []
        for kind, group in self._groups(specs):
            if kind == "bcd":
                steps.append((group[0].number, _bcd_enc_run(group, self._encoders)))
            elif kind == "text":
                steps.append((group[0].number, _text_enc_run(group, self._encoders)))
            else:
                number = group[0].number
                steps.append((number, self._encoders[number]))
        return tuple(steps)

    def _encode_plan(self, key: tuple[object, ...]) -> _EncodePlan:
        specs = self._checked_specs(key)
        numbers = [s.number for s in specs]
        if 64 in numbers and numbers[-1] > 64:
            raise EncodeError(64, "field 64 with a secondary bitmap (the MAC goes in 128)")
        plan = _EncodePlan(self._bitmap_bytes(numbers), self._enc_steps(specs))
        if len(self._eplans) >= _CACHE_LIMIT:
            self._eplans.clear()
        self._eplans[key] = plan
        return plan

    def _mac_plan(self, key: tuple[object, ...]) -> _EncodePlan:
        specs = [s for s in self._checked_specs(key) if s.number not in (64, 128)]
        numbers = [s.number for s in specs]
        mac_field = 128 if numbers and numbers[-1] > 64 else 64
        if mac_field not in self._mac_sizes:
            raise EncodeError(mac_field, f"the {self.dialect.name} dialect has no MAC field")
        plan = _EncodePlan(self._bitmap_bytes([*numbers, mac_field]), self._enc_steps(specs))
        if len(self._mplans) >= _CACHE_LIMIT:
            self._mplans.clear()
        self._mplans[key] = plan
        return plan
