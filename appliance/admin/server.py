"""The admin server on 4191: /metrics, /ready, /live.

A small HTTP/1.1 server of its own (httptools, keep-alive, GET and HEAD only) so that a
scrape never competes with proxied traffic for the data path's state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httptools

Route = Callable[[], tuple[int, str, bytes]]
_REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 400: b"Bad Request",
            503: b"Service Unavailable"}


class AdminProtocol(asyncio.Protocol):
    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

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

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > 4096:
            raise ValueError("url too long")

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        keep = self.parser.should_keep_alive()
        path = httptools.parse_url(self.url).path.decode("latin-1") if self.url else "/"
        route = self.routes.get(path)
        if method not in (b"GET", b"HEAD"):
            self.respond(405, "text/plain", b"method not allowed\n", keep, head=False)
        elif route is None:
            self.respond(404, "text/plain", b"not found\n", keep, head=method == b"HEAD")
        else:
            status, ctype, body = route()
            self.respond(status, ctype, body, keep, head=method == b"HEAD")
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
                      routes: dict[str, Route]) -> asyncio.AbstractServer:
    from appliance.net.listener import listen

    return await listen(loop, lambda: AdminProtocol(routes), host, port)
