"""Thrift through the running proxy (``appliance proxy`` subprocess) with unmodified
thriftpy2 clients and servers: every variant, per-call spreading over replicas on one
client connection, in-order replies, metrics, and bad input."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from support import ProxyProcess, free_port, proxy, recv_until_eof, wait_for
from thrift_idl.echo_service import VARIANTS, EchoServer, client, echo
from thriftpy2.protocol.binary import TBinaryProtocol
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TMemoryBuffer, TTransportException

from appliance.protocols.thrift import (
    CALL,
    EXCEPTION,
    REPLY,
    Decoder,
    Encoding,
    Message,
    Transport,
    Variant,
)

FRAMED_BINARY = Variant(Transport.FRAMED, Encoding.BINARY)
ITEM = echo.Item(id=9, name="item", weights=[0.25] * 50, counts={"k": 1 << 40},
                 tags=[3, 4], flag=False, blob=bytes(range(256)) * 8,
                 child=echo.Item(id=1, children=[echo.Item(id=2, bits=[True])]),
                 small=5, bits=[False] * 9, nested={7: ["x", "y"]})


def framed_call(name: str, seqid: int, args: Any) -> bytes:
    """A framed strict-binary CALL written by thriftpy2."""
    buf = TMemoryBuffer()
    proto = TBinaryProtocol(buf)
    proto.write_message_begin(name, CALL, seqid)
    args.write(proto)
    data = bytes(buf.getvalue())
    return struct.pack(">i", len(data)) + data


def read_replies(sock: socket.socket, count: int, variant: Variant = FRAMED_BINARY
                 ) -> list[Message]:
    decoder = Decoder(variant)
    out: list[Message] = []
    while len(out) < count:
        data = sock.recv(65536)
        assert data, f"connection closed after {len(out)} of {count} replies"
        out += decoder.feed(data)
    return out


def result(msg: Message, payload: Any) -> Any:
    """thriftpy2 reads a framed binary reply's result struct."""
    proto = TBinaryProtocol(TMemoryBuffer(msg.data[4:]))
    proto.read_message_begin()
    proto.read_struct(payload)
    return payload


def static(**services: list[str]) -> str:
    body = ", ".join(f"{name}: [{', '.join(repr(a) for a in addrs)}]"
                     for name, addrs in services.items())
    return f"namers=[{{kind: static, services: {{{body}}}}}]"


@pytest.fixture
def replicas() -> Iterator[tuple[EchoServer, EchoServer]]:
    a, b = EchoServer("framed-binary", "a"), EchoServer("framed-binary", "b")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def routed(a: EchoServer, b: EchoServer, *settings: str) -> tuple[ProxyProcess, int]:
    """A proxy whose connections' original destination is 127.0.0.1:<port>, a name the
    dtab sends to the two replicas."""
    port = free_port()
    p = ProxyProcess(f"outbound.orig_dst_override=127.0.0.1:{port}",
                     f"routing.dtab=/svc/127.0.0.1:{port} => /#/static/echo",
                     static(echo=[f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]), *settings)
    return p, port


# --- calls in every variant ------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_calls_succeed_in_every_variant(variant: str) -> None:
    """Calls, a large argument, every wire type, a declared exception and a oneway call
    go through; /metrics counts them under protocol="thrift"."""
    server = EchoServer(variant)
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{server.port}") as p:
            c = client(variant, p.outbound)
            try:
                assert c.ping() == "pong"
                assert [c.add(i, 1000) for i in range(20)] == [i + 1000 for i in range(20)]
                assert c.echo("é" * 100_000) == "é" * 100_000
                assert c.roundtrip(ITEM) == ITEM
                with pytest.raises(echo.Unavailable) as caught:
                    c.fail("down for maintenance")
                assert caught.value.why == "down for maintenance"
                c.note("one-way")
                assert c.ping() == "pong"
            finally:
                c.close()
            wait_for(lambda: server.handler.notes == ["one-way"], what="the oneway call")
            assert p.metric("request_total", direction="outbound", protocol="thrift",
                            authority=f"127.0.0.1:{server.port}") == 26
            assert p.metric("response_total", protocol="thrift", status_code="200",
                            classification="success") == 26
            assert p.metric("tcp_open_total", protocol="thrift", peer="src") == 1
            assert p.metric("tcp_open_total", protocol="thrift", peer="dst") == 1
    finally:
        server.close()


