"""HTTP/1.1 <-> HTTP/2 translation through the proxy, with real peers: curl and an h11
client (a strict, independent check of the HTTP/1.1 framing we write) against nghttpd and
an h2-library server; curl --http2-prior-knowledge, h2load and an h2-library client
against HTTP/1.1 servers on h11; and linkerd's mesh downgrade (l5d-orig-proto)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2peer
import h11
import pytest
import support
from support import H11Server, ThreadedTcpServer, proxy, recv_until_eof, wait_for
from test_proxy_http2 import grpc_service, nghttpd_serving

pytestmark = pytest.mark.skipif(shutil.which("nghttpd") is None or shutil.which("h2load")
                                is None, reason="needs nghttp2-server and nghttp2-client")


@pytest.fixture(autouse=True)
def no_tracebacks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every proxy a test runs must log no traceback (an error the test did not see)."""
    outputs: list[str] = []
    stop = support.ProxyProcess.stop

    def checked_stop(self: support.ProxyProcess) -> int:
        code = stop(self)
        outputs.append(self.output())
        return code

    monkeypatch.setattr(support.ProxyProcess, "stop", checked_stop)
    yield
    for text in outputs:
        assert "Traceback" not in text, text


# --- an HTTP/1.1 client and server on h11 -----------------------------------------------

class H1Client:
    """An HTTP/1.1 client connection on h11: each request's response, body and trailers
    are parsed strictly, so framing errors in what the proxy writes fail the test."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h11.Connection(h11.CLIENT)
        self.informational: list[h11.InformationalResponse] = []

    def request(self, method: bytes, target: bytes, headers: list | None = None,
                body: list[bytes] | bytes = b"", trailers: list | None = None
                ) -> tuple[h11.Response, bytes, list]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        hdrs = [(b"host", b"test"), *(headers or [])]
        chunks = [body] if isinstance(body, bytes) else body
        if isinstance(body, list) or trailers:
            hdrs.append((b"transfer-encoding", b"chunked"))
        elif body:
            hdrs.append((b"content-length", b"%d" % len(body)))
        out = self.conn.send(h11.Request(method=method, target=target, headers=hdrs))
        for c in chunks:
            if c:
                out += self.conn.send(h11.Data(data=c))
        out += self.conn.send(h11.EndOfMessage(headers=trailers or []))
        self.sock.sendall(out)
        return self.response()

    def response(self) -> tuple[h11.Response, bytes, list]:
        response, body = None, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.InformationalResponse):
                self.informational.append(event)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response, bytes(body), list(event.headers)
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("connection closed before the response ended")

    def close(self) -> None:
        self.sock.close()


def header(response: h11.Response, name: bytes) -> bytes | None:
    return dict(response.headers).get(name)


Handler = Callable[[h11.Request, bytes, list], tuple[int, list, list[bytes], list]]


class H1App(ThreadedTcpServer):
    """An HTTP/1.1 server on h11 whose ``handler`` returns (status, headers, body
    chunks, trailers); it records each request with its body and trailers."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.seen: list[tuple[h11.Request, bytes, list]] = []
        super().__init__()

    def handle(self, s: socket.socket, n: int) -> None:
        conn = h11.Connection(h11.SERVER)
        request, body = None, bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = s.recv(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request, body = event, bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    self.seen.append((request, bytes(body), list(event.headers)))
                    s.sendall(self._answer(conn, request, bytes(body), list(event.headers)))
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (OSError, h11.ProtocolError):
            return
        finally:
            s.close()

    def _answer(self, conn: h11.Connection, request: h11.Request, body: bytes,
                trailers: list) -> bytes:
        status, headers, chunks, out_trailers = self.handler(request, body, trailers)
        out = conn.send(h11.Response(status_code=status, headers=headers))
        if request.method != b"HEAD" and status not in (204, 304):
            for c in chunks:
                out += conn.send(h11.Data(data=c))
        return out + conn.send(h11.EndOfMessage(headers=out_trailers))


def h2_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    conn.initiate_connection()
    return conn


GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app.test")]


# --- HTTP/1.1 clients to HTTP/2 servers ---------------------------------------------------

@pytest.fixture
def nghttpd(tmp_path: Any) -> Iterator[tuple[int, bytes]]:
    (tmp_path / "index.html").write_bytes(b"hello h2\n")
    big = os.urandom(3_000_000)
    (tmp_path / "big.bin").write_bytes(big)
    with nghttpd_serving(str(tmp_path)) as port:
        yield port, big


def test_curl_http1_to_nghttpd_gets_exact_bytes(nghttpd: tuple[int, bytes],
                                                tmp_path: Any) -> None:
    """curl (HTTP/1.1) through the proxy to nghttpd (h2c only): a 3 MB body byte for byte
    then a 404 on the same client connection, and a HEAD; one upstream HTTP/2
    connection for all."""
    port, big = nghttpd
    out = tmp_path / "out.bin"
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}",
               f"outbound.h2_upstream_ports={port}") as p:
        base = f"http://127.0.0.1:{p.outbound}"
        r = subprocess.run(["curl", "-sS", "-w", "|%{http_code}|%{num_connects}",
                            "-o", str(out), f"{base}/big.bin", "-o", "/dev/null",
                            f"{base}/nope"], capture_output=True, timeout=30)
        assert r.stdout == b"|200|1|404|0", r.stderr
        assert out.read_bytes() == big
        r = subprocess.run(["curl", "-sS", "-I", f"{base}/index.html"], capture_output=True,
                           timeout=10)
        assert r.stdout.startswith(b"HTTP/1.1 200"), r.stderr
        assert b"content-length: 9" in r.stdout.lower()  # HEAD: the length, no body
        assert p.metric("tcp_open_total", protocol="h2", peer="dst") == 1
        assert p.metric("response_total", protocol="http/1", status_code="200") == 2


