"""The HSM client against an HSM that misbehaves as networks and boxes can: the real
simulator behind a proxy of the test's own, per connection. What must hold: no answer ever
reaches a request it is not for, and a connection that went wrong is replaced, so the client
recovers when the HSM behaves again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from crypto.cmac import mac8
from hsm_sim.server import HsmServer
from switch.hsm_client import HsmClient, HsmError, HsmTimeout, HsmUnavailable

Frames = Callable[["Link", bytes], bytes]  # what the proxy passes on of one answer frame


class Link:
    """One client connection through the proxy, and its own connection to the simulator."""

    def __init__(self, n: int) -> None:
        self.n = n  # 1 for the first connection the client opened
        self.held: bytes | None = None  # an answer kept back
        self.held_header = b""
        self.late: bytes | None = None  # the kept answer, to go ahead of the next answer
        self.requests = 0


class Proxy:
    def __init__(self, upstream: int, answers: Frames,
                 requests: Callable[[Link, bytes], bytes] | None = None) -> None:
        self.upstream = upstream
        self.answers = answers
        self.requests = requests
        self.links = 0
        self.open_links = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    link: Link, each: Callable[[Link, bytes], bytes] | None) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, OSError):
            while True:
                head = await reader.readexactly(2)
                frame = head + await reader.readexactly(int.from_bytes(head, "big"))
                out = each(link, frame) if each else frame
                if out:
                    writer.write(out)
                    await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.links += 1
        self.open_links += 1
        link = Link(self.links)
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        done = [asyncio.ensure_future(self._pipe(reader, up_w, link, self.requests)),
                asyncio.ensure_future(self._pipe(up_r, writer, link, self.answers))]
        await asyncio.wait(done, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.cancel()
        writer.close()
        up_w.close()
        self.open_links -= 1

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@contextlib.asynccontextmanager
async def client_via(proxy: Proxy) -> AsyncIterator[HsmClient]:
    async with proxy as port, HsmClient("127.0.0.1", port, pool_size=1, timeout=0.3) as c:
        yield c


async def _echoes(client: HsmClient, n: int, tag: str) -> list[bytes | BaseException]:
    """n echoes at once; each one's answer (its own data, if all is well) or error."""
    return await asyncio.gather(*(client.echo(f"{tag}{i}".encode()) for i in range(n)),
                                return_exceptions=True)


async def test_a_late_answer_never_reaches_a_newer_request(hsm_server: HsmServer) -> None:
    # The first echo's answer is kept back (its request times out). When a later request on
    # that connection carries the same header (the 4-hex-digit headers come round after
    # 65 536 requests), the proxy sends the kept answer first, as a late HSM would.
    def requests(link: Link, frame: bytes) -> bytes:
        link.requests += 1
        if link.held is not None and link.requests > 1 and frame[2:6] == link.held_header:
            link.late, link.held = link.held, None
        return frame

    def answers(link: Link, frame: bytes) -> bytes:
        if link.n == 1 and link.requests == 1 and link.held is None:
            link.held, link.held_header = frame, frame[2:6]
            return b""
        late, link.late = link.late, None
        return (late or b"") + frame

    async with client_via(Proxy(hsm_server.port, answers, requests)) as client:
        with pytest.raises(HsmTimeout):
            await client.echo(b"kept back")
        wrong = []
        for round_ in range(70):  # a little over 65 536 requests
            got = await _echoes(client, 1000, f"r{round_}-")
            wrong += [g for i, g in enumerate(got)
                      if isinstance(g, bytes) and g != f"r{round_}-{i}".encode()]
        assert wrong == [], f"{len(wrong)} answers reached another request: {wrong[:3]}"


