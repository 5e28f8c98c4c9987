"""Logical routing as in linkerd 1: identifiers name a request, dtabs delegate the name to
bound names, and :func:`choose` picks one per request. Pure modules: no I/O, no clock; the
one random choice takes an RNG. See docs/routing.md.

- :mod:`.path`: paths (``tuple[str, ...]``), their syntax and the syntax error type
- :mod:`.nametree`: ``Leaf``/``Alt``/``Union``/``Neg``/``Fail``/``Empty``, ``Bound``
- :mod:`.dtab`: ``Dentry``, ``Dtab``, ``parse_dtab``
- :mod:`.delegate`: ``bind``, ``delegate`` (trace for the admin API), ``choose``
- :mod:`.identify`: ``RequestView``, identifiers, ``parse_override``
"""

from __future__ import annotations

from appliance.routing.delegate import (
    DelegateTree,
    DelegationError,
    FailedName,
    bind,
    choose,
    delegate,
)
from appliance.routing.dtab import ANY, Dentry, Dtab, parse_dentry, parse_dtab
from appliance.routing.identify import (
    Identified,
    Identifier,
    RequestView,
    by_dst,
    by_header,
    by_host,
    by_method_and_host,
    by_path,
    first_of,
    make_identifier,
    parse_override,
    show_override,
)
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
    parse_tree,
    show_tree,
    simplify,
)
from appliance.routing.path import (
    Path,
    RoutingError,
    RoutingSyntaxError,
    parse_path,
    show_path,
)

__all__ = [
    "ANY", "Alt", "Bound", "DelegateTree", "DelegationError", "Dentry", "Dtab", "Empty",
    "Fail", "FailedName", "Identified", "Identifier", "Leaf", "NameTree", "Neg", "Path",
    "RequestView", "RoutingError", "RoutingSyntaxError", "Union", "Weighted", "bind",
    "by_dst", "by_header", "by_host", "by_method_and_host", "by_path", "choose", "delegate",
    "first_of", "make_identifier", "parse_dentry", "parse_dtab", "parse_override",
    "parse_path", "parse_tree", "show_override", "show_path", "show_tree", "simplify",
]
