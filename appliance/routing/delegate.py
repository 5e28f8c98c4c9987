"""Delegation: from a logical path, through the dtab, to names that discovery can watch.

Theory of operation. :func:`bind` rewrites a path again and again until every leaf is a
*bound* name, and returns the simplified :class:`NameTree` of :class:`Bound` names:

- ``/#/<namer...>/<service...>/<rest...>`` goes to the namer registered for the longest
  matching prefix (``namers`` maps a prefix such as ``("#", "io.l5d.fs")`` to how many
  segments name one service). The bound id is the prefix plus those segments, the residual
  is the rest. Too few segments, or no namer for the prefix, is ``Neg``.
- ``/$/inet/<host>/<port>/<rest...>`` binds to ``Bound(("$", "inet", host, port), rest)``;
  ``/$/nil/...`` is ``Neg``, ``/$/fail/...`` is ``Fail``; the rewriting names
  ``/$/io.buoyant.hostportPfx/<pfx>/<host>:<port>/<rest...>`` and
  ``/$/io.buoyant.porthostPfx/...`` become ``/<pfx>/<host>/<port>/<rest...>`` (or
  ``/<pfx>/<port>/<host>/...``) and are delegated again. Any other ``/$/`` name is an error.
- Any other path is looked up in the dtab (one *step* deeper), and each leaf of the result
  is delegated in turn. A path no dentry matches is ``Neg``.

Binding is eager: every branch of an ``Alt`` is bound (except those after a ``Fail``), since
which fallback serves a request is decided per request by :func:`choose`, from what
discovery knows at that moment. Each distinct path is expanded once (memoised), so shared
sub-trees cost nothing more; a path that reappears inside its own expansion is a loop and
raises :class:`DelegationError` at once, and so does a chain of more than ``max_depth``
lookups (for example ``/a => /a/x``, which grows without repeating) or more than
``max_steps`` expansions in all (a bound on the work a hostile ``l5d-dtab`` can cause).
The stack is bounded too: a bound tree nested deeper than :data:`MAX_TREE_DEPTH` is an
error, and so, as a last resort, is running out of Python stack while binding.

:func:`delegate` walks the same way without memo and records every step in a
:class:`DelegateTree` for the admin API; its errors become ``exception`` nodes instead of
raising. ``delegate(...).to_tree()`` equals ``bind(...)`` (or raises the same way).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from appliance.routing.dtab import Dentry, Dtab
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
    alt_of,
    union_of,
)
from appliance.routing.path import Path, RoutingError, check_path, show_path

Namers = Mapping[Path, int]

_SHOW_MAX = 200
MAX_TREE_DEPTH = 64
"""A bound tree may nest Alt and Union nodes this deep (so :func:`choose` stays shallow)."""


class DelegationError(RoutingError):
    """Delegation cannot finish: a loop, too deep, too much work, or an unknown ``/$/`` name."""


class FailedName(RoutingError):
    """:func:`choose` reached ``Fail`` (``!`` or ``/$/fail``): the dtab says fail this request."""


def _show(path: Path) -> str:
    text = show_path(path)
    return text if len(text) <= _SHOW_MAX else text[:_SHOW_MAX] + "..."


# ---------------------------------------------------------------------------- /# and /$ names


@dataclass(frozen=True, slots=True)
class _Special:
    """How a ``/#/`` or ``/$/`` path resolves: a final tree, a rewrite, or an error."""

    tree: NameTree[Bound] | None = None
    rewrite: Path | None = None
    note: str = ""
    error: str = ""


def _check_namers(namers: Namers) -> list[tuple[Path, int]]:
    """The namers, longest prefix first, after checking each entry."""
    checked = []
    for prefix, count in namers.items():
        check_path(prefix, "namer prefix")
        if len(prefix) < 2 or prefix[0] != "#":
            raise ValueError(f"namer prefix {show_path(prefix)} must look like /#/<name>")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"namer {show_path(prefix)}: segment count must be an int >= 0, "
                             f"not {count!r}")
        checked.append((prefix, count))
    checked.sort(key=lambda item: -len(item[0]))
    return checked


