"""HTTP/1.1 through the proxy with real clients (curl, h11) and an h11 upstream."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any

import h11
import pytest
from support import (
    H11Server,
    ProxyProcess,
    free_port,
    proxy,
    recv_until_eof,
    static_server,
    wait_for,
)


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", str(timeout), *args],
                          capture_output=True, timeout=timeout + 5)


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the proxy closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return recv_until_eof(s)


def test_curl_gets_the_page_and_is_counted(mesh: ProxyProcess, backend: H11Server) -> None:
    """curl through the outbound listener gets the upstream's page; /metrics counts it."""
    r = curl("-i", f"http://127.0.0.1:{mesh.outbound}/hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"HTTP/1.1 200")
    assert r.stdout.endswith(b"GET /hello\n")
    assert b"via: 1.1 " in r.stdout.lower()
    assert mesh.metric("request_total", direction="outbound") == 1
    assert mesh.metric("response_total", direction="outbound", status_code="200",
                       classification="success") == 1
    assert mesh.metric("tcp_open_total", direction="outbound", peer="src",
                       protocol="http/1") == 1


def test_keep_alive_reuses_both_connections(mesh: ProxyProcess, backend: H11Server) -> None:
    """Three requests on one client connection use one upstream connection."""
    urls = [f"http://127.0.0.1:{mesh.outbound}/r{i}" for i in range(3)]
    r = curl(*urls)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"GET /r0\nGET /r1\nGET /r2\n"
    assert backend.connections == 1
    assert mesh.metric("tcp_open_total", direction="outbound", peer="src") == 1


def test_request_headers_are_rewritten_for_the_next_hop(
        mesh: ProxyProcess, backend: H11Server) -> None:
    """Hop-by-hop headers are dropped, Via is added, end-to-end headers pass."""
    r = curl("-i", "-H", "Connection: keep-alive, X-Hop", "-H", "X-Hop: secret",
             "-H", "X-Custom: kept", "-H", "Keep-Alive: timeout=5",
             f"http://127.0.0.1:{mesh.outbound}/echo")
    assert r.returncode == 0, r.stderr
    request, _ = backend.requests[-1]
    names = {n for n, _ in request.headers}
    assert b"x-hop" not in names and b"keep-alive" not in names
    assert dict(request.headers)[b"x-custom"] == b"kept"
    assert dict(request.headers)[b"via"].startswith(b"1.1 ")


def test_chunked_request_and_response_stream_through(
        mesh: ProxyProcess, backend: H11Server) -> None:
    """A chunked upload arrives whole; a chunked response is re-chunked to the client."""
    r = curl("-H", "Transfer-Encoding: chunked", "--data-binary", "@-",
             f"http://127.0.0.1:{mesh.outbound}/count", timeout=10)
    # curl reads stdin: nothing given, so an empty chunked body
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"0"
    body = b"z" * 300_000
    p = subprocess.run(["curl", "-sS", "-H", "Transfer-Encoding: chunked", "--data-binary",
                        "@-", f"http://127.0.0.1:{mesh.outbound}/count"],
                       input=body, capture_output=True, timeout=30)
    assert p.stdout == b"300000", p.stderr
    r = curl("-i", f"http://127.0.0.1:{mesh.outbound}/chunked")
    assert b"transfer-encoding: chunked" in r.stdout.lower()
    assert r.stdout.endswith(b"hello chunked world")


def test_h11_client_pipelined_requests_answered_in_order(mesh: ProxyProcess) -> None:
    """Five pipelined requests in one write get five responses in order (h11 checks)."""
    client = h11.Connection(h11.CLIENT)
    wire = b""
    for i in range(5):
        wire += client.send(h11.Request(method="GET", target=f"/p{i}",
                                        headers=[("host", "x")]))
        wire += client.send(h11.EndOfMessage())
        if i < 4:
            # h11 refuses to pipeline; reset its state to keep writing requests.
            client = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", mesh.outbound), timeout=5) as s:
        s.sendall(wire)
        reader = h11.Connection(h11.CLIENT)
        bodies = []
        for i in range(5):
            reader.send(h11.Request(method="GET", target=f"/p{i}", headers=[("host", "x")]))
            reader.send(h11.EndOfMessage())
            body = b""
            while True:
                event = reader.next_event()
                if event is h11.NEED_DATA:
                    reader.receive_data(s.recv(65536))
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            bodies.append(body)
            reader.start_next_cycle()
    assert bodies == [f"GET /p{i}\n".encode() for i in range(5)]


def test_content_length_with_transfer_encoding_is_refused(mesh: ProxyProcess,
                                                          backend: H11Server) -> None:
    """CL+TE (request smuggling shape) gets 400, a closed connection, and no upstream call."""
    out = raw_exchange(mesh.outbound, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b"l5d-proxy-error: malformed request" in out
    assert b"connection: close" in out
    assert backend.requests == []


@pytest.mark.parametrize("wire", [
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n",
    b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
])
def test_malformed_requests_get_400(mesh: ProxyProcess, backend: H11Server, wire: bytes) -> None:
    """Duplicate Content-Length, a bad chunk size, a broken header line: 400 and close."""
    out = raw_exchange(mesh.outbound, wire)
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert backend.requests == []


def test_oversized_head_and_target(mesh: ProxyProcess) -> None:
    """A 100 KiB header gets 431; a 10 KiB target gets 414."""
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    assert raw_exchange(mesh.outbound, big).startswith(b"HTTP/1.1 431 ")
    long_target = b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert raw_exchange(mesh.outbound, long_target).startswith(b"HTTP/1.1 414 ")


def test_unreachable_upstream_is_502() -> None:
    """Nothing listens at the destination: 502 with l5d-proxy-error naming the cause."""
    dead = free_port()
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{dead}") as p:
        r = curl("-i", f"http://127.0.0.1:{p.outbound}/")
        assert r.stdout.startswith(b"HTTP/1.1 502 ")
        assert b"l5d-proxy-error: upstream unreachable" in r.stdout
        assert p.metric("response_total", status_code="502", classification="failure") == 1


def test_slow_upstream_is_504(backend: H11Server) -> None:
    """No response head within http.response_timeout: 504 and the cause."""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{backend.port}",
               "http.response_timeout=300ms") as p:
        r = curl("-i", f"http://127.0.0.1:{p.outbound}/slow?3")
        assert r.stdout.startswith(b"HTTP/1.1 504 "), r.stdout
        assert b"l5d-proxy-error: upstream timeout" in r.stdout
        # The next request on a new connection still works.
        r = curl(f"http://127.0.0.1:{p.outbound}/after")
        assert r.stdout == b"GET /after\n"


def test_not_redirected_connection_is_refused_not_forwarded() -> None:
    """With no original destination (and no override), HTTP gets 502, TCP is closed."""
    with proxy() as p:
        r = curl("-i", f"http://127.0.0.1:{p.outbound}/")
        assert r.stdout.startswith(b"HTTP/1.1 502 ")
        assert b"no original destination" in r.stdout
        with socket.create_connection(("127.0.0.1", p.outbound), timeout=5) as s:
            s.sendall(b"\x00\x01binary")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(100) == b""


def test_override_pointing_at_the_proxy_itself_is_a_loop() -> None:
    """A request whose Via already names this proxy is refused instead of looping."""
    port = free_port()
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}", "instance_id=looptest") as p:
        out = raw_exchange(p.outbound, b"GET / HTTP/1.1\r\nHost: x\r\n"
                                       b"Via: 1.1 looptest-out (appliance)\r\n"
                                       b"Connection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 502 ")
        assert b"loop" in out


