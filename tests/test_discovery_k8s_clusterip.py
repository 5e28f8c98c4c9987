"""ClusterIP namer: the pure rules (names, Services, the index, per-slice target ports),
then the namer against the local API-server stand-in."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from fakeapis import (
    FakeK8s,
    Harness,
    StateLog,
    endpoint,
    event,
    harnessed,
    hostports,
    service_port,
    slice_obj,
    status_object,
)
from hypothesis import given
from hypothesis import strategies as st
from namer_scenario import FAST, FixedRandom, fresh, until

from appliance.discovery.base import PENDING, Address, AddrState
from appliance.discovery.k8s import decode_slice
from appliance.discovery.k8s_clusterip import (
    ClusterIPOptions,
    Service,
    ServiceIndex,
    ServicePort,
    ServiceWatch,
    Target,
    decode_service,
    degrade,
    parse_name,
    resolve,
    services_path,
    target_state,
)
from appliance.discovery.k8s_listwatch import Changed
from appliance.discovery.registry import build_namers
from appliance.discovery.remote import Backoff, DecodeError, Failure
from appliance.net.namer_k8s_clusterip import ClusterIPNamer


def svc_obj(name: str, cluster_ip: Any, ports: list[dict[str, Any]], *,
            namespace: str = "default", type: str = "ClusterIP", rv: str = "1"
            ) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": type, "ports": ports}
    if isinstance(cluster_ip, list):
        spec |= {"clusterIP": cluster_ip[0], "clusterIPs": cluster_ip}
    elif cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    return {"kind": "Service", "metadata": {"name": name, "namespace": namespace,
                                            "resourceVersion": rv}, "spec": spec}


HTTP = service_port(80, "web", "http")


# -- pure: names and options ------------------------------------------------------------


@pytest.mark.parametrize("segment, parsed", [
    ("10.96.0.10:80", ("10.96.0.10", 80)),
    ("fd00::10:443", ("fd00::10", 443)),
    ("[fd00::a]:8080", ("fd00::a", 8080)),
    ("FD00:0:0::1:80", ("fd00::1", 80)),
    ("::ffff:10.96.0.1:53", ("10.96.0.1", 53)),
])
def test_parse_name(segment: str, parsed: tuple[str, int]) -> None:
    """The dst identifier's <ip>:<port>, IPv6 bare or bracketed, made canonical."""
    assert parse_name((segment,)) == parsed


@pytest.mark.parametrize("name, message", [
    (("web",), "'web' is not <ip>:<port>"),
    (("web.default.svc:80",), "is not <ip>:<port>"),
    (("10.0.0.1",), "is not <ip>:<port>"),
    (("10.0.0.1:0",), "has no port 1-65535"),
    (("10.0.0.1:http",), "has no port 1-65535"),
    (("10.0.0.1:70000",), "has no port 1-65535"),
    (("default", "10.0.0.1:80"), "a name is one segment <ip>:<port>"),
])
def test_parse_name_rejects(name: tuple[str, ...], message: str) -> None:
    """Anything but one <ip>:<port> segment is an error that says what it expected."""
    with pytest.raises(ValueError, match=message):
        parse_name(name)


@given(st.ip_addresses(), st.integers(1, 65535), st.booleans())
def test_parse_name_round_trip(ip: Any, port: int, brackets: bool) -> None:
    """Whatever address and port, the canonical text comes back (mapped IPv4 as IPv4)."""
    text = f"[{ip}]:{port}" if brackets and ip.version == 6 else f"{ip}:{port}"
    mapped = getattr(ip, "ipv4_mapped", None)
    assert parse_name((text,)) == (str(mapped or ip), port)


@pytest.mark.parametrize("options, namespaces", [
    ({}, ()),
    ({"namespaces": ["prod", "web", "prod"]}, ("prod", "web")),
    ({"namespaces": "prod, web,"}, ("prod", "web")),
])
def test_options_namespaces(options: dict[str, Any], namespaces: tuple[str, ...]) -> None:
    """A list or a comma-separated string (environment variables); duplicates dropped."""
    opts = ClusterIPOptions.from_mapping({"api_url": "http://x", **options})
    assert opts.namespaces == namespaces and opts.api_url == "http://x"


