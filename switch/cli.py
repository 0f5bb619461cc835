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
    from switch import loop

    async def wrap() -> int:
        return await coro

    return loop.run(wrap())


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
    from switch.loop import tune_gc

    tune_gc()
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
    services = Services(settings, replicated=args.replicated)
    urls = services.start()
    stop = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("READY " + orjson.dumps({"database": logs.mask_url(urls.database),
                                   "redis": logs.mask_url(urls.redis), "hsm": urls.hsm,
                                   "marketing": logs.mask_url(urls.marketing)}).decode(),
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
            try:
                conn = await asyncpg.connect(url, timeout=10)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    ValueError) as e:  # not the URL itself: it may hold a password
                print(f"gridpay: the database at {logs.mask_url(url)} cannot be used: "
                      f"{type(e).__name__}", file=sys.stderr)
                return 2
            try:
                await db.migrate(conn)
            finally:
                await conn.close()
            pool = await db.create_pool(url, min_size=1, max_size=4,
                                        server_settings=db.local_time(settings.business.timezone))
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


def cmd_clients(args: argparse.Namespace) -> int:
    from switch.clients import CACHE_TTL_S, create_client, revoke_client, valid_client_name

    settings = _settings(args)
    logs.configure("WARNING")

    async def revoke(pool: Any) -> int:
        n = await revoke_client(pool, args.name)
        if n == 0:
            print(f"no client named {args.name!r} with a key in force", file=sys.stderr)
            return 1
        print(f"{n} key(s) revoked; running nodes refuse them at once (a node that cannot "
              f"hear the database's notice, within {CACHE_TTL_S:.0f} s)")
        return 0

    if args.sub == "revoke":
        return _with_db(settings, revoke)

    if not valid_client_name(args.name):
        print("gridpay clients add: a client's name is 1 to 64 printable characters, without "
              "a space at either end", file=sys.stderr)
        return 2

    async def run(pool: Any) -> int:
        others = await pool.fetchval(
            "SELECT count(*) FROM api_clients WHERE name = $1 AND revoked_at IS NULL", args.name)
        try:
            key_id, key = await create_client(pool, args.name, args.channel)
        except ValueError as e:
            print(f"gridpay clients add: {e}", file=sys.stderr)
            return 2
        print(f"client {args.name} ({args.channel}): key id {key_id}")
        if others:  # a rotation, say: the old key stays in force until revoked
            print(f"note: {others} other key(s) in force under this name, for the same "
                  f"client (its payments and idempotency keys are shared); "
                  f"'clients revoke {args.name}' revokes them all, 'clients revoke ID' one",
                  file=sys.stderr)
        print("the key is shown once; store it now:")
        print(key)
        return 0

    return _with_db(settings, run)


def cmd_users(args: argparse.Namespace, argv: list[str]) -> int:
    from switch.cards.users import main_users_add

    settings = _settings(args)
    logs.configure("WARNING")
    rest = argv[argv.index("add") + 1:]

    async def run(pool: Any) -> int:
        return await main_users_add(rest, pool, sys.stdin)

    return _with_db(settings, run)


def cmd_cards(args: argparse.Namespace, argv: list[str]) -> int:
    if args.sub == "manufacture":
        from switch.cards.manufacturer import main as manufacture

        return int(manufacture(argv[argv.index("manufacture") + 1:]))
    settings = _settings(args)
    logs.configure("WARNING")
    if args.sub == "verify-log":
        from switch.cards.oplog import main_verify

        async def verify(pool: Any) -> int:
            return await main_verify(pool)

        return _with_db(settings, verify)

    from switch.cards.errors import NotFound
    from switch.cards.jobs import get_job, render_progress

    async def watch(pool: Any) -> int:
        tty = sys.stdout.isatty()
        while True:
            try:
                job = await get_job(pool, args.job_id)
            except NotFound as e:
                print(f"gridpay cards job: {e.detail}", file=sys.stderr)
                return 2
            line = render_progress(job)
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            if job.get("state") in ("succeeded", "failed") or not args.follow:
                if tty:
                    print()
                return 0 if job.get("state") != "failed" else 1
            await asyncio.sleep(1.0)

    return _with_db(settings, watch)


