"""appliance.identity.meshed: the cache's TTL and LRU rules, coalescing and outages."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.identity.client import IdentityServiceError, MeshedPeer
from appliance.identity.meshed import MISSING, MeshedCache, MeshedLookup, MeshedLookupError

WEB = "spiffe://example.org/ns/default/sa/web"


def _peer(expiry: float, addr: str = "10.0.0.1") -> MeshedPeer:
    return MeshedPeer(addr, WEB, expiry)


@pytest.mark.parametrize("answer, put_at, get_at, fresh", [
    (_peer(1000.0), 0.0, 29.9, True),      # positive: 30 s
    (_peer(1000.0), 0.0, 30.0, False),
    (_peer(10.0), 0.0, 9.9, True),         # capped by the peer's certificate expiry
    (_peer(10.0), 0.0, 10.0, False),
    (None, 0.0, 4.9, True),                # negative: 5 s
    (None, 0.0, 5.0, False),
])
def test_cache_freshness(answer: MeshedPeer | None, put_at: float, get_at: float,
                         fresh: bool) -> None:
    """Meshed answers live 30 s or until the peer's certificate expires; others 5 s."""
    cache = MeshedCache()
    cache.put("10.0.0.1", answer, put_at)
    assert cache.get("10.0.0.1", get_at) == (answer if fresh else MISSING)


def test_cache_stale_rules() -> None:
    """Stale answers serve an outage: a meshed one only before its certificate expires."""
    cache = MeshedCache()
    cache.put("a", _peer(100.0), 0.0)
    cache.put("b", None, 0.0)
    assert cache.stale("a", 99.0) == _peer(100.0)
    assert cache.stale("a", 100.0) is MISSING
    assert cache.stale("b", 1e9) is None
    assert cache.stale("c", 0.0) is MISSING


def test_cache_lru_bound() -> None:
    """Beyond max_entries the least recently used entry goes."""
    cache = MeshedCache(max_entries=2)
    cache.put("a", None, 0.0)
    cache.put("b", None, 0.0)
    assert cache.get("a", 1.0) is None  # touch a
    cache.put("c", None, 1.0)
    assert len(cache) == 2
    assert cache.get("b", 1.0) is MISSING and cache.get("a", 1.0) is None


def test_cache_arguments_checked() -> None:
    """Nonsense TTLs and sizes are refused."""
    with pytest.raises(ValueError, match="TTLs must be > 0"):
        MeshedCache(positive_ttl=0)
    with pytest.raises(ValueError, match="max_entries"):
        MeshedCache(max_entries=0)


@given(st.lists(st.tuples(st.floats(0, 100), st.one_of(st.none(), st.floats(0, 200))),
                min_size=1, max_size=30), st.floats(0, 300))
def test_cache_never_serves_past_deadline(puts: list[tuple[float, float | None]],
                                          probe: float) -> None:
    """After any sequence of puts, get() returns the last answer exactly while it is fresh."""
    cache = MeshedCache()
    now = 0.0
    last: tuple[MeshedPeer | None, float] | None = None
    for step, expiry in puts:
        now += step
        answer = None if expiry is None else _peer(now + expiry)
        cache.put("x", answer, now)
        last = (answer, now)
    assert last is not None
    answer, at = last
    when = at + probe
    deadline = at + 5.0 if answer is None else min(at + 30.0, answer.expiry)
    assert cache.get("x", when) == (answer if when < deadline else MISSING)


class FakeService:
    """A meshed query that counts calls and can fail or be slow."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.down = False
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, addrs: Sequence[str]) -> Mapping[str, MeshedPeer | None]:
        self.calls.append(list(addrs))
        await self.gate.wait()
        if self.down:
            raise IdentityServiceError("identity service 127.0.0.1:1: connect failed")
        return {a: (_peer(1e12, a) if a.startswith("10.") else None) for a in addrs}


def test_lookup_coalesces_and_caches() -> None:
    """Ten concurrent lookups of one address make one request; later ones hit the cache;
    IPv4-mapped addresses meet their IPv4 form."""
    async def main() -> None:
        svc = FakeService()
        now = [0.0]
        lookup = MeshedLookup(svc, clock=lambda: now[0])
        svc.gate.clear()
        tasks = [asyncio.create_task(lookup.lookup("10.0.0.1")) for _ in range(10)]
        await asyncio.sleep(0)
        svc.gate.set()
        results = await asyncio.gather(*tasks)
        assert {r.identity for r in results if r} == {WEB} and len(svc.calls) == 1
        assert (await lookup.lookup("::ffff:10.0.0.1")) == results[0]
        assert lookup.cached("10.0.0.1") == results[0]
        assert await lookup.lookup("192.0.2.1") is None
        assert len(svc.calls) == 2
        now[0] = 31.0
        assert lookup.cached("10.0.0.1") is MISSING
        await lookup.lookup("10.0.0.1")
        assert len(svc.calls) == 3

    asyncio.run(main())


def test_lookup_during_outage() -> None:
    """With the service down, a known address gets its last answer; an unknown one raises
    MeshedLookupError naming the address and the reason."""
    async def main() -> None:
        svc = FakeService()
        now = [0.0]
        lookup = MeshedLookup(svc, clock=lambda: now[0])
        known = await lookup.lookup("10.0.0.1")
        svc.down = True
        now[0] = 100.0
        assert await lookup.lookup("10.0.0.1") == known
        with pytest.raises(MeshedLookupError, match="meshed lookup of 10.0.0.2: .*connect"):
            await lookup.lookup("10.0.0.2")
        with pytest.raises(ValueError, match="not an IP address"):
            await lookup.lookup("web")

    asyncio.run(main())