@pytest.mark.parametrize("options, message", [
    ({"namespaces": ["Prod"]}, "namespaces: bad value 'Prod' (a namespace is a DNS label"),
    ({"namespaces": 3}, "namespaces: bad value 3 (expected a list of namespaces)"),
    ({"namespaces": [1]}, "namespaces: bad value [1]"),
    ({"namespace": "prod"}, "namespace: unknown option"),
    ({"watch_timeout": 0}, "watch_timeout: bad value 0"),
])
def test_bad_options_name_the_option(options: dict[str, Any], message: str) -> None:
    """Every invalid option is a ValueError that begins with the option's name."""
    with pytest.raises(ValueError) as info:
        ClusterIPOptions.from_mapping(options)
    assert str(info.value).startswith(message)


# -- pure: Services ---------------------------------------------------------------------


@pytest.mark.parametrize("obj, ips, ports", [
    (svc_obj("web", "10.96.0.10", [HTTP]), ("10.96.0.10",),
     (ServicePort("http", 80, "TCP", "web"),)),
    (svc_obj("web", ["10.96.0.10", "fd00::a"], [service_port(80)]),
     ("10.96.0.10", "fd00::a"), (ServicePort("", 80, "TCP", 80),)),
    (svc_obj("db", "None", [service_port(5432, 5432)]), (),
     (ServicePort("", 5432, "TCP", 5432),)),
    (svc_obj("ext", None, [service_port(443)], type="ExternalName"), (),
     (ServicePort("", 443, "TCP", 443),)),
    (svc_obj("ext", "10.96.0.3", [], type="ExternalName"), (), ()),
    (svc_obj("dns", "10.96.0.2", [service_port(53, 53, "dns", "UDP"),
                                  service_port(53, 53, "dns-tcp"), {"name": "x"}]),
     ("10.96.0.2",), (ServicePort("dns", 53, "UDP", 53), ServicePort("dns-tcp", 53, "TCP", 53))),
    (svc_obj("odd", "not-an-ip", [service_port(80, 8080)]), (),
     (ServicePort("", 80, "TCP", 8080),)),
])
def test_decode_service(obj: dict[str, Any], ips: tuple[str, ...],
                        ports: tuple[ServicePort, ...]) -> None:
    """ClusterIPs (dual-stack too) and ports; headless and ExternalName have no ClusterIP;
    a missing targetPort is the port; a port without a number is left out."""
    svc = decode_service(obj)
    assert (svc.cluster_ips, svc.ports) == (ips, ports)


@pytest.mark.parametrize("obj, message", [
    ([], "Service: expected an object"),
    ({"metadata": {"namespace": "a"}}, "Service.metadata.name: missing"),
    ({"metadata": {"name": "a"}}, "Service a: metadata.namespace: missing"),
    (svc_obj("a", "10.0.0.1", []) | {"spec": []}, "default/a.spec: expected an object"),
    (svc_obj("a", "10.0.0.1", [3]), r"default/a.spec.ports\[0\]: expected an object"),
])
def test_decode_service_rejects(obj: Any, message: str) -> None:
    """A malformed Service is a DecodeError naming the field."""
    with pytest.raises(DecodeError, match=message):
        decode_service(obj)


def test_services_paths() -> None:
    """All namespaces, or one; the watch from a resourceVersion with bookmarks."""
    assert services_path(None) == "/api/v1/services"
    assert services_path("prod", "42", 300) == (
        "/api/v1/namespaces/prod/services?watch=1&resourceVersion=42"
        "&allowWatchBookmarks=true&timeoutSeconds=300")


INDEX = ServiceIndex([decode_service(o) for o in (
    svc_obj("web", ["10.96.0.10", "fd00::a"], [HTTP, service_port(9990, 9990, "admin")]),
    svc_obj("dns", "10.96.0.2", [service_port(53, 53, "dns", "UDP")], namespace="kube-system"),
    svc_obj("db", "None", [service_port(5432)]),
    svc_obj("ext", None, [service_port(443)], type="ExternalName"),
)])


