"""Peak-EWMA latency cost of one endpoint, as in Finagle and linkerd.

Theory of operation: the estimate is a moving average of observed round-trip times that is
quick to rise and slow to fall. A sample higher than the current estimate replaces it at
once (the "peak"), so an endpoint that turns slow is penalised on its very next response.
A lower sample is blended in with weight ``1 - exp(-dt / decay)``, where ``dt`` is the time
since the previous observation: the longer the endpoint went unobserved, the more the new
sample counts.

The average only ever moves on an observation. What the balancer reads,
:meth:`PeakEwma.estimate`, is that average decayed toward zero by the time since the last
observation (``average * exp(-age / decay)``), as in Finagle and tower: an endpoint that was
penalised and then left alone becomes attractive again after a few ``decay`` periods and
gets a request that measures it afresh. Reading does not change the state (Finagle's read
does, which makes its average depend on how often it is read); the next observation blends
into the undecayed average, so one fast response after an idle spell does not erase a slow
history.

The cost that load balancers compare is ``estimate * (pending + 1)``: the expected time to
serve one more request behind the ones already in flight. A new endpoint starts at
``default_rtt``. The decayed estimate is floored at 1 microsecond so that, after a long idle
period, endpoints are still ranked by their in-flight requests rather than all costing 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["MIN_RTT", "PeakEwma"]

MIN_RTT = 1e-6
"""The smallest estimate :meth:`PeakEwma.cost` uses, in seconds."""


class PeakEwma:
    """Peak exponentially weighted moving average of response times, in seconds."""

    __slots__ = ("_clock", "_decay", "_rtt", "_stamp")

    def __init__(self, clock: Callable[[], float], decay: float = 10.0,
                 default_rtt: float = 0.030) -> None:
        if isinstance(decay, bool) or not isinstance(decay, int | float) \
                or not math.isfinite(decay) or decay <= 0:
            raise ValueError(f"ewma decay must be a finite number of seconds > 0, got {decay!r}")
        if isinstance(default_rtt, bool) or not isinstance(default_rtt, int | float) \
                or not math.isfinite(default_rtt) or default_rtt < 0:
            raise ValueError(
                f"ewma default_rtt must be a finite number of seconds >= 0, got {default_rtt!r}")
        self._clock = clock
        self._decay = float(decay)
        self._rtt = float(default_rtt)
        self._stamp = clock()

    @property
    def decay(self) -> float:
        return self._decay

    @property
    def average(self) -> float:
        """The peak-EWMA of observed response times, before the idle decay (seconds)."""
        return self._rtt

    def observe(self, rtt: float, now: float | None = None) -> None:
        """Fold in one response time (seconds); ``now`` saves a clock call."""
        if not rtt >= 0.0:  # also rejects NaN
            raise ValueError(f"observed rtt must be >= 0 seconds, got {rtt!r}")
        if now is None:
            now = self._clock()
        if rtt > self._rtt:
            self._rtt = rtt
        else:
            dt = now - self._stamp
            w = math.exp(-dt / self._decay) if dt > 0.0 else 1.0
            self._rtt = self._rtt * w + rtt * (1.0 - w)
        if now > self._stamp:
            self._stamp = now

    def estimate(self, now: float | None = None) -> float:
        """The latency estimate decayed up to ``now`` (seconds), without the floor."""
        if now is None:
            now = self._clock()
        dt = now - self._stamp
        if dt <= 0.0:
            return self._rtt
        return self._rtt * math.exp(-dt / self._decay)

    def cost(self, pending: int, now: float | None = None) -> float:
        """``estimate * (pending + 1)``, the estimate decayed to now and floored at MIN_RTT."""
        rtt = self.estimate(now)
        if rtt < MIN_RTT:
            rtt = MIN_RTT
        return rtt * (pending + 1)

    def __repr__(self) -> str:
        return f"PeakEwma(rtt={self._rtt:.6f}, stamp={self._stamp:.6f}, decay={self._decay})"