def test_h11_client_sees_correct_framing(nghttpd: tuple[int, bytes]) -> None:
    """An h11 client (strict) reads, on one keep-alive connection: a response with the
    upstream's content-length, a response without one (sent chunked to us), a 204,
    HTTP/2 trailers as chunked trailers, and a 103 before a 200; the h2 server saw
    :authority, no Host."""
    server = h2peer.H2Server()
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{server.port}",
                   f"outbound.h2_upstream_ports={server.port}") as p:
            client = H1Client(p.outbound)
            r, body, _ = client.request(b"GET", b"/big?100000")
            assert r.status_code == 200 and len(body) == 100_000
            assert header(r, b"content-length") == b"100000"
            r, body, _ = client.request(b"POST", b"/echo", body=b"x" * 70_000)
            assert (r.status_code, body) == (200, b"x" * 70_000)
            assert header(r, b"transfer-encoding") == b"chunked"
            assert header(r, b"via") is not None
            r, body, _ = client.request(b"GET", b"/head")
            assert (r.status_code, body) == (204, b"")
            r, body, trailers = client.request(b"GET", b"/trailers")
            assert (body, trailers) == (b"ok", [(b"x-checksum", b"42")])
            r, body, _ = client.request(b"GET", b"/early")
            assert (r.status_code, body) == (200, b"hi")
            assert [(i.status_code, dict(i.headers).get(b"link")) for i in
                    client.informational] == [(103, b"</s.css>")]
            client.close()
            seen = server.requests()[0].headers
            assert (b":authority", b"test") in seen and b"host" not in dict(seen)
            assert server.connections == 1
    finally:
        server.close()


def test_http10_client_gets_a_body_delimited_by_close() -> None:
    """An HTTP/1.0 client cannot read chunked: a body without a length ends with our
    close."""
    server = h2peer.H2Server()
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{server.port}",
                   f"outbound.h2_upstream_ports={server.port}") as p:
            with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
                s.sendall(b"POST /echo HTTP/1.0\r\nhost: t\r\ncontent-length: 3\r\n\r\nabc")
                raw = recv_until_eof(s)
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and body == b"abc", raw
            assert b"connection: close" in head and b"transfer-encoding" not in head
    finally:
        server.close()