def cmd_recon(args: argparse.Namespace) -> int:
    from switch.business import iso_date

    settings = _settings(args)
    logs.configure("WARNING")
    try:
        day = iso_date(args.date)
        if not 1900 <= day.year <= 9998:  # its neighbours are read, and files write 4 digits
            raise ValueError(args.date)
    except ValueError:
        print(f"gridpay recon: --date {args.date!r} is not YYYY-MM-DD (years 1900 to 9998)",
              file=sys.stderr)
        return 2
    if args.sub == "export":
        from switch.links.recon import export

        if settings.institution(args.institution) is None:
            print(f"gridpay recon: no institution {args.institution!r} is configured",
                  file=sys.stderr)
            return 2

        out: list[str] = []

        async def run(pool: Any) -> int:
            out.append(await export(pool, args.institution, day))
            return 0

        rc = _with_db(settings, run)
        if rc != 0 or not out:
            return rc
        if args.out:
            try:
                Path(args.out).write_text(out[0], encoding="utf-8")
            except OSError as e:
                print(f"gridpay recon: cannot write {args.out}: {e.strerror}", file=sys.stderr)
                return 2
            print(f"written {args.out}")
        else:
            sys.stdout.write(out[0])
        return rc

    from switch.business import BusinessCalendar
    from switch.marketing_client import MarketingClient, MarketingError, check_base_url
    from switch.payments.reconcile import reconcile

    url = args.marketing_url or settings.services.marketing_url  # the command line wins
    if not url:
        print("gridpay recon marketing: set GRIDPAY_MARKETING_URL or --marketing-url (under "
              "'gridpay up', its READY line shows the embedded billing simulator's URL)",
              file=sys.stderr)
        return 2
    try:
        check_base_url(url)
    except ValueError as e:
        print(f"gridpay recon marketing: {e}", file=sys.stderr)
        return 2

    async def run_m(pool: Any) -> int:
        async with MarketingClient.for_reconciliation(url) as client:
            cal = BusinessCalendar(settings.business.timezone, settings.business.cutover)
            try:
                rep = await reconcile(pool, client, day, requeue=not args.dry_run,
                                      calendar=cal)
            except MarketingError as e:  # not a difference: the comparison could not be made
                print(f"gridpay recon marketing: the marketing system cannot be read now: {e}",
                      file=sys.stderr)
                return 2
        print(orjson.dumps(rep.as_dict(), option=orjson.OPT_INDENT_2).decode())
        return 0 if rep.clean and rep.complete else 1

    return _with_db(settings, run_m)


def cmd_forwarder(args: argparse.Namespace) -> int:
    from switch.payments.forwarder import outbox_counts, retry_dead_letters

    settings = _settings(args)
    logs.configure("WARNING")

    async def run(pool: Any) -> int:
        if args.sub == "retry-dead":
            n = await retry_dead_letters(pool)
            print(f"{n} dead letter(s) queued again for forwarding")
        print(orjson.dumps(await outbox_counts(pool)).decode())
        return 0

    return _with_db(settings, run)


def cmd_dev_keys(args: argparse.Namespace) -> int:
    from switch.keys import KeyProvisioningError, dev_keys_json, load_dev_keys

    settings = _settings(args)
    logs.configure("WARNING")
    try:
        dev = load_dev_keys()
    except KeyProvisioningError as e:
        print(f"gridpay dev keys: refused: {e}", file=sys.stderr)
        return 3
    addr = settings.services.hsm_addr
    if addr:  # a configured HSM: it must be running the dev LMK
        from switch.hsm_client import HsmClient, HsmError

        async def check() -> bool:
            host, _, port = addr.rpartition(":")
            async with HsmClient(host, int(port)) as hsm:
                kcv, _ = await hsm.diagnostics()
            return bool(kcv.upper() == dev.dev_lmk_kcv)

        try:
            is_dev = _run_async(_as_int(check()))
        except HsmError as e:
            print(f"gridpay dev keys: the HSM at {addr} cannot be asked: {e}", file=sys.stderr)
            return 3
    else:
        is_dev = 1  # the embedded HSM runs from the dev configuration
    try:
        print(dev_keys_json(dev, bool(is_dev)))
    except KeyProvisioningError as e:
        print(f"gridpay dev keys: refused: {e}", file=sys.stderr)
        return 3
    return 0


