"""Retry budget: retries may add at most a fixed fraction to the load, plus a small reserve.

Theory of operation (as Finagle's ``RetryBudget``, which linkerd uses): every original request
``deposit()``s; every retry must ``try_withdraw()`` first and is not sent when that returns
False. Over the last ``ttl`` seconds the budget allows

    retries <= percent_can_retry * requests + min_retries_per_sec * ttl

The reserve (``min_retries_per_sec * ttl``) lets a client that has just started, or sends
little, still retry. Retries do not deposit, so retries of retries draw on the same budget
and a retry storm cannot feed itself.

The window is a ring of ``buckets`` time slices of ``ttl / buckets`` seconds. To make the
bound hold exactly despite the slicing, the two counts expire differently: a deposit counts
only while its slice is one of the last ``buckets`` slices (between ``ttl - ttl/buckets``
and ``ttl`` seconds), and a withdrawal counts while its slice is one of the last
``buckets + 1`` (at least ``ttl`` seconds). So at the moment of any granted retry, the
retries granted in the ``ttl`` seconds up to and including it never exceed the bound
computed from the requests deposited in those same seconds. The comparison is done with
exact fractions of the parameters as written (0.3 is 3/10, not the float just below it), so
10 requests at 0.3 allow exactly 3 retries; the only rounding left is where a clock reading
falls relative to a slice boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

__all__ = ["RetryBudget"]


class RetryBudget:
    """Finagle-style retry budget over a sliding, bucketed ``ttl`` window."""

    __slots__ = ("_clock", "ttl", "min_retries_per_sec", "percent_can_retry", "_width",
                 "_deposits", "_withdrawals", "_cur", "_p", "_reserve")

    def __init__(self, clock: Callable[[], float], ttl: float = 10.0,
                 min_retries_per_sec: float = 10, percent_can_retry: float = 0.2, *,
                 buckets: int = 10) -> None:
        _check("ttl", ttl, low=0.0, low_open=True)
        _check("min_retries_per_sec", min_retries_per_sec, low=0.0)
        _check("percent_can_retry", percent_can_retry, low=0.0, high=1000.0)
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
            raise ValueError(f"retry budget buckets must be an integer >= 1, got {buckets!r}")
        self._clock = clock
        self.ttl = float(ttl)
        self.min_retries_per_sec = float(min_retries_per_sec)
        self.percent_can_retry = float(percent_can_retry)
        self._width = self.ttl / buckets
        self._deposits = [0] * (buckets + 1)
        self._withdrawals = [0] * (buckets + 1)
        self._cur = -(1 << 62)
        self._p = _decimal(self.percent_can_retry)
        self._reserve = _decimal(self.min_retries_per_sec) * _decimal(self.ttl)

    def deposit(self) -> None:
        """One original (non-retry) request was sent."""
        i = self._slot()
        self._deposits[i] += 1

    def try_withdraw(self) -> bool:
        """May one retry be sent now? If so it is counted against the budget."""
        i = self._slot()
        deposits, withdrawals = self._counts(i)
        if withdrawals + 1 > self._reserve + self._p * deposits:
            return False
        self._withdrawals[i] += 1
        return True

    def balance(self) -> float:
        """How many retries could be sent right now (for metrics)."""
        deposits, withdrawals = self._counts(self._slot())
        return float(max(Fraction(0), self._reserve + self._p * deposits - withdrawals))

    def _counts(self, i: int) -> tuple[int, int]:
        n = len(self._deposits)
        oldest = (i + 1) % n  # the slice that only withdrawals still count
        return sum(self._deposits) - self._deposits[oldest], sum(self._withdrawals)

    def _slot(self) -> int:
        """The ring index of the current slice, clearing slices that fell out of the window."""
        idx = math.floor(self._clock() / self._width)
        n = len(self._deposits)
        cur = self._cur
        if idx > cur:
            for k in range(max(cur + 1, idx - n + 1), idx + 1):
                self._deposits[k % n] = 0
                self._withdrawals[k % n] = 0
            self._cur = cur = idx
        return cur % n  # a clock that steps back counts in the current slice

    def __repr__(self) -> str:
        return (f"RetryBudget(ttl={self.ttl}, min_retries_per_sec={self.min_retries_per_sec}, "
                f"percent_can_retry={self.percent_can_retry})")


def _decimal(x: float) -> Fraction:
    """The exact value of the shortest decimal that reads back as ``x``."""
    return Fraction(repr(x))


def _check(name: str, value: float, *, low: float, high: float = math.inf,
           low_open: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, int | float)
          and math.isfinite(value) and (value > low if low_open else value >= low)
          and value <= high)
    if not ok:
        rng = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf
                                                          else "")
        raise ValueError(f"retry budget {name} must be a finite number {rng}, got {value!r}")
