"""The files namer's pure part: the service file format, and when to re-read a file.

Theory of operation: the files namer (linkerd's ``io.l5d.fs``) serves a directory with one
file per service name. :func:`parse_file` reads one file's text into addresses and raises
:class:`FileFormatError` naming the line on anything it does not understand.

:class:`FileTracker` holds what the poller knows about one file and decides what each poll
means. A poll gives the file's :class:`Stamp` (inode, size, mtime, ctime) or ``None`` if
it does not exist. The tracker asks for a read only when the stamp changed, or when the
last read saw a file modified within ``racy_ns`` of the read: timestamps are coarse (a
few ms on Linux, 1-2 s elsewhere), so a same-size rewrite in the same tick would leave the
stamp unchanged; such a "racy" file is read again on the next poll, as git does for its
index. The outcome of a read or a stat is an :class:`Update`: ``bound`` (the addresses),
``neg`` (no such file) or ``fail`` (unreadable or unparsable: the watch keeps the last
good set, stale).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from appliance.discovery.base import Address
from appliance.discovery.static import (
    check_host,
    parse_port,
    parse_weight,
    split_hostport,
    unique_addresses,
)

MAX_BYTES = 1 << 20
"""A service file larger than this is refused (unparsable), not read into memory."""


class FileFormatError(ValueError):
    """A service file is not in the format; the message names the line."""


def parse_file(text: str, source: str = "") -> frozenset[Address]:
    """Addresses from a service file: ``host port [weight]`` or ``host:port [weight]`` per
    line, ``#`` comments and blank lines ignored."""
    where = f"{source}:" if source else "line "

    def lines() -> Iterator[tuple[str, str, list[str]]]:
        for lineno, raw in enumerate(text.splitlines(), start=1):
            fields = raw.split("#", 1)[0].split()
            if fields:
                yield f"{where}{lineno}", str(lineno), fields

    return unique_addresses(lines(), parse_line, FileFormatError, "on line")


def parse_line(fields: list[str]) -> Address:
    """One line's fields: ``[host, port]``, ``[host, port, weight]``, ``[host:port]`` or
    ``[host:port, weight]``."""
    if len(fields) > 3:
        raise ValueError(f"expected \"host port [weight]\", got {len(fields)} fields")
    if len(fields) == 3:
        return Address(check_host(fields[0]), parse_port(fields[1]), parse_weight(fields[2]))
    if _is_hostport(fields[0]):
        host, port = split_hostport(fields[0])
        weight = parse_weight(fields[1]) if len(fields) == 2 else 1.0
        return Address(check_host(host), parse_port(port), weight)
    if len(fields) == 1:
        raise ValueError(f"expected \"host port\" or \"host:port\", got {fields[0]!r}")
    return Address(check_host(fields[0]), parse_port(fields[1]))


def _is_hostport(text: str) -> bool:
    """``host:port`` or ``[v6]:port``; a bare IPv6 address (many colons) is a host."""
    return text.startswith("[") or text.count(":") == 1


def check_service_name(name: str) -> str:
    """A service name usable as a file name in the directory, else ``ValueError``."""
    if not name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"bad service name {name!r} (empty, or starts with a dot)")
    if "/" in name or "\0" in name or os.sep in name:
        raise ValueError(f"bad service name {name!r} (contains a path separator)")
    return name


@dataclass(frozen=True, slots=True)
class Stamp:
    """What a stat of the file says, enough to notice a change without reading it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    regular: bool = True
    """A regular file (a directory or a FIFO under the name is not read)."""

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                   stat.S_ISREG(st.st_mode))


@dataclass(frozen=True, slots=True)
class Update:
    """What one poll means for the watch."""

    kind: Literal["bound", "neg", "fail"]
    addrs: frozenset[Address] = frozenset()
    error: str = ""


class FileTracker:
    """The poll state of one service file; see the module docstring."""

    def __init__(self, path: str, racy_ns: int = 2_000_000_000) -> None:
        self.path = path
        self.racy_ns = racy_ns
        self._stamp: Stamp | None | object = _UNSEEN
        self._racy = False
        self._stat_error = ""

    def needs_read(self, stamp: Stamp | None) -> bool:
        """Whether the poll that found ``stamp`` (``None``: no such file) should read the
        file, or report it gone."""
        if stamp != self._stamp:
            return True
        return stamp is not None and self._racy

    def missing(self) -> Update:
        """The file does not exist (and its directory does)."""
        self._remember(None, racy=False)
        return Update("neg")

    def stat_failed(self, error: str) -> Update | None:
        """The file or its directory could not be looked at; ``None`` if that is no news."""
        if self._stamp is _STAT_FAILED and error == self._stat_error:
            return None
        self._remember(_STAT_FAILED, racy=False)
        self._stat_error = error
        return Update("fail", error=f"{self.path}: {error}")

    def read_failed(self, stamp: Stamp, error: str) -> Update:
        """The file exists but could not be read; tried again when its stamp changes."""
        self._remember(stamp, racy=False)
        return Update("fail", error=f"{self.path}: {error}")

    def read(self, stamp: Stamp, data: bytes, now_ns: int) -> Update:
        """The file was read (``data``) at wall-clock ``now_ns``."""
        self._remember(stamp, racy=now_ns - stamp.mtime_ns < self.racy_ns)
        if len(data) > MAX_BYTES:
            return Update("fail", error=f"{self.path}: larger than {MAX_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Update("fail", error=f"{self.path}: not UTF-8 at byte {exc.start}")
        try:
            return Update("bound", parse_file(text, self.path))
        except FileFormatError as exc:
            return Update("fail", error=str(exc))

    def _remember(self, stamp: Stamp | None | object, racy: bool) -> None:
        self._stamp, self._racy, self._stat_error = stamp, racy, ""


_UNSEEN = object()
_STAT_FAILED = object()
