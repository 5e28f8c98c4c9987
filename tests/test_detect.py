"""The detection table: every prefix of a stream gives NEED_MORE or the final answer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.protocols.detect import NEED_MORE, Protocol, detect, finish

TLS_HELLO = bytes.fromhex("160301020001 0001fc0303".replace(" ", "")) + b"\x00" * 40
CASES = [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Protocol.HTTP1),
    (b"POST /x?y=1 HTTP/1.0\r\n\r\n", Protocol.HTTP1),
    (b"CONNECT a:443 HTTP/1.1\r\n\r\n", Protocol.HTTP1),
    (b"OPTIONS * HTTP/1.1\r\n\r\n", Protocol.HTTP1),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04", Protocol.HTTP2),
    (TLS_HELLO, Protocol.TLS),
    # framed, strict binary CALL "ping"
    (b"\x00\x00\x00\x10\x80\x01\x00\x01\x00\x00\x00\x04ping\x00\x00\x00\x01\x00", Protocol.THRIFT),
    # unframed strict binary ONEWAY
    (b"\x80\x01\x00\x04\x00\x00\x00\x03log\x00\x00\x00\x07\x00", Protocol.THRIFT),
    # compact CALL
    (b"\x82\x21\x01\x04ping\x00", Protocol.THRIFT),
    # framed compact
    (b"\x00\x00\x00\x08\x82\x21\x01\x04ping", Protocol.THRIFT),
    # non-strict binary: name length, name, type CALL, seqid
    (b"\x00\x00\x00\x04ping\x01\x00\x00\x00\x01\x00", Protocol.THRIFT),
    # framed non-strict binary: frame length, then name length, name, CALL, seqid
    (b"\x00\x00\x00\x0d\x00\x00\x00\x04ping\x01\x00\x00\x00\x01\x00", Protocol.THRIFT),
    # compact ONEWAY, unframed
    (b"\x82\x81\x01\x03log\x00", Protocol.THRIFT),
    # non-strict binary with a multiplexed name ("Service:method")
    (b"\x00\x00\x00\x09Echo:ping\x01\x00\x00\x00\x01\x00", Protocol.THRIFT),
    # THeader (framed, 0x0FFF magic): a variant the proxy does not speak, so opaque
    (b"\x00\x00\x00\x20\x0f\xff\x00\x00\x00\x00\x00\x01", Protocol.OPAQUE),
    # a REPLY first is a server talking, not a client: opaque
    (b"\x00\x00\x00\x10\x80\x01\x00\x02\x00\x00\x00\x04ping", Protocol.OPAQUE),
    (b"\x82\x41\x01\x04ping\x00", Protocol.OPAQUE),
    (b"SSH-2.0-OpenSSH_9.2\r\n", Protocol.OPAQUE),
    (b"\x05\x01\x00", Protocol.OPAQUE),  # SOCKS5
    (b"GET / HTTP/3.0\r\n", Protocol.OPAQUE),
    (b"get / HTTP/1.1\r\n", Protocol.OPAQUE),  # methods are case-sensitive
    (b"\x16\x03\x01\x00\x05\x02", Protocol.OPAQUE),  # a ServerHello is not a client start
]


@pytest.mark.parametrize("stream,expected", CASES)
def test_whole_stream(stream: bytes, expected: Protocol) -> None:
    """The full prefix gives the expected protocol."""
    assert detect(stream) is expected


@pytest.mark.parametrize("stream,expected", CASES)
def test_every_shorter_prefix_waits_or_agrees(stream: bytes, expected: Protocol) -> None:
    """Split at every byte: a prefix never names a different protocol than the whole."""
    for i in range(1, len(stream)):
        verdict = detect(stream[:i])
        assert verdict is NEED_MORE or verdict is expected, (i, stream[:i], verdict)


def test_empty_needs_more_and_finishes_opaque() -> None:
    """No bytes yet: wait; no bytes ever: opaque."""
    assert detect(b"") is NEED_MORE
    assert finish(b"") is Protocol.OPAQUE
    assert finish(b"GE") is Protocol.OPAQUE


def test_http1_request_line_too_long_is_opaque() -> None:
    """A 'request line' that never ends is not waited for forever."""
    assert detect(b"GET /" + b"a" * 9000) is Protocol.OPAQUE


@given(st.binary(min_size=1, max_size=64))
def test_garbage_never_raises(data: bytes) -> None:
    """Any bytes give a verdict without raising."""
    verdict = detect(data)
    assert verdict is NEED_MORE or isinstance(verdict, Protocol)
    assert isinstance(finish(data), Protocol)


@given(st.sampled_from(CASES), st.binary(max_size=32))
def test_extra_bytes_do_not_change_a_decided_verdict(case: tuple[bytes, Protocol],
                                                     tail: bytes) -> None:
    """Once decided, more bytes after the prefix keep the same verdict."""
    stream, expected = case
    assert detect(stream + tail) is expected
