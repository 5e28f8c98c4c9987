"""Backoff schedules: how long to wait before the next try.

:class:`JitteredBackoff` is exponential with "equal jitter": the n-th delay (n = 0, 1, ...) has
the nominal value ``d(n) = min(cap, base * 2**n)`` and is drawn uniformly from
``[d(n) * (1 - jitter), d(n)]``. With the default ``jitter=0.5`` every delay lies in
``[d/2, d]``, so while the nominal value is still doubling each delay is at least as long as
the one before it, and no delay ever exceeds ``cap``. Failure accrual uses it between
ejections (1 s to 60 s); retries may use it between attempts.

:class:`ConstantBackoff` always answers the same delay (linkerd's ``constant`` backoff).

Both are iterators (``next(b)``), have ``next()`` and ``reset()``, and take their randomness
from an injected :class:`random.Random` so tests are exact.
"""

from __future__ import annotations

import math
import random

__all__ = ["ConstantBackoff", "JitteredBackoff"]


def _check_seconds(name: str, value: float, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0.0 or (v == 0.0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return v


class JitteredBackoff:
    """Exponential backoff from ``base`` to ``cap`` seconds with equal jitter."""

    __slots__ = ("base", "cap", "jitter", "_rng", "_attempt")

    def __init__(self, base: float = 1.0, cap: float = 60.0, rng: random.Random | None = None,
                 *, jitter: float = 0.5) -> None:
        self.base = _check_seconds("backoff base", base, allow_zero=False)
        self.cap = _check_seconds("backoff cap", cap, allow_zero=False)
        if self.cap < self.base:
            raise ValueError(f"backoff cap ({cap!r}) must be >= base ({base!r})")
        if isinstance(jitter, bool) or not isinstance(jitter, int | float) \
                or not 0.0 <= jitter <= 1.0:
            raise ValueError(f"backoff jitter must be a fraction in [0, 1], got {jitter!r}")
        self.jitter = float(jitter)
        self._rng = rng if rng is not None else random.Random()
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """How many delays have been handed out since the last reset."""
        return self._attempt

    def nominal(self, attempt: int) -> float:
        """The un-jittered delay of the given attempt (0-based)."""
        if attempt >= 64:  # 2**64 * base overflows nothing but is certainly past any cap
            return self.cap
        return min(self.cap, self.base * (1 << attempt))

    def next(self) -> float:
        """The next delay in seconds; each call moves one attempt further."""
        d = self.nominal(self._attempt)
        self._attempt += 1
        return d * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """Start again from ``base`` (after a success)."""
        self._attempt = 0

    def __iter__(self) -> JitteredBackoff:
        return self

    def __next__(self) -> float:
        return self.next()

    def __repr__(self) -> str:
        return (f"JitteredBackoff(base={self.base}, cap={self.cap}, jitter={self.jitter}, "
                f"attempt={self._attempt})")


class ConstantBackoff:
    """The same delay every time."""

    __slots__ = ("delay",)

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = _check_seconds("backoff delay", delay, allow_zero=True)

    def next(self) -> float:
        return self.delay

    def reset(self) -> None:
        """Nothing to forget."""

    def __iter__(self) -> ConstantBackoff:
        return self

    def __next__(self) -> float:
        return self.delay

    def __repr__(self) -> str:
        return f"ConstantBackoff({self.delay})"
