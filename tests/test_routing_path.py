"""Paths: Finagle's concrete syntax, escapes, and syntax errors that name the position."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.routing.path import (
    SHOWABLE,
    RoutingSyntaxError,
    check_path,
    parse_path,
    show_path,
    show_segment,
)

segments = st.one_of(
    st.text(alphabet=sorted(SHOWABLE), min_size=1, max_size=8),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)),  # type: ignore[arg-type]
            min_size=1, max_size=8),
)
paths = st.lists(segments, max_size=5).map(tuple)


@pytest.mark.parametrize(("text", "path"), [
    ("/", ()),
    ("/a", ("a",)),
    ("/a/b", ("a", "b")),
    ("/svc/web:8080", ("svc", "web:8080")),
    ("/#/io.l5d.fs/web", ("#", "io.l5d.fs", "web")),
    ("/$/inet/127.0.0.1/80", ("$", "inet", "127.0.0.1", "80")),
    ("/a_b-c%d.e", ("a_b-c%d.e",)),
    ("/a#b", ("a#b",)),
    ("  /a/b  ", ("a", "b")),
    ("/a # a comment", ("a",)),
    ("\n/a\n", ("a",)),
    ("/a\\x20b", ("a b",)),
    ("/\\x2f", ("/",)),
    ("/\\xc3\\xa9t\\xC3\\xA9", ("été",)),
])
def test_parse_path_table(text: str, path: tuple[str, ...]) -> None:
    """Each valid text parses to the expected tuple of segments."""
    assert parse_path(text) == path


@pytest.mark.parametrize(("text", "position", "message"), [
    ("/svc/a&b", 7, "unexpected '&'"),
    ("svc", 1, "unexpected 's'"),
    ("", 1, "unexpected end of input"),
    ("/a/", 4, "unexpected end of input"),
    ("/a//b", 4, "unexpected '/'"),
    ("/a b", 4, "unexpected 'b'"),
    ("/a\\y", 4, "unexpected 'y'"),
    ("/a\\x4", 6, "unexpected end of input"),
    ("/a\\xg0", 5, "unexpected 'g'"),
    ("/\\xff", 2, "path segment is not valid UTF-8"),
    ("/a*", 3, "unexpected '*'"),
])
def test_parse_path_errors_name_the_position(text: str, position: int, message: str) -> None:
    """A bad path raises RoutingSyntaxError with the 1-based position of the problem."""
    with pytest.raises(RoutingSyntaxError) as info:
        parse_path(text)
    assert info.value.position == position
    assert info.value.message == message
    assert info.value.text == text


def test_error_str_matches_the_documented_shape() -> None:
    """The message reads: what, where, in which text, and what was expected."""
    with pytest.raises(RoutingSyntaxError) as info:
        parse_path("/svc/a&b")
    assert str(info.value) == (
        'unexpected \'&\' at position 7 in "/svc/a&b" (expected \'/\' or end of input)')
    assert isinstance(info.value, ValueError)


def test_error_in_multiline_text_gives_line_and_column() -> None:
    """Errors in multi-line text also say the line and column."""
    err = RoutingSyntaxError("unexpected 'x'", "/a\n/bx", 6)
    assert "line 2, column 3" in str(err)


def test_error_in_long_text_shows_a_window_around_the_position() -> None:
    """A long text is cut to an excerpt that still contains the bad character."""
    text = "/" + "a" * 300 + "&" + "b" * 300
    with pytest.raises(RoutingSyntaxError) as info:
        parse_path(text)
    shown = str(info.value)
    assert info.value.position == 302
    assert "&" in shown and len(shown) < 200 and "..." in shown


@pytest.mark.parametrize(("path", "text"), [
    ((), "/"),
    (("svc", "web"), "/svc/web"),
    (("a b",), "/a\\x20b"),
    (("été",), "/\\xc3\\xa9t\\xc3\\xa9"),
    (("*",), "/\\x2a"),
    (("[::1]:80",), "/\\x5b::1\\x5d:80"),
])
def test_show_path_table(path: tuple[str, ...], text: str) -> None:
    """Showable characters stay as they are; every other byte is a \\xNN escape."""
    assert show_path(path) == text


@given(paths)
def test_show_then_parse_is_identity(path: tuple[str, ...]) -> None:
    """Any tuple of non-empty strings survives show_path then parse_path."""
    assert parse_path(show_path(path)) == path


@given(paths)
def test_shown_paths_use_only_the_path_alphabet(path: tuple[str, ...]) -> None:
    """The shown form is plain ASCII: showable characters, '/', '\\' and 'x' escapes."""
    shown = show_path(path)
    assert set(shown) <= SHOWABLE | {"/", "\\"}


@pytest.mark.parametrize("bad", [("a", ""), ("a", 3), ["a"], "a", ("\ud800",)])
def test_show_path_rejects_what_no_text_can_express(bad: object) -> None:
    """Empty segments, non-strings, non-tuples and lone surrogates are clear errors."""
    with pytest.raises((TypeError, ValueError)):
        show_path(bad)  # type: ignore[arg-type]


def test_check_path_names_the_bad_segment() -> None:
    """check_path says which segment is wrong and what it was."""
    with pytest.raises(ValueError, match=r"prefix segment 1 must be a non-empty string"):
        check_path(("a", ""), "prefix")
    assert check_path(("a",)) == ("a",)


def test_show_segment_leaves_showable_segments_alone() -> None:
    """A segment of showable characters is returned unchanged (no copy needed)."""
    assert show_segment("io.l5d.fs") == "io.l5d.fs"
