"""Message values: :class:`Message`, the field 48 :class:`Tlv` and field 90 :class:`OriginalData`.

:class:`Message` is a plain slotted class, not a frozen dataclass: the switch builds one per
request and per response on the hot path, and the codec validates every field when it encodes,
so construction only checks the MTI. Treat a decoded message as read-only; build responses with
:meth:`Message.evolve` or a fresh ``fields`` dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Union

__all__ = [
    "MASKED_FIELDS",
    "FieldValue",
    "Message",
    "OriginalData",
    "Tlv",
    "mask_value",
]

#: Fields whose values never appear in a repr: PAN, tracks, PIN block, ICC data, MACs.
MASKED_FIELDS: frozenset[int] = frozenset({2, 35, 36, 45, 52, 55, 64, 128})


def mask_value(value: object) -> str:
    """How a sensitive value is shown: its size only."""
    if isinstance(value, bytes):
        return f"<masked {len(value)} bytes>"
    if isinstance(value, str):
        return f"<masked {len(value)} chars>"
    return "<masked>"


@dataclass(frozen=True, slots=True)
class Tlv:
    """Field 48: an ordered sequence of ``(tag, value)`` items, tag two digits.

    On the wire each item is ``tag`` (2 ASCII digits), the value's length (3 ASCII digits,
    counting *bytes* of the value in the link's text encoding) and the value. Tags are unique.
    """

    items: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for item in self.items:
            if type(item) is not tuple or len(item) != 2:
                raise ValueError("TLV items are (tag, value) pairs")
            tag, value = item
            if type(tag) is not str or len(tag) != 2 or not (tag.isascii() and tag.isdigit()):
                raise ValueError(f"TLV tag {tag!r} is not two digits")
            if type(value) is not str or len(value) > 999:
                raise ValueError(f"TLV tag {tag}: value must be a str of at most 999 characters")
            if tag in seen:
                raise ValueError(f"TLV tag {tag} appears twice")
            seen.add(tag)

    @classmethod
    def of(cls, *items: tuple[str, str]) -> Tlv:
        return cls(tuple(items))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str]) -> Tlv:
        return cls(tuple(mapping.items()))

    def get(self, tag: str, default: str | None = None) -> str | None:
        for t, v in self.items:
            if t == tag:
                return v
        return default

    def __getitem__(self, tag: str) -> str:
        for t, v in self.items:
            if t == tag:
                return v
        raise KeyError(tag)

    def __contains__(self, tag: object) -> bool:
        return any(t == tag for t, _ in self.items)

    def tags(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.items)

    def to_dict(self) -> dict[str, str]:
        return dict(self.items)

    def with_items(self, *items: tuple[str, str]) -> Tlv:
        """A copy with ``items`` replacing same-tag items in place or appended at the end."""
        new = dict(self.items)
        new.update(items)
        return Tlv(tuple(new.items()))


FieldValue = Union[str, bytes, Tlv]  # noqa: UP007 - a runtime alias used in isinstance docs


class Message:
    """An ISO 8583 message: MTI and data elements by number.

    ``n``, ``an`` and ``ans`` fields are ``str``, ``b`` fields ``bytes``, TLV fields (48)
    :class:`Tlv`. Equality compares MTI and fields. The repr masks :data:`MASKED_FIELDS`.
    """

    __slots__ = ("mti", "fields")

    def __init__(self, mti: str, fields: dict[int, FieldValue] | None = None) -> None:
        if type(mti) is not str or len(mti) != 4 or not (mti.isascii() and mti.isdigit()):
            raise ValueError("MTI must be four digits")
        self.mti = mti
        self.fields: dict[int, FieldValue] = {} if fields is None else fields

    def get(self, number: int) -> FieldValue | None:
        return self.fields.get(number)

    def __getitem__(self, number: int) -> FieldValue:
        return self.fields[number]

    def __contains__(self, number: object) -> bool:
        return number in self.fields

    def str_field(self, number: int) -> str | None:
        """Field ``number`` as ``str`` (``None`` when absent); ``TypeError`` if not text."""
        value = self.fields.get(number)
        if value is None or type(value) is str:
            return value
        raise TypeError(f"field {number} is not a text field")

    def tlv(self, number: int = 48) -> Tlv | None:
        value = self.fields.get(number)
        if value is None or type(value) is Tlv:
            return value
        raise TypeError(f"field {number} is not a TLV field")

    def evolve(
        self,
        mti: str | None = None,
        *,
        set_fields: Mapping[int, FieldValue] | None = None,
        drop: Iterable[int] = (),
    ) -> Message:
        """A new message: this one's fields, minus ``drop``, plus ``set_fields``."""
        fields = dict(self.fields)
        for number in drop:
            fields.pop(number, None)
        if set_fields:
            fields.update(set_fields)
        return Message(self.mti if mti is None else mti, fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.mti == other.mti and self.fields == other.fields

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        parts = []
        for number in sorted(self.fields):
            value = self.fields[number]
            shown = mask_value(value) if number in MASKED_FIELDS else repr(value)
            parts.append(f"{number}: {shown}")
        return f"Message(mti={self.mti!r}, fields={{{', '.join(parts)}}})"


@dataclass(frozen=True, slots=True, kw_only=True)
class OriginalData:
    """Field 90 (n 42): which original transaction a reversal names."""

    mti: str
    stan: str
    transmission: str
    acquirer: str
    forwarder: str = "0"

    def __post_init__(self) -> None:
        for name, value, size in (
            ("mti", self.mti, 4),
            ("stan", self.stan, 6),
            ("transmission", self.transmission, 10),
        ):
            if len(value) != size or not (value.isascii() and value.isdigit()):
                raise ValueError(f"field 90 {name} must be {size} digits")
        for name, value in (("acquirer", self.acquirer), ("forwarder", self.forwarder)):
            if not 1 <= len(value) <= 11 or not (value.isascii() and value.isdigit()):
                raise ValueError(f"field 90 {name} must be 1..11 digits")

    @classmethod
    def parse(cls, value: str) -> OriginalData:
        """Split a field 90 value; the institution ids lose their zero fill."""
        if len(value) != 42 or not (value.isascii() and value.isdigit()):
            raise ValueError("field 90 must be 42 digits")
        return cls(
            mti=value[0:4],
            stan=value[4:10],
            transmission=value[10:20],
            acquirer=value[20:31].lstrip("0") or "0",
            forwarder=value[31:42].lstrip("0") or "0",
        )

    def names_acquirer(self, field32: str) -> bool:
        """Whether this original was acquired by institution ``field32`` (zero fill ignored)."""
        return self.acquirer.zfill(11) == field32.zfill(11)

    def format(self) -> str:
        return (
            f"{self.mti}{self.stan}{self.transmission}"
            f"{self.acquirer.zfill(11)}{self.forwarder.zfill(11)}"
        )
