"""Settings: `config/gridpay.toml`, then `--config FILE`, then `GRIDPAY_*` variables.

Everything is loaded once into frozen dataclasses and validated; a bad value stops start-up
with a `ConfigError` that names the key, the value and what is allowed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from switch.logs import mask_text

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "gridpay.toml"

#: environment variable → (section, key)
ENV_KEYS: dict[str, tuple[str, str]] = {
    "GRIDPAY_HOME": ("node", "home"),
    "GRIDPAY_NODE_ID": ("node", "id"),
    "GRIDPAY_LOG_LEVEL": ("node", "log_level"),
    "GRIDPAY_HOST": ("listen", "host"),
    "GRIDPAY_HTTP_PORT": ("listen", "http_port"),
    "GRIDPAY_BANK_PORT": ("listen", "bank_port"),
    "GRIDPAY_POST_PORT": ("listen", "post_port"),
    "GRIDPAY_DATABASE_URL": ("services", "database_url"),
    "GRIDPAY_REDIS_URL": ("services", "redis_url"),
    "GRIDPAY_HSM_ADDR": ("services", "hsm_addr"),
    "GRIDPAY_MARKETING_URL": ("services", "marketing_url"),
    "GRIDPAY_MARKETING_CUSTOMERS": ("services", "marketing_customers"),
    "GRIDPAY_CUTOVER": ("business", "cutover"),
    "GRIDPAY_TIMEZONE": ("business", "timezone"),
    "GRIDPAY_LEASE_TTL_S": ("lease", "ttl_s"),
    "GRIDPAY_LEASE_RENEW_S": ("lease", "renew_s"),
}

CHANNELS = ("internet", "counter", "ivr", "partner")
TRANSACTION_TYPES = ("inquiry", "payment", "reversal", "reconciliation")
DIALECTS = ("bank", "post")
_INSTITUTION_ID = re.compile(r"^[0-9]{1,11}$")
_NODE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class ConfigError(Exception):
    """A setting is missing or invalid: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        # the message is printed: a service URL's password (a TLS Redis URL is refused, say)
        # or key material pasted into the wrong setting is masked as in the logs
        shown = mask_text(value) if isinstance(value, str) else value
        super().__init__(f"setting {key} = {shown!r} is invalid: {allowed}")