def _special(path: Path, namers: list[tuple[Path, int]]) -> _Special | None:
    if not path or path[0] not in ("#", "$"):
        return None
    if path[0] == "#":
        return _namer(path, namers)
    return _system(path)


def _namer(path: Path, namers: list[tuple[Path, int]]) -> _Special:
    for prefix, count in namers:
        if path[:len(prefix)] == prefix:
            rest = path[len(prefix):]
            if len(rest) < count:
                return _Special(Neg, note=f"{_show(prefix)} needs {count} segment(s) after it")
            return _Special(Leaf(Bound(prefix + rest[:count], rest[count:])))
    return _Special(Neg, note=f"no namer is registered for {_show(path[:2])}")


def _port(text: str) -> str | None:
    if text.isascii() and text.isdigit() and int(text) <= 65535:
        return str(int(text))
    return None


def _system(path: Path) -> _Special:
    kind = path[1] if len(path) > 1 else ""
    if kind == "nil":
        return _Special(Neg, note="/$/nil")
    if kind == "fail":
        return _Special(Fail, note="/$/fail")
    if kind == "inet":
        port = _port(path[3]) if len(path) >= 4 else None
        if port is None:
            return _Special(Neg, note="/$/inet needs /$/inet/<host>/<port>")
        return _Special(Leaf(Bound(("$", "inet", path[2], port), path[4:])))
    if kind in ("io.buoyant.hostportPfx", "io.buoyant.porthostPfx"):
        return _hostport(path, kind)
    return _Special(error=f"unknown system name /$/{kind} in {_show(path)} (known: inet, "
                          "nil, fail, io.buoyant.hostportPfx, io.buoyant.porthostPfx)")


def _hostport(path: Path, kind: str) -> _Special:
    if len(path) < 4:
        return _Special(Neg, note=f"/$/{kind} needs /$/{kind}/<prefix>/<host>:<port>")
    text = path[3]
    if text.startswith("[") and "]:" in text:
        host, _, port_text = text[1:].partition("]:")
    else:
        host, _, port_text = text.rpartition(":")
    port = _port(port_text)
    if not host or port is None:
        return _Special(Neg, note=f"{text!r} is not <host>:<port>")
    pair = (host, port) if kind == "io.buoyant.hostportPfx" else (port, host)
    return _Special(rewrite=(path[2], *pair, *path[4:]), note=f"rewritten by /$/{kind}")


# ---------------------------------------------------------------------------- bind


class _Walk:
    """What a walk of the dtab starts from: the dtab, the namers, the limits, no steps."""

    def __init__(self, dtab: Dtab, namers: Namers, max_depth: int, max_steps: int) -> None:
        if not isinstance(dtab, Dtab):
            raise TypeError(f"dtab must be a Dtab, not {type(dtab).__name__}")
        self.dtab = dtab
        self.namers = _check_namers(namers)
        self.max_depth = max_depth
        self.max_steps = max_steps
        self.steps = 0


