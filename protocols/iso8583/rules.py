"""Which fields each message of the link contract carries, as data, and their checks.

:data:`FIELD_TABLE` transcribes the contract's "fields per message" table column by column
(``M`` mandatory, ``E`` echoed from the request, ``C`` when it applies, ``-`` absent). The
rules are derived from it: ``E`` is mandatory when the request column says ``M``, conditional
when it says ``C``. The MAC column is handled separately: the MAC goes in 64, or in 128 when the
message has a secondary bitmap.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

from .errors import ValidationError
from .message import Message, Tlv

__all__ = [
    "COLUMNS",
    "FIELD_TABLE",
    "MAC_REQUIRED",
    "PROCESSING_CODES",
    "RULES",
    "TLV_TAGS",
    "MessageRule",
    "message_kind",
    "required_fields",
    "validate_required",
]

Direction = Literal["request", "response"]

#: Columns of the table: (message kind, its request's kind or "" for a request).
COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("0800", ""),
    ("0810", "0800"),
    ("0200 inquiry", ""),
    ("0210 inquiry", "0200 inquiry"),
    ("0200 payment", ""),
    ("0210 payment", "0200 payment"),
    ("0420", ""),
    ("0430", "0420"),
    ("0500", ""),
    ("0510", "0500"),
)

# fmt: off
#: field -> one letter per column of COLUMNS.
FIELD_TABLE: Final[Mapping[int, str]] = MappingProxyType({
    #    0800 0810 0200i 0210i 0200p 0210p 0420 0430 0500 0510
    3:  "--MEMEME--",
    4:  "---MMEME--",
    7:  "MEMEMEMEME",
    11: "MEMEMEMEME",
    32: "MEMEMEMEME",
    12: "--MEMEME--",
    13: "--MEMEME--",
    37: "--MEMEME--",
    49: "--MEMEME--",
    15: "-M-M-M-MME",
    38: "-----C----",
    39: "-M-M-M-M-M",
    41: "--CECECE--",
    48: "--MMMMMM--",
    70: "ME--------",
    74: "--------MM",
    75: "--------MM",
    86: "--------MM",
    87: "--------MM",
    90: "------ME--",
})
# fmt: on

#: Whether each column carries a MAC (64, or 128 with a secondary bitmap).
MAC_REQUIRED: Final[Mapping[str, bool]] = MappingProxyType(
    {kind: not kind.startswith("08") for kind, _ in COLUMNS}
)

#: Field 48 tags each column must carry (when approved, for responses).
TLV_TAGS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "0200 inquiry": ("01",),
        "0210 inquiry": ("01", "02", "03", "04", "05"),
        "0200 payment": ("01",),
        "0210 payment": ("01", "02", "03", "06"),
        "0420": ("01",),
        "0430": ("01", "06"),
    }
)

#: Processing codes (field 3) of 0200/0210.
PROCESSING_CODES: Final[Mapping[str, str]] = MappingProxyType(
    {"310000": "inquiry", "500000": "payment"}
)

# Content of field 48 tags: (min length, max length, digits only).
_TAG_FORMAT: Final[Mapping[str, tuple[int, int, bool]]] = MappingProxyType(
    {
        "01": (10, 10, True),
        "02": (1, 999, False),
        "03": (12, 12, True),
        "04": (12, 12, True),
        "05": (2, 2, True),
        "06": (1, 20, False),
    }
)


@dataclass(frozen=True, slots=True)
class MessageRule:
    """The fields of one message kind, derived from :data:`FIELD_TABLE`."""

    kind: str
    mandatory: frozenset[int]
    conditional: frozenset[int]
    tlv_tags: tuple[str, ...]
    mac: bool

    @property
    def allowed(self) -> frozenset[int]:
        return self.mandatory | self.conditional


def _derive() -> dict[str, MessageRule]:
    index = {kind: i for i, (kind, _) in enumerate(COLUMNS)}
    rules: dict[str, MessageRule] = {}
    for i, (kind, request) in enumerate(COLUMNS):
        mandatory: set[int] = set()
        conditional: set[int] = set()
        for number, letters in FIELD_TABLE.items():
            letter = letters[i]
            if letter == "E":
                letter = "M" if FIELD_TABLE[number][index[request]] == "M" else "C"
            if letter == "M":
                mandatory.add(number)
            elif letter == "C":
                conditional.add(number)
        rules[kind] = MessageRule(
            kind,
            frozenset(mandatory),
            frozenset(conditional),
            TLV_TAGS.get(kind, ()),
            MAC_REQUIRED[kind],
        )
    return rules


#: Message kind -> rule.
RULES: Final[Mapping[str, MessageRule]] = MappingProxyType(_derive())

_MTI_KIND: Final[Mapping[str, str]] = MappingProxyType(
    {
        "0800": "0800",
        "0810": "0810",
        "0420": "0420",
        "0421": "0420",
        "0430": "0430",
        "0500": "0500",
        "0510": "0510",
    }
)


def message_kind(mti: str, processing_code: str | None) -> str | None:
    """The column of the table for a message, ``None`` when unknown."""
    if mti in ("0200", "0210"):
        purpose = PROCESSING_CODES.get(processing_code or "")
        return None if purpose is None else f"{mti} {purpose}"
    return _MTI_KIND.get(mti)


def required_fields(mti: str, processing_code: str | None = None) -> MessageRule:
    """The rule of a message; ``ValidationError`` (39 = 12, or 30) when there is none."""
    kind = message_kind(mti, processing_code)
    if kind is None:
        if mti in ("0200", "0210"):
            code = "30" if processing_code is None else "12"
            raise ValidationError(3, "unknown or missing processing code", code)
        raise ValidationError(None, f"message type {mti} is not part of the link contract", "12")
    return RULES[kind]


def validate_required(msg: Message, direction: Direction = "request", *, mac: bool = True
                      ) -> MessageRule:
    """Check presence and content rules of the contract; return the rule that applied.

    Requests: every mandatory field and tag, nothing outside the column, 49 = ``156``, field
    48 tag formats, and the MAC field when the column needs one (only presence: verifying it is
    the caller's job). Responses with 39 = ``00`` are held to the full column; any other
    response needs only 39 and, unless 39 = ``63``, the MAC. `mac=False`: the institution is
    configured without MAC, and none is required.
    """
    code = msg.fields.get(3)
    rule = required_fields(msg.mti, code if isinstance(code, str) else None)
    present = set(msg.fields)
    # any field above 64 (128 itself included) means a secondary bitmap: the MAC goes in 128
    mac_field = 128 if any(n > 64 for n in present) else 64
    if rule.mac:  # a message without a MAC (0800, 0810) carrying one has a foreign field
        present.discard(mac_field)
    full = direction == "request" or msg.fields.get(39) == "00"
    extra = present - rule.allowed
    if extra:
        number = min(extra - {64, 128} or extra)
        raise ValidationError(number, f"field {number} does not belong in a {rule.kind}")
    if full:
        missing = rule.mandatory - present
        if missing:
            number = min(missing)
            raise ValidationError(number, f"mandatory field {number} missing in a {rule.kind}")
    elif 39 not in present:
        raise ValidationError(39, f"field 39 missing in a {rule.kind}")
    wants_mac = mac and rule.mac and not (direction == "response"
                                          and msg.fields.get(39) == "63")
    if wants_mac and mac_field not in msg.fields:
        raise ValidationError(mac_field, f"MAC (field {mac_field}) missing in a {rule.kind}")
    if 49 in msg.fields and msg.fields[49] != "156":
        raise ValidationError(49, "currency must be 156")
    if direction == "request":
        for number, check, what in _DATES_AND_TIMES:
            value = msg.fields.get(number)
            if isinstance(value, str) and not check(value):
                raise ValidationError(number, f"field {number} is not a {what}")
    tlv = msg.fields.get(48)
    if tlv is not None:
        if not isinstance(tlv, Tlv):
            raise ValidationError(48, "field 48 must be TLV")
        _check_tlv(tlv, rule.tlv_tags if full else ())
    return rule


# A month and a day it can have (29 February always: an MMDD carries no year), and a time of
# day. Regular expressions, one match a field: a third of the cost of reading the numbers.
_MMDD = (r"(?:(?:0[13578]|1[02])(?:0[1-9]|[12][0-9]|3[01])"
         r"|(?:0[469]|11)(?:0[1-9]|[12][0-9]|30)|02(?:0[1-9]|[12][0-9]))")
_HHMMSS = r"(?:[01][0-9]|2[0-3])[0-5][0-9][0-5][0-9]"

# the request fields that are dates or times: (field, check, what it must be). Their digits
# and lengths the codec has checked already; these are the values a clock can show.
_DATES_AND_TIMES: Final = (
    (7, re.compile(_MMDD + _HHMMSS).fullmatch, "date and time MMDDhhmmss"),
    (12, re.compile(_HHMMSS).fullmatch, "time hhmmss"),
    (13, re.compile(_MMDD).fullmatch, "date MMDD"),
    (15, re.compile(_MMDD).fullmatch, "date MMDD"),
)


def _check_tlv(tlv: Tlv, required: tuple[str, ...]) -> None:
    for tag in required:
        if tag not in tlv:
            raise ValidationError(48, f"field 48 tag {tag} missing")
    for tag, value in tlv.items:
        fmt = _TAG_FORMAT.get(tag)
        if fmt is None:
            continue
        low, high, digits = fmt
        if not low <= len(value) <= high or (digits and not (value.isascii() and value.isdigit())):
            raise ValidationError(48, f"field 48 tag {tag} has the wrong format")