def test_chunked_upload_with_trailers_reaches_the_h2_server() -> None:
    """A chunked HTTP/1.1 request body of 2 MB with trailers: the h2 server receives every
    byte, then the trailers; the echo comes back whole."""
    server = h2peer.H2Server()
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{server.port}",
                   f"outbound.h2_upstream_ports={server.port}") as p:
            chunks = [bytes([i]) * 100_000 for i in range(20)]
            client = H1Client(p.outbound)
            r, body, trailers = client.request(b"POST", b"/echo", body=chunks,
                                               trailers=[(b"X-Sum", b"190")])
            assert body == b"".join(chunks)
            assert trailers == [(b"x-request-trailers", b"x-sum")]
            seen = server.requests()[0]
            assert seen.trailers == [(b"x-sum", b"190")]
            assert b"transfer-encoding" not in dict(seen.headers)
    finally:
        server.close()


def test_many_http1_connections_share_one_h2_connection(nghttpd: tuple[int, bytes]) -> None:
    """16 HTTP/1.1 client connections, 20 requests each, concurrently: all answered, over
    one multiplexed upstream connection."""
    port, _ = nghttpd
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}",
               f"outbound.h2_upstream_ports={port}") as p:
        failures: list[str] = []

        def run() -> None:
            client = H1Client(p.outbound)
            try:
                for _ in range(20):
                    r, body, _ = client.request(b"GET", b"/index.html")
                    if (r.status_code, body) != (200, b"hello h2\n"):
                        failures.append(f"{r.status_code} {body!r}")
            finally:
                client.close()

        threads = [threading.Thread(target=run) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert failures == []
        assert p.metric("response_total", protocol="http/1", status_code="200") == 320
        assert p.metric("tcp_open_total", protocol="h2", peer="dst") == 1
        assert p.metric("tcp_open_total", protocol="http/1", peer="src") == 16


def test_slow_http1_reader_bounds_what_is_read_upstream(tmp_path: Any) -> None:
    """An HTTP/1.1 client that stops reading a 50 MB body: the proxy stops taking DATA
    from the h2 stream, so the upstream's window closes and the proxy stops reading."""
    (tmp_path / "huge.bin").write_bytes(b"z" * 50_000_000)
    with nghttpd_serving(str(tmp_path)) as port:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}",
                   f"outbound.h2_upstream_ports={port}") as p:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                s.connect(("127.0.0.1", p.outbound))
                s.sendall(b"GET /huge.bin HTTP/1.1\r\nhost: t\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.1 200")
                wait_for(_settled(p), timeout=15, interval=0.3, what="upstream reads to stop")
                read = p.metric("tcp_read_bytes_total", protocol="h2", peer="dst")
                assert read < 16_000_000, f"proxy read {read:.0f} bytes upstream"
            finally:
                s.close()


def _settled(p: Any) -> Callable[[], bool]:
    last = [-1.0]

    def settled() -> bool:
        now = p.metric("tcp_read_bytes_total", peer="dst")
        same = now == last[0]
        last[0] = now
        return same
    return settled


def test_http1_client_leaving_cancels_only_its_stream() -> None:
    """A client that closes mid-response: its upstream stream is reset (CANCEL), the
    shared upstream connection serves the next client."""
    server = h2peer.H2Server()
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{server.port}",
                   f"outbound.h2_upstream_ports={server.port}") as p:
            with socket.create_connection(("127.0.0.1", p.outbound)) as s:
                s.sendall(b"GET /big?20000000 HTTP/1.1\r\nhost: t\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.1 200")
            wait_for(lambda: server.requests() and server.requests()[0].reset == 8,
                     what="the upstream stream to be reset")
            client = H1Client(p.outbound)
            r, body, _ = client.request(b"GET", b"/trailers")
            assert body == b"ok"
            assert server.connections == 1
    finally:
        server.close()


