"""Load balancers over a changing set of endpoints: P2C peak-EWMA, P2C least-loaded, round robin.

Theory of operation: a balancer keeps one :class:`EndpointState` per endpoint key (weight,
in-flight count, peak-EWMA latency, failure accrual, discovery metadata). ``update()``
applies a new endpoint set from discovery and keeps the state of endpoints that stay, so
their latency history and ejections survive; a removed endpoint's in-flight requests finish
normally (``finish()`` on it only updates its own counters).

Per request the proxy calls ``ep = pick()``, then at once ``started = start(ep)``, and
``finish(ep, started, ok)`` exactly once when the request ends, whatever the outcome
(cancellation included). ``pick()`` returns None when every endpoint is ejected and none is
due for a probe: the proxy then fails fast (503) instead of queueing.

The balancer keeps two lists: ``live`` (alive endpoints, the only ones the policy chooses
from) and ``out`` (ejected or probing). ``next_due`` is the earliest time an ejected endpoint
may be probed. When that time has come, ``pick()`` hands out the probe first, whichever
policy is in use and even if other endpoints are alive, so a recovered endpoint comes back
one backoff after its ejection instead of whenever chance would pick it; the accrual allows
one probe at a time. Otherwise the policy's ``_choose()`` picks among ``live``.

P2C ("power of two choices") draws two distinct endpoints and keeps the one with the lower
cost divided by weight. With unequal weights the first draw is proportional to weight and
the second is another endpoint drawn the same way; ties go to the first draw, so when costs
tie (no load) traffic still follows the weights. Equal weights take a fast uniform path.

Failures weigh on latency: a request that ``finish()`` reports as failed is observed as
taking at least ``failure_penalty`` (2) times the endpoint's current average (at most 1 s,
:data:`PENALTY_CAP`, unless it took longer). Without this,
an endpoint that fails fast (503 at once, connection refused) looks like the fastest and
draws more traffic the more it fails; with it, each failure doubles its estimate, so a
replica failing half its requests soon gets a small share, and comes back as its estimate
decays. An endpoint that comes back from an ejection starts a fresh latency history.
``pick_other(avoid)`` is ``pick()`` for a retry: it never returns the endpoint that just
failed while another is alive.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Hashable, Mapping
from types import MappingProxyType
from typing import Any

from appliance.balance.accrual import ALIVE, EJECTED, PROBING, Accrual, ConsecutiveFailures
from appliance.balance.ewma import PeakEwma
from appliance.resilience.backoff import JitteredBackoff

__all__ = [
    "KINDS", "Balancer", "EndpointState", "P2CLeastLoaded", "P2CPeakEwma", "RoundRobin",
    "make_balancer",
]

Clock = Callable[[], float]
PENALTY_CAP = 1.0
"""Seconds: a failure's penalty never raises an endpoint's latency estimate beyond this
(its own measured time aside), so a burst of failures is forgotten within a minute."""
_NO_META: Mapping[str, Any] = MappingProxyType({})
_INF = math.inf


class EndpointState:
    """What the balancer knows about one endpoint."""

    __slots__ = ("key", "weight", "pending", "ewma", "accrual", "meta", "removed", "_rr")

    def __init__(self, key: Hashable, weight: float, meta: Mapping[str, Any],
                 ewma: PeakEwma, accrual: Accrual) -> None:
        self.key = key
        self.weight = weight
        self.pending = 0
        self.ewma = ewma
        self.accrual = accrual
        self.meta = meta
        self.removed = False
        """True once discovery dropped it; in-flight requests still finish normally."""
        self._rr = 0.0  # smooth round robin's running weight

    def __repr__(self) -> str:
        return (f"<EndpointState {self.key!r} w={self.weight} pending={self.pending} "
                f"{self.accrual.state}>")


def _check_entry(key: Hashable, value: object) -> tuple[float, Mapping[str, Any]]:
    if not isinstance(value, tuple) or len(value) != 2:
        raise ValueError(f"endpoint {key!r}: expected a (weight, meta) pair, got {value!r}")
    weight, meta = value
    if isinstance(weight, bool) or not isinstance(weight, int | float) \
            or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"endpoint {key!r}: weight must be a finite number > 0, got {weight!r}")
    if meta is None:
        meta = _NO_META
    elif not isinstance(meta, Mapping):
        raise ValueError(f"endpoint {key!r}: meta must be a mapping or None, got {meta!r}")
    return float(weight), meta


class Balancer:
    """The shared machinery; subclasses implement ``_choose(live)``."""

    kind = ""

    __slots__ = ("_clock", "_rng", "_new_accrual", "_decay", "_default_rtt", "_penalty",
                 "_eps", "_live",
                 "_out", "_next_due", "_cum", "_uniform")

    def __init__(self, clock: Clock, rng: random.Random, *,
                 accrual: Callable[[], Accrual] | None = None, decay: float = 10.0,
                 default_rtt: float = 0.030, failure_penalty: float = 2.0) -> None:
        if isinstance(failure_penalty, bool) or not isinstance(failure_penalty, int | float) \
                or not 0 <= failure_penalty < math.inf:
            raise ValueError("balancer failure_penalty must be a finite factor >= 0, got "
                             f"{failure_penalty!r}")
        self._penalty = float(failure_penalty)
        PeakEwma(clock, decay, default_rtt)  # validate once, here
        self._clock = clock
        self._rng = rng
        self._new_accrual = accrual or (
            lambda: ConsecutiveFailures(7, JitteredBackoff(1.0, 60.0, rng)))
        self._decay = decay
        self._default_rtt = default_rtt
        self._eps: dict[Hashable, EndpointState] = {}
        self._live: list[EndpointState] = []
        self._out: list[EndpointState] = []
        self._next_due = _INF
        self._cum: list[float] = []
        self._uniform = True

    # Discovery.

    def update(self, endpoints: Mapping[Hashable, tuple[float, Mapping[str, Any] | None]]) -> None:
        """Replace the endpoint set: ``{key: (weight, meta)}``. Validates before changing."""
        checked = {key: _check_entry(key, value) for key, value in endpoints.items()}
        for key, ep in list(self._eps.items()):
            if key not in checked:
                ep.removed = True
                del self._eps[key]
        for key, (weight, meta) in checked.items():
            old = self._eps.get(key)
            if old is None:
                self._eps[key] = EndpointState(
                    key, weight, meta, PeakEwma(self._clock, self._decay, self._default_rtt),
                    self._new_accrual())
            else:
                old.weight = weight
                old.meta = meta
        self._regroup()

    def endpoints(self) -> list[EndpointState]:
        """Every current endpoint, in discovery order (for metrics and the admin API)."""
        return list(self._eps.values())

    def __len__(self) -> int:
        return len(self._eps)

    # Per request.

    def pick(self) -> EndpointState | None:
        """The endpoint for the next request, or None when all are ejected."""
        due = self._next_due
        if due != _INF and due <= self._clock():
            ep = self._claim_probe()
            if ep is not None:
                return ep
        live = self._live
        if not live:
            return None
        if len(live) == 1:
            return live[0]
        return self._choose(live)

    def pick_other(self, avoid: EndpointState | None) -> EndpointState | None:
        """``pick()`` for a retry: not ``avoid`` (the endpoint that just failed) while
        another is alive; then P2C over peak-EWMA among the others."""
        ep = self.pick()
        if ep is not avoid or ep is None:
            return ep
        others = [e for e in self._live if e is not avoid]
        if len(others) <= 1:
            return others[0] if others else ep
        a, b = self._rng.sample(others, 2)
        now = self._clock()
        if a.ewma.cost(a.pending, now) / a.weight <= b.ewma.cost(b.pending, now) / b.weight:
            return a
        return b

    def start(self, ep: EndpointState) -> float:
        """A request to ``ep`` begins; returns its start time for ``finish()``."""
        ep.pending += 1
        return self._clock()

    def finish(self, ep: EndpointState, started: float, ok: bool) -> None:
        """The request begun at ``started`` ended; ``ok`` is the classifier's verdict."""
        now = self._clock()
        if ep.pending > 0:
            ep.pending -= 1
        rtt = now - started
        if rtt < 0.0:
            rtt = 0.0
        if not ok and self._penalty:
            floor = ep.ewma.average * self._penalty
            if rtt < floor:
                rtt = floor if floor < PENALTY_CAP else max(rtt, PENALTY_CAP)
        ep.ewma.observe(rtt, now)
        acc = ep.accrual
        before = acc.state
        acc.record(ok, started, now)
        if acc.state is not before and not ep.removed:
            if acc.state is ALIVE:  # back from an ejection: its latency history starts anew
                ep.ewma = PeakEwma(self._clock, self._decay, self._default_rtt)
                ep.ewma.observe(now - started if now > started else 0.0, now)
            self._moved(ep, before)

    def abandon(self, ep: EndpointState, started: float) -> None:
        """A request begun with ``start()`` was never sent: undo ``start()``. Nothing is
        observed; a probe handed out for it is due again at once."""
        if ep.pending > 0:
            ep.pending -= 1
        acc = ep.accrual
        if acc.state is PROBING and started >= acc.probe_since and not ep.removed:
            acc.state = EJECTED
            acc.until = started
            self._next_due = self._earliest_due()

    # Policy.

    def _choose(self, live: list[EndpointState]) -> EndpointState:
        raise NotImplementedError

    def _two(self, live: list[EndpointState]) -> tuple[EndpointState, EndpointState]:
        """Two distinct endpoints: uniform, or (unequal weights) proportional to weight."""
        n = len(live)
        rnd = self._rng.random
        if self._uniform:
            i = int(rnd() * n)
            j = int(rnd() * (n - 1))
            if j >= i:
                j += 1
            return live[i], live[j]
        i = self._weighted()
        if n == 2:
            return live[i], live[1 - i]
        for _ in range(4):
            j = self._weighted()
            if j != i:
                return live[i], live[j]
        j = int(rnd() * (n - 1))
        return live[i], live[j + 1 if j >= i else j]

    def _weighted(self) -> int:
        cum = self._cum
        i = bisect.bisect_right(cum, self._rng.random() * cum[-1])
        return i if i < len(cum) else len(cum) - 1

    # State bookkeeping (rare: discovery changes, ejections, recoveries).

    def _claim_probe(self) -> EndpointState | None:
        now = self._clock()
        for ep in self._out:
            if ep.accrual.due(now):
                ep.accrual.claim_probe(now)
                self._next_due = self._earliest_due()
                return ep
        self._next_due = self._earliest_due()
        return None

    def _moved(self, ep: EndpointState, before: str) -> None:
        if before is ALIVE:
            self._live.remove(ep)
            self._out.append(ep)
            self._reweigh()
        elif ep.accrual.state is ALIVE:
            self._out.remove(ep)
            self._live.append(ep)
            self._reweigh()
        self._next_due = self._earliest_due()

    def _regroup(self) -> None:
        eps = self._eps.values()
        self._live = [ep for ep in eps if ep.accrual.state is ALIVE]
        self._out = [ep for ep in eps if ep.accrual.state is not ALIVE]
        self._next_due = self._earliest_due()
        self._reweigh()

    def _earliest_due(self) -> float:
        due = [ep.accrual.until for ep in self._out if ep.accrual.state is EJECTED]
        return min(due) if due else _INF

    def _reweigh(self) -> None:
        live = self._live
        self._uniform = len({ep.weight for ep in live}) <= 1
        self._cum = list(_accumulate(ep.weight for ep in live))
        for ep in live:
            ep._rr = 0.0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} live={len(self._live)} out={len(self._out)}>"


