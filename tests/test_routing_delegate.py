"""Delegation: bind to bound names, the admin trace, loops and limits, and per-request choice."""

from __future__ import annotations

import inspect
import json
import random
import sys
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.routing.delegate import (
    MAX_TREE_DEPTH,
    DelegateTree,
    DelegationError,
    FailedName,
    bind,
    choose,
    delegate,
)
from appliance.routing.dtab import Dentry, Dtab, parse_dtab
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
)

NAMERS = {("#", "io.l5d.fs"): 1, ("#", "k8s"): 3, ("#", "k8s", "special"): 1,
          ("#", "static"): 0}


def P(text: str) -> tuple[str, ...]:
    return tuple(s for s in text.split("/") if s)


def B(id_: str, residual: str = "/") -> Leaf[Bound]:
    return Leaf(Bound(P(id_), P(residual)))


def bind_text(dtab: str, path: str, **kw: Any) -> NameTree[Bound]:
    return bind(parse_dtab(dtab), P(path), NAMERS, **kw)


@pytest.mark.parametrize(("dtab", "path", "tree"), [
    ("/svc => /#/io.l5d.fs", "/svc/web", B("/#/io.l5d.fs/web")),
    ("/svc => /#/io.l5d.fs", "/svc/web/extra/more", B("/#/io.l5d.fs/web", "/extra/more")),
    ("/svc => /#/io.l5d.fs", "/svc", Neg),
    ("/svc => /#/k8s", "/svc/prod/http/web/x", B("/#/k8s/prod/http/web", "/x")),
    ("/svc => /#/k8s", "/svc/prod/http", Neg),
    ("/svc => /#/k8s", "/svc/special/web/x", B("/#/k8s/special/web", "/x")),
    ("/svc => /#/static", "/svc/web", B("/#/static", "/web")),
    ("/svc => /#/nothere", "/svc/web", Neg),
    ("/svc => /$/inet/127.0.0.1/8080", "/svc/web", B("/$/inet/127.0.0.1/8080", "/web")),
    ("/svc => /$/inet/127.0.0.1/080", "/svc", B("/$/inet/127.0.0.1/80")),
    ("/svc => /$/inet/127.0.0.1/http", "/svc", Neg),
    ("/svc => /$/inet/127.0.0.1/70000", "/svc", Neg),
    ("/svc => /$/inet/127.0.0.1", "/svc", Neg),
    ("/svc => /$/nil", "/svc/web", Neg),
    ("/svc => /$/fail", "/svc/web", Fail),
    ("/svc => !", "/svc/web", Fail),
    ("/svc => $", "/svc/web", Empty),
    ("/svc => /$/io.buoyant.hostportPfx/inet; /inet => /$/inet",
     "/svc/10.1.2.3:80/x", B("/$/inet/10.1.2.3/80", "/x")),
    ("/svc => /$/io.buoyant.hostportPfx/inet; /inet => /$/inet",
     "/svc/[::1]:80", B("/$/inet/::1/80")),
    ("/svc => /$/io.buoyant.hostportPfx/inet; /inet => /$/inet",
     "/svc/::1:80", B("/$/inet/::1/80")),
    ("/svc => /$/io.buoyant.hostportPfx/inet; /inet => /$/inet", "/svc/web", Neg),
    ("/svc => /$/io.buoyant.porthostPfx/p; /p/* => /#/io.l5d.fs",
     "/svc/web:8080", B("/#/io.l5d.fs/web")),
    ("/a => /b", "/c", Neg),
    ("/svc => /#/io.l5d.fs; /svc/web => /#/io.l5d.fs/web-v2", "/svc/web",
     Alt((B("/#/io.l5d.fs/web-v2"), B("/#/io.l5d.fs/web")))),
    ("/svc => /#/io.l5d.fs; /svc/web => ~", "/svc/web", B("/#/io.l5d.fs/web")),
    ("/svc => /#/io.l5d.fs; /svc/web => !", "/svc/web", Fail),
    ("/svc => /#/io.l5d.fs; /svc/web => 0.9 * /#/io.l5d.fs/v1 & 0.1 * /#/io.l5d.fs/v2",
     "/svc/web", Alt((Union((Weighted(0.9, B("/#/io.l5d.fs/v1")),
                             Weighted(0.1, B("/#/io.l5d.fs/v2")))),
                      B("/#/io.l5d.fs/web")))),
    ("/svc => /env/prod; /env => /#/io.l5d.fs", "/svc/users", B("/#/io.l5d.fs/prod", "/users")),
])
def test_bind_table(dtab: str, path: str, tree: NameTree[Bound]) -> None:
    """Namers, system names, rewrites and dtab fallbacks bind to the expected tree."""
    assert bind_text(dtab, path) == tree


