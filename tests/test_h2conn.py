"""The HTTP/2 codec on raw frames: every connection error and stream error it must
detect as a server facing untrusted clients, flow control, and the client role's rules."""

from __future__ import annotations

import hpack
import pytest
from h2peer import Recorder, frames

from appliance.protocols.h2conn import H2Connection, H2Error
from appliance.protocols.h2frames import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    settings_frame,
)

PE, IE, FCE, SC, FSE, RS, CE, EYC = 1, 2, 3, 5, 6, 7, 9, 11
GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
POST5 = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"),
         (b":authority", b"a"), (b"content-length", b"5")]


def block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """A header block from an independent encoder (no dynamic table use)."""
    return hpack.Encoder().encode(headers)


def hdrs(sid: int, headers: list[tuple[bytes, bytes]] = GET, end: bool = True,
         flags: int = END_HEADERS) -> bytes:
    return frame(HEADERS, flags | (END_STREAM if end else 0), sid, block(headers))


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def server(ack: bool = True, **kw: int) -> tuple[H2Connection, Recorder]:
    """A server-role connection past the preface and the client's first SETTINGS; its
    handler credits DATA back at once if ``ack``."""
    rec = Recorder(ack)
    conn = H2Connection(rec, client=False, **kw)
    rec.conn = conn
    conn.start()
    conn.receive(PREFACE + settings_frame({}))
    conn.data_to_send()
    conn.answers = 0
    rec.events.clear()
    return conn, rec


def goaway_code(conn: H2Connection, data: bytes) -> int:
    """Feed ``data``; it must raise H2Error; return the GOAWAY code sent."""
    with pytest.raises(H2Error) as info:
        conn.receive(data)
    sent = [f for f in frames(conn.data_to_send()) if f[0] == GOAWAY]
    assert len(sent) == 1 and conn.closed
    code = int.from_bytes(sent[0][3][4:8], "big")
    assert code == info.value.code
    return code


CONNECTION_ERRORS = [
    ("DATA on stream 0", frame(DATA, 0, 0, b"x"), PE),
    ("DATA on an idle stream", frame(DATA, 0, 1, b"x"), PE),
    ("HEADERS on stream 0", hdrs(0), PE),
    ("HEADERS with an even id", hdrs(2), PE),
    ("a lower stream id than before", hdrs(5) + hdrs(3), PE),
    ("HEADERS on a stream closed both ways", hdrs(1) + b"", None),
    ("CONTINUATION without HEADERS", frame(CONTINUATION, END_HEADERS, 1, b""), PE),
    ("a header block interrupted", hdrs(1, flags=0) + frame(PING, 0, 0, b"8bytes!!"), PE),
    ("CONTINUATION for another stream", hdrs(1, flags=0) + frame(CONTINUATION, 4, 3, b""),
     PE),
    ("65 CONTINUATION frames", hdrs(1, flags=0) + frame(CONTINUATION, 0, 1, b"") * 65,
     EYC),
    ("a frame over 16384 bytes", frame(DATA, 0, 1, b"x" * 16385), FSE),
    ("SETTINGS on a stream", frame(SETTINGS, 0, 1, b""), PE),
    ("SETTINGS not a multiple of 6", frame(SETTINGS, 0, 0, b"\x00" * 5), FSE),
    ("SETTINGS ACK with a payload", frame(SETTINGS, ACK, 0, b"\x00" * 6), FSE),
    ("ENABLE_PUSH of 2", settings_frame({2: 2}), PE),
    ("INITIAL_WINDOW_SIZE over 2^31-1", settings_frame({4: 1 << 31}), FCE),
    ("MAX_FRAME_SIZE under 16384", settings_frame({5: 100}), PE),
    ("MAX_FRAME_SIZE over 2^24-1", settings_frame({5: 1 << 24}), PE),
    ("PING on a stream", frame(PING, 0, 1, b"8bytes!!"), PE),
    ("PING of 7 bytes", frame(PING, 0, 0, b"7bytes!"), FSE),
    ("GOAWAY on a stream", frame(GOAWAY, 0, 1, u32(0) + u32(0)), PE),
    ("GOAWAY of 7 bytes", frame(GOAWAY, 0, 0, b"\x00" * 7), FSE),
    ("WINDOW_UPDATE of 3 bytes", frame(WINDOW_UPDATE, 0, 0, b"\x00" * 3), FSE),
    ("WINDOW_UPDATE of 0 on the connection", frame(WINDOW_UPDATE, 0, 0, u32(0)), PE),
    ("connection window over 2^31-1", frame(WINDOW_UPDATE, 0, 0, u32((1 << 31) - 1)), FCE),
    ("RST_STREAM on stream 0", frame(RST_STREAM, 0, 0, u32(8)), PE),
    ("RST_STREAM on an idle stream", frame(RST_STREAM, 0, 1, u32(8)), PE),
    ("RST_STREAM of 3 bytes", hdrs(1, end=False) + frame(RST_STREAM, 0, 1, b"\x00" * 3),
     FSE),
    ("PRIORITY on stream 0", frame(PRIORITY, 0, 0, b"\x00" * 5), PE),
    ("PUSH_PROMISE from a client", frame(PUSH_PROMISE, END_HEADERS, 1, u32(2)), PE),
    ("padding as long as the frame", hdrs(1, end=False) + frame(DATA, PADDED, 1, b"\x05abcd"),
     PE),
    ("a header block that does not decode", frame(HEADERS, END_HEADERS, 1, b"\x80"), CE),
    ("a window change that overflows a stream",
     hdrs(1, end=False) + frame(WINDOW_UPDATE, 0, 1, u32((1 << 31) - 1 - 65535))
     + settings_frame({4: 65536}), FCE),
]


