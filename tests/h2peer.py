"""A raw HTTP/2 client on the h2 library, for what real clients will not send on purpose
(an invalid grpc-timeout, a deadline the client itself does not enforce, frame floods)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from support import ThreadedTcpServer


@dataclass
class Reply:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: int | None = None

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers + self.trailers:
            if n == name:
                return v
        return None


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def request(port: int, headers: list[tuple[bytes, bytes]], body: bytes = b"", *,
            timeout: float = 10.0) -> Reply:
    """One request on a fresh h2c connection; the reply once the stream ends or resets."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=not body)
    if body:
        conn.send_data(1, body, end_stream=True)
    return stream_reply(port, conn, timeout=timeout)


def stream_reply(port: int, conn: h2.connection.H2Connection, *,
                 timeout: float = 10.0) -> Reply:
    """Send what ``conn`` has queued (stream 1's request) on a fresh connection; the reply
    once stream 1 ends or resets."""
    reply = Reply()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(conn.data_to_send())
        while True:
            data = s.recv(65536)
            if not data:
                raise AssertionError("connection closed before the stream ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    reply.headers = list(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    reply.data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.TrailersReceived):
                    reply.trailers = list(event.headers)
                elif isinstance(event, h2.events.StreamReset):
                    reply.reset = event.error_code
                    return reply
                elif isinstance(event, h2.events.StreamEnded):
                    return reply
            s.sendall(conn.data_to_send())


def grpc_headers(path: bytes, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
            (b":authority", b"test"), (b"content-type", b"application/grpc"),
            (b"te", b"trailers"), *extra]


def _lenient_client(script) -> h2.connection.H2Connection:
    """A client connection that sends what it is told, valid or not, queued by script."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=False))
    conn.initiate_connection()
    script(conn)
    return conn


def attack(port: int, script, *, timeout: float = 10.0) -> tuple[int | None, list]:
    """Run ``script(conn)`` (which queues frames on a lenient client connection), send it
    all in one write, and read until the server's GOAWAY or close. Returns the GOAWAY error
    code (None if there was none) and the events seen."""
    conn = _lenient_client(script)
    events: list = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(conn.data_to_send())
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                return None, events
            if not data:
                return None, events
            for event in conn.receive_data(data):
                events.append(event)
                if isinstance(event, h2.events.ConnectionTerminated):
                    return event.error_code, events
            out = conn.data_to_send()
            if out:
                try:
                    s.sendall(out)
                except OSError:
                    return None, events


def exchange(port: int, script, *, until_stream: int, timeout: float = 10.0) -> list:
    """Like attack(), but read until ``until_stream`` ends (or is reset)."""
    conn = _lenient_client(script)
    events: list = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(conn.data_to_send())
        while True:
            data = s.recv(65536)
            if not data:
                raise AssertionError(f"connection closed; events so far: {events}")
            for event in conn.receive_data(data):
                events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length,
                                                   event.stream_id)
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)) \
                        and event.stream_id == until_stream:
                    return events
            out = conn.data_to_send()
            if out:
                s.sendall(out)


# --- in memory: a recording handler for the codec, and raw frames ------------------------

class Recorder:
    """A codec handler that records each call as a tuple (stream ids, not objects)."""

    def __init__(self, ack: bool = True) -> None:
        self.events: list[tuple] = []
        self.ack = ack  # credit received DATA back at once
        self.conn: Any = None

    def on_head(self, s, headers, end):
        self.events.append(("head", s.sid, list(headers), end))

    def on_info(self, s, headers):
        self.events.append(("info", s.sid, list(headers)))

    def on_data(self, s, data, flow, end):
        self.events.append(("data", s.sid, data, end))
        if self.ack and self.conn is not None:
            self.conn.ack(s, flow)

    def on_trailers(self, s, headers):
        self.events.append(("trailers", s.sid, list(headers)))

    def on_reset(self, s, code):
        self.events.append(("reset", s.sid, code))

    def on_stream_error(self, s, sid, kind, reason):
        self.events.append(("stream_error", sid, kind))

    def on_window(self, s):
        self.events.append(("window", s.sid if s is not None else 0))

    def on_settings(self):
        self.events.append(("settings",))

    def on_ping_ack(self, data):
        self.events.append(("ping_ack", data))

    def on_goaway(self, last_sid, code):
        self.events.append(("goaway", last_sid, code))

    def on_control(self):
        pass

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split bytes into (type, flags, stream id, payload)."""
    out = []
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        out.append((data[pos + 3], data[pos + 4],
                    int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF,
                    data[pos + 9:pos + 9 + length]))
        pos += 9 + length
    return out


# --- a real HTTP/2 (h2c) server on the h2 library, for translation tests ------------------

@dataclass
class Seen:
    """A request as the server received it."""

    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: int | None = None


class H2Server(ThreadedTcpServer):
    """An h2c server (h2 library, prior knowledge), one thread per connection.

    ``/echo`` answers 200 with the request body and no content-length (so an HTTP/1.1
    client gets it chunked), and with trailers naming the request's trailers if it had
    any; ``/trailers`` answers ``ok`` and a trailer ``x-checksum: 42``; ``/big?N`` answers
    N bytes (with content-length) as fast as flow control allows; ``/early`` answers 103
    then 200; ``/head`` answers 204.
    Every request (or its reset) is kept in ``seen``, and ``connections`` counts accepts.
    """

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], Seen] = {}
        super().__init__(backlog=64)

    def handle(self, s: socket.socket, n: int) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        conn.initiate_connection()
        pending: dict[int, list] = {}  # sid -> [data left, trailers]
        try:
            s.sendall(conn.data_to_send())
            while True:
                data = s.recv(65536)
                if not data:
                    return
                for event in conn.receive_data(data):
                    self._event(conn, n, event, pending)
                self._push(conn, pending)
                s.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            return
        finally:
            s.close()

    def _event(self, conn: Any, n: int, event: Any, pending: dict[int, list]) -> None:
        key = (n, getattr(event, "stream_id", 0))
        if isinstance(event, h2.events.RequestReceived):
            self.seen[key] = Seen(list(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            self.seen[key].body += event.data
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            self.seen[key].trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamReset):
            if key in self.seen:
                self.seen[key].reset = event.error_code
            pending.pop(event.stream_id, None)
        if isinstance(event, h2.events.StreamEnded):
            self._respond(conn, event.stream_id, self.seen[key], pending)

    def _respond(self, conn: Any, sid: int, seen: Seen, pending: dict[int, list]) -> None:
        path = dict(seen.headers)[b":path"]
        if path == b"/echo":
            conn.send_headers(sid, [(b":status", b"200"), (b"x-body", b"%d" % len(seen.body))])
            trailers = [(b"x-request-trailers", b",".join(n for n, _ in seen.trailers))] \
                if seen.trailers else None
            pending[sid] = [seen.body, trailers]
        elif path == b"/trailers":
            conn.send_headers(sid, [(b":status", b"200")])
            pending[sid] = [b"ok", [(b"x-checksum", b"42")]]
        elif path.startswith(b"/big?"):
            size = int(path[5:])
            conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"%d" % size)])
            pending[sid] = [b"b" * size, None]
        elif path == b"/early":
            conn.send_headers(sid, [(b":status", b"103"), (b"link", b"</s.css>")])
            conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"2")])
            pending[sid] = [b"hi", None]
        elif path == b"/head":
            conn.send_headers(sid, [(b":status", b"204")], end_stream=True)
        else:
            conn.send_headers(sid, [(b":status", b"404"), (b"content-length", b"0")],
                              end_stream=True)

    @staticmethod
    def _push(conn: Any, pending: dict[int, list]) -> None:
        for sid, item in list(pending.items()):
            body, trailers = item
            while body:
                size = min(len(body), conn.local_flow_control_window(sid),
                           conn.max_outbound_frame_size)
                if size <= 0:
                    break
                conn.send_data(sid, body[:size])
                body = body[size:]
            item[0] = body
            if not body:
                if trailers:
                    conn.send_headers(sid, trailers, end_stream=True)
                else:
                    conn.end_stream(sid)
                del pending[sid]

    def requests(self) -> list[Seen]:
        return list(self.seen.values())

