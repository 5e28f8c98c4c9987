"""The ClusterIP namer (``kind: io.l5d.k8s.clusterip``): the address an app dialled, to the
endpoints of the Kubernetes Service that owns it.

Theory of operation: the first watched name starts the Services sources (one list+watch
of ``/api/v1/services``, or one per configured namespace); every change of any of them
rebuilds the :class:`~appliance.discovery.k8s_clusterip.ServiceIndex` and re-resolves
every watched address. An address that maps to a Service port subscribes to that
service's EndpointSlice source (one per service, started on first use and stopped when no
watched address maps to the service any more); its changes re-compute the addresses that
use it. Each name's state is computed from scratch from the index and the slices
(:func:`~appliance.discovery.k8s_clusterip.resolve`, ``target_state``), then degraded by
whichever of its sources is failing (the last good set, stale), and pushed only when it
differs. A name never goes back to ``pending``: when an address starts to map to a service
whose slices are not listed yet, it keeps its last state (``neg``: requests still go to
the original destination) for the moment that list takes; the router only waits for
discovery the first time. The loops are :func:`appliance.net.namer_k8s.list_watch`, the same as the
``io.l5d.k8s`` namer's, with the same authentication.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from appliance.discovery.base import PENDING, AddrState, Name, Namer, NamerContext, Watch
from appliance.discovery.k8s import SliceWatch
from appliance.discovery.k8s_clusterip import (
    KIND,
    ClusterIPOptions,
    ServiceIndex,
    ServiceWatch,
    Target,
    degrade,
    parse_name,
    resolve,
    target_state,
)
from appliance.discovery.k8s_listwatch import Changed, ListWatch, Outcome
from appliance.discovery.registry import register
from appliance.discovery.remote import Backoff, Failure
from appliance.net.namer_k8s import ApiClient, list_watch
from appliance.net.namer_loop import cancel_all

Key = tuple[str, int]


class _Source:
    """One list+watch loop, its task, its last error, and (for slices) the addresses that
    map to its service."""

    def __init__(self, machine: ListWatch[Any]) -> None:
        self.machine = machine
        self.error = ""
        self.names: set[Key] = set()
        self.task: Any = None


class _Entry:
    """One watched address: its name, its watch, and the Service port it maps to."""

    def __init__(self, name: Name) -> None:
        self.name = name
        self.watch = Watch()
        self.target: Target | None = None


class ClusterIPNamer(Namer):
    """``/#/io.l5d.k8s.clusterip/<ip>:<port>``: the ready endpoints of the Service port
    with that ClusterIP and port; ``neg`` when no Service has it."""

    kind = KIND
    segments = 1

    def __init__(self, opts: ClusterIPOptions, ctx: NamerContext,
                 rng: random.Random | None = None, env: Mapping[str, str] | None = None) -> None:
        self.opts = opts
        self.ctx = ctx
        self.rng = rng or random.Random()
        self.api = ApiClient(opts, env)
        self.index: ServiceIndex | None = None
        self._services: list[_Source] = []
        self._slices: dict[tuple[str, str], _Source] = {}
        self._entries: dict[Key, _Entry] = {}
        self._invalid: dict[Name, Watch] = {}
        self._tasks: list[Any] = []

    @classmethod
    def from_options(cls, options: Mapping[str, Any], ctx: NamerContext) -> ClusterIPNamer:
        return cls(ClusterIPOptions.from_mapping(options), ctx)

    def watch(self, name: Name) -> Watch:
        try:
            key = parse_name(name)
        except ValueError as exc:
            if name not in self._invalid:
                self._invalid[name] = Watch(AddrState("neg", error=str(exc)))
            return self._invalid[name]
        self._start_services()
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(name)
            self._refresh(key, entry)
        return entry.watch

    def close(self) -> None:
        cancel_all(self._tasks)
        self._slices.clear()

    @property
    def slice_sources(self) -> int:
        """EndpointSlice sources running now (one per service in use)."""
        return len(self._slices)

    # -- sources ------------------------------------------------------------------------

    def _backoff(self) -> Backoff:
        return Backoff(self.opts.backoff_base, self.opts.backoff_max, self.rng)

    def _spawn(self, source: _Source, what: str, label: Name) -> None:
        def publish(outcome: Outcome) -> None:
            self._on_outcome(source, label, outcome)
        source.task = self.ctx.spawn(list_watch(self.api, source.machine, self.opts,
                                                self.ctx.clock, publish, f"{KIND} {what}"))
        self._tasks.append(source.task)

    def _start_services(self) -> None:
        if self._services:
            return
        for namespace in self.opts.namespaces or (None,):
            source = _Source(ServiceWatch(namespace, self.opts, self._backoff()))
            self._services.append(source)
            where = f"namespace {namespace}" if namespace else "all namespaces"
            self._spawn(source, f"services in {where}", ("services", namespace or "*"))

    def _attach(self, key: Key, target: Target) -> None:
        skey = (target.namespace, target.service)
        source = self._slices.get(skey)
        if source is None:
            source = self._slices[skey] = _Source(
                SliceWatch(target.namespace, target.service, self.opts, self._backoff()))
            self._spawn(source, f"endpointslices of {'/'.join(skey)}", skey)
        source.names.add(key)

    def _detach(self, key: Key, target: Target) -> None:
        skey = (target.namespace, target.service)
        source = self._slices.get(skey)
        if source is None:
            return
        source.names.discard(key)
        if not source.names:
            del self._slices[skey]
            if source.task in self._tasks:
                self._tasks.remove(source.task)
            cancel_all([source.task])

    # -- outcomes -----------------------------------------------------------------------

    def _on_outcome(self, source: _Source, label: Name, outcome: Outcome) -> None:
        if outcome is None:
            return
        if isinstance(outcome, Failure):
            source.error = outcome.error
            self.ctx.report(KIND, label, False, outcome.error)
        else:
            self.ctx.report(KIND, label, True, "")
        if source in self._services:
            if isinstance(outcome, Changed):
                self._rebuild_index()
            keys = list(self._entries)
        else:
            keys = list(source.names)
        for key in keys:
            self._refresh(key, self._entries[key])

    def _rebuild_index(self) -> None:
        machines = [s.machine for s in self._services]
        if all(m.rv is not None for m in machines):
            self.index = ServiceIndex(svc for m in machines for svc in m.items.values())

    def _refresh(self, key: Key, entry: _Entry) -> None:
        """Compute the state of one address from scratch and push it if it changed."""
        resolved = resolve(self.index, *key)
        target = resolved if isinstance(resolved, Target) else None
        if _service_of(target) != _service_of(entry.target):
            if target is not None:
                self._attach(key, target)
            if entry.target is not None:
                self._detach(key, entry.target)
        entry.target = target
        state = resolved if isinstance(resolved, AddrState) else self._target_state(resolved)
        for source in self._services:
            if source.machine.failing:
                state = degrade(state, source.error)
        if state.kind == "pending" and entry.watch.state.kind != "pending":
            return  # a new slice source is listing: keep the last answer until it has
        entry.watch.set(state)

    def _target_state(self, target: Target) -> AddrState:
        source = self._slices[(target.namespace, target.service)]
        if source.machine.rv is None:
            state = PENDING
        else:
            state = target_state(target, source.machine.items)
        return degrade(state, source.error) if source.machine.failing else state


def _service_of(target: Target | None) -> tuple[str, str] | None:
    return (target.namespace, target.service) if target is not None else None


register(KIND, ClusterIPNamer.from_options)
