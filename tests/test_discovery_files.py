"""The files namer (io.l5d.fs): the file format, the re-read rule, and a real directory."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from namer_scenario import Reports, run, wait_state

from appliance.discovery.base import NEG, Address, AddrState, NamerContext, bound
from appliance.discovery.files import (
    MAX_BYTES,
    FileFormatError,
    FileTracker,
    Stamp,
    Update,
    check_service_name,
    parse_file,
)
from appliance.net.namer_files import FilesNamer

# -- the format -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.1 8080\n10.0.0.2 8080\n", {Address("10.0.0.1", 8080), Address("10.0.0.2", 8080)}),
    ("10.0.0.1:8080\n", {Address("10.0.0.1", 8080)}),
    ("10.0.0.1 8080 2.5\n", {Address("10.0.0.1", 8080, 2.5)}),
    ("10.0.0.1:8080 3\n", {Address("10.0.0.1", 8080, 3.0)}),
    ("[::1]:80\n::2 81\n", {Address("::1", 80), Address("::2", 81)}),
    ("# a comment\n\n   \nweb.example 80   # trailing comment\n", {Address("web.example", 80)}),
    ("\tweb 80\r\n", {Address("web", 80)}),
    ("", set()),
    ("# nothing but comments\n", set()),
])
def test_parse_file_accepts(text: str, expected: set[Address]) -> None:
    """linkerd's "host port" lines, host:port, weights, comments and blank lines."""
    assert parse_file(text) == frozenset(expected)


@pytest.mark.parametrize(("text", "message"), [
    ("10.0.0.1 8080\n10.0.0.2\n", r"svc:2: expected \"host port\" or \"host:port\""),
    ("10.0.0.1 http\n", "svc:1: bad port 'http'"),
    ("# c\n10.0.0.1 80 0\n", "svc:2: bad weight 0.0"),
    ("10.0.0.1 80 1 extra\n", "svc:1: expected \"host port \\[weight\\]\", got 4 fields"),
    ("bad_host! 80\n", "svc:1: bad host 'bad_host!'"),
    ("10.0.0.1 80\n\n10.0.0.1:80\n", r"svc:3: duplicate address 10.0.0.1:80 \(also on line 1\)"),
])
def test_parse_file_names_the_line(text: str, message: str) -> None:
    """An unparsable line raises FileFormatError naming the file and line number."""
    with pytest.raises(FileFormatError, match=message):
        parse_file(text, "svc")


@given(st.lists(st.tuples(st.ip_addresses().map(str), st.integers(1, 65535),
                          st.sampled_from([1.0, 0.5, 2.0, 10.0])),
                unique_by=lambda t: (t[0], t[1]), max_size=20),
       st.booleans())
def test_rendered_file_parses_back(rows: list[tuple[str, int, float]], colon: bool) -> None:
    """Any set of addresses written one per line, in either syntax, parses back to itself."""
    addrs = {Address(h, p, w) for h, p, w in rows}
    lines = [f"{a} {a.weight}" if colon else f"{a.host} {a.port} {a.weight}" for a in addrs]
    assert parse_file("\n".join(lines)) == frozenset(addrs)


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "a\0b"])
def test_bad_service_names(name: str) -> None:
    """Names that are not plain file names in the directory are refused."""
    with pytest.raises(ValueError, match="bad service name"):
        check_service_name(name)


# -- the re-read rule -------------------------------------------------------------------

S1 = Stamp(1, 10, 14, 1_000, 1_000)
S2 = Stamp(1, 10, 14, 2_000, 2_000)
SEC = 1_000_000_000


def test_tracker_reads_first_then_only_on_change() -> None:
    """The first poll reads; an unchanged stamp is not read again; a new stamp is."""
    t = FileTracker("/d/web")
    assert t.needs_read(S1)
    assert t.read(S1, b"10.0.0.1 80\n", now_ns=S1.mtime_ns + 5 * SEC) == \
        Update("bound", frozenset({Address("10.0.0.1", 80)}))
    assert not t.needs_read(S1)
    assert t.needs_read(S2)
    assert t.needs_read(None)


