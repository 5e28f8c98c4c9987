"""A raw HTTP/2 client on the h2 library, for what real clients will not send on purpose
(an invalid grpc-timeout, a deadline the client itself does not enforce, frame floods)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events


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
    reply = Reply()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        conn.initiate_connection()
        conn.send_headers(1, headers, end_stream=not body)
        if body:
            conn.send_data(1, body, end_stream=True)
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
