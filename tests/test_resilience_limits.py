"""Load shedding: the in-flight limiter with its queue, and per-endpoint counts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.resilience.limits import EndpointLimits, Limiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_slots_then_queue_then_shed() -> None:
    """Two slots, a queue of one: the third waits, the fourth is shed at once."""
    lim = Limiter(Clock(), max_in_flight=2, max_queue=1)
    assert lim.acquire() and lim.acquire()
    assert not lim.acquire()
    assert lim.enqueue("c")
    assert not lim.acquire()
    assert not lim.enqueue("d")
    assert lim.shed == 1 and lim.in_flight == 2


def test_a_released_slot_goes_to_the_oldest_waiter() -> None:
    """FIFO hand-over: the in-flight count stays at the limit, newcomers cannot cut in."""
    lim = Limiter(Clock(), max_in_flight=1, max_queue=5)
    assert lim.acquire()
    lim.enqueue("a")
    lim.enqueue("b")
    assert lim.release() == "a"
    assert lim.in_flight == 1
    assert not lim.acquire()  # "b" still waits
    assert lim.release() == "b"
    assert lim.release() is None
    assert lim.in_flight == 0
    assert lim.acquire()


def test_waiters_expire_after_the_queue_timeout() -> None:
    """Only waiters older than queue_timeout are taken out, oldest first."""
    clock = Clock()
    lim = Limiter(clock, max_in_flight=1, max_queue=5, queue_timeout=1.0)
    lim.acquire()
    lim.enqueue("old")
    clock.now = 0.5
    lim.enqueue("young")
    clock.now = 1.2
    assert lim.expire() == ["old"]
    assert list(w for _, w in lim.queue) == ["young"]
    assert lim.shed == 1


def test_a_waiter_that_leaves_is_cancelled() -> None:
    """cancel() takes it out; cancelling twice says it was not there."""
    lim = Limiter(Clock(), max_in_flight=1, max_queue=5)
    lim.acquire()
    lim.enqueue("a")
    assert lim.cancel("a") and not lim.cancel("a")
    assert lim.release() is None and lim.in_flight == 0


def test_zero_means_no_limit() -> None:
    """max_in_flight 0: every acquire succeeds; no queue is used."""
    lim = Limiter(Clock())
    assert all(lim.acquire() for _ in range(1000))


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"max_in_flight": -1}, "max_in_flight must be an integer >= 0"),
    ({"max_queue": 1.5}, "max_queue must be an integer >= 0"),
    ({"queue_timeout": -1}, "queue_timeout must be a number of seconds >= 0"),
])
def test_bad_limits_are_refused(kwargs: dict[str, object], error: str) -> None:
    """Limits that are not counts are a ValueError naming them."""
    with pytest.raises(ValueError, match=error):
        Limiter(Clock(), **kwargs)  # type: ignore[arg-type]


@given(st.lists(st.sampled_from(["start", "end", "leave"]), max_size=200),
       st.integers(min_value=1, max_value=4), st.integers(min_value=0, max_value=4))
def test_in_flight_never_exceeds_the_limit(ops: list[str], limit: int, queue: int) -> None:
    """Any sequence of arrivals, completions and departures: in flight <= limit, queue
    <= max_queue, and every request is running, waiting or was shed."""
    lim = Limiter(Clock(), max_in_flight=limit, max_queue=queue)
    running: list[int] = []
    waiting: list[int] = []
    shed = 0
    for n, op in enumerate(ops):
        if op == "start":
            if lim.acquire():
                running.append(n)
            elif lim.enqueue(n):
                waiting.append(n)
            else:
                shed += 1
        elif op == "end" and running:
            running.pop(0)
            nxt = lim.release()
            if nxt is not None:
                waiting.remove(nxt)
                running.append(nxt)
        elif op == "leave" and waiting:
            assert lim.cancel(waiting.pop())
        assert lim.in_flight == len(running) <= limit
        assert len(lim.queue) == len(waiting) <= queue
    assert lim.shed == shed


def test_endpoint_limits_count_per_key() -> None:
    """Each endpoint has its own count; a full one refuses without counting."""
    eps = EndpointLimits(2)
    assert eps.acquire("a") and eps.acquire("a") and not eps.acquire("a")
    assert eps.acquire("b")
    eps.release("a")
    assert eps["a"] == 1 and eps.acquire("a")
    eps.release("b")
    assert eps["b"] == 0 and "b" not in eps.counts
    assert eps.shed == 1
