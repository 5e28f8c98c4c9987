"""TLS over a connection that is already open, driven by hand (MemoryBIO), both sides.

Theory of operation. Inbound, protocol detection has consumed the client's first bytes (the
ClientHello) before we know the connection is TLS, so ``loop.start_tls`` cannot be used:
it would wait for a hello that has already been read. Outbound, asyncio's TLS transports
cannot half-close (``can_write_eof()`` is False), which an opaque relay needs.
:class:`TlsSession` drives an ``ssl.SSLObject`` over two ``MemoryBIO``s instead, as server
or client. It is the asyncio Protocol of the raw transport: bytes read go into the incoming
BIO, bytes the SSLObject produces go out through the raw transport's ``write``. Bytes
already read (the held ClientHello) are fed in first.

After the handshake, ``on_ready(transport)`` receives a :class:`TlsTransport`: what the
protocols above (detection, HTTP/1, HTTP/2, Thrift, the relay) talk to, with the transport
API they use. ``on_ready`` may attach the inner protocol later (after checking the peer's
identity, say): until then what arrives waits inside the SSLObject. Plaintext read is
passed to the current inner protocol; what it writes is encrypted and sent. Flow control
runs both ways: ``pause_reading`` on the TLS transport stops delivering and pauses the raw
transport (decrypted bytes wait inside the SSLObject); the raw transport's
``pause_writing``/``resume_writing`` are passed to the inner protocol.

Closing: ``write_eof`` sends close_notify (TLS 1.3 allows reading on afterwards);
``close`` sends close_notify and closes the raw transport once its buffer is flushed. A
close_notify or a TCP EOF from the peer is the inner protocol's ``eof_received``. A
handshake that fails, or that does not finish within the timeout, calls ``on_error`` with a
reason (never key material) and closes the connection.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

READ_SIZE = 256 * 1024

_HANDSHAKE, _OPEN, _CLOSED = 0, 1, 2


class TlsSession(asyncio.Protocol):
    """The raw transport's protocol: runs the TLS state machine (server or client)."""

    def __init__(self, context: ssl.SSLContext, raw: Any, loop: asyncio.AbstractEventLoop, *,
                 on_ready: Callable[[TlsTransport], None], on_error: Callable[[str], None],
                 handshake_timeout: float = 10.0, server_side: bool = True,
                 server_hostname: str | None = None) -> None:
        self.raw = raw
        self.loop = loop
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                       server_hostname=server_hostname)
        self.on_ready = on_ready
        self.on_error = on_error
        self.handshake_timeout = handshake_timeout
        self.transport = TlsTransport(self)
        self.app: Any = None
        self.state = _HANDSHAKE
        self.timer: asyncio.TimerHandle | None = None
        self.read_paused = False
        self.eof_in = False  # the client's close_notify or TCP EOF was read
        self.eof_told = False  # ... and the inner protocol was told
        self.eof_out = False  # we sent close_notify
        self.closing = False
        self.app_write_paused = False
        self.raw_write_paused = False
        self.extra: dict[str, Any] = {}  # what get_extra_info answers besides the raw's

    def start(self, early: bytes, eof: bool) -> None:
        """Take over the raw transport; ``early`` are the bytes already read from it."""
        self.raw.set_protocol(self)
        self.timer = self.loop.call_later(self.handshake_timeout, self._handshake_timeout)
        if early:
            self.incoming.write(early)
        if eof:
            self.incoming.write_eof()
        self._handshake()

    # --- raw transport events --------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.state == _CLOSED:
            return
        self.incoming.write(data)
        if self.state == _HANDSHAKE:
            self._handshake()
        else:
            self._read()

    def eof_received(self) -> bool:
        if self.state == _HANDSHAKE:
            self._fail("the client closed the connection during the TLS handshake")
            return False
        self.incoming.write_eof()
        self._read()
        return True  # the inner protocol decides, in _tell_eof

    def connection_lost(self, exc: Exception | None) -> None:
        state, self.state = self.state, _CLOSED
        self._cancel_timer()
        if state == _HANDSHAKE:
            self.on_error("the connection was closed during the TLS handshake")
        elif self.app is not None:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        self.raw_write_paused = True
        if self.app is not None and not self.app_write_paused:
            self.app_write_paused = True
            self.app.pause_writing()

    def resume_writing(self) -> None:
        self.raw_write_paused = False
        if self.app is not None and self.app_write_paused:
            self.app_write_paused = False
            self.app.resume_writing()

    # --- the TLS state machine -------------------------------------------------------
    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            if self.incoming.eof:
                self._fail("the client closed the connection during the TLS handshake")
            return
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self._flush()  # the alert tells the client why
            self._fail(_reason(exc))
            return
        self._cancel_timer()
        self._flush()
        self.state = _OPEN
        self.on_ready(self.transport)
        if self.state == _OPEN and not self.closing and self.app is not None:
            self._read()

    def _read(self) -> None:
        """Decrypt what has arrived and pass it on, unless the inner protocol is paused.

        The protocol is looked up for every piece: one that hands the connection to
        another (detection -> HTTP/1) makes the rest go to the new one."""
        while self.state == _OPEN and not self.read_paused and not self.closing \
                and not self.eof_in and self.app is not None:
            try:
                data = self.sslobj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""  # close_notify, or a TCP EOF without one: an EOF either way
            except ssl.SSLError as exc:
                self._flush()
                self._abort_open(_reason(exc))
                return
            if not data:
                self.eof_in = True
                break
            self.app.data_received(data)
        self._flush()  # a read may produce output (key updates, session tickets)
        if self.eof_in and not self.eof_told and not self.read_paused \
                and self.state == _OPEN and not self.closing and self.app is not None:
            self._tell_eof()

    def _tell_eof(self) -> None:
        self.eof_told = True
        if not self.app.eof_received():
            self.transport.close()

    @property
    def closed(self) -> bool:
        """The connection is gone (or going): nothing more will be read or written."""
        return self.state == _CLOSED or self.closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.state != _OPEN or self.closing or self.eof_out or not data:
            return
        view = memoryview(data)
        try:
            while view:
                n = self.sslobj.write(view)
                view = view[n:]
        except ssl.SSLError as exc:
            self._abort_open(_reason(exc))
            return
        self._flush()

    def _flush(self) -> None:
        if self.outgoing.pending and self.state != _CLOSED:
            self.raw.write(self.outgoing.read())

    def close_notify(self) -> None:
        """Send close_notify (once); reading may go on."""
        if self.eof_out or self.state != _OPEN:
            return
        self.eof_out = True
        try:
            self.sslobj.unwrap()
        except ssl.SSLError:
            pass  # SSLWantReadError: the client's close_notify has not come; fine
        self._flush()

    def close(self) -> None:
        if self.closing or self.state == _CLOSED:
            return
        self.closing = True
        self.close_notify()
        self.raw.close()

    def abort(self) -> None:
        self.closing = True
        self.raw.abort()

    def _abort_open(self, reason: str) -> None:
        self.extra["tls_error"] = reason
        self.abort()

    def _fail(self, reason: str) -> None:
        if self.state != _HANDSHAKE:
            return
        self.state = _CLOSED
        self._cancel_timer()
        self.raw.close()  # after the alert, if the handshake produced one
        self.on_error(reason)

    def _handshake_timeout(self) -> None:
        self.timer = None
        self._fail(f"the TLS handshake did not finish within {self.handshake_timeout:g}s")

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def set_reading(self, on: bool) -> None:
        if on == (not self.read_paused):
            return
        self.read_paused = not on
        if self.state != _OPEN:
            return
        if on:
            self.raw.resume_reading()
            self.loop.call_soon(self._read)  # what waited inside the SSLObject
        else:
            self.raw.pause_reading()


