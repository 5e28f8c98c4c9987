"""Kubernetes discovery, the pure part: names, options, EndpointSlices.

Theory of operation: a Kubernetes name is ``/#/io.l5d.k8s/<namespace>/<port>/<service>``.
The source follows the EndpointSlices of the service (label
``kubernetes.io/service-name=<service>``) with the list+watch loop of
:mod:`appliance.discovery.k8s_listwatch` (list, watch from the list's resourceVersion,
resume from the last one, list again on 410 Gone); :class:`SliceWatch` is that loop for
the slices of one service.

:func:`endpoint_state` turns the slices into the watch state for one port: no slices is
``neg`` (the service does not exist, as in linkerd), a port name no slice has is ``neg``,
otherwise the ready endpoints (``conditions.ready`` not false) are ``bound``, possibly
empty. A failure keeps the last good set (stale) and retries after a jittered backoff;
requests for one service are at least ``min_delay`` apart. The net side
(``appliance.net.namer_k8s``) does the requests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Self

from appliance.discovery.base import NEG, Address, AddrState, Name, bound
from appliance.discovery.k8s_listwatch import ListWatch, as_list, as_object, collection_path
from appliance.discovery.remote import Backoff, DecodeError, OptionReader, check_backoff

KIND = "io.l5d.k8s"
SERVICE_LABEL = "kubernetes.io/service-name"
TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
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
        if not DNS_LABEL.match(value):
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
    def from_mapping(cls, options: Mapping[str, Any]) -> Self:
        """Validate a ``namers:`` entry's options; ``ValueError`` names the bad one."""
        o = OptionReader(options, cls.__dataclass_fields__)
        opts = cls(**cls._read(o))
        check_backoff(opts)
        return opts

    @classmethod
    def _read(cls, o: OptionReader) -> dict[str, Any]:
        """The keyword arguments from the options (a subclass adds its own)."""
        api_url = o.text("api_url", None)
        if api_url is not None and not api_url.startswith(("http://", "https://")):
            raise ValueError(f"api_url: bad value {api_url!r} (expected http:// or https://)")
        return dict(
            api_url=api_url.rstrip("/") if api_url else None,
            token_file=o.text("token_file", None), ca_file=o.text("ca_file", None),
            watch_timeout=o.number("watch_timeout", cls.watch_timeout, 1, 3600),
            **o.timing(cls))


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
    base, query = _slices_collection(namespace, service)
    return collection_path(base, query, watch_from, timeout)


def _slices_collection(namespace: str, service: str) -> tuple[str, list[tuple[str, str]]]:
    return (f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
            [("labelSelector", f"{SERVICE_LABEL}={service}")])


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


def _endpoint(raw: Any, where: str) -> Endpoint:
    ep = as_object(raw, where)
    addresses = tuple(str(a) for a in as_list(ep.get("addresses"), f"{where}.addresses"))
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
    obj = as_object(raw, "EndpointSlice")
    meta = as_object(obj.get("metadata"), "EndpointSlice.metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise DecodeError("EndpointSlice.metadata.name: missing")
    labels = meta.get("labels") or {}
    service = str(labels.get(SERVICE_LABEL, "")) if isinstance(labels, dict) else ""
    ports = []
    for i, p in enumerate(as_list(obj.get("ports"), f"{name}.ports")):
        port = as_object(p, f"{name}.ports[{i}]")
        if isinstance(port.get("port"), int) and not isinstance(port.get("port"), bool):
            ports.append((str(port.get("name") or ""), int(port["port"])))
    endpoints = tuple(_endpoint(e, f"{name}.endpoints[{i}]")
                      for i, e in enumerate(as_list(obj.get("endpoints"), f"{name}.endpoints")))
    return Slice(name, service, str(obj.get("addressType", "")), tuple(ports), endpoints)


def _slice_port(s: Slice, port: str | int) -> int | None:
    if isinstance(port, int):
        return port
    return next((number for name, number in s.ports if name == port), None)


def endpoint_state(slices: Mapping[str, Slice], port: str | int,
                   address_types: tuple[str, ...] = ("IPv4", "IPv6")) -> AddrState:
    """The watch state of one port of a service, from all its slices (only those of
    ``address_types``: an IPv4 ClusterIP is served by the IPv4 slices)."""
    if not slices:
        return NEG
    addrs: list[Address] = []
    found = False
    for s in slices.values():
        number = _slice_port(s, port)
        if number is None or s.address_type not in address_types:
            continue
        found = True
        addrs += [Address(a, number, 1.0, ep.meta)
                  for ep in s.endpoints if ep.ready for a in ep.addresses]
    if not found and isinstance(port, str):
        return AddrState("neg", error=f"no endpoint port named {port!r}")
    return bound(addrs)


class SliceWatch(ListWatch[Slice]):
    """The list+watch loop of the EndpointSlices of one service, by slice name."""

    kind = "EndpointSlice"
    resource = "endpointslices"

    def __init__(self, namespace: str, service: str, opts: K8sOptions,
                 backoff: Backoff) -> None:
        super().__init__(opts, backoff)
        self.namespace, self.service = namespace, service

    @property
    def slices(self) -> dict[str, Slice]:
        return self.items

    def collection(self) -> tuple[str, list[tuple[str, str]]]:
        return _slices_collection(self.namespace, self.service)

    def decode(self, raw: Any) -> Slice:
        return decode_slice(raw)

    def key(self, item: Slice) -> str:
        return item.name

    def wanted(self, item: Slice) -> bool:
        return item.service == self.service
