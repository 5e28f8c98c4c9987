"""Failure accrual state machine, its policies, and the jittered backoff it ejects with."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.balance.accrual import (
    ALIVE,
    EJECTED,
    PROBING,
    ConsecutiveFailures,
    NoAccrual,
    SuccessRate,
    accrual_factory,
)
from appliance.resilience.backoff import ConstantBackoff, JitteredBackoff


def backoff(seed: int = 7) -> JitteredBackoff:
    return JitteredBackoff(1.0, 60.0, random.Random(seed))


def expected_delays(seed: int, n: int, base: float = 1.0, cap: float = 60.0) -> list[float]:
    """The delays a seeded JitteredBackoff must produce: d * (1 - 0.5 * u)."""
    r = random.Random(seed)
    return [min(cap, base * 2 ** k) * (1 - 0.5 * r.random()) for k in range(n)]


# The state machine, driven through ConsecutiveFailures.

@pytest.mark.parametrize("outcomes, state", [
    ("", ALIVE),
    ("FFFFFF", ALIVE),
    ("FFFFFFF", EJECTED),
    ("FFFFFFSFFFFFF", ALIVE),
    ("SSSFFFFFFF", EJECTED),
    ("FFFFFFSFFFFFFF", EJECTED),
])
def test_consecutive_failures_table(outcomes: str, state: str) -> None:
    """Seven failures in a row eject; any success resets the count."""
    acc = ConsecutiveFailures(7, backoff())
    for i, o in enumerate(outcomes):
        acc.record(o == "S", float(i), float(i))
    assert acc.state == state


def test_ejection_lasts_one_backoff_delay() -> None:
    """until = time of the tripping failure + the first backoff delay."""
    acc = ConsecutiveFailures(2, backoff(3))
    acc.record(False, 10.0, 10.0)
    acc.record(False, 10.0, 11.0)
    assert acc.state == EJECTED
    assert acc.until == pytest.approx(11.0 + expected_delays(3, 1)[0])
    assert not acc.due(acc.until - 1e-9)
    assert acc.due(acc.until)
    assert acc.ejections == 1


def test_probe_success_revives_and_resets_backoff() -> None:
    """A successful probe brings the endpoint back with fresh counters and backoff."""
    acc = ConsecutiveFailures(1, backoff(5))
    acc.record(False, 0.0, 0.0)
    t = acc.until
    acc.claim_probe(t)
    assert acc.state == PROBING
    acc.record(True, t, t + 0.01)
    assert acc.state == ALIVE
    assert acc.failures == 0
    acc.record(False, t + 1, t + 1)
    assert acc.state == EJECTED
    assert acc.until - (t + 1) <= 1.0  # back to the first delay (nominal 1 s)


def test_probe_failure_ejects_again_for_longer() -> None:
    """A failed probe ejects with the next, longer delay of the backoff."""
    acc = ConsecutiveFailures(1, backoff(9))
    d = expected_delays(9, 3)
    acc.record(False, 0.0, 0.0)
    assert acc.until == pytest.approx(d[0])
    now = acc.until
    acc.claim_probe(now)
    acc.record(False, now, now + 0.5)
    assert acc.state == EJECTED
    assert acc.until == pytest.approx(now + 0.5 + d[1])
    assert d[1] >= d[0]
    assert acc.ejections == 2


def test_outcomes_of_older_requests_do_not_count_while_out() -> None:
    """Requests that started before the ejection or the probe change nothing."""
    acc = ConsecutiveFailures(1, backoff())
    acc.record(False, 0.0, 0.0)
    acc.record(True, 0.0, 0.1)  # in flight before the ejection: ignored while ejected
    assert acc.state == EJECTED
    probe_at = acc.until
    acc.claim_probe(probe_at)
    acc.record(True, probe_at - 0.5, probe_at + 0.1)  # started before the probe
    assert acc.state == PROBING
    acc.record(True, probe_at, probe_at + 0.2)  # the probe itself
    assert acc.state == ALIVE


@pytest.mark.parametrize("setup", ["alive", "probing"])
def test_claim_probe_only_when_ejected(setup: str) -> None:
    """Claiming a probe outside the ejected state is a programming error."""
    acc = ConsecutiveFailures(1, backoff())
    if setup == "probing":
        acc.record(False, 0.0, 0.0)
        acc.claim_probe(acc.until)
    with pytest.raises(RuntimeError, match="claim_probe"):
        acc.claim_probe(100.0)


def test_no_accrual_never_ejects() -> None:
    """The 'none' policy stays alive through any number of failures."""
    acc = NoAccrual()
    for i in range(1000):
        acc.record(False, float(i), float(i))
    assert acc.state == ALIVE


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "7"])
def test_consecutive_failures_bad_n(n: object) -> None:
    """n must be an integer >= 1."""
    with pytest.raises(ValueError, match="consecutive failures n"):
        ConsecutiveFailures(n)  # type: ignore[arg-type]


# SuccessRate.

def feed(acc: SuccessRate, outcomes: str, t0: float, step: float = 0.1) -> float:
    t = t0
    for o in outcomes:
        acc.record(o == "S", t, t)
        t += step
    return t


def test_success_rate_needs_min_requests() -> None:
    """Below min_requests even 100% failures do not eject."""
    acc = SuccessRate(0.8, 30.0, 10, backoff())
    feed(acc, "F" * 9, 0.0)
    assert acc.state == ALIVE
    feed(acc, "F", 1.0)
    assert acc.state == EJECTED


@pytest.mark.parametrize("outcomes, state", [
    ("SSSSSSSSFF", ALIVE),      # 0.8 is not below 0.8
    ("SSSSSSSFFF", EJECTED),    # 0.7
    ("SSSSSSSSSSSSSSSSFFFF", ALIVE),  # 0.8 again
    ("FFFSSSSSSSSSSSSSSSSS", ALIVE),  # early failures, rate recovers before min_requests
])
def test_success_rate_threshold_table(outcomes: str, state: str) -> None:
    """Eject when, with enough requests, the rate falls strictly below min_rate."""
    acc = SuccessRate(0.8, 30.0, 10, backoff())
    feed(acc, outcomes, 0.0)
    assert acc.state == state


def test_success_rate_window_slides() -> None:
    """Failures older than the window no longer count."""
    acc = SuccessRate(0.8, 30.0, 10, backoff())
    feed(acc, "FFFFF", 0.0, step=0.1)
    assert acc.rate(1.0) == 0.0
    t = feed(acc, "S" * 20, 40.0)
    assert acc.rate(t) == 1.0
    feed(acc, "FFF", t)
    assert acc.state == ALIVE  # 20/23 > 0.8; the old five are gone
    assert acc.rate(1000.0) is None


def test_success_rate_window_cleared_on_revival() -> None:
    """After a successful probe one failure cannot re-eject on old evidence."""
    acc = SuccessRate(0.8, 30.0, 10, backoff())
    feed(acc, "F" * 10, 0.0)
    assert acc.state == EJECTED
    t = acc.until
    acc.claim_probe(t)
    acc.record(True, t, t)
    acc.record(False, t, t + 0.1)
    assert acc.state == ALIVE
    assert acc.rate(t + 0.2) == 0.5


@pytest.mark.parametrize("kwargs, field", [
    ({"min_rate": 0}, "min_rate"), ({"min_rate": 1.5}, "min_rate"),
    ({"window": 0}, "window"), ({"window": math.inf}, "window"),
    ({"min_requests": 0}, "min_requests"), ({"buckets": 0}, "buckets"),
])
def test_success_rate_bad_args(kwargs: dict[str, float], field: str) -> None:
    """Each bad argument is named in the error."""
    with pytest.raises(ValueError, match=field):
        SuccessRate(**kwargs)  # type: ignore[arg-type]


# The factory.

def test_factory_makes_fresh_instances_with_options() -> None:
    """One accrual per call, configured as asked."""
    make = accrual_factory("consecutive_failures", random.Random(1), n=3, backoff_cap=5.0)
    a, b = make(), make()
    assert a is not b
    assert isinstance(a, ConsecutiveFailures) and a.n == 3


@pytest.mark.parametrize("kind, cls", [
    ("io.l5d.consecutiveFailures", ConsecutiveFailures),
    ("success_rate", SuccessRate),
    ("io.l5d.successRateWindowed", SuccessRate),
    ("none", NoAccrual),
])
def test_factory_kinds_and_linkerd_aliases(kind: str, cls: type) -> None:
    """Our names and linkerd's both work."""
    assert type(accrual_factory(kind, random.Random(1))()) is cls


