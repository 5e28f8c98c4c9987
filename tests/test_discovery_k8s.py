"""Kubernetes namer: the pure EndpointSlice rules and list+watch loop, then the namer
against the local API-server stand-in."""

from __future__ import annotations

import asyncio
import json
import os
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
    self_signed,
    server_tls,
    slice_obj,
    status_object,
)
from hypothesis import given
from hypothesis import strategies as st
from namer_scenario import FAST, FixedRandom, fresh, until

from appliance.discovery.base import NEG, AddrState
from appliance.discovery.k8s import (
    K8sName,
    K8sOptions,
    SliceWatch,
    decode_slice,
    endpoint_state,
    in_cluster_url,
    parse_name,
    slices_path,
)
from appliance.discovery.k8s_listwatch import Changed, LineSplitter
from appliance.discovery.registry import build_namers
from appliance.discovery.remote import Backoff, DecodeError, Failure
from appliance.net.namer_k8s import K8sNamer, TokenError, TokenFile

# -- pure -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, parsed", [
    (("default", "http", "web"), K8sName("default", "http", "web")),
    (("prod", "8080", "api-v2"), K8sName("prod", 8080, "api-v2")),
])
def test_parse_name(name: tuple[str, ...], parsed: K8sName) -> None:
    """namespace / port name or number / service."""
    assert parse_name(name) == parsed


@pytest.mark.parametrize("name, message", [
    (("default", "web"), "a name is <namespace>/<port>/<service>"),
    (("Default", "http", "web"), "namespace 'Default' is not a DNS label"),
    (("default", "http", "web_1"), "service 'web_1' is not a DNS label"),
    (("default", "0", "web"), "port '0' is not 1-65535"),
    (("default", "70000", "web"), "port '70000' is not 1-65535"),
    (("default", "-http", "web"), "neither a number nor a port name"),
    (("default", "a-very-long-port-name", "web"), "neither a number nor a port name"),
])
def test_parse_name_rejects(name: tuple[str, ...], message: str) -> None:
    """Names that cannot exist in Kubernetes are errors that say why."""
    with pytest.raises(ValueError, match=message):
        parse_name(name)


@pytest.mark.parametrize("env, url", [
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
     "https://10.96.0.1:443"),
    ({"KUBERNETES_SERVICE_HOST": "fd00::1"}, "https://[fd00::1]:443"),
])
def test_in_cluster_url(env: dict[str, str], url: str) -> None:
    """The API server from the environment every pod gets; IPv6 bracketed."""
    assert in_cluster_url(env) == url


@pytest.mark.parametrize("env, message", [
    ({}, "api_url: not set, and KUBERNETES_SERVICE_HOST is not set"),
    ({"KUBERNETES_SERVICE_HOST": "h", "KUBERNETES_SERVICE_PORT": "https"},
     "KUBERNETES_SERVICE_PORT: bad value 'https'"),
])
def test_in_cluster_url_errors(env: dict[str, str], message: str) -> None:
    """Outside a pod without api_url, the error says what to set."""
    with pytest.raises(ValueError, match=message):
        in_cluster_url(env)


@pytest.mark.parametrize("options, message", [
    ({"api_url": "10.0.0.1:6443"}, "api_url: bad value '10.0.0.1:6443'"),
    ({"watch_timeout": 0}, "watch_timeout: bad value 0"),
    ({"token_file": 3}, "token_file: bad value 3"),
    ({"namespace": "x"}, "namespace: unknown option"),
])
def test_bad_options_name_the_option(options: dict[str, Any], message: str) -> None:
    """Every invalid option is a ValueError that begins with the option's name."""
    with pytest.raises(ValueError) as info:
        K8sOptions.from_mapping(options)
    assert str(info.value).startswith(message)


def test_paths() -> None:
    """List by service label; watch from a resourceVersion with bookmarks and a timeout."""
    base = ("/apis/discovery.k8s.io/v1/namespaces/prod/endpointslices?"
            "labelSelector=kubernetes.io%2Fservice-name%3Dweb")
    assert slices_path("prod", "web") == base
    assert slices_path("prod", "web", "42", 300) == (
        base + "&watch=1&resourceVersion=42&allowWatchBookmarks=true&timeoutSeconds=300")