def test_head_and_204_have_no_body(mesh: ProxyProcess) -> None:
    """HEAD keeps Content-Length but no body; the connection stays usable after it."""
    r = curl("-I", f"http://127.0.0.1:{mesh.outbound}/big?5000",
             "-o", "/dev/null", "-w", "%{http_code}", "--next",
             f"http://127.0.0.1:{mesh.outbound}/after")
    assert r.stdout == b"200GET /after\n", r.stdout
    r = curl("-s", f"http://127.0.0.1:{mesh.outbound}/status?204", "-w", "%{http_code}")
    assert r.stdout == b"204"


def test_large_bodies_stream_with_bounded_memory(mesh: ProxyProcess) -> None:
    """100 MiB down and 100 MiB up pass through without the proxy holding them."""
    size = 100 * 1024 * 1024
    before = mesh.peak_rss_kib()
    r = curl("-o", "/dev/null", "-w", "%{size_download}",
             f"http://127.0.0.1:{mesh.outbound}/big?{size}", timeout=120)
    assert r.stdout == str(size).encode(), r.stderr
    p = subprocess.run(
        f"head -c {size} /dev/zero | curl -sS -T - -X POST "
        f"http://127.0.0.1:{mesh.outbound}/count", shell=True, capture_output=True, timeout=180)
    assert p.stdout == str(size).encode(), p.stderr
    grown_mib = (mesh.peak_rss_kib() - before) / 1024
    assert grown_mib < 32, f"proxy peak RSS grew {grown_mib:.0f} MiB for 100 MiB bodies"


