"""The HTTP/2 codec against the ``h2`` library as an independent peer, in memory, in both
roles; and hypothesis: random splits of a byte stream change nothing, and mutated or
random frames never raise anything but :class:`H2Error`."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from h2peer import Recorder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.protocols.h2conn import H2Connection, H2Error, Stream
from appliance.protocols.h2frames import frame

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/echo"),
           (b":authority", b"peer")]


def h2_peer(client: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=client, header_encoding=None))
    conn.initiate_connection()
    return conn


class Sender:
    """Sends bodies on an h2 connection within its flow-control windows."""

    def __init__(self, conn: h2.connection.H2Connection) -> None:
        self.conn = conn
        self.pending: dict[int, list[Any]] = {}  # sid -> [body left, trailers]

    def queue(self, sid: int, body: bytes, trailers: list | None) -> None:
        self.pending[sid] = [body, trailers]
        self.push()

    def push(self) -> None:
        for sid, item in list(self.pending.items()):
            body, trailers = item
            while body:
                n = min(len(body), self.conn.local_flow_control_window(sid),
                        self.conn.max_outbound_frame_size)
                if n <= 0:
                    break
                self.conn.send_data(sid, body[:n])
                body = body[n:]
            item[0] = body
            if not body:
                if trailers:
                    self.conn.send_headers(sid, trailers, end_stream=True)
                else:
                    self.conn.end_stream(sid)
                del self.pending[sid]


class EchoApp(Recorder):
    """Our server role as an application: echoes each request's body, then trailers."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: dict[int, bytearray] = {}
        self.out: dict[int, list[Any]] = {}

    def on_head(self, s: Stream, headers: Any, end: bool) -> None:
        super().on_head(s, headers, end)
        self.bodies[s.sid] = bytearray()
        if end:
            self.respond(s, None)

    def on_data(self, s: Stream, data: bytes, flow: int, end: bool) -> None:
        super().on_data(s, data, flow, end)
        self.bodies[s.sid] += data
        if end:
            self.respond(s, None)

    def on_trailers(self, s: Stream, headers: Any) -> None:
        super().on_trailers(s, headers)
        self.respond(s, [(b"x-echoed", b"%d" % len(headers))])

    def respond(self, s: Stream, trailers: list | None) -> None:
        self.conn.send_headers(s, [(b":status", b"200"), (b"x-sid", b"%d" % s.sid)])
        self.out[s.sid] = [s, bytes(self.bodies[s.sid]), trailers]
        self.push()

    def on_window(self, s: Stream | None) -> None:
        self.push()

    def push(self) -> None:
        for sid, item in list(self.out.items()):
            s, body, trailers = item
            while body:
                n = min(len(body), self.conn.window(s))
                if n <= 0:
                    break
                self.conn.send_data(s, body[:n], end=False)
                body = body[n:]
            item[1] = body
            if not body:
                if trailers:
                    self.conn.send_headers(s, trailers, end=True)
                else:
                    self.conn.send_data(s, b"", end=True)
                del self.out[sid]


def test_our_server_echoes_for_an_h2_client() -> None:
    """An h2 client sends 20 requests with bodies up to 200 kB (beyond every window),
    some with trailers; our server echoes each, end to end flow control included."""
    app = EchoApp()
    ours = H2Connection(app, client=False)
    app.conn = ours
    ours.start()
    peer = h2_peer(client=True)
    sender = Sender(peer)
    expected = {}
    for i in range(20):
        sid = 1 + 2 * i
        body = bytes([i]) * (i * 10_000)
        peer.send_headers(sid, REQUEST)
        sender.queue(sid, body, [(b"x-t", b"1")] if i % 3 == 0 else None)
        expected[sid] = body
    got: dict[int, bytearray] = {sid: bytearray() for sid in expected}
    ended: dict[int, list] = {}
    for _ in range(10_000):
        theirs = peer.data_to_send()
        if theirs:
            ours.receive(theirs)
        mine = ours.data_to_send()
        if not theirs and not mine:
            break
        for event in peer.receive_data(mine) if mine else []:
            if isinstance(event, h2.events.DataReceived):
                got[event.stream_id] += event.data
                peer.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                ended[event.stream_id] = event.headers
            elif isinstance(event, h2.events.StreamEnded):
                ended.setdefault(event.stream_id, [])
            elif isinstance(event, h2.events.WindowUpdated):
                sender.push()
    assert {sid: bytes(b) for sid, b in got.items()} == expected
    assert sorted(ended) == sorted(expected)
    assert ended[1] == [(b"x-echoed", b"1")] and ended[3] == []
    assert not ours.streams and not ours.closed


class H2App:
    """An h2 server application: answers each request with a body of its path's size."""

    def __init__(self) -> None:
        self.conn = h2_peer(client=False)
        self.sender = Sender(self.conn)

    def feed(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                size = int(dict(event.headers)[b":path"][1:])
                self.conn.send_headers(event.stream_id, [(b":status", b"200"),
                                                         (b"content-length", b"%d" % size)])
                self.sender.queue(event.stream_id, b"z" * size, None)
            elif isinstance(event, h2.events.WindowUpdated):
                self.sender.push()
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)


