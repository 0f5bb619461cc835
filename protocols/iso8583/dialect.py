"""Dialects as data: how a link lays out an ISO 8583 message on the wire.

A :class:`Dialect` is built from a TOML table (see ``config/dialects/*.toml``) by
:func:`dialect_from_table`; nothing about a particular bank is hard-coded in the codec.
"""

from __future__ import annotations

import codecs
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

from .dialects import EMBEDDED_TABLES
from .errors import DialectError

__all__ = [
    "BANK",
    "POST",
    "CONFIG_DIR",
    "Dialect",
    "FieldSpec",
    "builtin_dialect",
    "dialect_from_table",
    "load_dialect",
]

FieldKind = Literal["n", "an", "ans", "b"]
LengthType = Literal["fixed", "llvar", "lllvar"]
LengthHeader = Literal["binary2", "ascii4"]
MtiEncoding = Literal["ascii", "bcd"]
BitmapEncoding = Literal["binary", "ascii_hex"]
DigitEncoding = Literal["bcd", "ascii"]
Structure = Literal["", "tlv"]

#: Where the repository keeps dialect tables (absent in an installed wheel).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "config" / "dialects"

_PREFIX_MAX = {"fixed": 0, "llvar": 99, "lllvar": 999}


@dataclass(frozen=True, slots=True, kw_only=True)
class FieldSpec:
    """One data element: ``max_length`` counts digits for ``n`` fields, bytes otherwise."""

    number: int
    kind: FieldKind
    length_type: LengthType
    max_length: int
    description: str
    sensitive: bool = False
    structure: Structure = ""

    def __post_init__(self) -> None:
        if not 2 <= self.number <= 128 or self.number == 65:
            raise DialectError(f"field number {self.number} is not a data element (2..128, not 65)")
        if self.kind not in get_args(FieldKind):
            raise DialectError(f"field {self.number}: unknown kind {self.kind!r}")
        if self.length_type not in get_args(LengthType):
            raise DialectError(f"field {self.number}: unknown length type {self.length_type!r}")
        if type(self.max_length) is not int or self.max_length < 1:
            raise DialectError(f"field {self.number}: max must be a positive integer")
        limit = _PREFIX_MAX[self.length_type]
        if limit and self.max_length > limit:
            raise DialectError(
                f"field {self.number}: max {self.max_length} does not fit a "
                f"{self.length_type} prefix (<= {limit})"
            )
        if self.structure not in get_args(Structure):
            raise DialectError(f"field {self.number}: unknown structure {self.structure!r}")
        if self.structure == "tlv" and self.kind not in ("an", "ans"):
            raise DialectError(f"field {self.number}: a TLV field must be an or ans")


