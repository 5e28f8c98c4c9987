"""Identifiers: from a request to the logical name that the dtab delegates.

Each identifier is a small frozen object, callable on a :class:`RequestView`, that returns
a :data:`Path` (the name, under ``prefix``, ``/svc`` by default) or None (this identifier
has no name for the request). :meth:`Identifier.identify` also returns the request path to
send on (only ``path`` with ``consume=True`` changes it). They follow linkerd 1's:

========================  ====================================  ============================
``by_host``               ``/svc/<authority>`` (lower-cased)    io.l5d.header.token on Host
``by_method_and_host``    ``/svc/1.1/<METHOD>/<host>``          io.l5d.methodAndHost
``by_path(n, consume)``   ``/svc/<first n path segments>``      io.l5d.path
``by_header(name)``       ``/svc`` + the header's path value    io.l5d.header
``by_header(name,         ``/svc/<header value>``               io.l5d.header.token
token=True)``
``by_dst``                ``/svc/<ip>:<port>``                  (the transparent fallback)
========================  ====================================  ============================

:func:`parse_override` reads the ``l5d-ctx-dtab`` and ``l5d-dtab`` values of a request into
one :class:`Dtab`; a value that does not parse raises :class:`RoutingSyntaxError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from appliance.routing.dtab import Dtab, parse_dtab
from appliance.routing.path import Path, RoutingSyntaxError, check_path, parse_path

SVC: Path = ("svc",)
PROTOCOLS = ("http/1", "h2")


@dataclass(frozen=True, slots=True)
class RequestView:
    """What identifiers may read of a request. ``headers`` has lower-case names; ``path`` is
    the origin-form target (``/a/b?q``); ``dst`` the original destination; ``version`` is
    ``"1.0"``, ``"1.1"`` or ``"2"`` ("" means 1.1 for http/1 and 2 for h2)."""

    method: str
    authority: str
    path: str
    headers: Mapping[str, str]
    dst: tuple[str, int] | None = None
    protocol: str = "http/1"
    version: str = ""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"RequestView.protocol must be 'http/1' or 'h2', "
                             f"not {self.protocol!r}")

    def http_version(self) -> str:
        return self.version or ("1.1" if self.protocol == "http/1" else "2")


@dataclass(frozen=True, slots=True)
class Identified:
    """A name, and the request path to send on (rewritten by ``path`` with ``consume``)."""

    name: Path
    path: str


def _split_target(target: str) -> tuple[list[str], str]:
    """The ``/``-separated parts of an origin-form target's path, and its ``?query``."""
    path, mark, query = target.partition("?")
    return path[1:].split("/"), mark + query


class Identifier:
    """Base: ``identifier(request) -> Path | None``."""

    __slots__ = ()
    prefix: Path

    def __call__(self, req: RequestView) -> Path | None:
        raise NotImplementedError

    def identify(self, req: RequestView) -> Identified | None:
        name = self(req)
        return None if name is None else Identified(name, req.path)


def _prefix(value: Path | str) -> Path:
    if isinstance(value, str):
        return parse_path(value)
    return check_path(value, "prefix")


def _host(authority: str, strip_port: bool) -> str:
    host = authority.strip().lower()
    if not strip_port:
        return host
    if host.startswith("["):
        inner, bracket, _ = host[1:].partition("]")
        return inner if bracket else host
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() and ":" not in name else host


@dataclass(frozen=True, slots=True)
class HostIdentifier(Identifier):
    """``/svc/<authority>``: the Host header (h2: ``:authority``), lower-cased; the port
    is kept unless ``strip_port`` (then IPv6 brackets go too)."""

    prefix: Path = SVC
    strip_port: bool = False

    def __call__(self, req: RequestView) -> Path | None:
        host = _host(req.authority, self.strip_port)
        return self.prefix + (host,) if host else None


@dataclass(frozen=True, slots=True)
class MethodAndHostIdentifier(Identifier):
    """``/svc/<version>/<METHOD>/<host>``: version ``1.1`` or ``2`` (h2); HTTP/1.0 names
    have no host (``/svc/1.0/GET``); with ``uri_in_dst`` the request path's segments
    follow."""

    prefix: Path = SVC
    uri_in_dst: bool = False

    def __call__(self, req: RequestView) -> Path | None:
        version = req.http_version()
        if not req.method:
            return None
        name = self.prefix + (version, req.method)
        if version != "1.0":
            host = _host(req.authority, False)
            if not host:
                return None
            name += (host,)
        if self.uri_in_dst:
            name += tuple(s for s in _split_target(req.path)[0] if s)
        return name


