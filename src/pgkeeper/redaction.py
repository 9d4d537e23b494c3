"""Text safe to send anywhere: no password, token or key in an error, alert, metric or event.

``redact`` is applied to every text that leaves the process (HTTP API errors, alert messages,
Prometheus labels, Prefect events, Sentry events): connection URLs lose their password,
``user:secret@`` userinfo and ``password=`` pairs are masked, and every secret the settings
hold (``secrets_of``) is replaced by ``***`` wherever it appears.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit

from pgkeeper.errors import PgkeeperError
from pgkeeper.postgres import ConnInfo, redact_url
from pgkeeper.settings import Settings

__all__ = ["redact", "secrets_of"]

_PG_URL_IN_TEXT = re.compile(r"postgres(?:ql)?://[^\s'\"<>]+")
_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)[^/\s@]+@", re.IGNORECASE)
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
# Shorter values would mangle ordinary words; the patterns above catch short passwords.
MIN_SECRET = 4
# A path segment or query value of a notification URL this long is a token (Slack's
# T000/B000/XXXX, a Telegram bot token, a healthchecks uuid).
MIN_TOKEN = 8
_WEB_SCHEMES = frozenset({"http", "https", "json", "jsons", "form", "forms", "xml", "xmls"})


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Text safe to send: connection URLs without passwords, no ``password=``, no userinfo,
    no secret from ``secrets`` (give the longest first, as ``secrets_of`` does)."""
    text = _PG_URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    text = _USERINFO.sub(r"\1***@", text)
    text = _PASSWORD_KV.sub(r"\1***", text)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _parts_of_url(value: str) -> set[str]:
    """The secret parts of a URL: its password, and each long path segment or query value
    (tokens of webhook URLs), each also percent-encoded and decoded."""
    found: set[str] = set()
    if "://" not in value:  # a libpq key=value conninfo
        try:
            password = ConnInfo.parse(value).params.get("password")
        except PgkeeperError:
            password = None
        return {password} if password else found
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return found
    candidates = [password or ""]
    if parts.scheme.startswith("postgres"):  # the database name and host are not secrets
        return {c for c in candidates if c} | {quote(password, safe="")} if password else found
    candidates += [p for p in parts.path.split("/") if len(p) >= MIN_TOKEN]
    for pair in parts.query.split("&"):
        name, _, item = pair.partition("=")
        if len(item) >= MIN_TOKEN and name.lower() not in {"from", "to", "cc", "bcc", "name"}:
            candidates.append(item)
    # slack://T000/B000/XXX, tgram://bottoken/ChatID: for many Apprise schemes the "host" is
    # itself a token (a real host name has a dot, or is one of the plain web schemes').
    host = parts.netloc.rsplit("@", 1)[-1].split(":", 1)[0]  # as written: tokens have case
    if len(host) >= MIN_TOKEN and "." not in host and parts.scheme not in _WEB_SCHEMES:
        candidates.append(host)
    for candidate in candidates:
        if candidate:
            found |= {candidate, unquote(candidate), quote(unquote(candidate), safe="")}
    return found


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """Every secret value the settings hold (longest first), to scrub from any text: each
    secret whole and, for URLs (DATABASE_URL, BACKUP_NOTIFY_URLS ...), their passwords and
    tokens alone."""
    found: set[str] = set()
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if not hasattr(value, "get_secret_value"):
            continue
        secret = value.get_secret_value()
        if not secret:
            continue
        found.add(secret)
        for item in secret.split(",") if "://" in secret else [secret]:
            item = item.strip()
            if item:
                found.add(item)
                if "://" in item or "=" in item:
                    found |= _parts_of_url(item)
    return tuple(sorted((s for s in found if len(s) >= MIN_SECRET), key=len, reverse=True))
