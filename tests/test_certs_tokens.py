"""certs.tokens: the bootstrap tokens file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certs import tokens

T1 = "a" * 16
T2 = "b#c" + "x" * 14


def test_parse_lines_and_comments() -> None:
    """Blank lines and comments are skipped; '#' inside a token is part of it."""
    book = tokens.parse(f"# header\n\n{T1} default web  # the web app\n"
                        f"  {T2}\tprod api\n", "f")
    assert len(book) == 2
    assert book[tokens._digest(T1)] == tokens.Subject("default", "web")
    assert book[tokens._digest(T2)] == tokens.Subject("prod", "api")


@pytest.mark.parametrize("text, fragment", [
    (f"{T1} default\n", "f:1: expected TOKEN NAMESPACE ACCOUNT, found 2 field(s)"),
    (f"\n{T1} default web extra\n", "f:2: expected TOKEN NAMESPACE ACCOUNT, found 4"),
    ("short default web\n", "f:1: the token is shorter than 16 characters"),
    (f"{T1} Default web\n", "f:1: namespace 'Default'"),
    (f"{T1} default web_app\n", "f:1: account 'web_app'"),
    (f"{T1} a b\n{T1} c d\n", "f:2: this token already appears on an earlier line"),
])
def test_parse_errors_name_line(text: str, fragment: str) -> None:
    """Each malformed line is refused with the file and line number."""
    with pytest.raises(tokens.TokenFileError) as err:
        tokens.parse(text, "f")
    assert fragment in str(err.value)


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126,
                                      exclude_characters="#"), min_size=1, max_size=40),
       st.sampled_from(["Bad", "ok", ""]), st.sampled_from(["x", "", "a b"]))
def test_errors_never_show_the_token(token: str, ns: str, sa: str) -> None:
    """Whatever is wrong with a line, the error message does not contain the token."""
    try:
        tokens.parse(f"{token} {ns} {sa}\n", "f")
    except tokens.TokenFileError as exc:
        if len(token) >= 4:
            assert token not in str(exc)


def test_token_file_reloads_on_change(tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """A changed file is re-read on the next lookup; a broken change is logged once
    (naming the line) and the previous tokens stay in force."""
    path = tmp_path / "tokens"
    path.write_text(f"{T1} default web\n")
    tf = tokens.TokenFile(path)
    assert tf.lookup(T1) == tokens.Subject("default", "web")
    assert tf.lookup(T2) is None
    path.write_text(f"{T2} prod api\n")
    os.utime(path, ns=(1, 10**18))
    assert tf.lookup(T2) == tokens.Subject("prod", "api")
    assert tf.lookup(T1) is None
    with caplog.at_level(logging.ERROR, logger="appliance.identity.tokens"):
        path.write_text(f"{T1} default\n")
        os.utime(path, ns=(1, 2 * 10**18))
        assert tf.lookup(T2) == tokens.Subject("prod", "api")
        assert tf.lookup(T2) == tokens.Subject("prod", "api")
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 1 and "tokens:1: expected TOKEN" in errors[0]
    assert T1 not in errors[0]


def test_token_file_missing_at_start(tmp_path: Path) -> None:
    """A missing tokens file at start is an error naming it."""
    with pytest.raises(tokens.TokenFileError, match="nope: cannot read"):
        tokens.TokenFile(tmp_path / "nope")
