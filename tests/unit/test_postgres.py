"""PostgreSQL side without a server: redaction, credentials in the environment, client checks."""

from __future__ import annotations

import stat
from pathlib import Path

import psycopg
import pytest

from pgkeeper import postgres
from pgkeeper.backup import BackupOptions, _dump_argv
from pgkeeper.errors import (
    AuthenticationError,
    ClientVersionError,
    ConfigError,
    DatabaseMissingError,
    DatabaseUnavailableError,
)
from pgkeeper.postgres import ConnInfo, redact_url

SECRET = "s3cr3t-Pw"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cr3t-Pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgres://u:s3cr3t-Pw@h/db", "postgres://u:***@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h:5432/db", "postgresql://h:5432/db"),
        ("postgresql://u:s3cr3t-Pw@h1,h2:5433/db", "postgresql://u:***@h1,h2:5433/db"),
        ("postgresql://u:s3%40cr3t-Pw@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://u@h/db?sslmode=require&password=s3cr3t-Pw",
            "postgresql://u@h/db?sslmode=require&password=***",
        ),
        (
            "postgresql://u@h/db?password=s3cr3t-Pw&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        ("host=h password=s3cr3t-Pw dbname=db", "host=h password=*** dbname=db"),
        ("host=h password = s3cr3t-Pw dbname=db", "host=h password = *** dbname=db"),
        ("password=s3cr3t-Pw", "password=***"),
    ],
)
def test_redact_url_hides_the_password(url: str, shown: str) -> None:
    """Every way a password can be written in a URL or conninfo is replaced by ***."""
    assert redact_url(url) == shown
    assert SECRET not in redact_url(url)


@pytest.mark.parametrize(
    "url",
    [
        # libpq takes '#' and '?' in the userinfo literally: they are part of the password.
        "postgresql://u:s3cr3t#Pw@h/db",
        "postgresql://u:s3cr3t?Pw@h/db",
        # A quoted conninfo value may hold spaces.
        "host=h password='s3cr3t Pw' dbname=db",
        "host=h password='s3cr3t \\' Pw' dbname=db",
        "host=h password='s3cr3t Pw",
    ],
)
def test_redact_url_hides_passwords_with_special_characters(url: str) -> None:
    """No part of a password with '#', '?', spaces or quotes survives redaction."""
    shown = redact_url(url)
    assert "s3cr3t" not in shown
    assert "Pw" not in shown


def test_redact_url_keeps_an_empty_host_url_readable() -> None:
    """A socket URL without a host is shown with its `//` (still a URL a person can read)."""
    assert redact_url("postgresql:///db?host=/tmp&password=s3cr3t-Pw") == (
        "postgresql:///db?host=/tmp&password=***"
    )


def test_conninfo_env_carries_the_password_and_nothing_else_does() -> None:
    """The password goes to PGPASSWORD; repr and display never show it."""
    conn = ConnInfo.parse(f"postgresql://alice:{SECRET}@db.example:6543/shop?sslmode=require")
    env = conn.env({})
    assert env["PGPASSWORD"] == SECRET
    assert env["PGUSER"] == "alice"
    assert env["PGHOST"] == "db.example"
    assert env["PGPORT"] == "6543"
    assert env["PGDATABASE"] == "shop"
    assert env["PGSSLMODE"] == "require"
    assert SECRET not in repr(conn)
    assert SECRET not in conn.display()
    assert SECRET not in conn.server
    assert conn.server == "db.example:6543"
    assert conn.dbname == "shop"


def test_conninfo_env_keeps_the_base_environment() -> None:
    """The client's environment is the base plus the connection's PG* variables."""
    env = ConnInfo.parse("postgresql://u@h/db").env({"PATH": "/bin", "LANG": "C"})
    assert env["PATH"] == "/bin"
    assert env["PGAPPNAME"] == "pgkeeper"
    assert "PGPASSWORD" not in env


def test_keyword_conninfo_is_accepted() -> None:
    """A key=value conninfo parses like a URL."""
    conn = ConnInfo.parse(f"host=h port=5433 user=u password={SECRET} dbname=d")
    assert conn.env({})["PGPASSWORD"] == SECRET
    assert conn.server == "h:5433"


