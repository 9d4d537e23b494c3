"""Where test alerts land: a real SMTP server (aiosmtpd) and an HTTP webhook receiver.

Both run in threads of the test process on free ports of 127.0.0.1, and record what they got,
so a test can wait for a delivery made by any process (the CLI, a flow, the Prefect server).
The SMTP server accepts AUTH PLAIN/LOGIN without TLS, with one user, so the tests can put a
password in a ``mailto://`` URL and check it appears in nothing that was delivered.
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from . import free_port

SMTP_USER = "alerts"
SMTP_PASSWORD = "smtp-Pa55-planted-9d1c"


@dataclass
class Mail:
    """One received e-mail: envelope, subject and plain-text body; ``raw`` is everything."""

    sender: str
    recipients: list[str]
    subject: str
    body: str
    raw: str


class _Inbox:
    def __init__(self) -> None:
        self._items: list[Any] = []
        self._cond = threading.Condition()

    def add(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def items(self) -> list[Any]:
        with self._cond:
            return list(self._items)

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def wait_for(self, predicate: Callable[[Any], bool], timeout: float) -> Any:
        """The first item matching ``predicate``, waiting up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self._items:
                    if predicate(item):
                        return item
                left = deadline - time.monotonic()
                if left <= 0:
                    got = self._items
                    raise TimeoutError(f"nothing matching arrived within {timeout}s: {got!r}")
                self._cond.wait(left)


class SmtpServer(_Inbox):
    """aiosmtpd on a free port; ``url(to)`` is the Apprise mailto:// URL that reaches it."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self._controller: Any = None

    def start(self) -> Self:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        inbox = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                raw = envelope.content.decode("utf8", errors="replace")
                parsed = email.message_from_string(raw, policy=email.policy.default)
                assert isinstance(parsed, EmailMessage)
                part = parsed.get_body(preferencelist=("plain", "html"))
                body = part.get_content() if part is not None else ""
                inbox.add(Mail(envelope.mail_from, list(envelope.rcpt_tos),
                               str(parsed["subject"] or ""), body, raw))  # fmt: skip
                return "250 OK"

        def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                         auth_data: Any) -> AuthResult:  # fmt: skip
            ok = auth_data.login == SMTP_USER.encode() and (
                auth_data.password == SMTP_PASSWORD.encode()
            )
            return AuthResult(success=ok)

        self.port = free_port(self.host)
        self._controller = Controller(
            Handler(), hostname=self.host, port=self.port, authenticator=authenticate,
            auth_require_tls=False, auth_required=False,
        )  # fmt: skip
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def url(self, to: str = "ops@example.com", auth: bool = True) -> str:
        """The Apprise URL of this server (plain SMTP, AUTH with the planted password)."""
        who = f"{SMTP_USER}:{SMTP_PASSWORD}@" if auth else ""
        return f"mailto://{who}{self.host}:{self.port}?from=pgkeeper@example.com&to={to}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Hook:
    """One received webhook call: path, headers and the JSON body (None if it was not JSON)."""

    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes


class WebhookReceiver(_Inbox):
    """An HTTP server answering every POST with ``status`` and recording it."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self.status = 200
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> Self:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                receiver.add(Hook(self.path, dict(self.headers), body, raw))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str = "/hook") -> str:
        """The Apprise json:// URL posting here."""
        return f"json://{self.host}:{self.port}{path}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
