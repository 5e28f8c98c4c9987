"""Consul namer: the pure blocking-query rules, then the namer against the local stand-in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fakeapis import FakeConsul, Harness, StateLog, harnessed, hostports
from hypothesis import given
from hypothesis import strategies as st
from namer_scenario import FAST, FixedRandom, fresh

from appliance.discovery.base import NEG, Address, AddrState
from appliance.discovery.consul import (
    Backoff,
    ConsulOptions,
    ConsulQuery,
    DecodeError,
    Failure,
    Update,
    decode_health,
    health_path,
    next_index,
    parse_name,
)
from appliance.discovery.registry import build_namers
from appliance.net.namer_consul import ConsulNamer


def entry(address: str, port: int, *, node_address: str = "10.0.0.9", weight: Any = 3,
          meta: dict[str, str] | None = None) -> dict[str, Any]:
    return {"Node": {"Node": "n1", "Address": node_address, "Datacenter": "dc9"},
            "Service": {"ID": "web-1", "Service": "web", "Address": address, "Port": port,
                        "Meta": meta or {}, "Weights": {"Passing": weight, "Warning": 1}},
            "Checks": []}


# -- pure -------------------------------------------------------------------------------


@pytest.mark.parametrize("previous, header, expected", [
    (0, "5", 5),        # first answer
    (5, "9", 9),        # moved forward
    (5, "5", 5),        # wait elapsed, nothing changed
    (9, "3", 0),        # went backwards: reset, read afresh
    (5, "0", 1),        # never block on 0
    (0, "-2", 1),
    (5, None, 0),       # no header: plain reads (rate-limited by min_delay)
    (5, "abc", 0),
])
def test_next_index_rules(previous: int, header: str | None, expected: int) -> None:
    """Consul's documented index rules: reset when backwards, never 0 after an answer."""
    assert next_index(previous, header) == expected


@pytest.mark.parametrize("name, expected", [
    ((".local", "web"), (None, "web")),
    (("dc2", "web"), ("dc2", "web")),
])
def test_parse_name(name: tuple[str, str], expected: tuple[str | None, str]) -> None:
    """``.local`` is the agent's datacenter (no dc parameter)."""
    assert parse_name(name) == expected


@pytest.mark.parametrize("name", [("web",), ("dc1", "web", "x"), ("", "web"), ("dc1", "")])
def test_parse_name_rejects(name: tuple[str, ...]) -> None:
    """Wrong segment counts and empty segments are errors naming the namer."""
    with pytest.raises(ValueError, match="io.l5d.consul"):
        parse_name(name)


@pytest.mark.parametrize("options, dc, service, index, path", [
    ({}, None, "web", 0, "/v1/health/service/web?passing=true"),
    ({}, "dc2", "web", 7, "/v1/health/service/web?passing=true&dc=dc2&index=7&wait=60s"),
    ({"tag": "v2", "consistency_mode": "stale", "wait": 30}, None, "a b/c", 3,
     "/v1/health/service/a%20b%2Fc?passing=true&tag=v2&stale=&index=3&wait=30s"),
    ({"consistency_mode": "consistent"}, None, "web", 0,
     "/v1/health/service/web?passing=true&consistent="),
])
def test_health_path(options: dict[str, Any], dc: str | None, service: str, index: int,
                     path: str) -> None:
    """Query parameters: passing, dc unless local, tag, consistency, index and wait."""
    assert health_path(service, dc, ConsulOptions.from_mapping(options), index) == path


@pytest.mark.parametrize("options, message", [
    ({"port": 0}, "port: bad value 0"),
    ({"port": "http"}, "port: bad value 'http'"),
    ({"host": ""}, "host: bad value ''"),
    ({"wait": 900}, "wait: bad value 900"),
    ({"consistency_mode": "eventual"}, "consistency_mode: bad value 'eventual'"),
    ({"scheme": "tcp"}, "scheme: bad value 'tcp'"),
    ({"min_delay": -1}, "min_delay: bad value -1"),
    ({"backoff_base": 5, "backoff_max": 1}, "backoff_max: bad value 1"),
    ({"tokn": "x"}, "tokn: unknown option"),
])
def test_bad_options_name_the_option(options: dict[str, Any], message: str) -> None:
    """Every invalid option is a ValueError that begins with the option's name."""
    with pytest.raises(ValueError) as info:
        ConsulOptions.from_mapping(options)
    assert str(info.value).startswith(message)


