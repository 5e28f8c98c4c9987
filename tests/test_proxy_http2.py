"""HTTP/2 (h2c) and gRPC through the proxy, with real peers: curl, nghttp2's h2load and
nghttpd, and grpcio clients and servers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import h2peer
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from support import ProxyProcess, free_port, proxy, wait_for

from appliance.protocols.h2frames import frame as h2frame

pytestmark = pytest.mark.skipif(shutil.which("nghttpd") is None or shutil.which("h2load")
                                is None, reason="needs nghttp2-server and nghttp2-client")


@contextmanager
def nghttpd_serving(directory: str) -> Iterator[int]:
    """nghttpd (a real HTTP/2 server) serving ``directory`` over h2c on a free port."""
    port = free_port()
    proc = subprocess.Popen(["nghttpd", "--no-tls", "-d", directory, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for(up, what="nghttpd")
        yield port
    finally:
        proc.terminate()
        proc.wait()


@pytest.fixture
def nghttpd(tmp_path) -> Iterator[tuple[int, str]]:
    """nghttpd serving a small page and a 3 MB file."""
    (tmp_path / "index.html").write_bytes(b"hello h2\n")
    (tmp_path / "big.bin").write_bytes(os.urandom(3_000_000))
    with nghttpd_serving(str(tmp_path)) as port:
        yield port, str(tmp_path)


@pytest.fixture
def h2mesh(nghttpd: tuple[int, str]) -> Iterator[ProxyProcess]:
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{nghttpd[0]}") as p:
        yield p


def test_curl_prior_knowledge_gets_exact_bytes(h2mesh: ProxyProcess,
                                               nghttpd: tuple[int, str]) -> None:
    """curl --http2-prior-knowledge gets a 3 MB file byte for byte, with Via, counted as h2."""
    r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-D", "-", "-o", "-",
                        f"http://127.0.0.1:{h2mesh.outbound}/big.bin"], capture_output=True,
                       timeout=30)
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200"), r.stderr
    assert b"via: 1.1 " in head
    with open(os.path.join(nghttpd[1], "big.bin"), "rb") as fh:
        assert body == fh.read()
    assert h2mesh.metric("request_total", direction="outbound", protocol="h2") == 1
    assert h2mesh.metric("response_total", protocol="h2", status_code="200") == 1


def test_h2load_multiplexes_on_one_upstream_connection(h2mesh: ProxyProcess) -> None:
    """h2load: 4 clients x 10 concurrent streams, 2000 requests, all succeed; upstream,
    the streams share one multiplexed connection."""
    r = subprocess.run(["h2load", "-n", "2000", "-c", "4", "-m", "10",
                        f"http://127.0.0.1:{h2mesh.outbound}/index.html"],
                       capture_output=True, text=True, timeout=60)
    assert "2000 succeeded, 0 failed, 0 errored" in r.stdout, r.stdout
    assert h2mesh.metric("response_total", protocol="h2", status_code="200") == 2000
    assert h2mesh.metric("tcp_open_total", protocol="h2", peer="src") == 4
    assert h2mesh.metric("tcp_open_total", protocol="h2", peer="dst") == 1


def test_unreachable_h2_upstream_is_502() -> None:
    """No server at the destination: an HTTP/2 502 with l5d-proxy-error."""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{free_port()}") as p:
        r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-D", "-",
                            f"http://127.0.0.1:{p.outbound}/"], capture_output=True, timeout=10)
        assert r.stdout.startswith(b"HTTP/2 502"), r.stdout + r.stderr
        assert b"l5d-proxy-error: upstream unreachable" in r.stdout


# --- gRPC ------------------------------------------------------------------------------

def _echo_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"fail":
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
    return b"echo:" + request


def _stream_out(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"item %d" % i


def _stream_in(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b"%d" % sum(len(r) for r in requests)


def _bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for r in requests:
        yield r.upper()


@contextmanager
def grpc_service(name: str, handlers: dict[str, Any], *,
                 with_health: bool = False) -> Iterator[int]:
    """A grpcio server on a free loopback port with generic handlers (no protoc)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    if with_health:
        health_servicer = health.HealthServicer()
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


@pytest.fixture
def grpc_server() -> Iterator[int]:
    with grpc_service("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(_echo_unary),
        "StreamOut": grpc.unary_stream_rpc_method_handler(_stream_out),
        "StreamIn": grpc.stream_unary_rpc_method_handler(_stream_in),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
    }, with_health=True) as port:
        yield port