@dataclass(frozen=True, slots=True, kw_only=True)
class Dialect:
    """Everything the codec and the framer need to know about one link's wire format."""

    name: str
    description: str = ""
    length_header: LengthHeader
    max_frame: int = 4096
    mti_encoding: MtiEncoding = "ascii"
    bitmap_encoding: BitmapEncoding
    numeric_encoding: DigitEncoding
    length_prefix_encoding: DigitEncoding
    text_encoding: str
    fields: tuple[FieldSpec, ...]
    by_number: Mapping[int, FieldSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        choices: tuple[tuple[str, object, Any], ...] = (
            ("length_header", self.length_header, LengthHeader),
            ("mti_encoding", self.mti_encoding, MtiEncoding),
            ("bitmap_encoding", self.bitmap_encoding, BitmapEncoding),
            ("numeric_encoding", self.numeric_encoding, DigitEncoding),
            ("length_prefix_encoding", self.length_prefix_encoding, DigitEncoding),
        )
        for key, value, allowed in choices:
            if value not in get_args(allowed):
                raise DialectError(
                    f"dialect {self.name!r}: {key} must be one of {get_args(allowed)}, "
                    f"not {value!r}"
                )
        try:
            codecs.lookup(self.text_encoding)
        except LookupError:
            raise DialectError(
                f"dialect {self.name!r}: unknown text encoding {self.text_encoding!r}"
            ) from None
        probe = bytes(range(0x20, 0x7F))
        try:
            superset = probe.decode(self.text_encoding) == probe.decode("ascii") and (
                probe.decode("ascii").encode(self.text_encoding) == probe
            )
        except UnicodeError:
            superset = False
        if not superset:
            raise DialectError(
                f"dialect {self.name!r}: text encoding {self.text_encoding!r} must be an "
                "ASCII superset"
            )
        header_max = 0xFFFF if self.length_header == "binary2" else 9999
        if type(self.max_frame) is not int or not 1 <= self.max_frame <= header_max:
            raise DialectError(f"dialect {self.name!r}: max_frame must be 1..{header_max}")
        by_number: dict[int, FieldSpec] = {}
        for spec in self.fields:
            if spec.number in by_number:
                raise DialectError(f"dialect {self.name!r}: field {spec.number} defined twice")
            by_number[spec.number] = spec
        object.__setattr__(self, "by_number", by_number)

    @property
    def header_size(self) -> int:
        return 2 if self.length_header == "binary2" else 4

    @property
    def sensitive_fields(self) -> frozenset[int]:
        return frozenset(s.number for s in self.fields if s.sensitive)


def dialect_from_table(table: Mapping[str, Any]) -> Dialect:
    """Build a :class:`Dialect` from a parsed TOML table (or the same data as a dict)."""
    if not isinstance(table, Mapping):
        raise DialectError("a dialect table must be a mapping")
    known = {
        "name",
        "description",
        "length_header",
        "max_frame",
        "mti_encoding",
        "bitmap_encoding",
        "numeric_encoding",
        "length_prefix_encoding",
        "text_encoding",
        "fields",
    }
    unknown = set(table) - known
    if unknown:
        raise DialectError(f"unknown dialect keys: {sorted(unknown)}")
    raw_fields = table.get("fields")
    if not isinstance(raw_fields, Mapping) or not raw_fields:
        raise DialectError("a dialect needs a non-empty [fields] table")
    specs: list[FieldSpec] = []
    field_keys = {"kind", "length", "max", "description", "sensitive", "structure"}
    for key, entry in raw_fields.items():
        try:
            number = int(key)
        except (TypeError, ValueError):
            raise DialectError(f"field key {key!r} is not a field number") from None
        if not isinstance(entry, Mapping):
            raise DialectError(f"field {number}: entry must be a table")
        extra = set(entry) - field_keys
        if extra:
            raise DialectError(f"field {number}: unknown keys {sorted(extra)}")
        try:
            specs.append(
                FieldSpec(
                    number=number,
                    kind=cast(FieldKind, entry["kind"]),
                    length_type=cast(LengthType, entry["length"]),
                    max_length=entry["max"],
                    description=str(entry.get("description", "")),
                    sensitive=bool(entry.get("sensitive", False)),
                    structure=cast(Structure, entry.get("structure", "")),
                )
            )
        except KeyError as exc:
            raise DialectError(f"field {number}: missing key {exc.args[0]!r}") from None
    specs.sort(key=lambda s: s.number)
    try:
        return Dialect(
            name=str(table["name"]),
            description=str(table.get("description", "")),
            length_header=table["length_header"],
            max_frame=table.get("max_frame", 4096),
            mti_encoding=table.get("mti_encoding", "ascii"),
            bitmap_encoding=table["bitmap_encoding"],
            numeric_encoding=table["numeric_encoding"],
            length_prefix_encoding=table["length_prefix_encoding"],
            text_encoding=str(table["text_encoding"]),
            fields=tuple(specs),
        )
    except KeyError as exc:
        raise DialectError(f"dialect table misses key {exc.args[0]!r}") from None


def load_dialect(path: str | Path) -> Dialect:
    """Load a dialect from a TOML file."""
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DialectError(f"cannot load dialect {str(path)!r}: {exc}") from None
    return dialect_from_table(table)


def builtin_dialect(name: str) -> Dialect:
    """The built-in dialect ``name``: the repository's TOML file, else the embedded copy."""
    path = CONFIG_DIR / f"{name}.toml"
    if path.is_file():
        return load_dialect(path)
    try:
        return dialect_from_table(EMBEDDED_TABLES[name])
    except KeyError:
        raise DialectError(f"no built-in dialect {name!r}") from None


BANK: Dialect = builtin_dialect("bank")
POST: Dialect = builtin_dialect("post")