def test_tracker_rereads_a_racy_file() -> None:
    """A file read within racy_ns of its mtime is read again on the next poll, once."""
    t = FileTracker("/d/web", racy_ns=2 * SEC)
    t.read(S1, b"", now_ns=S1.mtime_ns + SEC)
    assert t.needs_read(S1)
    t.read(S1, b"", now_ns=S1.mtime_ns + 3 * SEC)
    assert not t.needs_read(S1)


def test_tracker_missing_and_failures() -> None:
    """Missing is neg once; a repeated stat failure is no news; bad bytes fail with why."""
    t = FileTracker("/d/web")
    assert t.needs_read(None) and t.missing() == Update("neg")
    assert not t.needs_read(None)
    assert t.stat_failed("Permission denied") == Update("fail", error="/d/web: Permission denied")
    assert t.stat_failed("Permission denied") is None
    assert t.needs_read(None)
    assert t.read(S1, b"\xff", now_ns=0).error == "/d/web: not UTF-8 at byte 0"
    assert t.read(S1, b"#" * (MAX_BYTES + 1), now_ns=0).error.endswith("bytes")
    assert t.read(S1, b"x\n", now_ns=0).error.startswith("/d/web:1: ")
    assert t.read_failed(S2, "Is a directory") == Update("fail", error="/d/web: Is a directory")
    assert not t.needs_read(S2)


# -- a real directory -------------------------------------------------------------------