def test_icecream_store_step_by_step() -> None:
    """linkerd's step-by-step dtab example ends at the address it documents."""
    dtab = """
        /iceCreamStore    => /smitten;
        /smitten/try      => /smittenLocation/waitInLine/thenTry;
        /smittenLocation  => /sanfrancisco/octavia/432;
        /california       => /USA/CA;
        /sanfrancisco     => /california/SF;
        /USA              => /#/static;
    """
    assert bind_text(dtab, "/iceCreamStore/try/allFlavors") == B(
        "/#/static", "/CA/SF/octavia/432/waitInLine/thenTry/allFlavors")


def test_unknown_system_name_is_a_clear_error() -> None:
    """A /$/ name nobody implements raises DelegationError listing the known ones."""
    with pytest.raises(DelegationError, match=r"unknown system name /\$/bogus .*known: inet"):
        bind_text("/svc => /$/bogus/x", "/svc/web")


@pytest.mark.parametrize(("dtab", "message"), [
    ("/a => /b; /b => /a", r"delegation loop: /a -> /b -> /a"),
    ("/a => /a", r"delegation loop: /a -> /a"),
    ("/a => /b; /b => /c | /a", r"delegation loop: /a -> /b -> /a"),
    ("/a => /a/x", r"more than max_depth=100 lookups"),
    ("/a => /b/x; /b => /a/y", r"more than max_depth=100 lookups"),
])
def test_loops_end_with_a_clear_error(dtab: str, message: str) -> None:
    """Cycles and ever-growing rewrites raise DelegationError, never recurse forever."""
    with pytest.raises(DelegationError, match=message):
        bind_text(dtab, "/a")
    tree = delegate(parse_dtab(dtab), P("/a"), NAMERS)
    assert "exception" in json.dumps(tree.to_dict())
    with pytest.raises(DelegationError):
        tree.to_tree()


def _chain(n: int) -> str:
    """A dtab that takes exactly n lookups from /p0 to the static namer."""
    rules = [f"/p{i} => /p{i + 1}" for i in range(n - 1)] + [f"/p{n - 1} => /#/static"]
    return ";".join(rules)


@pytest.mark.parametrize("n", [1, 5, 30])
def test_max_depth_is_the_number_of_lookups_allowed(n: int) -> None:
    """A chain of n lookups binds with max_depth=n and fails with max_depth=n-1."""
    assert bind_text(_chain(n), "/p0", max_depth=n) == B("/#/static")
    assert delegate(parse_dtab(_chain(n)), P("/p0"), NAMERS, max_depth=n).to_tree() == \
        B("/#/static")
    if n > 1:
        with pytest.raises(DelegationError, match=f"max_depth={n - 1}"):
            bind_text(_chain(n), "/p0", max_depth=n - 1)


def test_memo_still_enforces_max_depth_for_a_shared_path_reached_deeper() -> None:
    """/s is bound once via /r (3 lookups in all), then reached again via /x (4 lookups)."""
    dtab = "/r => /s | /x; /x => /s; /s => /t; /t => /#/static"
    assert bind_text(dtab, "/r", max_depth=4) == Alt((B("/#/static"), B("/#/static")))
    assert bind_text("/r => /s; /s => /t; /t => /#/static", "/r", max_depth=3) == \
        B("/#/static")
    with pytest.raises(DelegationError, match="max_depth=3"):
        bind_text(dtab, "/r", max_depth=3)
    with pytest.raises(DelegationError, match="max_depth=3"):
        delegate(parse_dtab(dtab), P("/r"), NAMERS, max_depth=3).to_tree()


def test_exponential_dtab_is_cut_by_max_steps() -> None:
    """A hostile dtab that doubles the paths at every level stops after max_steps."""
    levels = 40
    dtab = ";".join(f"/l{i} => /l{i + 1}/x & /l{i + 1}/y" for i in range(levels))
    with pytest.raises(DelegationError, match="max_steps=500"):
        bind_text(dtab, "/l0", max_steps=500)
    trace = delegate(parse_dtab(dtab), P("/l0"), NAMERS, max_steps=500)
    assert "max_steps=500" in json.dumps(trace.to_dict())


