"""Drive a namer from a test: run a scenario on uvloop, wait for a watch's state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from appliance.discovery.base import AddrState, NamerContext, Watch

Reports = list[tuple[str, tuple[str, ...], bool, str]]


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