def _reason(exc: Exception) -> str:
    """A short, key-free reason: OpenSSL's reason code and the verify message if any."""
    if not isinstance(exc, ssl.SSLError):
        return str(exc)
    text = str(exc.reason or exc).replace("_", " ").lower()
    detail = getattr(exc, "verify_message", None)
    return f"{text}: {detail}" if detail else text


class TlsTransport(asyncio.Transport):
    """What the inner protocol sees: a transport that encrypts on write."""

    def __init__(self, server: TlsSession) -> None:
        super().__init__()
        self._tls = server

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        tls = self._tls
        if name == "ssl_object":
            return tls.sslobj
        if name == "peercert":
            return tls.sslobj.getpeercert()
        if name == "cipher":
            return tls.sslobj.cipher()
        if name in tls.extra:
            return tls.extra[name]
        return tls.raw.get_extra_info(name, default)

    def set_extra(self, name: str, value: Any) -> None:
        """Make ``get_extra_info(name)`` answer ``value`` (e.g. ``peer_identity``)."""
        self._tls.extra[name] = value

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        tls = self._tls
        first = tls.app is None
        tls.app = protocol
        if tls.raw_write_paused and not tls.app_write_paused:
            tls.app_write_paused = True
            protocol.pause_writing()
        if first and tls.state == _OPEN:
            tls.loop.call_soon(tls._read)  # what arrived before anyone listened

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._tls.app  # type: ignore[no-any-return]

    def is_closing(self) -> bool:
        tls = self._tls
        return tls.closing or tls.state == _CLOSED or tls.raw.is_closing()

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._tls.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._tls.close_notify()

    def pause_reading(self) -> None:
        self._tls.set_reading(False)

    def resume_reading(self) -> None:
        self._tls.set_reading(True)

    def is_reading(self) -> bool:
        return not self._tls.read_paused

    def get_write_buffer_size(self) -> int:
        return int(self._tls.raw.get_write_buffer_size())

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tls.raw.get_write_buffer_limits()  # type: ignore[no-any-return]