class _Binder(_Walk):
    def __init__(self, dtab: Dtab, namers: Namers, max_depth: int, max_steps: int) -> None:
        super().__init__(dtab, namers, max_depth, max_steps)
        self.memo: dict[Path, tuple[NameTree[Bound], int]] = {}
        self.active: dict[Path, None] = {}
        self.root: Path = ()

    def too_deep(self, path: Path) -> DelegationError:
        return DelegationError(
            f"delegation of {_show(self.root)} needs more than max_depth={self.max_depth} "
            f"lookups (reached {_show(path)}); does a dentry rewrite a path into a longer "
            "path under its own prefix?")

    def loop(self, path: Path) -> DelegationError:
        chain = list(self.active)
        chain = chain[chain.index(path):] + [path]
        shown = [_show(p) for p in chain[:10]] + (["..."] if len(chain) > 10 else [])
        return DelegationError(f"delegation loop: {' -> '.join(shown)}")

    def bind_path(self, path: Path, depth: int) -> tuple[NameTree[Bound], int]:
        hit = self.memo.get(path)
        if hit is not None:
            if depth + hit[1] > self.max_depth:
                raise self.too_deep(path)
            return hit
        if path in self.active:
            raise self.loop(path)
        self.steps += 1
        if self.steps > self.max_steps:
            raise DelegationError(f"delegation of {_show(self.root)} took more than "
                                  f"max_steps={self.max_steps} steps")
        self.active[path] = None
        try:
            result = self._expand(path, depth)
        finally:
            del self.active[path]
        self.memo[path] = result
        return result

    def _expand(self, path: Path, depth: int) -> tuple[NameTree[Bound], int]:
        special = _special(path, self.namers)
        if special is None:
            tree = self.dtab.lookup(path)
            if tree is Neg:
                return Neg, 0
        elif special.error:
            raise DelegationError(special.error)
        elif special.rewrite is None:
            assert special.tree is not None
            return special.tree, 0
        else:
            tree = Leaf(special.rewrite)
        if depth + 1 > self.max_depth:
            raise self.too_deep(path)
        bound, height = self.bind_tree(tree, depth + 1)
        return bound, height + 1

    def bind_tree(self, tree: NameTree[Path], depth: int) -> tuple[NameTree[Bound], int]:
        if isinstance(tree, Leaf):
            return self.bind_path(tree.value, depth)
        if isinstance(tree, Alt):
            heights = [0]

            def branches() -> Iterator[NameTree[Bound]]:
                for t in tree.trees:
                    bound, height = self.bind_tree(t, depth)
                    heights.append(height)
                    yield bound

            combined = alt_of(branches())
            return combined, max(heights)
        if isinstance(tree, Union):
            items, height = [], 0
            for w in tree.weighted:
                bound, h = self.bind_tree(w.tree, depth)
                items.append(Weighted(w.weight, bound))
                height = max(height, h)
            return union_of(items), height
        return tree, 0


