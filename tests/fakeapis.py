"""Local stand-ins for the Consul agent and the Kubernetes API server, driven by the tests.

These are NOT Consul or Kubernetes: neither can run here. They are small servers on
127.0.0.1 that speak the real wire protocol of the two APIs the namers use, as documented
by HashiCorp and by Kubernetes:

* Consul ``GET /v1/health/service/<service>`` with ``dc``, ``passing``, ``tag``,
  ``stale``/``consistent``, ``index`` and ``wait`` (blocking queries that hold the request
  until the service's index passes ``index`` or ``wait`` elapses), the ``X-Consul-Index``
  header, ACL tokens (``X-Consul-Token``, 403 "ACL not found"), the entry shape
  (``Node``, ``Service``, ``Checks``) and 500 "No path to datacenter";
* Kubernetes ``GET /apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices`` with a
  ``labelSelector``, and ``GET /api/v1/services`` (all namespaces) or
  ``/api/v1/namespaces/<ns>/services``: the list (``metadata.resourceVersion``,
  ``items``), and with ``watch=1&resourceVersion=<rv>``: a chunked stream of JSON lines
  (ADDED, MODIFIED, DELETED, BOOKMARK when ``allowWatchBookmarks``, ERROR with a 410
  ``Expired`` Status for a compacted resourceVersion, or an HTTP 410 when told to),
  ``timeoutSeconds``, and bearer-token authentication (401 Status). As in etcd, one
  resourceVersion counter orders every change of every resource.

HTTP/1.1 is spoken through h11 (``support.serve_requests``), an implementation independent
of the client under test. Tests change the data (register, deregister, set health, apply or
delete slices, compact history, send bookmarks), inject bad bodies, and take a server down
and up on its port.
The servers run in the test's own event loop. :class:`StateLog` records a discovery
Watch and lets a test await a state with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Self, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import h11
from support import serve_requests

from appliance.discovery.base import AddrState, Namer, NamerContext, Watch

Body = bytes | AsyncIterator[bytes]
Reply = tuple[int, list[tuple[str, str]], Body]


@dataclass
class Request:
    """A request as the fake server saw it."""

    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    at: float
    method: str = "GET"
    body: bytes = b""


class FakeServer:
    """An HTTP/1.1 server on 127.0.0.1 (optionally TLS) that can go down and come back."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.port = 0
        self.requests: list[Request] = []
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def go_down(self) -> None:
        """Stop listening and cut every open connection (the agent or API server died)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def go_up(self) -> None:
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.go_down()

    async def handle(self, request: Request) -> Reply:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await serve_requests(reader, writer, self._answer)
        except asyncio.CancelledError:
            writer.transport.abort()  # taken down: cut the connection, no goodbye
        except (h11.ProtocolError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _answer(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                      head: h11.Request, body: bytes) -> bool:
        """Record the request, then send :meth:`handle`'s reply."""
        parts = urlsplit(head.target.decode("ascii"))
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in head.headers}
        self.requests.append(Request(unquote(parts.path),
                                     parse_qs(parts.query, keep_blank_values=True),
                                     headers, time.monotonic(), head.method.decode("ascii"),
                                     body))
        await self._respond(conn, writer, await self.handle(self.requests[-1]))
        return True

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                       reply: Reply) -> None:
        status, headers, body = reply
        if isinstance(body, bytes):
            headers = [*headers, ("content-length", str(len(body)))]
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        if isinstance(body, bytes):
            writer.write(conn.send(h11.Data(data=body)))
        else:
            async for piece in body:
                writer.write(conn.send(h11.Data(data=piece)))
                await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()