def test_grpc_unary_streaming_and_health_through_the_proxy(grpc_server: int) -> None:
    """A grpcio client reaches a grpcio server through the proxy: unary, server streaming,
    client streaming, bidirectional streaming, status codes and the health service."""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{grpc_server}") as p:
        with grpc.insecure_channel(f"127.0.0.1:{p.outbound}") as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            assert unary(b"hi", timeout=5) == b"echo:hi"
            with pytest.raises(grpc.RpcError) as info:
                unary(b"fail", timeout=5)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            out = channel.unary_stream("/test.Echo/StreamOut")
            assert list(out(b"1000", timeout=10)) == [b"item %d" % i for i in range(1000)]
            stream_in = channel.stream_unary("/test.Echo/StreamIn")
            assert stream_in(iter([b"x" * 100_000] * 30), timeout=10) == b"3000000"
            bidi = channel.stream_stream("/test.Echo/Bidi")
            assert list(bidi(iter([b"a", b"b", b"c"]), timeout=5)) == [b"A", b"B", b"C"]
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service="test.Echo"), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert p.metric("request_total", protocol="h2") == 6
        assert p.metric("tcp_open_total", protocol="h2", peer="dst") == 1


def test_grpc_to_unreachable_upstream_is_unavailable() -> None:
    """A call the proxy cannot deliver ends with UNAVAILABLE and the proxy's cause."""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{free_port()}") as p:
        with grpc.insecure_channel(f"127.0.0.1:{p.outbound}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/test.Echo/Unary")(b"x", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "upstream unreachable" in info.value.details()


def test_client_cancel_resets_the_upstream_stream(grpc_server: int) -> None:
    """A cancelled streaming call is reset upstream; the connection keeps serving calls."""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{grpc_server}") as p:
        with grpc.insecure_channel(f"127.0.0.1:{p.outbound}") as channel:
            call = channel.unary_stream("/test.Echo/StreamOut")(b"1000000", timeout=30)
            assert next(call) == b"item 0"
            call.cancel()
            unary = channel.unary_unary("/test.Echo/Unary")
            assert unary(b"after", timeout=5) == b"echo:after"
        wait_for(lambda: p.metric("response_total", protocol="h2", error="client_reset") == 1,
                 what="the cancelled stream counted as a client reset")


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    cancelled = threading.Event()
    context.add_callback(cancelled.set)
    cancelled.wait(float(request or b"2"))  # takes its time, unless cancelled
    return b"slow"


def _remaining(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"%.3f" % context.time_remaining()


@pytest.fixture
def grpc_timing_server() -> Iterator[int]:
    with grpc_service("test.Time", {
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "Remaining": grpc.unary_unary_rpc_method_handler(_remaining),
    }) as port:
        yield port


def test_grpc_timeout_is_forwarded(grpc_timing_server: int) -> None:
    """The upstream sees the caller's deadline (grpc-timeout passed on, as what is left)."""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{grpc_timing_server}") as p:
        with grpc.insecure_channel(f"127.0.0.1:{p.outbound}") as channel:
            left = float(channel.unary_unary("/test.Time/Remaining")(b"", timeout=5))
        # grpcio rounds its grpc-timeout up to 10 ms (a 5 s call sends "5010m").
        assert 4.0 < left <= 5.02


def test_grpc_deadline_enforced_by_the_proxy(grpc_timing_server: int) -> None:
    """A caller that does not enforce its own grpc-timeout still gets DEADLINE_EXCEEDED
    from the proxy when it passes, and the upstream call is cancelled."""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{grpc_timing_server}") as p:
        reply = h2peer.request(p.outbound, h2peer.grpc_headers(
            b"/test.Time/Slow", (b"grpc-timeout", b"300m")), h2peer.grpc_frame(b"5"))
        assert reply.header(b"grpc-status") == b"4", reply
        assert b"deadline" in (reply.header(b"grpc-message") or b"")
        assert p.metric("proxy_errors_total", error="grpc_deadline") == 1
        assert p.metric("response_total", protocol="h2", grpc_status="4",
                        classification="failure") == 1


def test_invalid_grpc_timeout_is_refused(grpc_timing_server: int) -> None:
    """A grpc-timeout that does not parse gets INTERNAL, and never reaches the upstream."""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{grpc_timing_server}") as p:
        reply = h2peer.request(p.outbound, h2peer.grpc_headers(
            b"/test.Time/Slow", (b"grpc-timeout", b"soon")), h2peer.grpc_frame(b"0"))
        assert reply.header(b"grpc-status") == b"13", reply
        assert b"invalid grpc-timeout" in (reply.header(b"grpc-message") or b"")
        assert p.metric("tcp_open_total", protocol="h2", peer="dst") == 0


def test_grpc_status_is_a_label(grpc_server: int) -> None:
    """response_total carries grpc_status and classifies by it."""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{grpc_server}") as p:
        with grpc.insecure_channel(f"127.0.0.1:{p.outbound}") as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            unary(b"ok", timeout=5)
            with pytest.raises(grpc.RpcError):
                unary(b"fail", timeout=5)
        assert p.metric("response_total", grpc_status="0", classification="success") == 1
        assert p.metric("response_total", grpc_status="9", classification="failure") == 1


# --- safety: raw frames from an h2 client acting as the attacker ---------------------------

class _Counting:
    """A grpc server that counts the calls that reached it."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def handler(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
        return b"ok"


@pytest.fixture
def counting_server() -> Iterator[tuple[int, _Counting]]:
    counter = _Counting()
    with grpc_service("test.Count", {
        "Call": grpc.unary_unary_rpc_method_handler(counter.handler),
    }) as port:
        yield port, counter


def test_rapid_reset_gets_enhance_your_calm(counting_server: tuple[int, _Counting]) -> None:
    """150 streams opened and reset at once: GOAWAY ENHANCE_YOUR_CALM, and none of the
    cancelled requests reached the upstream."""
    port, counter = counting_server

    def script(conn: Any) -> None:
        for i in range(150):
            sid = 1 + 2 * i
            conn.send_headers(sid, h2peer.grpc_headers(b"/test.Count/Call"))
            conn.reset_stream(sid, 8)  # CANCEL

    with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}") as p:
        code, _ = h2peer.attack(p.outbound, script)
        assert code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert p.metric("proxy_errors_total", error="h2_rapid_reset") == 1
        assert counter.calls == 0
        # The proxy still serves others.
        with grpc.insecure_channel(f"127.0.0.1:{p.outbound}") as channel:
            assert channel.unary_unary("/test.Count/Call")(b"", timeout=5) == b"ok"


def test_ping_flood_gets_enhance_your_calm(h2mesh: ProxyProcess) -> None:
    """2000 PINGs in a burst: GOAWAY ENHANCE_YOUR_CALM."""
    def script(conn: Any) -> None:
        for i in range(2000):
            conn.ping(i.to_bytes(8, "big"))

    code, _ = h2peer.attack(h2mesh.outbound, script)
    assert code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert h2mesh.metric("proxy_errors_total", error="h2_control_flood") == 1


def test_empty_data_flood_gets_enhance_your_calm(h2mesh: ProxyProcess) -> None:
    """A stream fed thousands of empty DATA frames: GOAWAY ENHANCE_YOUR_CALM."""
    def script(conn: Any) -> None:
        conn.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"),
                              (b":path", b"/index.html"), (b":authority", b"t")])
        for _ in range(1500):
            conn.send_data(1, b"")

    code, _ = h2peer.attack(h2mesh.outbound, script)
    assert code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_too_many_concurrent_streams_is_refused(counting_server: tuple[int, _Counting]) -> None:
    """With h2.max_concurrent_streams=5, a 6th open stream is refused (RST_STREAM
    REFUSED_STREAM, safe to retry); the five others are served on the same connection."""
    port, counter = counting_server

    def script(conn: Any) -> None:
        for i in range(6):
            conn.send_headers(1 + 2 * i, h2peer.grpc_headers(b"/test.Count/Call"))
        for i in range(6):
            conn.send_data(1 + 2 * i, h2peer.grpc_frame(b""), end_stream=True)

    with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}",
               "h2.max_concurrent_streams=5") as p:
        events = h2peer.exchange(p.outbound, script, until_stream=9)
        resets = {e.stream_id: e.error_code for e in events
                  if isinstance(e, h2.events.StreamReset)}
        assert resets == {11: h2.errors.ErrorCodes.REFUSED_STREAM}, events
        wait_for(lambda: counter.calls == 5, what="the five accepted calls")
        assert p.metric("proxy_errors_total", error="h2_refused_stream") == 1


@pytest.mark.parametrize("headers", [
    [(b":method", b"GET"), (b":path", b"/")],  # :scheme and :authority missing
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"X-Upper", b"1")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"connection", b"x")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"x", b"a\r\nb")],
])
def test_malformed_requests_are_stream_errors(
        counting_server: tuple[int, _Counting], headers: list[tuple[bytes, bytes]]) -> None:
    """Missing pseudo-headers, uppercase names, connection headers, CR/LF in values: that
    stream is reset with PROTOCOL_ERROR and goes nowhere; a good request on the same
    connection is answered."""
    port, counter = counting_server

    def script(conn: Any) -> None:
        conn.send_headers(1, headers, end_stream=True)
        conn.send_headers(3, h2peer.grpc_headers(b"/test.Count/Call"))
        conn.send_data(3, h2peer.grpc_frame(b""), end_stream=True)

    with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}") as p:
        events = h2peer.exchange(p.outbound, script, until_stream=3)
        resets = {e.stream_id: e.error_code for e in events
                  if isinstance(e, h2.events.StreamReset)}
        assert resets.get(1) == h2.errors.ErrorCodes.PROTOCOL_ERROR, events
        trailers = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
        assert trailers and (b"grpc-status", b"0") in trailers[0].headers, events
        assert counter.calls == 1
        assert p.metric("proxy_errors_total", error="h2_malformed") == 1


def test_silent_upstream_is_dropped_by_keepalive() -> None:
    """An upstream that accepts and then never answers (not even PING) is closed after
    h2.keepalive_interval + h2.keepalive_timeout, and its stream gets a 502."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    held: list[socket.socket] = []

    def accept() -> None:
        try:
            conn, _ = silent.accept()
            held.append(conn)  # read nothing, answer nothing
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{silent.getsockname()[1]}",
                   "h2.keepalive_interval=500ms", "h2.keepalive_timeout=500ms") as p:
            r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-D", "-",
                                "--max-time", "15", f"http://127.0.0.1:{p.outbound}/"],
                               capture_output=True, timeout=20)
            assert r.stdout.startswith(b"HTTP/2 502"), r.stdout + r.stderr
            assert p.metric("proxy_errors_total", error="h2_keepalive_timeout") == 1
    finally:
        silent.close()
        for conn in held:
            conn.close()


