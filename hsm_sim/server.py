"""The HSM simulator's TCP server: a thin asyncio shell around `hsm_sim.core.HsmCore`.

Per connection: read a 2-byte length, read the message, let the core answer it, write the
answer; requests may be pipelined and are answered in order, each with its own header. A
length below 6 (no room for header and command) is the one thing that closes a connection.
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
from typing import Any

from crypto.lmk import LmkComponent, combine_lmk
from hsm_sim.core import FIRMWARE, HsmCore
from hsm_sim.wire import MIN_MESSAGE, encode_frame

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

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be 0-65535")
        if len(self.lmk_components) < 2:
            raise ValueError("the LMK needs at least two components")
        if self.idle_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if not self.firmware.isascii() or not self.firmware.isprintable():
            raise ValueError("firmware must be printable ASCII")


def load_settings(path: Path | str) -> HsmSettings:
    """Read HSM settings from the `[hsm]` table of a TOML file."""
    with open(path, "rb") as fh:
        doc: dict[str, Any] = tomllib.load(fh)
    hsm = doc.get("hsm")
    if not isinstance(hsm, dict):
        raise ValueError(f"{path}: no [hsm] table")
    components = tuple(
        LmkComponent(value_hex=str(c["value"]), kcv_hex=str(c["kcv"]))
        for c in hsm.get("lmk_components", [])
    )
    return HsmSettings(
        host=str(hsm.get("host", "127.0.0.1")),
        port=int(hsm.get("port", 0)),
        lmk_components=components,
        authorised=bool(hsm.get("authorised", False)),
        dev_lmk=bool(hsm.get("dev_lmk", False)),
    )


def load_dev_settings(path: Path | str | None = None) -> HsmSettings:
    """The TEST-ONLY settings in `config/hsm-dev.toml` (public dev LMK components)."""
    return load_settings(DEV_CONFIG if path is None else path)


class HsmServer:
    """A listening simulator. `close()` stops it; `await wait_closed()` waits until done."""

    def __init__(self, core: HsmCore, settings: HsmSettings) -> None:
        self._core = core
        self._settings = settings
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
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
        self._server = await asyncio.start_server(
            self._connection, self._settings.host, self._settings.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._connections:
            task.cancel()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)

    async def __aenter__(self) -> HsmServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            log.debug("hsm connection closed", extra={"peer": str(peer)})

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        settings = self._settings
        while True:
            try:
                prefix = await asyncio.wait_for(reader.readexactly(2), settings.idle_timeout_s)
            except asyncio.IncompleteReadError:
                return  # clean end of stream
            length = int.from_bytes(prefix, "big")
            if length < MIN_MESSAGE:
                log.warning("hsm frame length invalid; closing", extra={"length": length})
                return
            message = await asyncio.wait_for(reader.readexactly(length),
                                             settings.read_timeout_s)
            writer.write(encode_frame(self._core.handle(message)))
            await writer.drain()


async def start_server(settings: HsmSettings) -> HsmServer:
    """Combine the LMK (checking each component's KCV), then listen."""
    lmk = combine_lmk(settings.lmk_components)
    server = HsmServer(HsmCore(lmk, authorised=settings.authorised,
                               firmware=settings.firmware), settings)
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
    settings = load_dev_settings(args.config)
    changes: dict[str, Any] = {}
    if args.host is not None:
        changes["host"] = args.host
    if args.port is not None:
        changes["port"] = args.port
    if args.authorised:
        changes["authorised"] = True
    settings = replace(settings, **changes)
    if not logging.getLogger().handlers:
        from switch.logs import configure  # the masking formatter of the whole project

        configure("INFO")
    import uvloop

    return uvloop.run(_run(settings))
