"""A fault-injecting HTTP/1.1 reverse proxy for storage tests (asyncio, standard library only).

Put it between an SDK and a test server to see how code behaves when the network or the
provider misbehaves::

    proxy = FaultProxy("127.0.0.1", s3_server.port, flavor="s3").start()
    proxy.add_fault(method="PUT", path=r"partNumber=", action="503", times=2)
    client = s3_server.client(endpoint_url=proxy.url)   # ... two part uploads get 503
    assert [e.status for e in proxy.requests if e.fault] == [503, 503]

Actions, applied to the next `times` requests whose method and target (path + query) match:
- "503" / "error": read and discard the request body, answer `status` (default 503) with an
  S3-style XML error (`flavor="s3"`, `<Code>SlowDown</Code>`, or `code`) or a GCS-style JSON error
  (`flavor="gcs"`); the connection stays usable, as with a real provider.
- "reset": abort the client connection with a TCP RST right after the request head, without
  forwarding anything upstream.
- "reset_after": forward the request (upstream applies it), then reset instead of answering:
  the write happened but the client sees a network error.
- "truncate": forward, send the upstream status and headers (full Content-Length) and only
  `truncate_at` body bytes (default: half the body), then close the connection.
- "delay": sleep `delay` seconds, then forward normally. `delay` also works with every other
  action (sleep first, then misbehave).

Transport, as a real reverse proxy does it: the two sides are separate hops. Towards clients
the proxy speaks HTTP/1.1 with keep-alive (moto and the GCS emulator close the connection
after every response, real S3 and GCS do not, so SDK connection pools get exercised here);
towards the upstream every request uses a fresh connection with `Connection: close`.
`Content-Length` and `Transfer-Encoding: chunked` bodies are streamed through unchanged in both
directions (aws-chunked and GCS resumable chunks included). `Expect: 100-continue` is answered
by the proxy itself and not forwarded. The `Host` header is kept, so signatures stay valid
and servers that build URLs from it (GCS resumable sessions) keep pointing at the proxy.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass
from http import HTTPStatus

_READ = 64 * 1024
# Hop-by-hop headers (RFC 9110 7.6.1): they describe one connection, never forwarded.
_HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "expect")
ACTIONS = frozenset({"503", "error", "reset", "reset_after", "truncate", "delay"})


@dataclass
class Fault:
    """A rule: which requests it hits, what it does, how many times it may still fire."""

    action: str
    method: str | None = None
    path: str | None = None
    times: int | None = 1  # None: every matching request, forever
    status: int = 503
    delay: float = 0.0
    truncate_at: int | None = None
    code: str | None = None  # the S3 error code of "error" answers (default: from the status)
    fired: int = 0

    def take(self, method: str, target: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        if self.path is not None and re.search(self.path, target) is None:
            return False
        self.fired += 1
        return True


@dataclass(frozen=True)
class Exchange:
    """One request seen by the proxy. `status` is None when the client got no response.

    Recorded just before the answer goes out, so it is in the log by the time the client
    has read its response.
    """

    method: str
    path: str
    status: int | None
    fault: str | None = None


class _Truncated(Exception):
    pass


class _Head:
    """A parsed request or response head: start line and headers in order."""

    def __init__(self, start: str, headers: list[tuple[str, str]]) -> None:
        self.start = start
        self.headers = headers

    def get(self, name: str) -> str | None:
        found = [v for k, v in self.headers if k.lower() == name.lower()]
        return found[-1] if found else None

    def without(self, *names: str) -> _Head:
        drop = {n.lower() for n in names}
        return _Head(self.start, [(k, v) for k, v in self.headers if k.lower() not in drop])

    def with_header(self, name: str, value: str) -> _Head:
        return _Head(self.start, [*self.without(name).headers, (name, value)])

    def encode(self) -> bytes:
        lines = [self.start, *(f"{k}: {v}" for k, v in self.headers), "", ""]
        return "\r\n".join(lines).encode("latin-1")

    def keep_alive(self, version: str) -> bool:
        conn = (self.get("connection") or "").lower()
        if version.upper() == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn

    def body_framing(self) -> tuple[str, int]:
        """("chunked", 0), ("length", n) or ("eof", 0) when the body runs to connection close."""
        if "chunked" in (self.get("transfer-encoding") or "").lower():
            return "chunked", 0
        length = self.get("content-length")
        if length is not None:
            return "length", int(length)
        return "eof", 0


async def _read_head(reader: asyncio.StreamReader) -> _Head | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None  # clean close between two requests
        raise
    start, *lines = raw.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return _Head(start, headers)


class _Out:
    """Writes to a stream (or nowhere), raising _Truncated once `budget` bytes are out."""

    def __init__(self, writer: asyncio.StreamWriter | None, budget: int | None = None) -> None:
        self.writer = writer
        self.budget = budget

    async def write(self, data: bytes) -> None:
        if self.writer is None:
            return
        if self.budget is not None and len(data) >= self.budget:
            self.writer.write(data[: self.budget])
            await self.writer.drain()
            raise _Truncated
        if self.budget is not None:
            self.budget -= len(data)
        self.writer.write(data)
        await self.writer.drain()


async def _relay_exact(reader: asyncio.StreamReader, out: _Out, size: int) -> None:
    while size:
        data = await reader.read(min(_READ, size))
        if not data:
            raise ConnectionError("peer closed the connection mid-body")
        await out.write(data)
        size -= len(data)


async def _relay_body(reader: asyncio.StreamReader, out: _Out, framing: tuple[str, int]) -> None:
    kind, length = framing
    if kind == "length":
        await _relay_exact(reader, out, length)
    elif kind == "eof":
        while data := await reader.read(_READ):
            await out.write(data)
    else:  # chunked: copy the framing as is, parsing it only to find the end
        while True:
            line = await reader.readuntil(b"\r\n")
            await out.write(line)
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:  # last chunk, then optional trailers and an empty line
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    await out.write(trailer)
                await out.write(trailer)
                return
            await _relay_exact(reader, out, size + 2)  # data and its CRLF


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Reverse proxy on 127.0.0.1 in a background thread; see the module docstring."""

    host = "127.0.0.1"

    def __init__(self, upstream_host: str, upstream_port: int, flavor: str = "s3") -> None:
        if flavor not in ("s3", "gcs"):
            raise ValueError(f"unknown flavor {flavor!r} (use 's3' or 'gcs')")
        self.upstream = (upstream_host, upstream_port)
        self.flavor = flavor
        self.port = 0
        self.connections = 0  # client connections accepted: shows whether keep-alive worked
        self.errors: list[str] = []  # unexpected proxy-side errors, for debugging
        self._faults: list[Fault] = []
        self._log: list[Exchange] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- control (any thread) ----------------------------------------------------------------
    def add_fault(
        self,
        action: str,
        method: str | None = None,
        path: str | None = None,
        times: int | None = 1,
        status: int = 503,
        delay: float = 0.0,
        truncate_at: int | None = None,
        code: str | None = None,
    ) -> Fault:
        """Add a rule (checked in the order added); returns it, `fault.fired` counts hits."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r} (one of {sorted(ACTIONS)})")
        if path is not None:
            re.compile(path)
        fault = Fault(action, method, path, times, status, delay, truncate_at, code)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Drop every fault rule and the request log."""
        with self._lock:
            self._faults.clear()
            self._log.clear()

    @property
    def requests(self) -> list[Exchange]:
        """A copy of the request log, in the order the answers were sent."""
        with self._lock:
            return list(self._log)

    def start(self) -> FaultProxy:
        """Listen on a free port of 127.0.0.1 and serve from a daemon thread; returns self."""
        if self._loop is not None:
            return self
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="faultproxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), loop).result(10)
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Close the listener and every connection, stop the thread. Idempotent."""
        atexit.unregister(self.stop)
        loop, self._loop = self._loop, None
        if loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- event loop side ---------------------------------------------------------------------
    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._on_client, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _take_fault(self, method: str, target: str) -> Fault | None:
        with self._lock:
            return next((f for f in self._faults if f.take(method, target)), None)

    def _record(self, method: str, target: str, status: int | None, fault: str | None) -> None:
        with self._lock:
            self._log.append(Exchange(method, target, status, fault))

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # a client or upstream went away: nothing to answer
        except Exception as exc:  # keep the proxy alive; tests can inspect .errors
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; returns whether the client connection stays open."""
        head = await _read_head(reader)
        if head is None:
            return False
        method, target, version = head.start.split(" ", 2)
        keep_alive = head.keep_alive(version)
        fault = self._take_fault(method, target)
        action = fault.action if fault else None
        if fault and fault.delay:
            await asyncio.sleep(fault.delay)
        if action == "reset":
            self._record(method, target, None, action)
            _abort(writer)
            return False
        if (head.get("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        head = head.without(*_HOP_BY_HOP).with_header("Connection", "close")
        if fault and action in ("503", "error"):
            await _relay_body(reader, _Out(None), _request_framing(head))
            self._record(method, target, fault.status, action)
            writer.write(self._error_response(fault.status, keep_alive, fault.code))
            await writer.drain()
            return keep_alive

        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            up_writer.write(head.encode())
            await _relay_body(reader, _Out(up_writer), _request_framing(head))
            while True:  # skip interim 1xx answers (Expect was answered already)
                resp = await _read_head(up_reader)
                if resp is None:
                    raise ConnectionError("upstream closed without answering")
                status = int(resp.start.split(" ", 2)[1])
                if status >= 200:
                    break
            if action == "reset_after":
                self._record(method, target, None, action)
                _abort(writer)
                return False
            framing = _response_framing(method, status, resp)
            # A body that runs to connection close can only be passed on the same way.
            keep_alive = keep_alive and framing[0] != "eof"
            resp = _Head("HTTP/1.1 " + resp.start.split(" ", 1)[1], resp.headers)
            resp = resp.without(*_HOP_BY_HOP).with_header(
                "Connection", "keep-alive" if keep_alive else "close"
            )
            self._record(method, target, status, action)
            writer.write(resp.encode())
            out = _Out(writer)
            if action == "truncate":
                out.budget = _truncate_budget(fault, framing)
            try:
                await _relay_body(up_reader, out, framing)
            except _Truncated:
                return False
            await writer.drain()
            return keep_alive
        finally:
            up_writer.close()

    def _error_response(self, status: int, keep_alive: bool, code: str | None = None) -> bytes:
        phrase = HTTPStatus(status).phrase
        if self.flavor == "s3":
            code = code or {503: "SlowDown", 500: "InternalError"}.get(
                status, phrase.replace(" ", "")
            )
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{phrase} (injected by FaultProxy)"
                "</Message><RequestId>faultproxy</RequestId></Error>"
            ).encode()
            ctype = "application/xml"
        else:
            message = f"{phrase} (injected by FaultProxy)"
            error = {"code": status, "message": message, "errors": [{"message": message}]}
            body = json.dumps({"error": error}).encode()
            ctype = "application/json; charset=UTF-8"
        head = [
            f"HTTP/1.1 {status} {phrase}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
            "",
            "",
        ]
        return "\r\n".join(head).encode("latin-1") + body


def _request_framing(head: _Head) -> tuple[str, int]:
    kind, length = head.body_framing()
    return ("length", 0) if kind == "eof" else (kind, length)  # no length: no request body


def _response_framing(method: str, status: int, head: _Head) -> tuple[str, int]:
    if method.upper() == "HEAD" or status in (204, 304):
        return "length", 0
    return head.body_framing()


def _truncate_budget(fault: Fault | None, framing: tuple[str, int]) -> int:
    kind, length = framing
    wanted = fault.truncate_at if fault and fault.truncate_at is not None else None
    if kind == "length":
        # Never the full length, or the "truncated" response would be complete.
        return max(0, min(wanted if wanted is not None else length // 2, length - 1))
    return wanted if wanted is not None else 1024
