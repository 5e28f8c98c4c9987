"""Kubernetes ClusterIP discovery, the pure part: from the address an app dialled to the
endpoints of the Service behind it.

Theory of operation: with the ``dst`` identifier a transparent request is named
``/svc/<ip>:<port>`` after its original destination; the dtab ``/svc =>
/#/io.l5d.k8s.clusterip`` hands ``<ip>:<port>`` to this namer (one segment). Two kinds of
list+watch source (:mod:`appliance.discovery.k8s_listwatch`) answer it:

* the **Services** (:class:`ServiceWatch`: ``/api/v1/services``, or one source per
  configured namespace): :class:`ServiceIndex` maps every ClusterIP (``spec.clusterIPs``,
  both families when dual-stack) and TCP port to a :class:`Target`: namespace, service,
  the Service port's name and its ``targetPort``. ExternalName and headless Services
  (``clusterIP: None``) have no ClusterIP, so nothing maps to them;
* the **EndpointSlices** of each service a watched address maps to
  (:class:`~appliance.discovery.k8s.SliceWatch`, shared by every port of the service).
  The target port is resolved per slice, as kube-proxy does: the EndpointSlice controller
  writes each Service port into every slice under the Service port's name, with the
  number the ``targetPort`` (a number, or a container port name) has on that slice's pods.
  Only slices of the ClusterIP's family count (an IPv6 ClusterIP gets the IPv6 slices).

:func:`resolve` and :func:`target_state` give a name's state: ``pending`` until the
Services are listed, ``neg`` for an address no Service has (the router then sends the
request to its original destination, unchanged) or a Service without endpoints for that
port, else the ready endpoints, ``bound``. :func:`degrade` applies a failing source's
error the way :meth:`~appliance.discovery.base.Watch.fail` does: the last good set, stale.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from appliance.discovery.base import PENDING, AddrState, Name
from appliance.discovery.k8s import DNS_LABEL, K8sOptions, Slice, endpoint_state
from appliance.discovery.k8s_listwatch import ListWatch, as_list, as_object, collection_path
from appliance.discovery.remote import Backoff, DecodeError, OptionReader

KIND = "io.l5d.k8s.clusterip"


def parse_name(name: Name) -> tuple[str, int]:
    """``<ip>:<port>`` (IPv6 bare or in brackets) as (canonical ip, port); ``ValueError``
    says what is wrong. An IPv4-mapped IPv6 address is its IPv4 address."""
    if len(name) != 1:
        raise ValueError(f"{KIND}: a name is one segment <ip>:<port>, got {'/'.join(name)!r}")
    host, sep, port = name[0].rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{KIND}: {name[0]!r} is not <ip>:<port> (the original "
                         f"destination, as the dst identifier names it)") from None
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{KIND}: {name[0]!r} has no port 1-65535")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port)


def show(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _namespaces(value: Any) -> tuple[str, ...]:
    """A list of namespaces, or one comma-separated string (for environment variables)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(n, str) for n in items):
        raise ValueError(f"namespaces: bad value {value!r} (expected a list of namespaces)")
    names = tuple(dict.fromkeys(n.strip() for n in items if n.strip()))
    for n in names:
        if not DNS_LABEL.match(n):
            raise ValueError(f"namespaces: bad value {n!r} (a namespace is a DNS label: "
                             f"lowercase letters, digits and '-', at most 63)")
    return names


@dataclass(frozen=True, kw_only=True)
class ClusterIPOptions(K8sOptions):
    namespaces: tuple[str, ...] = ()
    """Watch the Services of these namespaces only (one list+watch each); empty: of the
    whole cluster (one list+watch of ``/api/v1/services``)."""

    @classmethod
    def _read(cls, o: OptionReader) -> dict[str, Any]:
        return {**super()._read(o), "namespaces": _namespaces(o.options.get("namespaces", ()))}


# -- Services ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    protocol: str
    target_port: int | str
    """A number, or the name of a container port (resolved per EndpointSlice)."""


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    type: str
    cluster_ips: tuple[str, ...]
    """Canonical addresses; empty for headless (``None``) and ExternalName services."""
    ports: tuple[ServicePort, ...]


def _cluster_ips(spec: dict[str, Any], where: str) -> tuple[str, ...]:
    raw = as_list(spec.get("clusterIPs"), f"{where}.clusterIPs") or [spec.get("clusterIP")]
    ips: list[str] = []
    for value in raw:
        try:
            ips.append(str(ipaddress.ip_address(str(value))))
        except ValueError:
            continue  # "None" (headless), "" (ExternalName), or not an address
    return tuple(dict.fromkeys(ips))


def _port(raw: Any, where: str) -> ServicePort | None:
    p = as_object(raw, where)
    number = p.get("port")
    if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
        return None
    target = p.get("targetPort")
    if isinstance(target, bool) or not isinstance(target, int | str) or target in ("", 0):
        target = number
    return ServicePort(str(p.get("name") or ""), number, str(p.get("protocol") or "TCP"),
                       target)