def test_decode_slice_conditions_ports_and_meta() -> None:
    """ready unset counts as ready; null ports are "all ports"; zone, node, pod kept."""
    s = decode_slice(slice_obj("web-a", [
        endpoint("10.0.0.1", zone="z1", node="n1", pod="web-1"),
        endpoint("10.0.0.2", ready=None), endpoint("10.0.0.3", ready=False)],
        [("http", 8080)]) | {"ports": [{"name": "http", "port": 8080}, {"port": None}]})
    assert s.ports == (("http", 8080),)
    assert [e.ready for e in s.endpoints] == [True, True, False]
    assert dict(s.endpoints[0].meta) == {"zone": "z1", "node": "n1", "pod": "web-1"}
    assert dict(s.endpoints[1].meta) == {}


@pytest.mark.parametrize("obj, message", [
    ([], "EndpointSlice: expected an object"),
    ({"metadata": {}}, "metadata.name: missing"),
    ({"metadata": {"name": "a"}, "endpoints": {}}, "a.endpoints: expected a list"),
    ({"metadata": {"name": "a"}, "endpoints": [{"addresses": "10.0.0.1"}]},
     r"a.endpoints\[0\].addresses: expected a list"),
])
def test_decode_slice_rejects(obj: Any, message: str) -> None:
    """A malformed slice is a DecodeError naming the field."""
    with pytest.raises(DecodeError, match=message):
        decode_slice(obj)


def _state(slices: list[dict[str, Any]], port: str | int) -> AddrState:
    return endpoint_state({s["metadata"]["name"]: decode_slice(s) for s in slices}, port)


EPS = [endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False)]


@pytest.mark.parametrize("slices, port, expected", [
    ([], "http", NEG),
    ([slice_obj("a", EPS, [("http", 8080)])], "http", {"10.0.0.1:8080"}),
    ([slice_obj("a", EPS, [("http", 8080)])], 9000, {"10.0.0.1:9000"}),
    ([slice_obj("a", EPS, [("http", 8080)])], "grpc",
     AddrState("neg", error="no endpoint port named 'grpc'")),
    ([slice_obj("a", [endpoint("10.0.0.3", ready=False)], [("http", 80)])], "http", set()),
    ([slice_obj("a", EPS, [("http", 8080)]),  # a rollout: the new pods use another number
      slice_obj("b", [endpoint("10.0.0.9")], [("http", 8081)])], "http",
     {"10.0.0.1:8080", "10.0.0.9:8081"}),
    ([slice_obj("a", EPS, [("http", 8080)]),  # one pod in two slices while they rebalance
      slice_obj("b", [endpoint("10.0.0.1")], [("http", 8080)])], "http", {"10.0.0.1:8080"}),
    ([slice_obj("a", [endpoint("fd00::1")], [("http", 80)], address_type="IPv6"),
      slice_obj("b", [endpoint("db.example")], [("http", 80)], address_type="FQDN")],
     "http", {"[fd00::1]:80"}),
])
def test_endpoint_state_table(slices: list[dict[str, Any]], port: str | int,
                              expected: AddrState | set[str]) -> None:
    """No slices is neg, an unknown port name is neg, else the ready endpoints' ports."""
    state = _state(slices, port)
    if isinstance(expected, AddrState):
        assert state == expected
    else:
        assert state.kind == "bound" and hostports(state) == expected


@given(st.lists(st.binary(min_size=1, max_size=20).filter(lambda b: b"\n" not in b
                                                          and b.strip()), max_size=8),
       st.lists(st.integers(0, 500), max_size=8))
def test_line_splitter_any_split(lines: list[bytes], cuts: list[int]) -> None:
    """Watch lines come out whole whatever the read boundaries."""
    data = b"".join(line + b"\n" for line in lines)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    splitter = LineSplitter()
    out = [x for a, b in zip(points, points[1:], strict=False)
           for x in splitter.feed(data[a:b])]
    assert out == lines


def test_line_splitter_limit() -> None:
    """A line longer than the limit is a DecodeError, not unbounded memory."""
    with pytest.raises(DecodeError, match="longer than 10 bytes"):
        LineSplitter(limit=10).feed(b"x" * 11)


def machine(**options: Any) -> SliceWatch:
    opts = K8sOptions.from_mapping({"min_delay": 1, "backoff_base": 2, "backoff_max": 8,
                                    "api_url": "http://x", **options})
    return SliceWatch("default", "web", opts, Backoff(2, 8, FixedRandom(0.5)))