def test_options_from_strings_and_defaults() -> None:
    """Defaults are linkerd's agent address; numbers may come as strings (environment)."""
    opts = ConsulOptions.from_mapping({"port": "8501", "wait": "10", "kind": "io.l5d.consul"})
    assert (opts.host, opts.port, opts.wait, opts.min_delay) == ("127.0.0.1", 8501, 10.0, 0.5)
    assert opts.base_url == "http://127.0.0.1:8501"


def test_decode_health_addresses_weights_meta() -> None:
    """Service.Address first, else Node.Address; weight from Weights.Passing; meta."""
    body = json.dumps([entry("10.1.0.1", 80, meta={"version": "2"}),
                       entry("", 81, node_address="10.0.0.2", weight=None),
                       entry("10.1.0.3", 0)]).encode()
    state = decode_health(body, None)
    assert state.kind == "bound"
    by_host = {a.host: a for a in state.addrs}
    assert set(by_host) == {"10.1.0.1", "10.0.0.2"}  # the portless one is left out
    first = by_host["10.1.0.1"]
    assert (first.port, first.weight) == (80, 3.0)
    assert dict(first.meta) == {"version": "2", "datacenter": "dc9", "node": "n1"}
    assert by_host["10.0.0.2"].weight == 1.0
    assert decode_health(body, "dc1").addrs == frozenset(
        Address(a.host, a.port, a.weight, {**a.meta, "datacenter": "dc1"})
        for a in state.addrs)


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not JSON"),
    (b'{"a": 1}', "expected a JSON list"),
    (b"[1]", "entry 0: not an object"),
    (b'[{"Node": {}}]', "entry 0: no Node or Service"),
    (b'[{"Node": {}, "Service": {"Port": 80}}]', "entry 0: no Service.Address"),
])
def test_decode_health_rejects(body: bytes, message: str) -> None:
    """A body that is not the health API's shape is a DecodeError saying where."""
    with pytest.raises(DecodeError, match=message):
        decode_health(body, None)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["Node", "Service", "Address", "Port", "Weights", "Passing", "Meta",
                         "Datacenter", "x"]), inner, max_size=5),
    max_leaves=20)


@given(st.lists(JSON, max_size=3))
def test_decode_health_never_crashes(entries: list[Any]) -> None:
    """Any JSON is a state or a DecodeError, never another exception."""
    try:
        state = decode_health(json.dumps(entries).encode(), "dc1")
    except DecodeError:
        return
    assert state.kind in ("bound", "neg")
    assert all(0 < a.port < 65536 and a.weight > 0 for a in state.addrs)


def test_empty_list_is_neg() -> None:
    """No passing instance (or no such service) is neg, so a dtab can fall back."""
    assert decode_health(b"[]", None) == NEG


def query(**options: Any) -> ConsulQuery:
    opts = ConsulOptions.from_mapping({"min_delay": 1, "backoff_base": 2, "backoff_max": 10,
                                       **options})
    return ConsulQuery(("dc1", "web"), opts, Backoff(opts.backoff_base, opts.backoff_max,
                                                     FixedRandom(0.5)))


def test_query_timing_min_delay_and_backoff() -> None:
    """Successes are min_delay apart from the previous send; failures back off, doubling."""
    q = query()
    assert q.delay(100.0) == 0.0
    q.sent(100.0)
    ok = q.on_response(100.2, 200, {"x-consul-index": "4"}, b"[]")
    assert ok == Update(NEG) and q.index == 4
    assert q.delay(100.2) == pytest.approx(0.8)  # 1 s after the send, not after the answer
    q.sent(101.0)
    assert q.on_error(101.0, "down") == Failure("down")
    assert q.delay(101.0) == pytest.approx(1.5)  # base 2: between 1 and 2, rng 0.5
    q.on_error(103.0, "down")
    assert q.delay(103.0) == pytest.approx(3.0)  # 4 -> 3
    for now in (110.0, 120.0, 130.0):
        q.on_error(now, "down")
    assert q.delay(130.0) == pytest.approx(7.5)  # capped at 10 -> 7.5
    q.sent(140.0)
    q.on_response(140.0, 200, {"x-consul-index": "5"}, b"[]")
    assert q.failures == 0 and q.delay(140.0) == pytest.approx(1.0)


