"""A sans-IO HTTP/2 connection (RFC 9113), both roles, written for a proxy's hot path.

Theory of operation: :meth:`H2Connection.receive` parses frames straight out of the bytes
read (``struct.unpack_from``, no frame objects) and calls the handler's methods directly:
``on_head``, ``on_data``, ``on_trailers``, ``on_reset`` and so on (see :class:`Handler`).
What the connection sends (ours and its own answers: SETTINGS and PING ACKs, WINDOW_UPDATE,
RST_STREAM, GOAWAY) collects in ``out`` until :meth:`data_to_send`, so one read gives one
write.

Errors follow RFC 9113 §5.4. A **connection error** raises :class:`H2Error` out of
``receive`` after queueing GOAWAY with its code; the connection is over. A **stream
error** (a malformed request, a content-length that the DATA does not match, a stream
window overrun, trailers without END_STREAM) resets that stream and tells the handler
(``on_stream_error``); the other streams go on. The server role is strict, as it faces
untrusted clients: preface and first SETTINGS, frame sizes, stream id order and parity,
idle and closed streams, CONTINUATION sequencing with caps on frames and block bytes,
flow-control overruns, zero window increments, SETTINGS values, and each request's headers
(:mod:`appliance.protocols.h2headers`). The client role (to upstreams) validates responses
the same way but ignores frames on streams it already closed, because a late frame from a
shared upstream must not end everyone's streams.

Flow control: ``window(s)`` says how much DATA may go out now; the caller sends at
most that. Received DATA is credited back only when the caller says it has passed it on
(:meth:`ack`), with a WINDOW_UPDATE once half a window is owed. So the proxy holds at most
the windows it advertised.

Each distinct header block is decoded and validated once: the HPACK decoder returns the
same cache entry for a repeated block while its table is unchanged, and the validation
verdict is kept in that entry.
"""

from __future__ import annotations

from typing import Any

from appliance.protocols.h2frames import (
    ACK,
    COMPRESSION_ERROR,
    CONTINUATION,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    ENABLE_CONNECT_PROTOCOL,
    ENABLE_PUSH,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEADER_TABLE_SIZE,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_LIMIT,
    MAX_FRAME_SIZE,
    MAX_STREAM_ID,
    MAX_WINDOW,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    SETTING,
    SETTINGS,
    STREAM_CLOSED,
    U32,
    H2Error,
    frame,
    unpack_header,
)
from appliance.protocols.h2headers import request_info, response_info, trailers_problem
from appliance.protocols.h2send import (
    CAN_RECV,
    HALF_REMOTE,
    H2State,
    Handler,
    Headers,
    Stream,
)
from appliance.protocols.hpack_codec import HeaderListTooLarge, HpackError

__all__ = ["H2Connection", "H2Error", "Handler", "Headers", "Stream"]

MAX_CONTINUATIONS = 64  # CONTINUATION frames per header block (as h2 allows)
_SETTINGS_ACK = frame(SETTINGS, ACK, 0)
_SELF_DEPENDENT = 0x100  # not a wire flag: marks HEADERS whose priority names itself


