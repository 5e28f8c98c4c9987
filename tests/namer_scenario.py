"""Drive a namer from a test: run a scenario on uvloop, wait for a watch's state or for a
condition, fast timing options and a fixed random source for exact backoff."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop
from fakeapis import hostports

from appliance.discovery.base import AddrState, NamerContext, Watch

Reports = list[tuple[str, tuple[str, ...], bool, str]]

# Timing options for the Consul and Kubernetes namers that keep tests quick.
FAST = {"min_delay": 0.01, "backoff_base": 0.05, "backoff_max": 0.2, "timeout": 2}


class FixedRandom(random.Random):
    """random() always returns ``value``: backoff delays become exact."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def run(scenario: Callable[[NamerContext, Reports], Coroutine[Any, Any, None]]
        ) -> Reports:
    """Run ``scenario`` on uvloop (as the proxy does) with a recording context."""
    reports: Reports = []
    ctx = NamerContext(spawn=lambda coro: asyncio.get_running_loop().create_task(coro),
                       report=lambda *args: reports.append(args))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario(ctx, reports))
    return reports


async def wait_state(watch: Watch, predicate: Callable[[AddrState], bool],
                     timeout: float = 10.0) -> AddrState:
    """The first state of ``watch`` (now or later) for which ``predicate`` holds."""
    done: asyncio.Future[AddrState] = asyncio.get_running_loop().create_future()

    def seen(state: AddrState) -> None:
        if predicate(state) and not done.done():
            done.set_result(state)

    cancel = watch.subscribe(seen)
    try:
        return await asyncio.wait_for(done, timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s; last state {watch.state}") from None
    finally:
        cancel()


def fresh(*hostport: str) -> Callable[[AddrState], bool]:
    """Bound, not stale, to exactly these ``host:port`` addresses."""
    return lambda s: s.kind == "bound" and not s.stale and hostports(s) == set(hostport)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition on the API server's side, with a deadline."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