def json_reply(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> Reply:
    return status, [("content-type", "application/json"), *(headers or [])], \
        json.dumps(obj).encode()


# -- Consul ------------------------------------------------------------------------------


def parse_wait(text: str) -> float:
    """A Go duration as Consul takes it in ``wait``: ``10s``, ``5m``, ``100ms``."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * scale
    return float(text)


class FakeConsul(FakeServer):
    """A Consul agent's health API for one datacenter, ``dc1``."""

    def __init__(self, tls: ssl.SSLContext | None = None, datacenter: str = "dc1") -> None:
        super().__init__(tls)
        self.datacenter = datacenter
        self.acl_token: str | None = None
        self.index = 10
        self.service_index: dict[str, int] = {}
        self.instances: dict[str, dict[str, dict[str, Any]]] = {}
        self.bodies: list[bytes] = []
        """Bodies to send (in order) instead of the real answer: bad JSON and the like."""
        self._changed = asyncio.Event()
        self._restores = 0
        self.blocked = 0
        """Requests being held by a blocking query right now."""

    def _bump(self, service: str) -> None:
        self.index += 1
        self.service_index[service] = self.index
        self._changed.set()
        self._changed = asyncio.Event()

    def register(self, service: str, sid: str, address: str, port: int, *,
                 node: str = "node1", node_address: str = "10.0.0.1",
                 tags: tuple[str, ...] = (), meta: dict[str, str] | None = None,
                 weight: int = 1, passing: bool = True) -> None:
        self.instances.setdefault(service, {})[sid] = {
            "Node": {"ID": f"id-{node}", "Node": node, "Address": node_address,
                     "Datacenter": self.datacenter, "TaggedAddresses": {"lan": node_address},
                     "Meta": {}},
            "Service": {"ID": sid, "Service": service, "Tags": list(tags),
                        "Address": address, "Meta": dict(meta or {}), "Port": port,
                        "Weights": {"Passing": weight, "Warning": 1},
                        "EnableTagOverride": False},
            "Checks": [
                {"Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status",
                 "Status": "passing", "ServiceID": "", "ServiceName": ""},
                {"Node": node, "CheckID": f"service:{sid}", "Name": "Service check",
                 "Status": "passing" if passing else "critical", "ServiceID": sid,
                 "ServiceName": service}]}
        self._bump(service)

    def deregister(self, service: str, sid: str) -> None:
        self.instances.get(service, {}).pop(sid, None)
        if not self.instances.get(service):
            self.instances.pop(service, None)
        self._bump(service)

    def set_passing(self, service: str, sid: str, passing: bool) -> None:
        self.instances[service][sid]["Checks"][1]["Status"] = (
            "passing" if passing else "critical")
        self._bump(service)

    def restore_snapshot(self, index: int) -> None:
        """Every index drops to ``index`` (a snapshot restore): indexes go backwards, and,
        as in Consul, blocked queries are abandoned (answered at once)."""
        self.index = index
        self.service_index = {s: index for s in self.service_index}
        self._restores += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def health_requests(self, service: str) -> list[Request]:
        return [r for r in self.requests if r.path == f"/v1/health/service/{service}"]

    async def handle(self, request: Request) -> Reply:
        if not request.path.startswith("/v1/health/service/"):
            return 404, [], b"404 page not found\n"
        service = request.path.removeprefix("/v1/health/service/")
        q = {k: v[-1] for k, v in request.query.items()}
        if self.acl_token is not None and self.acl_token not in (
                request.headers.get("x-consul-token"), q.get("token")):
            return 403, [], b"ACL not found"
        if q.get("dc", self.datacenter) != self.datacenter:
            return 500, [], b"No path to datacenter"
        await self._block(service, int(q.get("index", "0")), parse_wait(q.get("wait", "5m")))
        if self.bodies:
            return 200, [("X-Consul-Index", str(self._index_of(service)))], self.bodies.pop(0)
        entries = [e for e in self.instances.get(service, {}).values()
                   if (q.get("passing") not in ("true", "1", "")
                       or all(c["Status"] == "passing" for c in e["Checks"]))
                   and ("tag" not in q or q["tag"] in e["Service"]["Tags"])]
        return json_reply(200, entries, [("X-Consul-Index", str(self._index_of(service))),
                                         ("X-Consul-KnownLeader", "true"),
                                         ("X-Consul-LastContact", "0")])

    def _index_of(self, service: str) -> int:
        return self.service_index.get(service, self.index)

    async def _block(self, service: str, index: int, wait: float) -> None:
        deadline = time.monotonic() + min(wait, 600)
        restores = self._restores
        self.blocked += 1
        try:
            while index > 0 and self._index_of(service) <= index:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._restores != restores:
                    return
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    return
        finally:
            self.blocked -= 1


# -- Kubernetes ---------------------------------------------------------------------------

SERVICE_LABEL = "kubernetes.io/service-name"


def endpoint(ip: str, *, ready: bool | None = True, zone: str | None = None,
             node: str | None = None, pod: str | None = None) -> dict[str, Any]:
    """One entry of an EndpointSlice's ``endpoints`` (ready None leaves it unset)."""
    ep: dict[str, Any] = {"addresses": [ip], "conditions": {}}
    if ready is not None:
        ep["conditions"] = {"ready": ready, "serving": ready, "terminating": not ready}
    if zone:
        ep["zone"] = zone
    if node:
        ep["nodeName"] = node
    if pod:
        ep["targetRef"] = {"kind": "Pod", "namespace": "default", "name": pod,
                           "uid": f"uid-{pod}"}
    return ep


def slice_obj(name: str, eps: list[dict[str, Any]], ports: list[tuple[str, int]], *,
              service: str = "web", rv: str = "1", address_type: str = "IPv4"
              ) -> dict[str, Any]:
    """An EndpointSlice of ``service`` with these endpoints and (name, port) pairs."""
    return {"kind": "EndpointSlice", "addressType": address_type, "endpoints": eps,
            "metadata": {"name": name, "resourceVersion": rv,
                         "labels": {SERVICE_LABEL: service}},
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports]}


