"""Dtabs: parsing, showing, and Finagle's lookup (later dentries first, earlier as fallback)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.routing.dtab import ANY, Dentry, Dtab, parse_dentry, parse_dtab, show_prefix
from appliance.routing.nametree import Alt, Fail, Leaf, Neg, Union, Weighted, parse_tree
from appliance.routing.path import RoutingSyntaxError


def P(text: str) -> tuple[str, ...]:
    return tuple(s for s in text.split("/") if s)


def D(text: str) -> Dentry:
    return parse_dentry(text)


@pytest.mark.parametrize(("text", "dentries"), [
    ("", ()),
    ("   \n ", ()),
    ("# only a comment\n", ()),
    ("/svc => /#/io.l5d.fs", (Dentry(P("/svc"), Leaf(P("/#/io.l5d.fs"))),)),
    ("/svc=>/#/io.l5d.fs;", (Dentry(P("/svc"), Leaf(P("/#/io.l5d.fs"))),)),
    ("/svc => /a ; /svc/web => 0.9 * /b & 0.1 * /c ;",
     (Dentry(P("/svc"), Leaf(P("/a"))),
      Dentry(P("/svc/web"), Union((Weighted(0.9, Leaf(P("/b"))),
                                   Weighted(0.1, Leaf(P("/c")))))))),
    ("/svc/*/web => /x", (Dentry(("svc", ANY, "web"), Leaf(P("/x"))),)),
    ("/* => !", (Dentry((ANY,), Fail),)),
    ("/ => ~", (Dentry((), Neg),)),
    ("/a => /b;\n# the fallback\n/a => /c;  # override\n",
     (Dentry(P("/a"), Leaf(P("/b"))), Dentry(P("/a"), Leaf(P("/c"))))),
    ("/\\x2a => /x", (Dentry(("*",), Leaf(P("/x"))),)),
])
def test_parse_dtab_table(text: str, dentries: tuple[Dentry, ...]) -> None:
    """Whitespace, newlines, comments and a trailing ';' are tolerated; '*' is a wildcard."""
    assert parse_dtab(text) == Dtab(dentries)


@pytest.mark.parametrize(("text", "position", "message"), [
    ("/a => /b;;", 10, "unexpected ';'"),
    (";", 1, "unexpected ';'"),
    ("/a = /b", 5, "unexpected ' '"),
    ("/a /b", 4, "unexpected '/'"),
    ("/a =>", 6, "unexpected end of input"),
    ("/a => /b /c => /d", 10, "unexpected '/'"),
    ("/a => /b\n/c => /d", 10, "unexpected '/'"),
    ("/a* => /b", 3, "unexpected '*'"),
    ("svc => /b", 1, "unexpected 's'"),
    ("/svc => /a&b", 12, "unexpected 'b'"),
])
def test_parse_dtab_errors_name_the_position(text: str, position: int, message: str) -> None:
    """A bad dtab raises RoutingSyntaxError pointing at the offending character."""
    with pytest.raises(RoutingSyntaxError) as info:
        parse_dtab(text)
    assert (info.value.position, info.value.message) == (position, message)


def test_show_is_finagle_compact_and_pretty_is_for_people() -> None:
    """show() is the l5d-dtab header form; pretty() puts one spaced dentry on each line."""
    dtab = parse_dtab("/svc => /#/io.l5d.fs ; /svc/*/web => 0.9 * /a & 0.1 * /b | /c")
    assert dtab.show() == "/svc=>/#/io.l5d.fs;/svc/*/web=>0.9*/a & 0.1*/b | /c"
    assert str(dtab) == dtab.show()
    assert dtab.pretty() == "/svc => /#/io.l5d.fs;\n/svc/*/web => 0.9*/a & 0.1*/b | /c;\n"
    assert parse_dtab(dtab.pretty()) == dtab


segments = st.text(alphabet="abc#$.", min_size=1, max_size=3)
prefixes = st.lists(st.one_of(segments, st.just(ANY)), max_size=3).map(tuple)
leaf_paths = st.lists(segments, max_size=3).map(lambda s: Leaf(tuple(s)))
dst_trees = st.recursive(
    st.one_of(leaf_paths, st.sampled_from([Neg, Fail])),
    lambda kids: st.one_of(
        st.lists(kids, min_size=2, max_size=3).map(lambda ts: Alt(tuple(ts))),
        st.lists(st.builds(Weighted, st.sampled_from([1.0, 0.5, 0.25]), kids),
                 min_size=2, max_size=3).map(lambda ws: Union(tuple(ws)))),
    max_leaves=5)
dtabs = st.lists(st.builds(Dentry, prefixes, dst_trees), max_size=4).map(
    lambda ds: Dtab(tuple(ds)))


@given(dtabs)
def test_show_then_parse_is_identity(dtab: Dtab) -> None:
    """Any dtab survives show() then parse_dtab(), and pretty() too."""
    assert parse_dtab(dtab.show()) == dtab
    assert parse_dtab(dtab.pretty()) == dtab


@pytest.mark.parametrize(("dtab", "path", "tree"), [
    ("", "/a", "~"),
    ("/a => /b", "/a", "/b"),
    ("/a => /b", "/a/x/y", "/b/x/y"),
    ("/a => /b", "/ab", "~"),
    ("/a/b => /c", "/a", "~"),
    ("/a => /b | /c", "/a/x", "/b/x | /c/x"),
    ("/a => 0.9 * /b & 0.1 * /c", "/a/x", "0.9 * /b/x & 0.1 * /c/x"),
    ("/a => /b; /a => /c", "/a/x", "/c/x | /b/x"),
    ("/a => /b; /a/x => /c", "/a/x/y", "/c/y | /b/x/y"),
    ("/a/x => /c; /a => /b", "/a/x/y", "/b/x/y | /c/y"),
    ("/a => /b; /c => /d; /a => /e", "/a", "/e | /b"),
    ("/svc/* => /x", "/svc/web/1", "/x/1"),
    ("/svc/*/web => /x", "/svc/prod/web/1", "/x/1"),
    ("/svc/*/web => /x", "/svc/prod/api", "~"),
    ("/ => /root", "/anything/at/all", "/root/anything/at/all"),
    ("/a => ~", "/a/x", "~"),
    ("/a => !; /a => /b", "/a", "/b | !"),
])
def test_lookup_table(dtab: str, path: str, tree: str) -> None:
    """One rewriting step: matching dentries, last first, residual appended, else Neg."""
    assert parse_dtab(dtab).lookup(P(path)) == parse_tree(tree)


def test_icecream_store_dentries_and_ordering() -> None:
    """linkerd's example: the bottom dentry is tried first, the top one is the fallback."""
    dtab = parse_dtab("""
        /smitten       => /USA/CA/SF/Octavia/432;
        /iceCreamStore => /smitten;
        /iceCreamStore => /humphrys;
    """)
    assert dtab.lookup(P("/iceCreamStore/try/allFlavors")) == parse_tree(
        "/humphrys/try/allFlavors | /smitten/try/allFlavors")