def _accumulate(weights: Any) -> Any:
    total = 0.0
    for w in weights:
        total += w
        yield total


class P2CPeakEwma(Balancer):
    """Power of two choices over peak-EWMA cost / weight (linkerd2's; linkerd 1's ``ewma``)."""

    kind = "p2c_peak_ewma"
    __slots__ = ()

    def _choose(self, live: list[EndpointState]) -> EndpointState:
        a, b = self._two(live)
        now = self._clock()
        if a.ewma.cost(a.pending, now) / a.weight <= b.ewma.cost(b.pending, now) / b.weight:
            return a
        return b


class P2CLeastLoaded(Balancer):
    """Power of two choices over in-flight requests / weight (linkerd's ``p2c``)."""

    kind = "p2c_least_loaded"
    __slots__ = ()

    def _choose(self, live: list[EndpointState]) -> EndpointState:
        a, b = self._two(live)
        return a if a.pending / a.weight <= b.pending / b.weight else b


class RoundRobin(Balancer):
    """Smooth weighted round robin (nginx's): exact proportions, evenly interleaved."""

    kind = "round_robin"
    __slots__ = ("_next",)

    def __init__(self, clock: Clock, rng: random.Random, **opts: Any) -> None:
        super().__init__(clock, rng, **opts)
        self._next = 0

    def _choose(self, live: list[EndpointState]) -> EndpointState:
        if self._uniform:
            i = self._next % len(live)
            self._next = i + 1
            return live[i]
        total = self._cum[-1]
        best = live[0]
        for ep in live:
            ep._rr += ep.weight
            if ep._rr > best._rr:
                best = ep
        best._rr -= total
        return best


