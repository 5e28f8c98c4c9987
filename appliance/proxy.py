"""Assemble and run the proxy: outbound and inbound listeners, the admin server, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
from typing import Any

from appliance import __version__
from appliance.admin.server import AdminRequest, Route, start_admin
from appliance.config import Config
from appliance.net.listener import Direction, start_listener
from appliance.telemetry.metrics import Registry

log = logging.getLogger("appliance")

SWEEP_INTERVAL = 1.0
DRAIN_TIMEOUT = 10.0


class Proxy:
    """The running proxy; tests start it in-process with :meth:`start`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry = Registry()
        self.instance_id = config.instance_id or secrets.token_hex(4)
        self.directions: list[Direction] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.ready = False
        self._sweeper: asyncio.TimerHandle | None = None
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        conf = self.config
        for name, side in (("outbound", conf.outbound), ("inbound", conf.inbound)):
            d = Direction(name, conf, self.registry, self.instance_id, loop)
            self.directions.append(d)
            d.start_router()
            self.servers.append(await start_listener(d, side.bind, side.port))
        routes: dict[str, Route] = {
            "/metrics": self._metrics,
            "/ready": self._ready,
            "/live": lambda req: (200, "text/plain", b"live\n"),
        }
        self.servers.append(await start_admin(loop, conf.admin.bind, conf.admin.port, routes))
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)
        self.ready = True

    def bound_ports(self) -> dict[str, int]:
        """Actual ports (useful when the config asked for port 0)."""
        names = ("outbound", "inbound", "admin")
        return {n: s.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
                for n, s in zip(names, self.servers, strict=True)}

    def _metrics(self, req: AdminRequest) -> tuple[int, str, bytes]:
        return 200, "text/plain; version=0.0.4", self.registry.render().encode()

    def _ready(self, req: AdminRequest) -> tuple[int, str, bytes]:
        return (200, "text/plain", b"ready\n") if self.ready else \
            (503, "text/plain", b"not ready\n")

    def _sweep(self) -> None:
        for d in self.directions:
            d.sweep()
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    async def stop(self, drain: float = DRAIN_TIMEOUT) -> None:
        """Stop accepting, let in-flight requests finish (up to ``drain`` s), close all."""
        self.ready = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self.servers:
            server.close()
        for d in self.directions:
            for h2conn in list(d.h2_conns):
                h2conn.shutdown()  # GOAWAY: no new streams; those open may finish
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        while loop.time() < deadline and any(
            any(c.ex is not None for c in d.http_conns) or any(c.streams for c in d.h2_conns)
            for d in self.directions
        ):
            await asyncio.sleep(0.05)
        for d in self.directions:
            for conn in list(d.http_conns):
                conn.close()
            for h2conn in list(d.h2_conns):
                h2conn.close()
            d.pool.close_all()
            d.h2pool.close_all()
            d.close_router()
            for task in list(d.tasks):
                task.cancel()
        self.stopped.set()


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # h2 and asyncio debug logging are expensive on the data path.
    logging.getLogger("asyncio").setLevel(logging.WARNING)


async def _main(config: Config) -> int:
    proxy = Proxy(config)
    try:
        await proxy.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 1
    except ValueError as exc:  # a namer or routing option the config check cannot see
        log.error("config error: %s", exc)
        return 2
    ports = proxy.bound_ports()
    log.info("appliance %s (instance %s, pid %d, uid %d): outbound %s:%d, inbound %s:%d, "
             "admin %s:%d", __version__, proxy.instance_id, os.getpid(), os.getuid(),
             config.outbound.bind, ports["outbound"], config.inbound.bind, ports["inbound"],
             config.admin.bind, ports["admin"])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight requests")
    await proxy.stop()
    return 0


def serve(config: Config) -> int:
    _setup_logging(config.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    return int(runner(_main(config)))
