"""Dtabs (delegation tables): ordered prefix-rewrite rules from names to name trees.

A dentry ``/svc/web => /a | /b`` rewrites every path that starts with ``/svc/web`` into
the tree ``/a/<rest> | /b/<rest>``. A prefix element may be ``*``, which matches any one
segment. :meth:`Dtab.lookup` is Finagle's: all dentries whose prefix matches, the LAST one
first, combined with ``Alt``, so a later dentry overrides an earlier one and the earlier one
is the fallback when the later one's result is negative. No match at all is ``Neg``.

Concrete syntax: ``dentry (';' dentry)* [';']``, whitespace, newlines and ``#`` comments
allowed between tokens; the empty text is the empty dtab. :meth:`Dtab.show` writes the
compact form Finagle puts in ``l5d-dtab`` headers (``/a=>/b;/c=>/d``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from appliance.routing.nametree import Alt, NameTree, Neg, map_tree, read_tree, show_tree
from appliance.routing.path import Path, Scanner, check_path, show_segment


class _AnyElem:
    """The ``*`` wildcard of a dentry prefix; a singleton."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ANY"

    def __reduce__(self) -> str:
        return "ANY"


ANY = _AnyElem()

PrefixElem = str | _AnyElem
Prefix = tuple[PrefixElem, ...]


def show_prefix(prefix: Prefix) -> str:
    return "/" + "/".join("*" if isinstance(e, _AnyElem) else show_segment(e) for e in prefix)


@dataclass(frozen=True, slots=True)
class Dentry:
    """One rule: paths starting with ``prefix`` are rewritten into ``dst``."""

    prefix: Prefix
    dst: NameTree[Path]

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, tuple):
            raise TypeError(f"a dentry prefix is a tuple, not {type(self.prefix).__name__}")
        for i, elem in enumerate(self.prefix):
            if elem is not ANY and (not isinstance(elem, str) or not elem):
                raise ValueError(
                    f"dentry prefix element {i} must be a non-empty string or ANY, not {elem!r}")

    def matches(self, path: Path) -> bool:
        prefix = self.prefix
        if len(path) < len(prefix):
            return False
        return all(e is ANY or e == s for e, s in zip(prefix, path, strict=False))

    def rewrite(self, path: Path) -> NameTree[Path]:
        """``dst`` with the part of ``path`` after the prefix appended to every leaf."""
        rest = path[len(self.prefix):]
        return self.dst if not rest else map_tree(self.dst, lambda p: p + rest)

    def show(self) -> str:
        return f"{show_prefix(self.prefix)}=>{show_tree(self.dst)}"

    def __str__(self) -> str:
        return f"{show_prefix(self.prefix)} => {show_tree(self.dst)}"


@dataclass(frozen=True, slots=True)
class Dtab:
    """An ordered tuple of dentries; later ones take precedence."""

    dentries: tuple[Dentry, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.dentries, tuple) or not all(
                isinstance(d, Dentry) for d in self.dentries):
            raise TypeError("Dtab.dentries must be a tuple of Dentry")

    def __add__(self, other: Dtab) -> Dtab:
        if not isinstance(other, Dtab):
            return NotImplemented
        if not other.dentries:
            return self
        if not self.dentries:
            return other
        return Dtab(self.dentries + other.dentries)

    def __len__(self) -> int:
        return len(self.dentries)

    def __iter__(self) -> Iterator[Dentry]:
        return iter(self.dentries)

    def matches(self, path: Path) -> list[tuple[Dentry, NameTree[Path]]]:
        """Every matching dentry with its rewrite of ``path``, the last dentry first."""
        check_path(path)
        return [(d, d.rewrite(path)) for d in reversed(self.dentries) if d.matches(path)]

    def lookup(self, path: Path) -> NameTree[Path]:
        """One rewriting step: the matches combined with ``Alt``, or ``Neg``."""
        found = self.matches(path)
        if not found:
            return Neg
        if len(found) == 1:
            return found[0][1]
        return Alt(tuple(tree for _, tree in found))

    def show(self) -> str:
        """Compact form, as sent in ``l5d-dtab`` headers: ``/a=>/b;/c=>/d``."""
        return ";".join(d.show() for d in self.dentries)

    def pretty(self) -> str:
        """One dentry a line, spaced, for people: ``/a => /b;``."""
        return "".join(f"{d};\n" for d in self.dentries)

    def __str__(self) -> str:
        return self.show()


def _read_prefix(sc: Scanner) -> Prefix:
    sc.skip_space()
    if not sc.eat("/"):
        raise sc.unexpected("'/' to start a dentry prefix")
    if not (sc.label_starts() or sc.peek() == "*"):
        return ()
    elems: list[PrefixElem] = []
    while True:
        if sc.eat("*"):
            elems.append(ANY)
        else:
            elems.append(sc.label())
        if not sc.eat("/"):
            return tuple(elems)


def _read_dentry(sc: Scanner) -> Dentry:
    prefix = _read_prefix(sc)
    sc.skip_space()
    if not (sc.eat("=") and sc.eat(">")):
        raise sc.unexpected("'=>'")
    return Dentry(prefix, read_tree(sc))


def parse_dentry(text: str) -> Dentry:
    """Parse one ``prefix => tree`` rule."""
    sc = Scanner(text)
    dentry = _read_dentry(sc)
    sc.expect_end("'|', '&' or end of input")
    return dentry


def parse_dtab(text: str) -> Dtab:
    """Parse ``/svc => /#/io.l5d.fs; /svc/web => 0.9 * /a & 0.1 * /b`` (a trailing ``;``,
    whitespace, newlines and ``#`` comments are allowed; empty text is the empty dtab)."""
    sc = Scanner(text)
    dentries: list[Dentry] = []
    while True:
        sc.skip_space()
        if sc.at_end():
            break
        dentries.append(_read_dentry(sc))
        sc.skip_space()
        if not sc.eat(";"):
            break
    sc.expect_end("';', '|', '&' or end of input")
    return Dtab(tuple(dentries))
