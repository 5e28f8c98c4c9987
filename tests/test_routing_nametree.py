"""Name trees: parsing with Finagle's precedence, showing, and evaluation-preserving simplify."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.routing.nametree import (
    Alt,
    Bound,
    Empty,
    Fail,
    Leaf,
    NameTree,
    Neg,
    Union,
    Weighted,
    map_tree,
    parse_tree,
    show_tree,
    show_weight,
    simplify,
)
from appliance.routing.path import RoutingSyntaxError


def L(text: str) -> Leaf[tuple[str, ...]]:
    return Leaf(tuple(text.strip("/").split("/")) if text != "/" else ())


def W(weight: float, tree: NameTree[Any]) -> Weighted[Any]:
    return Weighted(weight, tree)


a, b, c = L("/a"), L("/b"), L("/c")


@pytest.mark.parametrize(("text", "tree"), [
    ("/a", a),
    ("/", L("/")),
    ("~", Neg), ("!", Fail), ("$", Empty),
    ("/a | /b", Alt((a, b))),
    ("/a | /b | /c", Alt((a, b, c))),
    ("/a & /b", Union((W(1, a), W(1, b)))),
    ("/a & /b | /c", Alt((Union((W(1, a), W(1, b))), c))),
    ("/a | /b & /c", Alt((a, Union((W(1, b), W(1, c)))))),
    ("(/a | /b) & /c", Union((W(1, Alt((a, b))), W(1, c)))),
    ("0.9 * /a & 0.1 * /b", Union((W(0.9, a), W(0.1, b)))),
    ("0.9*/a&0.1*/b", Union((W(0.9, a), W(0.1, b)))),
    (".5 * /a & 2 * /b", Union((W(0.5, a), W(2.0, b)))),
    ("3. * /a & /b", Union((W(3.0, a), W(1, b)))),
    ("0.5 * /a", a),
    ("((/a))", a),
    ("/a | ~ | ! | $", Alt((a, Neg, Fail, Empty))),
    ("2 * (/a | /b) & /c", Union((W(2, Alt((a, b))), W(1, c)))),
    ("  /a   |\n  /b  # trailing comment", Alt((a, b))),
])
def test_parse_tree_table(text: str, tree: NameTree[Any]) -> None:
    """Each text parses to the expected tree; '&' binds tighter than '|'."""
    assert parse_tree(text) == tree


@pytest.mark.parametrize(("text", "position", "message"), [
    ("", 1, "unexpected end of input"),
    ("/a |", 5, "unexpected end of input"),
    ("/a & ", 6, "unexpected end of input"),
    ("0.5 /a", 5, "unexpected '/'"),
    ("1.2.3 * /a", 4, "unexpected '.'"),
    (". * /a", 1, "a weight needs digits"),
    ("(/a", 4, "unexpected end of input"),
    ("/a)", 3, "unexpected ')'"),
    ("/a /b", 4, "unexpected '/'"),
    ("?", 1, "unexpected '?'"),
    ("/a | 0.5 * ", 12, "unexpected end of input"),
    ("9" * 400 + " * /a", 1, "weight " + "9" * 20 + "... is too large"),
    ("(" * 40 + "/a" + ")" * 40, 33, "parentheses nest deeper than 32"),
])
def test_parse_tree_errors_name_the_position(text: str, position: int, message: str) -> None:
    """A bad tree raises RoutingSyntaxError at the right 1-based position."""
    with pytest.raises(RoutingSyntaxError) as info:
        parse_tree(text)
    assert (info.value.position, info.value.message) == (position, message)


@pytest.mark.parametrize(("tree", "text"), [
    (a, "/a"),
    (Alt((a, b)), "/a | /b"),
    (Union((W(1, a), W(1, b))), "/a & /b"),
    (Union((W(0.9, a), W(0.1, b))), "0.9*/a & 0.1*/b"),
    (Alt((Union((W(1, a), W(1, b))), c)), "/a & /b | /c"),
    (Union((W(1, Alt((a, b))), W(1, c))), "(/a | /b) & /c"),
    (Alt((Alt((a, b)), c)), "(/a | /b) | /c"),
    (Union((W(1, Union((W(1, a), W(1, b)))), W(1, c))), "(/a & /b) & /c"),
    (Alt((a,)), "/a"),
    (Union((W(0.3, a),)), "/a"),
    (Alt((Neg, Fail, Empty)), "~ | ! | $"),
    (Leaf(Bound(("#", "fs", "web"), ("x",))), "/#/fs/web/x"),
])
def test_show_tree_table(tree: NameTree[Any], text: str) -> None:
    """show_tree writes the minimal parentheses and omits the default weight."""
    assert show_tree(tree) == text


@pytest.mark.parametrize(("weight", "text"), [
    (1.0, "1"), (0.1, "0.1"), (0.9, "0.9"), (100.0, "100"), (1e-05, "0.00001"),
    (1e22, "10000000000000000000000"), (0.0, "0"), (-0.0, "0"), (2.5, "2.5"),
])
def test_show_weight_never_uses_an_exponent(weight: float, text: str) -> None:
    """Weights are shown positionally, in the shortest form that reads back exactly."""
    assert show_weight(weight) == text


segments = st.text(alphabet="abcxyz#$.:-", min_size=1, max_size=3)
leaves = st.one_of(
    st.lists(segments, max_size=3).map(lambda s: Leaf(tuple(s))),
    st.sampled_from([Neg, Fail, Empty]),
)
weights = st.one_of(
    st.just(1.0),
    st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False),
)


def _extend(children: st.SearchStrategy[NameTree[Any]]) -> st.SearchStrategy[NameTree[Any]]:
    return st.one_of(
        st.lists(children, min_size=2, max_size=3).map(lambda ts: Alt(tuple(ts))),
        st.lists(st.builds(Weighted, weights, children), min_size=2, max_size=3)
        .map(lambda ws: Union(tuple(ws))),
    )


trees = st.recursive(leaves, _extend, max_leaves=12)


@given(trees)
def test_show_then_parse_is_identity(tree: NameTree[Any]) -> None:
    """Every tree with 2+ branches per node survives show_tree then parse_tree."""
    assert parse_tree(show_tree(tree)) == tree


NEG_R, FAIL_R = "neg", "fail"


def evaluate(tree: NameTree[Any]) -> Any:
    """Finagle's NameTree.eval: a set of leaves, or neg, or fail (weights ignored)."""
    if isinstance(tree, Leaf):
        return frozenset([tree.value])
    if tree is Empty:
        return frozenset()
    if tree is Neg:
        return NEG_R
    if tree is Fail:
        return FAIL_R
    if isinstance(tree, Alt):
        for t in tree.trees:
            got = evaluate(t)
            if got == FAIL_R:
                return FAIL_R
            if got != NEG_R:
                return got
        return NEG_R
    assert isinstance(tree, Union)
    sets = [s for s in (evaluate(w.tree) for w in tree.weighted) if s not in (NEG_R, FAIL_R)]
    return frozenset().union(*sets) if sets else NEG_R


