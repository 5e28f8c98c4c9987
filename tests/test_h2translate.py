"""HTTP/1.1 <-> HTTP/2 head translation, pure: the RFC 9113 §8.2.2 and §8.3 rules, table
by table, and properties over random header lists."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.protocols.h2translate import (
    CONNECTION_SPECIFIC,
    TranslateError,
    request_to_h1,
    request_to_h2,
    response_to_h1,
    response_to_h2,
    split_target,
    trailers_to_h1,
    trailers_to_h2,
)


@pytest.mark.parametrize("target,expected", [
    (b"/a?b", (None, None, b"/a?b")),
    (b"*", (None, None, b"*")),
    (b"http://Example.com:8080/x?y", (b"http", b"Example.com:8080", b"/x?y")),
    (b"HTTP://h", (b"http", b"h", b"/")),
])
def test_split_target(target: bytes, expected: tuple) -> None:
    """Origin, asterisk and absolute forms."""
    assert split_target(target) == expected


@pytest.mark.parametrize("target", [b"example.com/x", b"http:///x", b"1http://h/"])
def test_bad_targets_are_400(target: bytes) -> None:
    """A target that is neither origin nor absolute form cannot be translated."""
    with pytest.raises(TranslateError) as info:
        split_target(target)
    assert info.value.status == 400


def test_request_to_h2_maps_the_control_data() -> None:
    """Method, scheme, authority (Host) and path become pseudo-headers, first; Host and
    connection-specific fields (and those Connection names) go; names are lowercased."""
    headers = [(b"Host", b"svc:80"), (b"Connection", b"x-hop, keep-alive"),
               (b"X-Hop", b"1"), (b"Keep-Alive", b"5"), (b"TE", b"gzip"),
               (b"Accept", b"*/*"), (b"Upgrade", b"h2c"), (b"Transfer-Encoding", b"chunked")]
    assert request_to_h2(b"POST", b"/p", headers) == [
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc:80"),
        (b":path", b"/p"), (b"accept", b"*/*")]


def test_request_to_h2_absolute_form_wins_over_host() -> None:
    """The authority of an absolute-form target is the request's, not Host's."""
    out = request_to_h2(b"GET", b"https://a.test/x", [(b"host", b"b.test")],
                        te_trailers=True)
    assert out == [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"),
                   (b":path", b"/x"), (b"te", b"trailers")]


def test_connect_is_not_translated() -> None:
    """CONNECT has no HTTP/2 form here: 502."""
    with pytest.raises(TranslateError) as info:
        request_to_h2(b"CONNECT", b"h:443", [])
    assert info.value.status == 502


def test_request_to_h1_joins_cookies_and_sets_host() -> None:
    """:authority becomes Host; split cookie fields are joined with '; '; te goes."""
    head = request_to_h1([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x"),
                          (b":authority", b"a.test"), (b"cookie", b"a=1"), (b"te", b"trailers"),
                          (b"cookie", b"b=2"), (b"accept", b"*/*")], chunked=True)
    assert head == (b"GET /x HTTP/1.1\r\nhost: a.test\r\naccept: */*\r\n"
                    b"cookie: a=1; b=2\r\ntransfer-encoding: chunked\r\n\r\n")


def test_request_to_h1_needs_method_and_path() -> None:
    """A request without :path (CONNECT's shape) cannot become a request line."""
    with pytest.raises(TranslateError):
        request_to_h1([(b":method", b"CONNECT"), (b":authority", b"h:1")], chunked=False)


def test_responses_both_ways() -> None:
    """Status line <-> :status; hop-by-hop fields dropped; a 204's content-length goes."""
    assert response_to_h2(200, [(b"Server", b"x"), (b"Connection", b"close"),
                                (b"Content-Length", b"3")]) == [
        (b":status", b"200"), (b"server", b"x"), (b"content-length", b"3")]
    assert response_to_h2(204, [(b"content-length", b"0")]) == [(b":status", b"204")]
    status, head = response_to_h1([(b":status", b"404"), (b"server", b"x")],
                                  extra=[b"connection: close\r\n"])
    assert (status, head) == (404, b"HTTP/1.1 404 Not Found\r\nserver: x\r\n"
                                   b"connection: close\r\n\r\n")
    assert response_to_h1([(b":status", b"299")])[1].startswith(b"HTTP/1.1 299 Status\r\n")


def test_trailers_both_ways() -> None:
    """Trailers keep their fields, minus pseudo and hop-by-hop ones."""
    assert trailers_to_h2([(b"X-Sum", b"1"), (b"Connection", b"x")]) == [(b"x-sum", b"1")]
    assert trailers_to_h1([(b"x-sum", b"1"), (b"te", b"x")]) == b"0\r\nx-sum: 1\r\n\r\n"


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
                 min_size=1, max_size=12).map(str.encode)
_names = st.one_of(_token, st.sampled_from([
    b"Connection", b"connection", b"Keep-Alive", b"Proxy-Connection", b"Transfer-Encoding",
    b"Upgrade", b"TE", b"Host", b"x-named"]))
_fields = st.lists(st.tuples(_names, st.binary(max_size=10).filter(
    lambda v: b"\r" not in v and b"\n" not in v)), max_size=10)


@given(_fields)
def test_nothing_connection_specific_reaches_http2(fields: list) -> None:
    """Whatever the HTTP/1.1 fields, the HTTP/2 list has its four pseudo-headers first,
    only lowercase names, nothing connection-specific, and nothing Connection named."""
    out = request_to_h2(b"GET", b"/", fields)
    assert [n for n, _ in out[:3]] == [b":method", b":scheme", b":authority"] or \
        [n for n, _ in out[:3]] == [b":method", b":scheme", b":path"]
    named = {t.strip().lower() for n, v in fields if n.lower() == b"connection"
             for t in v.split(b",")}
    for name, _ in out:
        assert name == name.lower()
        if not name.startswith(b":"):
            assert name not in CONNECTION_SPECIFIC | {b"host", b"te"}
            assert name not in named


@given(_fields)
def test_http1_heads_are_well_formed(fields: list) -> None:
    """An HTTP/2 request becomes one request line, CRLF-terminated fields, one blank line."""
    lowered = [(n.lower(), v) for n, v in fields]
    head = request_to_h1([(b":method", b"GET"), (b":path", b"/"), *lowered], chunked=False)
    assert head.startswith(b"GET / HTTP/1.1\r\n") and head.endswith(b"\r\n\r\n")
    assert head.count(b"\r\n\r\n") == 1
    assert b"\r\nconnection:" not in head and b"\r\ntransfer-encoding:" not in head
