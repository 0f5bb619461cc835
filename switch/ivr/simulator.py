"""An IVR-server simulator: walks dialogs over HTTP as the utility's IVR servers do.

For tests, the demo and the benchmark. It plays the caller and the IVR at once: it sends the
digits a caller would key in, and encrypts the PIN the caller would key in as an ISO 9564
format-4 PIN block under the IVR's PIN key (the dev test key: `load_dev_keys().ivr_pin_key`),
with the card serial as the PAN, exactly as a real IVR does. Every input carries an
`Idempotency-Key` (`<call_id>-<n>`), so that a retry after a lost answer is safe.

    async with IvrSimulator(base_url, api_key, load_dev_keys().ivr_pin_key) as ivr:
        result = await ivr.recharge("13800000000", "0123456789", serial, pin)
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from crypto.pinblock import Format4Codec

__all__ = ["IvrSimulator", "IvrSimulatorError", "RechargeResult", "spoken_digits"]

_ZH_DIGITS = {c: str(i) for i, c in enumerate("零一二三四五六七八九")}
_EN_DIGITS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))}


def spoken_digits(text: str, lang: str) -> str:
    """The digits read out digit by digit in a prompt's text (e.g. a transaction number)."""
    if lang == "zh":
        return "".join(_ZH_DIGITS[c] for c in text if c in _ZH_DIGITS)
    words = text.replace(".", " ").replace(",", " ").split()
    return "".join(_EN_DIGITS[w] for w in words if w in _EN_DIGITS)


