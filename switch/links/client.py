"""A bank-side client of the links (for tests, the demo and the benchmark).

It plays a bank's or the post office's front-end processor: connects, signs on, sends requests
(pipelined: many outstanding on one connection), and matches each response to its request by
(MTI class, 11, 7, 32), in either dialect. MACs are computed with the institution's own key, as
a bank does on its side.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass
from datetime import datetime

from crypto.cmac import mac8
from protocols.iso8583 import (
    NEED_DATA,
    Codec,
    Framer,
    Message,
    OriginalData,
    Tlv,
    builtin_dialect,
)


class LinkClosed(Exception):
    """The switch closed the connection."""


@dataclass(frozen=True, slots=True)
class Sent:
    request: Message
    response: Message

    @property
    def code(self) -> str:
        return str(self.response.fields.get(39, ""))


class BankClient:
    def __init__(self, host: str, port: int, *, dialect: str, institution: str,
                 mac_key: bytes | None, terminal: str = "T0000001", timeout: float = 10.0,
                 stan_start: int = 1) -> None:
        self.host = host
        self.port = port
        self.codec = Codec(builtin_dialect(dialect))
        self.framer = Framer(self.codec.dialect)
        self.institution = institution
        self.mac_key = mac_key
        self.terminal = terminal
        self.timeout = timeout
        self._stan = itertools.count(stan_start)
        self._waiting: dict[tuple[str, str, str, str], asyncio.Future[Message]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self.unmatched: list[Message] = []
        self.bad_macs: list[Message] = []  # responses whose MAC did not verify
        self._closed = False

    def __repr__(self) -> str:
        return f"BankClient({self.institution}@{self.host}:{self.port})"

    # -- connection ----------------------------------------------------------------------

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.timeout)
        self._task = asyncio.create_task(self._read_loop())

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, LinkClosed):
                await self._task

    async def __aenter__(self) -> BankClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                self.framer.receive_data(data)
                while (frame := self.framer.next_frame()) is not NEED_DATA:
                    msg, covered = self.codec.decode_with_mac_input(frame)
                    if (self.mac_key is not None and msg.mti in ("0210", "0430", "0510")
                            and msg.fields.get(39) not in ("63", "96")):
                        mac = msg.fields.get(128 if 128 in msg.fields else 64)
                        if covered is None or mac != mac8(self.mac_key, covered):
                            self.bad_macs.append(msg)
                    fut = self._waiting.pop(self._match_key(msg), None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                    else:
                        self.unmatched.append(msg)
        finally:
            self._closed = True
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(LinkClosed("connection closed by the switch"))
            self._waiting.clear()

    @staticmethod
    def _match_key(msg: Message) -> tuple[str, str, str, str]:
        f = msg.fields
        return (msg.mti[1], str(f.get(11, "")), str(f.get(7, "")), str(f.get(32, "")))

    # -- sending -------------------------------------------------------------------------

    def next_stan(self) -> str:
        return f"{next(self._stan) % 1_000_000:06d}"

    def encode(self, msg: Message) -> bytes:
        if self.mac_key is not None and msg.mti not in ("0800", "0810"):
            body = self.codec.encode_with_mac(msg, lambda data: mac8(self.mac_key or b"", data))
        else:
            body = self.codec.encode(msg)
        return self.codec.frame(body)

    async def send_raw(self, frame: bytes) -> None:
        assert self._writer is not None
        self._writer.write(frame)
        await self._writer.drain()

    async def request(self, msg: Message, *, frame: bytes | None = None) -> Message:
        """Send one request and wait for its response."""
        if self._closed:
            raise LinkClosed("connection closed by the switch")
        key = self._match_key(msg)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        await self.send_raw(frame if frame is not None else self.encode(msg))
        try:
            return await asyncio.wait_for(fut, self.timeout)
        finally:
            self._waiting.pop(key, None)

    # -- builders ------------------------------------------------------------------------

    def _base(self, now: datetime | None = None) -> dict[int, object]:
        now = now or datetime.now()
        return {7: now.strftime("%m%d%H%M%S"), 11: self.next_stan(), 32: self.institution}

    def network(self, code: str) -> Message:
        f = self._base()
        f[70] = code
        return Message("0800", f)  # type: ignore[arg-type]

    def _financial(self, mti: str, pcode: str, account: str, amount: int | None,
                   rrn: str | None = None) -> Message:
        now = datetime.now()
        f = self._base(now)
        f[3] = pcode
        if amount is not None:
            f[4] = f"{amount:012d}"
        f[12] = now.strftime("%H%M%S")
        f[13] = now.strftime("%m%d")
        f[37] = rrn or f"{now:%m%d}{f[11]}00"[:12].ljust(12, "0")
        f[41] = self.terminal
        f[48] = Tlv.of(("01", account))
        f[49] = "156"
        return Message(mti, f)  # type: ignore[arg-type]

    def inquiry(self, account: str) -> Message:
        return self._financial("0200", "310000", account, None)

    def payment(self, account: str, amount: int) -> Message:
        return self._financial("0200", "500000", account, amount)

    def reversal(self, original: Message, *, repeat: bool = False) -> Message:
        of = original.fields
        acct = of[48].get("01") if isinstance(of[48], Tlv) else ""
        msg = self._financial("0421" if repeat else "0420", "500000", str(acct),
                              int(str(of[4])))
        msg.fields[90] = OriginalData(mti=original.mti, stan=str(of[11]),
                                      transmission=str(of[7]),
                                      acquirer=self.institution).format()
        return msg

    def reconciliation(self, settlement_mmdd: str, payments: int, reversals: int,
                       paid: int, reversed_amount: int) -> Message:
        f = self._base()
        f.update({15: settlement_mmdd, 74: f"{payments:010d}", 75: f"{reversals:010d}",
                  86: f"{paid:016d}", 87: f"{reversed_amount:016d}"})
        return Message("0500", f)  # type: ignore[arg-type]

    async def sign_on(self) -> Message:
        return await self.request(self.network("001"))

    async def sign_off(self) -> Message:
        return await self.request(self.network("002"))

    async def echo(self) -> Message:
        return await self.request(self.network("301"))
