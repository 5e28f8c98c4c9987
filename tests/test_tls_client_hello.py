"""The ClientHello reader: real hellos from OpenSSL, split and re-framed, and garbage."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.protocols.tls import (
    MAX_HELLO,
    NEED_MORE,
    ClientHello,
    ClientHelloError,
    parse_client_hello,
)


def real_hello(alpn: list[str] | None = None, sni: str | None = None, *,
               tls13_only: bool = False) -> bytes:
    """The first flight of Python's ssl client (OpenSSL) with these options."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls13_only:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def record(body: bytes, kind: int = 22, version: bytes = b"\x03\x01") -> bytes:
    return bytes([kind]) + version + struct.pack(">H", len(body)) + body


def handshake_of(hello: bytes) -> bytes:
    """The handshake message inside a one-record hello."""
    assert hello[0] == 22
    return hello[5:5 + struct.unpack(">H", hello[3:5])[0]]


def hello_body(*, extensions: bytes | None, session: bytes = b"",
               suites: bytes = b"\x13\x01") -> bytes:
    body = b"\x03\x03" + b"\x00" * 32 + bytes([len(session)]) + session
    body += struct.pack(">H", len(suites)) + suites + b"\x01\x00"
    if extensions is not None:
        body += struct.pack(">H", len(extensions)) + extensions
    return body


def ext(kind: int, data: bytes) -> bytes:
    return struct.pack(">HH", kind, len(data)) + data


