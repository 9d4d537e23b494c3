"""The API guard's parsers and the error clipping, without a server (see
tests/integration/test_api_security.py for the guard in front of the real app)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgkeeper.api import ERROR_CHARS, clip
from pgkeeper.api.guard import (
    allowed_hosts,
    is_loopback,
    is_own_origin,
    media_type,
    parse_authority,
)
from pgkeeper.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("LocalHost:8080", ("localhost", 8080)),
        ("localhost.", ("localhost", None)),
        ("127.0.0.1.:1", ("127.0.0.1", 1)),
        ("[0:0:0:0:0:0:0:1]:80", ("[::1]", 80)),
        ("[::FFFF:127.0.0.1]", ("[::ffff:7f00:1]", None)),
        ("backups.example.com:65535", ("backups.example.com", 65535)),
        ("under_score.internal", ("under_score.internal", None)),
    ],
)
def test_an_authority_is_normalised(value: str, parsed: tuple[str, int | None]) -> None:
    """Host names are lowercased without their trailing dot, addresses are canonical, IPv6
    stays in brackets, the port is a number."""
    assert parse_authority(value) == parsed


@pytest.mark.parametrize(
    "value",
    ["", ":80", "localhost:", "localhost:0", "localhost:65536", "localhost:+80", "localhost: 80",
     "localhost:\uff18\uff10", "[::1", "[::1]80", "::1", "[localhost]", "a..b", "-a.example", "a b",
     "127.1", "127.0.0.256", "0x7f.0.0.1", "1.2.3.4.5", "x" * 254, "user@host", "é.example"],
)  # fmt: skip
def test_a_malformed_authority_is_refused(value: str) -> None:
    """Anything that is not a host name or address with an optional port, including the IPv4
    shorthands a browser would read differently ("127.1"), parses to None."""
    assert parse_authority(value) is None


def test_loopback_is_localhost_127_slash_8_and_ipv6_loopback() -> None:
    """Loopback: localhost, 127.0.0.0/8, ::1 and its IPv4-mapped form; nothing else."""
    for host in ("localhost", "127.0.0.1", "127.255.0.9", "[::1]", "[::ffff:7f00:1]"):
        assert is_loopback(host), host
    for host in ("localhost.example", "128.0.0.1", "0.0.0.0", "[::]", "[fe80::1]", "10.0.0.1"):  # noqa: S104 - a host under test
        assert not is_loopback(host), host


def test_an_origin_is_own_when_it_names_the_requests_host_and_port() -> None:
    """The Origin's host and port (its scheme's default port meaning none) must equal the
    Host's; any path, userinfo or other scheme makes it foreign."""
    assert is_own_origin("http://127.0.0.1:8080", ("127.0.0.1", 8080))
    assert is_own_origin("HTTPS://Backups.Example.com", ("backups.example.com", None))
    assert is_own_origin("https://backups.example.com:443", ("backups.example.com", None))
    assert is_own_origin("http://backups.example.com", ("backups.example.com", 80))
    for origin in ("http://127.0.0.1", "http://localhost:8080", "http://127.0.0.1:8080/",
                   "ftp://127.0.0.1:8080", "null", "", "http://u@127.0.0.1:8080",
                   "https://127.0.0.1:8443"):  # fmt: skip
        assert not is_own_origin(origin, ("127.0.0.1", 8080)), origin
    assert not is_own_origin("https://backups.example.com", ("backups.example.com", 80))


def test_allowed_hosts_are_normalised_and_checked() -> None:
    """BACKUP_API_ALLOWED_HOSTS entries are normalised like a Host; one with a scheme, port,
    path or wildcard is a ConfigError naming the setting."""
    assert allowed_hosts([" Backups.Example.COM. ", "::1", "[FD00::5]", "10.0.0.5"]) == {
        "backups.example.com", "[::1]", "[fd00::5]", "10.0.0.5",
    }  # fmt: skip
    for entry in ("https://x.example", "x.example:443", "x.example/api", "*.example", ""):
        with pytest.raises(ConfigError, match="BACKUP_API_ALLOWED_HOSTS"):
            allowed_hosts([entry])


def test_a_media_type_drops_its_parameters_and_case() -> None:
    assert media_type("Application/JSON; charset=utf-8") == "application/json"
    assert media_type(" text/plain ") == "text/plain"


@given(st.text(max_size=3000))
def test_a_clipped_error_is_short_and_quotes_no_long_run(text: str) -> None:
    """Whatever an error message holds, clipped it is at most ERROR_CHARS long and has no run
    of more than 80 non-blank characters; a short message with short words is unchanged."""
    clipped = clip(text)
    assert len(clipped) <= ERROR_CHARS
    assert not re.search(r"\S{81}", clipped)
    if len(text) <= ERROR_CHARS and not re.search(r"\S{81}", text):
        assert clipped == text


def test_clipping_keeps_both_ends_of_a_long_input() -> None:
    """A long quoted input keeps its start, its end (the closing quote) and the advice after
    it."""
    clipped = clip(f"backup name '{'a' * 500}z' is not allowed (use 1-63 letters)")
    assert clipped.startswith("backup name 'aaaa")
    assert "…" in clipped and "az' is not allowed (use 1-63 letters)" in clipped
