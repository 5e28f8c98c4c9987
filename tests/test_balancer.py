"""Balancers: latency preference, weights, discovery updates, ejection and probes."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable, Hashable

import pytest

from appliance.balance import (
    ALIVE,
    EJECTED,
    PROBING,
    Balancer,
    EndpointState,
    P2CLeastLoaded,
    P2CPeakEwma,
    RoundRobin,
    accrual_factory,
    make_balancer,
)

KINDS = ["p2c_peak_ewma", "p2c_least_loaded", "round_robin"]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def balancer(kind: str, keys: str | dict[str, float], seed: int = 1,
             **opts: object) -> tuple[Balancer, FakeClock]:
    clock = FakeClock()
    b = make_balancer(kind, clock, random.Random(seed), **opts)
    weights = dict.fromkeys(keys, 1.0) if isinstance(keys, str) else keys
    b.update({k: (w, None) for k, w in weights.items()})
    return b, clock


def simulate(b: Balancer, clock: FakeClock, latency: Callable[[Hashable], float], n: int,
             concurrency: int = 1) -> Counter[Hashable]:
    """A closed loop: ``concurrency`` requests in flight, ``n`` in total; picks per key."""
    inflight: list[tuple[float, int, EndpointState, float]] = []
    picks: Counter[Hashable] = Counter()
    seq = 0

    def launch() -> None:
        nonlocal seq
        ep = b.pick()
        assert ep is not None
        picks[ep.key] += 1
        seq += 1
        heapq.heappush(inflight, (clock.t + latency(ep.key), seq, ep, b.start(ep)))

    for _ in range(min(concurrency, n)):
        launch()
    while inflight:
        t, _, ep, started = heapq.heappop(inflight)
        clock.t = t
        b.finish(ep, started, True)
        if seq < n:
            launch()
    return picks


def fail(b: Balancer, ep: EndpointState, times: int) -> None:
    for _ in range(times):
        b.finish(ep, b.start(ep), False)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_balancer_picks_nothing(kind: str) -> None:
    """No endpoints: pick() is None."""
    b, _ = balancer(kind, "")
    assert b.pick() is None


@pytest.mark.parametrize("kind", KINDS)
def test_single_endpoint_always_picked(kind: str) -> None:
    """One endpoint gets every request."""
    b, clock = balancer(kind, "a")
    assert simulate(b, clock, lambda k: 0.01, 100) == Counter(a=100)


@pytest.mark.parametrize("concurrency", [1, 10])
def test_p2c_avoids_an_endpoint_once_it_turns_slow(concurrency: int) -> None:
    """After 'e' turns slow (10 ms -> 500 ms) it gets under 10% of the next 10000 picks."""
    b, clock = balancer("p2c_peak_ewma", "abcde", seed=3)
    slow = False
    simulate(b, clock, lambda k: 0.01, 2000, concurrency)
    slow = True
    picks = simulate(b, clock, lambda k: 0.5 if slow and k == "e" else 0.01, 10000,
                     concurrency)
    assert picks["e"] < 1000, picks
    assert min(picks[k] for k in "abcd") > 2000, picks


def test_p2c_picks_two_distinct_endpoints() -> None:
    """With two equal endpoints and no history, P2C compares both: never the same twice
    in a row when the first pick is still in flight."""
    b, _ = balancer("p2c_least_loaded", "ab", seed=11)
    for _ in range(200):
        first = b.pick()
        assert first is not None
        started = b.start(first)
        second = b.pick()
        assert second is not None and second is not first
        b.finish(first, started, True)


@pytest.mark.parametrize("kind, concurrency", [
    ("round_robin", 1), ("round_robin", 16),
    ("p2c_least_loaded", 1), ("p2c_least_loaded", 32),
    ("p2c_peak_ewma", 32),
])
@pytest.mark.parametrize("keys", [{"a": 2.0, "b": 1.0}, {"a": 2.0, "b": 1.0, "c": 1.0}])
def test_weights_honoured(kind: str, concurrency: int, keys: dict[str, float]) -> None:
    """Equal latencies: a weight-2 endpoint takes twice the traffic of a weight-1 one (±10%)."""
    b, clock = balancer(kind, keys, seed=5)
    picks = simulate(b, clock, lambda k: 0.01, 9000, concurrency)
    assert 1.8 <= picks["a"] / picks["b"] <= 2.2, picks


def test_round_robin_equal_weights_cycle_in_order() -> None:
    """Equal weights: a, b, c, a, b, c..."""
    b, _ = balancer("round_robin", "abc")
    assert [b.pick().key for _ in range(7)] == list("abcabca")  # type: ignore[union-attr]


def test_round_robin_smooth_interleaving() -> None:
    """Weights 2:1 interleave as a, b, a (smooth weighted round robin)."""
    b, _ = balancer("round_robin", {"a": 2.0, "b": 1.0})
    assert [b.pick().key for _ in range(6)] == list("abaaba")  # type: ignore[union-attr]


def test_update_keeps_state_of_remaining_endpoints() -> None:
    """An endpoint that stays keeps its pending count, latency history and accrual."""
    b, clock = balancer("p2c_peak_ewma", "a")
    a = b.pick()
    assert a is not None
    b.start(a)
    b.finish(a, b.start(a), True)
    ewma, accrual = a.ewma, a.accrual
    b.update({"a": (3.0, {"zone": "z1"}), "b": (1.0, None)})
    same = next(ep for ep in b.endpoints() if ep.key == "a")
    assert same is a and a.pending == 1 and a.ewma is ewma and a.accrual is accrual
    assert a.weight == 3.0 and a.meta == {"zone": "z1"}
    assert [ep.key for ep in b.endpoints()] == ["a", "b"]


def test_removed_endpoint_finishes_harmlessly_and_is_never_picked() -> None:
    """In-flight requests of a removed endpoint finish normally; it gets no new ones."""
    b, clock = balancer("p2c_peak_ewma", "ab")
    eps = {ep.key: ep for ep in b.endpoints()}
    started = [b.start(eps["a"]) for _ in range(3)]
    b.update({"b": (1.0, None)})
    assert eps["a"].removed
    clock.t += 0.2
    for s in started:
        b.finish(eps["a"], s, False)
    fail(b, eps["a"], 10)  # even enough failures to trip accrual: no effect on the balancer
    assert eps["a"].pending == 0
    assert {b.pick().key for _ in range(50)} == {"b"}  # type: ignore[union-attr]
    b.update({"a": (1.0, None), "b": (1.0, None)})
    fresh = next(ep for ep in b.endpoints() if ep.key == "a")
    assert fresh is not eps["a"] and fresh.accrual.state == ALIVE and fresh.pending == 0


def test_finish_never_drives_pending_negative() -> None:
    """A double finish leaves pending at zero."""
    b, _ = balancer("p2c_least_loaded", "a")
    a = b.pick()
    assert a is not None
    s = b.start(a)
    b.finish(a, s, True)
    b.finish(a, s, True)
    assert a.pending == 0


@pytest.mark.parametrize("entry, match", [
    ((0, None), "weight"), ((-1.0, None), "weight"), ((float("nan"), None), "weight"),
    ((True, None), "weight"), (("1", None), "weight"), ((1.0, "zone=a"), "meta"),
    (1.0, "pair"),
])
def test_update_rejects_bad_entries_without_changing_state(entry: object, match: str) -> None:
    """A bad entry names its key and what is wrong; the old set stays in place."""
    b, _ = balancer("round_robin", "a")
    with pytest.raises(ValueError, match=f"endpoint 'bad'.*{match}"):
        b.update({"a": (1.0, None), "bad": entry})  # type: ignore[dict-item]
    assert [ep.key for ep in b.endpoints()] == ["a"]


@pytest.mark.parametrize("kind", KINDS)
def test_ejection_after_seven_consecutive_failures(kind: str) -> None:
    """Seven failures in a row eject 'a'; until its backoff ends only 'b' is picked."""
    b, clock = balancer(kind, "ab")
    a = next(ep for ep in b.endpoints() if ep.key == "a")
    fail(b, a, 6)
    assert a.accrual.state == ALIVE
    fail(b, a, 1)
    assert a.accrual.state == EJECTED
    assert a.accrual.until - clock.t <= 1.0
    assert {b.pick().key for _ in range(100)} == {"b"}  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", KINDS)
def test_probe_after_backoff_one_at_a_time_then_recovery(kind: str) -> None:
    """When due, the next pick is the probe; no second request until it ends; success
    brings the endpoint back into rotation."""
    b, clock = balancer(kind, "ab")
    a = next(ep for ep in b.endpoints() if ep.key == "a")
    fail(b, a, 7)
    clock.t = a.accrual.until
    probe = b.pick()
    assert probe is a and a.accrual.state == PROBING
    started = b.start(a)
    assert {b.pick().key for _ in range(50)} == {"b"}  # type: ignore[union-attr]
    clock.t += 0.01
    b.finish(a, started, True)
    assert a.accrual.state == ALIVE
    assert simulate(b, clock, lambda k: 0.01, 200, concurrency=4)["a"] > 50


def test_failed_probe_ejects_for_longer() -> None:
    """A failed probe ejects again with the next (nominally doubled) backoff delay."""
    b, clock = balancer("round_robin", "ab")
    a = next(ep for ep in b.endpoints() if ep.key == "a")
    fail(b, a, 7)
    first = a.accrual.until - clock.t
    clock.t = a.accrual.until
    assert b.pick() is a
    fail(b, a, 1)
    second = a.accrual.until - clock.t
    assert a.accrual.state == EJECTED
    assert 0.5 <= first <= 1.0 <= second <= 2.0
    assert a.accrual.ejections == 2


def test_all_ejected_returns_none_until_a_probe_is_due() -> None:
    """Every endpoint out: None (fail fast); each due endpoint gets exactly one probe."""
    b, clock = balancer("p2c_peak_ewma", "ab")
    eps = {ep.key: ep for ep in b.endpoints()}
    fail(b, eps["a"], 7)
    clock.t += 0.1
    fail(b, eps["b"], 7)
    assert b.pick() is None
    first, second = sorted(eps.values(), key=lambda ep: ep.accrual.until)
    assert first.accrual.until < second.accrual.until
    clock.t = first.accrual.until
    assert b.pick() is first
    probe = b.start(first)
    assert b.pick() is None  # first is probing, second not due yet
    clock.t = second.accrual.until
    assert b.pick() is second
    b.start(second)
    assert b.pick() is None  # both probing
    b.finish(first, probe, True)
    assert b.pick() is first


def test_probe_has_priority_over_live_endpoints() -> None:
    """A due probe is handed out first even though other endpoints are alive."""
    b, clock = balancer("p2c_peak_ewma", "abc")
    a = next(ep for ep in b.endpoints() if ep.key == "a")
    fail(b, a, 7)
    clock.t = a.accrual.until + 5.0
    assert b.pick() is a


def test_requests_in_flight_before_ejection_do_not_end_the_probe() -> None:
    """An old request finishing during the probe neither revives nor re-ejects."""
    b, clock = balancer("round_robin", "ab")
    a = next(ep for ep in b.endpoints() if ep.key == "a")
    old = b.start(a)
    fail(b, a, 7)
    clock.t = a.accrual.until
    assert b.pick() is a
    probe = b.start(a)
    b.finish(a, old, True)
    assert a.accrual.state == PROBING
    clock.t += 0.05
    b.finish(a, probe, False)
    assert a.accrual.state == EJECTED


def test_success_rate_accrual_ejects() -> None:
    """With the success-rate policy, a 50% endpoint is ejected; a healthy one is not."""
    rng = random.Random(2)
    make = accrual_factory("success_rate", rng, min_rate=0.8, window=30.0, min_requests=10)
    b, clock = balancer("p2c_least_loaded", "ab", accrual=make)
    eps = {ep.key: ep for ep in b.endpoints()}
    for i in range(20):
        clock.t += 0.1
        b.finish(eps["a"], b.start(eps["a"]), i % 2 == 0)
        b.finish(eps["b"], b.start(eps["b"]), i % 10 != 0)
    assert eps["a"].accrual.state == EJECTED
    assert eps["b"].accrual.state == ALIVE


def test_no_accrual_keeps_failing_endpoints() -> None:
    """accrual 'none': failures never take an endpoint out."""
    b, _ = balancer("round_robin", "a", accrual=accrual_factory("none", random.Random(0)))
    a = b.pick()
    assert a is not None
    fail(b, a, 100)
    assert b.pick() is a


@pytest.mark.parametrize("kind, cls", [
    ("p2c_peak_ewma", P2CPeakEwma), ("ewma", P2CPeakEwma),
    ("p2c_least_loaded", P2CLeastLoaded), ("p2c", P2CLeastLoaded),
    ("round_robin", RoundRobin),
])
def test_make_balancer_kinds(kind: str, cls: type) -> None:
    """Our names and linkerd's aliases map to the right class."""
    assert type(make_balancer(kind, FakeClock(), random.Random(0))) is cls


@pytest.mark.parametrize("kind, opts, match", [
    ("aperture", {}, "unknown balancer kind 'aperture'"),
    ("round_robin", {"max_effort": 5}, "does not take max_effort"),
    ("p2c_peak_ewma", {"decay": 0}, "decay"),
    ("p2c_peak_ewma", {"default_rtt": -1}, "default_rtt"),
])
def test_make_balancer_errors(kind: str, opts: dict[str, object], match: str) -> None:
    """Unknown kinds and options are rejected by name."""
    with pytest.raises(ValueError, match=match):
        make_balancer(kind, FakeClock(), random.Random(0), **opts)


def test_same_seed_same_choices() -> None:
    """Seeded rng and fake clock: two runs pick identically."""
    runs = []
    for _ in range(2):
        b, clock = balancer("p2c_peak_ewma", "abcdef", seed=99)
        order = []
        for i in range(300):
            ep = b.pick()
            assert ep is not None
            order.append(ep.key)
            s = b.start(ep)
            clock.t += 0.001 * (1 + i % 7)
            b.finish(ep, s, True)
        runs.append(order)
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 6
