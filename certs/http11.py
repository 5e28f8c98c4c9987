"""Just enough HTTP/1.1 for the identity protocol, on asyncio streams, framed by llhttp.

Theory of operation. Both directions parse with ``httptools`` (llhttp), which enforces the
framing rules (Content-Length vs chunked, no smuggling shapes); its callbacks only record,
and the loops here hand out what was recorded after each ``feed_data``.

* Server side, :class:`RequestReader` yields whole requests (pipelined ones queue up), with
  a bound on the head and on the body, and an idle timeout between requests. A request that
  breaks a bound or the grammar raises :class:`BadRequest` carrying the status to answer.
* Client side, :class:`ClientConnection` opens one connection (TLS when given a context),
  exposes the local address (the identity client puts it in its CSR), sends one request with
  ``Connection: close`` and reads one response whole. Every failure is a
  :class:`ClientError` whose message names the peer and what went wrong.

JSON is the only body type: :func:`json_response` builds a complete response.
"""

from __future__ import annotations

import asyncio
import json
import ssl as _ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httptools

MAX_HEAD = 16 * 1024
_READ = 65536
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            413: "Content Too Large", 415: "Unsupported Media Type",
            431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


class BadRequest(Exception):
    """The client sent something we cannot take; answer ``status`` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ClientError(Exception):
    """A client request failed; the message names the peer and the reason."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Recorder:
    """llhttp callbacks: record heads and bodies of messages as they complete."""

    max_body: int
    parser: Any = None
    url: bytes = b""
    method: str = ""
    keep_alive: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    head_done: bool = False
    started: bool = False
    too_big: bool = False
    done: deque[tuple[str, bytes, dict[str, str], bytes, bool]] = field(
        default_factory=deque)

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body, self.head_done = b"", {}, bytearray(), False
        self.started = True

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.head_done = True
        if isinstance(self.parser, httptools.HttpRequestParser):
            self.method = self.parser.get_method().decode("latin-1")
            self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > self.max_body:
            self.too_big = True
        else:
            self.body += body

    def on_message_complete(self) -> None:
        self.started = False
        self.done.append((self.method, self.url, self.headers, bytes(self.body),
                          self.keep_alive))


class RequestReader:
    """Whole requests from one server-side connection."""

    def __init__(self, reader: asyncio.StreamReader, *, max_body: int) -> None:
        self._reader = reader
        self._rec = _Recorder(max_body)
        self._parser = httptools.HttpRequestParser(self._rec)
        self._rec.parser = self._parser
        self._max_body = max_body
        self._head_bytes = 0

    async def next(self, idle_timeout: float, request_timeout: float) -> Request | None:
        """The next request; None when the client closed or stayed idle."""
        try:
            async with asyncio.timeout(idle_timeout):
                while not self._rec.done and not self._rec.started:
                    if not await self._feed():
                        return None
        except TimeoutError:
            return None
        try:
            async with asyncio.timeout(request_timeout):
                while not self._rec.done:
                    if not await self._feed():
                        raise BadRequest(400, "connection closed in the middle of a request")
        except TimeoutError:
            raise BadRequest(408, f"request not complete within {request_timeout}s") from None
        method, url, headers, body, keep_alive = self._rec.done.popleft()
        parts = urlsplit(url.decode("latin-1"))
        return Request(method, parts.path, parse_qs(parts.query), headers, body, keep_alive)

    async def _feed(self) -> bool:
        try:
            data = await self._reader.read(_READ)
        except (OSError, _ssl.SSLError):
            return False
        if not data:
            return False
        if not self._rec.head_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise BadRequest(400, "protocol upgrades are not supported") from None
        except httptools.HttpParserError as exc:
            raise BadRequest(400, f"malformed request: {exc}") from None
        if self._rec.head_done or self._rec.done:
            self._head_bytes = 0
        elif self._head_bytes > MAX_HEAD:
            raise BadRequest(431, f"request head larger than {MAX_HEAD} bytes")
        if self._rec.too_big:
            raise BadRequest(413, f"request body larger than {self._max_body} bytes")
        return True


def json_response(status: int, payload: object, *, keep_alive: bool = True) -> bytes:
    """A complete HTTP/1.1 response with a JSON body."""
    body = json.dumps(payload, separators=(",", ":")).encode() + b"\n"
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode("latin-1") + body


class ClientConnection:
    """One client connection carrying one request."""

    def __init__(self, peer: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int, *, ssl: _ssl.SSLContext | None,
                   server_hostname: str | None, timeout: float) -> ClientConnection:
        peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ssl, server_hostname=server_hostname if ssl else None)
        except TimeoutError:
            raise ClientError(f"{peer}: no connection within {timeout}s") from None
        except _ssl.SSLCertVerificationError as exc:
            raise ClientError(f"{peer}: TLS handshake failed: certificate verify failed: "
                              f"{exc.verify_message}") from None
        except _ssl.SSLError as exc:
            raise ClientError(f"{peer}: TLS handshake failed: "
                              f"{exc.reason or exc}") from None
        except OSError as exc:
            raise ClientError(f"{peer}: connect failed: {exc.strerror or exc}") from None
        return cls(peer, reader, writer)

    @property
    def local_address(self) -> str:
        """The IP address this end of the connection has."""
        return str(self._writer.get_extra_info("sockname")[0])

    async def request(self, method: str, path: str, *, body: bytes | None = None,
                      authority: str = "identity", timeout: float,
                      headers: Mapping[str, str] | None = None,
                      max_body: int = 4 * 1024 * 1024) -> Response:
        """Send one request and read the whole response within ``timeout`` seconds."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {authority}", "User-Agent: appliance",
                 "Accept: application/json", "Connection: close"]
        for name, value in (headers or {}).items():
            if any(c in name + value for c in "\r\n\0"):
                raise ClientError(f"header {name!r}: name or value holds CR, LF or NUL")
            lines.append(f"{name}: {value}")
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(head + (body or b""))
                await self._writer.drain()
                return await self._read(max_body)
        except TimeoutError:
            raise ClientError(f"{self.peer}: no complete response within {timeout}s") from None
        except (OSError, _ssl.SSLError) as exc:
            raise ClientError(f"{self.peer}: connection failed: {exc}") from None

    async def _read(self, max_body: int) -> Response:
        rec = _Recorder(max_body)
        parser = httptools.HttpResponseParser(rec)
        while not rec.done:
            data = await self._reader.read(_READ)
            if not data:
                raise ClientError(f"{self.peer}: connection closed before a whole response")
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise ClientError(f"{self.peer}: malformed response: {exc}") from None
            if rec.too_big:
                raise ClientError(f"{self.peer}: response larger than {max_body} bytes")
        _, _, headers, body, _ = rec.done[0]
        return Response(parser.get_status_code(), headers, body)

    def close(self) -> None:
        self._writer.close()


async def call(host: str, port: int, method: str, path: str, *, body: bytes | None = None,
               ssl: _ssl.SSLContext | None, server_hostname: str | None,
               timeout: float) -> Response:
    """Open, send one request, read the response, close: all within ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    conn = await ClientConnection.open(host, port, ssl=ssl, server_hostname=server_hostname,
                                       timeout=timeout)
    try:
        return await conn.request(method, path, body=body,
                                  timeout=max(0.001, deadline - loop.time()))
    finally:
        conn.close()
