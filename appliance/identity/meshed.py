"""Is this destination meshed, and with which identity? A cached client of the service.

The outbound proxy asks before it originates mesh TLS. Answers are cached per address:
a meshed answer until ``positive_ttl`` passes or the peer's certificate expires, whichever is
first; a "not meshed" answer for ``negative_ttl`` (short, so a workload that just joined the
mesh is seen soon). Concurrent lookups of one address share one request. When the service
cannot be reached, the last answer is used even if its TTL passed (a meshed one only while
the peer's certificate is still valid); with no answer at all the lookup raises
:class:`MeshedLookupError` and the caller decides (see docs/identity.md).

:class:`MeshedCache` is pure (the caller passes ``now``) so its TTL and LRU rules are
tested exactly; :class:`MeshedLookup` adds the I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

from appliance.identity.client import IdentityServiceError, MeshedPeer
from certs.meshed import normalize_ip


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()
Answer = MeshedPeer | None
Query = Callable[[Sequence[str]], Awaitable[Mapping[str, Answer]]]


class MeshedLookupError(Exception):
    """Nothing is known about the address and the identity service did not answer."""


class MeshedCache:
    """Address -> answer with a freshness deadline; least recently used entries go first."""

    def __init__(self, *, positive_ttl: float = 30.0, negative_ttl: float = 5.0,
                 max_entries: int = 4096) -> None:
        if positive_ttl <= 0 or negative_ttl <= 0 or max_entries < 1:
            raise ValueError("meshed cache: TTLs must be > 0 and max_entries >= 1")
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[Answer, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, address: str, answer: Answer, now: float) -> None:
        if answer is None:
            fresh_until = now + self.negative_ttl
        else:
            fresh_until = min(now + self.positive_ttl, answer.expiry)
        self._entries[address] = (answer, fresh_until)
        self._entries.move_to_end(address)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, address: str, now: float) -> Answer | _Missing:
        """A fresh answer, or MISSING."""
        entry = self._entries.get(address)
        if entry is None or now >= entry[1]:
            return MISSING
        self._entries.move_to_end(address)
        return entry[0]

    def stale(self, address: str, now: float) -> Answer | _Missing:
        """The last answer even if not fresh; a meshed one only before its expiry."""
        entry = self._entries.get(address)
        if entry is None:
            return MISSING
        answer = entry[0]
        if answer is not None and now >= answer.expiry:
            return MISSING
        return answer


class MeshedLookup:
    """Cached, coalesced lookups through ``query`` (normally IdentityClient.meshed)."""

    def __init__(self, query: Query, *, clock: Callable[[], float] = time.time,
                 cache: MeshedCache | None = None) -> None:
        self._query = query
        self._clock = clock
        self.cache = cache if cache is not None else MeshedCache()
        self._inflight: dict[str, asyncio.Task[Answer]] = {}
        self.requests = 0

    def cached(self, address: str) -> Answer | _Missing:
        """The fresh cached answer, without I/O (MISSING if there is none)."""
        return self.cache.get(normalize_ip(address), self._clock())

    async def lookup(self, address: str) -> Answer:
        """The peer identity at ``address``, or None when it is not meshed."""
        addr = normalize_ip(address)
        hit = self.cache.get(addr, self._clock())
        if not isinstance(hit, _Missing):
            return hit
        task = self._inflight.get(addr)
        if task is None:
            task = asyncio.create_task(self._fetch(addr))
            self._inflight[addr] = task
            task.add_done_callback(self._forget)
        return await asyncio.shield(task)

    def _forget(self, task: asyncio.Task[Answer]) -> None:
        for addr, held in list(self._inflight.items()):
            if held is task:
                del self._inflight[addr]

    async def _fetch(self, addr: str) -> Answer:
        self.requests += 1
        try:
            answers = await self._query([addr])
        except IdentityServiceError as exc:
            old = self.cache.stale(addr, self._clock())
            if isinstance(old, _Missing):
                raise MeshedLookupError(f"meshed lookup of {addr}: {exc}") from None
            return old
        answer = answers.get(addr)
        self.cache.put(addr, answer, self._clock())
        return answer

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
