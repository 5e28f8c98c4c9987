"""The Kubernetes namer (``kind: io.l5d.k8s``): EndpointSlice list+watch per service.

One task per watched service (whatever the ports asked for) runs the loop that
:class:`~appliance.discovery.k8s.SliceWatch` decides: list, then stream the watch line by
line, and push every change to the watches of that service's ports. :func:`list_watch`
runs any :class:`~appliance.discovery.k8s_listwatch.ListWatch` (the ClusterIP namer uses
it for Services too). Authentication is the pod's service account (:class:`ApiClient`):
the bearer token is read from its file before each request, again only when the file
changed (kubelet rotates projected tokens by swapping a symlink, which changes the inode);
the API server's certificate is checked against the service account's CA. All loop
decisions live in the pure modules; this one only awaits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable, Mapping
from typing import Any

from appliance.discovery.base import AddrState, Name, Namer, NamerContext, Watch
from appliance.discovery.k8s import (
    CA_FILE,
    KIND,
    TOKEN_FILE,
    K8sOptions,
    SliceWatch,
    endpoint_state,
    in_cluster_url,
    parse_name,
)
from appliance.discovery.k8s_listwatch import Changed, LineSplitter, ListWatch, Outcome
from appliance.discovery.registry import register
from appliance.discovery.remote import Backoff, DecodeError, Failure
from appliance.net import httpclient
from appliance.net.namer_consul import tls_context
from appliance.net.namer_loop import cancel_all

_MAX_ERROR_BODY = 65536
log = logging.getLogger(__name__)


class TokenError(Exception):
    """The token file cannot be read."""


class TokenFile:
    """A bearer token file, re-read only when its inode, size or times change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reads = 0
        self._stamp: tuple[int, ...] | None = None
        self._token = ""

    def current(self) -> str:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if stamp != self._stamp:
                with open(self.path, encoding="utf-8") as fh:
                    self._token = fh.read().strip()
                self._stamp = stamp
                self.reads += 1
        except (OSError, UnicodeDecodeError) as exc:
            self._stamp = None
            raise TokenError(f"token_file {self.path}: {exc}") from None
        if not self._token:
            raise TokenError(f"token_file {self.path}: empty")
        return self._token


class ApiClient:
    """Where the API server is and how to talk to it: URL, TLS context, bearer token."""

    def __init__(self, opts: K8sOptions, env: Mapping[str, str] | None = None) -> None:
        self.url = opts.api_url or in_cluster_url(os.environ if env is None else env)
        https = self.url.startswith("https://")
        ca_file = opts.ca_file or (CA_FILE if os.path.exists(CA_FILE) else None)
        self.ssl = tls_context(ca_file) if https else None
        token_file = opts.token_file or (TOKEN_FILE if https else None)
        self.token = TokenFile(token_file) if token_file else None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token.current()}"} if self.token else {}


async def list_watch(api: ApiClient, machine: ListWatch[Any], opts: K8sOptions,
                     clock: Callable[[], float], publish: Callable[[Outcome], None],
                     what: str) -> None:
    """Run ``machine``'s loop for ever, passing every outcome to ``publish``; ``what``
    names the source in the log line of an internal error."""
    while True:
        await asyncio.sleep(machine.delay(clock()))
        try:
            headers = api.headers()
            url = api.url + machine.path
            machine.sent(clock())
            if machine.phase == "list":
                response = await httpclient.get(url, headers, ssl=api.ssl,
                                                timeout=opts.timeout)
                publish(machine.on_list(clock(), response.status, response.body))
            else:
                await _watch(api, machine, opts, clock, publish, url, headers)
        except (httpclient.HTTPClientError, TokenError) as exc:
            publish(machine.on_error(clock(), str(exc)))
        except Exception as exc:  # a bug must not end discovery of this source
            log.exception("discovery: %s: internal error", what)
            machine.phase = "list"
            publish(machine.on_error(clock(), f"internal error: {exc!r}"))


