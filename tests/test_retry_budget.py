"""Retry budget: the reserve, the percentage, the sliding window, and the bound as a property."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.resilience.budget import RetryBudget


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def drain(budget: RetryBudget, limit: int = 100_000) -> int:
    n = 0
    while n < limit and budget.try_withdraw():
        n += 1
    return n


def test_reserve_alone_allows_min_rate_times_ttl() -> None:
    """No requests yet: 10/s * 10 s = 100 retries, then none."""
    b = RetryBudget(FakeClock(), ttl=10.0, min_retries_per_sec=10, percent_can_retry=0.2)
    assert drain(b) == 100
    assert not b.try_withdraw()


def test_deposits_add_percent_can_retry() -> None:
    """Without a reserve, 50 requests at 20% allow exactly 10 retries."""
    b = RetryBudget(FakeClock(), ttl=10.0, min_retries_per_sec=0, percent_can_retry=0.2)
    for _ in range(50):
        b.deposit()
    assert drain(b) == 10
    for _ in range(4):
        b.deposit()
    assert not b.try_withdraw()  # 54 * 0.2 = 10.8: still short of the 11th
    b.deposit()
    assert b.try_withdraw()


@pytest.mark.parametrize("p, requests, retries", [
    (0.0, 1000, 0), (0.1, 95, 9), (0.3, 10, 3), (1.0, 7, 7), (2.0, 7, 14), (0.7, 10, 7),
])
def test_percent_table(p: float, requests: int, retries: int) -> None:
    """floor(p * requests) retries, computed exactly (0.3 * 10 is 3, not 2.9999...)."""
    b = RetryBudget(FakeClock(), ttl=10.0, min_retries_per_sec=0, percent_can_retry=p)
    for _ in range(requests):
        b.deposit()
    assert drain(b) == retries


def test_window_expires_withdrawals_and_deposits() -> None:
    """After ttl (plus a slice) both the spent reserve and old deposits are forgotten."""
    clock = FakeClock()
    b = RetryBudget(clock, ttl=10.0, min_retries_per_sec=1, percent_can_retry=0.5)
    for _ in range(20):
        b.deposit()
    assert drain(b) == 20  # reserve 10 + 20 * 0.5
    clock.t = 10.5
    assert not b.try_withdraw()  # deposits (slice 0) gone, withdrawals still counted
    clock.t = 11.0
    assert drain(b) == 10  # everything from slice 0 gone: the reserve is back
    assert b.balance() == 0.0


def test_balance_reports_available_retries() -> None:
    """balance() = reserve + p * deposits - withdrawals."""
    b = RetryBudget(FakeClock(), ttl=2.0, min_retries_per_sec=1.5, percent_can_retry=0.25)
    for _ in range(4):
        b.deposit()
    assert b.balance() == 4.0
    b.try_withdraw()
    assert b.balance() == 3.0


def test_clock_stepping_back_counts_in_current_slice() -> None:
    """A clock that goes back neither raises nor refills the budget."""
    clock = FakeClock(50.0)
    b = RetryBudget(clock, ttl=10.0, min_retries_per_sec=1, percent_can_retry=0.0)
    assert drain(b) == 10
    clock.t = 20.0
    assert not b.try_withdraw()


@pytest.mark.parametrize("kwargs, field", [
    ({"ttl": 0}, "ttl"), ({"ttl": math.inf}, "ttl"), ({"ttl": "10"}, "ttl"),
    ({"min_retries_per_sec": -1}, "min_retries_per_sec"),
    ({"percent_can_retry": -0.1}, "percent_can_retry"),
    ({"percent_can_retry": 1001}, "percent_can_retry"),
    ({"percent_can_retry": math.nan}, "percent_can_retry"),
    ({"buckets": 0}, "buckets"),
])
def test_bad_parameters(kwargs: dict[str, object], field: str) -> None:
    """Each bad parameter is named in the error."""
    with pytest.raises(ValueError, match=field):
        RetryBudget(FakeClock(), **kwargs)  # type: ignore[arg-type]


TICK = 1 / 1024  # dyadic times: clock readings and differences are exact floats

events = st.lists(
    st.tuples(st.integers(0, 2048), st.sampled_from(["deposit", "retry"]), st.integers(1, 30)),
    min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(events,
       st.sampled_from([1, 2, 3, 5, 10, 16]),
       st.sampled_from([0, 0.5, 1, 10]),
       st.sampled_from([0.0, 0.1, 0.2, 0.3, 1.0, 2.5]),
       st.sampled_from([1, 2, 4, 8, 10]))
def test_retries_never_exceed_the_bound(ev: list[tuple[int, str, int]], ttl: int,
                                        min_rate: float, p: float, buckets: int) -> None:
    """At every granted retry at time t, the retries granted in (t - ttl, t] are at most
    p * requests in (t - ttl, t] + min_retries_per_sec * ttl."""
    clock = FakeClock()
    b = RetryBudget(clock, ttl=ttl, min_retries_per_sec=min_rate, percent_can_retry=p,
                    buckets=buckets)
    deposits: list[float] = []
    retries: list[float] = []
    t = 0
    for gap, kind, count in ev:
        t += gap
        clock.t = t * TICK
        for _ in range(count):
            if kind == "deposit":
                b.deposit()
                deposits.append(clock.t)
            elif b.try_withdraw():
                retries.append(clock.t)
                now = clock.t
                n_retries = sum(1 for s in retries if now - s < ttl)
                n_requests = sum(1 for s in deposits if now - s < ttl)
                assert n_retries <= p * n_requests + min_rate * ttl + 1e-9


@given(st.integers(0, 500), st.sampled_from([0.1, 0.2, 0.5]))
def test_steady_traffic_gets_the_whole_percentage(requests: int, p: float) -> None:
    """All requests in one instant with no reserve: exactly floor(p * requests) retries."""
    b = RetryBudget(FakeClock(), ttl=10, min_retries_per_sec=0, percent_can_retry=p)
    for _ in range(requests):
        b.deposit()
    assert drain(b) == math.floor(Fraction(repr(p)) * requests)
