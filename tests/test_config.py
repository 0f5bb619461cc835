from __future__ import annotations

from pathlib import Path

import pytest

from switch.config import ConfigError, load_settings


def test_dev_defaults_load_and_are_frozen() -> None:
    s = load_settings(env={})
    assert s.listen.bank_port == 8583 and s.listen.post_port == 8584
    assert {i.id for i in s.institutions} == {"01020000", "01000000"}
    bank = s.institution("01020000")
    assert bank is not None and bank.dialect == "bank" and bank.mac
    assert bank.allows("127.0.0.1") and not bank.allows("10.1.2.3")
    with pytest.raises(AttributeError):
        s.listen.http_port = 1  # type: ignore[misc]


def test_environment_overrides_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[listen]\nhttp_port = 9000\nbank_port = 9001\n')
    s = load_settings(f, env={"GRIDPAY_HTTP_PORT": "0", "GRIDPAY_NODE_ID": "node-b",
                              "GRIDPAY_HOME": str(tmp_path / "h")})
    assert s.listen.http_port == 0          # env beats --config
    assert s.listen.bank_port == 9001       # --config beats the defaults
    assert s.node.id == "node-b" and s.node.home == tmp_path / "h"


@pytest.mark.parametrize(
    ("env", "key", "allowed"),
    [
        ({"GRIDPAY_HTTP_PORT": "70000"}, "listen.http_port", "0 to 65535"),
        ({"GRIDPAY_HTTP_PORT": "eighty"}, "listen.http_port", "integer"),
        ({"GRIDPAY_CUTOVER": "25:00"}, "business.cutover", "HH:MM"),
        ({"GRIDPAY_TIMEZONE": "Mars/Olympus"}, "business.timezone", "IANA"),
        ({"GRIDPAY_DATABASE_URL": "mysql://x"}, "services.database_url", "postgresql://"),
        ({"GRIDPAY_HSM_ADDR": "nohostport"}, "services.hsm_addr", "host:port"),
        ({"GRIDPAY_HSM_ADDR": "127.0.0.1:99999"}, "services.hsm_addr", "1 to 65535"),
        ({"GRIDPAY_REDIS_URL": "rediss://cache:6380/0"}, "services.redis_url", "redis://"),
        ({"GRIDPAY_MARKETING_URL": "http://127.0.0.1:99999"}, "services.marketing_url",
         "1 to 65535"),
        ({"GRIDPAY_MARKETING_URL": "http://billing:notaport"}, "services.marketing_url",
         "1 to 65535"),
        ({"GRIDPAY_NODE_ID": "bad id!"}, "node.id", "A-Za-z0-9"),
        ({"GRIDPAY_DATABASE_URL": "postgresql://db:notaport/x"}, "services.database_url",
         "1 to 65535"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(env: dict[str, str], key: str,
                                                       allowed: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(env=env)
    assert e.value.key == key
    msg = str(e.value)
    assert key in msg and allowed in msg and next(iter(env.values())) in msg


@pytest.mark.parametrize("url", [
    "postgresql://gridpay:DbPw#S3cret-93@127.0.0.1:5432/gridpay",
    "postgresql://gridpay:Db/Pw@127.0.0.1:5432/gridpay",
    "redis://:pw?S3cret-93@127.0.0.1:6379/0",
    # digits first, which would read as a port: the driver's error quoted them
    "postgresql://gridpay:1234#S3cret@127.0.0.1/gridpay",
    "postgresql://gridpay:2024/S3cret@127.0.0.1/gridpay",
])
def test_a_password_with_raw_url_delimiters_is_refused_and_never_shown(url: str) -> None:
    """Raw, the password's rest would be read as the host or port, and the driver's error
    quoted it: the setting is refused first, its password masked whole."""
    key = "GRIDPAY_REDIS_URL" if url.startswith("redis") else "GRIDPAY_DATABASE_URL"
    with pytest.raises(ConfigError) as e:
        load_settings(env={key: url})
    msg = str(e.value)
    assert "percent-encoded" in msg and "S3cret" not in msg and "Pw" not in msg, msg


@pytest.mark.parametrize("url", [
    "postgresql://u:p%23w@h:5432/db", "postgresql://u:pw@h1:5432,h2:5433/db",
    "postgresql://u:p@ss@h:5432/db", "postgresql://u:p@[::1]:5432/db",
    "postgresql:///db?host=/tmp", "postgresql://db/gridpay?user=app@corp",
    "postgresql:///db?host=/var/run/postgresql&user=a@b", "postgresql://h1:5432,h2:/db",
    "postgresql://h/db?sslrootcert=/etc/ssl/ca@2024.pem", "postgresql://h:5432/db?user=a@b",
])
def test_service_urls_that_parse_as_written_are_taken(url: str) -> None:
    assert load_settings(env={"GRIDPAY_DATABASE_URL": url}).services.database_url == url


def test_bad_institution_is_named(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[[institutions]]\nid = "ABC"\ndialect = "bank"\n')
    with pytest.raises(ConfigError) as e:
        load_settings(f, env={})
    # arrays of tables in an override file replace the list
    assert e.value.key == "institutions[0].id"


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(tmp_path / "missing.toml", env={})
    assert e.value.key == "--config"


def test_lease_renewal_must_fit_in_ttl() -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(env={"GRIDPAY_LEASE_TTL_S": "1", "GRIDPAY_LEASE_RENEW_S": "0.9"})
    assert e.value.key == "lease.renew_s"


def test_relay_concurrency_is_read_and_bounded(tmp_path: Path) -> None:
    s = load_settings(env={})
    assert s.forwarder.concurrency == 64 and s.forwarder.batch == 256
    assert s.forwarder.pipeline == 32  # two connections
    f = tmp_path / "c.toml"
    f.write_text("[forwarder]\nconcurrency = 0\n")
    with pytest.raises(ConfigError) as e:
        load_settings(f, env={})
    assert e.value.key == "forwarder.concurrency" and "1 to 1000" in str(e.value)
    f.write_text("[forwarder]\npipeline = 257\n")
    with pytest.raises(ConfigError) as e:
        load_settings(f, env={})
    assert e.value.key == "forwarder.pipeline" and "1 to 256" in str(e.value)


def test_contradictory_or_ill_typed_settings_are_named(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[services]\ndb_pool_min = 50\ndb_pool_max = 4\n")
    with pytest.raises(ConfigError) as e:
        load_settings(f, env={})
    assert e.value.key == "services.db_pool_min" and "db_pool_max" in str(e.value)
    f.write_text('[[institutions]]\nid = "01020000"\ndialect = "bank"\n'
                 'allowed = ["127.0.0.0/8"]\ntransactions = [["payment"]]\n')
    with pytest.raises(ConfigError) as e:
        load_settings(f, env={})
    assert e.value.key == "institutions[0].transactions"
