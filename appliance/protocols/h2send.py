"""HTTP/2 connection state and the sending side (the base of :mod:`h2conn`).

Theory of operation: :class:`H2State` holds what one connection knows: its streams (with
the state table of RFC 9113 §5.1 below), both peers' settings, the flow-control windows,
the HPACK encoder and decoder, and ``out``, the frames queued for the peer. Its methods
are what the caller uses to send: :meth:`open_stream` (client role), :meth:`send_headers`,
:meth:`send_data` within :meth:`window`, :meth:`reset`, :meth:`ack` (credit received data
back), :meth:`ping`, :meth:`goaway`. Sending on a stream that can no longer send is a
no-op that returns False, never an exception: the other side of a proxied stream may have
ended it a moment ago, and that is not an error of this connection.

The ids of streams we reset are remembered for a while (bounded): their late frames are
ignored, as RFC 9113 §5.1 asks. So are the ids a client skipped, so that a HEADERS frame
for a stream that ended (STREAM_CLOSED) is told apart from one for an id that was never
used (PROTOCOL_ERROR).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

from appliance.protocols.h2frames import (
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    ENABLE_PUSH,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_HEADER_LIST_SIZE,
    MAX_STREAM_ID,
    NO_ERROR,
    PING,
    PREFACE,
    H2Error,
    frame,
    goaway_frame,
    pack_header,
    rst_frame,
    settings_frame,
    window_frame,
)
from appliance.protocols.hpack_codec import Decoder, Encoder

Headers = list[tuple[bytes, bytes]]
HeaderSeq = Sequence[tuple[bytes, bytes]]  # what is sent: a list, or a memoised tuple

# Stream states (RFC 9113 §5.1; the reserved states are absent: push is never used).
IDLE, OPEN, HALF_LOCAL, HALF_REMOTE, CLOSED = range(5)
# Events.
OPENED, SENT_END, RECV_END, RESET = range(4)
TRANSITIONS = {
    (IDLE, OPENED): OPEN,
    (OPEN, SENT_END): HALF_LOCAL,
    (OPEN, RECV_END): HALF_REMOTE,
    (HALF_LOCAL, RECV_END): CLOSED,
    (HALF_REMOTE, SENT_END): CLOSED,
    (OPEN, RESET): CLOSED,
    (HALF_LOCAL, RESET): CLOSED,
    (HALF_REMOTE, RESET): CLOSED,
}
_AFTER = [[TRANSITIONS.get((state, ev), -1) for state in range(5)] for ev in range(4)]
AFTER_SENT_END, AFTER_RECV_END = _AFTER[SENT_END], _AFTER[RECV_END]
CAN_SEND = (False, True, False, True, False)
CAN_RECV = (False, True, True, False, False)

_RESET_MEMORY = 256  # ids of streams we reset, remembered to ignore their late frames


class Handler(Protocol):
    """What the connection calls while it reads. ``s`` is the :class:`Stream`;
    ``s.user`` is the caller's own object for it."""

    def on_head(self, s: Stream, headers: Headers, end: bool) -> None: ...
    def on_info(self, s: Stream, headers: Headers) -> None: ...
    def on_data(self, s: Stream, data: bytes, flow: int, end: bool) -> None: ...
    def on_trailers(self, s: Stream, headers: Headers) -> None: ...
    def on_reset(self, s: Stream, code: int) -> None: ...
    def on_stream_error(self, s: Stream | None, sid: int, kind: str, reason: str) -> None: ...
    def on_window(self, s: Stream | None) -> None: ...
    def on_settings(self) -> None: ...
    def on_ping_ack(self, data: bytes) -> None: ...
    def on_goaway(self, last_sid: int, code: int) -> None: ...
    def on_control(self) -> None: ...


class Stream:
    """One stream's state: windows, content-length accounting, the caller's object."""

    __slots__ = ("sid", "state", "send_window", "recv_window", "recv_unacked", "clen",
                 "received", "head_done", "no_body", "user")

    def __init__(self, sid: int, send_window: int, recv_window: int) -> None:
        self.sid = sid
        self.state = OPEN
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_unacked = 0  # received, passed on, not yet credited back
        self.clen: int | None = None  # content-length of what we receive, if given
        self.received = 0
        self.head_done = False  # the request or final response head has arrived
        self.no_body = False  # a response to HEAD (or 204/304): DATA would be malformed
        self.user: Any = None

    def __repr__(self) -> str:
        return f"<Stream {self.sid} state={self.state}>"