@pytest.mark.parametrize("ip, port, expected", [
    ("10.96.0.10", 80, Target("default", "web", "http", "web", "IPv4")),
    ("fd00::a", 9990, Target("default", "web", "admin", 9990, "IPv6")),
    ("10.96.0.10", 81, AddrState("neg", error="service default/web (ClusterIP 10.96.0.10) "
                                              "has no TCP port 81")),
    ("10.96.0.2", 53, AddrState("neg", error="service kube-system/dns (ClusterIP "
                                             "10.96.0.2) has no TCP port 53")),
    ("10.1.2.3", 443, AddrState("neg", error="no Service has the ClusterIP 10.1.2.3")),
])
def test_resolve_table(ip: str, port: int, expected: Target | AddrState) -> None:
    """Known ClusterIP:port to its Service port; anything else neg, saying why (UDP-only
    ports, headless and ExternalName services never match)."""
    assert resolve(INDEX, ip, port) == expected
    assert len(INDEX) == 4


def test_resolve_before_the_services_are_listed_is_pending() -> None:
    """No index yet: pending (the router waits, bounded by bind_timeout)."""
    assert resolve(None, "10.96.0.10", 80) is PENDING


def test_index_first_owner_wins() -> None:
    """Two Services claiming one address (not allowed by the API): the first by name."""
    a = Service("default", "a", "ClusterIP", ("10.0.0.1",), (ServicePort("", 80, "TCP", 1),))
    b = Service("default", "b", "ClusterIP", ("10.0.0.1",), (ServicePort("", 80, "TCP", 2),))
    assert ServiceIndex([b, a]).lookup("10.0.0.1", 80) == Target("default", "a", "", 1, "IPv4")


WEB = Target("default", "web", "http", "web", "IPv4")
WEB6 = Target("default", "web", "http", "web", "IPv6")
UNNAMED = Target("default", "web", "", 8080, "IPv4")


def _slices(*objs: dict[str, Any]) -> dict[str, Any]:
    return {o["metadata"]["name"]: decode_slice(o) for o in objs}


@pytest.mark.parametrize("target, slices, expected", [
    (WEB, [slice_obj("a", [endpoint("10.0.0.1")], [("http", 8080)]),
           slice_obj("b", [endpoint("10.0.0.2")], [("http", 8081)])],
     {"10.0.0.1:8080", "10.0.0.2:8081"}),
    (WEB, [slice_obj("a", [endpoint("10.0.0.1"), endpoint("10.0.0.3", ready=False)],
                     [("http", 8080), ("admin", 9990)])], {"10.0.0.1:8080"}),
    (UNNAMED, [slice_obj("a", [endpoint("10.0.0.1")], [("", 8080)])], {"10.0.0.1:8080"}),
    (WEB6, [slice_obj("a", [endpoint("10.0.0.1")], [("http", 80)]),
            slice_obj("b", [endpoint("fd00::1")], [("http", 80)], address_type="IPv6")],
     {"[fd00::1]:80"}),
    (WEB, [slice_obj("a", [endpoint("10.0.0.1", ready=False)], [("http", 80)])], set()),
    (WEB, [], AddrState("neg", error="service default/web has no EndpointSlices")),
    (WEB, [slice_obj("a", [endpoint("10.0.0.1")], [("grpc", 80)])],
     AddrState("neg", error="service default/web: no IPv4 EndpointSlice has the port "
                            "'http'")),
    (UNNAMED, [slice_obj("a", [endpoint("fd00::1")], [("", 80)], address_type="IPv6")],
     AddrState("neg", error="service default/web: no IPv4 EndpointSlice has the port "
                            "(unnamed)")),
])
def test_target_state_table(target: Target, slices: list[dict[str, Any]],
                            expected: AddrState | set[str]) -> None:
    """The target port per slice (by the Service port's name), ready endpoints of the
    ClusterIP's family; no slices or no such port is neg with the reason."""
    state = target_state(target, _slices(*slices))
    if isinstance(expected, AddrState):
        assert state == expected
    else:
        assert state.kind == "bound" and hostports(state) == expected


A = frozenset({Address("10.0.0.1", 80)})


