"""The per-request router: logical name -> concrete (bound) name -> endpoint.

Theory of operation, in linkerd's three stages:

1. **Logical.** An identifier turns the request into a logical name such as
   ``/svc/web:8080`` (:mod:`appliance.routing.identify`).
2. **Concrete.** The base dtab, plus the request's ``l5d-dtab`` override if overrides are
   allowed, delegates that name into a tree of bound names (:func:`bind`); the tree is
   cached per (name, override). Per request, :func:`choose` takes one branch: a weighted
   union is a traffic split, an alternation falls back to the next branch while a branch
   has no addresses.
3. **Endpoint.** Each bound name is a :class:`Service`: a discovery :class:`Watch` feeding
   a balancer. The balancer picks the endpoint; the data path reports back when the
   response ends (:meth:`Target.done`) so latency and failures reach the balancer and
   failure accrual.

A name that delegates to nothing goes to the connection's original destination (the
transparent default) unless ``routing.fallback`` is ``fail``. A service whose discovery has
not answered yet makes the request wait (at most ``routing.bind_timeout``): :meth:`route`
returns a :class:`Pending` and the data path awaits :meth:`Pending.wait`.

With no dtab configured the proxy has no router at all and pays nothing per request.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from appliance.discovery.base import PENDING, Address, AddrState, Namer, Watch, bound
from appliance.net.addr import OrigDst
from appliance.routing.delegate import DelegationError, FailedName, bind, choose
from appliance.routing.dtab import Dtab
from appliance.routing.identify import RequestView
from appliance.routing.nametree import Bound
from appliance.routing.path import Path, RoutingSyntaxError, show_path

_BIND_CACHE_MAX = 4096


class RouteError(Exception):
    """The request cannot be routed: answer ``status`` with ``l5d-proxy-error``."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind  # the proxy_errors_total label


class Target:
    """Where one request goes, and the handle to report its outcome."""

    __slots__ = ("dst", "service", "endpoint", "started", "name", "reported", "path")

    @property
    def service_name(self) -> str:
        """The bound name, for the ``dst_service`` metric label ("" when not routed)."""
        return show_path(self.service.id) if self.service is not None else ""

    def __init__(self, dst: OrigDst, service: Service | None, endpoint: Any, name: str,
                 started: float, path: Path | None = None) -> None:
        self.dst = dst
        self.service = service
        self.endpoint = endpoint
        self.name = name  # the logical name, for logs and headers
        self.started = started
        self.reported = False
        self.path = path  # the logical name as a path (None if the request had none)

    def done(self, ok: bool) -> None:
        """The response ended (``ok``: not a failure by the classifier); once per target."""
        if self.reported or self.service is None:
            return
        self.reported = True
        self.service.balancer.finish(self.endpoint, self.started, ok)

    def abandon(self) -> None:
        """The request was never sent to this endpoint (shed, or its deadline had passed):
        undo the balancer's start() without a latency sample or an outcome."""
        if self.reported or self.service is None:
            return
        self.reported = True
        self.service.balancer.abandon(self.endpoint, self.started)

    def again(self) -> Target | None:
        """A new endpoint of the same service for a retry (after :meth:`done` on this one),
        or None when every endpoint is ejected. Never the endpoint that just failed while
        another is alive."""
        service = self.service
        if service is None:
            return Target(self.dst, None, None, self.name, 0.0, self.path)
        balancer = service.balancer
        endpoint = balancer.pick_other(self.endpoint)
        if endpoint is None:
            return None
        host, port = endpoint.key
        return Target(OrigDst(host, port), service, endpoint, self.name,
                      balancer.start(endpoint), self.path)


class Pending:
    """Discovery has not answered yet for a service this request needs; once it has,
    :meth:`Router.again` routes the same request."""

    def __init__(self, service: Service, view: RequestView, override: Dtab | None,
                 override_text: str) -> None:
        self.service = service
        self.view = view
        self.override = override
        self.override_text = override_text

    async def wait(self, timeout: float) -> None:
        await asyncio.wait_for(asyncio.shield(self.service.ready()), timeout)