def listed(m: SliceWatch, rv: str = "10") -> None:
    body = json.dumps({"kind": "EndpointSliceList", "metadata": {"resourceVersion": rv},
                       "items": [slice_obj("a", EPS, [("http", 80)], rv="9")]}).encode()
    m.sent(0.0)
    assert m.on_list(0.0, 200, body) == Changed()


def test_watch_script_events_move_rv_and_slices() -> None:
    """ADDED/MODIFIED/DELETED change the slices; BOOKMARK and others' slices only move rv."""
    m = machine()
    assert "watch" not in m.path
    listed(m)
    assert m.phase == "watch" and "resourceVersion=10" in m.path
    assert m.on_watch_status(0.0, 200, b"") == Changed()
    added = slice_obj("b", [endpoint("10.0.0.5")], [("http", 80)], rv="11")
    assert m.on_event(0.0, event("ADDED", added)) == Changed()
    assert set(m.slices) == {"a", "b"} and m.rv == "11"
    other = slice_obj("c", [], [], service="other", rv="12")
    assert m.on_event(0.0, event("ADDED", other)) is None and set(m.slices) == {"a", "b"}
    mark = {"kind": "EndpointSlice", "metadata": {"resourceVersion": "15"}}
    assert m.on_event(0.0, event("BOOKMARK", mark)) is None and m.rv == "15"
    gone = slice_obj("a", [], [], rv="16")
    assert m.on_event(0.0, event("DELETED", gone)) == Changed() and set(m.slices) == {"b"}
    assert m.on_event(0.0, event("DELETED", gone | {"metadata": {
        "name": "a", "resourceVersion": "17",
        "labels": {"kubernetes.io/service-name": "web"}}})) is None
    assert m.rv == "17" and m.phase == "watch" and m.failures == 0


@pytest.mark.parametrize("how", ["event", "status"])
def test_watch_410_relists_without_failure(how: str) -> None:
    """An expired resourceVersion (ERROR event or HTTP 410) means list again, no failure."""
    m = machine()
    listed(m)
    if how == "event":
        m.on_watch_status(0.0, 200, b"")
        gone = status_object(410, "Expired", "too old resource version: 10 (20)")
        assert m.on_event(0.0, event("ERROR", gone)) is None
    else:
        assert m.on_watch_status(0.0, 410, b"{}") is None
    assert m.phase == "list" and m.failures == 0 and "watch" not in m.path


@pytest.mark.parametrize("line, message", [
    (b"{nope", "bad watch event: "),
    (event("ERROR", status_object(500, "InternalError", "etcd")),
     "watch ERROR event: 500 etcd"),
    (event("SURPRISE", {"metadata": {"resourceVersion": "3"}}), "unknown watch event type"),
    (event("ADDED", {"metadata": {"name": "x"}}), "resourceVersion: missing"),
])
def test_bad_events_fail_and_relist(line: bytes, message: str) -> None:
    """A malformed or failed event is a Failure; the next request is a list."""
    m = machine()
    listed(m)
    out = m.on_event(5.0, line)
    assert isinstance(out, Failure) and message in out.error
    assert m.phase == "list" and m.delay(5.0) == pytest.approx(1.5)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-1, 70000) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "object", "metadata", "name", "resourceVersion", "labels",
                         "endpoints", "addresses", "conditions", "ready", "ports", "port",
                         "code", "targetRef", "kind"]), inner, max_size=5),
    max_leaves=25)


@given(st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]), JSON)
def test_any_event_is_an_outcome_never_a_crash(kind: str, obj: Any) -> None:
    """Whatever object an event carries, the machine answers with an outcome."""
    m = machine()
    listed(m)
    out = m.on_event(0.0, event(kind, obj))
    assert out is None or isinstance(out, Changed | Failure)
    if isinstance(out, Failure):
        assert m.phase == "list"
    for port in ("http", 80):
        assert endpoint_state(m.slices, port).kind in ("bound", "neg")


def test_timing_min_delay_and_backoff() -> None:
    """Requests are min_delay apart; failures back off (2 -> 1.5, 4 -> 3, cap 8 -> 6)."""
    m = machine()
    m.sent(0.0)
    assert m.delay(0.2) == pytest.approx(0.8)
    for expected in (1.5, 3.0, 6.0, 6.0):
        m.on_error(10.0, "refused")
        assert m.delay(10.0) == pytest.approx(expected)
    listed(m)
    assert m.failures == 0