async def test_stray_bytes_in_the_answers_cost_one_connection_not_the_client(
        hsm_server: HsmServer) -> None:
    # two bytes from nowhere read as a length of 65 535: the answers after them were swallowed
    # into one frame, and the connection stayed in use, failing request after request
    def answers(link: Link, frame: bytes) -> bytes:
        if link.n == 1 and not link.held:
            link.held = b"done"
            return b"\xff\xff" + frame
        return frame

    async with client_via(Proxy(hsm_server.port, answers)) as client:
        first = await _echoes(client, 50, "a")
        assert any(isinstance(g, (HsmTimeout, HsmUnavailable, HsmError)) for g in first)
        for attempt in range(20):  # recovered within a few timeouts
            await asyncio.sleep(0.1)
            got = await _echoes(client, 50, "b")
            if all(g == f"b{i}".encode() for i, g in enumerate(got)):
                break
        else:
            raise AssertionError("the client did not recover from two stray bytes")
        assert attempt < 10


async def test_a_connection_that_stops_answering_is_replaced(hsm_server: HsmServer) -> None:
    def answers(link: Link, frame: bytes) -> bytes:
        return b"" if link.n == 1 else frame  # the first connection: a black hole

    proxy = Proxy(hsm_server.port, answers)
    async with client_via(proxy) as client:
        with pytest.raises(HsmTimeout):
            await client.echo(b"lost")
        got = await _echoes(client, 50, "c")
        assert got == [f"c{i}".encode() for i in range(50)], got[:3]
    # the drained connection closed once empty, and closing the client closed the rest
    for _ in range(50):
        if proxy.open_links == 0:
            break
        await asyncio.sleep(0.02)
    assert proxy.open_links == 0


async def test_an_answer_with_a_header_never_sent_closes_the_connection(
        hsm_server: HsmServer) -> None:
    def answers(link: Link, frame: bytes) -> bytes:
        if link.n == 1 and not link.held:
            link.held = b"done"
            return frame[:2] + b"ZZZZ" + frame[6:]  # a header no request has
        return frame

    async with client_via(Proxy(hsm_server.port, answers)) as client:
        with pytest.raises(HsmUnavailable):
            await client.echo(b"x")
        assert await client.echo(b"y") == b"y"  # on a new connection


async def test_a_request_sent_while_the_hsm_is_not_reading_still_ends_at_its_deadline(
        ) -> None:
    # a frozen HSM keeps its TCP connection up and stops reading: requests queued behind a
    # full send buffer waited for it to read again, past their own timeout, for ever
    held: list[asyncio.StreamWriter] = []

    async def frozen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never reads
        await asyncio.sleep(30)

    server = await asyncio.start_server(frozen, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with HsmClient("127.0.0.1", port, pool_size=1, timeout=0.5) as client:
            big = [asyncio.ensure_future(client.echo(b"x" * 60_000)) for _ in range(400)]
            await asyncio.sleep(0.1)
            small = [asyncio.ensure_future(client.echo(b"small")) for _ in range(5)]
            done, waiting = await asyncio.wait(big + small, timeout=3.0)
            assert not waiting, f"{len(waiting)} requests still waiting after their timeout"
            assert all(isinstance(t.exception(), (HsmTimeout, HsmUnavailable)) for t in done)
    finally:
        for w in held:
            w.close()
        server.close()


async def test_a_verification_answer_with_bytes_after_its_code_is_trusted_for_neither(
        hsm_server: HsmServer) -> None:
    """`M9` and `ZW` carry nothing after their code: an answer that does (here a forged
    "match" with two bytes more) is malformed, never taken as a match. Both are read by the
    client's one `_verdict`; the `M9` of a MAC verification stands for the two here."""
    from tests.test_hsm_sim import MAC_C, MAC_KEY

    def answers(link: Link, frame: bytes) -> bytes:
        body = frame[2:]
        if body[4:6] == b"M9":
            body = body[:6] + b"00XX"
        return len(body).to_bytes(2, "big") + body

    data = b"0200" + bytes(40)
    async with client_via(Proxy(hsm_server.port, answers)) as client:
        with pytest.raises(HsmError, match="malformed"):
            await client.verify_mac(MAC_C, data, bytes(8))
    async with client_via(Proxy(hsm_server.port, lambda link, frame: frame)) as client:
        assert await client.verify_mac(MAC_C, data, mac8(MAC_KEY, data))
        assert not await client.verify_mac(MAC_C, data, bytes(8))
