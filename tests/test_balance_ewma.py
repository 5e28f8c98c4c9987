"""Peak-EWMA cost: peaks, decay, the cost formula, bad input."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.balance.ewma import MIN_RTT, PeakEwma


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_new_endpoint_costs_default_rtt() -> None:
    """A fresh estimate is default_rtt, and cost scales by pending + 1."""
    clock = FakeClock()
    e = PeakEwma(clock, decay=10.0, default_rtt=0.030)
    assert e.estimate() == 0.030
    assert e.cost(0) == pytest.approx(0.030)
    assert e.cost(3) == pytest.approx(0.120)


def test_higher_sample_replaces_average_at_once() -> None:
    """A sample above the average becomes the average immediately (the peak)."""
    clock = FakeClock()
    e = PeakEwma(clock, decay=10.0, default_rtt=0.030)
    clock.t += 0.001
    e.observe(0.500)
    assert e.average == 0.500
    assert e.estimate() == 0.500


def test_lower_sample_blends_by_time_since_last_observation() -> None:
    """A lower sample moves the average by 1 - exp(-dt/decay)."""
    clock = FakeClock()
    e = PeakEwma(clock, decay=10.0, default_rtt=0.0)
    e.observe(1.0)
    clock.t += 5.0
    e.observe(0.2)
    w = math.exp(-5.0 / 10.0)
    assert e.average == pytest.approx(1.0 * w + 0.2 * (1 - w))


def test_lower_sample_at_same_instant_does_not_move_average() -> None:
    """With no time elapsed the old average keeps all its weight."""
    clock = FakeClock()
    e = PeakEwma(clock, default_rtt=0.0)
    e.observe(0.4)
    e.observe(0.1)
    assert e.average == 0.4


def test_estimate_decays_toward_zero_while_idle() -> None:
    """Between observations the cost decays by exp(-age/decay)."""
    clock = FakeClock()
    e = PeakEwma(clock, decay=10.0, default_rtt=0.0)
    e.observe(0.8)
    clock.t += 10.0
    assert e.estimate() == pytest.approx(0.8 * math.exp(-1.0))
    assert e.cost(1) == pytest.approx(2 * 0.8 * math.exp(-1.0))


def test_reading_does_not_change_state() -> None:
    """estimate() and cost() are pure reads: the next observation is unaffected."""
    c1, c2 = FakeClock(), FakeClock()
    read, unread = PeakEwma(c1, default_rtt=0.0), PeakEwma(c2, default_rtt=0.0)
    for e in (read, unread):
        e.observe(0.5)
    c1.t += 3.0
    c2.t += 3.0
    read.cost(4)
    read.estimate()
    read.observe(0.1)
    unread.observe(0.1)
    assert read.average == unread.average


def test_cost_floor_after_long_idle() -> None:
    """After a very long idle spell pending still ranks endpoints (estimate floored)."""
    clock = FakeClock()
    e = PeakEwma(clock, decay=1.0)
    clock.t += 10_000.0
    assert e.estimate() == 0.0
    assert e.cost(0) == MIN_RTT
    assert e.cost(5) == pytest.approx(6 * MIN_RTT)


def test_clock_stepping_back_does_not_decay_or_raise() -> None:
    """A clock reading before the last observation counts as no time elapsed."""
    clock = FakeClock()
    e = PeakEwma(clock, default_rtt=0.0)
    e.observe(0.3)
    clock.t -= 5.0
    assert e.estimate() == 0.3
    e.observe(0.1)
    assert e.average == 0.3


def test_now_argument_matches_clock() -> None:
    """Passing now explicitly gives the same results as reading the clock."""
    clock = FakeClock()
    a, b = PeakEwma(clock), PeakEwma(clock)
    clock.t += 2.0
    a.observe(0.01)
    b.observe(0.01, clock.t)
    clock.t += 1.0
    assert a.cost(2) == b.cost(2, clock.t)


@pytest.mark.parametrize("decay", [0, -1.0, math.nan, math.inf, True, "10"])
def test_bad_decay_rejected(decay: object) -> None:
    """decay must be a finite positive number of seconds."""
    with pytest.raises(ValueError, match="decay"):
        PeakEwma(FakeClock(), decay=decay)  # type: ignore[arg-type]


@pytest.mark.parametrize("rtt", [-0.001, math.nan, math.inf, False])
def test_bad_default_rtt_rejected(rtt: object) -> None:
    """default_rtt must be a finite number >= 0."""
    with pytest.raises(ValueError, match="default_rtt"):
        PeakEwma(FakeClock(), default_rtt=rtt)  # type: ignore[arg-type]


@pytest.mark.parametrize("rtt", [-0.5, math.nan])
def test_bad_observation_rejected(rtt: float) -> None:
    """A negative or NaN sample is an error that names the value."""
    with pytest.raises(ValueError, match="rtt"):
        PeakEwma(FakeClock()).observe(rtt)


samples = st.lists(st.tuples(st.floats(0, 100), st.floats(0, 5.0)), max_size=40)


@given(samples)
def test_average_stays_between_extremes(steps: list[tuple[float, float]]) -> None:
    """The average never leaves the range of the default and the samples seen."""
    clock = FakeClock(0.0)
    e = PeakEwma(clock, decay=10.0, default_rtt=0.030)
    seen = [0.030]
    for dt, rtt in steps:
        clock.t += dt
        e.observe(rtt)
        seen.append(rtt)
        assert min(seen) - 1e-12 <= e.average <= max(seen) + 1e-12
        assert e.average >= rtt - 1e-12  # never below the latest sample: quick up, slow down


@given(samples, st.floats(0, 1000), st.integers(0, 1000))
def test_cost_is_decayed_average_times_load(steps: list[tuple[float, float]], idle: float,
                                            pending: int) -> None:
    """cost == max(average * exp(-idle/decay), MIN_RTT) * (pending + 1)."""
    clock = FakeClock(0.0)
    e = PeakEwma(clock, decay=7.0)
    for dt, rtt in steps:
        clock.t += dt
        e.observe(rtt)
    clock.t += idle
    expected = max(e.average * math.exp(-idle / 7.0), MIN_RTT) * (pending + 1)
    assert e.cost(pending) == pytest.approx(expected, rel=1e-9, abs=1e-300)
