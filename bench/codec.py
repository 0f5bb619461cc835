"""Codec benchmark: our ISO 8583 codec against ``pyiso8583`` on the same messages.

For each dialect (bank, post) it builds a 0200 payment request and its 0210 response (with a
Chinese customer name in field 48 and a MAC in 64), and times decode + encode of both with our
codec (full validation, TLV parsing) and with pyiso8583 configured with an equivalent spec.
Rounds alternate between the two so that machine noise hits both alike. The figure that matters
is the ratio.

    python -m bench.codec [--duration 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import iso8583

from protocols.iso8583.codec import Codec, format_tlv
from protocols.iso8583.dialect import BANK, POST, Dialect
from protocols.iso8583.message import Message, Tlv

__all__ = ["main", "messages", "pyiso_doc", "pyiso_spec", "run"]

MAC = bytes.fromhex("a1b2c3d4e5f60718")


def pyiso_spec(dialect: Dialect) -> dict[str, dict[str, Any]]:
    """A pyiso8583 spec equivalent to ``dialect`` (fields it defines, same wire format)."""
    bcd_prefix = dialect.length_prefix_encoding == "bcd"
    bitmap: dict[str, Any] = (
        {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 8}
        if dialect.bitmap_encoding == "binary"
        else {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 16}
    )
    spec: dict[str, dict[str, Any]] = {
        "h": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 0},
        "t": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 4},
        "p": dict(bitmap, desc="Primary bitmap"),
        "1": dict(bitmap, desc="Secondary bitmap"),
    }
    for f in dialect.fields:
        len_type = {"fixed": 0, "llvar": 1 if bcd_prefix else 2, "lllvar": 2 if bcd_prefix else 3}[
            f.length_type
        ]
        entry: dict[str, Any] = {
            "len_enc": "bcd" if bcd_prefix else "ascii",
            "len_type": len_type,
            "max_len": f.max_length,
            "desc": f.description,
        }
        if f.kind == "b":
            entry["data_enc"] = "b"
        elif f.kind == "n" and dialect.numeric_encoding == "bcd":
            entry.update(data_enc="b", len_count="nibbles", left_pad="0")
        elif f.kind == "n":
            entry["data_enc"] = "ascii"
        else:
            entry["data_enc"] = dialect.text_encoding
        spec[str(f.number)] = entry
    return spec


def pyiso_doc(msg: Message, codec: Codec) -> dict[str, str]:
    """The same message as a pyiso8583 decoded document (b fields as hex, TLV as text)."""
    doc: dict[str, str] = {"t": msg.mti}
    for number, value in msg.fields.items():
        if isinstance(value, bytes):
            doc[str(number)] = value.hex().upper()
        elif isinstance(value, Tlv):
            encoding = codec.dialect.text_encoding
            doc[str(number)] = format_tlv(value, encoding).decode(encoding)
        else:
            doc[str(number)] = value
    return doc


def messages() -> list[Message]:
    """A 0200 bill payment and its approved 0210 (without MACs; the bench adds them)."""
    request = Message(
        "0200",
        {
            3: "500000",
            4: "000000012345",
            7: "1126101530",
            11: "000123",
            12: "101530",
            13: "1126",
            32: "10300001",
            37: "112610153001",
            41: "ATM00017",
            48: Tlv.of(("01", "0012345678")),
            49: "156",
        },
    )
    response = request.evolve(
        "0210",
        set_fields={
            15: "1126",
            38: "A00123",
            39: "00",
            48: Tlv.of(
                ("01", "0012345678"),
                ("02", "张**"),
                ("03", "000000012345"),
                ("06", "20241126000000004711"),
            ),
        },
    )
    return [request, response]


def _frames(codec: Codec) -> list[bytes]:
    return [codec.encode_with_mac(m, lambda _data: MAC) for m in messages()]


def _ours(codec: Codec, bodies: list[bytes]) -> Callable[[], None]:
    decode, encode = codec.decode, codec.encode

    def op() -> None:
        for body in bodies:
            encode(decode(body))

    return op


def _theirs(spec: dict[str, dict[str, Any]], bodies: list[bytes]) -> Callable[[], None]:
    decode, encode = iso8583.decode, iso8583.encode

    def op() -> None:
        for body in bodies:
            doc, _ = decode(body, spec)
            encode(doc, spec)

    return op


def _check_same(codec: Codec, spec: dict[str, dict[str, Any]], bodies: list[bytes]) -> None:
    for body in bodies:
        ours = codec.encode(codec.decode(body))
        theirs, _ = iso8583.encode(iso8583.decode(body, spec)[0], spec)
        if ours != body or bytes(theirs) != body:
            raise RuntimeError(f"{codec.dialect.name}: codecs disagree on the bench messages")


def run(duration_s: float = 2.0) -> dict[str, Any]:
    """Time both codecs for about ``duration_s`` seconds in total; ops = 1 message decode+encode."""
    results: dict[str, Any] = {"unit": "messages/s (decode + encode)", "dialects": {}}
    dialects = (BANK, POST)
    per_dialect = duration_s / len(dialects)
    for dialect in dialects:
        codec = Codec(dialect)
        spec = pyiso_spec(dialect)
        bodies = _frames(codec)
        _check_same(codec, spec, bodies)
        ops = {"gridpay": _ours(codec, bodies), "pyiso8583": _theirs(spec, bodies)}
        spent = {"gridpay": 0.0, "pyiso8583": 0.0}
        count = {"gridpay": 0, "pyiso8583": 0}
        for op in ops.values():  # warm up caches
            op()
        chunk = {"gridpay": 200, "pyiso8583": 20}
        deadline = time.perf_counter() + per_dialect
        while time.perf_counter() < deadline:
            for name, op in ops.items():
                n = chunk[name]
                t0 = time.perf_counter()
                for _ in range(n):
                    op()
                spent[name] += time.perf_counter() - t0
                count[name] += n * len(bodies)
        ours = count["gridpay"] / spent["gridpay"]
        theirs = count["pyiso8583"] / spent["pyiso8583"]
        results["dialects"][dialect.name] = {
            "gridpay_ops_s": round(ours),
            "pyiso8583_ops_s": round(theirs),
            "ratio": round(ours / theirs, 2),
            "messages": [len(b) for b in bodies],
        }
    results["min_ratio"] = min(d["ratio"] for d in results["dialects"].values())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds in total")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    res = run(args.duration)
    print(f"codec benchmark: {res['unit']}")
    print(f"{'dialect':<8} {'gridpay':>12} {'pyiso8583':>12} {'ratio':>7}")
    for name, d in res["dialects"].items():
        print(f"{name:<8} {d['gridpay_ops_s']:>12,} {d['pyiso8583_ops_s']:>12,} {d['ratio']:>6}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"scenario": "codec", **res}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
