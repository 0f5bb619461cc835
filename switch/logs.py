"""Structured logging with masking built in.

Every record passes through `mask_text` and `mask_value` before it is formatted, so a careless
`log.info("... %s", pin_block)` or `extra={"api_key": ...}` cannot leak a secret: keys whose
names look secret are replaced whole, and long hex or base64 runs and bearer tokens inside
messages are masked. JSON lines when stderr is not a terminal, a compact text form when it is.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

SECRET_KEYS = re.compile(
    r"(pin|pin_?block|key|secret|token|password|passwd|authorization|mac|kcv_?clear|"
    r"lmk|pan|track|cvv|api_?key|bearer)",
    re.IGNORECASE,
)
# Not secrets although their names match the pattern above.
PUBLIC_KEYS = frozenset({"idempotency_key", "key_name", "keys", "kcv", "pin_attempts_left",
                         "mac_enabled", "posting_key"})

# Long hex runs (keys, PIN blocks, MACs) are masked; all-digit runs only past 20 digits, so
# that receipt numbers (up to 20) and account numbers stay readable in the logs.
_HEX_RUN = re.compile(r"\b(?=[0-9]*[A-Fa-f])[0-9A-Fa-f]{16,}\b|\b[0-9]{21,}\b")
# Tokens, key blocks and base64 secrets (but not UUIDs, which name payments and jobs, nor
# file paths, whose segments are split by the slashes).
_B64_RUN = re.compile(r"\b(?![0-9a-fA-F]{8}-[0-9a-fA-F]{4}-)[A-Za-z0-9_\-]{32,}={0,2}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
# bytes written as Python literals (b'\x8a\x12...'): a key or PIN block formatted with %s or
# %r, or a repr inside an exception; their escapes are not hex runs, so they go whole
_BYTES_REPR = re.compile(r"""\bb(['"])(?:\\.|(?!\1).)*\1""")
_KV = re.compile(r"(?i)\b(pin_?block|pin|password|passwd|secret|api_?key|token|key|mac|cvv)"
                 r"(\s*[=:]\s*)(\S+)")
# the password of a URL: scheme://user:PASSWORD@host, up to the last '@' of the token, so
# that a password holding an '@' (anywhere, however long), or a raw '#', '/' or '?' (which a
# URL should carry percent-encoded, and a config check refuses), is masked whole; with no '@'
# after it, a token that runs on past 256 characters goes from there (a password that lost
# its host). The work stays linear: a token scanned to its end is then consumed, by the
# match or by the second branch.
_URL_PASSWORD = re.compile(
    r"(?i)\b([a-z][a-z0-9+.-]{0,30}://[^/\s:@]{0,256}:)(?:\S*@|\S{257,})")
# a password given in a URL's query (libpq takes `password` and `sslpassword` there)
_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:ssl)?password=)[^&#]*")
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def mask_url(url: str) -> str:
    """`url` with its passwords masked: the user's (as in log text) and a `password` or
    `sslpassword` parameter of the query (libpq takes both)."""
    url = _URL_PASSWORD.sub(lambda m: m[1] + ("***@" if m[0].endswith("@") else "***"), url)
    return _QUERY_PASSWORD.sub(r"\1***", url)


def mask_text(text: str) -> str:
    """Mask anything in free text that looks like a secret."""
    text = _BYTES_REPR.sub("<bytes>", text)
    text = _BEARER.sub(r"\1***", text)
    text = _KV.sub(r"\1\2***", text)
    text = mask_url(text)
    text = _HEX_RUN.sub(lambda m: f"<hex:{len(m.group())}>", text)
    return _B64_RUN.sub(lambda m: f"<masked:{len(m.group())}>", text)


def mask_value(key: str, value: Any) -> Any:
    if key.lower() not in PUBLIC_KEYS and SECRET_KEYS.search(key):
        return "***"
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(k): mask_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(key, v) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return mask_text(str(value))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.__dict__.items():
        if k not in _RECORD_ATTRS and not k.startswith("_"):
            out[k] = mask_value(k, v)
    return out


def _message(record: logging.LogRecord) -> str:
    try:
        msg = record.getMessage()
    except Exception:  # a bad format string must not lose the line
        msg = str(record.msg)
    return mask_text(msg)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        doc.update(_fields(record))
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc_type"] = record.exc_info[0].__name__
            doc["exc"] = mask_text(self.formatException(record.exc_info))
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{ts} {record.levelname:<7} {record.name}: {_message(record)}"
        if extra:
            line += f"  [{extra}]"
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + mask_text(self.formatException(record.exc_info))
        return line


def configure(level: str = "INFO", *, json: bool | None = None, stream: Any = None) -> None:
    """Install the masking formatter on the root logger (idempotent)."""
    stream = stream or sys.stderr
    use_json = (not stream.isatty()) if json is None else json
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_gridpay", False):
            root.removeHandler(h)
    handler._gridpay = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
