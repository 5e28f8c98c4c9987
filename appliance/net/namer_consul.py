"""The Consul namer (``kind: io.l5d.consul``): blocking queries on the health API.

One task per watched name runs the loop that :class:`~appliance.discovery.consul.ConsulQuery`
decides: wait what it says, GET the health API, hand it the answer, push the outcome to
the :class:`Watch` and to ``ctx.report``. All timing and index rules live in the pure
module; this one only awaits.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Mapping
from typing import Any

from appliance.discovery.base import AddrState, Name, Namer, NamerContext, Watch
from appliance.discovery.consul import KIND, ConsulOptions, ConsulQuery
from appliance.discovery.registry import register
from appliance.discovery.remote import Backoff, Failure, Update
from appliance.net import httpclient
from appliance.net.namer_loop import cancel_all

log = logging.getLogger(__name__)


def tls_context(ca_file: str | None, option: str = "ca_file") -> ssl.SSLContext:
    """A verifying client context; ``ValueError`` names ``option`` if the file is bad."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{option}: cannot load {ca_file!r}: {exc}") from None


class ConsulNamer(Namer):
    """``/#/io.l5d.consul/<datacenter>/<service>``: the passing instances of a service."""

    kind = KIND
    segments = 2

    def __init__(self, opts: ConsulOptions, ctx: NamerContext,
                 rng: random.Random | None = None) -> None:
        self.opts = opts
        self.ctx = ctx
        self.rng = rng or random.Random()
        self._ssl = tls_context(opts.ca_file) if opts.scheme == "https" else None
        self._watches: dict[Name, Watch] = {}
        self._tasks: list[Any] = []

    @classmethod
    def from_options(cls, options: Mapping[str, Any], ctx: NamerContext) -> ConsulNamer:
        return cls(ConsulOptions.from_mapping(options), ctx)

    def watch(self, name: Name) -> Watch:
        watch = self._watches.get(name)
        if watch is not None:
            return watch
        try:
            query = ConsulQuery(name, self.opts,
                                Backoff(self.opts.backoff_base, self.opts.backoff_max,
                                        self.rng))
        except ValueError as exc:
            watch = self._watches[name] = Watch(AddrState("neg", error=str(exc)))
            return watch
        watch = self._watches[name] = Watch()
        self._tasks.append(self.ctx.spawn(self._run(name, query, watch)))
        return watch

    def close(self) -> None:
        cancel_all(self._tasks)

    async def _run(self, name: Name, query: ConsulQuery, watch: Watch) -> None:
        clock = self.ctx.clock
        while True:
            await asyncio.sleep(query.delay(clock()))
            query.sent(clock())
            try:
                outcome = await self._ask(query)
            except Exception as exc:  # a bug must not end discovery of this name
                log.exception("discovery: %s %s: internal error", KIND, "/".join(name))
                outcome = query.on_error(clock(), f"internal error: {exc!r}")
            self._publish(name, watch, outcome)

    async def _ask(self, query: ConsulQuery) -> Update | Failure:
        try:
            response = await httpclient.get(self.opts.base_url + query.path, query.headers,
                                            ssl=self._ssl, timeout=query.timeout)
        except httpclient.HTTPClientError as exc:
            return query.on_error(self.ctx.clock(), str(exc))
        return query.on_response(self.ctx.clock(), response.status, response.headers,
                                 response.body)

    def _publish(self, name: Name, watch: Watch, outcome: Update | Failure) -> None:
        if isinstance(outcome, Update):
            watch.set(outcome.state)
            self.ctx.report(KIND, name, True, "")
        else:
            watch.fail(outcome.error)
            self.ctx.report(KIND, name, False, outcome.error)


register(KIND, ConsulNamer.from_options)