def event(kind: str, obj: dict[str, Any]) -> bytes:
    """One line of a watch stream (without its newline)."""
    return json.dumps({"type": kind, "object": obj}).encode()


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def service_port(port: int, target: int | str | None = None, name: str = "",
                 protocol: str = "TCP") -> dict[str, Any]:
    """One entry of a Service's ``spec.ports`` (``targetPort`` left out when None)."""
    entry: dict[str, Any] = {"name": name, "port": port, "protocol": protocol}
    if not name:
        del entry["name"]
    if target is not None:
        entry["targetPort"] = target
    return entry


def _matches(path: str) -> tuple[str, str | None] | None:
    """(resource, namespace or None for all) of a collection path this server serves."""
    slices = ("/apis/discovery.k8s.io/v1/namespaces/", "/endpointslices")
    if path.startswith(slices[0]) and path.endswith(slices[1]):
        return "EndpointSlice", path[len(slices[0]):-len(slices[1])]
    if path == "/api/v1/services":
        return "Service", None
    if path.startswith("/api/v1/namespaces/") and path.endswith("/services"):
        return "Service", path[len("/api/v1/namespaces/"):-len("/services")]
    return None


class FakeK8s(FakeServer):
    """The EndpointSlice and Service parts of a Kubernetes API server, with watch
    history."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(tls)
        self.rv = 100
        self.slices: dict[tuple[str, str], dict[str, Any]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []
        self.compacted = 0
        self.tokens: set[str] | None = None
        """Accepted bearer tokens; None accepts any request."""
        self.gone_as_status = False
        """Answer a too-old resourceVersion with HTTP 410 instead of an ERROR event."""
        self.list_bodies: list[bytes] = []
        self._watchers: list[tuple[str, asyncio.Queue[bytes | None]]] = []

    def apply_slice(self, namespace: str, name: str, service: str,
                    endpoints: list[dict[str, Any]], ports: list[tuple[str, int]], *,
                    address_type: str = "IPv4") -> None:
        """Create or replace a slice (an ADDED or MODIFIED event)."""
        self.rv += 1
        key = (namespace, name)
        kind = "MODIFIED" if key in self.slices else "ADDED"
        self.slices[key] = {
            "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": str(self.rv),
                         "labels": {SERVICE_LABEL: service}},
            "addressType": address_type, "endpoints": endpoints,
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports]}
        self._record(kind, namespace, self.slices[key])

    def delete_slice(self, namespace: str, name: str) -> None:
        self._delete(self.slices, namespace, name)

    def apply_service(self, namespace: str, name: str, cluster_ip: str | list[str] | None,
                      ports: list[dict[str, Any]], *, type: str = "ClusterIP",
                      external_name: str | None = None) -> None:
        """Create or replace a Service (an ADDED or MODIFIED event). ``cluster_ip`` "None"
        is headless; a list is dual-stack (``clusterIPs``); None leaves both unset."""
        self.rv += 1
        key = (namespace, name)
        kind = "MODIFIED" if key in self.services else "ADDED"
        spec: dict[str, Any] = {"type": type, "ports": ports, "selector": {"app": name},
                                "sessionAffinity": "None"}
        if isinstance(cluster_ip, list):
            spec |= {"clusterIP": cluster_ip[0], "clusterIPs": cluster_ip,
                     "ipFamilies": ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ip]}
        elif cluster_ip is not None:
            spec |= {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip]}
        if external_name is not None:
            spec["externalName"] = external_name
        self.services[key] = {
            "kind": "Service", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                         "resourceVersion": str(self.rv)},
            "spec": spec, "status": {"loadBalancer": {}}}
        self._record(kind, namespace, self.services[key])

    def delete_service(self, namespace: str, name: str) -> None:
        self._delete(self.services, namespace, name)

    def _delete(self, store: dict[tuple[str, str], dict[str, Any]], namespace: str,
                name: str) -> None:
        self.rv += 1
        obj = json.loads(json.dumps(store.pop((namespace, name))))
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._record("DELETED", namespace, obj)

    def compact(self) -> None:
        """Forget all history: every watch from an older resourceVersion gets 410."""
        self.compacted = self.rv

    def bookmark(self) -> None:
        """A BOOKMARK with the current resourceVersion on every open watch (its object is
        of the watched kind, as the real server sends it)."""
        for resource, queue in self._watchers:
            line = {"type": "BOOKMARK", "object": {
                "kind": resource, "apiVersion": _API_VERSION[resource],
                "metadata": {"resourceVersion": str(self.rv)}}}
            queue.put_nowait(json.dumps(line).encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are to every open watch (a bad event)."""
        self._send_all(data)

    def end_watches(self) -> None:
        """End every open watch cleanly, as the server's timeout does."""
        for _, queue in self._watchers:
            queue.put_nowait(None)

    def open_watches_of(self, resource: str) -> int:
        """Open watches of ``EndpointSlice`` or ``Service``."""
        return sum(1 for kind, _ in self._watchers if kind == resource)

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    def watch_requests(self, resource: str | None = None) -> list[Request]:
        return [r for r in self.requests if "watch" in r.query and _is(r, resource)]

    def list_requests(self, resource: str | None = None) -> list[Request]:
        return [r for r in self.requests if "watch" not in r.query and _is(r, resource)]

    def _record(self, kind: str, namespace: str, obj: dict[str, Any]) -> None:
        obj = json.loads(json.dumps(obj))
        self.history.append((self.rv, kind, namespace, obj))
        for _, queue in self._watchers:
            queue.put_nowait(b"")  # wake: the watcher reads history itself

    def _send_all(self, data: bytes) -> None:
        for _, queue in self._watchers:
            queue.put_nowait(data)

    async def handle(self, request: Request) -> Reply:
        found = _matches(request.path)
        if found is None:
            return json_reply(404, status_object(404, "NotFound", "the server could not "
                                                 "find the requested resource"))
        resource, namespace = found
        if self.tokens is not None and request.headers.get("authorization", "").removeprefix(
                "Bearer ") not in self.tokens:
            return json_reply(401, status_object(401, "Unauthorized", "Unauthorized"))
        q = {k: v[-1] for k, v in request.query.items()}
        try:
            match = selector(q.get("labelSelector", ""))
        except ValueError as exc:
            return json_reply(400, status_object(400, "BadRequest", str(exc)))
        if q.get("watch") in ("1", "true"):
            return await self._watch(resource, namespace, match, q)
        if self.list_bodies:
            return 200, [("content-type", "application/json")], self.list_bodies.pop(0)
        store = self.slices if resource == "EndpointSlice" else self.services
        items = [{k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
                 for (ns, _), obj in sorted(store.items())
                 if namespace in (None, ns) and match(obj)]
        return json_reply(200, {"kind": f"{resource}List",
                                "apiVersion": _API_VERSION[resource],
                                "metadata": {"resourceVersion": str(self.rv)}, "items": items})

    async def _watch(self, resource: str, namespace: str | None,
                     match: Callable[[dict[str, Any]], bool], q: dict[str, str]) -> Reply:
        since = int(q.get("resourceVersion") or self.rv)
        if since < self.compacted:
            message = f"too old resource version: {since} ({self.compacted})"
            if self.gone_as_status:
                return json_reply(410, status_object(410, "Gone", message))
            gone = {"type": "ERROR", "object": status_object(410, "Expired", message)}
            return 200, [("content-type", "application/json")], _once(gone)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        watcher = (resource, queue)
        self._watchers.append(watcher)
        timeout = float(q.get("timeoutSeconds", "1800"))

        def wanted(ns: str, obj: dict[str, Any]) -> bool:
            return obj.get("kind") == resource and namespace in (None, ns) and match(obj)
        stream = self._events(watcher, wanted, since, timeout)
        return 200, [("content-type", "application/json")], stream

    async def _events(self, watcher: tuple[str, asyncio.Queue[bytes | None]],
                      wanted: Callable[[str, dict[str, Any]], bool], since: int,
                      timeout: float) -> AsyncIterator[bytes]:
        queue = watcher[1]
        deadline = time.monotonic() + timeout
        try:
            while True:
                for rv, kind, ns, obj in self.history:
                    if rv > since and wanted(ns, obj):
                        yield json.dumps({"type": kind, "object": obj}).encode() + b"\n"
                since = max(since, self.rv)
                try:
                    item = await asyncio.wait_for(queue.get(), deadline - time.monotonic())
                except TimeoutError:
                    return
                if item is None:
                    return
                if item:
                    yield item
        finally:
            self._watchers.remove(watcher)


_API_VERSION = {"EndpointSlice": "discovery.k8s.io/v1", "Service": "v1"}


def _is(request: Request, resource: str | None) -> bool:
    found = _matches(request.path)
    return resource is None or (found is not None and found[0] == resource)


async def _once(obj: dict[str, Any]) -> AsyncIterator[bytes]:
    yield json.dumps(obj).encode() + b"\n"


def selector(text: str) -> Callable[[dict[str, Any]], bool]:
    """An equality-based label selector (``a=b,c==d,e!=f``) as a predicate on objects."""
    terms: list[tuple[str, str, bool]] = []
    for term in filter(None, text.split(",")):
        negate = "!=" in term
        key, sep, value = term.replace("!=", "=").replace("==", "=").partition("=")
        if not sep or not key:
            raise ValueError(f"unable to parse requirement: {term!r}")
        terms.append((key.strip(), value.strip(), negate))

    def match(obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels", {})
        return all((labels.get(k) == v) != negate for k, v, negate in terms)

    return match


# -- waiting on a Watch --------------------------------------------------------------------


class StateLog:
    """Every state a Watch pushes; :meth:`until` awaits one that satisfies a predicate."""

    def __init__(self, watch: Watch) -> None:
        self.states: list[AddrState] = []
        self._pushed = asyncio.Event()
        self.cancel = watch.subscribe(self._push)

    def _push(self, state: AddrState) -> None:
        self.states.append(state)
        self._pushed.set()

    @property
    def last(self) -> AddrState:
        return self.states[-1]

    async def until(self, predicate: Callable[[AddrState], bool], timeout: float = 5.0,
                    what: str = "state") -> AddrState:
        """The first state from now on (the current one included) that satisfies
        ``predicate``; fails after ``timeout`` seconds, listing the last states seen."""
        seen = len(self.states) - 1
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for state in self.states[seen:]:
                        if predicate(state):
                            return state
                    seen = len(self.states)
                    self._pushed.clear()
                    await self._pushed.wait()
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout}s; last states: "
                                 f"{self.states[-5:]}") from None


