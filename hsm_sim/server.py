"""The HSM simulator's TCP server: a thin asyncio shell around `hsm_sim.core.HsmCore`.

Per connection: cut 2-byte-length frames out of the bytes as they arrive, let the core answer
each message, write the answers; requests may be pipelined and are answered in order, each with
its own header. A length below 6 (no room for header and command) is the one thing that closes
a connection (after the answers to the frames before it). A connection that sends nothing for
`idle_timeout_s`, or leaves a frame unfinished for `read_timeout_s`, is closed.

The connection is an `asyncio.Protocol`, not a stream reader/writer pair: the core is
synchronous, so every complete frame in a chunk of received bytes is answered on the spot and
all of those answers leave in one `transport.write` (one system call for a pipelined batch).
While the peer does not read its answers (the transport's buffer is full), reading pauses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from crypto.errors import LmkError
from crypto.lmk import LmkComponent, combine_lmk
from hsm_sim.core import FIRMWARE, HsmCore
from hsm_sim.wire import MIN_MESSAGE

__all__ = [
    "DEV_CONFIG",
    "HsmServer",
    "HsmSettings",
    "load_dev_settings",
    "load_settings",
    "main",
    "start_server",
]

log = logging.getLogger("hsm_sim")

DEV_CONFIG = Path(__file__).resolve().parent.parent / "config" / "hsm-dev.toml"


@dataclass(frozen=True, slots=True, kw_only=True)
class HsmSettings:
    """Settings of one simulated HSM (frozen; validated when built)."""

    host: str = "127.0.0.1"
    port: int = 0
    lmk_components: tuple[LmkComponent, ...]
    authorised: bool = False
    dev_lmk: bool = False
    firmware: str = FIRMWARE
    idle_timeout_s: float = 300.0
    read_timeout_s: float = 10.0
    key_cache_size: int = 4096  # working keys held unwrapped (LRU)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be 0-65535")
        if len(self.lmk_components) < 2:
            raise ValueError("the LMK needs at least two components")
        if self.idle_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.key_cache_size < 1:
            raise ValueError("the key cache must hold at least one key")
        if not self.firmware.isascii() or not self.firmware.isprintable():
            raise ValueError("firmware must be printable ASCII")


def load_settings(path: Path | str) -> HsmSettings:
    """Read HSM settings from the `[hsm]` table of a TOML file."""
    with open(path, "rb") as fh:
        doc: dict[str, Any] = tomllib.load(fh)
    hsm = doc.get("hsm")
    if not isinstance(hsm, dict):
        raise ValueError(f"{path}: no [hsm] table")
    # every message names the setting, never its value: a component may be pasted anywhere
    found = hsm.get("lmk_components", [])
    if not isinstance(found, list):
        raise ValueError(f"{path}: lmk_components must be an array of tables")
    components = []
    for i, c in enumerate(found, start=1):
        if not (isinstance(c, dict) and isinstance(c.get("value"), str)
                and isinstance(c.get("kcv"), str)):
            raise ValueError(f"{path}: LMK component {i} needs 'value' and 'kcv' strings")
        try:
            components.append(LmkComponent(value_hex=c["value"], kcv_hex=c["kcv"]))
        except LmkError as e:
            raise ValueError(f"{path}: LMK component {i}: {e}") from None
    port, host = hsm.get("port", 0), hsm.get("host", "127.0.0.1")
    if isinstance(port, bool) or not isinstance(port, int):
        raise ValueError(f"{path}: port must be an integer from 0 to 65535")
    if not isinstance(host, str):
        raise ValueError(f"{path}: host must be a string")
    return HsmSettings(
        host=host,
        port=port,
        lmk_components=tuple(components),
        authorised=_flag(hsm, "authorised", path),
        dev_lmk=_flag(hsm, "dev_lmk", path),
    )


def _flag(hsm: dict[str, Any], name: str, path: Path | str) -> bool:
    """A true-or-false setting (false when absent). A switch of this weight is never guessed
    from "no", "0" or 1: any non-empty value used to read as true, and a mistyped setting
    authorised key export."""
    value = hsm.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"{path}: {name} must be true or false (TOML booleans, unquoted)")
    return value


def load_dev_settings(path: Path | str | None = None) -> HsmSettings:
    """The TEST-ONLY settings in `config/hsm-dev.toml` (public dev LMK components)."""
    return load_settings(DEV_CONFIG if path is None else path)


class _Connection(asyncio.Protocol):
    """One client connection: frames in, answers out, in order.

    Timeouts cost nothing per frame: `data_received` only notes the time, and one timer per
    connection wakes at the earliest moment a timeout could have passed, closing the connection
    if it has and sleeping again until the next such moment if not.
    """

    def __init__(self, server: HsmServer) -> None:
        loop = asyncio.get_running_loop()
        self._server = server
        self._handle = server._core.handle
        self._loop = loop
        self._idle_timeout = server.settings.idle_timeout_s
        self._read_timeout = server.settings.read_timeout_s
        self._transport: asyncio.Transport | None = None
        self._peer: object = None
        self._buf = bytearray()  # the start of a frame that has not fully arrived
        self._need = 2  # bytes the buffer must hold before a frame can be cut out of it
        self._closing = False
        self._paused = False  # the peer is not reading its answers
        self._idle_since = loop.time()  # when the wait for the next frame began
        self._frame_since: float | None = None  # when the unfinished frame's first byte came
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the timer will fire
        self.lost: asyncio.Future[None] = loop.create_future()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but behave as one
        self._transport = cast(asyncio.Transport, transport)
        self._peer = transport.get_extra_info("peername")
        self._server._connections.add(self)
        self._arm(self._idle_since + self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server._connections.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)
        log.debug("hsm connection closed", extra={"peer": str(self._peer)})

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        # the waits start again now: a pause is the peer's doing, not a slow frame
        self._idle_since = self._loop.time()
        if self._frame_since is not None:
            self._frame_since = self._idle_since
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return  # still inside the same unfinished frame
            data = bytes(buf)
            buf.clear()
        handle = self._handle
        answers: list[bytes] = []
        pos, n = 0, len(data)
        while n - pos >= 2:
            length = (data[pos] << 8) | data[pos + 1]
            if length < MIN_MESSAGE:
                self._write(answers)
                log.warning("hsm frame length invalid; closing", extra={"length": length})
                self.close()
                return
            end = pos + 2 + length
            if end > n:
                break
            answer = handle(data[pos + 2:end])
            answers.append(len(answer).to_bytes(2, "big"))
            answers.append(answer)
            pos = end
        now = self._loop.time()
        if answers:
            self._write(answers)
            self._idle_since = now
            self._frame_since = None
        if pos < n:
            buf += data[pos:]
            # its length is known (and valid: the loop checked it), or one byte of it is
            self._need = 2 + ((data[pos] << 8) | data[pos + 1]) if n - pos >= 2 else 2
            if self._frame_since is None:  # a frame has begun with its first byte
                self._frame_since = now
                if now + self._read_timeout < self._timer_at:
                    self._arm(now + self._read_timeout)
        else:
            self._need = 2

    # -- helpers ------------------------------------------------------------------------------

    def _write(self, answers: list[bytes]) -> None:
        if answers and self._transport is not None:
            self._transport.write(b"".join(answers))

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._check_timeouts)

    def _check_timeouts(self) -> None:
        self._timer = None
        if self._closing:
            return
        now = self._loop.time()
        if self._paused:  # waiting for the peer to read: no timeout runs (as with a drain)
            self._arm(now + self._idle_timeout)
            return
        if self._frame_since is not None:
            deadline = self._frame_since + self._read_timeout
        else:
            deadline = self._idle_since + self._idle_timeout
        if now >= deadline:
            log.debug("hsm connection timed out", extra={"peer": str(self._peer)})
            self.close()
        else:
            self._arm(deadline)

    def close(self) -> None:
        """Close after the answers already written have gone out."""
        self._closing = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def drop(self) -> None:
        """Close now: as `close`, but a peer that is not reading its answers is cut off (a
        graceful close would wait for it for ever)."""
        if self._transport is not None and self._transport.get_write_buffer_size() > 0:
            self._closing = True
            self._transport.abort()
        else:
            self.close()


class HsmServer:
    """A listening simulator. `close()` stops it; `await wait_closed()` waits until done."""

    def __init__(self, core: HsmCore, settings: HsmSettings) -> None:
        self._core = core
        self._settings = settings
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"HsmServer(port={self.port}, lmk_kcv={self.lmk_kcv!r})"

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return 0
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def lmk_kcv(self) -> str:
        return self._core.lmk_kcv

    @property
    def settings(self) -> HsmSettings:
        return self._settings

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self._settings.host, self._settings.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.drop()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self._connections:
            await asyncio.wait({c.lost for c in self._connections}, timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)

    async def __aenter__(self) -> HsmServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def start_server(settings: HsmSettings) -> HsmServer:
    """Combine the LMK (checking each component's KCV), then listen."""
    lmk = combine_lmk(settings.lmk_components)
    server = HsmServer(HsmCore(lmk, authorised=settings.authorised,
                               firmware=settings.firmware,
                               cache_size=settings.key_cache_size), settings)
    await server._start()
    log.info("hsm simulator listening",
             extra={"port": server.port, "lmk_kcv": server.lmk_kcv,
                    "authorised": settings.authorised})
    return server


async def _run(settings: HsmSettings) -> int:
    server = await start_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("READY " + json.dumps({"host": settings.host, "port": server.port,
                                 "lmk_kcv": server.lmk_kcv}), flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`gridpay hsm`: run the simulator until SIGINT/SIGTERM, then exit 0."""
    parser = argparse.ArgumentParser(prog="gridpay hsm", description="HSM simulator")
    parser.add_argument("--host", help="listen address (default from the config)")
    parser.add_argument("--port", type=int, help="listen port, 0 for any (default from config)")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML file with an [hsm] table (default: the dev config)")
    parser.add_argument("--authorised", action="store_true",
                        help="start in the authorised state (key import/export allowed)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    changes: dict[str, Any] = {}
    if args.host is not None:
        changes["host"] = args.host
    if args.port is not None:
        changes["port"] = args.port
    if args.authorised:
        changes["authorised"] = True
    try:
        settings = replace(load_dev_settings(args.config), **changes)
    except (OSError, ValueError) as e:  # TOMLDecodeError is a ValueError; no values shown
        print(f"gridpay hsm: configuration error: {e}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        from switch.logs import configure  # the masking formatter of the whole project

        configure("INFO")
    import uvloop

    try:
        return uvloop.run(_run(settings))
    except LmkError as e:  # a component's check value: which one, never its value
        print(f"gridpay hsm: configuration error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the port taken
        print(f"gridpay hsm: cannot start: {e}", file=sys.stderr)
        return 2