@pytest.mark.parametrize("kind, opts, match", [
    ("consecutive", {}, "unknown failure accrual kind 'consecutive'"),
    ("consecutive_failures", {"min_rate": 0.5}, "does not take min_rate"),
    ("none", {"backoff_base": 1.0}, "does not take backoff_base"),
    ("consecutive_failures", {"n": 0}, "n must be"),
    ("success_rate", {"backoff_base": 5.0, "backoff_cap": 1.0}, "cap"),
])
def test_factory_errors(kind: str, opts: dict[str, float], match: str) -> None:
    """Bad kinds and options fail at configuration time, by name."""
    with pytest.raises(ValueError, match=match):
        accrual_factory(kind, random.Random(1), **opts)


# The backoff.

def test_backoff_sequence_is_exact_for_a_seed() -> None:
    """Delays are nominal * (1 - jitter * u), nominal doubling from base to cap."""
    b = backoff(42)
    assert [b.next() for _ in range(9)] == expected_delays(42, 9)
    assert b.attempt == 9


def test_backoff_reset_and_iterator() -> None:
    """reset() starts over from base; the object is an iterator too."""
    b = JitteredBackoff(2.0, 8.0, random.Random(0), jitter=0.0)
    assert [next(b) for _ in range(4)] == [2.0, 4.0, 8.0, 8.0]
    b.reset()
    assert next(iter(b)) == 2.0