@pytest.mark.parametrize("what,data,code", [c for c in CONNECTION_ERRORS if c[2]],
                         ids=[c[0] for c in CONNECTION_ERRORS if c[2]])
def test_connection_errors(what: str, data: bytes, code: int) -> None:
    """Each violation ends the connection with GOAWAY and the code RFC 9113 names."""
    conn, _ = server()
    assert goaway_code(conn, data) == code


def test_preface_and_first_settings() -> None:
    """A wrong preface, or a first frame other than SETTINGS, is PROTOCOL_ERROR."""
    conn = H2Connection(Recorder(), client=False)
    assert goaway_code(conn, b"GET / HTTP/1.1\r\n\r\n") == PE
    conn = H2Connection(Recorder(), client=False)
    assert goaway_code(conn, PREFACE + frame(PING, 0, 0, b"8bytes!!")) == PE
    conn = H2Connection(Recorder(), client=False)
    conn.receive(PREFACE[:10])  # a preface in pieces is fine
    conn.receive(PREFACE[10:] + settings_frame({}))
    assert conn.settings_seen


def test_headers_on_a_closed_stream_is_stream_closed() -> None:
    """A stream that ended both ways, then HEADERS on it: STREAM_CLOSED."""
    conn, rec = server()
    conn.receive(hdrs(1))
    s = conn.streams[1]
    conn.send_headers(s, [(b":status", b"200")], end=True)
    assert 1 not in conn.streams
    assert goaway_code(conn, hdrs(1)) == SC


def test_header_block_too_long_is_enhance_your_calm() -> None:
    """A header block over max_header_list_size + one frame: ENHANCE_YOUR_CALM."""
    conn, _ = server(max_header_list_size=1000)
    data = hdrs(1, flags=0) + frame(CONTINUATION, 0, 1, b"x" * 16384) * 2
    assert goaway_code(conn, data) == EYC


def stream_resets(conn: H2Connection) -> dict[int, int]:
    return {f[2]: int.from_bytes(f[3], "big") for f in frames(conn.data_to_send())
            if f[0] == RST_STREAM}


STREAM_ERRORS = [
    ("missing :path", hdrs(1, [(b":method", b"GET"), (b":scheme", b"http")]), PE,
     "h2_malformed"),
    ("uppercase name", hdrs(1, [*GET, (b"X-A", b"1")]), PE, "h2_malformed"),
    ("content-length without a body", hdrs(1, POST5), PE, "h2_malformed"),
    ("a body shorter than content-length",
     hdrs(1, POST5, end=False) + frame(DATA, END_STREAM, 1, b"abc"), PE, "h2_malformed"),
    ("a body longer than content-length",
     hdrs(1, POST5, end=False) + frame(DATA, 0, 1, b"abcdef"), PE, "h2_malformed"),
    ("trailers without END_STREAM",
     hdrs(1, end=False) + hdrs(1, [(b"x", b"1")], end=False), PE, "h2_malformed"),
    ("a pseudo-header in trailers",
     hdrs(1, end=False) + hdrs(1, [(b":path", b"/")]), PE, "h2_malformed"),
    ("DATA after END_STREAM", hdrs(1) + frame(DATA, 0, 1, b"x"), SC, "h2_protocol_error"),
    ("WINDOW_UPDATE of 0 on a stream", hdrs(1, end=False) + frame(WINDOW_UPDATE, 0, 1, u32(0)),
     PE, "h2_protocol_error"),
    ("a stream window over 2^31-1",
     hdrs(1, end=False) + frame(WINDOW_UPDATE, 0, 1, u32((1 << 31) - 65535)), FCE,
     "h2_protocol_error"),
    ("DATA beyond the stream window",
     hdrs(1, end=False) + frame(DATA, 0, 1, b"x" * 16384) * 4, FCE, "h2_protocol_error"),
    ("HEADERS depending on itself",
     frame(HEADERS, END_HEADERS | END_STREAM | PRIORITY_FLAG, 1, u32(1) + b"\x10"
           + block(GET)), PE, "h2_malformed"),
    ("PRIORITY depending on itself", hdrs(1, end=False) + frame(PRIORITY, 0, 1, u32(1) + b"!"),
     PE, "h2_protocol_error"),
    ("PRIORITY of 4 bytes", hdrs(1, end=False) + frame(PRIORITY, 0, 1, u32(0)), FSE,
     "h2_protocol_error"),
]