def test_dump_argv_holds_no_secret() -> None:
    """pg_dump's argv has neither the password nor the URL: they travel in the environment."""
    client = postgres.Client(Path("/usr/bin/pg_dump"), "15.8", 15)
    options = BackupOptions(tables=["public.a"], exclude_tables=["public.b"], schema_only=True)
    for fmt in ("custom", "plain", "directory"):
        argv = _dump_argv(client, fmt, "00000003-00000002-1", options)
        joined = " ".join(argv)
        assert SECRET not in joined
        assert "postgres://" not in joined and "postgresql://" not in joined
        assert "--no-password" in argv


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h/db?bogus_option=1",
        f"postgresql://u:{SECRET}@h/db?bogus_option=1",
        f"host=h password={SECRET} bogus_option=1",
    ],
)
def test_unknown_url_parameter_is_a_config_error(url: str) -> None:
    """A URL with a parameter libpq does not know is a one-line ConfigError without the password."""
    with pytest.raises(ConfigError) as info:
        ConnInfo.parse(url)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)
    assert SECRET not in str(info.value)


def test_malformed_url_is_a_config_error_without_the_password() -> None:
    """An unparseable conninfo says how a URL looks and never repeats the password."""
    with pytest.raises(ConfigError) as info:
        ConnInfo.parse(f"host=h password='{SECRET} dbname=x")
    assert SECRET not in str(info.value)
    assert "postgresql://user:password@host:5432/dbname" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://u:{SECRET}@h/db",
        f"postgresql+psycopg2://u:{SECRET}@h/db",
        f"postgrse://u:{SECRET}@h/db",
        f"https://u:{SECRET}@h/db",
    ],
)
def test_a_url_of_another_scheme_is_refused_without_its_password(url: str) -> None:
    """A URL that is not postgresql:// is a ConfigError (exit 2) naming the scheme, not the
    password: libpq's own message would quote the whole string."""
    with pytest.raises(ConfigError) as info:
        ConnInfo.parse(url)
    assert info.value.exit_code == 2
    assert SECRET not in str(info.value)
    assert url.split("://")[0] + "://u:***@h/db" in str(info.value)
    assert "postgresql://" in str(info.value)


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        # libpq reads the userinfo only up to the first '/': 's3cr3t' would become the port and
        # 'Pw@h/db' the database name.
        ("postgresql://u:s3cr3t/Pw@h/db", "%2F"),
        ("postgresql://u:s3cr3t/Pw@h:5432/db?sslmode=require", "%2F"),
        # With a second '@' libpq takes 'Pw@h' as the host.
        ("postgresql://u:s3cr3t@Pw@h/db", "%40"),
    ],
)
def test_a_password_with_an_unencoded_slash_or_at_says_to_percent_encode(
    url: str, hint: str
) -> None:
    """A '/' or '@' in a URL's password is refused with how to encode it, and no part of the
    password appears in the message (nor in the redacted URL)."""
    with pytest.raises(ConfigError) as info:
        ConnInfo.parse(url)
    text = str(info.value)
    assert hint in text
    assert "s3cr3t" not in text and "Pw" not in text
    assert "s3cr3t" not in redact_url(url) and "Pw" not in redact_url(url)


