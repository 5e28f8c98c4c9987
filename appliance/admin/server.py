"""The admin server on 4191: /metrics, /ready, /live, the dashboard and JSON APIs.

A small HTTP/1.1 server of its own (httptools, keep-alive) so that a scrape never competes
with proxied traffic for the data path's state. Every route answers GET and HEAD; a route
listed in ``post`` also answers POST (its body is limited to 64 KiB). A handler gets an
:class:`AdminRequest` (method, path, query, body, client address) and returns
``(status, content type, body)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httptools

_MAX_BODY = 65536


@dataclass
class AdminRequest:
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    """The query string's parameters (the first value of each)."""
    body: bytes = b""
    peer: str = ""
    """The client's address."""


Route = Callable[[AdminRequest], tuple[int, str, bytes]]
_REASONS = {200: b"OK", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found",
            405: b"Method Not Allowed", 413: b"Payload Too Large",
            500: b"Internal Server Error", 503: b"Service Unavailable"}


class AdminProtocol(asyncio.Protocol):
    def __init__(self, routes: dict[str, Route], post: frozenset[str] = frozenset()) -> None:
        self.routes = routes
        self.post = post
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = bytearray()
        self.too_big = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.respond(400, "text/plain", b"bad request\n", keep=False)
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = bytearray()
        self.too_big = False

    def on_body(self, data: bytes) -> None:
        if len(self.body) + len(data) > _MAX_BODY:
            self.too_big = True
        else:
            self.body += data

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > 4096:
            raise ValueError("url too long")

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode("latin-1")
        keep = self.parser.should_keep_alive()
        url = httptools.parse_url(self.url) if self.url else None
        path = url.path.decode("latin-1") if url and url.path else "/"
        query = dict(parse_qsl(url.query.decode("latin-1"))) if url and url.query else {}
        route = self.routes.get(path)
        head = method == "HEAD"
        if method not in ("GET", "HEAD") and not (method == "POST" and path in self.post):
            self.respond(405, "text/plain", b"method not allowed\n", keep)
        elif route is None:
            self.respond(404, "text/plain", b"not found\n", keep, head=head)
        elif self.too_big:
            self.respond(413, "text/plain", b"request body too large\n", False)
            keep = False
        else:
            peer = self.transport.get_extra_info("peername")
            request = AdminRequest(method, path, query, bytes(self.body),
                                   peer[0] if peer else "")
            try:
                status, ctype, body = route(request)
            except Exception as exc:  # a bug in a handler must not kill the admin server
                status, ctype, body = 500, "text/plain", f"error: {exc}\n".encode()
            self.respond(status, ctype, body, keep, head=head)
        if not keep:
            self.transport.close()

    def respond(self, status: int, ctype: str, body: bytes, keep: bool,
                head: bool = False) -> None:
        if self.transport.is_closing():
            return
        lines = [
            b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, b"")),
            b"content-type: " + ctype.encode() + b"\r\n",
            b"content-length: %d\r\n" % len(body),
            b"" if keep else b"connection: close\r\n",
            b"\r\n",
        ]
        self.transport.write(b"".join(lines) + (b"" if head else body))


async def start_admin(loop: asyncio.AbstractEventLoop, host: str, port: int,
                      routes: dict[str, Route], post: frozenset[str] = frozenset()
                      ) -> asyncio.AbstractServer:
    from appliance.net.listener import listen

    return await listen(loop, lambda: AdminProtocol(routes, post), host, port)