KINDS: dict[str, type[Balancer]] = {
    "p2c_peak_ewma": P2CPeakEwma,
    "p2c_least_loaded": P2CLeastLoaded,
    "round_robin": RoundRobin,
}
_ALIASES = {"ewma": "p2c_peak_ewma", "p2c": "p2c_least_loaded"}
_OPTS = ("accrual", "decay", "default_rtt", "failure_penalty")


def make_balancer(kind: str, clock: Clock, rng: random.Random, **opts: Any) -> Balancer:
    """A balancer by name: ``p2c_peak_ewma`` (default in config), ``p2c_least_loaded`` or
    ``round_robin`` (linkerd's ``ewma`` and ``p2c`` are accepted as aliases).

    Options: ``accrual`` (a factory of one :class:`Accrual` per endpoint, see
    :func:`~appliance.balance.accrual.accrual_factory`), ``decay`` and ``default_rtt``
    (seconds, for the peak-EWMA every balancer keeps per endpoint).
    """
    cls = KINDS.get(_ALIASES.get(kind, kind))
    if cls is None:
        raise ValueError(f"unknown balancer kind {kind!r}; expected one of "
                         + ", ".join(sorted(KINDS)))
    unknown = sorted(set(opts) - set(_OPTS))
    if unknown:
        raise ValueError(f"balancer {kind!r} does not take {', '.join(unknown)}; "
                         f"options: {', '.join(_OPTS)}")
    return cls(clock, rng, **opts)