def test_shutdown_lets_in_flight_calls_finish(grpc_timing_server: int) -> None:
    """SIGTERM during a call: the listener closes, the call in flight completes, exit 0."""
    p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{grpc_timing_server}")
    result: dict[str, Any] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{p.outbound}") as channel:
            call = channel.unary_unary("/test.Time/Slow")
            done = threading.Event()

            def run() -> None:
                try:
                    result["reply"] = call(b"1", timeout=10)
                except grpc.RpcError as exc:
                    result["error"] = exc
                done.set()

            threading.Thread(target=run, daemon=True).start()
            wait_for(lambda: p.metric("request_total", protocol="h2") == 1,
                     what="the call to reach the proxy")
            code = p.stop()
            assert done.wait(10)
    finally:
        p.stop()
    assert result.get("reply") == b"slow", result
    assert code == 0


def test_slow_reader_bounds_what_the_proxy_reads_and_holds(tmp_path: Any) -> None:
    """A client that stops granting flow-control credit after its first window: the proxy
    stops reading the 50 MB response from upstream (end-to-end flow control) and its
    memory stays flat."""
    (tmp_path / "huge.bin").write_bytes(b"z" * 50_000_000)
    with nghttpd_serving(str(tmp_path)) as port:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}") as p:
            rss_before = p.peak_rss_kib()
            conn = h2.connection.H2Connection(h2.config.H2Configuration(
                client_side=True, header_encoding=None))
            conn.initiate_connection()
            conn.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"),
                                  (b":path", b"/huge.bin"), (b":authority", b"t")],
                              end_stream=True)
            received = 0
            with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
                s.sendall(conn.data_to_send())
                while received < 65535:  # read the first window, never acknowledge it
                    for event in conn.receive_data(s.recv(65536)):
                        if isinstance(event, h2.events.DataReceived):
                            received += len(event.data)
                    s.sendall(conn.data_to_send())  # settings acks only, no WINDOW_UPDATE

                last = [-1.0]

                def settled() -> bool:
                    now = p.metric("tcp_read_bytes_total", protocol="h2", peer="dst")
                    same = now == last[0]
                    last[0] = now
                    return same

                wait_for(settled, timeout=10, interval=0.3, what="upstream reads to stop")
                assert last[0] < 1_000_000, f"proxy read {last[0]:.0f} bytes upstream"
                assert (p.peak_rss_kib() - rss_before) / 1024 < 16


