"""Explicit proxy mode: an app that sets http_proxy (no iptables) is served too."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator

import pytest
from support import H11Server, ProxyProcess, proxy, recv_until_eof


@pytest.fixture
def plain() -> Iterator[ProxyProcess]:
    """The proxy with no original-destination override: only explicit requests work."""
    with proxy() as p:
        yield p


def curl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                          timeout=30, env={**clean, **(env or {})})


def test_http_proxy_variable_is_enough(plain: ProxyProcess, backend: H11Server) -> None:
    """curl with only http_proxy set reaches the server; the server sees origin form."""
    r = curl("-i", f"http://127.0.0.1:{backend.port}/hello?x=1",
             env={"http_proxy": f"http://127.0.0.1:{plain.outbound}"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"HTTP/1.1 200"), r.stdout
    assert r.stdout.endswith(b"GET /hello?x=1\n")
    request, _ = backend.requests[-1]
    assert request.target == b"/hello?x=1"
    assert dict(request.headers)[b"host"] == f"127.0.0.1:{backend.port}".encode()
    assert plain.metric("request_total", direction="outbound") == 1


def test_connect_tunnel(plain: ProxyProcess, backend: H11Server) -> None:
    """curl --proxytunnel sends CONNECT; the proxy answers 200 itself and relays bytes."""
    r = curl("-i", "-p", "-x", f"http://127.0.0.1:{plain.outbound}",
             f"http://127.0.0.1:{backend.port}/tunnelled")
    assert r.returncode == 0, r.stderr
    assert b"HTTP/1.1 200 Connection established" in r.stdout
    assert r.stdout.endswith(b"GET /tunnelled\n")
    request, _ = backend.requests[-1]
    assert request.target == b"/tunnelled"  # the app's own request, untouched


def test_keep_alive_to_two_servers(plain: ProxyProcess, backend: H11Server) -> None:
    """One client connection, requests for two different servers, each goes to its own."""
    other = H11Server()
    try:
        with socket.create_connection(("127.0.0.1", plain.outbound), timeout=10) as s:
            for port in (backend.port, other.port, backend.port):
                s.sendall(f"GET http://127.0.0.1:{port}/p{port} HTTP/1.1\r\n"
                          f"Host: 127.0.0.1:{port}\r\n\r\n".encode())
                data = b""
                while not data.endswith(f"GET /p{port}\n".encode()):
                    chunk = s.recv(65536)
                    assert chunk, data
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200")
        assert len(backend.requests) == 2 and len(other.requests) == 1
    finally:
        other.close()


@pytest.mark.parametrize("request_line, status, words", [
    (b"GET /relative HTTP/1.1", 502, b"no original destination"),
    (b"GET https://127.0.0.1:1/ HTTP/1.1", 400, b"through CONNECT"),
    (b"CONNECT 127.0.0.1 HTTP/1.1", 400, b"host:port"),
])
def test_bad_explicit_requests(plain: ProxyProcess, request_line: bytes, status: int,
                               words: bytes) -> None:
    """Requests that name no usable destination get a clear error and a closed connection."""
    with socket.create_connection(("127.0.0.1", plain.outbound), timeout=10) as s:
        s.sendall(request_line + b"\r\nHost: x\r\n\r\n")
        data = recv_until_eof(s)
    assert data.startswith(b"HTTP/1.1 %d" % status), data
    assert b"l5d-proxy-error: " in data and words in data


def test_request_for_the_proxy_itself_is_a_loop(plain: ProxyProcess) -> None:
    """An absolute URI naming the proxy's own listener is refused as a loop (502)."""
    with socket.create_connection(("127.0.0.1", plain.outbound), timeout=10) as s:
        s.sendall(f"GET http://127.0.0.1:{plain.outbound}/ HTTP/1.1\r\nHost: x\r\n"
                  "Connection: close\r\n\r\n".encode())
        data = recv_until_eof(s)
    assert data.startswith(b"HTTP/1.1 502"), data
    assert b"loop" in data
    assert plain.metric("proxy_errors_total", error="loop") == 1


def test_explicit_mode_can_be_turned_off(backend: H11Server) -> None:
    """With outbound.explicit_proxy=false a request sent on purpose is refused (502)."""
    with proxy("outbound.explicit_proxy=false") as p:
        r = curl("-i", f"http://127.0.0.1:{backend.port}/",
                 env={"http_proxy": f"http://127.0.0.1:{p.outbound}"})
        assert r.stdout.startswith(b"HTTP/1.1 502"), r.stdout
        assert backend.requests == []