class IvrSimulatorError(Exception):
    """The switch answered with an error (status and problem code; no input is echoed)."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"{status} {code}")
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True, kw_only=True)
class RechargeResult:
    """How a recharge dialog ended. `outcome` is `recharged`, or the id of the first prompt of
    the turn where the dialog left the expected path (e.g. `card_used`, `pin_wrong`)."""

    ok: bool
    outcome: str
    call_id: str
    receipt_no: str | None = None
    turns: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    @property
    def last(self) -> dict[str, Any]:
        return self.turns[-1]


class IvrSimulator:
    def __init__(self, base_url: str, api_key: str, pin_key: bytes, *,
                 session: aiohttp.ClientSession | None = None, timeout_s: float = 10.0,
                 dnis: str = "95598", retries: int = 3) -> None:
        self.base = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._codec = Format4Codec(pin_key)
        self._own_session = session is None
        self._session = session  # made on first use when not given
        self._timeout_s = timeout_s
        self.dnis = dnis
        self.retries = retries
        self._inputs = itertools.count(1)  # keys never repeat, within a call or across calls

    def __repr__(self) -> str:
        return f"IvrSimulator({self.base!r}, <key masked>)"

    async def __aenter__(self) -> IvrSimulator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()

    # -- one request ----------------------------------------------------------------------

    async def _request(self, method: str, path: str, body: dict[str, str] | None = None,
                       key: str | None = None) -> dict[str, Any]:
        headers = dict(self._auth)
        if key is not None:
            headers["Idempotency-Key"] = key
        data = orjson.dumps(body) if body is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(self.retries + 1):
            try:
                status, raw = await self._send(method, path, data, headers)
            except (aiohttp.ClientConnectionError, ConnectionError, TimeoutError):
                if attempt == self.retries or (key is None and method == "POST"):
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            if status in (409, 503) and attempt < self.retries and key is not None:
                code = orjson.loads(raw).get("code", "")
                if code in ("turn_in_progress", "standby", "unavailable"):
                    await asyncio.sleep(0.1 * (attempt + 1))
                    continue
            if status >= 400:
                code = "error"
                try:
                    code = str(orjson.loads(raw).get("code", "error"))
                except orjson.JSONDecodeError:
                    pass
                raise IvrSimulatorError(status, code)
            doc: dict[str, Any] = orjson.loads(raw)
            return doc
        raise IvrSimulatorError(0, "retries_exhausted")

    async def _send(self, method: str, path: str, data: bytes | None,
                    headers: dict[str, str]) -> tuple[int, bytes]:
        """One HTTP exchange: (status, body)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        async with self._session.request(method, self.base + path, data=data,
                                         headers=headers) as r:
            return r.status, await r.read()

    def _next_key(self, call_id: str) -> str:
        n = next(self._inputs)
        return f"{call_id}-{n}"  # the server takes a call id's characters, up to 100

    # -- the lower-level steps ------------------------------------------------------------

    async def start(self, ani: str, lang: str = "zh", call_id: str | None = None
                    ) -> dict[str, Any]:
        call_id = call_id or f"sim-{uuid.uuid4().hex}"
        return await self._request("POST", "/ivr/v1/calls",
                                   {"call_id": call_id, "ani": ani, "dnis": self.dnis,
                                    "lang": lang})

    async def send_digits(self, call_id: str, digits: str) -> dict[str, Any]:
        return await self._request("POST", f"/ivr/v1/calls/{call_id}/input",
                                   {"digits": digits}, key=self._next_key(call_id))

    def pin_block(self, serial: str, pin: str) -> str:
        """The format-4 PIN block the IVR would send for `pin` on card `serial`."""
        return self._codec.encipher(pin, serial).hex().upper()

    async def send_pin(self, call_id: str, serial: str, pin: str) -> dict[str, Any]:
        return await self._request("POST", f"/ivr/v1/calls/{call_id}/input",
                                   {"pin_block": self.pin_block(serial, pin)},
                                   key=self._next_key(call_id))

    async def send_timeout(self, call_id: str) -> dict[str, Any]:
        return await self._request("POST", f"/ivr/v1/calls/{call_id}/input",
                                   {"event": "timeout"}, key=self._next_key(call_id))

    async def hangup(self, call_id: str) -> dict[str, Any]:
        return await self._request("DELETE", f"/ivr/v1/calls/{call_id}")

    # -- a whole dialog -------------------------------------------------------------------

    async def recharge(self, ani: str, account_no: str, serial: str, pin: str,
                       lang: str = "zh", call_id: str | None = None) -> RechargeResult:
        """Call, choose recharge, enter and confirm the account, the card and its PIN,
        confirm the recharge, hear the result, say goodbye."""
        call_id = call_id or f"sim-{uuid.uuid4().hex}"
        turns: list[dict[str, Any]] = [await self.start(ani, lang, call_id)]

        def off_path(expected: str) -> RechargeResult | None:
            t = turns[-1]
            if t["step"] == expected and not t["hangup"]:
                return None
            first = t["prompts"][0]["id"] if t["prompts"] else t["step"]
            return RechargeResult(ok=False, outcome=first, call_id=call_id, turns=tuple(turns))

        async def give_up(result: RechargeResult) -> RechargeResult:
            if not result.last["hangup"]:
                turns.append(await self.hangup(call_id))
            return RechargeResult(ok=False, outcome=result.outcome, call_id=call_id,
                                  turns=tuple(turns))

        steps: list[tuple[str, Any]] = [
            ("menu", lambda: self.send_digits(call_id, "1")),
            ("enter_account", lambda: self.send_digits(call_id, account_no + "#")),
            ("confirm_account", lambda: self.send_digits(call_id, "1")),
            ("enter_card_serial", lambda: self.send_digits(call_id, serial + "#")),
            ("enter_pin", lambda: self.send_pin(call_id, serial, pin)),
            ("confirm_recharge", lambda: self.send_digits(call_id, "1")),
        ]
        for expected, act in steps:
            bad = off_path(expected)
            if bad is not None:
                return await give_up(bad)
            turns.append(await act())
        bad = off_path("result")
        if bad is not None:
            return await give_up(bad)
        receipt = None
        for p in turns[-1]["prompts"]:
            if p["id"] == "result_txn":
                receipt = spoken_digits(p["text"], lang)
        turns.append(await self.send_digits(call_id, "9"))
        return RechargeResult(ok=True, outcome="recharged", call_id=call_id,
                              receipt_no=receipt, turns=tuple(turns))
