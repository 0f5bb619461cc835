"""The `gridpay` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from switch import logs
from switch.config import ConfigError, Settings, load_settings

log = logging.getLogger("gridpay.cli")


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(Path(args.config) if args.config else None)
    except ConfigError as e:
        print(f"gridpay: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_async(coro: Awaitable[int]) -> int:
    import uvloop

    async def wrap() -> int:
        return await coro

    return uvloop.run(wrap())


# -- long-running nodes ------------------------------------------------------------------------


async def _serve_node(settings: Settings, urls: Any) -> int:
    from switch.node import Node

    node = Node(settings, urls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await node.stop()
        raise
    node.components["request_stop"] = stop.set
    print("READY " + orjson.dumps(node.ready_line()).decode(), flush=True)
    await stop.wait()
    log.info("stopping: no new work is taken; finishing what is in flight")
    try:
        await asyncio.wait_for(node.stop(), settings.node.shutdown_grace_s + 5)
    except TimeoutError:
        log.error("stop did not finish in time")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from switch.services import Services

    settings = _settings(args)
    logs.configure(settings.node.log_level)
    services = Services(settings)
    urls = services.start()
    try:
        return _run_async(_serve_node(settings, urls))
    finally:
        services.stop()


def cmd_switch(args: argparse.Namespace) -> int:
    from switch.node import ServiceUrls

    settings = _settings(args)
    logs.configure(settings.node.log_level)
    s = settings.services
    missing = [k for k, v in (("GRIDPAY_DATABASE_URL", s.database_url),
                              ("GRIDPAY_REDIS_URL", s.redis_url),
                              ("GRIDPAY_HSM_ADDR", s.hsm_addr),
                              ("GRIDPAY_MARKETING_URL", s.marketing_url)) if not v]
    if missing:
        print(f"gridpay switch: configure the shared services first: {', '.join(missing)}",
              file=sys.stderr)
        return 2
    urls = ServiceUrls(database=s.database_url, redis=s.redis_url, hsm=s.hsm_addr,
                       marketing=s.marketing_url)
    return _run_async(_serve_node(settings, urls))


def cmd_services(args: argparse.Namespace) -> int:
    """The embedded services alone (for a standby pair on one machine, tests, benchmarks)."""
    from switch.services import Services

    settings = _settings(args)
    logs.configure(settings.node.log_level)
    services = Services(settings)
    urls = services.start()
    stop = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("READY " + orjson.dumps({"database": urls.database, "redis": urls.redis,
                                   "hsm": urls.hsm, "marketing": urls.marketing}).decode(),
          flush=True)
    try:
        while not stop["flag"]:
            time.sleep(0.2)
    finally:
        services.stop()
    return 0


# -- one-shot commands against the database -----------------------------------------------------


@contextlib.contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The configured database, a running embedded one, or a temporarily started one."""
    if settings.services.database_url:
        yield settings.services.database_url
        return
    from switch.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(settings.node.home / "postgres")
    running = pg.running_url()
    if running:
        yield running
        return
    pg.start()
    try:
        yield pg.url
    finally:
        pg.stop()


def _with_db(settings: Settings, fn: Callable[[Any], Awaitable[int]]) -> int:
    import asyncpg

    from switch import db

    with database_url(settings) as url:
        async def run() -> int:
            conn = await asyncpg.connect(url)
            try:
                await db.migrate(conn)
            finally:
                await conn.close()
            pool = await db.create_pool(url, min_size=1, max_size=4)
            try:
                return await fn(pool)
            finally:
                await pool.close()

        return _run_async(run())


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    logs.configure(settings.node.log_level)

    async def run(pool: Any) -> int:
        rows = await pool.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        for r in rows:
            print(f"{r['version']:04d} {r['name']}")
        return 0

    return _with_db(settings, run)


def cmd_clients_add(args: argparse.Namespace) -> int:
    from switch.clients import create_client

    settings = _settings(args)
    logs.configure("WARNING")

    async def run(pool: Any) -> int:
        client_id, key = await create_client(pool, args.name, args.channel)
        print(f"client {args.name} ({args.channel}) created: id {client_id}")
        print("the key is shown once; store it now:")
        print(key)
        return 0

    return _with_db(settings, run)


def cmd_hsm(argv: list[str]) -> int:
    from hsm_sim.server import main

    return int(main(argv))


def cmd_marketing(argv: list[str]) -> int:
    from marketing_sim.app import main

    return int(main(argv))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gridpay", description="gridpay payment switch")
    p.add_argument("--config", help="a TOML file overriding config/gridpay.toml")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="embedded services (where not configured) + one switch node")
    sub.add_parser("switch", help="one switch node against configured services")
    sub.add_parser("services", help="the embedded services alone")
    sub.add_parser("migrate", help="apply database migrations and list them")
    sub.add_parser("hsm", help="the HSM simulator alone", add_help=False)
    sub.add_parser("marketing", help="the marketing-system simulator alone", add_help=False)
    clients = sub.add_parser("clients", help="API clients").add_subparsers(dest="sub",
                                                                          required=True)
    ca = clients.add_parser("add", help="create an API client; the key is the last line")
    ca.add_argument("name")
    ca.add_argument("--channel", required=True, choices=["internet", "counter", "ivr", "partner"])
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": cmd_up, "switch": cmd_switch, "services": cmd_services, "migrate": cmd_migrate,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the simulators parse their own arguments
    rest = argv
    if rest and rest[0] == "--config":
        rest = rest[2:]
    if rest and rest[0] in ("hsm", "marketing"):
        return (cmd_hsm if rest[0] == "hsm" else cmd_marketing)(rest[1:])
    args = build_parser().parse_args(argv)
    if args.command == "clients":
        return cmd_clients_add(args)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
