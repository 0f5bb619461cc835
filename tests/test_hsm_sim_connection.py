"""The simulator's connection handling over real sockets: frames split anywhere or packed
together get the same answers in the same order, timeouts close only the connection they are
about, a peer that does not read is waited for, and closing the server closes its connections.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import AsyncIterator

import pytest

from crypto.cmac import mac8
from hsm_sim.server import HsmServer, start_server
from hsm_sim.wire import data_field
from hsm_sim.wire import encode_frame as frame
from hsm_sim.wire import key_block_field as KB
from tests.nodekit import HSM_SETTINGS
from tests.test_hsm_sim import MAC_C, MAC_KEY, Raw


def mixed_requests(n: int) -> list[tuple[bytes, bytes]]:
    """(header, message) pairs: answers of every kind, errors included."""
    out = []
    for i in range(n):
        header = f"{i:04d}".encode()
        data = f"payload {i}".encode() * (i % 7)
        kind = i % 6
        if kind == 0:
            body = b"B2" + data_field(data)
        elif kind == 1:
            body = b"M6" + KB(MAC_C) + data_field(data)
        elif kind == 2:
            body = b"M8" + KB(MAC_C) + data_field(data) + mac8(MAC_KEY, data).hex().encode()
        elif kind == 3:
            body = b"M8" + KB(MAC_C) + data_field(data) + b"00" * 8  # 01
        elif kind == 4:
            body = b"ZZ"  # 68
        else:
            body = b"M6" + KB(MAC_C)[:-3]  # 80
        out.append((header, header + body))
    return out


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    length = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 10), "big")
    return await asyncio.wait_for(reader.readexactly(length), 10)


async def answers_to(port: int, stream: bytes, count: int, chunks: list[int]) -> list[bytes]:
    """Send `stream` cut into pieces of the given sizes (with pauses), read `count` answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        pos = 0
        for size in chunks:
            writer.write(stream[pos:pos + size])
            await writer.drain()
            await asyncio.sleep(0)
            pos += size
        writer.write(stream[pos:])
        return [await read_answer(reader) for _ in range(count)]
    finally:
        writer.close()
        await writer.wait_closed()


async def test_frames_split_anywhere_get_the_same_answers_in_order(hsm_server: HsmServer
                                                                   ) -> None:
    requests = mixed_requests(120)
    stream = b"".join(frame(m) for _, m in requests)
    whole = await answers_to(hsm_server.port, stream, len(requests), [])
    assert [a[:4] for a in whole] == [h for h, _ in requests]
    assert [a[6:8] for a in whole[:6]] == [b"00", b"00", b"00", b"01", b"68", b"80"]
    rng = random.Random(3)
    # byte by byte, then in random pieces (every answer of these commands is deterministic)
    for pieces in ([1] * len(stream), [rng.randint(1, 300) for _ in range(200)]):
        assert await answers_to(hsm_server.port, stream, len(requests), pieces) == whole


async def test_answers_before_an_invalid_length_are_sent_then_the_connection_closes(
        hsm_server: HsmServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", hsm_server.port)
    try:
        good = [frame(b"000" + str(i).encode() + b"B2" + data_field(b"x")) for i in range(3)]
        writer.write(b"".join(good) + b"\x00\x05ABCDE" + frame(b"9999NC"))
        for i in range(3):
            assert (await read_answer(reader))[:8] == b"000" + str(i).encode() + b"B300"
        assert await asyncio.wait_for(reader.read(100), 5) == b""  # closed, NC not answered
    finally:
        writer.close()
    raw = await Raw.open(hsm_server.port)  # the server itself goes on
    assert await raw.code("NC") == "00"
    await raw.close()


@pytest.fixture
async def quick_timeouts() -> AsyncIterator[HsmServer]:
    settings = dataclasses.replace(HSM_SETTINGS, idle_timeout_s=0.4, read_timeout_s=0.4)
    async with await start_server(settings) as srv:
        yield srv


async def closed_after(reader: asyncio.StreamReader) -> float:
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(100), 10) == b""
    return time.monotonic() - started


