"""Identifiers (request -> logical name) and per-request dtab overrides."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.routing.dtab import parse_dtab
from appliance.routing.identify import (
    Identified,
    RequestView,
    by_dst,
    by_header,
    by_host,
    by_method_and_host,
    by_path,
    first_of,
    make_identifier,
    parse_override,
    show_override,
)
from appliance.routing.path import RoutingSyntaxError, parse_path, show_path


def req(authority: str = "web", path: str = "/", method: str = "GET",
        headers: dict[str, str] | None = None, dst: tuple[str, int] | None = None,
        protocol: str = "http/1", version: str = "") -> RequestView:
    return RequestView(method=method, authority=authority, path=path, headers=headers or {},
                       dst=dst, protocol=protocol, version=version)


def P(text: str) -> tuple[str, ...]:
    return parse_path(text)


@pytest.mark.parametrize(("identifier", "request_", "name"), [
    (by_host(), req("web"), P("/svc/web")),
    (by_host(), req("Web.Example.COM:8080"), P("/svc/web.example.com:8080")),
    (by_host(), req(""), None),
    (by_host(), req("  "), None),
    (by_host(strip_port=True), req("web:8080"), P("/svc/web")),
    (by_host(strip_port=True), req("[::1]:8080"), P("/svc/::1")),
    (by_host(strip_port=True), req("web"), P("/svc/web")),
    (by_host(prefix="/http"), req("web", protocol="h2"), P("/http/web")),
    (by_method_and_host(), req("Web", method="POST"), P("/svc/1.1/POST/web")),
    (by_method_and_host(), req("web", protocol="h2"), P("/svc/2/GET/web")),
    (by_method_and_host(), req("", version="1.0"), P("/svc/1.0/GET")),
    (by_method_and_host(), req("web", version="1.0"), P("/svc/1.0/GET")),
    (by_method_and_host(), req(""), None),
    (by_method_and_host(uri_in_dst=True), req("web", "/a/b?q=1"), P("/svc/1.1/GET/web/a/b")),
    (by_method_and_host(uri_in_dst=True), req("web", "/"), P("/svc/1.1/GET/web")),
    (by_path(), req(path="/users/42?x=1"), P("/svc/users")),
    (by_path(2), req(path="/users/42?x=1"), P("/svc/users/42")),
    (by_path(3), req(path="/users/42"), None),
    (by_path(), req(path="/"), None),
    (by_path(), req(path="//users"), None),
    (by_path(), req(path="*"), None),
    (by_header(), req(headers={"l5d-name": "/web/v2"}), P("/svc/web/v2")),
    (by_header(), req(), None),
    (by_header("X-Service", token=True), req(headers={"x-service": "a b"}), ("svc", "a b")),
    (by_header("x-service", token=True), req(headers={"x-service": ""}), None),
    (by_header("host", token=True), req("Web:80"), P("/svc/Web:80")),
    (by_header(":authority", token=True), req("web", protocol="h2"), P("/svc/web")),
    (by_dst(), req(dst=("10.1.2.3", 80)), P("/svc/10.1.2.3:80")),
    (by_dst(), req(dst=("::1", 8080)), P("/svc/::1:8080")),
    (by_dst(), req(), None),
])
def test_identifier_table(identifier: Any, request_: RequestView,
                          name: tuple[str, ...] | None) -> None:
    """Each identifier names requests as linkerd's does, or returns None."""
    assert identifier(request_) == name


def test_header_path_value_that_does_not_parse_names_the_header() -> None:
    """io.l5d.header style: a value that is not a path raises, naming the header."""
    with pytest.raises(RoutingSyntaxError, match=r"^l5d-name header: unexpected '&'"):
        by_header()(req(headers={"l5d-name": "/web&x"}))


def test_path_identifier_with_consume_rewrites_the_request_path() -> None:
    """consume=True drops the identifying segments from the path sent on (query kept)."""
    ident = by_path(1, consume=True)
    assert ident.identify(req(path="/users/42?x=1")) == Identified(P("/svc/users"), "/42?x=1")
    assert ident.identify(req(path="/users")) == Identified(P("/svc/users"), "/")
    assert ident.identify(req(path="/users?x")) == Identified(P("/svc/users"), "/?x")
    assert by_path(1).identify(req(path="/users/42")) == Identified(P("/svc/users"),
                                                                    "/users/42")
    assert ident.identify(req(path="/")) is None


def test_first_of_tries_in_order() -> None:
    """host then dst: the Host name wins, the original destination is the fallback."""
    ident = first_of([by_host(), by_dst()])
    assert ident(req("web", dst=("10.0.0.1", 80))) == P("/svc/web")
    assert ident(req("", dst=("10.0.0.1", 80))) == P("/svc/10.0.0.1:80")
    assert ident(req("")) is None
    assert ident.identify(req("", dst=("10.0.0.1", 80))) == Identified(
        P("/svc/10.0.0.1:80"), "/")
    assert ident.prefix == ("svc",)


def test_first_of_passes_on_the_path_rewrite_of_the_one_that_matched() -> None:
    """identify() of first_of returns the rewritten path of the matching identifier."""
    ident = first_of([by_header(), by_path(1, consume=True)])
    assert ident.identify(req(path="/api/x")) == Identified(P("/svc/api"), "/x")


@pytest.mark.parametrize(("bad", "error"), [
    ([], ValueError),
    (["host"], TypeError),
])
def test_first_of_rejects_nonsense(bad: Any, error: type[Exception]) -> None:
    """An empty list or a non-identifier is a clear error."""
    with pytest.raises(error):
        first_of(bad)