async def _watch(api: ApiClient, machine: ListWatch[Any], opts: K8sOptions,
                 clock: Callable[[], float], publish: Callable[[Outcome], None], url: str,
                 headers: dict[str, str]) -> None:
    idle = opts.watch_timeout + opts.timeout
    async with httpclient.stream(url, headers, ssl=api.ssl, timeout=opts.timeout,
                                 idle_timeout=idle) as response:
        body = b""
        if response.status != 200:
            async for chunk in response:
                body += chunk
                if len(body) > _MAX_ERROR_BODY:
                    break
        publish(machine.on_watch_status(clock(), response.status, body))
        if response.status != 200:
            return
        lines = LineSplitter()
        async for chunk in response:
            try:
                events = lines.feed(chunk)
            except DecodeError as exc:
                publish(machine.on_bad_stream(clock(), str(exc)))
                return
            for line in events:
                publish(machine.on_event(clock(), line))
                if machine.phase != "watch":
                    return


class _Source:
    """One service's loop state and the watches of its ports."""

    def __init__(self, machine: SliceWatch) -> None:
        self.machine = machine
        self.ports: dict[str | int, tuple[Name, Watch]] = {}
        self.last_error = ""


class K8sNamer(Namer):
    """``/#/io.l5d.k8s/<namespace>/<port>/<service>``: the ready endpoints of a service."""

    kind = KIND
    segments = 3

    def __init__(self, opts: K8sOptions, ctx: NamerContext, rng: random.Random | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.opts = opts
        self.ctx = ctx
        self.rng = rng or random.Random()
        self.api = ApiClient(opts, env)
        self.api_url = self.api.url
        self.token = self.api.token
        self._sources: dict[tuple[str, str], _Source] = {}
        self._invalid: dict[Name, Watch] = {}
        self._tasks: list[Any] = []

    @classmethod
    def from_options(cls, options: Mapping[str, Any], ctx: NamerContext) -> K8sNamer:
        return cls(K8sOptions.from_mapping(options), ctx)

    def watch(self, name: Name) -> Watch:
        try:
            parsed = parse_name(name)
        except ValueError as exc:
            if name not in self._invalid:
                self._invalid[name] = Watch(AddrState("neg", error=str(exc)))
            return self._invalid[name]
        key = (parsed.namespace, parsed.service)
        source = self._sources.get(key)
        if source is None:
            machine = SliceWatch(parsed.namespace, parsed.service, self.opts,
                                 Backoff(self.opts.backoff_base, self.opts.backoff_max,
                                         self.rng))
            source = self._sources[key] = _Source(machine)
            self._tasks.append(self.ctx.spawn(self._run(source)))
        if parsed.port not in source.ports:
            watch = Watch()
            if source.machine.rv is not None:
                watch.set(endpoint_state(source.machine.slices, parsed.port))
            if source.machine.failures:
                watch.fail(source.last_error)
            source.ports[parsed.port] = (name, watch)
        return source.ports[parsed.port][1]

    def close(self) -> None:
        cancel_all(self._tasks)

    async def _run(self, source: _Source) -> None:
        machine = source.machine
        await list_watch(self.api, machine, self.opts, self.ctx.clock,
                         lambda outcome: self._publish(source, outcome),
                         f"{KIND} {machine.namespace}/{machine.service}")

    def _publish(self, source: _Source, outcome: Outcome) -> None:
        if isinstance(outcome, Changed):
            for port, (name, watch) in list(source.ports.items()):
                watch.set(endpoint_state(source.machine.slices, port))
                self.ctx.report(KIND, name, True, "")
        elif isinstance(outcome, Failure):
            source.last_error = outcome.error
            for name, watch in list(source.ports.values()):
                watch.fail(outcome.error)
                self.ctx.report(KIND, name, False, outcome.error)


register(KIND, K8sNamer.from_options)