@pytest.mark.parametrize("what,data,code,kind", STREAM_ERRORS,
                         ids=[c[0] for c in STREAM_ERRORS])
def test_stream_errors(what: str, data: bytes, code: int, kind: str) -> None:
    """Each violation resets only its stream (RST_STREAM with the right code), tells the
    handler, and the connection serves a next request."""
    conn, rec = server(ack=False)
    conn.receive(data)
    assert stream_resets(conn) == {1: code}
    assert ("stream_error", 1, kind) in rec.events
    conn.receive(hdrs(3))
    assert rec.of("head")[-1][1] == 3 and not conn.closed


def test_streams_over_the_limit_are_refused() -> None:
    """max_concurrent_streams=2: the third open stream gets REFUSED_STREAM; once one
    closes, a new one is accepted."""
    conn, rec = server(max_concurrent_streams=2)
    conn.receive(hdrs(1) + hdrs(3) + hdrs(5))
    assert stream_resets(conn) == {5: RS}
    assert [e[1] for e in rec.of("head")] == [1, 3]
    conn.send_headers(conn.streams[1], [(b":status", b"204")], end=True)
    conn.receive(hdrs(7))
    assert [e[1] for e in rec.of("head")] == [1, 3, 7]


def test_header_list_too_large_is_answered_431() -> None:
    """A request header list over the limit: a 431 response then RST_STREAM NO_ERROR,
    and the HPACK table stays in step for the next request."""
    conn, rec = server(max_header_list_size=200)
    enc = hpack.Encoder()
    conn.receive(frame(HEADERS, END_HEADERS | END_STREAM, 1,
                       enc.encode([*GET, (b"x-big", b"v" * 300)])))
    out = frames(conn.data_to_send())
    assert [(f[0], f[2]) for f in out] == [(HEADERS, 1), (RST_STREAM, 1)]
    assert hpack.Decoder().decode(out[0][3], raw=True) == [(b":status", b"431")]
    assert out[1][3] == u32(0)
    conn.receive(frame(HEADERS, END_HEADERS | END_STREAM, 3, enc.encode(GET)))
    assert rec.of("head") == [("head", 3, GET, True)]


def test_control_frames_are_answered() -> None:
    """SETTINGS gets an ACK, PING gets an ACK with its payload; both are counted."""
    conn, rec = server()
    conn.receive(settings_frame({1: 0}) + frame(PING, 0, 0, b"12345678"))
    out = frames(conn.data_to_send())
    assert (SETTINGS, ACK, 0, b"") in out and (PING, ACK, 0, b"12345678") in out
    assert conn.answers == 2
    assert conn.encoder.max_size == 0


def test_continuation_padding_and_unknown_frames() -> None:
    """A header block split over CONTINUATION, padded HEADERS and DATA (padding counted
    in flow control) and an unknown frame type all work."""
    conn, rec = server()
    b = block(POST5)
    padded = b"\x03" + b[:4] + b"\x00\x00\x00"
    conn.receive(frame(0xFA, 0, 0, b"ignored") + frame(HEADERS, PADDED, 1, padded)
                 + frame(CONTINUATION, 0, 1, b[4:6]) + frame(CONTINUATION, END_HEADERS, 1, b[6:])
                 + frame(DATA, PADDED | END_STREAM, 1, b"\x02hello\x00\x00"))
    assert rec.events == [("head", 1, POST5, False), ("data", 1, b"hello", True)]
    assert conn.recv_unacked == 8  # the padding is credited too


