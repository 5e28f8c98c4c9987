"""Glue between the data path and the router: request views, overrides, and building the
router of a direction from its config.

Per-request dtab overrides follow linkerd: ``l5d-dtab`` (set by an app for its own request)
and ``l5d-ctx-dtab`` (set by an upstream proxy) are appended, in that order after the base
dtab; the request goes on carrying the combined override as ``l5d-ctx-dtab`` so every proxy
down the call chain routes it the same way, and ``l5d-dtab`` is removed. An override that
does not parse is the client's error: 400 with ``l5d-proxy-error``. With
``routing.allow_overrides`` off, both headers are removed and ignored.

Deadlines (docs/reliability.md): :func:`request_deadline` reads a request's incoming
``l5d-ctx-deadline`` (and, for gRPC, ``grpc-timeout``) and combines them with the route's
timeout; :func:`stamp_deadline` writes what is left on the request sent on, so the next hop
is at least as strict. A request with none of them pays one pass over its header names.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from appliance.config import Config
from appliance.discovery.base import NamerContext
from appliance.net.addr import OrigDst
from appliance.resilience.deadline import Deadline
from appliance.resilience.policy import NOT_RETRYABLE
from appliance.routing.dtab import Dtab, parse_dtab
from appliance.routing.identify import RequestView, first_of, make_identifier, parse_override
from appliance.routing.path import RoutingSyntaxError, parse_path
from appliance.routing.router import Pending, RouteError, Router, Target

if TYPE_CHECKING:
    from appliance.net.listener import Direction

log = logging.getLogger("appliance.routing")



class LazyHeaders(Mapping[str, str]):
    """Lower-case str view of a header list, built only if an identifier reads it."""

    __slots__ = ("_raw", "_map")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._map: dict[str, str] | None = None

    def _build(self) -> dict[str, str]:
        if self._map is None:
            self._map = {n.decode("latin-1").lower(): v.decode("latin-1")
                         for n, v in self._raw}
        return self._map

    def __getitem__(self, key: str) -> str:
        return self._build()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())


def take_override(headers: list[tuple[bytes, bytes]], allow: bool
                  ) -> tuple[Dtab | None, str]:
    """Remove the override headers from ``headers`` (in place); return the override they
    carried (None if none) and its text. Raises RoutingSyntaxError for a bad one."""
    ctx: list[str] = []
    own: list[str] = []
    keep: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"l5d-ctx-dtab":
            ctx.append(value.decode("latin-1"))
        elif lname == b"l5d-dtab":
            own.append(value.decode("latin-1"))
        else:
            keep.append((name, value))
    if not ctx and not own:
        return None, ""
    headers[:] = keep
    if not allow:
        return None, ""
    # l5d-ctx-dtab (from the proxies before us) first, then the app's own l5d-dtab.
    ordered = ctx + own
    dtab = parse_override(ordered)
    text = dtab.show()
    if text:
        headers.append((b"l5d-ctx-dtab", text.encode("latin-1")))
    return dtab, text


_DST_HEADERS = (b"l5d-dst-service", b"l5d-dst-client")


def tag_dst(headers: Sequence[tuple[bytes, bytes]], target: Target
            ) -> list[tuple[bytes, bytes]]:
    """``headers`` with linkerd's informational headers of a routed request:
    ``l5d-dst-service`` (the logical name) and ``l5d-dst-client`` (the bound name it went
    to); values a client sent are replaced."""
    out = [(n, v) for n, v in headers if n.lower() not in _DST_HEADERS]
    if target.service is not None:
        out.append((b"l5d-dst-service", target.name.encode("latin-1")))
        out.append((b"l5d-dst-client", target.service_name.encode("latin-1")))
    return out


def route_http1(router: Router, head: Any, dst: OrigDst, allow: bool) -> Target | Pending:
    """Route one HTTP/1 request (its head may lose/gain override headers)."""
    try:
        override, text = take_override(head.headers, allow)
    except RoutingSyntaxError as exc:
        raise RouteError(400, f"invalid dtab override: {exc}", "bad_dtab") from None
    authority = (head.host or b"").decode("latin-1")
    target = head.target.decode("latin-1")
    if not target.startswith("/"):  # absolute form
        rest = target.split("://", 1)[-1]
        slash = rest.find("/")
        if not authority:
            authority = rest if slash < 0 else rest[:slash]
        target = "/" if slash < 0 else rest[slash:]
    view = RequestView(method=head.method.decode("latin-1"), authority=authority,
                       path=target, headers=LazyHeaders(head.headers),
                       dst=(dst.host, dst.port), protocol="http/1",
                       version=head.version.decode("latin-1"))
    return router.route(view, override, text)


def route_h2(router: Router, headers: list[tuple[bytes, bytes]], dst: OrigDst,
             allow: bool) -> Target | Pending:
    """Route one HTTP/2 request from its (validated, forwardable) header list."""
    try:
        override, text = take_override(headers, allow)
    except RoutingSyntaxError as exc:
        raise RouteError(400, f"invalid dtab override: {exc}", "bad_dtab") from None
    method = authority = path = ""
    for name, value in headers:
        if name[:1] != b":":
            break
        if name == b":method":
            method = value.decode("latin-1")
        elif name == b":authority":
            authority = value.decode("latin-1")
        elif name == b":path":
            path = value.decode("latin-1")
    if not authority:
        for name, value in headers:
            if name == b"host":
                authority = value.decode("latin-1")
                break
    view = RequestView(method=method, authority=authority, path=path,
                       headers=LazyHeaders(headers), dst=(dst.host, dst.port), protocol="h2")
    return router.route(view, override, text)


def request_deadline(headers: list[tuple[bytes, bytes]], timeout: float | None,
                     clock: Any, *, grpc: bool = False) -> Deadline | None:
    """The request's deadline (route ``timeout``, ``l5d-ctx-deadline``, and ``grpc-timeout``
    when ``grpc``), or None when it has none. Malformed header values are ignored."""
    ctx: list[bytes] | None = None
    grpc_timeout: bytes | None = None
    for name, value in headers:
        size = len(name)
        if size == 16 and name.lower() == b"l5d-ctx-deadline":
            if ctx is None:
                ctx = []
            ctx.append(value)
        elif grpc and size == 12 and name.lower() == b"grpc-timeout":
            grpc_timeout = value
    if ctx is None and grpc_timeout is None and timeout is None:
        return None
    deadline = Deadline.combine(clock, timeout=timeout, ctx_deadline=ctx,
                                grpc_timeout=grpc_timeout,
                                now_wall=time.time() if ctx is not None else None)
    return deadline if deadline.bounded or deadline.ignored else None


def stamp_deadline(headers: list[tuple[bytes, bytes]], deadline: Deadline, *,
                   grpc: bool = False) -> None:
    """Replace (in place) the deadline headers with what is left of ``deadline``:
    ``l5d-ctx-deadline`` always, ``grpc-timeout`` for gRPC."""
    keep = [(n, v) for n, v in headers
            if not ((len(n) == 16 and n.lower() == b"l5d-ctx-deadline")
                    or (grpc and len(n) == 12 and n.lower() == b"grpc-timeout"))]
    ctx = deadline.ctx_deadline_header(time.time())
    if ctx is not None:
        keep.append((b"l5d-ctx-deadline", ctx.encode("ascii")))
        if grpc:
            keep.append((b"grpc-timeout", (deadline.grpc_timeout_header() or "").encode()))
    headers[:] = keep


def make_identify(config: Config) -> Any:
    conf = config.routing
    prefix = parse_path(conf.prefix)
    identifiers = []
    for item in (i.strip() for i in conf.identifier.split(",")):
        if not item:
            continue
        kind, _, arg = item.partition(":")
        options: dict[str, Any] = {"prefix": prefix}
        if kind in ("header", "header_token"):
            options["name"] = arg
        elif kind == "path":
            options["segments"] = conf.path_segments
        identifiers.append(make_identifier(kind, **options))
    return first_of(identifiers)


def build_router(d: Direction) -> Router | None:
    """The router of an outbound direction with a dtab; None otherwise (no cost)."""
    config = d.config
    if d.name != "outbound" or not config.routing.dtab.strip():
        return None
    from appliance.balance.accrual import accrual_factory
    from appliance.balance.balancer import make_balancer
    from appliance.discovery.registry import build_namers

    failing: set[tuple[str, tuple[str, ...]]] = set()

    def report(namer: str, name: tuple[str, ...], ok: bool, error: str) -> None:
        """Every answer and failure is counted; an outage is logged once, and its end."""
        d.registry.discovery(namer, ok)
        key = (namer, name)
        if not ok and key not in failing:
            failing.add(key)
            log.warning("discovery: %s %s: %s (keeping the last good addresses)",
                        namer, "/".join(name), error)
        elif ok and key in failing:
            failing.discard(key)
            log.warning("discovery: %s %s answers again", namer, "/".join(name))

    ctx = NamerContext(spawn=d.spawn, report=report, clock=d.loop.time)
    namers = build_namers(list(config.namers), ctx)
    conf = config.balancer
    rng = random.Random()
    accrual = accrual_factory("consecutive_failures", rng, n=conf.consecutive_failures)

    def balancer() -> Any:
        return make_balancer(conf.kind, d.loop.time, rng, decay=conf.decay,
                             default_rtt=conf.default_rtt, accrual=accrual)

    return Router(dtab=parse_dtab(config.routing.dtab), identify=make_identify(config),
                  namers=namers, make_balancer=balancer,
                  allow_overrides=config.routing.allow_overrides,
                  fallback_orig_dst=config.routing.fallback == "orig_dst",
                  rng=rng, clock=d.loop.time)


def next_try(d: Direction, attempts: Any, budget: Any, deadline: Deadline | None,
             target: Target | None, reason: str, verdict: Any
             ) -> tuple[float, Target | None] | None:
    """Whether a failed attempt (``reason``: unsent, connection, response, timeout) goes
    again, for HTTP/1 exchanges and HTTP/2 streams alike: ``(delay, new target)`` when it
    does (the target is None for unrouted traffic), None when it does not. Counts the retry
    (or why it was skipped) and tells the balancer the attempt failed."""
    delay = attempts.next_delay(verdict, sent=reason != "unsent", budget=budget,
                                remaining=deadline.remaining() if deadline is not None
                                else math.inf)
    if isinstance(delay, str):
        if delay != NOT_RETRYABLE:
            d.registry.retry_skipped(d.name, delay)
        return None
    again = None
    if target is not None:
        target.done(False)
        again = target.again()
        if again is None:
            return None  # every endpoint is ejected: this failure is the answer
    d.registry.retry(d.name, reason)
    return delay, again

