"""What every HTTP request meets before the API's routes see it: Host, Origin, token, body.

An ASGI middleware (``RequestGuard``), so it runs before FastAPI reads or parses any body
(FastAPI parses a JSON body *before* a route's dependencies run, so a token check there comes
too late). In order, each step refusing with one line in the API's error shape:

1. **Host** (DNS rebinding: a web page whose name now resolves to 127.0.0.1). A missing,
   repeated or malformed Host is 400. Without a token, or when ``BACKUP_API_ALLOWED_HOSTS`` is
   set, only loopback hosts (``localhost``, ``127.x.y.z``, ``[::1]``) and the listed ones are
   served; any other gets **421 Misdirected Request**: RFC 9110 §15.5.20 defines it for a
   request "directed at a server that is unable or unwilling to produce an authoritative
   response for the target URI", which is exactly a Host this server does not answer for
   (400 would say the request itself is malformed; it is not).
2. **Origin** (cross-site requests): a browser sends it on every cross-origin request and on
   same-origin POSTs; when present it must be this API's own origin (``scheme://Host``), else
   403. ``null`` is refused. No CORS header is ever sent, so no preflight ever succeeds.
3. **Token**: the route's role (open, read, admin) against ``Authorization: Bearer``; 401/403.
   A client (by address) whose tokens keep failing is slowed down (``FailedTokens``): after a
   few failures each of its requests waits for a slot, spaced ever wider (to 8 s), before its
   token is even looked at, so guessing runs at one try per slot however many connections it
   opens; 429 once its queue is a minute long; a correct token clears its record.
4. **Body**: routes taking a body accept only their content types (415): ``application/json``
   for the JSON routes (a cross-site "simple request" cannot send it without a preflight) and
   the dump types for an import (none is CORS-safelisted). A declared length over the route's
   limit is 413 before a byte is read; a JSON body is read here, at most ``MAX_JSON_BYTES`` of
   it (413 as soon as it passes that, whatever Content-Length claimed), and handed on whole.

An error answer to a request that carries a body, and any answer to a body its route does not
take, says ``Connection: close``: the server (uvicorn reads and discards the rest of an unread
body to keep a connection) then drops the connection instead of reading what it refused.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from fastapi.security.utils import get_authorization_scheme_param
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgkeeper.errors import ConfigError, PgkeeperError

Role = Literal["open", "read", "admin"]

MAX_JSON_BYTES = 1024 * 1024  # a JSON request is a few fields; 1 MiB is far more than any needs
JSON_TYPES = frozenset({"application/json"})
# What an import may be sent as: the generic binary type, or one naming the dump's encoding.
# None is one of the three CORS-safelisted types (text/plain, multipart/form-data,
# application/x-www-form-urlencoded), so a cross-site page cannot send them without a preflight.
DUMP_TYPES = frozenset(
    {
        "application/octet-stream",
        "application/gzip",
        "application/x-gzip",
        "application/zstd",
        "application/sql",
        "application/x-tar",
    }
)
DEFAULT_PORTS = {"http": 80, "https": 443}


class GuardError(PgkeeperError):
    """An error of the HTTP front door with its own status: the guard's refusals (400, 401,
    403, 413, 415, 421) and the API's 404 for unknown runs and routes."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.http_status = status


# --- hosts --------------------------------------------------------------------------------------

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# WHATWG URL parsing reads a host whose last label is a number ("127.1", "0x7f.0.0.1") as an
# IPv4 address in shorthand; only the dotted-quad spelling is accepted, the rest is refused as
# ambiguous rather than guessed at.
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
_PORT = re.compile(r"[0-9]{1,5}")


def host_name(text: str) -> str | None:
    """``text`` as a normalised host (lowercase, no trailing dot, canonical address; IPv6 in
    brackets), or None when it is no host name or address."""
    if text.startswith("["):
        if not text.endswith("]"):
            return None
        try:
            return f"[{ipaddress.IPv6Address(text[1:-1]).compressed}]"
        except ValueError:
            return None
    text = text.lower()
    if text.endswith("."):  # a fully qualified name: the same name, from the same DNS zone
        text = text[:-1]
    if not text or len(text) > 253:
        return None
    if _NUMERIC_LABEL.fullmatch(text.rsplit(".", 1)[-1]):
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            return None
    return text if _NAME.fullmatch(text) else None