def test_trailers_end_the_request() -> None:
    """HEADERS after DATA, with END_STREAM, are trailers."""
    conn, rec = server()
    conn.receive(hdrs(1, end=False) + frame(DATA, 0, 1, b"ab") + hdrs(1, [(b"x-t", b"1")]))
    assert rec.events[-1] == ("trailers", 1, [(b"x-t", b"1")])


def test_late_frames_on_a_stream_we_reset_are_ignored() -> None:
    """After our RST_STREAM, the peer's frames in flight for it are ignored, and its
    DATA is still credited to the connection window."""
    conn, rec = server()
    conn.receive(hdrs(1, end=False))
    conn.reset(conn.streams[1], 8)
    conn.data_to_send()
    conn.receive(frame(DATA, 0, 1, b"x" * 100) + hdrs(1, [(b"x", b"1")]))
    assert not conn.closed and not stream_resets(conn)
    assert conn.recv_unacked == 100


def test_flow_control_windows() -> None:
    """window() is the smaller of the stream and connection windows (and one frame);
    WINDOW_UPDATE and SETTINGS_INITIAL_WINDOW_SIZE move it."""
    conn, rec = server()
    conn.receive(hdrs(1))
    s = conn.streams[1]
    assert conn.window(s) == 16384
    conn.send_headers(s, [(b":status", b"200")])
    for _ in range(3):
        conn.send_data(s, b"x" * 16384)
    conn.send_data(s, b"x" * 16383)
    assert conn.window(s) == 0
    conn.receive(frame(WINDOW_UPDATE, 0, 1, u32(10)))
    assert conn.window(s) == 0  # the connection window is spent too
    conn.receive(frame(WINDOW_UPDATE, 0, 0, u32(100)))
    assert conn.window(s) == 10
    conn.receive(settings_frame({4: 65535 + 50}))
    assert conn.window(s) == 60
    assert ("window", 0) in rec.events and ("window", 1) in rec.events


def test_credit_is_returned_at_half_a_window() -> None:
    """ack() sends a stream WINDOW_UPDATE once half the stream window is owed."""
    rec = Recorder(ack=False)
    conn = H2Connection(rec, client=False)
    conn.start()
    conn.receive(PREFACE + settings_frame({}) + hdrs(1, end=False))
    conn.data_to_send()
    s = conn.streams[1]
    conn.ack(s, 30000)
    assert conn.data_to_send() == b""
    conn.ack(s, 3000)
    assert frames(conn.data_to_send()) == [(WINDOW_UPDATE, 0, 1, u32(33000))]


def test_peer_reset_and_goaway_reach_the_handler() -> None:
    """RST_STREAM from the peer closes the stream; GOAWAY is reported with its fields."""
    conn, rec = server()
    conn.receive(hdrs(1, end=False) + frame(RST_STREAM, 0, 1, u32(8))
                 + frame(GOAWAY, 0, 0, u32(1) + u32(0)))
    assert rec.events[1:] == [("reset", 1, 8), ("goaway", 1, 0)]
    assert conn.streams == {}


def test_a_closed_connection_reads_nothing() -> None:
    """After a connection error, input is ignored and nothing more is sent."""
    conn, rec = server()
    goaway_code(conn, frame(DATA, 0, 0, b""))
    conn.receive(hdrs(1))
    assert rec.events == [] and conn.data_to_send() == b""


# --- the client role (towards upstreams) ---------------------------------------------

def client() -> tuple[H2Connection, Recorder]:
    rec = Recorder()
    conn = H2Connection(rec, client=True)
    rec.conn = conn
    conn.start()
    assert conn.data_to_send().startswith(PREFACE)
    conn.receive(settings_frame({3: 50}))
    conn.data_to_send()
    rec.events.clear()
    return conn, rec


def test_client_informational_then_final_response() -> None:
    """1xx heads are reported apart; the final head and body follow."""
    conn, rec = client()
    s = conn.open_stream(GET, True)
    assert s is not None and s.sid == 1 and conn.remote_max_streams == 50
    conn.receive(frame(HEADERS, END_HEADERS, 1, block([(b":status", b"103")]))
                 + frame(HEADERS, END_HEADERS, 1, block([(b":status", b"200")]))
                 + frame(DATA, END_STREAM, 1, b"ok"))
    assert rec.events == [("info", 1, [(b":status", b"103")]),
                          ("head", 1, [(b":status", b"200")], False),
                          ("data", 1, b"ok", True)]
    assert conn.streams == {}