class H2State:
    """A connection's state and its sending side; :class:`~h2conn.H2Connection` adds
    the reading."""

    def __init__(self, handler: Handler, *, client: bool, max_concurrent_streams: int = 100,
                 max_header_list_size: int = 65536, window: int = DEFAULT_WINDOW,
                 conn_window: int = 1 << 20) -> None:
        self.handler = handler
        self.client = client
        self.streams: dict[int, Stream] = {}
        self.encoder = Encoder()
        self.decoder = Decoder(max_list_size=max_header_list_size)
        self.out: list[bytes] = []
        self.closed = False  # after a connection error, or our GOAWAY with an error code
        # What we may send: the peer's settings and our send windows.
        self.send_window = DEFAULT_WINDOW
        self.remote_initial_window = DEFAULT_WINDOW
        self.max_frame = DEFAULT_MAX_FRAME
        self.remote_max_streams = MAX_STREAM_ID  # unlimited until the peer says
        # What the peer may send: our settings and receive windows.
        self.max_streams = max_concurrent_streams
        self.max_list = max_header_list_size
        self.local_window = window
        self.conn_window = conn_window
        self.recv_window = DEFAULT_WINDOW
        self.recv_unacked = 0
        # Stream ids.
        self.next_sid = 1 if client else 2
        self.remote_parity = 0 if client else 1
        self.highest_remote = 0
        self.local_open = 0
        self.remote_open = 0
        self.reset_sids: OrderedDict[int, None] = OrderedDict()  # we reset them (recent)
        self.skipped_ids: list[tuple[int, int]] = []  # peer ids never used (recent ranges)
        self.answers = 0  # SETTINGS and PING ACKs queued so far (the caller may reset it)

    def start(self) -> None:
        """Queue the preface (client role), our SETTINGS and the connection window."""
        settings = {MAX_HEADER_LIST_SIZE: self.max_list}
        if self.client:
            settings[ENABLE_PUSH] = 0
            self.out.append(PREFACE)
        else:
            settings[MAX_CONCURRENT_STREAMS] = self.max_streams
        if self.local_window != DEFAULT_WINDOW:
            settings[INITIAL_WINDOW_SIZE] = self.local_window
        self.out.append(settings_frame(settings))
        if self.conn_window > DEFAULT_WINDOW:
            self.out.append(window_frame(0, self.conn_window - DEFAULT_WINDOW))
            self.recv_window = self.conn_window

    def data_to_send(self) -> bytes:
        out = self.out
        if not out:
            return b""
        self.out = []
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def open_streams(self) -> int:
        """Streams this side opened that are not closed (what the peer's limit counts)."""
        return self.local_open if self.client else self.remote_open

    def fail(self, exc: H2Error) -> None:
        """Queue GOAWAY for a connection error; nothing more is read or sent after it."""
        if not self.closed:
            self.out.append(goaway_frame(self.highest_remote, exc.code,
                                         exc.reason.encode("ascii", "replace")[:200]))
            self.closed = True

    # --- stream bookkeeping -------------------------------------------------------------
    def _drop(self, s: Stream, reset: bool) -> None:
        """``s`` is closed: forget it (remembering its id for a while if we reset it)."""
        s.state = CLOSED
        if self.streams.pop(s.sid, None) is not None:
            if s.sid & 1 == self.remote_parity:
                self.remote_open -= 1
            else:
                self.local_open -= 1
        if reset:
            self._remember(s.sid)

    def _remember(self, sid: int) -> None:
        if self.client:
            return  # the client role ignores late frames whatever their stream
        memory = self.reset_sids
        memory[sid] = None
        if len(memory) > _RESET_MEMORY:
            memory.popitem(last=False)

    def skipped(self, sid: int) -> bool:
        """Was ``sid`` (a peer's id below its highest) never used? Ids a peer skips when
        it opens a stream are rare, so they are kept as ranges."""
        return any(lo <= sid <= hi for lo, hi in self.skipped_ids)

    def _recv_end(self, s: Stream) -> None:
        s.state = AFTER_RECV_END[s.state]
        if s.state == CLOSED:
            self._drop(s, False)

    def _sent_end(self, s: Stream) -> None:
        s.state = AFTER_SENT_END[s.state]
        if s.state == CLOSED:
            self._drop(s, False)

    def stream_error(self, s: Stream, code: int, kind: str, reason: str) -> None:
        """Reset ``s`` for a stream error and tell the handler."""
        self.reset(s, code)
        self.handler.on_stream_error(s, s.sid, kind, reason)

    def reset_sid(self, sid: int, code: int) -> None:
        """RST_STREAM for a stream that has no :class:`Stream` (refused, malformed)."""
        if not self.closed:
            self.out.append(rst_frame(sid, code))
            self._remember(sid)

    # --- sending ------------------------------------------------------------------------
    def open_stream(self, headers: HeaderSeq, end: bool, user: Any = None,
                    head: bool = False) -> Stream | None:
        """Client role: a new stream with its request head; None if no id is left."""
        sid = self.next_sid
        if sid > MAX_STREAM_ID or self.closed:
            return None
        self.next_sid = sid + 2
        s = Stream(sid, self.remote_initial_window, self.local_window)
        s.user = user
        s.no_body = head
        if end:
            s.state = HALF_LOCAL
        self.streams[sid] = s
        self.local_open += 1
        self._headers_out(sid, END_HEADERS | END_STREAM if end else END_HEADERS,
                          self.encoder.encode(headers))
        return s

    def send_headers(self, s: Stream, headers: HeaderSeq, end: bool = False) -> bool:
        """A response head, an informational response or (with ``end``) trailers."""
        if not CAN_SEND[s.state] or self.closed:
            return False
        self._headers_out(s.sid, END_HEADERS | END_STREAM if end else END_HEADERS,
                          self.encoder.encode(headers))
        if end:
            self._sent_end(s)
        return True

    def _headers_out(self, sid: int, flags: int, block: bytes) -> None:
        n = len(block)
        limit = self.max_frame
        if n <= limit:
            self.out.append(pack_header(n >> 8, n & 255, HEADERS, flags, sid) + block)
            return
        self.out.append(frame(HEADERS, flags & ~END_HEADERS, sid, block[:limit]))
        for start in range(limit, n, limit):
            last = start + limit >= n
            self.out.append(frame(CONTINUATION, END_HEADERS if last else 0, sid,
                                  block[start:start + limit]))

    def window(self, s: Stream) -> int:
        """How many DATA bytes ``s`` may send now (at most one frame's worth)."""
        if not CAN_SEND[s.state] or self.closed:
            return 0
        return min(self.send_window, s.send_window, self.max_frame)

    def send_data(self, s: Stream, data: bytes, end: bool = False) -> bool:
        """One DATA frame; the caller keeps it within :meth:`window`."""
        if not CAN_SEND[s.state] or self.closed:
            return False
        n = len(data)
        self.send_window -= n
        s.send_window -= n
        out = self.out
        out.append(pack_header(n >> 8, n & 255, DATA, END_STREAM if end else 0, s.sid))
        if n:
            out.append(data)
        if end:
            self._sent_end(s)
        return True

    def reset(self, s: Stream, code: int) -> None:
        """RST_STREAM ``code`` on ``s`` unless it is closed already."""
        if s.state != CLOSED and not self.closed:
            self.out.append(rst_frame(s.sid, code))
            self._drop(s, True)

    def ack(self, s: Stream | None, n: int) -> None:
        """``n`` received bytes were passed on: credit them back to the peer, with a
        WINDOW_UPDATE once half a window is owed."""
        if n <= 0 or self.closed:
            return
        unacked = self.recv_unacked + n
        if unacked >= self.conn_window >> 1:
            self.out.append(window_frame(0, unacked))
            self.recv_window += unacked
            unacked = 0
        self.recv_unacked = unacked
        if s is not None and CAN_RECV[s.state]:
            owed = s.recv_unacked + n
            if owed >= self.local_window >> 1:
                self.out.append(window_frame(s.sid, owed))
                s.recv_window += owed
                owed = 0
            s.recv_unacked = owed

    def ping(self, data: bytes) -> None:
        if not self.closed:
            self.out.append(frame(PING, 0, 0, data))

    def goaway(self, code: int, last_sid: int | None = None, debug: bytes = b"") -> None:
        """GOAWAY: with NO_ERROR the open streams may finish; with an error, it is over."""
        if self.closed:
            return
        last = self.highest_remote if last_sid is None else last_sid
        self.out.append(goaway_frame(last, code, debug))
        if code != NO_ERROR:
            self.closed = True
