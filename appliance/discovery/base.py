"""What every namer (service-discovery source) shares: addresses, their state, and watches.

Theory of operation: a namer turns a service name (a tuple of path segments, such as
``("users",)`` for the files namer or ``("default", "http", "web")`` for Kubernetes) into a
:class:`Watch` of :class:`AddrState`. The watch holds the current state and pushes every
change to its subscribers; the router and the balancers subscribe and never poll. A namer
starts its source (a file watch, a DNS refresh loop, a Consul blocking query, a Kubernetes
watch) when a name is first watched, and keeps one source per name however many subscribe.

States: ``pending`` (nothing known yet), ``bound`` (a set of addresses, possibly empty),
``neg`` (the source says the name does not exist) and ``failed`` (the source cannot be
reached). A source that fails after it had a good answer keeps that answer: the state stays
``bound`` with the last good set and ``stale=True``, so an outage of discovery never takes
traffic down; the outage is a metric and a log line (see each namer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

Name = tuple[str, ...]
_NO_META: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Address:
    """One endpoint of a service, with what discovery knows about it."""

    host: str
    port: int
    weight: float = 1.0
    meta: Mapping[str, str] = field(default_factory=lambda: _NO_META, compare=True,
                                    hash=False)
    """Free-form metadata: ``zone``, ``identity`` (the meshed SPIFFE ID), ``protocol``..."""

    @property
    def key(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


Kind = Literal["pending", "bound", "neg", "failed"]


@dataclass(frozen=True, slots=True)
class AddrState:
    kind: Kind
    addrs: frozenset[Address] = frozenset()
    stale: bool = False
    """True while the source is unreachable and ``addrs`` is the last good set."""
    error: str = ""


PENDING = AddrState("pending")
NEG = AddrState("neg")


def bound(addrs: frozenset[Address] | set[Address] | list[Address]) -> AddrState:
    return AddrState("bound", frozenset(addrs))


class Watch:
    """The current :class:`AddrState` of one name, pushed to subscribers on every change."""

    def __init__(self, state: AddrState = PENDING) -> None:
        self.state = state
        self._subscribers: list[Callable[[AddrState], None]] = []

    def subscribe(self, callback: Callable[[AddrState], None]) -> Callable[[], None]:
        """Call ``callback`` now with the current state and on every change; returns the
        function that unsubscribes."""
        self._subscribers.append(callback)
        callback(self.state)

        def cancel() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return cancel

    def set(self, state: AddrState) -> None:
        if state == self.state:
            return
        self.state = state
        for callback in list(self._subscribers):
            callback(state)

    def fail(self, error: str) -> None:
        """The source is unreachable: keep the last good set if there is one."""
        if self.state.kind == "bound":
            self.set(AddrState("bound", self.state.addrs, stale=True, error=error))
        else:
            self.set(AddrState("failed", error=error))


class Namer:
    """A discovery source. ``segments`` is how many path segments name one service (the
    router binds ``/#/<prefix>/<first segments>`` to :meth:`watch` and keeps the rest as
    the residual)."""

    kind = "namer"
    segments = 1

    def watch(self, name: Name) -> Watch:
        raise NotImplementedError

    def close(self) -> None:
        """Stop every source this namer started."""


@dataclass(frozen=True, kw_only=True)
class NamerContext:
    """What a namer gets from the proxy: where to run its sources and where to report.

    ``spawn`` starts a coroutine as a task the proxy keeps referenced and cancels at
    shutdown; ``report(namer, name, ok, error)`` is called on each success or failure of a
    source (the proxy turns it into the ``discovery_*`` metrics and one log line per
    outage); ``clock`` is monotonic seconds."""

    spawn: Callable[[Any], Any]
    report: Callable[[str, Name, bool, str], None] = lambda namer, name, ok, error: None
    clock: Callable[[], float] = time.monotonic
