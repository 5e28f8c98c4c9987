"""The HTTP/1 codec: framing under every split, limits, errors, and h11 as a strict peer."""

from __future__ import annotations

from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.protocols.http1 import (
    HttpError,
    RequestParser,
    body_piece,
    chunk,
    error_response,
    last_chunk,
    serialize_request,
)

VIA = b"1.1 test-out (appliance)"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_head(self, head: Any) -> None:
        self.events.append(("head", head))

    def on_body(self, data: bytes) -> None:
        self.events.append(("body", bytes(data)))

    def on_end(self, trailers: Any) -> None:
        self.events.append(("end", trailers))

    def summary(self) -> list[tuple[str, Any]]:
        """Heads as (method/status, target); body pieces joined per message."""
        out: list[tuple[str, Any]] = []
        for kind, value in self.events:
            if kind == "head":
                out.append(("head", getattr(value, "target", getattr(value, "status", None))))
            elif kind == "body" and out and out[-1][0] == "body":
                out[-1] = ("body", out[-1][1] + value)
            else:
                out.append((kind, value))
        return out


PIPELINE = (
    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
    b"GET /d HTTP/1.0\r\n\r\n"
)
EXPECTED = [
    ("head", b"/a"), ("end", None),
    ("head", b"/b"), ("body", b"hello"), ("end", None),
    ("head", b"/c"), ("body", b"abcde"), ("end", [(b"X-Trailer", b"t")]),
    ("head", b"/d"), ("end", None),
]


def feed_split(data: bytes, cuts: list[int]) -> Recorder:
    rec = Recorder()
    parser = RequestParser(rec)
    last = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        parser.feed(data[last:cut])
        last = cut
    return rec


def test_pipelined_requests_in_one_read() -> None:
    """Four pipelined requests of every framing parse in order."""
    assert feed_split(PIPELINE, []).summary() == EXPECTED


def test_every_single_split_point() -> None:
    """Split the stream in two at every byte: the same events come out."""
    for i in range(len(PIPELINE)):
        assert feed_split(PIPELINE, [i]).summary() == EXPECTED, i


def test_one_byte_at_a_time() -> None:
    """Fed one byte per read, the parse is unchanged."""
    assert feed_split(PIPELINE, list(range(len(PIPELINE)))).summary() == EXPECTED


@settings(max_examples=300)
@given(st.lists(st.integers(min_value=0, max_value=len(PIPELINE)), max_size=12))
def test_random_splits(cuts: list[int]) -> None:
    """Hypothesis splits the stream at random points: the same events come out."""
    assert feed_split(PIPELINE, cuts).summary() == EXPECTED


def test_head_fields() -> None:
    """Framing and hop-by-hop headers are noted, not kept as end-to-end headers."""
    rec = Recorder()
    RequestParser(rec).feed(b"POST /x HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Hop\r\n"
                            b"X-Hop: 1\r\nKeep-Alive: 5\r\nTransfer-Encoding: chunked\r\n"
                            b"Via: 1.0 other\r\nExpect: 100-continue\r\n\r\n")
    head = rec.events[0][1]
    assert head.method == b"POST" and head.chunked and head.keep_alive
    assert head.host == b"h" and head.expect_continue
    assert head.via == [b"1.0 other"]
    assert [n for n, _ in head.end_to_end()] == [b"Host", b"Via", b"Expect"]


@pytest.mark.parametrize("wire,status", [
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nXYZ\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
])
def test_refusals(wire: bytes, status: int) -> None:
    """Smuggling shapes, broken syntax and oversized parts raise with the right status."""
    with pytest.raises(HttpError) as info:
        RequestParser(Recorder()).feed(wire)
    assert info.value.status == status


def test_oversized_head_refused_while_it_trickles_in() -> None:
    """A never-ending header line is refused once the limit passes, not held forever."""
    parser = RequestParser(Recorder(), max_header_bytes=1000)
    parser.feed(b"GET / HTTP/1.1\r\nX: ")
    with pytest.raises(HttpError) as info:
        for _ in range(100):
            parser.feed(b"a" * 100)
    assert info.value.status == 431


def h11_parse_request(wire: bytes) -> tuple[h11.Request, bytes, list[Any]]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(wire)
    request, body, trailers = None, b"", []
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            trailers = list(event.headers)
            break
        else:
            raise AssertionError(f"h11 stopped at {event!r}")
    assert request is not None
    return request, body, trailers


def test_serialized_request_is_valid_for_h11() -> None:
    """What we send upstream parses cleanly in h11, chunked body and trailers included."""
    rec = Recorder()
    RequestParser(rec).feed(b"POST /up HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\nT: 1\r\n\r\n")
    head = rec.events[0][1]
    wire = serialize_request(head, VIA) + chunk(b"wxyz") + last_chunk([(b"T", b"1")])
    request, body, trailers = h11_parse_request(wire)
    assert request.method == b"POST" and request.target == b"/up"
    assert request.http_version == b"1.1"
    assert dict(request.headers)[b"via"] == VIA
    assert b"connection" not in dict(request.headers)
    assert body == b"wxyz" and trailers == [(b"t", b"1")]


def test_error_response_is_valid_for_h11() -> None:
    """A proxy-generated error parses cleanly in h11, body and all."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(error_response(502, "upstream unreachable: refused", VIA, close=True))
    response = conn.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 502
    assert dict(response.headers)[b"l5d-proxy-error"] == b"upstream unreachable: refused"
    data = conn.next_event()
    assert isinstance(data, h11.Data) and data.data == b"upstream unreachable: refused\n"
    assert isinstance(conn.next_event(), h11.EndOfMessage)


@pytest.mark.parametrize(("data", "end", "chunked", "wire"), [
    (b"abc", False, False, b"abc"),
    (b"abc", True, False, b"abc"),
    (b"", True, False, b""),
    (b"abc", False, True, b"3\r\nabc\r\n"),
    (b"abc", True, True, b"3\r\nabc\r\n0\r\n\r\n"),
    (b"", True, True, b"0\r\n\r\n"),
    (b"", False, True, b""),
    (b"x" * 300, False, True, b"12c\r\n" + b"x" * 300 + b"\r\n"),
])
def test_body_piece(data: bytes, end: bool, chunked: bool, wire: bytes) -> None:
    """A body piece is sent as is, or as a chunk (never an empty one) and the last chunk."""
    assert body_piece(data, end, chunked) == wire