@pytest.mark.parametrize("state, expected", [
    (AddrState("bound", A), AddrState("bound", A, stale=True, error="down")),
    (AddrState("bound", A, stale=True, error="old"),
     AddrState("bound", A, stale=True, error="down")),
    (AddrState("neg", error="x"), AddrState("failed", error="down")),
    (PENDING, AddrState("failed", error="down")),
])
def test_degrade_table(state: AddrState, expected: AddrState) -> None:
    """A failing source keeps a bound set (stale), else the name is failed."""
    assert degrade(state, "down") == expected


# -- pure: the Services list+watch -------------------------------------------------------


def machine(namespace: str | None = None) -> ServiceWatch:
    opts = ClusterIPOptions.from_mapping({"min_delay": 1, "api_url": "http://x"})
    return ServiceWatch(namespace, opts, Backoff(2, 8, FixedRandom(0.5)))


def listed(m: ServiceWatch) -> None:
    body = json.dumps({"kind": "ServiceList", "metadata": {"resourceVersion": "10"},
                       "items": [svc_obj("web", "10.96.0.10", [HTTP])]}).encode()
    m.sent(0.0)
    assert m.on_list(0.0, 200, body) == Changed()


def test_service_watch_script() -> None:
    """Services keyed by namespace/name; a change of type and a delete reach the index."""
    m = machine()
    assert m.path == "/api/v1/services"
    listed(m)
    assert set(m.items) == {"default/web"} and "resourceVersion=10" in m.path
    other = svc_obj("web", "10.96.0.11", [HTTP], namespace="prod", rv="11")
    assert m.on_event(0.0, event("ADDED", other)) == Changed()
    assert ServiceIndex(m.items.values()).lookup("10.96.0.11", 80) is not None
    external = svc_obj("web", None, [HTTP], type="ExternalName", rv="12")
    assert m.on_event(0.0, event("MODIFIED", external)) == Changed()
    assert ServiceIndex(m.items.values()).lookup("10.96.0.10", 80) is None
    assert m.on_event(0.0, event("DELETED", other | {"metadata": {
        "name": "web", "namespace": "prod", "resourceVersion": "13"}})) == Changed()
    assert set(m.items) == {"default/web"} and m.rv == "13"
    assert m.on_event(0.0, event("ERROR", status_object(410, "Expired", "old"))) is None
    assert m.phase == "list" and m.failures == 0


def test_service_watch_forbidden_names_the_rbac_rule() -> None:
    """403 on services: the hint names list and watch on services."""
    out = machine("prod").on_list(0.0, 403, json.dumps(status_object(
        403, "Forbidden", 'services is forbidden: cannot list resource "services"')).encode())
    assert isinstance(out, Failure)
    assert "needs list and watch on services" in out.error and "forbidden" in out.error


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-1, 70000) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["metadata", "name", "namespace", "resourceVersion", "spec", "type",
                         "clusterIP", "clusterIPs", "ports", "port", "targetPort",
                         "protocol"]), inner, max_size=5),
    max_leaves=25)


@given(st.sampled_from(["ADDED", "MODIFIED", "DELETED"]), JSON)
def test_any_service_event_is_an_outcome_never_a_crash(kind: str, obj: Any) -> None:
    """Whatever a Service event carries, the machine answers and the index builds."""
    m = machine()
    listed(m)
    out = m.on_event(0.0, event(kind, obj))
    assert out is None or isinstance(out, Changed | Failure)
    index = ServiceIndex(m.items.values())
    for ip, port in [("10.96.0.10", 80), ("10.0.0.1", 1)]:
        assert isinstance(resolve(index, ip, port), Target | AddrState)


@given(st.lists(st.tuples(st.ip_addresses(), st.integers(1, 65535)), max_size=6))
def test_every_cluster_ip_port_resolves_to_its_service(pairs: list[tuple[Any, int]]) -> None:
    """Each Service's own ClusterIP and TCP port resolve to it, with the right family."""
    services = [Service("default", f"s{i}", "ClusterIP", (str(ipaddress.ip_address(ip)),),
                        (ServicePort("", port, "TCP", port),))
                for i, (ip, port) in enumerate(pairs)]
    index = ServiceIndex(services)
    for svc in services:
        target = resolve(index, svc.cluster_ips[0], svc.ports[0].port)
        assert isinstance(target, Target)
        first = min((s for s in services if s.cluster_ips == svc.cluster_ips
                     and s.ports[0].port == svc.ports[0].port), key=lambda s: s.name)
        assert target.service == first.name
        assert target.family == ("IPv6" if ":" in svc.cluster_ips[0] else "IPv4")


