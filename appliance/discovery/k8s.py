"""Kubernetes discovery, the pure part: names, options, EndpointSlices, the list+watch loop.

Theory of operation: a Kubernetes name is ``/#/io.l5d.k8s/<namespace>/<port>/<service>``.
The source follows the EndpointSlices of the service (label
``kubernetes.io/service-name=<service>``) the way client-go's informers do:

1. **list** ``GET .../namespaces/<ns>/endpointslices?labelSelector=...``: the full set and
   the collection's ``resourceVersion``;
2. **watch** the same URL with ``watch=1&resourceVersion=<rv>&allowWatchBookmarks=true``: a
   stream of JSON lines ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}``;
   each event moves ``rv`` forward (a BOOKMARK only moves ``rv``);
3. when the stream ends (the server's ``timeoutSeconds``, a dropped connection), **watch
   again** from the last ``rv``; nothing is missed and nothing re-listed;
4. when the server says the ``rv`` is too old (HTTP 410 Gone, or an ERROR event with code
   410, "Expired"), **list again**. A malformed event also forces a list: after a lost
   event only a list is known to be right.

:class:`SliceWatch` holds the slices and that loop's state; :func:`endpoint_state` turns the
slices into the watch state for one port: no slices is ``neg`` (the service does not
exist, as in linkerd), a port name no slice has is ``neg``, otherwise the ready endpoints
(``conditions.ready`` not false) are ``bound``, possibly empty. A failure keeps the last
good set (stale) and retries after a jittered backoff; requests for one service are at
least ``min_delay`` apart. The net side (``appliance.net.namer_k8s``) does the requests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlencode

from appliance.discovery.base import NEG, Address, AddrState, Name, bound
from appliance.discovery.consul import Backoff, DecodeError, Failure, OptionReader

KIND = "io.l5d.k8s"
SERVICE_LABEL = "kubernetes.io/service-name"
TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
MAX_LINE = 16 * 1024 * 1024
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


@dataclass(frozen=True, slots=True)
class K8sName:
    namespace: str
    port: str | int
    """A port name (``http``) or the endpoints' port number (``8080``)."""
    service: str


def parse_name(name: Name) -> K8sName:
    """Validate ``<namespace>/<port>/<service>``; ``ValueError`` says what is wrong."""
    if len(name) != 3:
        raise ValueError(f"{KIND}: a name is <namespace>/<port>/<service>, "
                         f"got {'/'.join(name)!r}")
    namespace, port, service = name
    for what, value in (("namespace", namespace), ("service", service)):
        if not _DNS_LABEL.match(value):
            raise ValueError(f"{KIND}: {what} {value!r} is not a DNS label "
                             f"(lowercase letters, digits and '-', at most 63)")
    if port.isdigit():
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError(f"{KIND}: port {port!r} is not 1-65535")
        return K8sName(namespace, number, service)
    if len(port) > 15 or not _PORT_NAME.match(port):
        raise ValueError(f"{KIND}: port {port!r} is neither a number nor a port name")
    return K8sName(namespace, port, service)


@dataclass(frozen=True, kw_only=True)
class K8sOptions:
    api_url: str | None = None
    """The API server; default ``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``.
    An ``http://`` URL (tests, ``kubectl proxy``) sends no token."""
    token_file: str | None = None
    """Bearer token file, re-read when it changes (projected tokens rotate). Default: the
    service account's token for an https API server, none for http."""
    ca_file: str | None = None
    """CA bundle that signed the API server's certificate. Default: the service account's
    ``ca.crt`` if it exists, else the system trust store."""
    watch_timeout: float = 300.0
    """``timeoutSeconds`` asked of each watch; the watch is then resumed."""
    min_delay: float = 0.5
    """Least time between two requests for one service (seconds)."""
    backoff_base: float = 0.5
    """First retry delay after a failure (seconds); doubles per failure, jittered."""
    backoff_max: float = 30.0
    """Longest retry delay (seconds)."""
    timeout: float = 10.0
    """Seconds allowed for a list, or for a watch's response head."""

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> K8sOptions:
        """Validate a ``namers:`` entry's options; ``ValueError`` names the bad one."""
        o = OptionReader(options, cls.__dataclass_fields__)
        api_url = o.text("api_url", None)
        if api_url is not None and not api_url.startswith(("http://", "https://")):
            raise ValueError(f"api_url: bad value {api_url!r} (expected http:// or https://)")
        opts = cls(
            api_url=api_url.rstrip("/") if api_url else None,
            token_file=o.text("token_file", None), ca_file=o.text("ca_file", None),
            watch_timeout=o.number("watch_timeout", cls.watch_timeout, 1, 3600),
            min_delay=o.number("min_delay", cls.min_delay, 0, 60),
            backoff_base=o.number("backoff_base", cls.backoff_base, 0.001, 60),
            backoff_max=o.number("backoff_max", cls.backoff_max, 0.001, 3600),
            timeout=o.number("timeout", cls.timeout, 0.1, 600))
        if opts.backoff_max < opts.backoff_base:
            raise ValueError(f"backoff_max: bad value {opts.backoff_max:g} (expected at least "
                             f"backoff_base, {opts.backoff_base:g})")
        return opts