def test_a_percent_encoded_password_is_accepted() -> None:
    """The fix the error suggests works: %2F and %40 decode into the password."""
    conn = ConnInfo.parse("postgresql://u:s3cr3t%2FP%40w@h/db")
    assert conn.params["password"] == "s3cr3t/P@w"
    assert conn.display() == "postgresql://u@h:5432/db"


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("postgresql://u:pw@h:notaport/db", "port"),
        ("postgresql://u:pw@h:0/db", "port"),
        ("postgresql://u:pw@h:5432,h2:x/db", "port"),
        ("host=h port=abc", "port"),
        ("postgresql://u:pw@h/db?sslmode=bogus", "sslmode='bogus'"),
        ("postgresql://u:pw@h/db?connect_timeout=soon", "connect_timeout='soon'"),
        ("postgresql://u:pw@h/db?target_session_attrs=any-old", "target_session_attrs"),
    ],
)
def test_a_bad_port_or_option_value_is_a_bad_url_not_an_unreachable_server(
    url: str, names: str
) -> None:
    """Values libpq only rejects when connecting are a ConfigError (exit 2) naming the part."""
    with pytest.raises(ConfigError) as info:
        ConnInfo.parse(url)
    assert info.value.exit_code == 2
    assert names in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://u:{SECRET}@h/db",
        f"postgresql://u:{SECRET}/x@h/db",
        f"postgresql://u:{SECRET}@x@h/db",
        f"anything://user:{SECRET}@h",
        f"s3://key:{SECRET}@bucket/prefix",
    ],
)
def test_redact_url_hides_the_password_of_any_url_shape(url: str) -> None:
    """Whatever the scheme, and whatever '/' or '@' the password holds, none of it is shown."""
    assert SECRET not in redact_url(url)


def test_translate_connect_error_says_what_to_do() -> None:
    """Connection failures become the project's errors with a hint, and no password."""
    conn = ConnInfo.parse(f"postgresql://u:{SECRET}@h:5432/shop")
    auth = postgres.translate_connect_error(
        psycopg.OperationalError('FATAL:  password authentication failed for user "u"'), conn
    )
    assert isinstance(auth, AuthenticationError)
    assert "check the user and password" in str(auth)
    missing = postgres.translate_connect_error(
        psycopg.OperationalError('FATAL:  database "shop" does not exist'), conn
    )
    assert isinstance(missing, DatabaseMissingError)
    assert "'shop'" in str(missing)
    down = postgres.translate_connect_error(
        psycopg.OperationalError("connection refused"), conn
    )
    assert isinstance(down, DatabaseUnavailableError)
    assert "is the server running" in str(down)
    for error in (auth, missing, down):
        assert SECRET not in str(error)
        assert "\n" not in str(error)


def test_check_client_names_the_package_and_pg_bin_dir() -> None:
    """An old pg_dump is refused with the client package to install and PG_BIN_DIR."""
    client = postgres.Client(Path("/opt/pg12/bin/pg_dump"), "12.3", 12)
    with pytest.raises(ClientVersionError) as info:
        postgres.check_client(client, 15, "15.8")
    message = str(info.value)
    assert "postgresql-client-15" in message
    assert "PG_BIN_DIR" in message
    assert "12.3" in message
    assert info.value.exit_code == 2
    postgres.check_client(postgres.Client(Path("pg_dump"), "16.1", 16), 15, "15.8")  # newer is ok


def _fake_client(folder: Path, name: str, version_line: str) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def test_find_client_honours_pg_bin_dir(tmp_path: Path) -> None:
    """find_client uses PG_BIN_DIR only, and reads the version the binary prints."""
    _fake_client(tmp_path, "pg_dump", "pg_dump (PostgreSQL) 12.3")
    client = postgres.find_client("pg_dump", tmp_path)
    assert client.path == tmp_path / "pg_dump"
    assert client.version == "12.3"
    assert client.major == 12


def test_find_client_reads_debian_version_strings(tmp_path: Path) -> None:
    """A distribution suffix after the version does not confuse the version parser."""
    _fake_client(tmp_path, "pg_dump", "pg_dump (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)")
    client = postgres.find_client("pg_dump", tmp_path)
    assert client.major == 15


def test_find_client_missing_is_a_config_error(tmp_path: Path) -> None:
    """A PG_BIN_DIR without the binary says where it looked and what to set."""
    with pytest.raises(ConfigError) as info:
        postgres.find_client("pg_restore", tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "PG_BIN_DIR" in str(info.value)


def test_lock_key_is_stable_and_fits_int4() -> None:
    """The advisory lock key is the same in every process and fits PostgreSQL's int4."""
    key = postgres._lock_key("shop")
    assert key == postgres._lock_key("shop")
    assert -(2**31) <= key < 2**31
    assert key != postgres._lock_key("shop2")
