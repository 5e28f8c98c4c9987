"""A TLS ClientHello reader: the server name (SNI) and the ALPN protocols a client offers.

Theory of operation: the inbound side must decide what to do with a TLS connection before
any TLS library sees it (terminate mesh TLS, terminate for a configured port, or pass it
through untouched), so it reads the client's first flight itself. :func:`parse_client_hello`
takes the bytes received so far and answers :data:`NEED_MORE` (the hello is not complete
yet), a :class:`ClientHello`, or raises :class:`ClientHelloError` naming what is wrong.

The hello may be split over several handshake records (RFC 8446 5.1); records are
reassembled up to :data:`MAX_HELLO` bytes of handshake data. Only the fields the proxy
needs are decoded (SNI, ALPN, supported_versions); everything else is skipped by its
length, and every length is checked against the bytes that contain it, so arbitrary input
gives an answer or a ClientHelloError, never another exception.

Pure: bytes in, a verdict out. No sockets, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

HANDSHAKE: Final = 22
CLIENT_HELLO: Final = 1
MAX_RECORD: Final = 1 << 14  # largest plaintext record fragment (RFC 8446 5.1)
MAX_HELLO: Final = 1 << 16  # largest ClientHello accepted (real ones are < 2 KiB)

EXT_SERVER_NAME: Final = 0
EXT_ALPN: Final = 16
EXT_SUPPORTED_VERSIONS: Final = 43


class _NeedMore:
    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = _NeedMore()


class ClientHelloError(ValueError):
    """The bytes are not a well-formed TLS ClientHello; the message says where."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the proxy needs from a ClientHello."""

    sni: str | None
    """The host_name of the server_name extension, lowercased; None when absent."""
    alpn: tuple[bytes, ...]
    """ALPN protocol names in the client's order; empty when the extension is absent."""
    versions: tuple[int, ...]
    """supported_versions (0x0304 is TLS 1.3); the legacy version alone when absent."""
    length: int
    """Bytes of the stream the hello's records take (where the client's next data starts)."""


class _Reader:
    """Bounds-checked reads over one byte string; errors name ``what`` is being read."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise ClientHelloError(f"{what}: needs {n} bytes, {self.left()} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def take_all(self) -> bytes:
        return self.take(self.left(), "vector")

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, len_size: int, what: str, minimum: int = 0) -> _Reader:
        """A length-prefixed vector, as a reader over its body."""
        n = self.uint(len_size, f"{what} length")
        if n < minimum:
            raise ClientHelloError(f"{what}: length {n} is below the minimum {minimum}")
        if n > self.left():
            raise ClientHelloError(f"{what}: length {n} overruns its container "
                                   f"({self.left()} bytes left)")
        sub = _Reader(self.data, self.pos, self.pos + n)
        self.pos += n
        return sub


def _reassemble(buf: bytes) -> tuple[bytes, int] | _NeedMore:
    """The handshake bytes of the leading records, and the bytes of ``buf`` they take, once
    the first handshake message is complete."""
    handshake = bytearray()
    pos = 0
    while True:
        if len(buf) - pos < 5:
            return NEED_MORE
        kind, major, length = buf[pos], buf[pos + 1], int.from_bytes(buf[pos + 3:pos + 5], "big")
        if kind != HANDSHAKE:
            raise ClientHelloError(f"record at byte {pos}: content type {kind}, "
                                   f"expected handshake ({HANDSHAKE})")
        if major != 3:
            raise ClientHelloError(f"record at byte {pos}: version {major}.{buf[pos + 2]} "
                                   "is not TLS")
        if length == 0 or length > MAX_RECORD:
            raise ClientHelloError(f"record at byte {pos}: length {length} "
                                   f"(allowed 1-{MAX_RECORD})")
        if len(buf) - pos - 5 < length:
            return NEED_MORE
        handshake += buf[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != CLIENT_HELLO:
                raise ClientHelloError(f"handshake message type {handshake[0]}, "
                                       f"expected ClientHello ({CLIENT_HELLO})")
            need = 4 + int.from_bytes(handshake[1:4], "big")
            if need > MAX_HELLO:
                raise ClientHelloError(f"ClientHello of {need - 4} bytes is larger than "
                                       f"{MAX_HELLO}")
            if len(handshake) >= need:
                if len(handshake) > need:
                    raise ClientHelloError("bytes after the ClientHello in its record")
                return bytes(handshake[4:need]), pos


def parse_client_hello(buf: bytes) -> ClientHello | _NeedMore:
    """The ClientHello at the start of ``buf``, NEED_MORE, or ClientHelloError."""
    found = _reassemble(buf)
    if isinstance(found, _NeedMore):
        return NEED_MORE
    body, length = found
    r = _Reader(body)
    legacy_version = r.uint(2, "legacy_version")
    r.take(32, "random")
    session = r.vector(1, "legacy_session_id")
    if session.left() > 32:
        raise ClientHelloError(f"legacy_session_id: {session.left()} bytes, at most 32")
    suites = r.vector(2, "cipher_suites", minimum=2)
    if suites.left() % 2:
        raise ClientHelloError("cipher_suites: odd length")
    r.vector(1, "legacy_compression_methods", minimum=1)
    if r.left() == 0:  # no extensions at all (allowed before TLS 1.3)
        return ClientHello(None, (), (legacy_version,), length)
    extensions = r.vector(2, "extensions")
    if r.left():
        raise ClientHelloError(f"{r.left()} bytes after the extensions")
    return _extensions(extensions, legacy_version, length)


def _extensions(r: _Reader, legacy_version: int, length: int) -> ClientHello:
    sni: str | None = None
    alpn: tuple[bytes, ...] = ()
    versions: tuple[int, ...] = (legacy_version,)
    seen: set[int] = set()
    while r.left():
        kind = r.uint(2, "extension type")
        data = r.vector(2, f"extension {kind}")
        if kind in seen:
            raise ClientHelloError(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            sni = _server_name(data)
        elif kind == EXT_ALPN:
            alpn = _alpn(data)
        elif kind == EXT_SUPPORTED_VERSIONS:
            versions = _versions(data)
    return ClientHello(sni, alpn, versions, length)


def _server_name(r: _Reader) -> str | None:
    names = r.vector(2, "server_name list", minimum=1)
    if r.left():
        raise ClientHelloError("server_name: bytes after the list")
    host: str | None = None
    while names.left():
        name_type = names.uint(1, "server_name type")
        value = names.vector(2, "server_name", minimum=1).take_all()
        if name_type != 0:
            continue  # only host_name (0) is defined; others are skipped
        if host is not None:
            raise ClientHelloError("server_name: more than one host_name")
        try:
            host = value.decode("ascii").lower()
        except UnicodeDecodeError:
            raise ClientHelloError("server_name: host_name is not ASCII") from None
        if not host.isprintable() or " " in host:
            raise ClientHelloError(f"server_name: {host!r} is not a host name")
    return host


def _alpn(r: _Reader) -> tuple[bytes, ...]:
    names = r.vector(2, "ALPN list", minimum=2)
    if r.left():
        raise ClientHelloError("ALPN: bytes after the list")
    protocols: list[bytes] = []
    while names.left():
        protocols.append(names.vector(1, "ALPN protocol name", minimum=1).take_all())
    return tuple(protocols)


def _versions(r: _Reader) -> tuple[int, ...]:
    body = r.vector(1, "supported_versions", minimum=2)
    if r.left() or body.left() % 2:
        raise ClientHelloError("supported_versions: malformed list")
    return tuple(body.uint(2, "version") for _ in range(body.left() // 2))