def test_bound_trees_nested_too_deep_are_rejected() -> None:
    """Each lookup nesting another Alt: more than MAX_TREE_DEPTH levels is an error."""
    def nested(levels: int) -> str:
        rules = [f"/p{i} => /#/static | /p{i + 1}" for i in range(levels)]
        return ";".join(rules + [f"/p{levels} => /#/static"])

    tree = bind_text(nested(MAX_TREE_DEPTH), "/p0")
    assert isinstance(tree, Alt)
    with pytest.raises(DelegationError, match=f"nested deeper than {MAX_TREE_DEPTH} levels"):
        bind_text(nested(MAX_TREE_DEPTH + 1), "/p0")


def test_running_out_of_stack_is_a_delegation_error() -> None:
    """With little stack left, bind raises DelegationError and delegate an exception node."""
    dtab = parse_dtab(_chain(100))
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + 80)
    try:
        with pytest.raises(DelegationError, match="nests too deeply"):
            bind(dtab, P("/p0"), NAMERS)
        trace = delegate(dtab, P("/p0"), NAMERS)
    finally:
        sys.setrecursionlimit(old)
    assert (trace.kind, trace.message) == ("exception", "delegation nests too deeply")
    assert bind(dtab, P("/p0"), NAMERS) == B("/#/static")


def test_branches_after_a_fail_are_not_bound() -> None:
    """An Alt stops at Fail, so a loop behind it is never reached."""
    dtab = "/a => ! | /loop; /loop => /loop"
    assert bind_text(dtab, "/a") == Fail
    assert delegate(parse_dtab(dtab), P("/a"), NAMERS).to_tree() == Fail


@pytest.mark.parametrize(("namers", "message"), [
    ({("io.l5d.fs",): 1}, "must look like /#/<name>"),
    ({("#",): 1}, "must look like /#/<name>"),
    ({("#", "fs"): -1}, "segment count must be an int >= 0"),
    ({("#", "fs"): True}, "segment count must be an int >= 0"),
    ({("#", ""): 1}, "segment 1 must be a non-empty string"),
])
def test_bad_namers_are_rejected(namers: dict[Any, Any], message: str) -> None:
    """Namer prefixes and segment counts are checked with messages that name them."""
    with pytest.raises(ValueError, match=message):
        bind(Dtab(), P("/a"), namers)


@pytest.mark.parametrize("kw", [{"max_depth": 0}, {"max_steps": 0}, {"max_depth": 1.5}])
def test_bad_limits_are_rejected(kw: dict[str, Any]) -> None:
    """max_depth and max_steps must be positive integers."""
    with pytest.raises(ValueError, match="must be an int >= 1"):
        bind(Dtab(), P("/a"), NAMERS, **kw)


def test_delegate_to_dict_is_linkerd_shaped() -> None:
    """The trace shows each rewrite with its dentry, down to bound leaves."""
    dtab = parse_dtab("/svc => /#/io.l5d.fs; /svc/web => 0.9 * /#/io.l5d.fs/v1 & 0.1 * ~")
    trace = delegate(dtab, P("/svc/web/x"), NAMERS)
    low = "/svc => /#/io.l5d.fs"
    high = "/svc/web => 0.9*/#/io.l5d.fs/v1 & 0.1*~"
    assert trace.to_dict(describe=lambda b: {"kind": "bound"}) == {
        "type": "delegate", "path": "/svc/web/x", "dentry": None,
        "delegate": {
            "type": "alt", "path": "/svc/web/x", "dentry": None,
            "alt": [
                {"type": "union", "path": "/svc/web/x", "dentry": high, "union": [
                    {"weight": 0.9, "tree": {
                        "type": "leaf", "path": "/#/io.l5d.fs/v1/x", "dentry": high,
                        "bound": {"id": "/#/io.l5d.fs/v1", "residual": "/x",
                                  "addr": {"kind": "bound"}}}},
                    {"weight": 0.1, "tree": {
                        "type": "neg", "path": "/svc/web/x", "dentry": high}}]},
                {"type": "leaf", "path": "/#/io.l5d.fs/web/x", "dentry": low,
                 "bound": {"id": "/#/io.l5d.fs/web", "residual": "/x",
                           "addr": {"kind": "bound"}}},
            ]}}
    assert trace.to_tree() == bind(dtab, P("/svc/web/x"), NAMERS)


def test_delegate_explains_negative_answers() -> None:
    """Neg leaves say why: no dentry, no namer, too few segments."""
    def message(dtab: str, path: str) -> str:
        tree = delegate(parse_dtab(dtab), P(path), NAMERS)
        while tree.kind == "delegate":
            tree = tree.children[0]
        assert tree.kind == "neg"
        return tree.message

    assert message("", "/svc/web") == "no dentry matches"
    assert message("/svc => /#/nope", "/svc/web") == "no namer is registered for /#/nope"
    assert message("/svc => /#/k8s", "/svc/a") == "/#/k8s needs 3 segment(s) after it"


