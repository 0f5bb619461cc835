"""ISO 8583 for the bank and post-office links: dialects as data, a sans-I/O codec and framer.

Nothing here does I/O; see docs/iso8583-codec.md.
"""

from .codec import Codec, MacFunction, format_tlv, parse_tlv
from .dialect import (
    BANK,
    POST,
    Dialect,
    FieldSpec,
    builtin_dialect,
    dialect_from_table,
    load_dialect,
)
from .errors import (
    DecodeError,
    DialectError,
    EncodeError,
    FramingError,
    Iso8583Error,
    ValidationError,
)
from .framer import NEED_DATA, Framer, NeedData
from .message import MASKED_FIELDS, FieldValue, Message, OriginalData, Tlv
from .rules import MessageRule, message_kind, required_fields, validate_required

__all__ = [
    "BANK",
    "MASKED_FIELDS",
    "NEED_DATA",
    "POST",
    "Codec",
    "DecodeError",
    "Dialect",
    "DialectError",
    "EncodeError",
    "FieldSpec",
    "FieldValue",
    "Framer",
    "FramingError",
    "Iso8583Error",
    "MacFunction",
    "Message",
    "MessageRule",
    "NeedData",
    "OriginalData",
    "Tlv",
    "ValidationError",
    "builtin_dialect",
    "dialect_from_table",
    "format_tlv",
    "load_dialect",
    "message_kind",
    "parse_tlv",
    "required_fields",
    "validate_required",
]
