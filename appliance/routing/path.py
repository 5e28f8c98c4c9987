"""Paths: the names that identifiers produce and dtabs rewrite, and the shared scanner.

A path is a plain ``tuple[str, ...]`` of non-empty segments: ``/svc/web`` is
``("svc", "web")`` and ``/`` is ``()``. The concrete syntax is Finagle's: a segment is made
of letters, digits and ``_:.#$%-``; any other byte is written as a ``\\xNN`` escape of its
UTF-8 encoding (``/a\\x20b`` is the one segment ``"a b"``). Whitespace and ``#`` comments
(to the end of the line) may stand between tokens, never inside a path.

:class:`Scanner` is the one character cursor that the path, name-tree and dtab parsers
share, so that every syntax error is a :class:`RoutingSyntaxError` with the same shape:
what was wrong, the 1-based position, and the text.
"""

from __future__ import annotations

import json

Path = tuple[str, ...]

SHOWABLE = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_:.#$%-")
_HEX = frozenset("0123456789abcdefABCDEF")
_EXCERPT = 80


class RoutingError(Exception):
    """Base of every error the routing modules raise."""


class RoutingSyntaxError(RoutingError, ValueError):
    """Text that is not a valid path, name tree or dtab.

    ``position`` is 1-based (the first character is position 1; ``len(text) + 1`` is the
    end of input), as shown in the message.
    """

    def __init__(self, message: str, text: str, position: int, expected: str = "") -> None:
        super().__init__(message, text, position)
        self.message = message
        self.text = text
        self.position = position
        self.expected = expected

    def __str__(self) -> str:
        where = f"at position {self.position} in {_quote(self.text, self.position - 1)}"
        if "\n" in self.text:
            before = self.text[: self.position - 1]
            line = before.count("\n") + 1
            column = len(before) - (before.rfind("\n") + 1) + 1
            where += f" (line {line}, column {column})"
        hint = f" (expected {self.expected})" if self.expected else ""
        return f"{self.message} {where}{hint}"


def _quote(text: str, offset: int) -> str:
    """The text in double quotes, cut to a window around ``offset`` when it is long."""
    if len(text) <= _EXCERPT:
        return json.dumps(text, ensure_ascii=False)
    start = max(0, offset - _EXCERPT // 2)
    end = min(len(text), start + _EXCERPT)
    body = json.dumps(text[start:end], ensure_ascii=False)[1:-1]
    return '"' + ("..." if start else "") + body + ("..." if end < len(text) else "") + '"'


def describe(ch: str) -> str:
    """How a character (or the end of input, ``""``) is named in error messages."""
    return "end of input" if ch == "" else repr(ch)


class Scanner:
    """A cursor over ``text`` with the lexical rules shared by all routing syntaxes."""

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"expected text (str), got {type(text).__name__}")
        self.text = text
        self.pos = 0
        self.depth = 0  # parentheses open, for the name-tree parser's nesting limit

    def peek(self) -> str:
        """The next character, or ``""`` at the end of input."""
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip_space(self) -> None:
        """Skip whitespace and ``#`` comments that run to the end of the line."""
        text, n = self.text, len(self.text)
        while self.pos < n:
            ch = text[self.pos]
            if ch == "#":
                newline = text.find("\n", self.pos)
                self.pos = n if newline < 0 else newline + 1
            elif ch.isspace():
                self.pos += 1
            else:
                return

    def error(self, message: str, *, expected: str = "", at: int | None = None
              ) -> RoutingSyntaxError:
        offset = self.pos if at is None else at
        return RoutingSyntaxError(message, self.text, offset + 1, expected)

    def unexpected(self, expected: str = "") -> RoutingSyntaxError:
        return self.error(f"unexpected {describe(self.peek())}", expected=expected)

    def eat(self, ch: str) -> bool:
        if self.peek() == ch:
            self.pos += 1
            return True
        return False

    def expect(self, token: str) -> None:
        """Consume ``token`` exactly, or fail naming it."""
        for ch in token:
            if not self.eat(ch):
                raise self.unexpected(repr(token))

    def expect_end(self, expected: str) -> None:
        self.skip_space()
        if not self.at_end():
            raise self.unexpected(expected)

    def label_starts(self) -> bool:
        ch = self.peek()
        return ch in SHOWABLE or ch == "\\"

    def label(self) -> str:
        """One path segment: showable characters and ``\\xNN`` escapes, UTF-8 decoded."""
        start = self.pos
        raw = bytearray()
        while True:
            ch = self.peek()
            if ch and ch in SHOWABLE:
                raw.append(ord(ch))
                self.pos += 1
            elif ch == "\\":
                raw.append(self._escape())
            else:
                break
        if not raw:
            raise self.unexpected("a path segment")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error("path segment is not valid UTF-8", at=start) from None

    def _escape(self) -> int:
        self.pos += 1
        if not self.eat("x"):
            raise self.unexpected("'x' after '\\' (escapes are \\xNN)")
        digits = self.text[self.pos:self.pos + 2]
        for i, d in enumerate(digits.ljust(2)):
            if d not in _HEX:
                self.pos += i
                raise self.unexpected("a hex digit")
        self.pos += 2
        return int(digits, 16)

    def path(self) -> Path:
        """``/`` followed by segments separated by ``/``; a bare ``/`` is the empty path."""
        self.skip_space()
        if not self.eat("/"):
            raise self.unexpected("'/'")
        if not self.label_starts():
            return ()
        segments = [self.label()]
        while self.eat("/"):
            segments.append(self.label())
        return tuple(segments)


def parse_path(text: str) -> Path:
    """Parse ``"/a/b"`` into ``("a", "b")``; raises :class:`RoutingSyntaxError`."""
    scanner = Scanner(text)
    path = scanner.path()
    scanner.expect_end("'/' or end of input")
    return path


def show_segment(segment: str) -> str:
    """A segment in concrete syntax: showable characters as they are, others escaped."""
    if not isinstance(segment, str) or not segment:
        raise ValueError(f"a path segment must be a non-empty string, not {segment!r}")
    if all(ch in SHOWABLE for ch in segment):
        return segment
    out: list[str] = []
    for ch in segment:
        if ch in SHOWABLE:
            out.append(ch)
        elif "\ud800" <= ch <= "\udfff":
            raise ValueError(f"path segment {segment!r} holds a lone surrogate (not UTF-8)")
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def show_path(path: Path) -> str:
    """The concrete syntax of a path; ``parse_path(show_path(p)) == p``."""
    if not isinstance(path, tuple):
        raise TypeError(f"a path is a tuple of strings, not {type(path).__name__}")
    return "/" + "/".join(show_segment(s) for s in path)


def check_path(path: object, what: str = "path") -> Path:
    """Return ``path`` if it is a tuple of non-empty strings, else raise naming ``what``."""
    if not isinstance(path, tuple):
        raise TypeError(f"{what} must be a tuple of strings, not {type(path).__name__}")
    for i, segment in enumerate(path):
        if not isinstance(segment, str) or not segment:
            raise ValueError(f"{what} segment {i} must be a non-empty string, not {segment!r}")
    return path