@pytest.mark.parametrize(("kind", "options", "request_", "name"), [
    ("host", {}, req("web"), P("/svc/web")),
    ("host", {"prefix": ("out",)}, req("web"), P("/out/web")),
    ("host", {"prefix": "/out", "strip_port": True}, req("web:1"), P("/out/web")),
    ("method_and_host", {"uri_in_dst": True}, req("w", "/a"), P("/svc/1.1/GET/w/a")),
    ("path", {"segments": 2}, req(path="/a/b/c"), P("/svc/a/b")),
    ("header", {}, req(headers={"l5d-name": "/x"}), P("/svc/x")),
    ("header", {"name": ""}, req(headers={"l5d-name": "/x"}), P("/svc/x")),
    ("header", {"name": "x-dst"}, req(headers={"x-dst": "/y/z"}), P("/svc/y/z")),
    ("header_token", {}, req("Web"), P("/svc/Web")),
    ("header_token", {"name": "x-dst"}, req(headers={"x-dst": "y"}), P("/svc/y")),
    ("dst", {}, req(dst=("1.2.3.4", 5)), P("/svc/1.2.3.4:5")),
    ("io.l5d.header.token", {}, req("web"), P("/svc/web")),
    ("io.l5d.methodAndHost", {}, req("web"), P("/svc/1.1/GET/web")),
    ("io.l5d.path", {"segments": 1, "consume": True}, req(path="/a/b"), P("/svc/a")),
])
def test_make_identifier_table(kind: str, options: dict[str, Any], request_: RequestView,
                               name: tuple[str, ...]) -> None:
    """Config-style kinds (and linkerd's io.l5d.* names) build the matching identifier."""
    assert make_identifier(kind, **options)(request_) == name


@pytest.mark.parametrize(("kind", "options", "message"), [
    ("hots", {}, r"identifier kind 'hots' is not known; expected one of: dst, header"),
    ("path", {"segment": 2}, r"unknown option 'segment' \(allowed: consume, prefix, segments\)"),
    ("path", {"segments": 0}, r"option 'segments' must be an integer >= 1, not 0"),
    ("path", {"segments": True}, r"option 'segments' must be an integer >= 1"),
    ("path", {"consume": "yes"}, r"option 'consume' must be a bool"),
    ("host", {"prefix": "svc"}, r"option 'prefix': unexpected 's' at position 1"),
    ("host", {"prefix": ("a", "")}, r"option 'prefix': prefix segment 1"),
    ("dst", {"name": "x"}, r"identifier 'dst': unknown option 'name' \(allowed: prefix\)"),
    ("header", {"name": 3}, r"option 'name' must be a str"),
])
def test_make_identifier_errors_are_clear(kind: str, options: dict[str, Any],
                                          message: str) -> None:
    """Unknown kinds, unknown options and bad values say what is wrong and what is allowed."""
    with pytest.raises(ValueError, match=message):
        make_identifier(kind, **options)


def test_request_view_rejects_an_unknown_protocol() -> None:
    """protocol is 'http/1' or 'h2'; anything else is a clear error."""
    with pytest.raises(ValueError, match="protocol must be 'http/1' or 'h2'"):
        req(protocol="http/2")


@given(st.text(min_size=1).filter(lambda s: s.strip()))
def test_host_names_always_show_and_read_back(authority: str) -> None:
    """Whatever the Host header holds, the name it gives is a valid, round-tripping path."""
    try:
        name = by_host()(req(authority))
    except ValueError:
        pytest.fail("identification must not raise for any Host value")
    assert name is not None
    if not any("\ud800" <= ch <= "\udfff" for ch in name[1]):
        assert parse_path(show_path(name)) == name


# ---------------------------------------------------------------------------- overrides


def test_override_values_concatenate_in_order() -> None:
    """Several l5d-dtab values make one dtab; later values take precedence."""
    dtab = parse_override(["/svc/web => /#/fs/web-v2", "/svc/api => /#/fs/api-v3;"])
    assert dtab == parse_dtab("/svc/web => /#/fs/web-v2; /svc/api => /#/fs/api-v3")
    later = parse_override(["/svc/web => /a", "/svc/web => /b"])
    assert later.lookup(P("/svc/web")) == parse_dtab("/x=>/b | /a").dentries[0].dst


def test_override_of_no_values_is_the_empty_dtab() -> None:
    """No headers (or empty values) give the empty dtab."""
    assert len(parse_override([])) == 0
    assert len(parse_override(["", "  "])) == 0


def test_bad_override_raises_a_syntax_error_about_that_value() -> None:
    """A value that does not parse raises RoutingSyntaxError (the proxy answers 400)."""
    with pytest.raises(RoutingSyntaxError) as info:
        parse_override(["/svc/a => /b", "/svc/web => /#/fs/web v2"])
    assert info.value.text == "/svc/web => /#/fs/web v2"
    assert info.value.position == 23


def test_parse_override_takes_a_list_not_a_string() -> None:
    """Passing one string instead of a list is caught (it would iterate characters)."""
    with pytest.raises(TypeError, match="list of header values"):
        parse_override("/a => /b")  # type: ignore[arg-type]


@given(st.lists(st.sampled_from([
    "/svc/web => /#/fs/web-v2", "/svc => /#/fs;", "/a/*/b => 0.25*/c & 0.75*/d | ~", "",
]), max_size=4))
def test_show_override_round_trips(values: list[str]) -> None:
    """The header value we pass on parses back to the same override."""
    dtab = parse_override(values)
    assert parse_override([show_override(dtab)]) == dtab