def parse_authority(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` (a Host header, an Origin's authority) as (normalised host, port), or
    None when it is malformed."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host_text, rest = value[: end + 1], value[end + 1 :]
    else:
        host_text, colon, port_text = value.partition(":")
        rest = colon + port_text
    host = host_name(host_text)
    if host is None:
        return None
    if not rest:
        return host, None
    if not rest.startswith(":") or not _PORT.fullmatch(rest[1:]):
        return None
    port = int(rest[1:])
    return (host, port) if 0 < port < 65536 else None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1, ::ffff:127.x)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def allowed_hosts(entries: list[str]) -> frozenset[str]:
    """BACKUP_API_ALLOWED_HOSTS normalised; raise ConfigError for an entry that is no host."""
    found: set[str] = set()
    for entry in entries:
        text = entry.strip()
        if ":" in text and not text.startswith("["):
            text = f"[{text}]"  # a bare IPv6 address; "name:port" fails as one below
        host = host_name(text)
        if host is None:
            raise ConfigError(
                f"BACKUP_API_ALLOWED_HOSTS entry {entry.strip()[:80]!r} is not a host name or "
                "address (list names like backups.example.com, without scheme, port or path)"
            )
        found.add(host)
    return frozenset(found)


@dataclass(frozen=True)
class HostRule:
    """Which Host headers are served: when ``enforced``, loopback ones and ``allowed``."""

    allowed: frozenset[str]
    enforced: bool

    def check(self, values: list[str]) -> tuple[str, int | None]:
        """The request's (host, port); raise GuardError 400 (malformed) or 421 (not ours)."""
        if not values:
            raise GuardError("the request has no Host header (send Host: 127.0.0.1:<port>)", 400)
        if len(values) > 1:
            raise GuardError("the request has more than one Host header (send one)", 400)
        parsed = parse_authority(values[0])
        if parsed is None:
            raise GuardError(
                f"Host {values[0][:80]!r} is not a host name or address with an optional port",
                400,
            )
        host = parsed[0]
        if self.enforced and not is_loopback(host) and host not in self.allowed:
            raise GuardError(
                f"this API does not answer for host {host!r} (it serves localhost, 127.0.0.1 and "
                "[::1]; add other names to BACKUP_API_ALLOWED_HOSTS)",
                421,
            )
        return parsed


# --- origins --------------------------------------------------------------------------------------

_ORIGIN = re.compile(r"(https?)://([^/?#@\s]+)", re.IGNORECASE)


def is_own_origin(origin: str, host: tuple[str, int | None]) -> bool:
    """True when ``origin`` is ``scheme://`` + the request's own Host (default ports equal to
    none). The scheme is not compared: behind a TLS proxy the API sees http while the page is
    https, and only this server answers on its host and port under either scheme."""
    match = _ORIGIN.fullmatch(origin)
    if match is None:
        return False
    parsed = parse_authority(match.group(2))
    if parsed is None:
        return False
    default = DEFAULT_PORTS[match.group(1).lower()]

    def port(value: int | None) -> int | None:
        return None if value == default else value

    return parsed[0] == host[0] and port(parsed[1]) == port(host[1])


# --- tokens ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    """The configured bearer tokens; with none configured every request is admin."""

    admin: bytes | None = field(default=None, repr=False)
    read: bytes | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.admin is not None or self.read is not None

    def role_of(self, scheme: str | None, credentials: str | None) -> Literal["admin", "read"]:
        """'admin' or 'read', or raise GuardError 401. Both tokens are always compared, in
        constant time."""
        if not self.enabled:
            return "admin"
        if not scheme or not credentials or scheme.lower() != "bearer":
            raise GuardError(
                "missing bearer token (send 'Authorization: Bearer <BACKUP_API_TOKEN>')", 401
            )
        # The header's bytes as sent (ASGI servers decode header values as latin-1), so a
        # token with non-ASCII characters compares as the UTF-8 the client sent.
        given = credentials.encode("latin-1", "replace")
        is_admin = self.admin is not None and hmac.compare_digest(given, self.admin)
        is_reader = self.read is not None and hmac.compare_digest(given, self.read)
        if is_admin:
            return "admin"
        if is_reader:
            return "read"
        raise GuardError("invalid bearer token (check BACKUP_API_TOKEN)", 401)

    def require(self, needed: Role, scheme: str | None, credentials: str | None) -> None:
        """Raise GuardError 401/403 unless the credentials may do what ``needed`` allows."""
        if needed == "open":
            return
        if self.role_of(scheme, credentials) != "admin" and needed == "admin":
            raise GuardError(
                "the read-only token cannot change backups (use BACKUP_API_TOKEN)", 403
            )


@dataclass
class FailedTokens:
    """Slows down a client that keeps sending wrong tokens (someone guessing them).

    Per client address: the first ``free`` failures within ``window`` seconds cost nothing;
    after that every request from the client (right token or not: a guesser could otherwise
    give up on a slow answer) is given the next free slot, slots spaced ``base`` seconds
    doubling with each further failure up to ``cap``; a client that would wait more than
    ``max_wait`` is answered 429 at once. A correct token clears the client's record. At most
    ``clients`` addresses are remembered (the oldest are forgotten), so memory stays bounded.
    Behind a reverse proxy every client has the proxy's address: a guesser then slows
    everyone down, which is the safe way round.
    """

    free: int = 5
    base: float = 0.25
    cap: float = 8.0
    window: float = 600.0
    max_wait: float = 60.0
    clients: int = 10_000
    clock: Callable[[], float] = time.monotonic
    _seen: OrderedDict[str, list[float]] = field(default_factory=OrderedDict)

    def wait(self, client: str) -> float:
        """Seconds this request must wait before its token is checked (a slot is reserved);
        raise GuardError 429 when the client's queue is too long."""
        record = self._record(client)
        if record is None:
            return 0.0
        failures, _, next_slot = record
        if failures < self.free:
            return 0.0
        now = self.clock()
        slot = max(now, next_slot)
        if slot - now > self.max_wait:
            raise GuardError(
                f"too many failed tokens from this client: wait {slot - now:.0f} s "
                "(check BACKUP_API_TOKEN)",
                429,
            )
        spacing = min(self.base * 2 ** (failures - self.free), self.cap)
        self._seen[client][2] = slot + spacing
        return slot - now

    def failed(self, client: str) -> None:
        record = self._record(client)
        now = self.clock()
        if record is None:
            self._seen[client] = [1, now, now]
            while len(self._seen) > self.clients:
                self._seen.popitem(last=False)
            return
        record[0] += 1
        record[1] = now
        self._seen.move_to_end(client)

    def succeeded(self, client: str) -> None:
        self._seen.pop(client, None)

    def _record(self, client: str) -> list[float] | None:
        record = self._seen.get(client)
        if record is not None and self.clock() - record[1] > self.window:
            del self._seen[client]  # its failures are old news
            return None
        return record


def client_of(scope: Scope) -> str:
    """The client's address (what ``FailedTokens`` counts by)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


# --- routes: who may call them, what body they take -----------------------------------------------


@dataclass(frozen=True)
class BodyRule:
    """The request body a route takes."""

    types: frozenset[str]
    limit: int  # bytes
    buffered: bool  # read whole here (JSON) or streamed by the route (an import)
    wanted: str  # the 415 message's advice
    too_large: str  # the 413 message


@dataclass(frozen=True)
class Access:
    """What a route needs: a role, and the body rule when it takes a body."""

    role: Role
    body: BodyRule | None = None


def json_body(what: str) -> BodyRule:
    return BodyRule(
        types=JSON_TYPES,
        limit=MAX_JSON_BYTES,
        buffered=True,
        wanted=f"{what} takes a JSON body (send Content-Type: application/json)",
        too_large=f"the request body is larger than 1 MiB ({what} takes a few JSON fields)",
    )


def media_type(value: str) -> str:
    """``type/subtype`` of a Content-Type value, lowercase, without parameters."""
    return value.split(";", 1)[0].strip().lower()


# --- the middleware -------------------------------------------------------------------------------


def _headers(scope: Scope, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == name]


class _Gone(Exception):
    """The client disconnected while its body was being read."""


@dataclass
class RequestGuard:
    """ASGI middleware applying the module's rules before the app sees a request."""

    app: ASGIApp
    hosts: HostRule
    tokens: Tokens
    access_of: Callable[[Scope], Access]
    render: Callable[[PgkeeperError], Response]
    failures: FailedTokens = field(default_factory=FailedTokens)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        has_body = _has_body(scope)
        try:
            receive, access = await self._admit(scope, receive)
        except _Gone:
            return
        except PgkeeperError as exc:
            await self.render(exc)(scope, receive, _closing(send) if has_body else send)
            return
        if has_body:
            # A body its route never reads (a GET's), or one the route refuses, is not worth
            # reading to the end just to keep the connection.
            send = _closing(send, errors_only=access.body is not None)
        await self.app(scope, receive, send)

    async def _admit(self, scope: Scope, receive: Receive) -> tuple[Receive, Access]:
        """Check the request; return the receive the app should read the body from."""
        host = self.hosts.check(_headers(scope, b"host"))
        origins = _headers(scope, b"origin")
        if len(origins) > 1:
            raise GuardError("the request has more than one Origin header", 400)
        if origins and not is_own_origin(origins[0], host):
            raise GuardError(
                f"requests from other web origins are refused (Origin {origins[0][:80]!r} is "
                "not this API's own; call the API directly, not from a web page)",
                403,
            )
        access = self.access_of(scope)
        _one_of_each(scope.get("query_string", b""))
        authorization = _headers(scope, b"authorization")
        scheme, credentials = get_authorization_scheme_param(
            authorization[0] if authorization else None
        )
        if access.role != "open" and self.tokens.enabled:
            client = client_of(scope)
            delay = self.failures.wait(client)
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                self.tokens.require(access.role, scheme, credentials)
            except GuardError as exc:
                if exc.http_status == 401:
                    self.failures.failed(client)
                raise
            self.failures.succeeded(client)
        rule = access.body
        if rule is None:
            return receive, access
        types = _headers(scope, b"content-type")
        if len(types) > 1:
            raise GuardError("the request has more than one Content-Type header", 400)
        if not types or media_type(types[0]) not in rule.types:
            got = repr(types[0][:60]) if types else "none"
            raise GuardError(f"{rule.wanted}; got Content-Type {got}", 415)
        lengths = _headers(scope, b"content-length")
        if lengths:
            if len(set(lengths)) > 1 or not lengths[0].strip().isdigit():
                raise GuardError("the request's Content-Length is malformed", 400)
            if int(lengths[0]) > rule.limit:
                raise GuardError(rule.too_large, 413)  # before a byte of the body is read
        if not rule.buffered:
            return receive, access
        return _replay(await _read_capped(receive, rule), receive), access


def _has_body(scope: Scope) -> bool:
    lengths = _headers(scope, b"content-length")
    if lengths:
        return lengths[0].strip() not in ("", "0")
    return bool(_headers(scope, b"transfer-encoding"))


def _closing(send: Send, errors_only: bool = False) -> Send:
    """``send`` adding ``Connection: close`` to the answer (or to an error answer only), so
    the server drops the connection rather than read the rest of a body nobody will use."""

    async def closing(message: Message) -> None:
        start = message["type"] == "http.response.start"
        if start and (message["status"] >= 400 or not errors_only):
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return closing


async def _read_capped(receive: Receive, rule: BodyRule) -> bytes:
    """The whole body, or GuardError 413 as soon as it passes ``rule.limit``."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone
        body += message.get("body", b"")
        if len(body) > rule.limit:
            raise GuardError(rule.too_large, 413)
        if not message.get("more_body", False):
            return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the real receive."""
    pending = [body]

    async def replay() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replay


__all__ = [
    "DUMP_TYPES", "MAX_JSON_BYTES", "Access", "BodyRule", "FailedTokens", "GuardError", "HostRule",
    "RequestGuard", "Tokens", "allowed_hosts", "host_name", "is_loopback", "is_own_origin",
    "json_body", "media_type", "parse_authority",
]  # fmt: skip


def _one_of_each(query: bytes) -> None:
    """A query parameter given twice (``?database=a&database=b``) is ambiguous: the API would
    silently take one. Refuse it (400) naming the parameter."""
    from urllib.parse import parse_qsl

    seen: set[str] = set()
    for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name in seen:
            raise GuardError(
                f"query parameter {name[:40]!r} is given more than once (give it once)", 400
            )
        seen.add(name)