def _check_limits(max_depth: int, max_steps: int) -> None:
    for name, value in (("max_depth", max_depth), ("max_steps", max_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, not {value!r}")


def bind(dtab: Dtab, path: Path, namers: Namers, *, max_depth: int = 100,
         max_steps: int = 10_000) -> NameTree[Bound]:
    """Delegate ``path`` through ``dtab`` to a simplified tree of bound names."""
    check_path(path)
    _check_limits(max_depth, max_steps)
    binder = _Binder(dtab, namers, max_depth, max_steps)
    binder.root = path
    try:
        tree = binder.bind_path(path, 0)[0]
    except RecursionError:
        raise DelegationError(f"delegation of {_show(path)} nests too deeply") from None
    if _tree_depth(tree) > MAX_TREE_DEPTH:
        raise DelegationError(f"delegation of {_show(path)} gives a tree nested deeper than "
                              f"{MAX_TREE_DEPTH} levels")
    return tree


def _tree_depth(tree: NameTree[Any]) -> int:
    if isinstance(tree, Alt):
        return 1 + max(_tree_depth(t) for t in tree.trees)
    if isinstance(tree, Union):
        return 1 + max(_tree_depth(w.tree) for w in tree.weighted)
    return 0


# ---------------------------------------------------------------------------- delegate (trace)


@dataclass(frozen=True, slots=True)
class DelegateTree:
    """One step of a delegation trace. ``kind`` is linkerd's: ``delegate`` (``path`` was
    rewritten into ``children[0]``), ``alt``, ``union`` (with ``weights``), ``leaf`` (bound
    to ``bound``), ``neg``, ``fail``, ``empty`` or ``exception`` (see ``message``).
    ``dentry`` is the rule that produced ``path`` (None at the root and after a ``/$/``
    rewrite)."""

    kind: str
    path: Path
    dentry: Dentry | None = None
    children: tuple[DelegateTree, ...] = ()
    weights: tuple[float, ...] = ()
    bound: Bound | None = None
    message: str = ""

    def to_dict(self, describe: Callable[[Bound], Any] | None = None) -> dict[str, Any]:
        """JSON-able form; ``describe(bound)``, if given, is added to leaves as ``addr``."""
        out: dict[str, Any] = {"type": self.kind, "path": show_path(self.path),
                               "dentry": None if self.dentry is None else str(self.dentry)}
        if self.message:
            out["message"] = self.message
        if self.kind == "delegate":
            out["delegate"] = self.children[0].to_dict(describe)
        elif self.kind == "alt":
            out["alt"] = [c.to_dict(describe) for c in self.children]
        elif self.kind == "union":
            out["union"] = [{"weight": w, "tree": c.to_dict(describe)}
                            for w, c in zip(self.weights, self.children, strict=True)]
        elif self.kind == "leaf" and self.bound is not None:
            out["bound"] = {"id": show_path(self.bound.id),
                            "residual": show_path(self.bound.residual)}
            if describe is not None:
                out["bound"]["addr"] = describe(self.bound)
        return out

    def to_tree(self) -> NameTree[Bound]:
        """The bound tree this trace arrives at (what :func:`bind` returns); raises
        :class:`DelegationError` where the trace holds an exception that matters."""
        kind = self.kind
        if kind == "leaf" and self.bound is not None:
            return Leaf(self.bound)
        if kind == "delegate":
            return self.children[0].to_tree()
        if kind == "alt":
            return alt_of(c.to_tree() for c in self.children)
        if kind == "union":
            return union_of(Weighted(w, c.to_tree())
                            for w, c in zip(self.weights, self.children, strict=True))
        if kind == "exception":
            raise DelegationError(self.message)
        return _CONSTANTS[kind]


_CONSTANTS: dict[str, NameTree[Bound]] = {"neg": Neg, "fail": Fail, "empty": Empty}


class _Tracer(_Walk):
    def __init__(self, dtab: Dtab, namers: Namers, max_depth: int, max_steps: int) -> None:
        super().__init__(dtab, namers, max_depth, max_steps)
        self.chain: dict[Path, None] = {}

    def path_node(self, path: Path, dentry: Dentry | None, depth: int) -> DelegateTree:
        def fail(message: str) -> DelegateTree:
            return DelegateTree("exception", path, dentry, message=message)

        if path in self.chain:
            chain = list(self.chain)
            shown = [_show(p) for p in chain[chain.index(path):] + [path]]
            return fail(f"delegation loop: {' -> '.join(shown)}")
        self.steps += 1
        if self.steps > self.max_steps:
            return fail(f"delegation took more than max_steps={self.max_steps} steps")
        special = _special(path, self.namers)
        if special is not None and special.error:
            return fail(special.error)
        if special is not None and special.rewrite is None:
            return self._terminal(path, dentry, special)
        found = [] if special is not None else self.dtab.matches(path)
        if special is None and not found:
            return DelegateTree("neg", path, dentry, message="no dentry matches")
        if depth + 1 > self.max_depth:
            return fail(f"more than max_depth={self.max_depth} lookups")
        self.chain[path] = None
        try:
            child = self._child(path, special, found, depth + 1)
        finally:
            del self.chain[path]
        note = special.note if special is not None else ""
        return DelegateTree("delegate", path, dentry, (child,), message=note)

    def _terminal(self, path: Path, dentry: Dentry | None, special: _Special) -> DelegateTree:
        tree = special.tree
        if isinstance(tree, Leaf):
            return DelegateTree("leaf", path, dentry, bound=tree.value)
        kind = "fail" if tree is Fail else "empty" if tree is Empty else "neg"
        return DelegateTree(kind, path, dentry, message=special.note)

    def _child(self, path: Path, special: _Special | None,
               found: list[tuple[Dentry, NameTree[Path]]], depth: int) -> DelegateTree:
        if special is not None and special.rewrite is not None:
            return self.path_node(special.rewrite, None, depth)
        if len(found) == 1:
            return self.tree_node(found[0][1], found[0][0], path, depth)
        return DelegateTree("alt", path, None,
                            tuple(self.tree_node(t, d, path, depth) for d, t in found))

    def tree_node(self, tree: NameTree[Path], dentry: Dentry, path: Path,
                  depth: int) -> DelegateTree:
        if isinstance(tree, Leaf):
            return self.path_node(tree.value, dentry, depth)
        if isinstance(tree, Alt):
            return DelegateTree("alt", path, dentry,
                                tuple(self.tree_node(t, dentry, path, depth) for t in tree.trees))
        if isinstance(tree, Union):
            return DelegateTree(
                "union", path, dentry,
                tuple(self.tree_node(w.tree, dentry, path, depth) for w in tree.weighted),
                weights=tuple(float(w.weight) for w in tree.weighted))
        kind = "fail" if tree is Fail else "empty" if tree is Empty else "neg"
        return DelegateTree(kind, path, dentry)


def delegate(dtab: Dtab, path: Path, namers: Namers, *, max_depth: int = 100,
             max_steps: int = 10_000) -> DelegateTree:
    """Delegate like :func:`bind`, recording every step; never raises for a bad dtab (the
    problem is an ``exception`` node)."""
    check_path(path)
    _check_limits(max_depth, max_steps)
    try:
        return _Tracer(dtab, namers, max_depth, max_steps).path_node(path, None, 0)
    except RecursionError:
        return DelegateTree("exception", path, message="delegation nests too deeply")


# ---------------------------------------------------------------------------- choose


class _Outcome:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_NEG, _EMPTY, _FAIL = _Outcome("neg"), _Outcome("empty"), _Outcome("fail")


def choose(tree: NameTree[Bound], rng: random.Random,
           usable: Callable[[Bound], bool]) -> Bound | None:
    """Pick the bound name that serves ONE request.

    ``Union`` draws a branch by weight with ``rng`` (a branch that gives nothing is
    removed and the draw repeated among the rest; weight-0 branches are never drawn);
    ``Alt`` takes the first branch that gives a usable name, stopping at ``Empty`` or
    ``Fail``; a leaf counts only if ``usable(bound)``. Returns None when nothing is usable
    (``Neg``, ``Empty``, no addresses) and raises :class:`FailedName` on ``Fail``.
    """
    got = _pick(tree, rng, usable)
    if got is _FAIL:
        raise FailedName("the dtab fails this name ('!' or /$/fail)")
    return got if isinstance(got, Bound) else None


def _pick(tree: NameTree[Bound], rng: random.Random,
          usable: Callable[[Bound], bool]) -> Bound | _Outcome:
    if isinstance(tree, Leaf):
        return tree.value if usable(tree.value) else _NEG
    if isinstance(tree, Alt):
        for branch in tree.trees:
            got = _pick(branch, rng, usable)
            if got is not _NEG:
                return got
        return _NEG
    if isinstance(tree, Union):
        return _pick_union(tree, rng, usable)
    return _FAIL if tree is Fail else _EMPTY if tree is Empty else _NEG


def _pick_union(tree: Union[Bound], rng: random.Random,
                usable: Callable[[Bound], bool]) -> Bound | _Outcome:
    branches = [w for w in tree.weighted if w.weight > 0]
    saw_empty = False
    while branches:
        total = sum(w.weight for w in branches)
        x = rng.random() * total
        index = len(branches) - 1
        for i, w in enumerate(branches):
            x -= w.weight
            if x < 0:
                index = i
                break
        got = _pick(branches[index].tree, rng, usable)
        if isinstance(got, Bound):
            return got
        saw_empty = saw_empty or got is _EMPTY
        del branches[index]
    return _EMPTY if saw_empty else _NEG