def test_our_client_against_an_h2_server() -> None:
    """Our client role opens 30 streams on one connection to an h2 server and receives
    every body exactly (content-length checked), crediting windows as it reads."""
    rec = Recorder()
    ours = H2Connection(rec, client=True)
    rec.conn = ours
    ours.start()
    app = H2App()
    sizes = {}
    for i in range(30):
        size = i * 7_001
        s = ours.open_stream([(b":method", b"GET"), (b":scheme", b"http"),
                              (b":path", b"/%d" % size), (b":authority", b"x")], True)
        assert s is not None
        sizes[s.sid] = size
    for _ in range(10_000):
        mine = ours.data_to_send()
        if mine:
            app.feed(mine)
        theirs = app.conn.data_to_send()
        if not mine and not theirs:
            break
        if theirs:
            ours.receive(theirs)
    bodies: dict[int, int] = {}
    for event in rec.of("data"):
        bodies[event[1]] = bodies.get(event[1], 0) + len(event[2])
    assert {sid: bodies.get(sid, 0) for sid in sizes} == sizes
    assert [e[1] for e in rec.of("head")] == sorted(sizes)
    assert not ours.streams and ours.local_open == 0


def _client_stream() -> bytes:
    """A varied client byte stream: requests, bodies, trailers, PING, SETTINGS, PRIORITY,
    WINDOW_UPDATE, a reset, CONTINUATION (a large header)."""
    peer = h2_peer(client=True)
    peer.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 1024})
    for i in range(6):
        sid = 1 + 2 * i
        extra = [(b"x-big", b"v" * 20_000)] if i == 4 else [(b"x-i", b"%d" % i)]
        peer.send_headers(sid, REQUEST + extra)
        peer.send_data(sid, b"body %d" % i, pad_length=3 if i % 2 else None)
        if i % 2:
            peer.send_headers(sid, [(b"x-trailer", b"t")], end_stream=True)
        else:
            peer.end_stream(sid)
        peer.ping(b"%08d" % i)
        peer.prioritize(sid, weight=32)
        peer.increment_flow_control_window(1000)
    peer.send_headers(13, REQUEST)
    peer.reset_stream(13)
    return peer.data_to_send()


_STREAM = _client_stream()


def _run(chunks: list[bytes]) -> tuple[list, bytes]:
    rec = Recorder()
    conn = H2Connection(rec, client=False)
    rec.conn = conn
    conn.start()
    out = []
    for chunk in chunks:
        conn.receive(chunk)
        out.append(conn.data_to_send())
    return rec.events, b"".join(out)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=len(_STREAM)), max_size=30))
def test_random_splits_change_nothing(cuts: list[int]) -> None:
    """Fed in any pieces, the same byte stream gives the same events and the same output
    as in one piece."""
    whole_events, whole_out = _run([_STREAM])
    assert len([e for e in whole_events if e[0] == "head"]) == 7
    points = sorted(set(cuts))
    pieces = [_STREAM[a:b] for a, b in zip([0, *points], [*points, len(_STREAM)],
                                           strict=True)]
    events, out = _run(pieces)
    assert events == whole_events
    assert out == whole_out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=24, max_value=len(_STREAM) - 1),
                          st.integers(min_value=0, max_value=255),
                          st.sampled_from(["set", "insert", "delete"])),
                min_size=1, max_size=5))
def test_mutated_streams_raise_only_h2_errors(mutations: list) -> None:
    """A valid stream with bytes changed, inserted or deleted: the codec may object, but
    only with H2Error (and GOAWAY), never another exception."""
    data = bytearray(_STREAM)
    for pos, value, op in mutations:
        pos = min(pos, len(data) - 1)
        if op == "set":
            data[pos] = value
        elif op == "insert":
            data.insert(pos, value)
        else:
            del data[pos]
    _feed_expecting_only_h2_errors(bytes(data))


_frames = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 255),
                             st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]),
                             st.binary(max_size=24)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(_frames)
def test_random_frames_raise_only_h2_errors(items: list) -> None:
    """Random frame types, flags, stream ids and payloads after a valid start: only
    H2Error may come out, in both roles."""
    body = b"".join(frame(t, f, sid, p) for t, f, sid, p in items)
    _feed_expecting_only_h2_errors(_STREAM[:24] + frame(4, 0, 0) + body)
    rec = Recorder()
    conn = H2Connection(rec, client=True)
    rec.conn = conn
    conn.start()
    conn.open_stream(REQUEST, False)
    try:
        conn.receive(frame(4, 0, 0) + body)
    except H2Error:
        assert conn.closed


def _feed_expecting_only_h2_errors(data: bytes) -> None:
    rec = Recorder()
    conn = H2Connection(rec, client=False)
    rec.conn = conn
    conn.start()
    try:
        for i in range(0, len(data), 7):
            conn.receive(data[i:i + 7])
            for sid, s in list(conn.streams.items()):  # the application answers
                if sid % 4 == 1:
                    conn.send_headers(s, [(b":status", b"200")], end=True)
    except H2Error:
        assert conn.closed