def test_expect_100_continue(mesh: ProxyProcess) -> None:
    """curl's Expect: 100-continue upload completes through the proxy."""
    p = subprocess.run(["curl", "-sS", "-H", "Expect: 100-continue", "--data-binary", "@-",
                        f"http://127.0.0.1:{mesh.outbound}/count"],
                       input=b"q" * 2_000_000, capture_output=True, timeout=30)
    assert p.stdout == b"2000000", p.stderr


def test_client_abort_mid_response_leaks_nothing(mesh: ProxyProcess) -> None:
    """Clients that vanish mid-download leave no fds behind; others are unaffected."""
    baseline = mesh.fds()
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", mesh.outbound))
        s.sendall(b"GET /big?50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(1000)
        s.close()
    r = curl(f"http://127.0.0.1:{mesh.outbound}/still-fine")
    assert r.stdout == b"GET /still-fine\n"
    wait_for(lambda: mesh.fds() <= baseline + 1, timeout=10, what="fds back to baseline")
    wait_for(lambda: mesh.metric("tcp_open_connections", direction="outbound", peer="src") == 0,
             timeout=10, what="no open client connections")


def test_slow_request_head_gets_408() -> None:
    """A client that trickles its request head past http.header_timeout is cut off."""
    with proxy("outbound.orig_dst_override=127.0.0.1:9", "http.header_timeout=500ms") as p:
        with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            start = time.monotonic()
            out = b""
            while piece := s.recv(4096):
                out += piece
            assert out.startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - start < 5
        assert p.metric("proxy_errors_total", error="header_timeout") == 1


def test_ipv6_client_and_upstream(tmp_path: Any) -> None:
    """Over IPv6 loopback end to end: an IPv6 listener and an IPv6 upstream."""
    (tmp_path / "f.txt").write_text("over v6\n")
    with static_server(str(tmp_path), "::1") as port, \
            proxy("outbound.bind=::1", f"outbound.orig_dst_override=[::1]:{port}") as p:
        r = curl("-g", f"http://[::1]:{p.outbound}/f.txt")
        assert r.stdout == b"over v6\n", r.stderr


def test_inbound_forward_to_loopback(backend: H11Server) -> None:
    """With inbound.forward_to_loopback, the inbound listener dials 127.0.0.1:<orig port>
    whatever address the connection was for (apps that listen on loopback only)."""
    with proxy(f"inbound.orig_dst_override=198.18.0.99:{backend.port}",
               "inbound.forward_to_loopback=true") as p:
        r = curl("-i", f"http://127.0.0.1:{p.inbound}/in")
        assert r.stdout.endswith(b"GET /in\n"), r.stdout
        assert b"-in (appliance)" in r.stdout
        assert p.metric("request_total", direction="inbound") == 1
        assert p.metric("request_total", direction="outbound") == 0


def test_stalled_request_body_is_cut_off(backend: H11Server) -> None:
    """A client that stops mid-body for http.idle_timeout gets 408 and frees the upstream."""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{backend.port}",
               "http.idle_timeout=1s") as p:
        with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
            s.sendall(b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
            out = b""
            while piece := s.recv(4096):
                out += piece
        assert out.startswith(b"HTTP/1.1 408 "), out
        assert p.metric("proxy_errors_total", error="body_timeout") == 1
        assert p.metric("request_total") == 1
        wait_for(lambda: p.metric("tcp_open_connections", peer="dst") == 0, timeout=5,
                 what="upstream connection closed")


def test_bad_request_counts_one_request_and_one_response(mesh: ProxyProcess) -> None:
    """A refused request is one request and one 400 response in /metrics, not two."""
    raw_exchange(mesh.outbound, b"GET / HTTP/1.1\r\nHost x\r\n\r\n")
    assert mesh.metric("request_total", direction="outbound") == 1
    assert mesh.metric("response_total", direction="outbound", status_code="400") == 1


def test_http10_upstream_keeps_the_client_connection(tmp_path: Any) -> None:
    """python's http.server answers HTTP/1.0 and closes; the client's connection to the
    proxy stays open across requests all the same."""
    (tmp_path / "f.txt").write_text("one\n")
    with static_server(str(tmp_path)) as port, \
            proxy(f"outbound.orig_dst_override=127.0.0.1:{port}") as p:
        url = f"http://127.0.0.1:{p.outbound}/f.txt"
        r = curl(url, url, url)
        assert r.stdout == b"one\n" * 3, r.stderr
        assert p.metric("tcp_open_total", peer="src") == 1
        assert p.metric("tcp_open_total", peer="dst") == 3