def test_unreachable_h2_upstream_is_502() -> None:
    """No server at the h2c destination: 502 with l5d-proxy-error, as for HTTP/1."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}",
               f"outbound.h2_upstream_ports={port}") as p:
        client = H1Client(p.outbound)
        r, body, _ = client.request(b"GET", b"/")
        assert r.status_code == 502
        assert (header(r, b"l5d-proxy-error") or b"").startswith(b"upstream unreachable")


# --- HTTP/2 clients to HTTP/1.1 servers ----------------------------------------------------

@pytest.fixture
def h1backend() -> Iterator[H11Server]:
    server = H11Server()
    try:
        yield server
    finally:
        server.close()


def test_h2_clients_to_an_http1_server(h1backend: H11Server) -> None:
    """curl --http2-prior-knowledge gets a plain, a chunked and a 300 kB response and sends
    a 100 kB body; h2load's 2000 requests (4 clients x 10 streams) all succeed over pooled
    HTTP/1.1 connections; the server sees HTTP/1.1 with Host from :authority and Via."""
    port = h1backend.port
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}",
               f"outbound.http1_upstream_ports={port}") as p:
        base = f"http://127.0.0.1:{p.outbound}"
        for path, want in [("/hello", b"GET /hello\n"), ("/chunked", b"hello chunked world")]:
            r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", f"{base}{path}"],
                               capture_output=True, timeout=10)
            assert r.stdout == want, r.stderr
        r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w",
                            "%{size_download}", f"{base}/big?300000"], capture_output=True,
                           timeout=10)
        assert r.stdout == b"300000"
        r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--data-binary",
                            "@-", f"{base}/count"], input=b"y" * 100_000,
                           capture_output=True, timeout=10)
        assert r.stdout == b"100000"
        request = h1backend.requests[0][0]
        assert request.http_version == b"1.1"
        assert dict(request.headers)[b"host"] == f"127.0.0.1:{p.outbound}".encode()
        assert b"via" in dict(request.headers)
        r = subprocess.run(["h2load", "-n", "2000", "-c", "4", "-m", "10", f"{base}/x"],
                           capture_output=True, text=True, timeout=60)
        assert "2000 succeeded, 0 failed, 0 errored" in r.stdout, r.stdout
        assert p.metric("tcp_open_total", protocol="http/1", peer="dst") <= 41
        assert p.metric("response_total", protocol="h2", status_code="200") == 2004


def test_h2_body_without_length_goes_chunked_with_trailers() -> None:
    """An HTTP/2 request with a body but no content-length, and trailers: the HTTP/1.1
    server reads it chunked with the trailers; its chunked response with trailers comes
    back as DATA and HTTP/2 trailers."""
    app = H1App(lambda req, body, trailers: (200, [], [body[:3], body[3:]],
                                             [(b"x-got", b"%d" % len(body))]))
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{app.port}",
                   f"outbound.http1_upstream_ports={app.port}") as p:
            conn = h2_client()
            conn.send_headers(1, [(b":method", b"POST"), *GET[1:], (b":path", b"/up")])
            conn.send_data(1, b"payload")
            conn.send_headers(1, [(b"x-trailer", b"t")], end_stream=True)
            reply = h2peer.stream_reply(p.outbound, conn)
            assert reply.data == b"payload"
            assert reply.trailers == [(b"x-got", b"7")]
            request, body, trailers = app.seen[0]
            assert body == b"payload" and trailers == [(b"x-trailer", b"t")]
            assert dict(request.headers)[b"transfer-encoding"] == b"chunked"
    finally:
        app.close()


@pytest.mark.parametrize("method,status", [(b"HEAD", 200), (b"GET", 204), (b"GET", 304)])
def test_bodiless_responses(method: bytes, status: int) -> None:
    """HEAD, 204 and 304 from an HTTP/1.1 server end on the HTTP/2 HEADERS frame; the
    HEAD response keeps its content-length, and the connection is reused after."""
    app = H1App(lambda req, body, trailers: (
        status, [(b"content-length", b"5")] if status != 204 else [], [b"hello"], []))
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{app.port}",
                   f"outbound.http1_upstream_ports={app.port}") as p:
            for _ in range(2):
                conn = h2_client()
                conn.send_headers(1, [(b":method", method), *GET[1:], (b":path", b"/")],
                                  end_stream=True)
                reply = h2peer.stream_reply(p.outbound, conn)
                assert reply.header(b":status") == b"%d" % status and reply.data == b""
                assert reply.reset is None
            assert p.metric("tcp_open_total", protocol="http/1", peer="dst") == 1
    finally:
        app.close()


def test_slow_h2_reader_bounds_what_is_read_from_the_http1_server(
        h1backend: H11Server) -> None:
    """An HTTP/2 client that never credits its window, on a 50 MB HTTP/1.1 response: the
    proxy stops reading the HTTP/1.1 upstream."""
    port = h1backend.port
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}",
               f"outbound.http1_upstream_ports={port}") as p:
        conn = h2_client()
        conn.send_headers(1, [*GET, (b":path", b"/big?50000000")], end_stream=True)
        with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
            s.sendall(conn.data_to_send())
            wait_for(_settled(p), timeout=15, interval=0.3, what="upstream reads to stop")
            read = p.metric("tcp_read_bytes_total", protocol="http/1", peer="dst")
            assert read < 8_000_000, f"proxy read {read:.0f} bytes upstream"


def test_h2_client_leaving_mid_response_does_not_reuse_the_connection(
        h1backend: H11Server) -> None:
    """An HTTP/2 client that resets its stream mid-body: that HTTP/1.1 connection is
    closed (it cannot be reused mid-response) and the next request is served."""
    port = h1backend.port
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}",
               f"outbound.http1_upstream_ports={port}") as p:
        conn = h2_client()
        conn.send_headers(1, [*GET, (b":path", b"/big?20000000")], end_stream=True)
        with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
            s.sendall(conn.data_to_send())
            while not any(isinstance(e, h2.events.DataReceived)
                          for e in conn.receive_data(s.recv(65536))):
                pass
            conn.reset_stream(1)
            s.sendall(conn.data_to_send())
            wait_for(lambda: p.metric("tcp_close_total", protocol="http/1", peer="dst") == 1,
                     what="the upstream connection to be closed")
        r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge",
                            f"http://127.0.0.1:{p.outbound}/again"],
                           capture_output=True, timeout=10)
        assert r.stdout == b"GET /again\n"


def test_grpc_is_not_translated() -> None:
    """gRPC needs HTTP/2: a call to a port listed as HTTP/1.1-only still goes as HTTP/2."""
    import grpc

    with grpc_service("test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(
            lambda request, context: b"echo:" + request)}) as port:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}",
                   f"outbound.http1_upstream_ports={port}") as p:
            with grpc.insecure_channel(f"127.0.0.1:{p.outbound}") as channel:
                assert channel.unary_unary("/test.Echo/Unary")(b"x", timeout=5) == b"echo:x"
            assert p.metric("tcp_open_total", protocol="h2", peer="dst") == 1


def test_inbound_mesh_downgrade(h1backend: H11Server) -> None:
    """linkerd's downgrade: an inbound HTTP/2 request with l5d-orig-proto: HTTP/1.1 goes
    to the app as HTTP/1.1 without that header, and its response carries it back."""
    port = h1backend.port
    with proxy(f"inbound.orig_dst_override=127.0.0.1:{port}") as p:
        conn = h2_client()
        conn.send_headers(1, [*GET, (b":path", b"/echo"), (b"l5d-orig-proto", b"HTTP/1.1"),
                              (b"x-custom", b"1")], end_stream=True)
        reply = h2peer.stream_reply(p.inbound, conn)
        assert reply.header(b":status") == b"200"
        assert reply.header(b"l5d-orig-proto") == b"HTTP/1.1"
        request = h1backend.requests[0][0]
        assert request.http_version == b"1.1"
        assert b"l5d-orig-proto" not in dict(request.headers)
        assert p.metric("tcp_open_total", direction="inbound", protocol="http/1",
                        peer="dst") == 1
