"""The upstream-response codec: raw heads and bodies, framing by llhttp, under every split."""

from __future__ import annotations

from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.protocols.http1 import HttpError
from appliance.protocols.http1_response import ResponseHead, ResponseParser, rewrite_head

VIA = b"1.1 test-in (appliance)"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_head(self, head: ResponseHead) -> None:
        self.events.append(("head", head))

    def on_body(self, data: bytes) -> None:
        self.events.append(("body", bytes(data)))

    def on_end(self) -> None:
        self.events.append(("end", None))

    def summary(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for kind, value in self.events:
            if kind == "head":
                out.append(("head", value.status))
            elif kind == "body" and out and out[-1][0] == "body":
                out[-1] = ("body", out[-1][1] + value)
            else:
                out.append((kind, value))
        return out


def run(responses: list[tuple[bytes, bytes]], cuts: list[int] = (), *,
        decode: bool = False) -> Recorder:
    """Feed each (method, wire) exchange, split at ``cuts``, as a connection would."""
    rec = Recorder()
    parser = ResponseParser(rec)
    for method, wire in responses:
        parser.expect(method, decode=decode)
        last = 0
        for cut in sorted(set(c for c in cuts if 0 < c < len(wire))) + [len(wire)]:
            parser.feed(wire[last:cut])
            last = cut
        assert parser.done, (method, wire)
    return rec


CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n")
LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
EXCHANGES = [
    (b"GET", LENGTH),
    (b"GET", CHUNKED),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
    (b"POST", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n"),
]
EXPECTED = [
    ("head", 200), ("body", b"hello"), ("end", None),
    ("head", 200), ("body", CHUNKED.split(b"\r\n\r\n", 1)[1]), ("end", None),
    ("head", 200), ("end", None),
    ("head", 100), ("end", None), ("head", 204), ("end", None),
    ("head", 304), ("end", None),
]


def test_responses_in_one_read_each() -> None:
    """Length, chunked (raw, trailers included), HEAD, interim+204, 304: events in order."""
    assert run(EXCHANGES).summary() == EXPECTED


@pytest.mark.parametrize("cut", range(1, 60))
def test_every_split_point(cut: int) -> None:
    """Split every response at one byte offset: the same events and bytes come out."""
    assert run(EXCHANGES, [cut]).summary() == EXPECTED


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=1, max_value=120), max_size=10))
def test_random_splits(cuts: list[int]) -> None:
    """Hypothesis splits the reads at random: nothing changes."""
    assert run(EXCHANGES, cuts).summary() == EXPECTED