@dataclass(frozen=True, slots=True)
class PathIdentifier(Identifier):
    """``/svc/<first segments of the request path>``; None when the path has fewer
    (non-empty) segments. With ``consume`` the request goes on without them."""

    segments: int = 1
    consume: bool = False
    prefix: Path = SVC

    def __post_init__(self) -> None:
        if isinstance(self.segments, bool) or not isinstance(self.segments, int) or (
                self.segments < 1):
            raise ValueError(f"segments must be an int >= 1, not {self.segments!r}")

    def __call__(self, req: RequestView) -> Path | None:
        found = self.identify(req)
        return None if found is None else found.name

    def identify(self, req: RequestView) -> Identified | None:
        if not req.path.startswith("/"):
            return None
        parts, query = _split_target(req.path)
        head = parts[:self.segments]
        if len(head) < self.segments or not all(head):
            return None
        rest = "/" + "/".join(parts[self.segments:]) + query if self.consume else req.path
        return Identified(self.prefix + tuple(head), rest)


_AUTHORITY_HEADERS = ("host", ":authority")


@dataclass(frozen=True, slots=True)
class HeaderIdentifier(Identifier):
    """``/svc`` + the header's value: a path (``/web/v2``, io.l5d.header) or, with
    ``token``, one segment whatever it holds (io.l5d.header.token). ``host`` and
    ``:authority`` read the request's authority. A value that is not a path raises
    :class:`RoutingSyntaxError` naming the header."""

    header: str = "l5d-name"
    token: bool = False
    prefix: Path = SVC

    def __post_init__(self) -> None:
        if not isinstance(self.header, str) or not self.header.strip():
            raise ValueError(f"header must be a header name, not {self.header!r}")
        object.__setattr__(self, "header", self.header.strip().lower())

    def __call__(self, req: RequestView) -> Path | None:
        value = req.headers.get(self.header)
        if not value and self.header in _AUTHORITY_HEADERS:
            value = req.authority
        if not value:
            return None
        if self.token:
            return self.prefix + (value,)
        try:
            return self.prefix + parse_path(value)
        except RoutingSyntaxError as exc:
            raise RoutingSyntaxError(f"{self.header} header: {exc.message}", exc.text,
                                     exc.position, exc.expected) from None


@dataclass(frozen=True, slots=True)
class DstIdentifier(Identifier):
    """``/svc/<ip>:<port>`` from the original destination (IPv6 unbracketed: the port is
    after the last colon)."""

    prefix: Path = SVC

    def __call__(self, req: RequestView) -> Path | None:
        if req.dst is None:
            return None
        host, port = req.dst
        return self.prefix + (f"{host}:{port}",)


@dataclass(frozen=True, slots=True)
class FirstOf(Identifier):
    """The first identifier that names the request."""

    identifiers: tuple[Identifier, ...]

    def __post_init__(self) -> None:
        if not self.identifiers:
            raise ValueError("first_of needs at least one identifier")

    @property
    def prefix(self) -> Path:  # type: ignore[override]
        return self.identifiers[0].prefix

    def __call__(self, req: RequestView) -> Path | None:
        for identifier in self.identifiers:
            name = identifier(req)
            if name is not None:
                return name
        return None

    def identify(self, req: RequestView) -> Identified | None:
        for identifier in self.identifiers:
            found = identifier.identify(req)
            if found is not None:
                return found
        return None


# ---------------------------------------------------------------------------- constructors


def by_host(*, prefix: Path | str = SVC, strip_port: bool = False) -> HostIdentifier:
    return HostIdentifier(_prefix(prefix), strip_port)


def by_method_and_host(*, prefix: Path | str = SVC,
                       uri_in_dst: bool = False) -> MethodAndHostIdentifier:
    return MethodAndHostIdentifier(_prefix(prefix), uri_in_dst)


def by_path(segments: int = 1, consume: bool = False, *,
            prefix: Path | str = SVC) -> PathIdentifier:
    return PathIdentifier(segments, consume, _prefix(prefix))