@pytest.mark.parametrize("what,data,kind", [
    ("no :status", frame(HEADERS, END_HEADERS, 1, block([(b"x", b"1")])),
     "h2_upstream_malformed"),
    ("a request pseudo-header", frame(HEADERS, END_HEADERS, 1, block(
        [(b":status", b"200"), (b":path", b"/")])), "h2_upstream_malformed"),
    ("DATA before HEADERS", frame(DATA, 0, 1, b"x"), "h2_malformed"),
    ("a connection-specific header", frame(HEADERS, END_HEADERS, 1, block(
        [(b":status", b"200"), (b"connection", b"close")])), "h2_upstream_malformed"),
])
def test_client_malformed_responses_are_stream_errors(what: str, data: bytes,
                                                      kind: str) -> None:
    """A malformed response resets that stream (PROTOCOL_ERROR) and tells the handler."""
    conn, rec = client()
    conn.open_stream(GET, True)
    conn.data_to_send()
    conn.receive(data)
    assert stream_resets(conn) == {1: PE}
    assert rec.events == [("stream_error", 1, kind)]


def test_client_head_response_with_body_is_malformed() -> None:
    """A response to HEAD that carries DATA is malformed."""
    conn, rec = client()
    conn.open_stream([(b":method", b"HEAD"), *GET[1:]], True, head=True)
    conn.data_to_send()
    conn.receive(frame(HEADERS, END_HEADERS, 1, block([(b":status", b"200"),
                                                      (b"content-length", b"5")]))
                 + frame(DATA, END_STREAM, 1, b"hello"))
    assert stream_resets(conn) == {1: PE}


@pytest.mark.parametrize("what,data", [
    ("PUSH_PROMISE", frame(PUSH_PROMISE, END_HEADERS, 1, u32(2) + block(GET))),
    ("ENABLE_PUSH=1 from a server", settings_frame({2: 1})),
    ("HEADERS on an even stream", frame(HEADERS, END_HEADERS, 2, block([(b":status", b"200")]))),
])
def test_client_connection_errors(what: str, data: bytes) -> None:
    """What a server may never send ends the connection with PROTOCOL_ERROR."""
    conn, _ = client()
    conn.open_stream(GET, True)
    assert goaway_code(conn, data) == PE


def test_client_ignores_late_frames_on_closed_streams() -> None:
    """A response for a stream we reset is decoded (HPACK stays in step) and dropped."""
    conn, rec = client()
    s = conn.open_stream(GET, True)
    assert s is not None
    conn.reset(s, 8)
    enc = hpack.Encoder()
    conn.receive(frame(HEADERS, END_HEADERS, 1, enc.encode([(b":status", b"200"),
                                                            (b"x-a", b"1")]))
                 + frame(DATA, END_STREAM, 1, b"late"))
    s3 = conn.open_stream(GET, True)
    assert s3 is not None
    conn.receive(frame(HEADERS, END_HEADERS | END_STREAM, 3,
                       enc.encode([(b":status", b"200"), (b"x-a", b"1")])))
    assert rec.events == [("head", 3, [(b":status", b"200"), (b"x-a", b"1")], True)]
    assert not conn.closed


def test_large_header_blocks_are_sent_with_continuation() -> None:
    """A header block over the peer's frame size goes out as HEADERS + CONTINUATION."""
    conn, _ = client()
    conn.open_stream([*GET, (b"x-big", bytes(range(256)) * 100)], True)
    out = frames(conn.data_to_send())
    assert [f[0] for f in out] == [HEADERS, CONTINUATION]
    assert out[0][1] & END_HEADERS == 0 and out[1][1] & END_HEADERS
    assert hpack.Decoder().decode(out[0][3] + out[1][3], raw=True)[-1][0] == b"x-big"


def test_our_goaway_graceful_or_final() -> None:
    """GOAWAY NO_ERROR names the last stream and lets open streams finish; GOAWAY with an
    error code ends the connection: nothing more is sent."""
    conn, rec = server()
    conn.receive(hdrs(1, end=False) + hdrs(3, end=False))
    conn.goaway(0, last_sid=1)
    s = conn.streams[1]
    assert conn.send_headers(s, [(b":status", b"200")], end=True)
    out = frames(conn.data_to_send())
    assert out[0] == (GOAWAY, 0, 0, u32(1) + u32(0)) and out[1][0] == HEADERS
    conn.goaway(11)
    assert conn.closed
    assert not conn.send_headers(conn.streams[3], [(b":status", b"200")])
    assert frames(conn.data_to_send()) == [(GOAWAY, 0, 0, u32(3) + u32(11))]
