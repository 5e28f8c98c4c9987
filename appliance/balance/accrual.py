"""Failure accrual: take an endpoint out of rotation while it keeps failing.

Theory of operation: each endpoint of a balancer owns one accrual object. It is fed the
outcome of every request (``record(ok, started, now)``) and is in one of three states:

    alive --(policy trips)--> ejected(until) --(now >= until, picked)--> probing
    probing --(the probe succeeds)--> alive          (backoff and policy counters reset,
                                                      then the probe's success counted)
    probing --(the probe fails)--> ejected(until')   (until' from the next, longer backoff)

A *policy* decides when an alive endpoint trips: :class:`ConsecutiveFailures` after ``n``
failures in a row, :class:`SuccessRate` when the success rate over a sliding time window
falls below a floor. :class:`NoAccrual` never trips. How long an ejection lasts comes from a
:class:`~appliance.resilience.backoff.JitteredBackoff` (1 s doubling to 60 s by default).

While probing, exactly one request is allowed: the balancer claims the probe with
:meth:`Accrual.claim_probe` when it hands the endpoint out, and skips the endpoint until
that request's outcome is recorded. Outcomes of requests that started before the ejection
(or before the probe) finish normally but change nothing: while ejected or probing, only the
probe's own outcome counts, told apart by its start time.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from appliance.resilience.backoff import JitteredBackoff

__all__ = [
    "ALIVE", "EJECTED", "PROBING", "Accrual", "ConsecutiveFailures", "NoAccrual",
    "SuccessRate", "accrual_factory",
]

ALIVE = "alive"
EJECTED = "ejected"
PROBING = "probing"


class Accrual:
    """The alive/ejected/probing state machine; subclasses supply the policy."""

    __slots__ = ("state", "until", "probe_since", "ejections", "_backoff")

    def __init__(self, backoff: JitteredBackoff | None = None) -> None:
        self.state = ALIVE
        self.until = 0.0
        """While ejected: the monotonic time from which a probe may be sent."""
        self.probe_since = 0.0
        self.ejections = 0
        """How many times this endpoint has been ejected (probe failures included)."""
        self._backoff = backoff if backoff is not None else JitteredBackoff()

    def due(self, now: float) -> bool:
        """True when the endpoint is ejected and its backoff has run out."""
        return self.state is EJECTED and now >= self.until

    def claim_probe(self, now: float) -> None:
        """The balancer hands out the probe request: allow no other until it is recorded."""
        if self.state is not EJECTED:
            raise RuntimeError(f"claim_probe() in state {self.state!r}, expected 'ejected'")
        self.state = PROBING
        self.probe_since = now

    def record(self, ok: bool, started: float, now: float) -> None:
        """One request that started at ``started`` finished at ``now``."""
        state = self.state
        if state is ALIVE:
            if self._trips(ok, now):
                self._eject(now)
        elif state is PROBING and started >= self.probe_since:
            if ok:
                self.state = ALIVE
                self._backoff.reset()
                self._revive(now)
                self._trips(True, now)  # the probe is the first outcome of the new life
            else:
                self._eject(now)

    def _eject(self, now: float) -> None:
        self.state = EJECTED
        self.until = now + self._backoff.next()
        self.ejections += 1

    # The policy: subclasses override these two.

    def _trips(self, ok: bool, now: float) -> bool:
        """Record one outcome while alive; True to eject."""
        return False

    def _revive(self, now: float) -> None:
        """The endpoint came back: forget what made it trip."""

    def __repr__(self) -> str:
        extra = f" until={self.until:.3f}" if self.state is EJECTED else ""
        return f"<{type(self).__name__} {self.state}{extra} ejections={self.ejections}>"


class NoAccrual(Accrual):
    """Never eject (linkerd's ``none``)."""

    __slots__ = ()


class ConsecutiveFailures(Accrual):
    """Eject after ``n`` failures in a row."""

    __slots__ = ("n", "failures")

    def __init__(self, n: int = 7, backoff: JitteredBackoff | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"consecutive failures n must be an integer >= 1, got {n!r}")
        super().__init__(backoff)
        self.n = n
        self.failures = 0

    def _trips(self, ok: bool, now: float) -> bool:
        if ok:
            self.failures = 0
            return False
        self.failures += 1
        return self.failures >= self.n

    def _revive(self, now: float) -> None:
        self.failures = 0


class SuccessRate(Accrual):
    """Eject when, over the last ``window`` seconds, at least ``min_requests`` requests
    finished and fewer than ``min_rate`` of them succeeded.

    The window is a ring of ``buckets`` time slices, so it covers between
    ``window * (1 - 1/buckets)`` and ``window`` seconds. It is emptied when the endpoint
    comes back from an ejection, so old failures cannot trip it again at once.
    """

    __slots__ = ("min_rate", "window", "min_requests", "_width", "_ok", "_fail", "_cur",
                 "_n_ok", "_n_fail")

    def __init__(self, min_rate: float = 0.8, window: float = 30.0, min_requests: int = 10,
                 backoff: JitteredBackoff | None = None, *, buckets: int = 10) -> None:
        _check_success_rate_args(min_rate, window, min_requests, buckets)
        super().__init__(backoff)
        self.min_rate = float(min_rate)
        self.window = float(window)
        self.min_requests = min_requests
        self._width = self.window / buckets
        self._ok = [0] * buckets
        self._fail = [0] * buckets
        self._cur = -1
        self._n_ok = 0
        self._n_fail = 0

    def rate(self, now: float) -> float | None:
        """The success rate over the window, or None when it saw no request."""
        self._advance(now)
        total = self._n_ok + self._n_fail
        return self._n_ok / total if total else None

    def _trips(self, ok: bool, now: float) -> bool:
        self._advance(now)
        i = self._cur % len(self._ok)
        if ok:
            self._ok[i] += 1
            self._n_ok += 1
            return False
        self._fail[i] += 1
        self._n_fail += 1
        total = self._n_ok + self._n_fail
        return total >= self.min_requests and self._n_ok < self.min_rate * total

    def _advance(self, now: float) -> None:
        idx = int(now // self._width)
        cur = self._cur
        if idx <= cur:
            return  # same slice, or the clock stepped back: count in the current slice
        n = len(self._ok)
        for k in range(max(cur + 1, idx - n + 1), idx + 1):
            j = k % n
            self._n_ok -= self._ok[j]
            self._n_fail -= self._fail[j]
            self._ok[j] = 0
            self._fail[j] = 0
        self._cur = idx

    def _revive(self, now: float) -> None:
        for i in range(len(self._ok)):
            self._ok[i] = 0
            self._fail[i] = 0
        self._n_ok = 0
        self._n_fail = 0


def _check_success_rate_args(min_rate: float, window: float, min_requests: int,
                             buckets: int) -> None:
    if isinstance(min_rate, bool) or not isinstance(min_rate, int | float) \
            or not 0.0 < min_rate <= 1.0:
        raise ValueError(f"success rate min_rate must be in (0, 1], got {min_rate!r}")
    if isinstance(window, bool) or not isinstance(window, int | float) \
            or not math.isfinite(window) or window <= 0:
        raise ValueError(f"success rate window must be a number of seconds > 0, got {window!r}")
    if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 1:
        raise ValueError(
            f"success rate min_requests must be an integer >= 1, got {min_requests!r}")
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"success rate buckets must be an integer >= 1, got {buckets!r}")


_KINDS = {
    "consecutive_failures": "consecutive_failures",
    "io.l5d.consecutiveFailures": "consecutive_failures",
    "success_rate": "success_rate",
    "io.l5d.successRateWindowed": "success_rate",
    "none": "none",
}
_BACKOFF_OPTS = ("backoff_base", "backoff_cap")
_POLICY_OPTS = {
    "consecutive_failures": ("n",),
    "success_rate": ("min_rate", "window", "min_requests", "buckets"),
    "none": (),
}


def accrual_factory(kind: str, rng: random.Random, **opts: float) -> Callable[[], Accrual]:
    """A maker of one fresh accrual per endpoint, all drawing jitter from ``rng``.

    ``kind`` is ``consecutive_failures`` (alias ``io.l5d.consecutiveFailures``; option ``n``),
    ``success_rate`` (alias ``io.l5d.successRateWindowed``; options ``min_rate``, ``window``,
    ``min_requests``, ``buckets``) or ``none``. Every kind but ``none`` also takes
    ``backoff_base`` and ``backoff_cap`` (seconds). Errors name the kind or option at fault.
    """
    canon = _KINDS.get(kind)
    if canon is None:
        raise ValueError(f"unknown failure accrual kind {kind!r}; expected one of "
                         + ", ".join(sorted(_KINDS)))
    allowed = _POLICY_OPTS[canon] + (_BACKOFF_OPTS if canon != "none" else ())
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"failure accrual {kind!r} does not take {', '.join(unknown)}; "
                         f"options: {', '.join(allowed) or 'none'}")
    if canon == "none":
        return NoAccrual
    base = opts.get("backoff_base", 1.0)
    cap = opts.get("backoff_cap", 60.0)
    JitteredBackoff(base, cap, rng)  # validate once, at configuration time
    policy = {k: v for k, v in opts.items() if k not in _BACKOFF_OPTS}
    if canon == "consecutive_failures":
        ConsecutiveFailures(**policy)  # type: ignore[arg-type]
        return lambda: ConsecutiveFailures(**policy,  # type: ignore[arg-type]
                                           backoff=JitteredBackoff(base, cap, rng))
    SuccessRate(**policy)  # type: ignore[arg-type]
    return lambda: SuccessRate(**policy,  # type: ignore[arg-type]
                               backoff=JitteredBackoff(base, cap, rng))
