"""Name trees: what a dtab maps a path to, and what delegation binds it to.

A name tree is a ``Leaf`` (one name), an ``Alt`` (fallback: the first branch that gives a
name wins), a ``Union`` (weighted split: traffic is shared between the branches), or one of
three constants: ``Neg`` (no such name: an ``Alt`` moves on to its next branch), ``Fail``
(a definite failure: an ``Alt`` stops there) and ``Empty`` (the name exists but has nothing
in it: an ``Alt`` also stops there). Trees of paths are what dtabs hold; trees of
:class:`Bound` names are what delegation produces.

Concrete syntax, as Finagle's (``&`` binds tighter than ``|``; parentheses nest at most
:data:`MAX_NESTING` deep)::

    tree     ::= union ('|' union)*
    union    ::= weighted ('&' weighted)*
    weighted ::= [number '*'] simple          (the weight defaults to 1)
    simple   ::= path | '(' tree ')' | '~' | '!' | '$'

:func:`simplify` is Finagle's: empty and one-branch nodes collapse, ``Neg`` branches go,
an ``Alt`` ends at its first ``Fail``, and a ``Union`` drops ``Neg`` and ``Fail`` branches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Generic, TypeVar

from appliance.routing.path import Path, Scanner, check_path, show_path

T = TypeVar("T")
U = TypeVar("U")

DEFAULT_WEIGHT = 1.0
MAX_NESTING = 32
"""Parentheses nest at most this deep, so hostile text cannot exhaust the stack."""


@dataclass(frozen=True, slots=True)
class Bound:
    """A name bound to a discovery source: ``id`` is what discovery watches (for example
    ``("#", "io.l5d.fs", "web")``), ``residual`` the rest of the delegated path."""

    id: Path
    residual: Path = ()

    def __post_init__(self) -> None:
        check_path(self.id, "Bound.id")
        check_path(self.residual, "Bound.residual")


@dataclass(frozen=True, slots=True)
class Leaf(Generic[T]):
    value: T


@dataclass(frozen=True, slots=True)
class Alt(Generic[T]):
    """Fallback: the first branch that yields a name."""

    trees: tuple[NameTree[T], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.trees, tuple) or not self.trees:
            raise ValueError("Alt needs a non-empty tuple of trees")


@dataclass(frozen=True, slots=True)
class Weighted(Generic[T]):
    weight: float
    tree: NameTree[T]

    def __post_init__(self) -> None:
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ValueError(f"a weight must be a finite number >= 0, not {w!r}")


@dataclass(frozen=True, slots=True)
class Union(Generic[T]):
    """Weighted split between branches."""

    weighted: tuple[Weighted[T], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.weighted, tuple) or not self.weighted:
            raise ValueError("Union needs a non-empty tuple of Weighted trees")


class _Constant:
    __slots__ = ("_name", "_symbol")

    def __init__(self, name: str, symbol: str) -> None:
        self._name = name
        self._symbol = symbol

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        return self._name


class _NegType(_Constant):
    pass


class _FailType(_Constant):
    pass


class _EmptyType(_Constant):
    pass


Neg = _NegType("Neg", "~")
Fail = _FailType("Fail", "!")
Empty = _EmptyType("Empty", "$")

NameTree = Leaf[T] | Alt[T] | Union[T] | _NegType | _FailType | _EmptyType


# ---------------------------------------------------------------------------- parsing


def parse_tree(text: str) -> NameTree[Path]:
    """Parse a name tree such as ``/a | 0.9 * /b & 0.1 * /c``."""
    scanner = Scanner(text)
    tree = read_tree(scanner)
    scanner.expect_end("'|', '&' or end of input")
    return tree


def read_tree(sc: Scanner) -> NameTree[Path]:
    """Read one tree from the scanner (shared with the dtab parser)."""
    trees = [_read_union(sc)]
    sc.skip_space()
    while sc.eat("|"):
        trees.append(_read_union(sc))
        sc.skip_space()
    return trees[0] if len(trees) == 1 else Alt(tuple(trees))


def _read_union(sc: Scanner) -> NameTree[Path]:
    items = [_read_weighted(sc)]
    sc.skip_space()
    while sc.eat("&"):
        items.append(_read_weighted(sc))
        sc.skip_space()
    return items[0].tree if len(items) == 1 else Union(tuple(items))


def _read_weighted(sc: Scanner) -> Weighted[Path]:
    sc.skip_space()
    ch = sc.peek()
    if not (ch.isdigit() and ch.isascii()) and ch != ".":
        return Weighted(DEFAULT_WEIGHT, _read_simple(sc))
    weight = _read_number(sc)
    sc.skip_space()
    if not sc.eat("*"):
        raise sc.unexpected("'*' after the weight")
    return Weighted(weight, _read_simple(sc))


def _read_number(sc: Scanner) -> float:
    start = sc.pos
    seen_dot = False
    while (ch := sc.peek()) and ((ch.isdigit() and ch.isascii()) or ch == "."):
        if ch == ".":
            if seen_dot:
                raise sc.unexpected("a digit")
            seen_dot = True
        sc.pos += 1
    digits = sc.text[start:sc.pos]
    if digits == ".":
        raise sc.error("a weight needs digits", at=start)
    weight = float(digits)
    if not math.isfinite(weight):
        raise sc.error(f"weight {digits[:20]}... is too large", at=start)
    return weight


def _read_simple(sc: Scanner) -> NameTree[Path]:
    sc.skip_space()
    ch = sc.peek()
    if ch == "/":
        return Leaf(sc.path())
    if ch == "(":
        if sc.depth >= MAX_NESTING:
            raise sc.error(f"parentheses nest deeper than {MAX_NESTING}")
        sc.pos += 1
        sc.depth += 1
        tree = read_tree(sc)
        sc.skip_space()
        if not sc.eat(")"):
            raise sc.unexpected("')'")
        sc.depth -= 1
        return tree
    for constant in (Neg, Fail, Empty):
        if ch == constant._symbol:
            sc.pos += 1
            return constant
    raise sc.unexpected("a path, '(', '~', '!' or '$'")


# ---------------------------------------------------------------------------- showing


def show_weight(weight: float) -> str:
    """The shortest decimal that parses back to exactly ``weight`` (never an exponent)."""
    if weight == 0:
        return "0"
    text = format(Decimal(repr(float(weight))), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def show_leaf(value: object) -> str:
    if isinstance(value, Bound):
        return show_path(value.id + value.residual)
    if isinstance(value, tuple):
        return show_path(value)
    return str(value)


def show_tree(tree: NameTree[Any], show: Callable[[Any], str] = show_leaf) -> str:
    """The concrete syntax; ``parse_tree(show_tree(t)) == t`` for a tree of paths whose
    ``Alt`` and ``Union`` nodes have two or more branches."""
    if isinstance(tree, Alt) and len(tree.trees) > 1:
        return " | ".join(_show_union(t, show) for t in tree.trees)
    return _show_union(tree, show)


def _show_union(tree: NameTree[Any], show: Callable[[Any], str]) -> str:
    if isinstance(tree, Union) and len(tree.weighted) > 1:
        return " & ".join(_show_weighted(w, show) for w in tree.weighted)
    return _show_simple(tree, show)


def _show_weighted(item: Weighted[Any], show: Callable[[Any], str]) -> str:
    body = _show_simple(item.tree, show)
    return body if item.weight == DEFAULT_WEIGHT else f"{show_weight(item.weight)}*{body}"


def _show_simple(tree: NameTree[Any], show: Callable[[Any], str]) -> str:
    if isinstance(tree, Leaf):
        return show(tree.value)
    if isinstance(tree, Alt):
        return _show_simple(tree.trees[0], show) if len(tree.trees) == 1 else (
            f"({show_tree(tree, show)})")
    if isinstance(tree, Union):
        return _show_simple(tree.weighted[0].tree, show) if len(tree.weighted) == 1 else (
            f"({show_tree(tree, show)})")
    if isinstance(tree, _Constant):
        return tree._symbol
    raise TypeError(f"not a name tree: {tree!r}")


# ---------------------------------------------------------------------------- transforming


def map_tree(tree: NameTree[T], f: Callable[[T], U]) -> NameTree[U]:
    """The same tree with ``f`` applied to every leaf value."""
    if isinstance(tree, Leaf):
        return Leaf(f(tree.value))
    if isinstance(tree, Alt):
        return Alt(tuple(map_tree(t, f) for t in tree.trees))
    if isinstance(tree, Union):
        return Union(tuple(Weighted(w.weight, map_tree(w.tree, f)) for w in tree.weighted))
    return tree


def simplify(tree: NameTree[T]) -> NameTree[T]:
    """An evaluation-equivalent tree; a fixpoint (``simplify(simplify(t)) == simplify(t)``)."""
    if isinstance(tree, Alt):
        return alt_of(simplify(t) for t in tree.trees)
    if isinstance(tree, Union):
        return union_of(Weighted(w.weight, simplify(w.tree)) for w in tree.weighted)
    return tree


def alt_of(trees: Iterable[NameTree[T]]) -> NameTree[T]:
    """Combine already simplified branches into a simplified ``Alt``. The iterable is
    consumed only up to the first ``Fail``, so callers may pass a lazy generator."""
    kept: list[NameTree[T]] = []
    for t in trees:
        if t is Neg:
            continue
        kept.append(t)
        if t is Fail:
            break
    if not kept:
        return Neg
    return kept[0] if len(kept) == 1 else Alt(tuple(kept))


def union_of(weighted: Iterable[Weighted[T]]) -> NameTree[T]:
    """Combine already simplified weighted branches into a simplified ``Union``."""
    kept = tuple(w for w in weighted if w.tree is not Neg and w.tree is not Fail)
    if not kept:
        return Neg
    return kept[0].tree if len(kept) == 1 else Union(kept)


__all__ = [
    "DEFAULT_WEIGHT", "Alt", "Bound", "Empty", "Fail", "Leaf", "NameTree", "Neg", "Union",
    "Weighted", "alt_of", "map_tree", "parse_tree", "read_tree", "show_leaf", "show_tree",
    "show_weight", "simplify", "union_of",
]