@pytest.mark.parametrize("status, hint", [(401, "token rejected"),
                                          (403, "needs list and watch on endpointslices")])
def test_auth_failures_say_what_to_fix(status: int, hint: str) -> None:
    """401 and 403 failures name the token and the RBAC rule."""
    out = machine().on_list(0.0, status, json.dumps(status_object(
        status, "Forbidden", "endpointslices is forbidden")).encode())
    assert isinstance(out, Failure) and hint in out.error and "forbidden" in out.error


def test_token_file_rereads_only_on_change(tmp_path: Any) -> None:
    """The token is read again when the file is replaced, not on every request."""
    path = tmp_path / "token"
    path.write_text("one\n")
    token = TokenFile(str(path))
    assert (token.current(), token.current(), token.reads) == ("one", "one", 1)
    (tmp_path / "new").write_text("two")
    os.replace(tmp_path / "new", path)  # kubelet swaps the file
    assert (token.current(), token.reads) == ("two", 2)
    path.unlink()
    with pytest.raises(TokenError, match="token_file .*token"):
        token.current()


# -- the namer against the stand-in ----------------------------------------------------

Scenario = Callable[[FakeK8s, K8sNamer, Harness], Awaitable[None]]


def k8s_namer(api: FakeK8s, **options: Any
              ) -> AbstractAsyncContextManager[tuple[K8sNamer, Harness]]:
    env = options.pop("env", None)  # in-cluster: the URL comes from the environment
    url = {} if env is not None else {"api_url": api.url}
    return harnessed(lambda ctx: K8sNamer(K8sOptions.from_mapping({**url, **FAST, **options}),
                                          ctx, env=env))


def run(scenario: Scenario, **options: Any) -> None:
    async def main() -> None:
        async with FakeK8s() as api, k8s_namer(api, **options) as (namer, harness):
            await scenario(api, namer, harness)
    asyncio.run(main())


def test_list_then_watch_pushes_every_change() -> None:
    """Slices listed, then added, made unready and deleted reach the watch in order."""
    async def scenario(api: FakeK8s, namer: K8sNamer, harness: Harness) -> None:
        api.apply_slice("default", "web-a", "web",
                        [endpoint("10.0.0.1", zone="z1", node="n1", pod="web-1")],
                        [("http", 8080)])
        log = StateLog(namer.watch(("default", "http", "web")))
        state = await log.until(fresh("10.0.0.1:8080"))
        assert dict(next(iter(state.addrs)).meta) == {"zone": "z1", "node": "n1",
                                                       "pod": "web-1"}
        api.apply_slice("default", "web-b", "web", [endpoint("10.0.0.2")], [("http", 8080)])
        await log.until(fresh("10.0.0.1:8080", "10.0.0.2:8080"))
        api.apply_slice("default", "web-a", "web", [endpoint("10.0.0.1", ready=False)],
                        [("http", 8080)])
        await log.until(fresh("10.0.0.2:8080"))
        api.delete_slice("default", "web-a")
        api.delete_slice("default", "web-b")
        await log.until(lambda s: s.kind == "neg")
        assert len(api.list_requests()) == 1 and harness.failures() == []
    run(scenario)


def test_service_without_slices_is_neg_until_created() -> None:
    """No slices: neg; once a slice appears the same watch binds."""
    async def scenario(api: FakeK8s, namer: K8sNamer, harness: Harness) -> None:
        log = StateLog(namer.watch(("default", "http", "web")))
        await log.until(lambda s: s.kind == "neg")
        api.apply_slice("default", "web-a", "web", [endpoint("10.0.0.1")], [("http", 80)])
        await log.until(fresh("10.0.0.1:80"))
    run(scenario)


def test_watch_resumes_from_last_resource_version() -> None:
    """When the server ends a watch, the next one starts at the last rv (a bookmark's
    included) and nothing is listed again."""
    async def scenario(api: FakeK8s, namer: K8sNamer, harness: Harness) -> None:
        api.apply_slice("default", "web-a", "web", [endpoint("10.0.0.1")], [("http", 80)])
        log = StateLog(namer.watch(("default", "http", "web")))
        await log.until(fresh("10.0.0.1:80"))
        await until(lambda: api.open_watches == 1)
        api.apply_slice("default", "other", "other", [endpoint("10.9.9.9")], [("http", 80)])
        api.bookmark()  # the only way the client learns the rv of another service's change
        rv = api.rv
        api.end_watches()
        await until(lambda: len(api.watch_requests()) == 2)
        assert api.watch_requests()[1].query["resourceVersion"] == [str(rv)]
        api.apply_slice("default", "web-b", "web", [endpoint("10.0.0.2")], [("http", 80)])
        await log.until(fresh("10.0.0.1:80", "10.0.0.2:80"))
        assert len(api.list_requests()) == 1
        first = api.watch_requests()[0]
        assert first.query["allowWatchBookmarks"] == ["true"]
        assert first.query["labelSelector"] == ["kubernetes.io/service-name=web"]
    run(scenario)