def decode_service(raw: Any) -> Service:
    """One Service object; :class:`DecodeError` names the first thing wrong. Ports and
    addresses that cannot be used (no number, not an IP) are left out."""
    obj = as_object(raw, "Service")
    meta = as_object(obj.get("metadata"), "Service.metadata")
    name, namespace = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not name:
        raise DecodeError("Service.metadata.name: missing")
    if not isinstance(namespace, str) or not namespace:
        raise DecodeError(f"Service {name}: metadata.namespace: missing")
    where = f"{namespace}/{name}.spec"
    spec = as_object({} if obj.get("spec") is None else obj["spec"], where)
    kind = str(spec.get("type") or "ClusterIP")
    ports = (_port(p, f"{where}.ports[{i}]")
             for i, p in enumerate(as_list(spec.get("ports"), f"{where}.ports")))
    ips = () if kind == "ExternalName" else _cluster_ips(spec, where)
    return Service(namespace, name, kind, ips, tuple(p for p in ports if p is not None))


def services_path(namespace: str | None, watch_from: str | None = None,
                  timeout: float = 300.0) -> str:
    """The Services of one namespace (or of all, ``None``): list, or watch from a
    resourceVersion."""
    return collection_path(_services_base(namespace), [], watch_from, timeout)


def _services_base(namespace: str | None) -> str:
    return f"/api/v1/namespaces/{namespace}/services" if namespace else "/api/v1/services"


class ServiceWatch(ListWatch[Service]):
    """The list+watch loop of the Services of one namespace, or of the cluster."""

    kind = "Service"
    resource = "services"

    def __init__(self, namespace: str | None, opts: K8sOptions, backoff: Backoff) -> None:
        super().__init__(opts, backoff)
        self.namespace = namespace

    def collection(self) -> tuple[str, list[tuple[str, str]]]:
        return _services_base(self.namespace), []

    def decode(self, raw: Any) -> Service:
        return decode_service(raw)

    def key(self, item: Service) -> str:
        return f"{item.namespace}/{item.name}"


# -- from an address to endpoints ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """What a ClusterIP and port stand for."""

    namespace: str
    service: str
    port_name: str
    """The Service port's name ("" for a single unnamed port): the slices' port name."""
    target_port: int | str
    family: str
    """``IPv4`` or ``IPv6``: the EndpointSlice address type that serves this ClusterIP."""


class ServiceIndex:
    """Every (ClusterIP, TCP port) of a set of Services. If two Services claimed one
    address (the API server does not allow it), the first by namespace/name wins."""

    def __init__(self, services: Iterable[Service]) -> None:
        self._targets: dict[tuple[str, int], Target] = {}
        self._owners: dict[str, str] = {}
        for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
            for ip in svc.cluster_ips:
                self._owners.setdefault(ip, f"{svc.namespace}/{svc.name}")
                family = "IPv6" if ":" in ip else "IPv4"
                for p in svc.ports:
                    if p.protocol == "TCP":
                        self._targets.setdefault((ip, p.port), Target(
                            svc.namespace, svc.name, p.name, p.target_port, family))

    def __len__(self) -> int:
        return len(self._targets)

    def lookup(self, ip: str, port: int) -> Target | None:
        return self._targets.get((ip, port))

    def why_not(self, ip: str, port: int) -> str:
        owner = self._owners.get(ip)
        if owner is None:
            return f"no Service has the ClusterIP {ip}"
        return f"service {owner} (ClusterIP {ip}) has no TCP port {port}"


def resolve(index: ServiceIndex | None, ip: str, port: int) -> Target | AddrState:
    """The Target of an address, or its state when there is none: ``pending`` while the
    Services are not listed yet (``index`` None), else ``neg`` saying why."""
    if index is None:
        return PENDING
    target = index.lookup(ip, port)
    if target is None:
        return AddrState("neg", error=index.why_not(ip, port))
    return target


def target_state(target: Target, slices: Mapping[str, Slice]) -> AddrState:
    """The ready endpoints of a Target from its service's slices; ``neg`` (with the reason)
    when no slice of the ClusterIP's family has the port."""
    state = endpoint_state(slices, target.port_name, (target.family,))
    if state.kind != "neg":
        return state
    svc = f"service {target.namespace}/{target.service}"
    if not slices:
        return AddrState("neg", error=f"{svc} has no EndpointSlices")
    port = repr(target.port_name) if target.port_name else "(unnamed)"
    return AddrState("neg", error=f"{svc}: no {target.family} EndpointSlice has the port "
                                  f"{port}")


def degrade(state: AddrState, error: str) -> AddrState:
    """``state`` while its source fails: a bound set is kept, stale; anything else is
    ``failed`` (as :meth:`~appliance.discovery.base.Watch.fail`)."""
    if state.kind == "bound":
        return AddrState("bound", state.addrs, stale=True, error=error)
    return AddrState("failed", error=error)
