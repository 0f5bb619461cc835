from __future__ import annotations

import io
import logging

import orjson

from switch import logs


def _capture() -> tuple[logging.Logger, io.StringIO]:
    buf = io.StringIO()
    logs.configure("DEBUG", json=True, stream=buf)
    return logging.getLogger("gridpay.test"), buf


def test_secret_fields_and_values_are_masked() -> None:
    log, buf = _capture()
    pin_block = "8F3A9C4D2E1B0A99" * 2
    log.info("verifying pin_block=%s for card", pin_block,
             extra={"api_key": "gp_supersecretvalue", "pin": "123456789012", "account": "1"})
    log.info("Authorization: Bearer gp_abcdefghijklmnopqrstuvwxyz0123456789")
    out = buf.getvalue()
    assert pin_block not in out and "123456789012" not in out
    assert "gp_supersecretvalue" not in out and "abcdefghijklmnopqrstuvwxyz" not in out
    first = orjson.loads(out.splitlines()[0])
    assert first["api_key"] == "***" and first["pin"] == "***" and first["account"] == "1"
    assert first["level"] == "info" and first["logger"] == "gridpay.test"


def test_exception_text_is_masked() -> None:
    log, buf = _capture()
    try:
        raise ValueError("key 0123456789ABCDEF0123456789ABCDEF rejected")
    except ValueError:
        log.exception("failed")
    out = buf.getvalue()
    assert "0123456789ABCDEF0123456789ABCDEF" not in out
    assert orjson.loads(out)["exc_type"] == "ValueError"


def test_receipts_and_accounts_stay_readable() -> None:
    log, buf = _capture()
    log.info("payment 202611260000000004 for account 1000001857 approved, id "
             "6f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f in /tmp/gridpay-home/postgres-pair/data")
    out = buf.getvalue()
    assert "202611260000000004" in out and "1000001857" in out
    assert "6f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f" in out
    assert "/tmp/gridpay-home/postgres-pair/data" in out


def test_bytes_written_as_python_literals_are_masked() -> None:
    log, buf = _capture()
    key = bytes(range(0x80, 0x90))
    log.info("block %s", key)
    log.info("key %r in %s", key, "curb'n'")
    try:
        raise ValueError(f"bad block {key!r}")
    except ValueError:
        log.exception("failed")
    out = buf.getvalue()
    assert "\\\\x8" not in out and "x80" not in out
    assert out.count("<bytes>") >= 3 and "curb'n'" in out


def test_url_passwords_and_more_secret_words_are_masked() -> None:
    from switch.logs import mask_text

    text = ("connect postgresql://gridpay:Hunter2pw@db:5432/gridpay failed; "
            "secret=Hunter2pw passwd: Hunter2pw cvv=123")
    masked = mask_text(text)
    assert "Hunter2pw" not in masked and "123" not in masked
    assert "postgresql://gridpay:***@db:5432/gridpay" in masked
    # an '@' in the password: log text is masked up to the last '@', as the READY line is
    assert mask_text("to redis://:Hun@ter2@r:6379/0") == "to redis://:***@r:6379/0"


def test_a_url_printed_for_operators_shows_no_password() -> None:
    from switch.logs import mask_text, mask_url

    cases = {
        # an '@' in the password: masked up to the last '@' of the authority
        "postgresql://u:p@ss@h1:5432,h2:5433/db?x=1": "postgresql://u:***@h1:5432,h2:5433/db?x=1",
        "postgresql://u:pw@h/db?password=zz&sslpassword=yy&a=b":
            "postgresql://u:***@h/db?password=***&sslpassword=***&a=b",
        "postgresql://h/db?Password=zz": "postgresql://h/db?Password=***",
        "redis://:secret@127.0.0.1:6379/0": "redis://:***@127.0.0.1:6379/0",
        "postgresql://postgres@127.0.0.1:5432/gridpay": "postgresql://postgres@127.0.0.1:5432/gridpay",
        "127.0.0.1:7000": "127.0.0.1:7000",
        # raw delimiters in the password (refused by the config, but printed when refused)
        "postgresql://postgres:DbPw#S3cret-93@127.0.0.1:5432/gridpay":
            "postgresql://postgres:***@127.0.0.1:5432/gridpay",
        "postgresql://postgres:Db/Pw?x@127.0.0.1/gridpay":
            "postgresql://postgres:***@127.0.0.1/gridpay",
    }
    for url, shown in cases.items():
        assert mask_url(url) == shown, url
    # a password too long for the '@' to be in reach: the rest of the token goes
    long_pw = "S3cr.t!" * 40
    for masked in (mask_url(f"postgresql://u:{long_pw}@db/x"),
                   mask_text(f"connect postgresql://u:{long_pw}@db/x failed")):
        assert "S3cr" not in masked and "postgresql://u:***" in masked, masked
    # ... and one with an '@' early in it: masked up to its last '@', however far
    for masked in (mask_url(f"postgresql://u:a@{long_pw}@db/x"),
                   mask_text(f"connect postgresql://u:a@{long_pw}@db/x failed")):
        assert "S3cr" not in masked and "postgresql://u:***@db/x" in masked, masked