@given(trees)
def test_simplify_preserves_evaluation(tree: NameTree[Any]) -> None:
    """simplify(t) evaluates exactly like t."""
    assert evaluate(simplify(tree)) == evaluate(tree)


@given(trees)
def test_simplify_is_a_fixpoint(tree: NameTree[Any]) -> None:
    """Simplifying twice changes nothing more."""
    once = simplify(tree)
    assert simplify(once) == once


@pytest.mark.parametrize(("tree", "simple"), [
    (Alt((a,)), a),
    (Alt((Neg, a)), a),
    (Alt((Neg, Neg)), Neg),
    (Alt((a, Fail, b)), Alt((a, Fail))),
    (Alt((Fail, a)), Fail),
    (Alt((Empty, a)), Alt((Empty, a))),
    (Union((W(0.2, a),)), a),
    (Union((W(1, Neg), W(1, Fail), W(2, a))), a),
    (Union((W(1, Neg), W(1, Fail))), Neg),
    (Union((W(1, Empty), W(2, a))), Union((W(1, Empty), W(2, a)))),
    (Alt((Union((W(1, Neg), W(1, Neg))), b)), b),
])
def test_simplify_table(tree: NameTree[Any], simple: NameTree[Any]) -> None:
    """Finagle's rules: Neg goes, Alt ends at Fail, Union drops Neg and Fail."""
    assert simplify(tree) == simple


@pytest.mark.parametrize("build", [
    lambda: Alt(()),
    lambda: Union(()),
    lambda: Weighted(-1.0, a),
    lambda: Weighted(float("nan"), a),
    lambda: Weighted(float("inf"), a),
    lambda: Weighted(True, a),
    lambda: Bound(("a", "")),
])
def test_constructors_reject_nonsense(build: Any) -> None:
    """Empty Alt/Union, bad weights and bad bound ids are clear ValueErrors."""
    with pytest.raises((ValueError, TypeError)):
        build()


def test_nesting_up_to_the_limit_parses() -> None:
    """32 levels of parentheses are fine; the limit only stops hostile input."""
    assert parse_tree("(" * 32 + "/a" + ")" * 32) == a
    deep = "/a"
    for _ in range(31):
        deep = f"/b | ({deep} & /c)"
    assert parse_tree(show_tree(parse_tree(deep))) == parse_tree(deep)


def test_map_tree_changes_only_leaves() -> None:
    """map_tree applies the function to leaves and keeps structure, weights and constants."""
    tree = parse_tree("0.5 * /a & /b | ~")
    mapped = map_tree(tree, lambda p: p + ("x",))
    assert mapped == parse_tree("0.5 * /a/x & /b/x | ~")


def test_constants_are_singletons_with_readable_reprs() -> None:
    """Neg, Fail and Empty are identities that print as their names."""
    import copy
    import pickle

    assert [repr(x) for x in (Neg, Fail, Empty)] == ["Neg", "Fail", "Empty"]
    assert copy.deepcopy(Fail) is Fail
    assert pickle.loads(pickle.dumps(Alt((Neg, a)))) == Alt((Neg, a))