@pytest.mark.parametrize("variant", ["framed-binary", "buffered-compact"])
def test_calls_on_one_connection_spread_over_two_replicas(variant: str) -> None:
    """The dtab names two replicas: one client connection's calls alternate (round
    robin), each call balanced on its own."""
    a, b = EchoServer(variant, "a"), EchoServer(variant, "b")
    p, _ = routed(a, b, "balancer.kind=round_robin")
    try:
        c = client(variant, p.outbound)
        try:
            answers = Counter(c.whoami() for _ in range(20))
        finally:
            c.close()
        assert answers == {"a": 10, "b": 10}
        assert p.metric("tcp_open_total", protocol="thrift", peer="src") == 1
        assert p.metric("tcp_open_total", protocol="thrift", peer="dst") == 2
    finally:
        p.stop()
        a.close()
        b.close()


def test_pipelined_calls_are_answered_in_call_order(
        replicas: tuple[EchoServer, EchoServer]) -> None:
    """Five calls in one write, spread over two replicas, the first one slow: the replies
    come back in call order, each with its own seqid and answer."""
    a, b = replicas
    p, _ = routed(a, b, "balancer.kind=round_robin")
    try:
        calls = [framed_call("slow", 100, echo.Echo.slow_args(seconds=0.3))]
        calls += [framed_call("add", 100 + i, echo.Echo.add_args(a=i, b=i)) for i in (1, 2, 3, 4)]
        with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
            s.sendall(b"".join(calls))
            replies = read_replies(s, 5)
        assert [(m.name, m.seqid, m.type) for m in replies] == [
            ("slow", 100, REPLY), ("add", 101, REPLY), ("add", 102, REPLY),
            ("add", 103, REPLY), ("add", 104, REPLY)]
        assert result(replies[0], echo.Echo.slow_result()).success in ("a", "b")
        assert [result(m, echo.Echo.add_result()).success for m in replies[1:]] == [2, 4, 6, 8]
        assert a.calls.total() + b.calls.total() == 5 and a.calls and b.calls
    finally:
        p.stop()


def test_a_deep_pipeline_is_bounded_at_64_calls_in_flight() -> None:
    """100 slow calls in one write: at most 64 run upstream at once (the rest wait in
    the proxy), and all 100 replies come back in order."""
    server = EchoServer("framed-binary")
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{server.port}") as p, \
                socket.create_connection(("127.0.0.1", p.outbound), timeout=20) as s:
            s.sendall(b"".join(framed_call("slow", i, echo.Echo.slow_args(seconds=0.5))
                               for i in range(100)))
            replies = read_replies(s, 100)
        assert [m.seqid for m in replies] == list(range(100))
        assert all(m.type == REPLY for m in replies)
        assert 32 <= server.handler.peak <= 64, server.handler.peak
    finally:
        server.close()


def test_per_method_metrics(replicas: tuple[EchoServer, EchoServer]) -> None:
    """request_total and response_total carry the Thrift method."""
    a, _ = replicas
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{a.port}") as p:
        c = client("framed-binary", p.outbound)
        try:
            for _ in range(3):
                c.ping()
            c.add(1, 2)
        finally:
            c.close()
        assert p.metric("request_total", protocol="thrift", method="ping") == 3
        assert p.metric("request_total", protocol="thrift", method="add") == 1
        assert p.metric("response_total", protocol="thrift", method="ping",
                        status_code="200") == 3


# --- failures the proxy answers ----------------------------------------------------------

def test_unreachable_upstream_gets_a_tapplicationexception() -> None:
    """Nothing listens at the destination: the call gets INTERNAL_ERROR naming why, the
    connection stays usable, and /metrics shows a 502."""
    with proxy(f"outbound.orig_dst_override=127.0.0.1:{free_port()}") as p:
        c = client("framed-binary", p.outbound)
        try:
            for _ in range(2):
                with pytest.raises(TApplicationException) as caught:
                    c.ping()
                assert caught.value.type == TApplicationException.INTERNAL_ERROR
                assert str(caught.value).startswith("appliance: upstream unreachable")
        finally:
            c.close()
        assert p.metric("response_total", protocol="thrift", status_code="502") == 2
        assert p.metric("proxy_errors_total", error="connect_refused") >= 2