def test_query_failures_keep_the_index_and_name_the_cause() -> None:
    """A non-200 or a bad body is a Failure; the index is kept for the retry."""
    q = query(token="s3cret")
    q.on_response(0.0, 200, {"x-consul-index": "8"}, b"[]")
    assert q.headers == {"X-Consul-Token": "s3cret"}
    assert q.on_response(1.0, 403, {}, b"ACL not found") == Failure(
        "consul answered 403: ACL not found")
    bad = q.on_response(2.0, 200, {"x-consul-index": "9"}, b"<html>")
    assert isinstance(bad, Failure) and "bad health list: not JSON" in bad.error
    assert q.index == 8 and "index=8" in q.path


def test_query_unknown_datacenter_is_neg_and_rechecked_slowly() -> None:
    """500 "No path to datacenter" is neg (dtab fallback), re-asked after backoff_max."""
    q = query()
    q.sent(0.0)
    out = q.on_response(0.0, 500, {}, b"No path to datacenter")
    assert out == Update(AddrState("neg", error="consul: no datacenter 'dc1'"))
    assert q.delay(0.0) == 10.0


def test_query_timeout_covers_wait_and_jitter() -> None:
    """A blocking read may take wait + wait/16; a plain read only the connect allowance."""
    q = query(wait=32, timeout=5)
    assert q.timeout == 5
    q.on_response(0.0, 200, {"x-consul-index": "3"}, b"[]")
    assert q.timeout == 32 + 2 + 5


@given(st.floats(0.001, 10), st.floats(0.001, 100), st.integers(1, 200),
       st.floats(0, 1, exclude_max=True))
def test_backoff_bounds(base: float, cap: float, failures: int, draw: float) -> None:
    """Each delay is between half and all of min(cap, base * 2**(n-1))."""
    ceiling = min(cap, base * 2.0 ** min(failures - 1, 60))
    delay = Backoff(base, cap, FixedRandom(draw)).delay(failures)
    assert ceiling / 2 <= delay <= ceiling


# -- the namer against the stand-in ----------------------------------------------------

Scenario = Callable[[FakeConsul, ConsulNamer, Harness], Awaitable[None]]


@asynccontextmanager
async def consul_namer(**options: Any) -> AsyncIterator[tuple[FakeConsul, ConsulNamer,
                                                               Harness]]:
    async with FakeConsul() as agent, harnessed(lambda ctx: ConsulNamer.from_options(
            {"port": agent.port, **FAST, **options}, ctx)) as (namer, harness):
        yield agent, namer, harness


def run(scenario: Scenario, **options: Any) -> None:
    async def main() -> None:
        async with consul_namer(**options) as (agent, namer, harness):
            await scenario(agent, namer, harness)
    asyncio.run(main())


def test_updates_are_pushed_through_the_watch() -> None:
    """Registering, failing health and deregistering reach the watch within a deadline."""
    async def scenario(agent: FakeConsul, namer: ConsulNamer, harness: Harness) -> None:
        agent.register("web", "w1", "10.1.0.1", 8080, meta={"version": "1"})
        log = StateLog(namer.watch((".local", "web")))
        state = await log.until(fresh("10.1.0.1:8080"))
        assert dict(next(iter(state.addrs)).meta) == {"version": "1", "datacenter": "dc1",
                                                       "node": "node1"}
        agent.register("web", "w2", "10.1.0.2", 8080, weight=5)
        state = await log.until(fresh("10.1.0.1:8080", "10.1.0.2:8080"))
        assert {a.weight for a in state.addrs} == {1.0, 5.0}
        agent.set_passing("web", "w1", False)
        await log.until(fresh("10.1.0.2:8080"))
        agent.deregister("web", "w2")
        await log.until(lambda s: s.kind == "neg")
        assert harness.failures() == []
    run(scenario)


def test_blocking_queries_carry_the_last_index_and_wait() -> None:
    """Each read after the first blocks on the X-Consul-Index of the previous answer."""
    async def scenario(agent: FakeConsul, namer: ConsulNamer, harness: Harness) -> None:
        agent.register("web", "w1", "10.1.0.1", 80)
        log = StateLog(namer.watch(("dc1", "web")))
        await log.until(fresh("10.1.0.1:80"))
        first_index = agent.index
        agent.register("web", "w2", "10.1.0.2", 80)
        await log.until(fresh("10.1.0.1:80", "10.1.0.2:80"))
        reqs = agent.health_requests("web")
        assert "index" not in reqs[0].query
        assert reqs[1].query["index"] == [str(first_index)]
        assert reqs[1].query["wait"] == ["7s"] and reqs[1].query["dc"] == ["dc1"]
        # blocked, not polling: the next read is held by the agent
        await asyncio.wait_for(_until(lambda: agent.blocked == 1), 5)
        assert agent.health_requests("web")[-1].query["index"] == [str(agent.index)]
    run(scenario, wait=7)