def test_delegate_records_system_rewrites() -> None:
    """A /$/io.buoyant.hostportPfx step appears as a delegate node with a note."""
    dtab = parse_dtab("/svc => /$/io.buoyant.hostportPfx/inet; /inet => /$/inet")
    trace = delegate(dtab, P("/svc/10.0.0.1:80"), NAMERS).to_dict()
    step = trace["delegate"]
    assert step["path"] == "/$/io.buoyant.hostportPfx/inet/10.0.0.1:80"
    assert step["message"] == "rewritten by /$/io.buoyant.hostportPfx"
    assert step["delegate"]["path"] == "/inet/10.0.0.1/80"


# ---------------------------------------------------------------------------- bind == trace

small = st.sampled_from(["a", "b", "c"])
targets = st.one_of(
    st.lists(small, min_size=0, max_size=3).map(tuple),
    st.sampled_from([P("/#/io.l5d.fs/x"), P("/#/io.l5d.fs"), P("/$/inet/h/80"), P("/$/nil"),
                     P("/$/fail"), P("/$/bogus")]),
)
dsts = st.recursive(
    st.one_of(targets.map(Leaf), st.sampled_from([Neg, Fail, Empty])),
    lambda kids: st.one_of(
        st.lists(kids, min_size=2, max_size=2).map(lambda ts: Alt(tuple(ts))),
        st.lists(st.builds(Weighted, st.sampled_from([1.0, 0.5]), kids),
                 min_size=2, max_size=2).map(lambda ws: Union(tuple(ws)))),
    max_leaves=3)
random_dtabs = st.lists(
    st.builds(Dentry, st.lists(small, min_size=0, max_size=2).map(tuple), dsts),
    max_size=4).map(lambda ds: Dtab(tuple(ds)))


@settings(max_examples=300, deadline=None)
@given(random_dtabs, st.lists(small, min_size=1, max_size=3).map(tuple))
def test_bind_equals_the_trace_tree(dtab: Dtab, path: tuple[str, ...]) -> None:
    """bind() and delegate().to_tree() agree: same tree, or both raise DelegationError."""
    try:
        expected: Any = bind(dtab, path, NAMERS, max_depth=6)
    except DelegationError:
        expected = DelegationError
    trace = delegate(dtab, path, NAMERS, max_depth=6, max_steps=100_000)
    try:
        got: Any = trace.to_tree()
    except DelegationError:
        got = DelegationError
    assert got == expected
    json.dumps(trace.to_dict())


# ---------------------------------------------------------------------------- choose

v1, v2, v3 = Bound(P("/#/fs/v1")), Bound(P("/#/fs/v2")), Bound(P("/#/fs/v3"))


def always(_: Bound) -> bool:
    return True


def test_weighted_union_splits_traffic_by_weight() -> None:
    """A 0.9/0.1 canary split over 10000 seeded draws is within 2% of 9000/1000."""
    tree = Union((Weighted(0.9, Leaf(v1)), Weighted(0.1, Leaf(v2))))
    rng = random.Random(42)
    counts = Counter(choose(tree, rng, always) for _ in range(10_000))
    assert abs(counts[v1] - 9000) < 200 and abs(counts[v2] - 1000) < 200
    assert set(counts) == {v1, v2}


def test_three_way_split_with_unequal_weights() -> None:
    """Weights 1:2:7 give shares 10%, 20%, 70% within tolerance."""
    tree = Union((Weighted(1, Leaf(v1)), Weighted(2, Leaf(v2)), Weighted(7, Leaf(v3))))
    rng = random.Random(7)
    counts = Counter(choose(tree, rng, always) for _ in range(10_000))
    for bound, share in ((v1, 0.1), (v2, 0.2), (v3, 0.7)):
        assert abs(counts[bound] / 10_000 - share) < 0.02


def test_choice_is_reproducible_with_the_same_seed() -> None:
    """The same seed gives the same sequence of choices."""
    tree = Union((Weighted(1, Leaf(v1)), Weighted(1, Leaf(v2))))
    first = [choose(tree, random.Random(3), always) for _ in range(1)]
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert [choose(tree, rng_a, always) for _ in range(50)] == \
        [choose(tree, rng_b, always) for _ in range(50)]
    assert first[0] in (v1, v2)


def test_union_sends_an_unusable_branch_share_to_the_others() -> None:
    """When the canary has no addresses, every request goes to the other branch."""
    tree = Union((Weighted(0.9, Leaf(v1)), Weighted(0.1, Leaf(v2))))
    rng = random.Random(1)
    assert {choose(tree, rng, lambda b: b != v1) for _ in range(200)} == {v2}


