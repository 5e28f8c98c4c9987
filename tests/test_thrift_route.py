"""Routing one Thrift call by name (``route_name``) against a real Router, with a fake
clock and a namer the test answers for; and the logical names calls get."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.balance.accrual import accrual_factory
from appliance.balance.balancer import make_balancer
from appliance.discovery.base import Address, Namer, Watch, bound
from appliance.net.addr import OrigDst
from appliance.net.thrift_upstream import ThriftShared, route_name
from appliance.routing.dtab import parse_dtab
from appliance.routing.identify import by_dst
from appliance.routing.router import RouteError, Router, Service, Target

DST = OrigDst("10.1.2.3", 9090)
NAME = ("svc", "10.1.2.3:9090")


class HeldNamer(Namer):
    """A namer whose names stay pending until the test sets them."""

    def __init__(self) -> None:
        self.watches: dict[tuple[str, ...], Watch] = {}

    def watch(self, name: Any) -> Watch:
        return self.watches.setdefault(tuple(name), Watch())


def router(dtab: str, *, fallback: bool = True, failures: int = 3,
           namer: Namer | None = None) -> Router:
    rng = random.Random(7)
    now = [0.0]
    accrual = accrual_factory("consecutive_failures", rng, n=failures)
    return Router(dtab=parse_dtab(dtab), identify=by_dst(),
                  namers={("#", "held"): namer or HeldNamer()},
                  make_balancer=lambda: make_balancer("round_robin", lambda: now[0], rng,
                                                      accrual=accrual),
                  fallback_orig_dst=fallback, rng=rng, clock=lambda: now[0])


def test_a_dentry_sends_the_call_to_its_address() -> None:
    """/svc/<dst> => /$/inet/...: the Target names that endpoint."""
    r = router("/svc/10.1.2.3:9090 => /$/inet/127.0.0.1/4000")
    target = route_name(r, NAME, DST)
    assert isinstance(target, Target) and target.dst == OrigDst("127.0.0.1", 4000)
    assert target.name == "/svc/10.1.2.3:9090"


def test_a_method_segment_is_carried_as_the_residual() -> None:
    """With the method appended, the service's dentry still matches (residual /ping)."""
    r = router("/svc/10.1.2.3:9090 => /$/inet/127.0.0.1/4000")
    target = route_name(r, NAME + ("ping",), DST)
    assert isinstance(target, Target) and target.dst == OrigDst("127.0.0.1", 4000)


def test_no_dentry_falls_back_to_the_original_destination() -> None:
    """A name nothing matches goes where the app was connecting."""
    target = route_name(router("/svc/other => /$/inet/127.0.0.1/1"), NAME, DST)
    assert isinstance(target, Target) and target.dst == DST and target.service is None


def test_no_dentry_with_fallback_fail_is_a_502() -> None:
    """routing.fallback=fail: no route, named."""
    with pytest.raises(RouteError) as caught:
        route_name(router("/svc/other => /$/inet/127.0.0.1/1", fallback=False), NAME, DST)
    assert caught.value.status == 502 and caught.value.kind == "no_route"
    assert "/svc/10.1.2.3:9090" in str(caught.value)


def test_a_failing_dtab_branch_is_a_502() -> None:
    """/$/fail: the dtab says fail this call."""
    with pytest.raises(RouteError) as caught:
        route_name(router("/svc/10.1.2.3:9090 => !"), NAME, DST)
    assert caught.value.status == 502 and caught.value.kind == "no_route"


def test_pending_discovery_returns_the_service_then_routes() -> None:
    """The namer has not answered: the Service to wait for; once it has, a Target."""
    namer = HeldNamer()
    r = router("/svc/10.1.2.3:9090 => /#/held/echo", namer=namer)
    waiting = route_name(r, NAME, DST)
    assert isinstance(waiting, Service) and waiting.pending
    namer.watches[("echo",)].set(bound([Address("127.0.0.1", 4001)]))
    target = route_name(r, NAME, DST)
    assert isinstance(target, Target) and target.dst == OrigDst("127.0.0.1", 4001)


def test_calls_are_balanced_and_failures_eject() -> None:
    """Round robin over two endpoints; three failures in a row eject one; all ejected is
    a 503 naming the service."""
    namer = HeldNamer()
    r = router("/svc/10.1.2.3:9090 => /#/held/echo", namer=namer)
    route_name(r, NAME, DST)
    namer.watches[("echo",)].set(bound([Address("127.0.0.1", 1), Address("127.0.0.1", 2)]))
    picks = []
    for _ in range(4):
        target = route_name(r, NAME, DST)
        assert isinstance(target, Target)
        picks.append(target.dst.port)
        target.done(True)
    assert sorted(picks) == [1, 1, 2, 2]
    for _ in range(6):  # every call fails: both endpoints reach 3 in a row
        target = route_name(r, NAME, DST)
        assert isinstance(target, Target)
        target.done(False)
    with pytest.raises(RouteError) as caught:
        route_name(r, NAME, DST)
    assert caught.value.status == 503 and "/#/held/echo" in str(caught.value)


@pytest.mark.parametrize("method_in_dst,prefix,dst,name", [
    (False, "/svc", OrigDst("10.1.2.3", 9090), ("svc", "10.1.2.3:9090")),
    (True, "/svc", OrigDst("10.1.2.3", 9090), ("svc", "10.1.2.3:9090", "getUser")),
    (True, "/thrift", OrigDst("fd00::1", 9090), ("thrift", "fd00::1:9090", "getUser")),
])
def test_logical_names(method_in_dst: bool, prefix: str, dst: OrigDst,
                       name: tuple[str, ...]) -> None:
    """<prefix>/<ip>:<port>, plus the method with method_in_dst (IPv6 unbracketed, as the
    dst identifier writes it)."""
    shared = SimpleNamespace(prefix=tuple(s for s in prefix.split("/") if s),
                             method_in_dst=method_in_dst)
    assert ThriftShared.logical_name(shared, dst, "getUser") == name  # type: ignore[arg-type]