def message(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(3, "big") + body


@pytest.mark.parametrize("alpn,sni", [
    (["appliance.mesh/1"], None),
    (["h2", "http/1.1"], "www.example.org"),
    (None, "API.Example.ORG"),
    (None, None),
    (["x" * 255], "a"),
])
def test_real_hellos_give_alpn_and_sni(alpn: list[str] | None, sni: str | None) -> None:
    """OpenSSL's ClientHello: the ALPN list in order, the SNI lowercased, TLS 1.3 offered,
    and the length covers the whole flight."""
    data = real_hello(alpn, sni)
    hello = parse_client_hello(data)
    assert isinstance(hello, ClientHello)
    assert hello.alpn == tuple(a.encode() for a in alpn or ())
    assert hello.sni == (sni.lower() if sni else None)
    assert 0x0304 in hello.versions
    assert hello.length == len(data)


def test_bytes_after_the_hello_are_not_part_of_it() -> None:
    """Early bytes after the hello do not change the answer; ``length`` says where it ends."""
    data = real_hello(["h2"])
    hello = parse_client_hello(data + b"\x17\x03\x03\x00\x05hello")
    assert isinstance(hello, ClientHello) and hello.length == len(data)


def test_every_prefix_needs_more() -> None:
    """A hello cut anywhere is not complete yet: NEED_MORE, never an error."""
    data = real_hello(["appliance.mesh/1"], "x.example")
    for i in range(len(data)):
        assert parse_client_hello(data[:i]) is NEED_MORE, i


@pytest.mark.parametrize("pieces", [2, 3, 7])
def test_hello_split_over_several_records(pieces: int) -> None:
    """The handshake message may be fragmented over records (RFC 8446 5.1)."""
    msg = handshake_of(real_hello(["h2", "http/1.1"], "split.example"))
    step = -(-len(msg) // pieces)
    data = b"".join(record(msg[i:i + step]) for i in range(0, len(msg), step))
    hello = parse_client_hello(data)
    assert isinstance(hello, ClientHello)
    assert hello.alpn == (b"h2", b"http/1.1") and hello.sni == "split.example"
    assert hello.length == len(data)
    for i in range(len(data)):
        assert parse_client_hello(data[:i]) is NEED_MORE


def test_tls12_hello_without_extensions() -> None:
    """A hello with no extension block at all (allowed before TLS 1.3)."""
    hello = parse_client_hello(record(message(hello_body(extensions=None))))
    assert hello == ClientHello(None, (), (0x0303,), 5 + 4 + len(hello_body(extensions=None)))


def test_unknown_server_name_types_are_skipped() -> None:
    """A server_name entry of another type than host_name is skipped."""
    names = b"\x05" + struct.pack(">H", 3) + b"abc" + b"\x00" + struct.pack(">H", 1) + b"h"
    body = hello_body(extensions=ext(0, struct.pack(">H", len(names)) + names))
    hello = parse_client_hello(record(message(body)))
    assert isinstance(hello, ClientHello) and hello.sni == "h"


BAD = [
    (b"\x17\x03\x03\x00\x05hello", "content type 23"),
    (b"\x16\x02\x00\x00\x05hello", "is not TLS"),
    (b"\x16\x03\x01\x00\x00", "length 0"),
    (b"\x16\x03\x01\x40\x01" + b"\x01" * 0x4001, "length 16385"),
    (record(b"\x02\x00\x00\x04abcd"), "expected ClientHello"),
    (record(b"\x01" + (MAX_HELLO + 1).to_bytes(3, "big")), "larger than"),
    (record(message(b"\x03\x03")), "random"),
    (record(message(hello_body(extensions=None, session=b"s" * 33))), "at most 32"),
    (record(message(hello_body(extensions=None, suites=b""))), "below the minimum"),
    (record(message(hello_body(extensions=None, suites=b"\x13\x01\x13"))), "odd length"),
    (record(message(hello_body(extensions=b"\x00"))), "extension type"),
    (record(message(hello_body(extensions=ext(16, b"\x00\x05\x02h2")))), "overruns"),
    (record(message(hello_body(extensions=ext(16, b"\x00\x01\x00")))), "minimum 2"),
    (record(message(hello_body(extensions=ext(16, b"\x00\x02\x00\x00")))), "minimum 1"),
    (record(message(hello_body(extensions=ext(43, b"\x00\x01\x03")))), "minimum 2"),
    (record(message(hello_body(extensions=ext(0, b"\x00\x04\x00\x00\x01\xff")))),
     "not ASCII"),
    (record(message(hello_body(extensions=ext(0, b"\x00\x04\x00\x00\x01 ")))),
     "not a host name"),
    (record(message(hello_body(extensions=ext(5, b"") + ext(5, b"")))), "appears twice"),
    (record(message(hello_body(extensions=None)) + b"xx"), "after the ClientHello"),
    (record(message(hello_body(extensions=ext(5, b"")) + b"x")), "after the extensions"),
]


@pytest.mark.parametrize("data,why", BAD)
def test_malformed_hellos_are_errors_that_say_why(data: bytes, why: str) -> None:
    """Each malformation is a ClientHelloError whose message names the broken field."""
    with pytest.raises(ClientHelloError, match=why):
        parse_client_hello(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    """Any input: an answer, NEED_MORE or ClientHelloError, nothing else."""
    try:
        parse_client_hello(data)
    except ClientHelloError:
        pass


HELLO = real_hello(["appliance.mesh/1", "h2"], "fuzz.example")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(HELLO) - 1), st.integers(0, 255))
def test_mutated_real_hello_never_crashes(position: int, value: int) -> None:
    """One byte of a real hello changed: an answer, NEED_MORE or ClientHelloError."""
    data = bytearray(HELLO)
    data[position] = value
    try:
        result = parse_client_hello(bytes(data))
    except ClientHelloError:
        return
    assert result is NEED_MORE or isinstance(result, ClientHello)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=40))
def test_any_record_split_gives_the_same_hello(sizes: list[int]) -> None:
    """Re-framing the handshake into records of any sizes gives the same hello."""
    msg = handshake_of(HELLO)
    chunks, i = [], 0
    for size in sizes:
        if i >= len(msg):
            break
        chunks.append(msg[i:i + size])
        i += size
    if i < len(msg):
        chunks.append(msg[i:])
    hello = parse_client_hello(b"".join(record(c) for c in chunks))
    assert isinstance(hello, ClientHello)
    assert hello.alpn == (b"appliance.mesh/1", b"h2") and hello.sni == "fuzz.example"
