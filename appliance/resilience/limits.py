"""Load shedding: in-flight request slots with a bounded queue, and per-endpoint counts.

Theory of operation: each listener has one :class:`Limiter`. A request takes a slot when it
starts (:meth:`Limiter.acquire`) and gives it back when it ends (:meth:`Limiter.release`).
With every slot taken, a request may wait in a FIFO queue (:meth:`Limiter.enqueue`) of at
most ``max_queue`` entries; a full queue means the request is shed at once (the proxy
answers 503, or gRPC UNAVAILABLE). A released slot passes straight to the oldest waiter, so
the in-flight count never exceeds the limit and a waiter is never overtaken by a newcomer.
Waiters older than ``queue_timeout`` are taken out by :meth:`Limiter.expire` (the proxy's
once-a-second sweep) and shed. A waiter that goes away (the client left) is taken out with
:meth:`Limiter.cancel`.

:class:`EndpointLimits` counts requests in flight per endpoint key, refusing one past
``max_per_endpoint``; the proxy then tries another endpoint or sheds the request.

A limit of 0 means none. Pure code: the clock is a parameter, waiters are opaque objects.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["EndpointLimits", "Limiter"]


def _check(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0: no limit), got {value!r}")
    return value


class Limiter:
    """In-flight slots (``max_in_flight``, 0: unlimited) and a bounded waiting queue."""

    __slots__ = ("clock", "max_in_flight", "max_queue", "queue_timeout", "in_flight",
                 "queue", "shed")

    def __init__(self, clock: Callable[[], float], max_in_flight: int = 0,
                 max_queue: int = 0, queue_timeout: float = 3.0) -> None:
        self.clock = clock
        self.max_in_flight = _check("max_in_flight", max_in_flight)
        self.max_queue = _check("max_queue", max_queue)
        if isinstance(queue_timeout, bool) or not isinstance(queue_timeout, int | float) \
                or not queue_timeout >= 0:
            raise ValueError(f"queue_timeout must be a number of seconds >= 0, got "
                             f"{queue_timeout!r}")
        self.queue_timeout = float(queue_timeout)
        self.in_flight = 0
        self.queue: deque[tuple[float, Any]] = deque()
        self.shed = 0
        """Requests refused so far (queue full or queue timeout)."""

    def acquire(self) -> bool:
        """Take a slot now if one is free (and nobody waits for one)."""
        limit = self.max_in_flight
        if not limit or (self.in_flight < limit and not self.queue):
            self.in_flight += 1
            return True
        return False

    def enqueue(self, waiter: Any) -> bool:
        """Wait for a slot; False (and counted as shed) when the queue is full."""
        if len(self.queue) >= self.max_queue:
            self.shed += 1
            return False
        self.queue.append((self.clock(), waiter))
        return True

    def release(self) -> Any:
        """Give a slot back. If a request waits, the slot is now its own and it is
        returned (the caller starts it); else None."""
        if self.queue:
            return self.queue.popleft()[1]
        if self.in_flight > 0:
            self.in_flight -= 1
        return None

    def cancel(self, waiter: Any) -> bool:
        """Take a waiter out of the queue (it went away); False if it was not there."""
        for i, (_, w) in enumerate(self.queue):
            if w is waiter:
                del self.queue[i]
                return True
        return False

    def expire(self) -> list[Any]:
        """Take out and return the waiters queued for longer than ``queue_timeout``."""
        out = []
        deadline = self.clock() - self.queue_timeout
        queue = self.queue
        while queue and queue[0][0] <= deadline:
            out.append(queue.popleft()[1])
        self.shed += len(out)
        return out

    def __repr__(self) -> str:
        return (f"<Limiter in_flight={self.in_flight}/{self.max_in_flight or 'inf'} "
                f"queued={len(self.queue)}/{self.max_queue}>")


class EndpointLimits:
    """Requests in flight per endpoint, at most ``max_per_endpoint`` each (0: unlimited)."""

    __slots__ = ("max_per_endpoint", "counts", "shed")

    def __init__(self, max_per_endpoint: int = 0) -> None:
        self.max_per_endpoint = _check("max_per_endpoint", max_per_endpoint)
        self.counts: dict[Hashable, int] = {}
        self.shed = 0

    def acquire(self, key: Hashable) -> bool:
        """Count one more request to ``key``; False (nothing counted) if it is full."""
        n = self.counts.get(key, 0)
        if self.max_per_endpoint and n >= self.max_per_endpoint:
            self.shed += 1
            return False
        self.counts[key] = n + 1
        return True

    def release(self, key: Hashable) -> None:
        n = self.counts.get(key, 0)
        if n <= 1:
            self.counts.pop(key, None)
        else:
            self.counts[key] = n - 1

    def __getitem__(self, key: Hashable) -> int:
        return self.counts.get(key, 0)
