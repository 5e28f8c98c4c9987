"""HTTP/2 request header validation: each malformed shape is named, good ones pass."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.protocols.h2headers import (
    content_length,
    request_info,
    request_problem,
    response_info,
    response_problem,
    trailers_problem,
)

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


@pytest.mark.parametrize("headers,expected", [
    ([(b":status", b"200"), (b"server", b"x")], None),
    ([(b"server", b"x")], "missing :status"),
    ([(b"server", b"x"), (b":status", b"200")], "not first"),
    ([(b":status", b"200"), (b":status", b"204")], "not first"),
    ([(b":status", b"20")], "invalid :status"),
    ([(b":status", b"abc")], "invalid :status"),
    ([(b":status", b"200"), (b":path", b"/")], "pseudo-header"),
    ([(b":status", b"200"), (b"keep-alive", b"1")], "connection-specific"),
])
def test_response_heads(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    """A response head needs one 3-digit :status, first, and no request pseudo-headers."""
    problem = response_problem(headers)
    assert problem is None if expected is None else expected in (problem or "")


@pytest.mark.parametrize("headers,expected", [
    ([], None),
    ([(b"content-length", b"5")], 5),
    ([(b"content-length", b"5"), (b"content-length", b"5")], 5),
    ([(b"content-length", b"5"), (b"content-length", b"6")], "conflicting"),
    ([(b"content-length", b"-1")], "not a number"),
])
def test_content_length(headers: list[tuple[bytes, bytes]], expected: object) -> None:
    """Repeated equal values are one length; differing or non-numeric ones are named."""
    got = content_length(headers)
    assert got == expected if not isinstance(expected, str) else expected in str(got)


def test_info_helpers() -> None:
    """request_info and response_info give the verdict and the length in one call."""
    assert request_info([*GOOD, (b"content-length", b"3")]) == (None, 3)
    assert request_info([(b":method", b"GET")])[0] == "missing :scheme"
    assert response_info([(b":status", b"204")]) == (None, 204, None)
    assert response_info([(b":status", b"200"), (b"content-length", b"x")])[0]
