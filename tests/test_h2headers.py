"""HTTP/2 request header validation: each malformed shape is named, good ones pass."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.protocols.h2headers import request_problem, trailers_problem

GOOD = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
        (b":authority", b"a"), (b"accept", b"*/*"), (b"te", b"trailers")]


def test_a_good_request_passes() -> None:
    """Pseudo-headers first, lowercase names, te: trailers: fine."""
    assert request_problem(GOOD) is None
    assert request_problem([(b":method", b"CONNECT"), (b":authority", b"h:443")]) is None


@pytest.mark.parametrize("headers,expected", [
    ([(b":method", b"GET"), (b":path", b"/")], "missing :scheme"),
    ([(b":scheme", b"http"), (b":path", b"/")], "missing :method"),
    ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"")], "empty :path"),
    ([*GOOD, (b":path", b"/x")], "after regular headers"),
    ([(b":method", b"GET"), (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],
     "repeated pseudo-header"),
    ([(b":status", b"200"), *GOOD], "unknown pseudo-header"),
    ([*GOOD, (b"X-Upper", b"1")], "invalid header name"),
    ([*GOOD, (b"connection", b"close")], "connection-specific"),
    ([*GOOD, (b"transfer-encoding", b"chunked")], "connection-specific"),
    ([*GOOD, (b"te", b"gzip")], "te other than"),
    ([*GOOD, (b"x", b"a\r\nb")], "invalid value"),
    ([*GOOD, (b"x", b"nul\x00")], "invalid value"),
    ([*GOOD, (b"x", b" padded")], "invalid value"),
    ([*GOOD, (b"content-length", b"12a")], "content-length"),
    ([(b":method", b"CONNECT"), (b":authority", b"h"), (b":path", b"/")], "CONNECT needs"),
])
def test_malformed_shapes_are_named(headers: list[tuple[bytes, bytes]], expected: str) -> None:
    """Each malformed shape gets a reason that says what is wrong."""
    problem = request_problem(headers)
    assert problem is not None and expected in problem


def test_trailers() -> None:
    """Trailers take no pseudo-headers and the same field rules."""
    assert trailers_problem([(b"grpc-status", b"0")]) is None
    assert "pseudo-header" in (trailers_problem([(b":status", b"200")]) or "")


@given(st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=8)), max_size=8))
def test_never_raises(headers: list[tuple[bytes, bytes]]) -> None:
    """Any header list gets a verdict without raising."""
    result = request_problem(headers)
    assert result is None or isinstance(result, str)