def test_raw_head_and_framing_flags() -> None:
    """The head is the exact bytes up to the blank line; framing is read from it."""
    rec = run([(b"GET", CHUNKED)])
    head = rec.events[0][1]
    assert head.raw == CHUNKED.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    assert head.chunked and not head.length and not head.delimited_by_close
    close = run_partial(b"GET", b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nuntil close")
    assert close.events[0][1].delimited_by_close
    assert close.summary() == [("head", 200), ("body", b"until close")]


def run_partial(method: bytes, wire: bytes) -> Recorder:
    rec = Recorder()
    parser = ResponseParser(rec)
    parser.expect(method)
    parser.feed(wire)
    return rec


def test_decode_for_http10_clients() -> None:
    """decode=True gives the de-chunked body, and rewrite drops Transfer-Encoding."""
    rec = run([(b"GET", CHUNKED)], decode=True)
    assert rec.summary()[1] == ("body", b"hello world")
    out = rewrite_head(rec.events[0][1], VIA, connection=b"close")
    assert b"transfer-encoding" not in out.lower()


@pytest.mark.parametrize("wire,reason", [
    (LENGTH + b"HTTP/1.1 200 OK\r\n\r\n", "bytes after the end of the response"),
    (b"HTTP/1.1 abc\r\n\r\n", "upstream sent an invalid response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx", "invalid response"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n", "invalid response"),
])
def test_violations_raise_before_anything_is_passed_on(wire: bytes, reason: str) -> None:
    """A broken response raises 502, and no event of that read reached the handler."""
    rec = Recorder()
    parser = ResponseParser(rec)
    parser.expect(b"GET")
    with pytest.raises(HttpError) as info:
        parser.feed(wire)
    assert info.value.status == 502 and reason in info.value.reason
    assert rec.events == []


def test_body_after_head_response_is_refused() -> None:
    """Bytes after a response to HEAD mean the upstream is confused: 502."""
    parser = ResponseParser(Recorder())
    parser.expect(b"HEAD")
    with pytest.raises(HttpError):
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")


def test_connect_and_upgrade_tunnel_offsets() -> None:
    """After a 2xx to CONNECT or a 101, feed() says where the tunnel bytes start."""
    parser = ResponseParser(Recorder())
    parser.expect(b"CONNECT")
    assert parser.feed(b"HTTP/1.1 200 OK\r\n") is None
    data = b"\r\nTUNNEL"
    offset = parser.feed(data)
    assert offset is not None and data[offset:] == b"TUNNEL"
    parser = ResponseParser(Recorder())
    parser.expect(b"GET")
    data = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: upgrade\r\n\r\nWS")
    offset = parser.feed(data)
    assert offset is not None and data[offset:] == b"WS"


def test_rewrite_drops_hop_by_hop_and_adds_via() -> None:
    """Connection, the headers it names, Keep-Alive go; Via and our Connection come; the rest
    stays byte for byte and h11 accepts the result."""
    wire = (b"HTTP/1.1 200 OK\r\nServer: s\r\nConnection: keep-alive, X-Hop\r\n"
            b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
            b"Content-Length: 2\r\n\r\nok")
    head = run_partial(b"GET", wire).events[0][1]
    out = rewrite_head(head, VIA, connection=b"close")
    assert out == (b"HTTP/1.1 200 OK\r\nServer: s\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
                   b"Content-Length: 2\r\nvia: " + VIA + b"\r\nconnection: close\r\n\r\n")
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(out + b"ok")
    assert isinstance(conn.next_event(), h11.Response)
    assert conn.next_event().data == b"ok"
    assert isinstance(conn.next_event(), h11.EndOfMessage)


def test_rewrite_of_a_101_keeps_upgrade() -> None:
    """A 101 keeps its Upgrade header even when Connection names it, and says upgrade."""
    wire = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: x\r\n\r\n")
    parser = ResponseParser(Recorder())
    rec = parser.handler
    parser.expect(b"GET")
    parser.feed(wire)
    out = rewrite_head(rec.events[0][1], VIA, connection=None, keep_upgrade=True)
    assert b"\r\nUpgrade: websocket\r\n" in out
    assert out.endswith(b"\r\nvia: " + VIA + b"\r\nconnection: upgrade\r\n\r\n")
    assert out.lower().count(b"connection:") == 1


@pytest.mark.parametrize("lines,kept", [
    (b"Connection: keep-alive\r\n", b""),
    (b"Connection: Keep-Alive\r\nKeep-Alive: timeout=5, max=100\r\n", b""),
    (b"Upgrade: h2,h2c\r\nConnection: Upgrade\r\n", b""),  # Apache's h2c advertisement
    (b"Connection: close, X-Hop\r\nX-Hop: 1\r\nX-Keep: 2\r\n", b"X-Keep: 2\r\n"),
    (b"X-Keep: 2\r\n", b"X-Keep: 2\r\n"),
    (b"connection: keep-alive\r\nCONNECTION: close\r\n", b""),
])
def test_rewrite_cases(lines: bytes, kept: bytes) -> None:
    """Each hop-by-hop shape is removed; other lines stay, in order."""
    wire = b"HTTP/1.1 200 OK\r\nServer: s\r\n" + lines + b"Content-Length: 0\r\n\r\n"
    head = run_partial(b"GET", wire).events[0][1]
    out = rewrite_head(head, VIA, connection=None)
    assert out == (b"HTTP/1.1 200 OK\r\nServer: s\r\n" + kept + b"Content-Length: 0\r\n"
                   b"via: " + VIA + b"\r\n\r\n")


def test_http10_upstream_head_is_sent_as_http11() -> None:
    """An HTTP/1.0 status line becomes HTTP/1.1: the client talks to us, not to upstream."""
    head = run_partial(b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").events[0][1]
    assert rewrite_head(head, VIA, connection=None).startswith(b"HTTP/1.1 200 OK\r\n")
    head = run_partial(b"GET", b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nX: y\r\n"
                               b"Keep-Alive: 5\r\nContent-Length: 0\r\n\r\n").events[0][1]
    assert rewrite_head(head, VIA, connection=None) == (
        b"HTTP/1.1 200 OK\r\nX: y\r\nContent-Length: 0\r\nvia: " + VIA + b"\r\n\r\n")