def by_header(name: str = "l5d-name", *, token: bool = False,
              prefix: Path | str = SVC) -> HeaderIdentifier:
    return HeaderIdentifier(name, token, _prefix(prefix))


def by_dst(*, prefix: Path | str = SVC) -> DstIdentifier:
    return DstIdentifier(_prefix(prefix))


def first_of(identifiers: Iterable[Identifier]) -> FirstOf:
    """Try each identifier in order (for example host, then dst)."""
    items = tuple(identifiers)
    for i, item in enumerate(items):
        if not isinstance(item, Identifier):
            raise TypeError(f"first_of: item {i} is not an identifier: {item!r}")
    return FirstOf(items)


# kind -> (options allowed, default header name)
_KINDS: dict[str, tuple[frozenset[str], str]] = {
    "host": (frozenset({"prefix", "strip_port"}), ""),
    "method_and_host": (frozenset({"prefix", "uri_in_dst"}), ""),
    "path": (frozenset({"prefix", "segments", "consume"}), ""),
    "header": (frozenset({"prefix", "name"}), "l5d-name"),
    "header_token": (frozenset({"prefix", "name"}), "host"),
    "dst": (frozenset({"prefix"}), ""),
}
_ALIASES = {
    "io.l5d.header.token": "header_token", "io.l5d.header": "header",
    "io.l5d.methodAndHost": "method_and_host", "io.l5d.path": "path",
}


def _option(kind: str, options: Mapping[str, Any], name: str, typ: type, default: Any) -> Any:
    value = options.get(name, default)
    if typ is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"identifier {kind!r}: option {name!r} must be an integer >= 1, "
                         f"not {value!r}")
    if typ is not int and not isinstance(value, typ):
        raise ValueError(f"identifier {kind!r}: option {name!r} must be a {typ.__name__}, "
                         f"not {value!r}")
    return value


def make_identifier(kind: str, **options: Any) -> Identifier:
    """Build an identifier from config-style names: ``host``, ``method_and_host``, ``path``,
    ``header``, ``header_token``, ``dst`` (or linkerd's ``io.l5d.*`` kinds). Options:
    ``prefix`` (all), ``strip_port`` (host), ``uri_in_dst`` (method_and_host), ``segments``
    and ``consume`` (path), ``name`` (header, header_token: the header to read)."""
    key = _ALIASES.get(kind, kind)
    if key not in _KINDS:
        raise ValueError(f"identifier kind {kind!r} is not known; expected one of: "
                         f"{', '.join(sorted(_KINDS))}")
    allowed, default_header = _KINDS[key]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"identifier {key!r}: unknown option {unknown[0]!r} "
                         f"(allowed: {', '.join(sorted(allowed))})")
    try:
        prefix = _prefix(options.get("prefix", SVC))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"identifier {key!r}: option 'prefix': {exc}") from None
    if key == "host":
        return HostIdentifier(prefix, _option(key, options, "strip_port", bool, False))
    if key == "method_and_host":
        return MethodAndHostIdentifier(prefix, _option(key, options, "uri_in_dst", bool, False))
    if key == "path":
        return PathIdentifier(_option(key, options, "segments", int, 1),
                              _option(key, options, "consume", bool, False), prefix)
    if key == "dst":
        return DstIdentifier(prefix)
    header = _option(key, options, "name", str, default_header) or default_header
    return HeaderIdentifier(header, key == "header_token", prefix)


# ---------------------------------------------------------------------------- overrides


def parse_override(header_values: Iterable[str]) -> Dtab:
    """The per-request dtab of ``l5d-ctx-dtab`` / ``l5d-dtab`` values: each value is a dtab,
    and they concatenate in order (so later values take precedence). Raises
    :class:`RoutingSyntaxError` for a value that does not parse (the proxy answers 400)."""
    if isinstance(header_values, str):
        raise TypeError("parse_override takes a list of header values, not one string")
    dtab = Dtab()
    for value in header_values:
        dtab = dtab + parse_dtab(value)
    return dtab


def show_override(dtab: Dtab) -> str:
    """The header value that carries ``dtab`` on (compact: ``/a=>/b;/c=>/d``)."""
    return dtab.show()