@pytest.mark.parametrize("as_status", [False, True])
def test_expired_resource_version_relists(as_status: bool) -> None:
    """410 (an ERROR event, or the HTTP status) after compaction: list again, carry on."""
    async def scenario(api: FakeK8s, namer: K8sNamer, harness: Harness) -> None:
        api.gone_as_status = as_status
        api.apply_slice("default", "web-a", "web", [endpoint("10.0.0.1")], [("http", 80)])
        log = StateLog(namer.watch(("default", "http", "web")))
        await log.until(fresh("10.0.0.1:80"))
        await until(lambda: api.open_watches == 1)
        api.apply_slice("default", "noise", "other", [], [])
        api.compact()
        api.end_watches()
        await until(lambda: len(api.list_requests()) == 2)
        api.apply_slice("default", "web-b", "web", [endpoint("10.0.0.2")], [("http", 80)])
        await log.until(fresh("10.0.0.1:80", "10.0.0.2:80"))
        assert harness.failures() == [] and not any(s.stale for s in log.states)
    run(scenario)


def test_outage_keeps_last_good_stale_then_recovers() -> None:
    """API server down: last set kept, stale, reported with backoff; back: fresh again."""
    async def scenario(api: FakeK8s, namer: K8sNamer, harness: Harness) -> None:
        api.apply_slice("default", "web-a", "web", [endpoint("10.0.0.1")], [("http", 80)])
        log = StateLog(namer.watch(("default", "http", "web")))
        await log.until(fresh("10.0.0.1:80"))
        await api.go_down()
        stale = await log.until(lambda s: s.stale)
        assert hostports(stale) == {"10.0.0.1:80"} and stale.error
        await until(lambda: len(harness.failures()) >= 2)
        assert all("connect failed" in e or "closed" in e for e in harness.failures())
        api.apply_slice("default", "web-b", "web", [endpoint("10.0.0.2")], [("http", 80)])
        await api.go_up()
        await log.until(fresh("10.0.0.1:80", "10.0.0.2:80"))
    run(scenario)


def test_bad_event_keeps_last_good_reports_and_relists() -> None:
    """Garbage on the watch stream: stale and reported, then a list heals it."""
    async def scenario(api: FakeK8s, namer: K8sNamer, harness: Harness) -> None:
        api.apply_slice("default", "web-a", "web", [endpoint("10.0.0.1")], [("http", 80)])
        log = StateLog(namer.watch(("default", "http", "web")))
        await log.until(fresh("10.0.0.1:80"))
        await until(lambda: api.open_watches == 1)
        api.send_raw(b'{"type": "ADDED", "object": \n')
        stale = await log.until(lambda s: s.stale)
        assert "bad watch event" in stale.error and harness.failures() == [stale.error]
        await log.until(fresh("10.0.0.1:80"))
        assert len(api.list_requests()) == 2
    run(scenario)


def test_bad_list_body_fails_then_recovers() -> None:
    """A list that is not JSON: failed (nothing known yet), reported, retried."""
    async def scenario(api: FakeK8s, namer: K8sNamer, harness: Harness) -> None:
        api.apply_slice("default", "web-a", "web", [endpoint("10.0.0.1")], [("http", 80)])
        api.list_bodies.append(b"<html>gateway</html>")
        log = StateLog(namer.watch(("default", "http", "web")))
        failed = await log.until(lambda s: s.kind == "failed")
        assert "bad EndpointSliceList: not JSON" in failed.error
        await log.until(fresh("10.0.0.1:80"))
    run(scenario)