def test_zero_weight_branches_get_no_traffic() -> None:
    """A weight-0 branch is never chosen, even when the others are unusable."""
    tree = Union((Weighted(0, Leaf(v1)), Weighted(1, Leaf(v2))))
    rng = random.Random(1)
    assert {choose(tree, rng, always) for _ in range(200)} == {v2}
    assert choose(tree, rng, lambda b: b == v1) is None


@pytest.mark.parametrize(("tree", "usable", "expected"), [
    (Leaf(v1), {v1}, v1),
    (Leaf(v1), set(), None),
    (Alt((Leaf(v1), Leaf(v2))), {v1, v2}, v1),
    (Alt((Leaf(v1), Leaf(v2))), {v2}, v2),
    (Alt((Leaf(v1), Leaf(v2))), set(), None),
    (Alt((Neg, Leaf(v2))), {v2}, v2),
    (Alt((Empty, Leaf(v2))), {v2}, None),
    (Alt((Leaf(v1), Empty, Leaf(v2))), {v2}, None),
    (Alt((Union((Weighted(1, Leaf(v1)), Weighted(1, Neg))), Leaf(v2))), {v2}, v2),
    (Alt((Union((Weighted(1, Empty), Weighted(1, Empty))), Leaf(v2))), {v2}, None),
    (Union((Weighted(1, Fail), Weighted(1, Leaf(v2)))), {v2}, v2),
    (Neg, set(), None),
    (Empty, set(), None),
])
def test_choose_table(tree: NameTree[Bound], usable: set[Bound], expected: Bound | None
                      ) -> None:
    """Alt falls back past unusable names and Neg, stops at Empty; Union skips dead branches."""
    assert choose(tree, random.Random(0), lambda b: b in usable) == expected


@pytest.mark.parametrize("tree", [
    Fail,
    Alt((Fail, Leaf(v1))),
    Alt((Leaf(v1), Fail, Leaf(v2))),
])
def test_choose_raises_failed_name_on_fail(tree: NameTree[Bound]) -> None:
    """Reaching Fail (before any usable name) raises FailedName, distinct from None."""
    with pytest.raises(FailedName):
        choose(tree, random.Random(0), lambda b: b == v2)


bounds = st.sampled_from([v1, v2, v3])
bound_trees = st.recursive(
    st.one_of(bounds.map(Leaf), st.sampled_from([Neg, Fail, Empty])),
    lambda kids: st.one_of(
        st.lists(kids, min_size=2, max_size=3).map(lambda ts: Alt(tuple(ts))),
        st.lists(st.builds(Weighted, st.floats(0.01, 10), kids), min_size=2, max_size=3)
        .map(lambda ws: Union(tuple(ws)))),
    max_leaves=8)


def _evaluate(tree: NameTree[Bound], usable: set[Bound]) -> Any:
    """Finagle's eval, with unusable leaves counted as Neg."""
    if isinstance(tree, Leaf):
        return frozenset([tree.value]) if tree.value in usable else "neg"
    if tree is Empty:
        return frozenset()
    if tree is Neg or tree is Fail:
        return "neg" if tree is Neg else "fail"
    if isinstance(tree, Alt):
        for t in tree.trees:
            got = _evaluate(t, usable)
            if got != "neg":
                return got
        return "neg"
    assert isinstance(tree, Union)
    sets = [s for s in (_evaluate(w.tree, usable) for w in tree.weighted)
            if s not in ("neg", "fail")]
    return frozenset().union(*sets) if sets else "neg"


@given(bound_trees, st.sets(bounds), st.integers(0, 2**32))
def test_choose_agrees_with_finagle_evaluation(tree: NameTree[Bound], usable: set[Bound],
                                               seed: int) -> None:
    """choose() picks a member of what the tree evaluates to; Fail raises; nothing is None."""
    expected = _evaluate(tree, usable)
    if expected == "fail":
        with pytest.raises(FailedName):
            choose(tree, random.Random(seed), usable.__contains__)
        return
    got = choose(tree, random.Random(seed), usable.__contains__)
    if expected == "neg" or not expected:
        assert got is None
    else:
        assert got in expected


def test_delegate_tree_kinds_are_exhaustive_in_to_tree() -> None:
    """Every constant kind maps back to its name-tree constant."""
    for kind, const in (("neg", Neg), ("fail", Fail), ("empty", Empty)):
        assert DelegateTree(kind, P("/a")).to_tree() is const
