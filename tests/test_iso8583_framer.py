"""Sans-I/O framer: partial reads, many frames per read, keep-alives, bad headers."""

from __future__ import annotations

import pytest

from protocols.iso8583 import BANK, NEED_DATA, POST, Codec, Framer, FramingError, Message

SIGN_ON = Message("0800", {7: "1126101530", 11: "000123", 32: "10300001", 70: "001"})


@pytest.mark.parametrize("dialect", [BANK, POST], ids=["bank", "post"])
def test_byte_by_byte_and_many_frames_in_one_read(dialect: object) -> None:
    assert dialect is BANK or dialect is POST
    codec = Codec(dialect)
    bodies = [codec.encode(SIGN_ON.evolve(set_fields={11: f"{i:06d}"})) for i in range(50)]
    stream = b"".join(codec.frame(b) for b in bodies)
    framer = Framer(dialect)
    got: list[bytes] = []
    for i in range(len(stream)):
        framer.receive_data(stream[i : i + 1])
        got.extend(framer)
    assert got == bodies
    assert framer.buffered == 0 and framer.frames == 50

    framer2 = Framer(dialect)
    framer2.receive_data(stream)
    assert list(framer2) == bodies
    assert framer2.next_frame() is NEED_DATA


def test_uneven_chunks_and_keepalives_are_counted() -> None:
    codec = Codec(POST)
    body = codec.encode(SIGN_ON)
    stream = b"0000" + codec.frame(body) + b"0000" + b"0000" + codec.frame(body) + b"00"
    framer = Framer(POST)
    out: list[bytes] = []
    for start in range(0, len(stream), 7):
        framer.receive_data(stream[start : start + 7])
        out.extend(framer)
    assert out == [body, body]
    assert framer.keepalives == 3
    assert framer.buffered == 2  # half a header waits for more
    framer.receive_data(b"00")
    assert framer.next_frame() is NEED_DATA and framer.keepalives == 4


def test_bank_keepalive_is_two_zero_bytes() -> None:
    framer = Framer(BANK)
    framer.receive_data(b"\x00\x00\x00\x03abc")
    assert framer.next_frame() == b"abc"
    assert framer.keepalives == 1


def test_oversize_frame_closes_with_a_hint() -> None:
    framer = Framer(BANK)
    framer.receive_data((4097).to_bytes(2, "big"))
    with pytest.raises(FramingError, match="4097"):
        framer.next_frame()
    with pytest.raises(FramingError):  # stays broken
        framer.receive_data(b"\x00\x01a")
    exact = Framer(BANK)
    exact.receive_data((4096).to_bytes(2, "big") + bytes(4096))
    assert exact.next_frame() == bytes(4096)


def test_ascii_header_on_the_bank_port_gets_a_hint() -> None:
    framer = Framer(BANK)
    framer.receive_data(b"0065")
    with pytest.raises(FramingError, match="ASCII"):
        framer.next_frame()


@pytest.mark.parametrize("header", [b"00x5", b"\x00\x23ab", b"-012", b" 12 ", b"GET "])
def test_bad_ascii_header(header: bytes) -> None:
    framer = Framer(POST)
    framer.receive_data(header + b"rest")
    with pytest.raises(FramingError, match="not 4 ASCII digits"):
        framer.next_frame()


def test_post_header_over_limit() -> None:
    framer = Framer(POST)
    framer.receive_data(b"5000")
    with pytest.raises(FramingError):
        framer.next_frame()
    small = Framer(POST, max_frame=100)
    small.receive_data(b"0101")
    with pytest.raises(FramingError):
        small.next_frame()


def test_buffer_is_capped() -> None:
    framer = Framer(POST, max_buffer=10_000)
    framer.receive_data(b"0010" + b"x" * 10 + b"0010")
    with pytest.raises(FramingError, match="buffered"):
        framer.receive_data(b"y" * 10_000)


def test_frame_adds_the_header() -> None:
    assert Framer(POST).frame(b"abc") == b"0003abc"
    assert Framer(BANK).frame(b"abc") == b"\x00\x03abc"
    with pytest.raises(FramingError):
        Framer(BANK).frame(bytes(5000))
    assert repr(NEED_DATA) == "NEED_DATA"
