"""Built-in dialect tables, embedded as data so that an installed wheel works without
the repository's ``config/dialects/*.toml`` files.

These dicts are exactly what :func:`tomllib.load` returns for ``config/dialects/bank.toml`` and
``config/dialects/post.toml``; ``tests/test_iso8583_codec.py`` keeps them identical. Edit the
TOML file and this table together.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BANK_TABLE", "EMBEDDED_TABLES", "FIELDS", "POST_TABLE"]

#: The field table both built-in dialects share (they differ only in their encodings).
FIELDS: dict[str, Any] = {
    "2": {
        "kind": "n",
        "length": "llvar",
        "max": 19,
        "description": "Primary account number",
        "sensitive": True,
    },
    "3": {
        "kind": "n",
        "length": "fixed",
        "max": 6,
        "description": "Processing code",
        "sensitive": False,
    },
    "4": {
        "kind": "n",
        "length": "fixed",
        "max": 12,
        "description": "Amount, transaction (fen)",
        "sensitive": False,
    },
    "7": {
        "kind": "n",
        "length": "fixed",
        "max": 10,
        "description": "Transmission date and time MMDDhhmmss",
        "sensitive": False,
    },
    "11": {
        "kind": "n",
        "length": "fixed",
        "max": 6,
        "description": "System trace audit number",
        "sensitive": False,
    },
    "12": {
        "kind": "n",
        "length": "fixed",
        "max": 6,
        "description": "Local time hhmmss",
        "sensitive": False,
    },
    "13": {
        "kind": "n",
        "length": "fixed",
        "max": 4,
        "description": "Local date MMDD",
        "sensitive": False,
    },
    "15": {
        "kind": "n",
        "length": "fixed",
        "max": 4,
        "description": "Settlement date MMDD",
        "sensitive": False,
    },
    "32": {
        "kind": "n",
        "length": "llvar",
        "max": 11,
        "description": "Acquiring institution id",
        "sensitive": False,
    },
    "35": {
        "kind": "ans",
        "length": "llvar",
        "max": 37,
        "description": "Track 2 data",
        "sensitive": True,
    },
    "36": {
        "kind": "ans",
        "length": "lllvar",
        "max": 104,
        "description": "Track 3 data",
        "sensitive": True,
    },
    "37": {
        "kind": "an",
        "length": "fixed",
        "max": 12,
        "description": "Retrieval reference number",
        "sensitive": False,
    },
    "38": {
        "kind": "an",
        "length": "fixed",
        "max": 6,
        "description": "Approval code",
        "sensitive": False,
    },
    "39": {
        "kind": "an",
        "length": "fixed",
        "max": 2,
        "description": "Response code",
        "sensitive": False,
    },
    "41": {
        "kind": "ans",
        "length": "fixed",
        "max": 8,
        "description": "Terminal id",
        "sensitive": False,
    },
    "45": {
        "kind": "ans",
        "length": "llvar",
        "max": 76,
        "description": "Track 1 data",
        "sensitive": True,
    },
    "48": {
        "kind": "ans",
        "length": "lllvar",
        "max": 999,
        "description": "Additional data (TLV)",
        "sensitive": False,
        "structure": "tlv",
    },
    "49": {
        "kind": "n",
        "length": "fixed",
        "max": 3,
        "description": "Currency code",
        "sensitive": False,
    },
    "52": {
        "kind": "b",
        "length": "fixed",
        "max": 8,
        "description": "PIN block",
        "sensitive": True,
    },
    "55": {
        "kind": "b",
        "length": "lllvar",
        "max": 255,
        "description": "ICC data",
        "sensitive": True,
    },
    "64": {
        "kind": "b",
        "length": "fixed",
        "max": 8,
        "description": "MAC (no secondary bitmap)",
        "sensitive": True,
    },
    "70": {
        "kind": "n",
        "length": "fixed",
        "max": 3,
        "description": "Network management code",
        "sensitive": False,
    },
    "74": {
        "kind": "n",
        "length": "fixed",
        "max": 10,
        "description": "Count of payments",
        "sensitive": False,
    },
    "75": {
        "kind": "n",
        "length": "fixed",
        "max": 10,
        "description": "Count of reversals",
        "sensitive": False,
    },
    "86": {
        "kind": "n",
        "length": "fixed",
        "max": 16,
        "description": "Amount of payments (fen)",
        "sensitive": False,
    },
    "87": {
        "kind": "n",
        "length": "fixed",
        "max": 16,
        "description": "Amount of reversals (fen)",
        "sensitive": False,
    },
    "90": {
        "kind": "n",
        "length": "fixed",
        "max": 42,
        "description": "Original data elements",
        "sensitive": False,
    },
    "128": {
        "kind": "b",
        "length": "fixed",
        "max": 8,
        "description": "MAC (secondary bitmap present)",
        "sensitive": True,
    },
}

BANK_TABLE: dict[str, Any] = {
    "name": "bank",
    "description": "Bank front-end link (ISO 8583:1987 style, binary/BCD)",
    "length_header": "binary2",
    "max_frame": 4096,
    "mti_encoding": "ascii",
    "bitmap_encoding": "binary",
    "numeric_encoding": "bcd",
    "length_prefix_encoding": "bcd",
    "text_encoding": "gbk",
    "fields": FIELDS,
}

POST_TABLE: dict[str, Any] = {
    "name": "post",
    "description": "Post-office front-end link (ISO 8583:1987 style, ASCII)",
    "length_header": "ascii4",
    "max_frame": 4096,
    "mti_encoding": "ascii",
    "bitmap_encoding": "ascii_hex",
    "numeric_encoding": "ascii",
    "length_prefix_encoding": "ascii",
    "text_encoding": "utf-8",
    "fields": FIELDS,
}

EMBEDDED_TABLES: dict[str, dict[str, Any]] = {"bank": BANK_TABLE, "post": POST_TABLE}