def test_ports_of_one_service_share_one_source() -> None:
    """Two ports of a service: one list+watch, each watch gets its own port."""
    async def scenario(api: FakeK8s, namer: K8sNamer, harness: Harness) -> None:
        api.apply_slice("default", "web-a", "web", [endpoint("10.0.0.1")],
                        [("http", 80), ("admin", 9990)])
        http = StateLog(namer.watch(("default", "http", "web")))
        await http.until(fresh("10.0.0.1:80"))
        admin = StateLog(namer.watch(("default", "admin", "web")))
        assert admin.last == AddrState("bound", admin.last.addrs)  # at once, no request
        assert hostports(admin.last) == {"10.0.0.1:9990"}
        number = StateLog(namer.watch(("default", "8443", "web")))
        assert hostports(number.last) == {"10.0.0.1:8443"}
        missing = namer.watch(("default", "grpc", "web"))
        assert missing.state.kind == "neg"
        assert len(harness.tasks) == 1 and len(api.list_requests()) == 1
        bad = namer.watch(("Default", "http", "web"))
        assert bad.state.kind == "neg" and "DNS label" in bad.state.error
    run(scenario)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return self_signed(str(tmp_path_factory.mktemp("tls")))


def test_in_cluster_tls_token_and_rotation(cert: tuple[str, str], tmp_path: Any) -> None:
    """https from KUBERNETES_SERVICE_HOST/PORT, CA checked, bearer token sent; a rotated
    token file is read again and used from the next request on."""
    token = tmp_path / "token"
    token.write_text("first-token\n")

    async def main() -> None:
        async with FakeK8s(tls=server_tls(*cert)) as api:
            api.tokens = {"first-token"}
            env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                   "KUBERNETES_SERVICE_PORT": str(api.port)}
            async with k8s_namer(api, env=env, token_file=str(token),
                                 ca_file=cert[0]) as (namer, harness):
                assert namer.api_url == f"https://127.0.0.1:{api.port}"
                api.apply_slice("default", "web-a", "web", [endpoint("10.0.0.1")],
                                [("http", 80)])
                log = StateLog(namer.watch(("default", "http", "web")))
                await log.until(fresh("10.0.0.1:80"))
                await until(lambda: api.open_watches == 1)
                (tmp_path / "next").write_text("second-token")
                os.replace(tmp_path / "next", token)
                api.tokens = {"second-token"}  # the old one has expired
                api.end_watches()
                await until(lambda: len(api.watch_requests()) == 2)
                api.apply_slice("default", "web-b", "web", [endpoint("10.0.0.2")],
                                [("http", 80)])
                await log.until(fresh("10.0.0.1:80", "10.0.0.2:80"))
                auth = [r.headers["authorization"] for r in api.requests]
                assert auth[0] == "Bearer first-token" and auth[-1] == "Bearer second-token"
                assert namer.token is not None and namer.token.reads == 2
                assert harness.failures() == []
    asyncio.run(main())


def test_rejected_token_fails_with_a_hint() -> None:
    """401 from the API server: failed, and the error says the token was rejected."""
    async def scenario(api: FakeK8s, namer: K8sNamer, harness: Harness) -> None:
        api.tokens = {"valid"}
        log = StateLog(namer.watch(("default", "http", "web")))
        failed = await log.until(lambda s: s.kind == "failed")
        assert "list answered 401 (token rejected): Unauthorized" == failed.error
    run(scenario)


def test_missing_token_file_fails_without_a_request(tmp_path: Any) -> None:
    """An unreadable token file is a reported failure naming the file; nothing is sent."""
    async def scenario(api: FakeK8s, namer: K8sNamer, harness: Harness) -> None:
        log = StateLog(namer.watch(("default", "http", "web")))
        failed = await log.until(lambda s: s.kind == "failed")
        assert failed.error.startswith(f"token_file {tmp_path}/absent:")
        assert api.requests == []
    run(scenario, token_file=str(tmp_path / "absent"))


def test_registry_builds_the_namer(monkeypatch: pytest.MonkeyPatch) -> None:
    """``kind: io.l5d.k8s`` builds a K8sNamer; outside a pod without api_url, a clear
    error."""
    harness = Harness()
    namers = build_namers([{"kind": "io.l5d.k8s", "api_url": "http://127.0.0.1:8001"}],
                          harness.ctx)
    assert isinstance(namers[("#", "io.l5d.k8s")], K8sNamer)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ValueError, match=r"namers\[0\]\.api_url: not set"):
        build_namers([{"kind": "io.l5d.k8s"}], harness.ctx)