def _check_authority(key: str, url: str) -> None:
    """A service URL whose user, password, host and port read as written. A '#', '/', '?' or
    '@' in a password must be percent-encoded (%23, %2F, %3F, %40): raw, the password ends
    there and its rest is read as the host, port, path or fragment, and the driver's error
    (a port that is not a number, say) would quote it."""
    if not url:
        return
    rest = url.split("://", 1)[1]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    # user:password cut short by a raw delimiter: the authority holds a ':' but no '@', and
    # an '@' follows (an '@' in a query, such as ?user=app@corp, after a host is no password;
    # one before the query is, even after digits that would read as a port: app:1234#x@db)
    cut = authority.partition(":")[2]
    tail = rest[len(authority):]
    if "@" not in authority and cut and "," not in authority and (
            "@" in tail.split("?", 1)[0] or ("@" in tail and not cut.isdigit())):
        raise ConfigError(key, url, "a URL whose password has its '#', '/', '?' and '@' "
                                    "percent-encoded (%23, %2F, %3F, %40)")
    for host in authority.rpartition("@")[2].split(","):  # libpq takes h1:p1,h2:p2
        name, colon, port = host.rpartition(":")
        if colon and port and not name.endswith(":") and not host.endswith("]") and not (
                port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(key, url, "a URL whose ports are numbers from 1 to 65535")


def _get(section: Mapping[str, Any], name: str, key: str) -> Any:
    if name not in section:
        raise ConfigError(key, None, "required")
    return section[name]


def _int(section: Mapping[str, Any], name: str, key: str, lo: int, hi: int) -> int:
    v = _get(section, name, key)
    if isinstance(v, str) and re.fullmatch(r"-?[0-9]+", v.strip()):
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(key, v, f"an integer from {lo} to {hi}")
    return v


def _float(section: Mapping[str, Any], name: str, key: str, lo: float, hi: float) -> float:
    v = _get(section, name, key)
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise ConfigError(key, v, f"a number from {lo} to {hi}") from None
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise ConfigError(key, v, f"a number from {lo} to {hi}")
    return float(v)


def _str(section: Mapping[str, Any], name: str, key: str, pattern: str | None = None,
         allowed: str = "a string") -> str:
    v = _get(section, name, key)
    if not isinstance(v, str) or (pattern is not None and not re.fullmatch(pattern, v)):
        raise ConfigError(key, v, allowed)
    return v


def _port(section: Mapping[str, Any], name: str, key: str) -> int:
    return _int(section, name, key, 0, 65535)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSettings:
    id: str
    home: Path
    log_level: str
    shutdown_grace_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenSettings:
    host: str
    http_port: int
    bank_port: int
    post_port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSettings:
    database_url: str
    redis_url: str
    hsm_addr: str
    marketing_url: str
    db_pool_min: int
    db_pool_max: int
    marketing_customers: int
    marketing_seed: int
    marketing_timeout_s: float

    def __repr__(self) -> str:  # URLs may carry passwords
        return "ServiceSettings(<masked>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class BusinessSettings:
    timezone: ZoneInfo
    cutover: time
    max_amount: int
    idempotency_ttl_h: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwarderSettings:
    batch: int
    concurrency: int  # postings in flight to the marketing system
    pipeline: int  # of those, at most this many on one connection (1: no HTTP pipelining)
    timeout_s: float  # a posting's answer (the billing system's commit) is awaited this long
    backoff_initial_s: float
    backoff_max_s: float
    dead_letter_after_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSettings:
    idle_timeout_s: float
    max_in_flight: int
    max_frame: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseSettings:
    ttl_s: float
    renew_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class IvrSettings:
    pin_tries_per_call: int
    pin_tries_per_card: int
    ani_failures_per_day: int
    call_idle_s: int
    account_tries_per_call: int = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class CardSettings:
    issuer: str
    face_values: tuple[int, ...]
    expiry_years: int
    session_ttl_s: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Institution:
    id: str
    name: str
    dialect: str
    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    max_connections: int
    mac: bool
    transactions: frozenset[str]
    max_amount: int

    def allows(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.allowed)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    node: NodeSettings
    listen: ListenSettings
    services: ServiceSettings
    business: BusinessSettings
    forwarder: ForwarderSettings
    links: LinkSettings
    lease: LeaseSettings
    ivr: IvrSettings
    cards: CardSettings
    institutions: tuple[Institution, ...] = field(default=())

    def institution(self, inst_id: str) -> Institution | None:
        for inst in self.institutions:
            if inst.id == inst_id:
                return inst
        return None

    def institution_for(self, dialect: str, address: str) -> list[Institution]:
        return [i for i in self.institutions if i.dialect == dialect and i.allows(address)]


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    sec = raw.get(name, {})
    if not isinstance(sec, Mapping):
        raise ConfigError(name, sec, "a table")
    return sec


def _institution(i: int, raw: Any) -> Institution:
    k = f"institutions[{i}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(k, raw, "a table")
    inst_id = _str(raw, "id", f"{k}.id", _INSTITUTION_ID.pattern, "1 to 11 digits")
    dialect = _str(raw, "dialect", f"{k}.dialect", "|".join(DIALECTS), " or ".join(DIALECTS))
    allowed_raw = raw.get("allowed", [])
    if not isinstance(allowed_raw, list):
        raise ConfigError(f"{k}.allowed", allowed_raw, "a list of CIDR networks")
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for a in allowed_raw:
        try:
            nets.append(ipaddress.ip_network(str(a), strict=False))
        except ValueError:
            raise ConfigError(f"{k}.allowed", a, "a CIDR network such as 127.0.0.0/8") from None
    tx = raw.get("transactions", list(TRANSACTION_TYPES))
    if not isinstance(tx, list) or not all(isinstance(t, str) for t in tx) \
            or not set(tx) <= set(TRANSACTION_TYPES):
        raise ConfigError(f"{k}.transactions", tx, f"a list drawn from {TRANSACTION_TYPES}")
    mac = raw.get("mac", True)
    if not isinstance(mac, bool):
        raise ConfigError(f"{k}.mac", mac, "true or false")
    return Institution(
        id=inst_id,
        name=str(raw.get("name", inst_id)),
        dialect=dialect,
        allowed=tuple(nets),
        max_connections=_int(raw, "max_connections", f"{k}.max_connections", 1, 1024)
        if "max_connections" in raw else 8,
        mac=mac,
        transactions=frozenset(tx),
        max_amount=_int(raw, "max_amount", f"{k}.max_amount", 1, 10**12 - 1)
        if "max_amount" in raw else 5_000_000,
    )


def build_settings(raw: Mapping[str, Any], base_dir: Path | None = None) -> Settings:
    """Validate a merged raw mapping into `Settings`."""
    node = _section(raw, "node")
    listen = _section(raw, "listen")
    svc = _section(raw, "services")
    bus = _section(raw, "business")
    fwd = _section(raw, "forwarder")
    links = _section(raw, "links")
    lease = _section(raw, "lease")
    ivr = _section(raw, "ivr")
    cards = _section(raw, "cards")

    home = Path(_str(node, "home", "node.home"))
    if not home.is_absolute():
        home = (base_dir or Path.cwd()) / home
    level = _str(node, "log_level", "node.log_level", "DEBUG|INFO|WARNING|ERROR",
                 "DEBUG, INFO, WARNING or ERROR")

    tz_name = _str(bus, "timezone", "business.timezone")
    try:
        tz = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError("business.timezone", tz_name, "an IANA time zone") from None
    cut = _str(bus, "cutover", "business.cutover", r"([01][0-9]|2[0-3]):[0-5][0-9]",
               "a local time HH:MM")
    hsm_addr = _str(svc, "hsm_addr", "services.hsm_addr", r"|[^:\s]+:[0-9]{1,5}",
                    "empty (embedded) or host:port")
    if hsm_addr and not 1 <= int(hsm_addr.rpartition(":")[2]) <= 65535:
        raise ConfigError("services.hsm_addr", hsm_addr, "host:port with a port from 1 to 65535")
    db_url = _str(svc, "database_url", "services.database_url", r"|postgres(ql)?://\S+",
                  "empty (embedded) or a postgresql:// URL")
    # redis:// only: the hot paths' client (switch/redis_pipe.py) speaks plain TCP
    redis_url = _str(svc, "redis_url", "services.redis_url", r"|redis://\S+",
                     "empty (embedded) or a redis:// URL")
    for key, url in (("services.database_url", db_url), ("services.redis_url", redis_url)):
        _check_authority(key, url)
    mkt = _str(svc, "marketing_url", "services.marketing_url", r"|https?://\S+",
               "empty (embedded) or an http:// URL")
    if mkt:
        from switch.marketing_client import check_base_url  # only when one is configured

        try:
            check_base_url(mkt)
        except ValueError:
            raise ConfigError("services.marketing_url", mkt,
                              "empty (embedded) or http(s)://host[:port], with a port from 1 "
                              "to 65535") from None
    face = cards.get("face_values", [5000, 10000, 20000, 50000])
    if (not isinstance(face, list) or not face
            or not all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in face)):
        raise ConfigError("cards.face_values", face, "a non-empty list of positive fen amounts")
    lease_ttl = _float(lease, "ttl_s", "lease.ttl_s", 0.2, 600)
    lease_renew = _float(lease, "renew_s", "lease.renew_s", 0.05, 300)
    if lease_renew * 2 > lease_ttl:
        raise ConfigError("lease.renew_s", lease_renew,
                          f"at most half of lease.ttl_s ({lease_ttl})")
    insts_raw = raw.get("institutions", [])
    if not isinstance(insts_raw, list):
        raise ConfigError("institutions", insts_raw, "an array of tables")
    insts = tuple(_institution(i, r) for i, r in enumerate(insts_raw))
    ids = [i.id for i in insts]
    if len(ids) != len(set(ids)):
        raise ConfigError("institutions", ids, "unique institution ids")

    pool_min = _int(svc, "db_pool_min", "services.db_pool_min", 1, 100)
    pool_max = _int(svc, "db_pool_max", "services.db_pool_max", 1, 500)
    if pool_min > pool_max:
        raise ConfigError("services.db_pool_min", pool_min,
                          f"at most services.db_pool_max ({pool_max})")
    return Settings(
        node=NodeSettings(
            id=_str(node, "id", "node.id", _NODE_ID.pattern, "1-32 of [A-Za-z0-9_.-]"),
            home=home,
            log_level=level,
            shutdown_grace_s=_float(node, "shutdown_grace_s", "node.shutdown_grace_s", 0, 300),
        ),
        listen=ListenSettings(
            host=_str(listen, "host", "listen.host"),
            http_port=_port(listen, "http_port", "listen.http_port"),
            bank_port=_port(listen, "bank_port", "listen.bank_port"),
            post_port=_port(listen, "post_port", "listen.post_port"),
        ),
        services=ServiceSettings(
            database_url=db_url,
            redis_url=redis_url,
            hsm_addr=hsm_addr,
            marketing_url=mkt.rstrip("/"),
            db_pool_min=pool_min,
            db_pool_max=pool_max,
            marketing_customers=_int(svc, "marketing_customers", "services.marketing_customers",
                                     1, 10_000_000),
            marketing_seed=_int(svc, "marketing_seed", "services.marketing_seed", 0, 2**31),
            marketing_timeout_s=_float(svc, "marketing_timeout_s", "services.marketing_timeout_s",
                                       0.05, 60),
        ),
        business=BusinessSettings(
            timezone=tz,
            cutover=time(int(cut[:2]), int(cut[3:])),
            max_amount=_int(bus, "max_amount", "business.max_amount", 1, 10**12 - 1),
            idempotency_ttl_h=_int(bus, "idempotency_ttl_h", "business.idempotency_ttl_h",
                                   24, 24 * 365),
        ),
        forwarder=ForwarderSettings(
            batch=_int(fwd, "batch", "forwarder.batch", 1, 10_000),
            concurrency=_int(fwd, "concurrency", "forwarder.concurrency", 1, 1_000),
            pipeline=_int(fwd, "pipeline", "forwarder.pipeline", 1, 256),
            timeout_s=_float(fwd, "timeout_s", "forwarder.timeout_s", 0.1, 600),
            backoff_initial_s=_float(fwd, "backoff_initial_s", "forwarder.backoff_initial_s",
                                     0.01, 60),
            backoff_max_s=_float(fwd, "backoff_max_s", "forwarder.backoff_max_s", 0.1, 3600),
            dead_letter_after_s=_float(fwd, "dead_letter_after_s",
                                       "forwarder.dead_letter_after_s", 1, 30 * 86400),
        ),
        links=LinkSettings(
            idle_timeout_s=_float(links, "idle_timeout_s", "links.idle_timeout_s", 0.1, 86400),
            max_in_flight=_int(links, "max_in_flight", "links.max_in_flight", 1, 10_000),
            max_frame=_int(links, "max_frame", "links.max_frame", 64, 65535),
        ),
        lease=LeaseSettings(ttl_s=lease_ttl, renew_s=lease_renew),
        ivr=IvrSettings(
            pin_tries_per_call=_int(ivr, "pin_tries_per_call", "ivr.pin_tries_per_call", 1, 10),
            pin_tries_per_card=_int(ivr, "pin_tries_per_card", "ivr.pin_tries_per_card", 1, 100),
            ani_failures_per_day=_int(ivr, "ani_failures_per_day", "ivr.ani_failures_per_day",
                                      1, 1000),
            call_idle_s=_int(ivr, "call_idle_s", "ivr.call_idle_s", 10, 86400),
            account_tries_per_call=_int(ivr, "account_tries_per_call",
                                        "ivr.account_tries_per_call", 1, 10),
        ),
        cards=CardSettings(
            issuer=_str(cards, "issuer", "cards.issuer", r"[0-9]{4}", "4 digits"),
            face_values=tuple(sorted(face)),
            expiry_years=_int(cards, "expiry_years", "cards.expiry_years", 1, 20),
            session_ttl_s=_int(cards, "session_ttl_s", "cards.session_ttl_s", 60, 86400),
        ),
        institutions=insts,
    )


def load_raw(config_file: Path | None = None, env: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    with REPO_CONFIG.open("rb") as f:
        raw = tomllib.load(f)
    if config_file is not None:
        try:
            with config_file.open("rb") as f:
                raw = _merge(raw, tomllib.load(f))
        except OSError as e:
            raise ConfigError("--config", str(config_file),
                              f"a readable file ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", str(config_file), f"valid TOML ({e})") from None
    for var, (sec, key) in ENV_KEYS.items():
        if var in env:
            raw = _merge(raw, {sec: {key: env[var]}})
    if overrides:
        raw = _merge(raw, overrides)
    return raw


def load_settings(config_file: Path | None = None, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """The settings of this process, frozen."""
    return build_settings(load_raw(config_file, env, overrides))