# -- the namer against the stand-in ----------------------------------------------------

Scenario = Callable[[FakeK8s, ClusterIPNamer, Harness], Awaitable[None]]
VIP = ("10.96.0.10:80",)


def clusterip_namer(api: FakeK8s, **options: Any
                    ) -> AbstractAsyncContextManager[tuple[ClusterIPNamer, Harness]]:
    return harnessed(lambda ctx: ClusterIPNamer(ClusterIPOptions.from_mapping(
        {"api_url": api.url, **FAST, **options}), ctx))


def run(scenario: Scenario, **options: Any) -> None:
    async def main() -> None:
        async with FakeK8s() as api, clusterip_namer(api, **options) as (namer, harness):
            await scenario(api, namer, harness)
    asyncio.run(main())


def neg(s: AddrState) -> bool:
    return s.kind == "neg"


def web(api: FakeK8s) -> None:
    """Service web on 10.96.0.10:80 -> named target port "web", two pods whose container
    port differs (8080 and 8081, so two slices)."""
    api.apply_service("default", "web", "10.96.0.10", [HTTP])
    api.apply_slice("default", "web-a", "web", [endpoint("10.0.0.1")], [("http", 8080)])
    api.apply_slice("default", "web-b", "web", [endpoint("10.0.0.2")], [("http", 8081)])


