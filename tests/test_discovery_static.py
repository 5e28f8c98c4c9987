"""The static namer and the shared address syntax (host:port[*weight], mappings)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.discovery.base import NEG, Address, NamerContext, bound
from appliance.discovery.static import (
    StaticNamer,
    check_host,
    parse_entry,
    parse_hostport,
    parse_services,
)

CTX = NamerContext(spawn=lambda coro: None)


@pytest.mark.parametrize(("text", "expected"), [
    ("198.18.0.2:8080", ("198.18.0.2", 8080, 1.0)),
    ("198.18.0.3:8080*2", ("198.18.0.3", 8080, 2.0)),
    ("web.example:80*0.5", ("web.example", 80, 0.5)),
    ("[::1]:80", ("::1", 80, 1.0)),
    ("[2001:DB8::0001]:443*3", ("2001:db8::1", 443, 3.0)),
    ("  localhost:1  ", ("localhost", 1, 1.0)),
    ("_svc.example.:65535", ("_svc.example.", 65535, 1.0)),
])
def test_parse_hostport_accepts(text: str, expected: tuple[str, int, float]) -> None:
    """host:port, [v6]:port and a *weight suffix parse to (host, port, weight)."""
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("198.18.0.2", "expected host:port"),
    ("::1:80", "expected host:port"),
    ("[::1]80", "expected [ipv6]:port"),
    ("[10.0.0.1]:80", "brackets are for IPv6 only"),
    ("host:0", "bad port 0"),
    ("host:65536", "bad port 65536"),
    ("host:http", "bad port 'http'"),
    ("host:80*0", "bad weight 0.0"),
    ("host:80*-1", "bad weight -1.0"),
    ("host:80*nan", "bad weight nan"),
    ("host:80*x", "bad weight 'x'"),
    (":80", "empty host"),
    ("bad host:80", "bad host 'bad host'"),
    ("10.0.0.300:80", "bad host '10.0.0.300'"),
    ("-web:80", "bad host '-web'"),
])
def test_parse_hostport_rejects(text: str, message: str) -> None:
    """Malformed entries raise ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("*", r"\*")):
        parse_hostport(text)


def test_parse_entry_mapping_with_meta() -> None:
    """A mapping entry carries host, port, weight and string metadata."""
    addr = parse_entry({"host": "198.18.0.4", "port": "8080", "weight": 2,
                        "meta": {"zone": "b", "canary": True, "rack": 7}})
    assert addr == Address("198.18.0.4", 8080, 2.0, {"zone": "b", "canary": "true",
                                                      "rack": "7"})


@pytest.mark.parametrize(("entry", "message"), [
    ({"host": "a"}, "needs both host and port"),
    ({"host": "a", "port": 1, "zone": "b"}, "unknown key 'zone'"),
    ({"host": 5, "port": 1}, "bad host 5"),
    ({"host": "a", "port": True}, "bad port True"),
    ({"host": "a", "port": 1, "meta": ["x"]}, "meta must be a mapping"),
    ({"host": "a", "port": 1, "meta": {"x": {"y": 1}}}, "meta 'x'"),
    (42, "not int"),
])
def test_parse_entry_rejects(entry: Any, message: str) -> None:
    """A bad mapping entry is refused with the key at fault."""
    with pytest.raises(ValueError, match=message):
        parse_entry(entry)


@pytest.mark.parametrize(("services", "message"), [
    (["web"], "services: expected a mapping"),
    ({"web": "10.0.0.1:80"}, r"services\.web: expected a list"),
    ({"web": ["10.0.0.1:80", "10.0.0.1"]}, r"services\.web\[1\]: bad address '10.0.0.1'"),
    ({"web": ["10.0.0.1:80", "10.0.0.1:80*2"]},
     r"services\.web\[1\]: duplicate address 10.0.0.1:80 \(also entry 0\)"),
    ({"a/b": []}, "bad service name 'a/b'"),
])
def test_parse_services_names_the_entry(services: Any, message: str) -> None:
    """Errors in the services table name the service and the entry index."""
    with pytest.raises(ValueError, match=message):
        parse_services(services)


def test_static_namer_bound_and_neg() -> None:
    """A listed name is bound to its addresses; any other name is neg."""
    namer = StaticNamer.from_options(
        {"services": {"web": ["198.18.0.2:8080", "198.18.0.3:8080*2"], "empty": []}}, CTX)
    assert namer.watch(("web",)).state == bound([Address("198.18.0.2", 8080),
                                                 Address("198.18.0.3", 8080, 2.0)])
    assert namer.watch(("empty",)).state == bound([])
    assert namer.watch(("other",)).state == NEG
    assert namer.watch(("web",)) is namer.watch(("web",))
    assert namer.watch(("web", "extra")).state.kind == "neg"
    namer.close()


@pytest.mark.parametrize(("options", "message"), [
    ({}, "services: missing"),
    ({"services": {}, "poll": 1}, "poll: unknown option"),
    ({"services": {"web": [7]}}, r"services\.web\[0\]"),
])
def test_from_options_names_the_option(options: dict[str, Any], message: str) -> None:
    """from_options errors begin with the option at fault."""
    with pytest.raises(ValueError, match=message):
        StaticNamer.from_options(options, CTX)


hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9]{0,10}){0,3}", fullmatch=True))


@given(host=hosts, port=st.integers(1, 65535),
       weight=st.floats(min_value=0.001, max_value=1e6, allow_nan=False))
def test_address_text_round_trips(host: str, port: int, weight: float) -> None:
    """str(Address) with a *weight suffix parses back to the same address."""
    addr = Address(host, port, weight)
    assert parse_hostport(f"{addr}*{weight!r}") == (host, port, weight)


@given(st.ip_addresses())
def test_check_host_normalizes_ip_literals(ip: ipaddress.IPv4Address | ipaddress.IPv6Address
                                           ) -> None:
    """Any IP literal is accepted and given in its canonical form."""
    assert check_host(ip.exploded) == str(ip)