def test_streams_past_the_upstream_limit_use_more_connections(h2mesh: ProxyProcess) -> None:
    """nghttpd allows 100 concurrent streams; 300 at once all succeed, over more than one
    upstream connection (none is refused for want of stream slots)."""
    r = subprocess.run(["h2load", "-n", "6000", "-c", "30", "-m", "10",
                        f"http://127.0.0.1:{h2mesh.outbound}/index.html"],
                       capture_output=True, text=True, timeout=120)
    assert "6000 succeeded, 0 failed, 0 errored" in r.stdout, r.stdout
    assert h2mesh.metric("tcp_open_total", protocol="h2", peer="dst") >= 2
    assert h2mesh.metric("response_total", protocol="h2", status_code="502") == 0


def test_a_client_leaving_mid_stream_does_not_hurt_others(grpc_timing_server: int) -> None:
    """Clients that vanish with calls in flight (their responses arrive for a closed
    connection) leave the shared upstream connection serving everyone else."""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{grpc_timing_server}") as p:
        with grpc.insecure_channel(f"127.0.0.1:{p.outbound}") as channel:
            remaining = channel.unary_unary("/test.Time/Remaining")
            assert remaining(b"", timeout=5)
            for _ in range(5):
                conn = h2.connection.H2Connection(h2.config.H2Configuration(
                    client_side=True, header_encoding=None))
                conn.initiate_connection()
                conn.send_headers(1, h2peer.grpc_headers(b"/test.Time/Slow"))
                conn.send_data(1, h2peer.grpc_frame(b"0.2"), end_stream=True)
                with socket.create_connection(("127.0.0.1", p.outbound)) as s:
                    s.sendall(conn.data_to_send())
                    wait_for(lambda: p.metric("request_total", protocol="h2") >= 2,
                             what="the call to reach the proxy")
                    conn.close_connection()
                    s.sendall(conn.data_to_send())  # GOAWAY, then gone
            wait_for(lambda: p.metric("tcp_open_connections", protocol="h2", peer="src") == 1,
                     what="the vanished clients' connections to be gone")
            for _ in range(3):
                assert remaining(b"", timeout=5)
        assert p.metric("tcp_open_total", protocol="h2", peer="dst") == 1
    assert "Fatal error" not in p.output(), p.output()