def in_cluster_url(env: Mapping[str, str]) -> str:
    """The API server URL from the service environment a pod gets."""
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ValueError("api_url: not set, and KUBERNETES_SERVICE_HOST is not set "
                         "(not running in a pod?)")
    if not port.isdigit():
        raise ValueError(f"KUBERNETES_SERVICE_PORT: bad value {port!r} (expected a port)")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def slices_path(namespace: str, service: str, watch_from: str | None = None,
                timeout: float = 300.0) -> str:
    """The list path, or with ``watch_from`` the watch path from that resourceVersion."""
    query = [("labelSelector", f"{SERVICE_LABEL}={service}")]
    if watch_from is not None:
        query += [("watch", "1"), ("resourceVersion", watch_from),
                  ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(int(timeout)))]
    return (f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?"
            f"{urlencode(query)}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    addresses: tuple[str, ...]
    ready: bool
    meta: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Slice:
    name: str
    service: str
    address_type: str
    ports: tuple[tuple[str, int], ...]
    """(name, port) pairs; a port of "all ports" (null) is left out."""
    endpoints: tuple[Endpoint, ...]


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DecodeError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise DecodeError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _endpoint(raw: Any, where: str) -> Endpoint:
    ep = _obj(raw, where)
    addresses = tuple(str(a) for a in _list(ep.get("addresses"), f"{where}.addresses"))
    conditions = ep.get("conditions") or {}
    ready = not (isinstance(conditions, dict) and conditions.get("ready") is False)
    meta = {"zone": ep.get("zone"), "node": ep.get("nodeName")}
    ref = ep.get("targetRef")
    if isinstance(ref, dict) and ref.get("kind") == "Pod":
        meta["pod"] = ref.get("name")
    return Endpoint(addresses, ready,
                    MappingProxyType({k: str(v) for k, v in meta.items() if v}))


def decode_slice(raw: Any) -> Slice:
    """One EndpointSlice object; :class:`DecodeError` names the first thing wrong."""
    obj = _obj(raw, "EndpointSlice")
    meta = _obj(obj.get("metadata"), "EndpointSlice.metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise DecodeError("EndpointSlice.metadata.name: missing")
    labels = meta.get("labels") or {}
    service = str(labels.get(SERVICE_LABEL, "")) if isinstance(labels, dict) else ""
    ports = []
    for i, p in enumerate(_list(obj.get("ports"), f"{name}.ports")):
        port = _obj(p, f"{name}.ports[{i}]")
        if isinstance(port.get("port"), int) and not isinstance(port.get("port"), bool):
            ports.append((str(port.get("name") or ""), int(port["port"])))
    endpoints = tuple(_endpoint(e, f"{name}.endpoints[{i}]")
                      for i, e in enumerate(_list(obj.get("endpoints"), f"{name}.endpoints")))
    return Slice(name, service, str(obj.get("addressType", "")), tuple(ports), endpoints)


def _slice_port(s: Slice, port: str | int) -> int | None:
    if isinstance(port, int):
        return port
    return next((number for name, number in s.ports if name == port), None)


def endpoint_state(slices: Mapping[str, Slice], port: str | int) -> AddrState:
    """The watch state of one port of a service, from all its slices."""
    if not slices:
        return NEG
    addrs: list[Address] = []
    found = False
    for s in slices.values():
        number = _slice_port(s, port)
        if number is None or s.address_type not in ("IPv4", "IPv6"):
            continue
        found = True
        addrs += [Address(a, number, 1.0, ep.meta)
                  for ep in s.endpoints if ep.ready for a in ep.addresses]
    if not found and isinstance(port, str):
        return AddrState("neg", error=f"no endpoint port named {port!r}")
    return bound(addrs)


def _resource_version(obj: dict[str, Any], where: str) -> str:
    rv = _obj(obj.get("metadata"), f"{where}.metadata").get("resourceVersion")
    if not isinstance(rv, str) or not rv:
        raise DecodeError(f"{where}.metadata.resourceVersion: missing")
    return rv


def decode_list(body: bytes) -> tuple[str, dict[str, Slice]]:
    """An EndpointSliceList: its resourceVersion and its slices by name."""
    try:
        obj = _obj(json.loads(body), "EndpointSliceList")
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"not JSON: {exc}") from None
    rv = _resource_version(obj, "EndpointSliceList")
    slices = [decode_slice(item) for item in _list(obj.get("items"), "items")]
    return rv, {s.name: s for s in slices}


class LineSplitter:
    """Cuts a watch stream into its JSON lines (at most ``limit`` bytes each)."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        *lines, rest = self._buf.split(b"\n")
        if len(rest) > self.limit:
            raise DecodeError(f"a watch event longer than {self.limit} bytes")
        self._buf = bytearray(rest)
        return [bytes(line) for line in lines if line.strip()]


@dataclass(frozen=True, slots=True)
class Changed:
    """The set of slices changed: recompute every port's state."""


Outcome = Changed | Failure | None
Phase = Literal["list", "watch"]


class SliceWatch:
    """The list+watch loop of one service: which request next, when, and what answers and
    events mean. ``phase`` is what the next request is; the stream is read while it stays
    ``watch`` (an event that forces a list ends the stream)."""

    def __init__(self, namespace: str, service: str, opts: K8sOptions,
                 backoff: Backoff) -> None:
        self.namespace, self.service = namespace, service
        self.opts = opts
        self.backoff = backoff
        self.phase: Phase = "list"
        self.rv: str | None = None
        self.slices: dict[str, Slice] = {}
        self.failures = 0
        self.lists = 0
        self._sent_at = 0.0
        self._not_before = 0.0

    @property
    def path(self) -> str:
        rv = self.rv if self.phase == "watch" else None
        return slices_path(self.namespace, self.service, rv, self.opts.watch_timeout)

    def delay(self, now: float) -> float:
        return max(0.0, self._not_before - now)

    def sent(self, now: float) -> None:
        self._sent_at = now
        self._not_before = now + self.opts.min_delay
        if self.phase == "list":
            self.lists += 1

    def on_list(self, now: float, status: int, body: bytes) -> Outcome:
        if status != 200:
            return self.on_error(now, _status_error("list", status, body))
        try:
            self.rv, self.slices = decode_list(body)
        except DecodeError as exc:
            return self.on_error(now, f"bad EndpointSliceList: {exc}")
        self.phase = "watch"
        self.failures = 0
        return Changed()

    def on_watch_status(self, now: float, status: int, body: bytes) -> Outcome:
        """The watch's response head (and, unless 200, its body)."""
        if status == 410:
            self.phase = "list"
            return None
        if status != 200:
            return self.on_error(now, _status_error("watch", status, body))
        self.failures = 0
        return Changed()  # the source answers again: a stale set is fresh once more

    def on_event(self, now: float, line: bytes) -> Outcome:
        try:
            event = _obj(json.loads(line), "watch event")
            kind = event.get("type")
            obj = _obj(event.get("object"), f"{kind} event object")
            if kind == "ERROR":
                return self._error_event(now, obj)
            rv = _resource_version(obj, f"{kind} event object")
            if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
                raise DecodeError(f"unknown watch event type {kind!r}")
            change = None if kind == "BOOKMARK" else decode_slice(obj)
        except (ValueError, UnicodeDecodeError) as exc:
            self.phase = "list"
            return self.on_error(now, f"bad watch event: {exc}")
        self.rv = rv
        if change is None or change.service != self.service:
            return None
        if kind == "DELETED":
            return Changed() if self.slices.pop(change.name, None) is not None else None
        self.slices[change.name] = change
        return Changed()

    def _error_event(self, now: float, status: dict[str, Any]) -> Outcome:
        self.phase = "list"
        if status.get("code") == 410:
            return None
        return self.on_error(now, f"watch ERROR event: {status.get('code')} "
                                  f"{status.get('message', '')}")

    def on_bad_stream(self, now: float, error: str) -> Failure:
        """The stream cannot be cut into events: list again after a backoff."""
        self.phase = "list"
        return self.on_error(now, f"bad watch stream: {error}")

    def on_error(self, now: float, error: str) -> Failure:
        self.failures += 1
        self._not_before = now + self.backoff.delay(self.failures)
        return Failure(error)


def _status_error(what: str, status: int, body: bytes) -> str:
    message = ""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict):
            message = str(obj.get("message", ""))
    except (ValueError, UnicodeDecodeError):
        message = body[:200].decode("utf-8", "replace").strip()
    hint = {401: " (token rejected)",
            403: " (RBAC: the service account needs list and watch on endpointslices)"}
    return f"{what} answered {status}{hint.get(status, '')}: {message}"
