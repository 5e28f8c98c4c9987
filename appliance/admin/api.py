"""JSON APIs on the admin port: ``/api/stats``, ``/api/endpoints``, ``/delegate``, ``/dtab``.

Theory of operation. Every handler reads the live objects of the running proxy (the metrics
registry, each direction's router, its services and balancers) on the event loop, builds a
plain dict and answers it as JSON; nothing here is on the data path or changes routing. The
router is read again on every request, so a config reload that swaps it is seen at once.

``/api/stats`` gives, per metrics series (its ``labels`` dict carries whatever labels the
registry has: today ``direction`` and ``protocol``), the cumulative counters and latency
histogram (a client may difference successive polls itself) and, from a
:class:`~appliance.admin.dashboard.Window` of the last seconds, the request rate, success
rate and p50/p95/p99 latency, plus one history point per second for charts.

``/delegate`` and ``/dtab`` show routing without touching discovery: a bound name whose
service is already watched shows its addresses, a ``/$/inet`` name its own address, and any
other name ``"watched": false`` (looking at a name on the admin port does not start a watch).
Bad input answers 400 with JSON naming the parameter and, for syntax errors, the 1-based
position.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.admin.dashboard import Counters, Delta, Window, quantile, static_routes
from appliance.admin.server import AdminRequest, Route
from appliance.discovery.base import Address, AddrState
from appliance.routing.delegate import DelegationError, delegate
from appliance.routing.dtab import Dtab, parse_dtab
from appliance.routing.nametree import Bound, show_tree
from appliance.routing.path import RoutingSyntaxError, parse_path, show_path
from appliance.telemetry.metrics import LATENCY_BUCKETS_MS, HttpStats, TcpStats, classify

if TYPE_CHECKING:
    from appliance.net.listener import Direction
    from appliance.proxy import Proxy

Answer = tuple[int, str, bytes]
JSON_TYPE = "application/json"
QUANTILES = (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99))


def answer(status: int, body: Any) -> Answer:
    return status, JSON_TYPE, (json.dumps(body, allow_nan=False) + "\n").encode()


def bad_request(parameter: str, message: str, position: int | None = None) -> Answer:
    body: dict[str, Any] = {"error": message, "parameter": parameter}
    if position is not None:
        body["position"] = position
    return answer(400, body)


def _num(value: float | None, digits: int = 3) -> float | None:
    """A JSON-safe rounded number (None for missing, NaN or infinite)."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


# ---------------------------------------------------------------------------- /api/stats


def http_counters(s: HttpStats) -> Counters:
    """``(requests, successes, failures, *latency bucket counts)`` of one series."""
    success = failure = 0
    for (status, _error, grpc_status), n in s.responses.items():
        if classify(status, grpc_status) == "success":
            success += n
        else:
            failure += n
    return (s.requests, success, failure, *s.buckets)


def tcp_counters(s: TcpStats) -> Counters:
    return (s.opened, s.closed, s.read_bytes, s.write_bytes)


def http_rates(delta: Delta) -> dict[str, float | None]:
    """Request rate, success rate and latency quantiles over one interval."""
    elapsed, (requests, success, failure, *buckets) = delta
    done = success + failure
    out: dict[str, float | None] = {
        "request_rate": _num(requests / elapsed) if elapsed > 0 else None,
        "success_rate": _num(success / done, 4) if done else None,
    }
    for name, q in QUANTILES:
        out[name] = _num(quantile(q, LATENCY_BUCKETS_MS, buckets))
    return out


def tcp_rates(delta: Delta) -> dict[str, float | None]:
    elapsed, (opened, _closed, read, write) = delta
    if elapsed <= 0:
        return {"open_rate": None, "read_rate": None, "write_rate": None}
    return {"open_rate": _num(opened / elapsed), "read_rate": _num(read / elapsed),
            "write_rate": _num(write / elapsed)}