def test_client_that_does_not_read_is_not_fed_and_cannot_pile_up_answers(
        tmp_path: Any) -> None:
    """A client that grants huge windows but never reads its socket: once the proxy's
    write buffer to it is full, the proxy stops sending DATA (and so stops reading the
    upstream), and a stream of PINGs whose ACKs can only pile up gets the connection
    dropped (proxy_errors_total{error="h2_control_backlog"})."""
    (tmp_path / "huge.bin").write_bytes(b"z" * 50_000_000)
    with nghttpd_serving(str(tmp_path)) as port:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{port}") as p:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(
                client_side=True, header_encoding=None))
            conn.initiate_connection()
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
            conn.increment_flow_control_window(2**31 - 1 - 65535)
            conn.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"),
                                  (b":path", b"/huge.bin"), (b":authority", b"t")],
                              end_stream=True)
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                s.connect(("127.0.0.1", p.outbound))
                s.sendall(conn.data_to_send())
                last = [-1.0]

                def settled() -> bool:
                    now = p.metric("tcp_read_bytes_total", protocol="h2", peer="dst")
                    same = now == last[0]
                    last[0] = now
                    return same

                wait_for(settled, timeout=10, interval=0.3, what="upstream reads to stop")
                assert last[0] < 16_000_000, f"proxy read {last[0]:.0f} bytes upstream"
                pings = b"".join(h2frame(6, 0, 0, b"%08d" % i) for i in range(400))
                try:
                    s.sendall(pings)
                except OSError:
                    pass  # already dropped
                wait_for(lambda: p.metric("proxy_errors_total", error="h2_control_backlog")
                         == 1, what="the connection to be dropped for its backlog")
            finally:
                s.close()