async def _as_int(coro: Awaitable[bool]) -> int:
    return int(await coro)


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
    sv = sub.add_parser("services", help="the embedded services alone")
    sv.add_argument("--replicated", action="store_true",
                    help="PostgreSQL as a primary with a synchronous streaming standby")
    sub.add_parser("migrate", help="apply database migrations and list them")
    sub.add_parser("hsm", help="the HSM simulator alone", add_help=False)
    sub.add_parser("marketing", help="the marketing-system simulator alone", add_help=False)
    clients = sub.add_parser("clients", help="API clients").add_subparsers(dest="sub",
                                                                          required=True)
    ca = clients.add_parser("add", help="create an API client; the key is the last line")
    ca.add_argument("name")
    ca.add_argument("--channel", required=True, choices=["internet", "counter", "ivr", "partner"])
    cr = clients.add_parser("revoke", help="revoke a client's key (by name or id)")
    cr.add_argument("name")

    users = sub.add_parser("users", help="card-centre users").add_subparsers(dest="sub",
                                                                          required=True)
    ua = users.add_parser("add", help="create a user (password on standard input)")
    ua.add_argument("name")
    ua.add_argument("--role", required=True)
    ua.add_argument("--hall")
    ua.add_argument("--password-stdin", action="store_true", required=True)

    cards = sub.add_parser("cards", help="card centre").add_subparsers(dest="sub", required=True)
    cm = cards.add_parser("manufacture", help="the manufacturer simulator", add_help=False)
    cm.add_argument("rest", nargs=argparse.REMAINDER)
    cj = cards.add_parser("job", help="show a background job's progress")
    cj.add_argument("job_id")
    cj.add_argument("--follow", action="store_true", help="keep showing until it ends")
    cards.add_parser("verify-log", help="check the operation log's hash chain")

    recon = sub.add_parser("recon", help="reconciliation").add_subparsers(dest="sub",
                                                                         required=True)
    re_ = recon.add_parser("export", help="an institution's daily reconciliation file")
    re_.add_argument("--institution", required=True)
    re_.add_argument("--date", required=True, help="business date YYYY-MM-DD")
    re_.add_argument("--out", help="write to this file instead of standard output")
    rm = recon.add_parser("marketing", help="compare the ledger with the marketing system")
    rm.add_argument("--date", required=True, help="business date YYYY-MM-DD")
    rm.add_argument("--marketing-url")
    rm.add_argument("--dry-run", action="store_true", help="report only; re-queue nothing")

    fwd = sub.add_parser("forwarder", help="store-and-forward queue").add_subparsers(
        dest="sub", required=True)
    fwd.add_parser("status", help="postings by state")
    fwd.add_parser("retry-dead", help="queue every dead letter again")

    dev = sub.add_parser("dev", help="development helpers").add_subparsers(dest="sub",
                                                                           required=True)
    dk = dev.add_parser("keys", help="the clear TEST keys of the dev configuration")
    dk.add_argument("--json", action="store_true", required=True)

    from switch.standby import register_cli

    register_cli(sub)  # switchover, lease
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": cmd_up, "switch": cmd_switch, "services": cmd_services, "migrate": cmd_migrate,
    "recon": cmd_recon, "forwarder": cmd_forwarder,
}


def _config_first(argv: list[str]) -> list[str]:
    """`--config FILE` is gridpay's own option, taken before or after the command
    (`gridpay up --config x.toml` as well as `gridpay --config x.toml up`)."""
    for i, arg in enumerate(argv):
        if i and arg == "--config" and i + 1 < len(argv):
            return [arg, argv[i + 1], *argv[:i], *argv[i + 2:]]
        if i and arg.startswith("--config="):
            return [arg, *argv[:i], *argv[i + 1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the simulators parse their own arguments
    rest = argv
    if rest and rest[0] == "--config":
        rest = rest[2:]
    elif rest and rest[0].startswith("--config="):
        rest = rest[1:]
    if rest and rest[0] in ("hsm", "marketing"):
        return (cmd_hsm if rest[0] == "hsm" else cmd_marketing)(rest[1:])
    if "cards" in rest[:1] and "manufacture" in rest[1:2]:
        from switch.cards.manufacturer import main as manufacture

        return int(manufacture(rest[2:]))
    argv = _config_first(argv)
    args = build_parser().parse_args(argv)
    from switch.embedded import EmbeddedError

    try:
        return _dispatch(args, argv)
    except (OSError, EmbeddedError) as e:
        # what the machine refused: a port taken, a home that is not a directory or not
        # writable, a database that does not answer. One line; the traceback at DEBUG.
        log.debug("command failed", exc_info=True)
        print(f"gridpay {args.command}: {logs.mask_text(str(e))}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "clients":
        return cmd_clients(args)
    if args.command == "users":
        return cmd_users(args, argv)
    if args.command == "cards":
        return cmd_cards(args, argv)
    if args.command == "dev":
        return cmd_dev_keys(args)
    if args.command in ("switchover", "lease"):
        return int(args.func(args))
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
