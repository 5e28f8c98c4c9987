"""Opaque TCP, tunnels and detection through the proxy, with real peers."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest
import websockets.sync.client
import websockets.sync.server
from support import ThreadedTcpServer, free_port, proxy, recv_until_eof


class EchoServer(ThreadedTcpServer):
    """A TCP echo server that also reports the half-close it saw."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.saw_eof = threading.Event()
        super().__init__()

    def handle(self, conn: socket.socket, n: int) -> None:
        with conn:
            if self.greeting:
                conn.sendall(self.greeting)
            while True:
                data = conn.recv(65536)
                if not data:
                    self.saw_eof.set()
                    conn.sendall(b"<bye>")  # still writable after the client's half-close
                    return
                conn.sendall(data)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def test_opaque_tcp_echoes_byte_for_byte_with_half_close(echo: EchoServer) -> None:
    """Binary bytes echo exactly; the client's half-close reaches the server, whose last
    bytes still come back."""
    payload = bytes(range(256)) * 4000
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{echo.port}") as p:
        with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = recv_until_eof(s)
        assert got == payload + b"<bye>"
        assert echo.saw_eof.is_set()
        assert p.metric("tcp_open_total", direction="outbound", peer="src",
                        protocol="opaque") == 1
        assert p.metric("tcp_read_bytes_total", direction="outbound", peer="src",
                        protocol="opaque") == len(payload)


def test_server_speaks_first_on_opaque_port() -> None:
    """On a port listed as opaque, detection is skipped and the server's banner arrives."""
    server = EchoServer(greeting=b"220 banner\r\n")
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{server.port}",
                   f"detect.opaque_ports={server.port}") as p:
            with socket.create_connection(("127.0.0.1", p.outbound), timeout=5) as s:
                assert s.recv(100) == b"220 banner\r\n"
    finally:
        server.close()


def test_detection_timeout_falls_back_to_opaque() -> None:
    """A server-first protocol on an unlisted port works once detection times out."""
    server = EchoServer(greeting=b"* OK hello\r\n")
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{server.port}",
                   "detect.timeout=200ms") as p:
            with socket.create_connection(("127.0.0.1", p.outbound), timeout=5) as s:
                assert s.recv(100) == b"* OK hello\r\n"
                s.sendall(b"ping")
                assert s.recv(100) == b"ping"
            assert p.metric("tcp_open_total", protocol="opaque", peer="src") == 1
    finally:
        server.close()


@pytest.mark.parametrize("prefix,protocol", [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "tls"),
])
def test_detected_protocols_pass_through(echo: EchoServer, prefix: bytes,
                                         protocol: str) -> None:
    """A TLS start (not the mesh's) is detected, labelled, and relayed unchanged. (Thrift
    is proxied per call: tests/test_thrift_proxy.py.)"""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{echo.port}") as p:
        with socket.create_connection(("127.0.0.1", p.outbound), timeout=5) as s:
            s.sendall(prefix)
            s.shutdown(socket.SHUT_WR)
            assert recv_until_eof(s) == prefix + b"<bye>"
        assert p.metric("tcp_open_total", protocol=protocol, peer="src") == 1


def test_websocket_echo_through_upgrade() -> None:
    """A WebSocket upgrade becomes a tunnel: real websockets client and server echo."""
    def handler(ws: websockets.sync.server.ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    with websockets.sync.server.serve(handler, "127.0.0.1", 0) as server:
        port = server.socket.getsockname()[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}") as p:
            with websockets.sync.client.connect(f"ws://127.0.0.1:{p.outbound}/ws") as ws:
                for text in ("one", "two", "x" * 100_000):
                    ws.send(text)
                    assert ws.recv(timeout=5) == text
                ws.send(b"\x00\xff binary")
                assert ws.recv(timeout=5) == b"\x00\xff binary"
            assert p.metric("response_total", status_code="101") == 1
            assert p.metric("tcp_open_total", protocol="tunnel", peer="src") == 1
        server.shutdown()


def test_connect_becomes_a_tunnel(echo: EchoServer) -> None:
    """CONNECT to an upstream proxy that answers 200 turns into a byte tunnel."""
    async def upstream_proxy(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(asyncio.start_server(upstream_proxy, "127.0.0.1", port))
        started.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    started.wait(5)
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}") as p:
            with socket.create_connection(("127.0.0.1", p.outbound), timeout=5) as s:
                s.sendall(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n"
                          b"\r\nearly-tunnel-bytes")
                head = b""
                while b"\r\n\r\n" not in head:
                    head += s.recv(1)
                assert head.startswith(b"HTTP/1.1 200 ")
                got = b""
                while len(got) < len(b"early-tunnel-bytes"):
                    got += s.recv(100)
                assert got == b"early-tunnel-bytes"
                tls_like = b"\x16\x03\x01 not http at all"
                s.sendall(tls_like)
                got = b""
                while len(got) < len(tls_like):
                    piece = s.recv(100)
                    assert piece, "tunnel closed early"
                    got += piece
                assert got == tls_like
            assert p.metric("tcp_open_total", protocol="tunnel", peer="src") == 1
    finally:
        loop.call_soon_threadsafe(loop.stop)