def test_cluster_ip_resolves_to_the_endpoints_per_slice() -> None:
    """A ClusterIP:port binds to the ready endpoints, the target port taken per slice."""
    async def scenario(api: FakeK8s, namer: ClusterIPNamer, harness: Harness) -> None:
        web(api)
        log = StateLog(namer.watch(VIP))
        assert log.last.kind == "pending"
        await log.until(fresh("10.0.0.1:8080", "10.0.0.2:8081"))
        assert [r.path for r in api.list_requests()] == [
            "/api/v1/services", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"]
        assert harness.failures() == []
    run(scenario)


def test_unknown_headless_and_external_name_are_neg() -> None:
    """Addresses no Service owns as a ClusterIP (and ports it lacks) are neg, at once once
    the Services are listed; no EndpointSlice source is started for them."""
    async def scenario(api: FakeK8s, namer: ClusterIPNamer, harness: Harness) -> None:
        web(api)
        api.apply_service("default", "db", "None", [service_port(5432)])
        api.apply_service("default", "ext", None, [service_port(443)], type="ExternalName",
                          external_name="example.com")
        await StateLog(namer.watch(VIP)).until(fresh("10.0.0.1:8080", "10.0.0.2:8081"))
        for name, error in [("10.96.0.99:80", "no Service has the ClusterIP 10.96.0.99"),
                            ("10.96.0.10:81", "has no TCP port 81"),
                            ("None:5432", "is not <ip>:<port>")]:
            state = namer.watch((name,)).state
            assert state.kind == "neg" and error in state.error
        assert namer.slice_sources == 1
    run(scenario)


def test_service_created_scaled_and_deleted() -> None:
    """neg, then bound when the Service appears (neg, not pending, while its slices are
    listed), rescaled with its slices, neg again when deleted (its slice source stopped)."""
    async def scenario(api: FakeK8s, namer: ClusterIPNamer, harness: Harness) -> None:
        log = StateLog(namer.watch(VIP))
        await log.until(neg)
        web(api)
        await log.until(fresh("10.0.0.1:8080", "10.0.0.2:8081"))
        api.apply_slice("default", "web-b", "web", [endpoint("10.0.0.2"), endpoint("10.0.0.3")],
                        [("http", 8081)])
        await log.until(fresh("10.0.0.1:8080", "10.0.0.2:8081", "10.0.0.3:8081"))
        api.apply_slice("default", "web-a", "web", [endpoint("10.0.0.1", ready=False)],
                        [("http", 8080)])
        await log.until(fresh("10.0.0.2:8081", "10.0.0.3:8081"))
        api.delete_service("default", "web")
        await log.until(neg)
        assert namer.slice_sources == 0
        await until(lambda: [t.cancelled() for t in harness.tasks] == [False, True])
        assert harness.failures() == []
        # never pending again once answered: the router waits for discovery only once
        assert [s.kind for s in log.states].count("pending") == 1
    run(scenario)


def test_port_renamed_follows_the_new_slice_port() -> None:
    """A Service port renamed (slices rewritten): the address follows the new name."""
    async def scenario(api: FakeK8s, namer: ClusterIPNamer, harness: Harness) -> None:
        web(api)
        log = StateLog(namer.watch(VIP))
        await log.until(fresh("10.0.0.1:8080", "10.0.0.2:8081"))
        api.apply_service("default", "web", "10.96.0.10", [service_port(80, "web", "www")])
        await log.until(neg)
        api.apply_slice("default", "web-a", "web", [endpoint("10.0.0.1")], [("www", 9000)])
        await log.until(fresh("10.0.0.1:9000"))
        assert len(api.list_requests("EndpointSlice")) == 1  # one source throughout
    run(scenario)


def test_ports_and_families_of_one_service_share_one_slice_source() -> None:
    """Two ports and both families of a dual-stack Service: one slice list+watch; each
    address gets its port and its family's endpoints."""
    async def scenario(api: FakeK8s, namer: ClusterIPNamer, harness: Harness) -> None:
        api.apply_service("default", "web", ["10.96.0.10", "fd00::a"],
                          [HTTP, service_port(9990, 9990, "admin")])
        api.apply_slice("default", "web-4", "web", [endpoint("10.0.0.1")],
                        [("http", 8080), ("admin", 9990)])
        api.apply_slice("default", "web-6", "web", [endpoint("fd00::1")],
                        [("http", 8080), ("admin", 9990)], address_type="IPv6")
        http = StateLog(namer.watch(VIP))
        await http.until(fresh("10.0.0.1:8080"))
        admin = StateLog(namer.watch(("10.96.0.10:9990",)))
        assert hostports(admin.last) == {"10.0.0.1:9990"}  # at once, no request
        v6 = StateLog(namer.watch(("fd00::a:80",)))
        assert hostports(v6.last) == {"[fd00::1]:8080"}
        assert namer.slice_sources == 1 and len(api.list_requests("EndpointSlice")) == 1
    run(scenario)


def test_outage_keeps_last_good_stale_then_recovers() -> None:
    """API server down: the set is kept, stale, failures reported; back: fresh, and a
    change made meanwhile arrives."""
    async def scenario(api: FakeK8s, namer: ClusterIPNamer, harness: Harness) -> None:
        web(api)
        log = StateLog(namer.watch(VIP))
        await log.until(fresh("10.0.0.1:8080", "10.0.0.2:8081"))
        await api.go_down()
        stale = await log.until(lambda s: s.stale)
        assert hostports(stale) == {"10.0.0.1:8080", "10.0.0.2:8081"} and stale.error
        await until(lambda: {n for _, n, ok, _ in harness.reports if not ok}
                    >= {("services", "*"), ("default", "web")})
        api.apply_slice("default", "web-a", "web", [endpoint("10.0.0.9")], [("http", 8080)])
        await api.go_up()
        await log.until(fresh("10.0.0.9:8080", "10.0.0.2:8081"))
    run(scenario)


def test_api_down_from_the_start_is_failed_not_pending() -> None:
    """Services never listed and the API unreachable: failed, so the router does not wait
    and sends requests to their original destination."""
    async def scenario(api: FakeK8s, namer: ClusterIPNamer, harness: Harness) -> None:
        await api.go_down()
        log = StateLog(namer.watch(VIP))
        failed = await log.until(lambda s: s.kind == "failed")
        assert "connect failed" in failed.error or "closed" in failed.error
        web(api)
        await api.go_up()
        await log.until(fresh("10.0.0.1:8080", "10.0.0.2:8081"))
    run(scenario)


def test_services_watch_resumes_and_relists_on_410() -> None:
    """The Services watch resumes from its last rv; after compaction it lists again, with
    no failure and no stale state."""
    async def scenario(api: FakeK8s, namer: ClusterIPNamer, harness: Harness) -> None:
        log = StateLog(namer.watch(VIP))
        await log.until(neg)
        await until(lambda: api.open_watches_of("Service") == 1)
        api.end_watches()
        await until(lambda: len(api.watch_requests("Service")) == 2)
        assert api.watch_requests("Service")[1].query["resourceVersion"] == [str(api.rv)]
        await until(lambda: api.open_watches_of("Service") == 1)
        api.end_watches()  # then, before the client watches again, a change it misses
        api.apply_service("default", "noise", "10.96.0.50", [service_port(80)])
        api.compact()
        await until(lambda: len(api.list_requests("Service")) == 2)
        web(api)
        await log.until(fresh("10.0.0.1:8080", "10.0.0.2:8081"))
        assert harness.failures() == [] and not any(s.stale for s in log.states)
    run(scenario)


def test_bad_services_list_fails_then_recovers() -> None:
    """A Services list that is not JSON: failed and reported, then healed by a retry."""
    async def scenario(api: FakeK8s, namer: ClusterIPNamer, harness: Harness) -> None:
        web(api)
        api.list_bodies.append(b"<html>gateway</html>")
        log = StateLog(namer.watch(VIP))
        failed = await log.until(lambda s: s.kind == "failed")
        assert "bad ServiceList: not JSON" in failed.error
        await log.until(fresh("10.0.0.1:8080", "10.0.0.2:8081"))
    run(scenario)


def test_configured_namespaces_only() -> None:
    """With namespaces, one Services source per namespace; others' ClusterIPs are neg."""
    async def scenario(api: FakeK8s, namer: ClusterIPNamer, harness: Harness) -> None:
        web(api)
        api.apply_service("prod", "api", "10.96.0.20", [service_port(80, 8080)])
        api.apply_slice("prod", "api-a", "api", [endpoint("10.0.1.1")], [("", 8080)])
        api.apply_service("staging", "api", "10.96.0.30", [service_port(80, 8080)])
        log = StateLog(namer.watch(("10.96.0.20:80",)))
        await log.until(fresh("10.0.1.1:8080"))
        assert namer.watch(VIP).state.kind == "neg"
        assert namer.watch(("10.96.0.30:80",)).state.kind == "neg"
        paths = {r.path for r in api.list_requests("Service")}
        assert paths == {"/api/v1/namespaces/prod/services",
                         "/api/v1/namespaces/kube-system/services"}
    run(scenario, namespaces=["prod", "kube-system"])


def test_forbidden_services_say_what_to_grant() -> None:
    """401 on the Services list: failed, the error says the token was rejected."""
    async def scenario(api: FakeK8s, namer: ClusterIPNamer, harness: Harness) -> None:
        api.tokens = {"valid"}
        log = StateLog(namer.watch(VIP))
        failed = await log.until(lambda s: s.kind == "failed")
        assert failed.error == "list answered 401 (token rejected): Unauthorized"
    run(scenario)


def test_registry_builds_the_namer() -> None:
    """``kind: io.l5d.k8s.clusterip`` builds the namer under /#/io.l5d.k8s.clusterip; a bad
    option names its index."""
    harness = Harness()
    namers = build_namers([{"kind": "io.l5d.k8s.clusterip", "api_url": "http://127.0.0.1:1",
                            "namespaces": ["prod"]}], harness.ctx)
    namer = namers[("#", "io.l5d.k8s.clusterip")]
    assert isinstance(namer, ClusterIPNamer) and namer.segments == 1
    assert harness.tasks == []  # nothing starts before a name is watched
    with pytest.raises(ValueError, match=r"namers\[0\]\.namespaces: bad value 'A_B'"):
        build_namers([{"kind": "io.l5d.k8s.clusterip", "api_url": "http://x",
                       "namespaces": ["A_B"]}], harness.ctx)
