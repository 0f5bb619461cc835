"""Cross-check against pyiso8583 with an equivalent spec: same bytes both ways."""

from __future__ import annotations

from typing import Any

import iso8583
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.codec import messages as bench_messages
from bench.codec import pyiso_doc, pyiso_spec
from protocols.iso8583 import BANK, POST, Codec, Dialect, EncodeError, Message, Tlv

ascii_printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
chinese = st.sampled_from("张王李赵电费缴纳 ab1")


def _field(dialect: Dialect, number: int) -> st.SearchStrategy[Any]:
    spec = dialect.by_number[number]
    size = spec.max_length
    fixed = spec.length_type == "fixed"
    if spec.structure == "tlv":
        item = st.tuples(
            st.text("0123456789", min_size=2, max_size=2), st.text(chinese, max_size=30)
        )
        return st.lists(item, max_size=5, unique_by=lambda t: t[0]).map(lambda x: Tlv(tuple(x)))
    if spec.kind == "n":
        return st.text("0123456789", min_size=size if fixed else 1, max_size=size)
    if spec.kind == "b":
        return st.binary(min_size=size if fixed else 0, max_size=size)
    return st.text(ascii_printable, min_size=size if fixed else 0, max_size=size)


@st.composite
def _messages(draw: st.DrawFn, dialect: Dialect) -> Message:
    numbers = draw(st.sets(st.sampled_from([s.number for s in dialect.fields]), max_size=14))
    if any(n > 64 for n in numbers):
        numbers.discard(64)
    return Message("0200", {n: draw(_field(dialect, n)) for n in sorted(numbers)})


def _same_fields(ours: Message, doc: dict[str, Any], codec: Codec) -> None:
    expected = pyiso_doc(ours, codec)
    for key, value in expected.items():
        assert doc[key] == value, key


@pytest.mark.parametrize("dialect", [POST, BANK], ids=["post", "bank"])
def test_both_codecs_write_and_read_the_same_bytes(dialect: Dialect) -> None:
    codec = Codec(dialect)
    spec = pyiso_spec(dialect)

    @settings(max_examples=250, deadline=None)
    @given(_messages(dialect))
    def check(msg: Message) -> None:
        try:
            ours = codec.encode(msg)
        except EncodeError as exc:  # only an oversized whole TLV (field 48) is refused
            assert exc.field == 48, exc
            return
        # ours -> pyiso8583
        doc, _ = iso8583.decode(ours, spec)
        _same_fields(msg, doc, codec)
        # pyiso8583 -> ours
        theirs, _ = iso8583.encode(pyiso_doc(msg, codec), spec)
        assert bytes(theirs) == ours
        assert codec.decode(bytes(theirs)) == msg

    check()


@pytest.mark.parametrize("dialect", [POST, BANK], ids=["post", "bank"])
def test_bench_messages_agree(dialect: Dialect) -> None:
    codec = Codec(dialect)
    spec = pyiso_spec(dialect)
    for msg in bench_messages():
        body = codec.encode_with_mac(msg, lambda d: d[:8])
        doc, _ = iso8583.decode(body, spec)
        assert bytes(iso8583.encode(doc, spec)[0]) == body
        assert doc["48"] == pyiso_doc(codec.decode(body), codec)["48"]
