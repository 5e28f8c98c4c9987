"""Assemble and run the proxy: outbound and inbound listeners, the admin server, config
reload and graceful shutdown.

Shutdown (SIGTERM, SIGINT or ``POST /shutdown`` from loopback): the listeners stop
accepting and ``/ready`` turns 503 at once; idle HTTP/1 connections are closed, busy ones
answer their current request with ``Connection: close``; HTTP/2 clients get GOAWAY naming
the last stream accepted; in-flight requests, streams and tunnels get ``shutdown_grace``
seconds to finish; then everything left is closed and the process exits 0.

Reload (SIGHUP, or the config file changing on disk, checked once a second): the config is
loaded again; the routing, balancer, namers, service and services sections take effect for
new requests without dropping connections (a new router replaces the old one; requests in
flight finish on the old). A config that does not load is rejected and the running one
stays; changes to other fields need a restart and are logged as such.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable
from typing import Any

from appliance import __version__
from appliance.admin import api as admin_api
from appliance.admin.server import AdminRequest, Route, start_admin
from appliance.config import Config
from appliance.identity.manager import IdentityManager
from appliance.net.listener import Direction, start_listener
from appliance.net.thrift_upstream import close_all as thrift_close_all
from appliance.telemetry.accesslog import AccessLog, open_access_log
from appliance.telemetry.metrics import Registry
from appliance.telemetry.tracing import OFF, from_environ

log = logging.getLogger("appliance")

SWEEP_INTERVAL = 1.0
_LIVE_SECTIONS = ("routing", "balancer", "namers", "service", "services")


class Proxy:
    """The running proxy; tests start it in-process with :meth:`start`."""

    def __init__(self, config: Config, reload: Callable[[], Config] | None = None,
                 config_file: str | None = None) -> None:
        self.config = config
        self.reload_config = reload
        self.config_file = config_file
        self._file_stamp = _stamp(config_file)
        self.shutdown_requested = asyncio.Event()
        self.registry = Registry(enabled=config.admin.metrics)
        self.instance_id = config.instance_id or secrets.token_hex(4)
        self.directions: list[Direction] = []
        self.tracer = OFF
        self.access_log: AccessLog | None = None
        self.identity: IdentityManager | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.ready = False
        self._sweeper: asyncio.TimerHandle | None = None
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        conf = self.config
        self.tracer = from_environ(conf.tracing.environ(os.environ),
                                   instance_id=self.instance_id)  # TraceConfigError: 2
        self.registry.tracer = self.tracer
        self.identity = IdentityManager.from_environ(os.environ)  # IdentityConfigError: 2
        self.registry.identity = self.identity
        self.registry.routers = lambda: [(d.name, d.router) for d in self.directions
                                         if d.router is not None]
        if self.identity is not None:
            self.identity.start()
        self.access_log = open_access_log(conf.access_log)
        for name, side in (("outbound", conf.outbound), ("inbound", conf.inbound)):
            d = Direction(name, conf, self.registry, self.instance_id, loop)
            d.tracer = self.tracer
            d.access_log = self.access_log
            self.directions.append(d)
            d.start_router()
            self.servers.append(await start_listener(d, side.bind, side.port))
        routes: dict[str, Route] = {
            "/metrics": self._metrics,
            "/ready": self._ready,
            "/live": lambda req: (200, "text/plain", b"live\n"),
            "/shutdown": self._shutdown,
        }
        routes.update(admin_api.routes(self))
        self.servers.append(await start_admin(loop, conf.admin.bind, conf.admin.port, routes,
                                              post=frozenset({"/shutdown"})))
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
        if not self.ready:
            return 503, "text/plain", b"not ready\n"
        if self.identity is not None and not self.identity.ready:
            return 503, "text/plain", b"not ready: no certificate from the identity service yet\n"
        return 200, "text/plain", b"ready\n"

    def _shutdown(self, req: AdminRequest) -> tuple[int, str, bytes]:
        """POST /shutdown, from loopback only (a Job's app ends; its proxy should too)."""
        if req.method != "POST":
            return 405, "text/plain", b"use POST /shutdown\n"
        if not _loopback(req.peer):
            return 403, "text/plain", b"shutdown is allowed from loopback only\n"
        log.info("shutdown requested on the admin port")
        self.shutdown_requested.set()
        return 200, "text/plain", b"shutting down\n"

    def _sweep(self) -> None:
        for d in self.directions:
            d.sweep()
        if self.config_file is not None and self.reload_config is not None:
            stamp = _stamp(self.config_file)
            if stamp != self._file_stamp:
                self._file_stamp = stamp
                self.reload("the config file changed")
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    def reload(self, why: str) -> bool:
        """Load the config again; apply its routing, balancer and namers sections."""
        if self.reload_config is None:
            return False
        try:
            new = self.reload_config()
            for d in self.directions:
                d.swap_routing(new)
        except ValueError as exc:  # ConfigError, or a namer that cannot be built
            self.registry.config_reload(False)
            log.error("config reload (%s) rejected, keeping the running config: %s", why, exc)
            return False
        old = self.config
        self.config = dataclasses.replace(
            old, **{name: getattr(new, name) for name in _LIVE_SECTIONS})
        rest = [f.name for f in dataclasses.fields(new)
                if f.name not in _LIVE_SECTIONS and getattr(new, f.name) != getattr(old, f.name)]
        self.registry.config_reload(True)
        log.info("config reloaded (%s)%s", why,
                 f"; changes to {', '.join(rest)} need a restart" if rest else "")
        return True

    def in_flight(self) -> bool:
        return any(
            any(c.ex is not None for c in d.http_conns) or any(c.streams for c in d.h2_conns)
            or d.relays for d in self.directions)

    async def stop(self, drain: float | None = None) -> None:
        """Stop accepting, let in-flight requests, streams and tunnels finish (up to
        ``drain`` s, default ``shutdown_grace``), then close everything."""
        grace = self.config.shutdown_grace if drain is None else drain
        self.ready = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        listeners, admin = self.servers[:-1], self.servers[-1:]
        for server in listeners:
            server.close()
        for d in self.directions:
            for conn in list(d.http_conns):
                conn.drain()
            for h2conn in list(d.h2_conns):
                h2conn.shutdown()  # GOAWAY: no new streams; those open may finish
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline and self.in_flight():
            await asyncio.sleep(0.05)
        if self.in_flight():
            log.warning("shutdown grace of %gs is over: closing what is still open", grace)
        for server in admin:
            server.close()
        for d in self.directions:
            for conn in list(d.http_conns):
                conn.close()
            for h2conn in list(d.h2_conns):
                h2conn.close()
            for relay in list(d.relays):
                relay.close()
            thrift_close_all(d)
            d.pool.close_all()
            d.h2pool.close_all()
            d.close_router()
            for task in list(d.tasks):
                task.cancel()
        if self.identity is not None:
            await self.identity.stop()
        if self.access_log is not None:
            self.access_log.close()
        if self.tracer.on:
            await loop.run_in_executor(None, self.tracer.shutdown, 5.0)  # flush the spans
        self.stopped.set()


def _stamp(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.removeprefix("::ffff:")).is_loopback
    except ValueError:
        return False


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # h2 and asyncio debug logging are expensive on the data path.
    logging.getLogger("asyncio").setLevel(logging.WARNING)


async def _main(config: Config, reload: Callable[[], Config] | None,
                config_file: str | None) -> int:
    proxy = Proxy(config, reload, config_file)
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
    stop = proxy.shutdown_requested
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, proxy.reload, "SIGHUP")
    await stop.wait()
    log.info("shutting down: draining in-flight requests (up to %gs)", config.shutdown_grace)
    await proxy.stop()
    log.info("stopped")
    return 0


def serve(config: Config, reload: Callable[[], Config] | None = None,
          config_file: str | None = None) -> int:
    """Run until SIGTERM/SIGINT or POST /shutdown. ``reload`` loads the config again (for
    SIGHUP and changes of ``config_file``)."""
    _setup_logging(config.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    return int(runner(_main(config, reload, config_file)))