def test_index_going_backwards_resets_and_updates_still_flow() -> None:
    """After a snapshot restore lowers the index, the namer re-reads and keeps following."""
    async def scenario(agent: FakeConsul, namer: ConsulNamer, harness: Harness) -> None:
        for i in range(5):
            agent.register("web", f"w{i}", f"10.1.0.{i}", 80)
        log = StateLog(namer.watch(("dc1", "web")))
        await log.until(lambda s: len(s.addrs) == 5)
        await asyncio.wait_for(_until(lambda: agent.blocked == 1), 5)
        agent.restore_snapshot(3)  # wakes the blocked read with index 3 < 15
        await asyncio.wait_for(_until(lambda: sum(
            "index" not in r.query for r in agent.health_requests("web")) == 2), 5)
        agent.register("web", "w9", "10.1.0.9", 80)
        await log.until(lambda s: len(s.addrs) == 6)
    run(scenario)


async def _until(predicate: Callable[[], bool]) -> None:
    """Poll a condition on the agent's side (callers bound it with wait_for)."""
    while not predicate():
        await asyncio.sleep(0.01)


def test_requests_are_at_least_min_delay_apart() -> None:
    """A service changing constantly is read no more often than min_delay allows."""
    async def scenario(agent: FakeConsul, namer: ConsulNamer, harness: Harness) -> None:
        agent.register("web", "w0", "10.1.0.0", 80)
        log = StateLog(namer.watch(("dc1", "web")))
        await log.until(lambda s: s.kind == "bound")
        for i in range(1, 9):  # a change every 0.1 s for 0.8 s
            agent.register("web", f"w{i}", f"10.1.0.{i}", 80)
            await asyncio.sleep(0.1)
        await log.until(lambda s: len(s.addrs) == 9)
        times = [r.at for r in agent.health_requests("web")]
        assert 3 <= len(times) <= 5  # not one per change
        assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 0.25
    run(scenario, min_delay=0.3)


def test_unknown_service_is_neg_until_registered() -> None:
    """A missing service is neg; when it appears the same watch binds."""
    async def scenario(agent: FakeConsul, namer: ConsulNamer, harness: Harness) -> None:
        log = StateLog(namer.watch(("dc1", "later")))
        await log.until(lambda s: s.kind == "neg")
        agent.register("later", "l1", "10.2.0.1", 90)
        await log.until(lambda s: hostports(s) == {"10.2.0.1:90"})
    run(scenario)


def test_token_tag_and_consistency_reach_the_agent() -> None:
    """X-Consul-Token, tag and stale are sent; only tagged instances are bound."""
    async def scenario(agent: FakeConsul, namer: ConsulNamer, harness: Harness) -> None:
        agent.acl_token = "s3cret"
        agent.register("web", "w1", "10.1.0.1", 80, tags=("canary",))
        agent.register("web", "w2", "10.1.0.2", 80)
        log = StateLog(namer.watch(("dc1", "web")))
        await log.until(fresh("10.1.0.1:80"))
        request = agent.health_requests("web")[0]
        assert request.headers["x-consul-token"] == "s3cret"
        assert request.query["tag"] == ["canary"] and "stale" in request.query
    run(scenario, token="s3cret", tag="canary", consistency_mode="stale")


def test_wrong_token_fails_and_is_reported() -> None:
    """403 from the agent: the watch fails and the report names the status."""
    async def scenario(agent: FakeConsul, namer: ConsulNamer, harness: Harness) -> None:
        agent.acl_token = "right"
        log = StateLog(namer.watch(("dc1", "web")))
        state = await log.until(lambda s: s.kind == "failed")
        assert state.error == "consul answered 403: ACL not found"
        assert harness.failures()[0] == state.error
    run(scenario, token="wrong")