def test_trace_upgrade_probe_is_declined_and_calls_go_on() -> None:
    """Finagle's TTwitter probe gets UNKNOWN_METHOD (not upgraded); the next call works."""
    server = EchoServer("framed-binary")
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{server.port}") as p, \
                socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
            s.sendall(framed_call("__can__finagle__trace__v3__", 1, echo.Echo.ping_args())
                      + framed_call("ping", 2, echo.Echo.ping_args()))
            probe, ping = read_replies(s, 2)
            assert (probe.type, probe.seqid, ping.type, ping.seqid) == (EXCEPTION, 1, REPLY, 2)
            assert result(probe, TApplicationException()).type == \
                TApplicationException.UNKNOWN_METHOD
            assert server.calls == {"ping": 1}
    finally:
        server.close()


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad,kind", [
    # a message type 9 inside a valid frame
    (b"\x00\x00\x00\x0d\x80\x01\x00\x09\x00\x00\x00\x01m\x00\x00\x00\x01", "thrift_malformed"),
    # a frame that claims 17 MiB (the limit is 16 MiB)
    (struct.pack(">i", 17 * 1024 * 1024) + b"\x80\x01\x00\x01", "thrift_too_large"),
])
def test_bad_frame_closes_only_its_connection(bad: bytes, kind: str) -> None:
    """After a good call, a malformed or oversized frame closes that connection at once
    and is counted; another client's connection is not affected."""
    server = EchoServer("framed-binary")
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{server.port}") as p:
            good = client("framed-binary", p.outbound)
            try:
                assert good.ping() == "pong"
                with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
                    s.sendall(framed_call("ping", 1, echo.Echo.ping_args()))
                    assert read_replies(s, 1)[0].type == REPLY
                    s.sendall(bad)
                    assert recv_until_eof(s) == b""
                assert good.add(2, 2) == 4
            finally:
                good.close()
            assert p.metric("proxy_errors_total", direction="outbound", error=kind) == 1
    finally:
        server.close()


def test_message_cut_short_by_eof_is_counted_truncated() -> None:
    """The client half-closes inside a message: the connection closes, counted."""
    server = EchoServer("framed-binary")
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{server.port}") as p:
            with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
                s.sendall(framed_call("ping", 1, echo.Echo.ping_args())[:-1])
                s.shutdown(socket.SHUT_WR)
                assert recv_until_eof(s) == b""
            assert p.metric("proxy_errors_total", error="thrift_truncated") == 1
            assert server.calls.total() == 0
    finally:
        server.close()


def test_client_half_close_after_calls_still_gets_the_replies() -> None:
    """Calls, then a half-close: every reply arrives, then the proxy closes."""
    server = EchoServer("framed-binary")
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{server.port}") as p:
            with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
                s.sendall(b"".join(framed_call("add", i, echo.Echo.add_args(a=i, b=1))
                                   for i in range(3)))
                s.shutdown(socket.SHUT_WR)
                replies = Decoder(FRAMED_BINARY).feed(recv_until_eof(s))
            assert [m.seqid for m in replies] == [0, 1, 2]
    finally:
        server.close()


def test_unknown_variant_is_relayed_as_opaque_tcp() -> None:
    """A THeader start (a variant the proxy does not speak) passes through unchanged."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(conn.recv(1024))

    threading.Thread(target=serve, daemon=True).start()
    theader = b"\x00\x00\x00\x0e\x0f\xff\x00\x00\x00\x00\x00\x01\x00\x01\x00\x00\x00\x00"
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{listener.getsockname()[1]}") as p:
            with socket.create_connection(("127.0.0.1", p.outbound), timeout=10) as s:
                s.sendall(theader)
                got = b""
                while len(got) < len(theader):
                    got += s.recv(1024)
                assert got == theader
            assert p.metric("tcp_open_total", protocol="opaque", peer="src") == 1
            assert p.metric("tcp_open_total", protocol="thrift", peer="src") == 0
    finally:
        listener.close()


def test_server_closing_idle_connections_does_not_fail_calls() -> None:
    """The server drops idle connections after 0.2 s; calls after a pause still work
    (the pool notices the close, or a stale connection is retried once)."""
    server = EchoServer("buffered-binary", client_timeout=200)
    try:
        with proxy(f"outbound.orig_dst_override=127.0.0.1:{server.port}") as p:
            c = client("buffered-binary", p.outbound)
            try:
                for i in range(3):
                    assert c.add(i, i) == 2 * i
                    time.sleep(0.4)
            finally:
                c.close()
            assert p.metric("response_total", protocol="thrift", status_code="200") == 3
    except TTransportException as exc:  # pragma: no cover - a failure, with context
        raise AssertionError(f"client connection failed: {exc}") from exc
    finally:
        server.close()