@given(st.floats(0.001, 10), st.floats(1, 100), st.floats(0, 1), st.integers(0, 2**32))
def test_backoff_bounds(base: float, factor: float, jitter: float, seed: int) -> None:
    """Every delay is within [nominal*(1-jitter), nominal] and never above the cap."""
    cap = base * factor
    b = JitteredBackoff(base, cap, random.Random(seed), jitter=jitter)
    prev = 0.0
    for k in range(80):
        nominal = b.nominal(k)
        d = b.next()
        assert nominal * (1 - jitter) - 1e-12 <= d <= nominal <= cap
        if jitter <= 0.5 and nominal * 2 <= cap:
            assert d >= prev - 1e-12  # grows while the nominal still doubles
        prev = d


@pytest.mark.parametrize("kwargs, match", [
    ({"base": 0}, "base"), ({"base": -1}, "base"), ({"cap": math.nan}, "cap"),
    ({"base": 10, "cap": 5}, "cap"), ({"jitter": 1.5}, "jitter"), ({"base": "1"}, "base"),
])
def test_backoff_bad_args(kwargs: dict[str, float], match: str) -> None:
    """Bad backoff parameters are named."""
    with pytest.raises(ValueError, match=match):
        JitteredBackoff(**kwargs)  # type: ignore[arg-type]


def test_constant_backoff() -> None:
    """A constant backoff repeats its delay and rejects negatives."""
    c = ConstantBackoff(0.25)
    assert [c.next(), next(c)] == [0.25, 0.25]
    with pytest.raises(ValueError, match="delay"):
        ConstantBackoff(-1)