class H2Connection(H2State):
    """One HTTP/2 connection, client role (``client=True``: to an upstream) or server."""

    def __init__(self, handler: Handler, *, client: bool, max_concurrent_streams: int = 100,
                 max_header_list_size: int = 65536, window: int = DEFAULT_WINDOW,
                 conn_window: int = 1 << 20) -> None:
        super().__init__(handler, client=client, max_concurrent_streams=max_concurrent_streams,
                         max_header_list_size=max_header_list_size, window=window,
                         conn_window=conn_window)
        self.buf = b""
        self.preface_wanted = not client
        self.settings_seen = False  # the peer's first SETTINGS arrived
        self.expecting = True  # a frame type is due: the first SETTINGS, or CONTINUATION
        self.max_block = max_header_list_size + DEFAULT_MAX_FRAME
        # A header block in progress (HEADERS without END_HEADERS, then CONTINUATION).
        self.hdr_sid = 0
        self.hdr_flags = 0
        self.hdr_parts: list[bytes] = []
        self.hdr_size = 0
        self.hdr_frames = 0
        self._frame_handlers = (
            self._on_data, self._on_headers, self._on_priority, self._on_rst,
            self._on_settings, self._on_push_promise, self._on_ping, self._on_goaway,
            self._on_window_update, self._on_continuation,
        )

    def receive(self, data: bytes) -> None:
        """Process bytes from the peer. Raises :class:`H2Error` on a connection error
        (GOAWAY already queued)."""
        if self.closed:
            return
        buf = self.buf + data if self.buf else data
        pos = 0
        try:
            if self.preface_wanted:
                pos = self._preface(buf)
                if self.preface_wanted:
                    self.buf = buf
                    return
            end = len(buf)
            handlers = self._frame_handlers
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = unpack_header(buf, pos)
                length = (hi << 8) | lo
                if length > DEFAULT_MAX_FRAME:
                    raise H2Error(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds 16384")
                nxt = pos + 9 + length
                if nxt > end:
                    break
                payload = buf[pos + 9:nxt]
                pos = nxt
                if self.expecting:
                    self._expected(ftype, flags)
                if ftype < 10:
                    handlers[ftype](flags, sid & MAX_STREAM_ID, payload)
                else:
                    self.handler.on_control()  # unknown types are ignored, but not free
                if self.closed:
                    return
            self.buf = buf[pos:] if pos < end else b""
        except H2Error as exc:
            self.fail(exc)
            raise

    def _expected(self, ftype: int, flags: int) -> None:
        """While a frame type is due (the first SETTINGS, CONTINUATION), nothing else."""
        if self.hdr_sid and ftype != CONTINUATION:
            raise H2Error(PROTOCOL_ERROR, "header block interrupted by another frame")
        if not self.settings_seen and (ftype != SETTINGS or flags & ACK):
            raise H2Error(PROTOCOL_ERROR, "the first frame must be SETTINGS")

    def _preface(self, buf: bytes) -> int:
        n = min(len(buf), len(PREFACE))
        if buf[:n] != PREFACE[:n]:
            raise H2Error(PROTOCOL_ERROR, "invalid connection preface")
        if n == len(PREFACE):
            self.preface_wanted = False
        return n

    def _unpad(self, payload: bytes) -> bytes:
        if not payload or payload[0] >= len(payload):
            raise H2Error(PROTOCOL_ERROR, "padding is as long as the frame")
        return payload[1:len(payload) - payload[0]]

    def _idle(self, sid: int) -> bool:
        if sid & 1 == self.remote_parity:
            return sid > self.highest_remote
        return sid >= self.next_sid

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        flow = len(payload)
        if sid == 0:
            raise H2Error(PROTOCOL_ERROR, "DATA on stream 0")
        self.recv_window -= flow
        if self.recv_window < 0:
            raise H2Error(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        data = self._unpad(payload) if flags & PADDED else payload
        s = self.streams.get(sid)
        if s is None or not CAN_RECV[s.state] or not s.head_done:
            self._data_refused(s, sid, flow)
            return
        s.recv_window -= flow
        if s.recv_window < 0:
            self.ack(None, flow)
            self.stream_error(s, FLOW_CONTROL_ERROR, "h2_protocol_error",
                              "DATA beyond the stream window")
            return
        end = flags & END_STREAM
        if s.clen is not None or s.no_body:
            s.received += len(data)
            if s.no_body and s.received or s.clen is not None and (
                    s.received > s.clen or end and s.received != s.clen):
                self.ack(None, flow)
                self.stream_error(s, PROTOCOL_ERROR, "h2_malformed",
                                  "body length differs from content-length")
                return
        if end:
            self._recv_end(s)
        elif not data:
            self.handler.on_control()  # an empty DATA frame: a flood shape
        self.handler.on_data(s, data, flow, bool(end))

    def _data_refused(self, s: Stream | None, sid: int, flow: int) -> None:
        """DATA for a stream that cannot take it: credit the connection window back, and
        a stream error unless the stream is one we reset (its late frames are fine)."""
        self.ack(None, flow)
        if s is None:
            if self._idle(sid):
                raise H2Error(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            if self.client or sid in self.reset_sids:
                return
            self.handler.on_control()
            self.reset_sid(sid, STREAM_CLOSED)
            return
        if not CAN_RECV[s.state]:
            self.stream_error(s, STREAM_CLOSED, "h2_protocol_error", "DATA after END_STREAM")
        else:
            self.stream_error(s, PROTOCOL_ERROR, "h2_malformed", "DATA before HEADERS")

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2Error(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            payload = self._unpad(payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise H2Error(FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
            if U32.unpack_from(payload)[0] & MAX_STREAM_ID == sid:
                flags |= _SELF_DEPENDENT
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(sid, flags, payload)
            return
        self.hdr_sid, self.hdr_flags = sid, flags
        self.expecting = True
        self.hdr_parts = [payload]
        self.hdr_size = len(payload)
        self.hdr_frames = 0

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if not self.hdr_sid or sid != self.hdr_sid:
            raise H2Error(PROTOCOL_ERROR, "CONTINUATION without a header block in progress")
        self.hdr_frames += 1
        self.hdr_size += len(payload)
        if self.hdr_frames > MAX_CONTINUATIONS or self.hdr_size > self.max_block:
            raise H2Error(ENHANCE_YOUR_CALM, "header block too long (CONTINUATION flood)",
                          "h2_continuation_flood")
        self.hdr_parts.append(payload)
        if flags & END_HEADERS:
            block = b"".join(self.hdr_parts)
            self.hdr_sid, self.hdr_parts = 0, []
            self.expecting = False
            self._header_block(sid, self.hdr_flags, block)

    def _decode(self, block: bytes) -> list[Any] | None:
        """The decoder's entry for ``block``; None if the list is over our limit (the
        block was still applied to the table)."""
        try:
            return self.decoder.decode_entry(block)
        except HeaderListTooLarge:
            return None
        except HpackError as exc:
            raise H2Error(COMPRESSION_ERROR, f"header block does not decode: {exc}") from None

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        end = bool(flags & END_STREAM)
        s = self.streams.get(sid)
        if flags & _SELF_DEPENDENT:
            self._self_dependent(s, sid, block)
            return
        if s is None:
            if not self.client and sid & 1 and sid > self.highest_remote:
                self._new_request(sid, block, end)
            else:
                self._late_headers(sid, block)
            return
        entry = self._decode(block)
        if entry is None:
            self.stream_error(s, PROTOCOL_ERROR, "h2_header_list_too_large",
                              "header list too large")
        elif not CAN_RECV[s.state]:
            self.stream_error(s, STREAM_CLOSED, "h2_protocol_error", "HEADERS after END_STREAM")
        elif not s.head_done:
            self._response_head(s, entry, end)
        else:
            self._trailers(s, entry, end)

    def _self_dependent(self, s: Stream | None, sid: int, block: bytes) -> None:
        """HEADERS whose priority names its own stream: a stream error (RFC 9113 §5.3.1),
        after the block was decoded to keep the HPACK table in step."""
        if s is None and (self.client or not sid & 1 or sid <= self.highest_remote):
            self._late_headers(sid, block)
            return
        self._decode(block)
        reason = f"stream {sid} depends on itself"
        if s is not None:
            self.stream_error(s, PROTOCOL_ERROR, "h2_malformed", reason)
            return
        if sid > self.highest_remote + 2:
            self._skip(self.highest_remote + 2, sid - 2)
        self.highest_remote = sid
        self.reset_sid(sid, PROTOCOL_ERROR)
        self.handler.on_stream_error(None, sid, "h2_malformed", reason)

    def _late_headers(self, sid: int, block: bytes) -> None:
        """HEADERS for a stream that is not open. Decoded (the HPACK table must stay in
        step) and dropped if we reset the stream, or as the client; else an error."""
        if sid & 1 != self.remote_parity and self._idle(sid) or self.client and not sid & 1:
            raise H2Error(PROTOCOL_ERROR, f"HEADERS on stream {sid}, which was never opened")
        if not (self.client or sid in self.reset_sids):
            if self.skipped(sid):
                raise H2Error(PROTOCOL_ERROR, f"HEADERS on stream {sid}, a lower id than "
                                              "streams opened before it")
            raise H2Error(STREAM_CLOSED, f"HEADERS on closed stream {sid}")
        self._decode(block)

    def _new_request(self, sid: int, block: bytes, end: bool) -> None:
        if sid > self.highest_remote + 2:
            self._skip(self.highest_remote + 2, sid - 2)
        self.highest_remote = sid
        entry = self._decode(block)
        if entry is None:
            self._too_large(sid)
            return
        if self.remote_open >= self.max_streams:
            self.handler.on_control()
            self.reset_sid(sid, REFUSED_STREAM)
            self.handler.on_stream_error(None, sid, "h2_refused_stream",
                                         "over SETTINGS_MAX_CONCURRENT_STREAMS")
            return
        info = entry[2]
        if info is None:
            info = entry[2] = request_info(entry[1])
        if info[0] is None and end and info[1]:
            info = ("content-length but no body", None)
        if info[0] is not None:
            self.reset_sid(sid, PROTOCOL_ERROR)
            self.handler.on_stream_error(None, sid, "h2_malformed", info[0])
            return
        s = Stream(sid, self.remote_initial_window, self.local_window)
        s.clen = info[1]
        s.head_done = True
        self.streams[sid] = s
        self.remote_open += 1
        if end:
            s.state = HALF_REMOTE
        self.handler.on_head(s, entry[1], end)

    def _skip(self, lo: int, hi: int) -> None:
        self.skipped_ids.append((lo, hi))
        if len(self.skipped_ids) > 16:
            del self.skipped_ids[0]

    def _too_large(self, sid: int) -> None:
        """A request whose header list is over our limit: answered 431 and reset with
        NO_ERROR (RFC 9113 §8.1), never passed on."""
        block = self.encoder.encode([(b":status", b"431")])
        self._headers_out(sid, END_HEADERS | END_STREAM, block)
        self.reset_sid(sid, NO_ERROR)
        self.handler.on_stream_error(None, sid, "h2_header_list_too_large",
                                     "request header list too large")

    def _response_head(self, s: Stream, entry: list[Any], end: bool) -> None:
        info = entry[2]
        if info is None:
            info = entry[2] = response_info(entry[1])
        problem, status, clen = info
        if problem is None and status < 200 and (end or status == 101):
            problem = "informational response with END_STREAM, or 101"
        if problem is None and end and clen and not s.no_body and status not in (204, 304):
            problem = "content-length but no body"
        if problem is not None:
            self.stream_error(s, PROTOCOL_ERROR, "h2_upstream_malformed", problem)
            return
        if status < 200:
            self.handler.on_info(s, entry[1])
            return
        s.head_done = True
        if s.no_body or status in (204, 304):
            s.no_body, s.clen = True, None
        else:
            s.clen = clen
        if end:
            self._recv_end(s)
        self.handler.on_head(s, entry[1], end)

    def _trailers(self, s: Stream, entry: list[Any], end: bool) -> None:
        problem = entry[3]
        if problem is None:
            problem = entry[3] = trailers_problem(entry[1]) or ""
        if not end:
            problem = "trailers without END_STREAM"
        elif not problem and s.clen is not None and s.received != s.clen:
            problem = "body length differs from content-length"
        if problem:
            self.stream_error(s, PROTOCOL_ERROR, "h2_malformed", problem)
            return
        self._recv_end(s)
        self.handler.on_trailers(s, entry[1])

    def _on_priority(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2Error(PROTOCOL_ERROR, "PRIORITY on stream 0")
        self.handler.on_control()
        if len(payload) != 5:
            self._priority_error(sid, FRAME_SIZE_ERROR, "PRIORITY frame is not 5 bytes")
        elif U32.unpack_from(payload)[0] & MAX_STREAM_ID == sid:
            self._priority_error(sid, PROTOCOL_ERROR, f"stream {sid} depends on itself")

    def _priority_error(self, sid: int, code: int, reason: str) -> None:
        s = self.streams.get(sid)
        if s is not None:
            self.stream_error(s, code, "h2_protocol_error", reason)
        else:
            self.reset_sid(sid, code)

    def _on_rst(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2Error(FRAME_SIZE_ERROR, "RST_STREAM frame is not 4 bytes")
        if sid == 0 or self._idle(sid):
            raise H2Error(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        s = self.streams.get(sid)
        if s is None:
            self.handler.on_control()  # resets of closed streams cost work, give nothing
            return
        self._drop(s, False)
        self.handler.on_reset(s, U32.unpack(payload)[0])

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2Error(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2Error(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            self.handler.on_control()
            return
        if len(payload) % 6:
            raise H2Error(FRAME_SIZE_ERROR, "SETTINGS length is not a multiple of 6")
        grew = False
        for off in range(0, len(payload), 6):
            grew = self._setting(*SETTING.unpack_from(payload, off)) or grew
        self.settings_seen = True
        self.expecting = bool(self.hdr_sid)
        self.out.append(_SETTINGS_ACK)
        self.answers += 1
        self.handler.on_control()
        self.handler.on_settings()
        if grew:
            self.handler.on_window(None)

    def _setting(self, ident: int, value: int) -> bool:
        """Apply one setting; True if it grew the stream send windows."""
        if ident == HEADER_TABLE_SIZE:
            self.encoder.set_max_table_size(value)
        elif ident == ENABLE_PUSH:
            if value > 1 or (self.client and value):
                raise H2Error(PROTOCOL_ERROR, f"invalid SETTINGS_ENABLE_PUSH {value}")
        elif ident == MAX_CONCURRENT_STREAMS:
            self.remote_max_streams = value
        elif ident == INITIAL_WINDOW_SIZE:
            if value > MAX_WINDOW:
                raise H2Error(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value}")
            delta = value - self.remote_initial_window
            self.remote_initial_window = value
            for s in self.streams.values():
                s.send_window += delta
                if s.send_window > MAX_WINDOW:
                    raise H2Error(FLOW_CONTROL_ERROR, "a stream window overflows")
            return delta > 0
        elif ident == MAX_FRAME_SIZE:
            if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                raise H2Error(PROTOCOL_ERROR, f"invalid SETTINGS_MAX_FRAME_SIZE {value}")
            self.max_frame = value
        elif ident == ENABLE_CONNECT_PROTOCOL and value > 1:
            raise H2Error(PROTOCOL_ERROR, f"invalid SETTINGS_ENABLE_CONNECT_PROTOCOL {value}")
        return False

    def _on_push_promise(self, flags: int, sid: int, payload: bytes) -> None:
        raise H2Error(PROTOCOL_ERROR, "PUSH_PROMISE (push is disabled)")

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2Error(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise H2Error(FRAME_SIZE_ERROR, "PING frame is not 8 bytes")
        if flags & ACK:
            self.handler.on_ping_ack(payload)
        else:
            self.out.append(frame(PING, ACK, 0, payload))
            self.answers += 1
        self.handler.on_control()

    def _on_goaway(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2Error(PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise H2Error(FRAME_SIZE_ERROR, "GOAWAY frame shorter than 8 bytes")
        last = U32.unpack_from(payload)[0] & MAX_STREAM_ID
        self.handler.on_goaway(last, U32.unpack_from(payload, 4)[0])

    def _on_window_update(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2Error(FRAME_SIZE_ERROR, "WINDOW_UPDATE frame is not 4 bytes")
        inc = U32.unpack(payload)[0] & MAX_WINDOW
        if sid == 0:
            if inc == 0:
                raise H2Error(PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise H2Error(FLOW_CONTROL_ERROR, "connection window overflows")
            self.handler.on_window(None)
            return
        s = self.streams.get(sid)
        if s is None:
            if self._idle(sid):
                raise H2Error(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return
        if inc == 0:
            self.stream_error(s, PROTOCOL_ERROR, "h2_protocol_error", "WINDOW_UPDATE of 0")
            return
        s.send_window += inc
        if s.send_window > MAX_WINDOW:
            self.stream_error(s, FLOW_CONTROL_ERROR, "h2_protocol_error",
                              "stream window overflows")
            return
        self.handler.on_window(s)