def test_outage_keeps_last_good_stale_then_recovers() -> None:
    """Agent down: the last set stays, stale, reported; agent back: fresh again."""
    async def scenario(agent: FakeConsul, namer: ConsulNamer, harness: Harness) -> None:
        agent.register("web", "w1", "10.1.0.1", 80)
        log = StateLog(namer.watch(("dc1", "web")))
        await log.until(fresh("10.1.0.1:80"))
        await agent.go_down()
        stale = await log.until(lambda s: s.stale)
        assert stale.kind == "bound" and hostports(stale) == {"10.1.0.1:80"}
        assert "connect failed" in stale.error or "closed" in stale.error
        await asyncio.sleep(0.3)  # several retries at backoff_max 0.2
        assert len(harness.failures()) >= 2 and log.last.stale
        agent.register("web", "w2", "10.1.0.2", 80)
        await agent.go_up()
        await log.until(fresh("10.1.0.1:80", "10.1.0.2:80"))
        assert harness.reports[-1][2] is True
    run(scenario)


def test_bad_json_keeps_last_good_and_is_reported() -> None:
    """A garbled answer: last good set kept (stale), reported; the next answer heals it."""
    async def scenario(agent: FakeConsul, namer: ConsulNamer, harness: Harness) -> None:
        agent.register("web", "w1", "10.1.0.1", 80)
        log = StateLog(namer.watch(("dc1", "web")))
        await log.until(fresh("10.1.0.1:80"))
        agent.bodies.append(b'[{"Node": ')
        agent.register("web", "w2", "10.1.0.2", 80)
        stale = await log.until(lambda s: s.stale)
        assert hostports(stale) == {"10.1.0.1:80"} and "not JSON" in stale.error
        assert any("not JSON" in e for e in harness.failures())
        await log.until(fresh("10.1.0.1:80", "10.1.0.2:80"))
    run(scenario)


def test_unknown_datacenter_is_neg() -> None:
    """A datacenter the agent cannot reach is neg with an error saying so."""
    async def scenario(agent: FakeConsul, namer: ConsulNamer, harness: Harness) -> None:
        state = await StateLog(namer.watch(("mars", "web"))).until(lambda s: s.kind == "neg")
        assert state.error == "consul: no datacenter 'mars'"
    run(scenario)


def test_one_source_per_name_and_close_stops_it() -> None:
    """Watching a name twice shares one source; close() cancels it."""
    async def scenario(agent: FakeConsul, namer: ConsulNamer, harness: Harness) -> None:
        assert namer.watch(("dc1", "web")) is namer.watch(("dc1", "web"))
        assert len(harness.tasks) == 1
        namer.close()
        await asyncio.gather(*harness.tasks, return_exceptions=True)
        assert harness.tasks[0].cancelled()
    run(scenario)


def test_bad_name_is_neg_without_a_source() -> None:
    """An invalid name gives a neg watch naming the problem and starts nothing."""
    async def scenario(agent: FakeConsul, namer: ConsulNamer, harness: Harness) -> None:
        watch = namer.watch(("", "web"))
        assert watch.state.kind == "neg" and "empty datacenter" in watch.state.error
        assert harness.tasks == []
    run(scenario)


def test_registry_builds_the_namer_lazily() -> None:
    """``kind: io.l5d.consul`` in the namers list builds a ConsulNamer; errors are indexed."""
    harness = Harness()
    namers = build_namers([{"kind": "io.l5d.consul", "host": "127.0.0.1", "port": 8500}],
                          harness.ctx)
    assert isinstance(namers[("#", "io.l5d.consul")], ConsulNamer)
    with pytest.raises(ValueError, match=r"namers\[0\]\.port: bad value 'x'"):
        build_namers([{"kind": "io.l5d.consul", "port": "x"}], harness.ctx)


def test_a_bug_is_reported_and_the_source_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception is a reported failure, not the end of the name's source."""
    real = ConsulQuery.on_response
    calls = []

    def flaky(self: ConsulQuery, *args: Any) -> Update | Failure:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(self, *args)
    monkeypatch.setattr(ConsulQuery, "on_response", flaky)

    async def scenario(agent: FakeConsul, namer: ConsulNamer, harness: Harness) -> None:
        agent.register("web", "w1", "10.1.0.1", 80)
        log = StateLog(namer.watch(("dc1", "web")))
        await log.until(fresh("10.1.0.1:80"))
        assert log.states[1].error == "internal error: RuntimeError('boom')"
    run(scenario)