def is_bound(*addrs: str) -> Callable[[AddrState], bool]:
    want = bound([Address(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in addrs])
    return lambda s: s == want


def namer(ctx: NamerContext, root: Path, **options: Any) -> FilesNamer:
    return FilesNamer.from_options({"root_dir": str(root), "poll_interval": 0.02, **options},
                                   ctx)


def test_file_create_modify_delete(tmp_path: Path) -> None:
    """Absent -> neg; created -> bound; rewritten in place (same size) -> new set; removed
    -> neg."""
    async def scenario(ctx: NamerContext, reports: Reports) -> None:
        n = namer(ctx, tmp_path)
        watch = n.watch(("web",))
        await wait_state(watch, lambda s: s == NEG)
        (tmp_path / "web").write_text("127.0.0.1 8080\n")
        await wait_state(watch, is_bound("127.0.0.1:8080"))
        (tmp_path / "web").write_text("127.0.0.1 8081\n")
        await wait_state(watch, is_bound("127.0.0.1:8081"))
        (tmp_path / "web").unlink()
        await wait_state(watch, lambda s: s == NEG)
        n.close()
    reports = run(scenario)
    assert reports and all(r[:3] == ("io.l5d.fs", ("web",), True) for r in reports)


def test_garbage_keeps_last_good_set_stale(tmp_path: Path) -> None:
    """An unparsable rewrite keeps the last good set (stale, error names the line) and is
    reported; fixing the file clears it."""
    async def scenario(ctx: NamerContext, reports: Reports) -> None:
        (tmp_path / "web").write_text("127.0.0.1 8080\n127.0.0.2 8080\n")
        n = namer(ctx, tmp_path)
        watch = n.watch(("web",))
        await wait_state(watch, is_bound("127.0.0.1:8080", "127.0.0.2:8080"))
        (tmp_path / "web").write_text("127.0.0.1 8080\nthis is pure garbage\n")
        state = await wait_state(watch, lambda s: s.stale)
        assert state.kind == "bound" and len(state.addrs) == 2
        assert state.error == f"{tmp_path / 'web'}:2: expected \"host port [weight]\", " \
                              "got 4 fields"
        assert reports[-1] == ("io.l5d.fs", ("web",), False, state.error)
        (tmp_path / "web").write_text("127.0.0.3 9090 # fixed\n")
        await wait_state(watch, is_bound("127.0.0.3:9090"))
        assert reports[-1] == ("io.l5d.fs", ("web",), True, "")
        n.close()
    run(scenario)


def test_atomic_replace_and_shared_watch(tmp_path: Path) -> None:
    """A rename over the file (new inode) is seen; two watches of a name share one source,
    and a file that is garbage from the start is failed, not bound."""
    async def scenario(ctx: NamerContext, reports: Reports) -> None:
        (tmp_path / "api").write_text("127.0.0.1:1\n")
        (tmp_path / "bad").write_text("nonsense\n")
        n = namer(ctx, tmp_path)
        watch = n.watch(("api",))
        assert n.watch(("api",)) is watch
        await wait_state(watch, is_bound("127.0.0.1:1"))
        (tmp_path / "api.tmp").write_text("127.0.0.1:2\n")
        os.replace(tmp_path / "api.tmp", tmp_path / "api")
        await wait_state(watch, is_bound("127.0.0.1:2"))
        bad = await wait_state(n.watch(("bad",)), lambda s: s.kind != "pending")
        assert bad.kind == "failed" and bad.error.endswith(":1: expected \"host port\" or "
                                                           "\"host:port\", got 'nonsense'")
        n.close()
    run(scenario)


def test_directory_removed_is_a_failure_not_neg(tmp_path: Path) -> None:
    """Losing the whole directory keeps the last good set (stale); it coming back without
    the file is neg."""
    root = tmp_path / "disco"
    root.mkdir()
    (root / "web").write_text("127.0.0.1 80\n")

    async def scenario(ctx: NamerContext, reports: Reports) -> None:
        n = namer(ctx, root)
        watch = n.watch(("web",))
        await wait_state(watch, is_bound("127.0.0.1:80"))
        (root / "web").unlink()
        root.rmdir()
        state = await wait_state(watch, lambda s: s.stale)
        assert state.error.endswith(f"directory {root} is missing")
        root.mkdir()
        await wait_state(watch, lambda s: s == NEG)
        n.close()
    run(scenario)


def test_bad_names_are_neg_without_a_source(tmp_path: Path) -> None:
    """A name that could escape the directory is neg at once and starts nothing."""
    spawned: list[Any] = []
    ctx = NamerContext(spawn=spawned.append)
    n = namer(ctx, tmp_path)
    for name in [("..",), (".secret",), ("a", "b")]:
        assert n.watch(name).state.kind == "neg"
    assert spawned == []


@pytest.mark.parametrize(("options", "message"), [
    ({}, "root_dir: give exactly one of root_dir or rootDir"),
    ({"root_dir": "/", "rootDir": "/"}, "root_dir: give exactly one"),
    ({"rootDir": "/nonexistent/dir"}, "rootDir: '/nonexistent/dir' is not a directory"),
    ({"root_dir": 5}, "root_dir: expected a directory path"),
    ({"root_dir": "/", "poll_interval": 0}, "poll_interval: bad value 0"),
    ({"root_dir": "/", "poll_interval": "soon"}, "poll_interval: bad value 'soon'"),
    ({"root_dir": "/", "watch": True}, "watch: unknown option"),
])
def test_from_options_names_the_option(options: dict[str, Any], message: str) -> None:
    """Each bad option is refused with its name first."""
    with pytest.raises(ValueError, match=message):
        FilesNamer.from_options(options, NamerContext(spawn=lambda coro: None))


def test_linkerd_spelling_and_defaults(tmp_path: Path) -> None:
    """rootDir is accepted as linkerd spells it; the poll interval defaults to 1 s."""
    n = FilesNamer.from_options({"rootDir": str(tmp_path)}, NamerContext(spawn=lambda c: None))
    assert (n.root_dir, n.poll_interval, n.kind, n.segments) == (str(tmp_path), 1.0,
                                                                 "io.l5d.fs", 1)