async def test_idle_and_unfinished_frames_time_out(quick_timeouts: HsmServer) -> None:
    port = quick_timeouts.port
    # silent from the start; one byte of a length; a length and half a message
    for opening in (b"", b"\x00", b"\x00\x0a0001"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(opening)
        assert 0.2 < await closed_after(reader) < 5
        writer.close()
    # a connection in use stays open well past the timeouts, answering every frame
    raw = await Raw.open(port)
    for _ in range(12):
        assert await raw.code("NC") == "00"
        await asyncio.sleep(0.1)
    # a frame finished in pieces, each within the read timeout, is answered
    message = b"0042B2" + data_field(b"slow")
    raw.writer.write(len(message).to_bytes(2, "big"))
    for byte in message:
        await asyncio.sleep(0.02)
        raw.writer.write(bytes([byte]))
    assert (await raw.read())[:8] == b"0042B300"
    # and then, left idle, it is closed too
    assert 0.2 < await closed_after(raw.reader) < 5
    await raw.close()


async def test_one_byte_of_a_length_is_a_frame_begun_and_times_out_as_one() -> None:
    """The read timeout runs from a frame's first byte, not from its length's second: a peer
    that sends one byte and stops is closed at the read timeout, not at the idle one."""
    settings = dataclasses.replace(HSM_SETTINGS, idle_timeout_s=30.0, read_timeout_s=0.3)
    async with await start_server(settings) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"\x00")
        assert await closed_after(reader) < 3
        writer.close()
        raw = await Raw.open(srv.port)  # the same after a frame answered on the connection
        assert await raw.code("NC") == "00"
        raw.writer.write(b"\x00")
        assert await closed_after(raw.reader) < 3
        await raw.close()


async def test_a_peer_that_does_not_read_is_waited_for(hsm_server: HsmServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", hsm_server.port)
    try:
        payload = bytes(range(256)) * 16  # 4 KiB echoed per request: megabytes in total
        n = 2000
        for i in range(n):
            writer.write(frame(f"{i % 10000:04d}".encode() + b"B2" + data_field(payload)))
        await asyncio.sleep(0.5)  # the server fills its buffers and stops reading
        for i in range(n):
            answer = await read_answer(reader)
            assert answer[:8] == f"{i % 10000:04d}".encode() + b"B300"
            assert answer[8:] == payload
        writer.write(frame(b"LASTNC"))
        assert (await read_answer(reader))[:8] == b"LASTND00"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_closing_the_server_closes_its_connections() -> None:
    srv = await start_server(HSM_SETTINGS)
    conns = [await Raw.open(srv.port) for _ in range(5)]
    for conn in conns:
        assert await conn.code("NC") == "00"
    conns[0].writer.write(b"\x00\x10AB")  # one in the middle of a frame
    await asyncio.sleep(0.05)
    srv.close()
    await asyncio.wait_for(srv.wait_closed(), 10)
    for conn in conns:
        assert await asyncio.wait_for(conn.reader.read(100), 5) == b""
        conn.writer.close()
    with pytest.raises(OSError):
        await Raw.open(srv.port)


async def test_closing_the_server_drops_a_peer_that_does_not_read() -> None:
    srv = await start_server(HSM_SETTINGS)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    payload = b"e" * 4000
    for i in range(3000):  # ~12 MB of echoes that are never read
        writer.write(frame(f"{i % 10000:04d}".encode() + b"B2" + data_field(payload)))
    await asyncio.sleep(0.3)
    srv.close()
    started = time.perf_counter()
    await asyncio.wait_for(srv.wait_closed(), 10)
    assert time.perf_counter() - started < 3  # not the 5 s give-up of a graceful close
    assert srv._connections == set()
    writer.close()
