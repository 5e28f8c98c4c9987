"""A small asyncio HTTP/1.1 client for the discovery sources (Consul, Kubernetes).

Theory of operation: one request per connection (``Connection: close``); discovery makes a
request every few seconds at most, so reuse is not worth its states. The request head is
written by hand (GET only, header values checked for CR/LF); the response is framed by
llhttp through ``httptools.HttpResponseParser``, which handles Content-Length, chunked and
read-until-close bodies and rejects malformed framing. Parser callbacks only record; the
reader loop hands out what they recorded after each ``feed_data``.

Two ways to read a response: :func:`get` reads it whole (bounded by ``max_body``) within one
deadline; :func:`stream` opens it and yields body pieces as they arrive (for Kubernetes
watches), with a deadline for the head and an idle timeout between pieces.

Every failure (DNS, refused, TLS, timeout, malformed response, body too large) is raised as
:class:`HTTPClientError`, whose message names the URL and what went wrong: the namers have
one error vocabulary to report.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

DEFAULT_MAX_BODY = 32 * 1024 * 1024
_READ_SIZE = 65536


class HTTPClientError(Exception):
    """A request failed: the message names the URL and the reason."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL points: scheme, host, port and the path with its query."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    """Split an ``http://`` or ``https://`` URL; raise :class:`HTTPClientError` if it is not
    one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise HTTPClientError(f"{url!r}: bad URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise HTTPClientError(f"{url!r}: scheme must be http or https")
    if not parts.hostname:
        raise HTTPClientError(f"{url!r}: no host")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, parts.hostname, port, path)


def request_head(target: Target, headers: Mapping[str, str]) -> bytes:
    """The bytes of a GET request head; header names and values may not hold CR, LF or NUL
    (that would let a value inject headers)."""
    lines = [f"GET {target.path} HTTP/1.1", f"Host: {target.authority}"]
    given = {name.lower() for name in headers}
    for name, value in (("User-Agent", "appliance"), ("Accept", "application/json")):
        if name.lower() not in given:
            lines.append(f"{name}: {value}")
    for name, value in headers.items():
        if not name or any(c in name for c in "\r\n\0: ") or any(c in value for c in "\r\n\0"):
            raise HTTPClientError(f"header {name!r}: name or value holds a forbidden character")
        if name.lower() not in ("host", "connection"):
            lines.append(f"{name}: {value}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class _Recorder:
    """httptools callbacks: record the head, body pieces and the end."""

    headers: dict[str, str] = field(default_factory=dict)
    head_done: bool = False
    complete: bool = False
    chunks: list[bytes] = field(default_factory=list)
    _name: str = ""

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(bytes(body))

    def on_message_complete(self) -> None:
        self.complete = True

    def take(self) -> list[bytes]:
        chunks, self.chunks = self.chunks, []
        return chunks


@dataclass(frozen=True, slots=True)
class Response:
    """A whole response: status, headers (names lowercased, repeats joined by ", "), body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Exchange:
    """One request on its own connection, read piece by piece."""

    def __init__(self, url: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.url = url
        self._reader = reader
        self._writer = writer
        self._rec = _Recorder()
        self._parser = httptools.HttpResponseParser(self._rec)
        self._eof = False
        self.status = 0

    @property
    def headers(self) -> Mapping[str, str]:
        return self._rec.headers

    async def read_head(self) -> None:
        while not self._rec.head_done:
            await self._feed()
        self.status = self._parser.get_status_code()

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body, or None at its end."""
        while True:
            if self._rec.chunks:
                return b"".join(self._rec.take())
            if self._rec.complete or self._eof:
                return None
            await self._feed()

    async def _feed(self) -> None:
        try:
            data = await self._reader.read(_READ_SIZE)
        except (OSError, _ssl.SSLError) as exc:
            raise HTTPClientError(f"{self.url}: read failed: {exc}") from None
        if not data:
            self._end_of_stream()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise HTTPClientError(f"{self.url}: unexpected protocol upgrade") from None
        except httptools.HttpParserError as exc:
            raise HTTPClientError(f"{self.url}: malformed response: {exc}") from None

    def _end_of_stream(self) -> None:
        """The server closed: fine only after headers of a body delimited by the close."""
        rec = self._rec
        delimited = "content-length" in rec.headers or "chunked" in rec.headers.get(
            "transfer-encoding", "").lower()
        if not rec.head_done:
            raise HTTPClientError(f"{self.url}: connection closed before the response head")
        if not rec.complete and delimited:
            raise HTTPClientError(f"{self.url}: connection closed in the middle of the body")
        self._eof = True

    def close(self) -> None:
        self._writer.close()


async def _open(url: str, headers: Mapping[str, str],
                ssl: _ssl.SSLContext | None) -> Exchange:
    target = parse_url(url)
    head = request_head(target, headers)
    context: _ssl.SSLContext | None = None
    if target.scheme == "https":
        context = ssl if ssl is not None else _ssl.create_default_context()
    try:
        reader, writer = await asyncio.open_connection(
            target.host, target.port, ssl=context,
            server_hostname=target.host if context else None)
    except (OSError, _ssl.SSLError) as exc:
        raise HTTPClientError(f"{url}: connect failed: {exc}") from None
    exchange = Exchange(url, reader, writer)
    try:
        writer.write(head)
        await writer.drain()
    except (OSError, _ssl.SSLError) as exc:
        exchange.close()
        raise HTTPClientError(f"{url}: write failed: {exc}") from None
    return exchange


async def get(url: str, headers: Mapping[str, str] | None = None, *,
              ssl: _ssl.SSLContext | None = None, timeout: float = 10.0,
              max_body: int = DEFAULT_MAX_BODY) -> Response:
    """GET ``url`` and read the whole response within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            exchange = await _open(url, headers or {}, ssl)
            try:
                await exchange.read_head()
                body = bytearray()
                while (chunk := await exchange.next_chunk()) is not None:
                    body += chunk
                    if len(body) > max_body:
                        raise HTTPClientError(f"{url}: body larger than {max_body} bytes")
                return Response(exchange.status, dict(exchange.headers), bytes(body))
            finally:
                exchange.close()
    except TimeoutError:
        raise HTTPClientError(f"{url}: no complete response within {timeout}s") from None


class StreamedResponse:
    """A response whose head has arrived; iterate it for body pieces as they come."""

    def __init__(self, exchange: Exchange, idle_timeout: float) -> None:
        self._exchange = exchange
        self._idle = idle_timeout
        self.status = exchange.status
        self.headers = exchange.headers

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await self._exchange.next_chunk()
            except TimeoutError:
                raise HTTPClientError(
                    f"{self._exchange.url}: nothing received for {self._idle}s") from None
            if chunk is None:
                return
            yield chunk


@asynccontextmanager
async def stream(url: str, headers: Mapping[str, str] | None = None, *,
                 ssl: _ssl.SSLContext | None = None, timeout: float = 10.0,
                 idle_timeout: float = 60.0) -> AsyncIterator[StreamedResponse]:
    """GET ``url``; the head must arrive within ``timeout`` seconds, then each body piece
    within ``idle_timeout`` of the last. The connection closes when the block exits."""
    exchange: Exchange | None = None
    try:
        async with asyncio.timeout(timeout):
            exchange = await _open(url, headers or {}, ssl)
            await exchange.read_head()
    except TimeoutError:
        if exchange is not None:
            exchange.close()
        raise HTTPClientError(f"{url}: no response head within {timeout}s") from None
    except BaseException:
        if exchange is not None:
            exchange.close()
        raise
    try:
        yield StreamedResponse(exchange, idle_timeout)
    finally:
        exchange.close()