def _status_classes(s: HttpStats) -> dict[str, int]:
    """Responses by status class (``2xx``...), and ``error`` for those the proxy failed."""
    out: dict[str, int] = {}
    for (status, error, _grpc), n in s.responses.items():
        key = "error" if error else f"{status // 100}xx"
        out[key] = out.get(key, 0) + n
    return dict(sorted(out.items()))


def _series_json(window: Window, key: Hashable, counters: Counters,
                 rates: Callable[[Delta], dict[str, float | None]]) -> dict[str, Any]:
    recent = window.recent(key, counters)
    out: dict[str, Any] = {"window": None}
    if recent is not None:
        out["window"] = {"seconds": _num(recent[0]), **rates(recent)}
    out["history"] = [{"age_s": _num(age), **rates(delta)}
                      for age, delta in window.history(key)]
    return out


def stats_json(proxy: Proxy, window: Window) -> dict[str, Any]:
    registry = proxy.registry
    http = registry.http_series()
    tcp = registry.tcp_series()
    current: dict[Hashable, Counters] = {("http", s.labels): http_counters(s) for s in http}
    current.update({("tcp", s.labels): tcp_counters(s) for s in tcp})
    window.update(current)
    http_out = []
    for s in http:
        counters = current[("http", s.labels)]
        http_out.append({
            "labels": dict(s.labels), "requests": s.requests,
            "responses": {"success": counters[1], "failure": counters[2]},
            "status": _status_classes(s),
            "latency": {"counts": list(s.buckets), "sum_ms": _num(s.latency_sum),
                        "count": s.latency_count},
            **_series_json(window, ("http", s.labels), counters, http_rates),
        })
    tcp_out = [{"labels": dict(s.labels), "open": s.opened - s.closed, "opened": s.opened,
                "closed": s.closed, "read_bytes": s.read_bytes, "write_bytes": s.write_bytes,
                **_series_json(window, ("tcp", s.labels), current[("tcp", s.labels)],
                               tcp_rates)}
               for s in tcp]
    return {
        "version": __version__, "instance_id": proxy.instance_id,
        "uptime_s": _num(time.time() - registry.start_time, 1),
        "window_s": window.span, "latency_bounds_ms": list(LATENCY_BUCKETS_MS),
        "http": http_out, "tcp": tcp_out,
    }


# ---------------------------------------------------------------------------- addresses


def show_key(key: object) -> str:
    """``host:port`` (``[v6]:port``) for a balancer key that is a (host, port) pair."""
    if isinstance(key, tuple) and len(key) == 2:
        host, port = key
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(key)


def address_json(a: Address) -> dict[str, Any]:
    return {"address": str(a), "weight": a.weight, "meta": dict(a.meta)}


def state_json(state: AddrState) -> dict[str, Any]:
    """A discovery state: ``kind`` (pending, bound, neg, failed), ``stale``, ``error`` and
    the addresses, sorted."""
    addrs = sorted(state.addrs, key=lambda a: (a.host, a.port))
    return {"kind": state.kind, "stale": state.stale, "error": state.error,
            "addresses": [address_json(a) for a in addrs]}


def routers(proxy: Proxy) -> Iterable[tuple[Direction, Any]]:
    """Each direction that routes, with its router as it is right now."""
    for d in proxy.directions:
        router = d.router
        if router is not None:
            yield d, router


# ---------------------------------------------------------------------------- /api/endpoints


def endpoint_json(ep: Any, now: float) -> dict[str, Any]:
    """One balancer endpoint: load, latency estimate and failure-accrual state."""
    acc = ep.accrual
    return {
        "address": show_key(ep.key), "weight": ep.weight, "pending": ep.pending,
        "ewma_ms": _num(ep.ewma.estimate(now) * 1000.0),
        "ewma_peak_ms": _num(ep.ewma.average * 1000.0),
        "state": acc.state, "ejections": acc.ejections,
        "probe_in_s": _num(max(acc.until - now, 0.0)) if acc.state == "ejected" else None,
        "meta": {str(k): str(v) for k, v in ep.meta.items()},
    }