class Service:
    """One bound name: its discovery watch and its balancer."""

    def __init__(self, id: Path, watch: Watch, balancer: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.id = id
        self.balancer = balancer
        self.clock = clock
        self.budgets: dict[tuple[float, float, float], Any] = {}
        self.state: AddrState = PENDING
        self._ready: asyncio.Future[None] | None = None
        self.unsubscribe = watch.subscribe(self.update)

    def update(self, state: AddrState) -> None:
        self.state = state
        if state.kind == "bound":
            self.balancer.update({a.key: (a.weight, a.meta) for a in state.addrs})
        elif state.kind == "neg":
            self.balancer.update({})
        ready = self._ready
        if state.kind != "pending":
            if ready is not None and not ready.done():
                ready.set_result(None)
        elif ready is not None and ready.done():
            self._ready = None  # pending again: the next request waits anew

    def budget(self, policy: Any) -> Any:
        """The retry budget of this service (one per set of budget parameters, shared by
        every request that reaches it); ``policy`` is an appliance.resilience Policy."""
        budget = self.budgets.get(policy.budget_args)
        if budget is None:
            budget = self.budgets[policy.budget_args] = policy.new_budget(self.clock)
        return budget

    @property
    def pending(self) -> bool:
        return self.state.kind == "pending"

    @property
    def usable(self) -> bool:
        return self.state.kind == "bound" and bool(self.state.addrs)

    def ready(self) -> asyncio.Future[None]:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            if not self.pending:
                self._ready.set_result(None)
        return self._ready


class Router:
    """Routes requests of one direction; one per proxy direction that has a dtab."""

    def __init__(self, *, dtab: Dtab, identify: Callable[[RequestView], Path | None],
                 namers: Mapping[Path, Namer], make_balancer: Callable[[], Any],
                 allow_overrides: bool = True, fallback_orig_dst: bool = True,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.dtab = dtab
        self.identify = identify
        self.namers = dict(namers)
        self.segments = {prefix: namer.segments for prefix, namer in self.namers.items()}
        self.make_balancer = make_balancer
        self.allow_overrides = allow_overrides
        self.fallback_orig_dst = fallback_orig_dst
        self.rng = rng or random.Random()
        self.clock = clock
        self.services: dict[Path, Service] = {}
        self._bound: dict[tuple[Path, str], Any] = {}

    def route(self, view: RequestView, override: Dtab | None = None,
              override_text: str = "") -> Target | Pending:
        """Pick the endpoint for one request (raises :class:`RouteError`)."""
        try:
            path = self.identify(view)
        except RoutingSyntaxError as exc:  # a header identifier given a non-path
            raise RouteError(400, f"cannot name the request: {exc}", "bad_name") from None
        if path is None:
            return self.fallback(view, "no name for the request", None)
        tree = self.bind(path, override if self.allow_overrides else None, override_text)
        pending: list[Service] = []

        def usable(b: Bound) -> bool:
            service = self.service(b.id)
            if service.pending:
                pending.append(service)
            return service.usable

        try:
            chosen = choose(tree, self.rng, usable)
        except FailedName:
            raise RouteError(502, f"no route: {show_path(path)} delegates to a failure (!)",
                             "no_route") from None
        if chosen is None:
            if pending:
                return Pending(pending[0], view, override, override_text)
            return self.fallback(view, f"{show_path(path)} delegates to no usable name", path)
        return self.endpoint_target(chosen, path)

    def endpoint_target(self, chosen: Bound, path: Path) -> Target:
        """The endpoint the balancer of ``chosen``'s service picks for a request to the
        logical name ``path``; ``RouteError`` 503 when every endpoint is ejected."""
        service = self.services[chosen.id]
        endpoint = service.balancer.pick()
        if endpoint is None:
            raise RouteError(503, f"no endpoint available for {show_path(chosen.id)} "
                                  "(all ejected by failure accrual)", "unavailable")
        host, port = endpoint.key
        started = service.balancer.start(endpoint)
        return Target(OrigDst(host, port), service, endpoint, show_path(path), started, path)

    def again(self, pending: Pending) -> Target | Pending:
        return self.route(pending.view, pending.override, pending.override_text)

    def fallback(self, view: RequestView, why: str, path: Path | None = None) -> Target:
        if self.fallback_orig_dst and view.dst is not None:
            return Target(OrigDst(*view.dst), None, None, "", 0.0, path)
        raise RouteError(502, f"no route: {why}", "no_route")

    def bind(self, path: Path, override: Dtab | None, override_text: str) -> Any:
        key = (path, override_text if override is not None else "")
        tree = self._bound.get(key)
        if tree is None:
            dtab = self.dtab + override if override is not None else self.dtab
            try:
                tree = bind(dtab, path, self.segments)
            except DelegationError as exc:
                raise RouteError(502, f"no route: {exc}", "no_route") from None
            if len(self._bound) >= _BIND_CACHE_MAX:
                self._bound.clear()
            self._bound[key] = tree
        return tree

    def service(self, id: Path) -> Service:
        service = self.services.get(id)
        if service is None:
            service = self.services[id] = Service(id, self.watch(id), self.make_balancer(),
                                                  self.clock)
        return service

    def watch(self, id: Path) -> Watch:
        if len(id) == 4 and id[:2] == ("$", "inet"):
            try:
                return Watch(bound([Address(id[2], int(id[3]))]))
            except ValueError:
                return Watch(AddrState("neg"))
        for prefix, namer in self.namers.items():
            if id[:len(prefix)] == prefix:
                return namer.watch(id[len(prefix):])
        return Watch(AddrState("neg"))

    def close(self) -> None:
        for service in self.services.values():
            service.unsubscribe()
        self.services.clear()
        for namer in self.namers.values():
            namer.close()