def hostports(state: AddrState) -> set[str]:
    return {str(a) for a in state.addrs}


def self_signed(directory: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by itself (its own CA), made with the openssl
    command; returns (cert file, key file)."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


class Harness:
    """A NamerContext for tests: spawned tasks kept (and cancelled by :meth:`close`),
    reports recorded as ``(namer, name, ok, error)``."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []
        self.reports: list[tuple[str, tuple[str, ...], bool, str]] = []
        self.ctx = NamerContext(spawn=self._spawn, report=self._report, clock=time.monotonic)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        return task

    def _report(self, namer: str, name: tuple[str, ...], ok: bool, error: str) -> None:
        self.reports.append((namer, name, ok, error))

    def failures(self) -> list[str]:
        return [error for _, _, ok, error in self.reports if not ok]

    async def close(self) -> None:
        """Cancel every source; fail if one had crashed (a source must never die)."""
        crashed = [t for t in self.tasks if t.done() and not t.cancelled() and t.exception()]
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if crashed:
            raise AssertionError(f"a namer task crashed: {crashed[0].exception()!r}")


NamerT = TypeVar("NamerT", bound=Namer)


@asynccontextmanager
async def harnessed(make: Callable[[NamerContext], NamerT]
                    ) -> AsyncIterator[tuple[NamerT, Harness]]:
    """The namer ``make`` builds on a fresh :class:`Harness`'s context; at exit the namer is
    closed and the harness too (which fails if a source had crashed)."""
    harness = Harness()
    namer = make(harness.ctx)
    try:
        yield namer, harness
    finally:
        namer.close()
        await harness.close()