def endpoints_json(proxy: Proxy) -> dict[str, Any]:
    services = []
    for d, router in routers(proxy):
        now = d.loop.time()
        for id, service in sorted(router.services.items()):
            balancer = service.balancer
            services.append({
                "direction": d.name, "id": show_path(id),
                "balancer": getattr(balancer, "kind", type(balancer).__name__),
                "discovery": state_json(service.state),
                "endpoints": [endpoint_json(ep, now) for ep in balancer.endpoints()],
            })
    return {"services": services}


# ---------------------------------------------------------------------------- /dtab


def describe(router: Any) -> Callable[[Bound], dict[str, Any]]:
    """What is known of a bound name's addresses, without starting a watch."""

    def addr(b: Bound) -> dict[str, Any]:
        service = router.services.get(b.id) if router is not None else None
        if service is not None:
            return {"watched": True, **state_json(service.state)}
        if len(b.id) == 4 and b.id[:2] == ("$", "inet"):
            host, port = b.id[2], b.id[3]
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            return {"watched": False, "kind": "bound", "stale": False, "error": "",
                    "addresses": [{"address": shown, "weight": 1.0, "meta": {}}]}
        return {"watched": False}

    return addr


def dtab_json(proxy: Proxy) -> dict[str, Any]:
    out = []
    for d in proxy.directions:
        router = d.router
        if router is None:
            out.append({"direction": d.name, "routing": False, "dtab": "", "dentries": [],
                        "namers": [], "bound": []})
            continue
        dtab: Dtab = router.dtab
        out.append({
            "direction": d.name, "routing": True, "dtab": dtab.show(),
            "dentries": [str(e) for e in dtab],
            "namers": [{"prefix": show_path(prefix), "kind": namer.kind,
                        "segments": namer.segments}
                       for prefix, namer in router.namers.items()],
            "bound": [{"id": show_path(id), **state_json(s.state)}
                      for id, s in sorted(router.services.items())],
        })
    return {"directions": out}


# ---------------------------------------------------------------------------- /delegate


def delegate_json(proxy: Proxy, query: dict[str, str]) -> Answer:
    """The delegation tree of ``path`` through the base dtab plus the ``dtab`` parameter."""
    text = query.get("path", "").strip()
    if not text:
        return bad_request("path", "missing query parameter 'path' (a name such as /svc/web)")
    name = query.get("direction", "outbound")
    found = [d for d in proxy.directions if d.name == name]
    if not found:
        return bad_request("direction", f"unknown direction {name!r} (expected one of "
                           + ", ".join(d.name for d in proxy.directions) + ")")
    try:
        path = parse_path(text)
    except RoutingSyntaxError as exc:
        return bad_request("path", f"invalid path: {exc}", exc.position)
    try:
        extra = parse_dtab(query.get("dtab", ""))
    except RoutingSyntaxError as exc:
        return bad_request("dtab", f"invalid dtab: {exc}", exc.position)
    router = found[0].router
    base: Dtab = router.dtab if router is not None else Dtab()
    segments = router.segments if router is not None else {}
    trace = delegate(base + extra, path, segments)
    try:
        result = show_tree(trace.to_tree())
    except DelegationError as exc:
        result = f"error: {exc}"
    return answer(200, {
        "path": show_path(path), "direction": name, "routing": router is not None,
        "dtab": base.show(), "override": extra.show(), "result": result,
        "tree": trace.to_dict(describe(router)),
    })


# ---------------------------------------------------------------------------- routes


def routes(proxy: Proxy, clock: Callable[[], float] = time.monotonic) -> dict[str, Route]:
    """The admin routes of the JSON APIs and the dashboard, for ``Proxy.start()``."""
    window = Window(clock)

    def json_route(build: Callable[[], Any]) -> Route:
        def route(req: AdminRequest) -> Answer:
            return answer(200, build())

        return route

    return {
        "/api/stats": json_route(lambda: stats_json(proxy, window)),
        "/api/endpoints": json_route(lambda: endpoints_json(proxy)),
        "/dtab": json_route(lambda: dtab_json(proxy)),
        "/delegate": lambda req: delegate_json(proxy, req.query),
        **static_routes(),
    }
