"""Bootstrap tokens: the file that maps a secret token to the identity it may claim.

Format: one ``TOKEN NAMESPACE ACCOUNT`` per line, fields separated by blanks; ``#`` at the
start of a line or after a blank starts a comment; blank lines are ignored. A token is at
least 16 characters (use ``openssl rand -hex 32``); the same token may not appear twice.
Errors name the file and the line number, never the token: the file is secret.

Tokens are kept only as SHA-256 digests, so a lookup's timing depends on the digest, not on
how many leading characters of a guess are right. :class:`TokenFile` re-reads the file when
its modification time or size changes; a broken new version is reported and the last good
one stays in force.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from certs import spiffe

MIN_TOKEN_LENGTH = 16

log = logging.getLogger("appliance.identity.tokens")


class TokenFileError(ValueError):
    """The tokens file cannot be read or a line is malformed."""


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a token stands for."""

    namespace: str
    account: str


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _strip_comment(line: str) -> str:
    for i, ch in enumerate(line):
        if ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def parse(text: str, source: str) -> dict[bytes, Subject]:
    """Token digest -> subject; :class:`TokenFileError` names ``source`` and the line."""
    book: dict[bytes, Subject] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        fields = _strip_comment(raw).split()
        if not fields:
            continue
        where = f"{source}:{number}"
        if len(fields) != 3:
            raise TokenFileError(f"{where}: expected TOKEN NAMESPACE ACCOUNT, "
                                 f"found {len(fields)} field(s)")
        token, namespace, account = fields
        if len(token) < MIN_TOKEN_LENGTH:
            raise TokenFileError(f"{where}: the token is shorter than {MIN_TOKEN_LENGTH} "
                                 "characters")
        try:
            spiffe.check_namespace(namespace)
            spiffe.check_account(account)
        except spiffe.SpiffeError as exc:
            raise TokenFileError(f"{where}: {exc}") from None
        digest = _digest(token)
        if digest in book:
            raise TokenFileError(f"{where}: this token already appears on an earlier line")
        book[digest] = Subject(namespace, account)
    return book


class TokenFile:
    """A tokens file, re-read when it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._book: dict[bytes, Subject] = {}
        self._reload(initial=True)

    def _reload(self, *, initial: bool = False) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            message = f"{self.path}: cannot read ({getattr(exc, 'strerror', None) or exc})"
            if initial:
                raise TokenFileError(message) from None
            log.error("%s; keeping the tokens read before", message)
            return
        try:
            book = parse(text, str(self.path))
        except TokenFileError as exc:
            if initial:
                raise
            log.error("%s; keeping the tokens read before", exc)
            self._stamp = stamp  # report a broken version once, not on every request
            return
        self._book, self._stamp = book, stamp
        if not initial:
            log.info("%s: reloaded, %d token(s)", self.path, len(book))

    def __len__(self) -> int:
        return len(self._book)

    def lookup(self, token: str) -> Subject | None:
        """The subject of ``token``, or None if the file does not list it."""
        self._reload()
        return self._book.get(_digest(token))