def test_add_concatenates_and_later_entries_take_precedence() -> None:
    """base + override: the override's dentries are consulted first."""
    base = parse_dtab("/svc => /#/fs")
    override = parse_dtab("/svc/web => /#/fs/web-v2")
    combined = base + override
    assert combined.dentries == base.dentries + override.dentries
    assert combined.lookup(P("/svc/web")) == parse_tree("/#/fs/web-v2 | /#/fs/web")
    assert base + Dtab() is base and Dtab() + override is override
    assert len(combined) == 2 and list(combined) == list(combined.dentries)


def test_matches_reports_which_dentry_rewrote_what() -> None:
    """matches() pairs each matching dentry (last first) with its rewrite of the path."""
    dtab = parse_dtab("/a => /b; /c => /d; /a/x => /e")
    found = dtab.matches(P("/a/x/y"))
    assert [(d.show(), tree) for d, tree in found] == [
        ("/a/x=>/e", Leaf(P("/e/y"))), ("/a=>/b", Leaf(P("/b/x/y")))]


@pytest.mark.parametrize(("build", "error"), [
    (lambda: Dentry(("a", ""), Neg), ValueError),
    (lambda: Dentry(("a", 1), Neg), ValueError),  # type: ignore[arg-type]
    (lambda: Dentry(["a"], Neg), TypeError),  # type: ignore[arg-type]
    (lambda: Dtab([D("/a=>/b")]), TypeError),  # type: ignore[arg-type]
    (lambda: Dtab(("/a=>/b",)), TypeError),  # type: ignore[arg-type]
    (lambda: parse_dtab(None), TypeError),  # type: ignore[arg-type]
])
def test_constructors_reject_nonsense(build: Any, error: type[Exception]) -> None:
    """Bad prefixes and non-Dentry contents fail at construction with a clear error."""
    with pytest.raises(error):
        build()


def test_lookup_rejects_a_bad_path() -> None:
    """lookup() checks its path argument instead of failing obscurely."""
    with pytest.raises(ValueError, match="segment 0"):
        parse_dtab("/a => /b").lookup(("",))


def test_prefix_shows_wildcards_and_escapes_a_literal_star() -> None:
    """ANY shows as '*'; a literal '*' segment is escaped so it reads back as a literal."""
    assert show_prefix(("svc", ANY, "*")) == "/svc/*/\\x2a"
    assert repr(ANY) == "ANY"
