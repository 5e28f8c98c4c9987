"""Port policies from their text: authorization, termination, origination; the decisions
they make, and the errors that name what is wrong."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance import config
from appliance.config import ConfigError
from appliance.identity.policy import (
    ANYONE,
    MESHED,
    NOBODY,
    Clients,
    Origination,
    Termination,
    parse_authorization,
    parse_origination,
    parse_termination,
)

WEB = "spiffe://example.org/ns/default/sa/web"
API = "spiffe://example.org/ns/prod/sa/api"
OTHER_DOMAIN = "spiffe://other.org/ns/prod/sa/api"


@pytest.mark.parametrize("text,client,allowed", [
    ("80=unauthenticated", None, True),
    ("80=unauthenticated", WEB, True),
    ("80=meshed", None, False),
    ("80=meshed", WEB, True),
    ("80=deny", WEB, False),
    ("80=deny", None, False),
    (f"80={WEB}", WEB, True),
    (f"80={WEB}", API, False),
    (f"80={WEB}", None, False),
    ("80=spiffe://example.org/ns/prod/*", API, True),
    ("80=spiffe://example.org/ns/prod/*", WEB, False),
    ("80=spiffe://example.org/ns/prod/*", OTHER_DOMAIN, False),
    (f"80={WEB},spiffe://example.org/ns/prod/*", API, True),
    (f"80={WEB} {API}", API, True),
    ("80=all-authenticated", WEB, True),
    ("80=all-unauthenticated", None, True),
])
def test_clients_decide(text: str, client: str | None, allowed: bool) -> None:
    """The clients of a port allow exactly the identities they name (None: no identity)."""
    assert parse_authorization(text).clients(80).allows(client) is allowed


@pytest.mark.parametrize("mode,default", [("permissive", ANYONE), ("strict", MESHED)])
def test_mode_sets_the_default_for_ports_not_listed(mode: str, default: Clients) -> None:
    """permissive: unlisted ports accept anyone; strict: only mesh identities."""
    authz = parse_authorization("8080=deny", mode)
    assert authz.clients(9999) == default
    assert authz.clients(8080) == NOBODY


def test_a_listed_port_overrides_strict_mode() -> None:
    """``unauthenticated`` on one port keeps plaintext working there in strict mode."""
    authz = parse_authorization("8080=unauthenticated; 9000-9002=meshed", "strict")
    assert authz.clients(8080).allows(None)
    assert authz.clients(9001) == MESHED and not authz.clients(9001).allows(None)
    assert not authz.clients(8081).allows(None)


def test_entries_split_on_semicolons_and_new_lines() -> None:
    """Entries may be separated by ``;`` or new lines, and ports listed with commas."""
    authz = parse_authorization(f"80,81=meshed\n90={WEB};\n\n")
    assert authz.clients(81) == MESHED and authz.clients(90).ids == {WEB}


def test_needs_identity() -> None:
    """Only ``unauthenticated`` admits a client without a mesh identity."""
    assert not ANYONE.needs_identity
    assert MESHED.needs_identity and NOBODY.needs_identity
    assert parse_authorization(f"1={WEB}").clients(1).needs_identity


def test_clients_describe_themselves() -> None:
    """The text in a 403 names what is allowed."""
    clients = parse_authorization(f"1=meshed,{WEB},spiffe://example.org/ns/x/*").clients(1)
    assert str(clients) == f"meshed,{WEB},spiffe://example.org/ns/x/*"
    assert str(NOBODY) == "deny"


@pytest.mark.parametrize("text,message", [
    ("80", "is not KEY=VALUE"),
    ("80=", "is not KEY=VALUE"),
    ("=meshed", "is not KEY=VALUE"),
    ("eighty=meshed", "'eighty' is not a port"),
    ("0=meshed", "within 1-65535"),
    ("90-80=meshed", "within 1-65535"),
    ("80=friends", "'friends' is not a SPIFFE ID"),
    ("80=spiffe://example.org/ns/a", "the path must be"),
    ("80=spiffe://example.org/*/sa/*", "single \\*"),
    ("80=web*", "spiffe:// prefix"),
    ("80=deny,meshed", "deny cannot be combined"),
    ("80=meshed; 80=deny", "port 80 is listed twice"),
])
def test_bad_authorization_names_the_problem(text: str, message: str) -> None:
    """Each mistake is a ConfigError naming the field, the entry and the rule."""
    with pytest.raises(ConfigError, match=f"inbound.authorization: .*{message}"):
        parse_authorization(text)


def test_config_rejects_bad_policy_at_load() -> None:
    """The config load checks the fields, naming them."""
    with pytest.raises(ConfigError, match="inbound.tls_mode: 'lax' is not one of"):
        config.load(overrides={"inbound.tls_mode": "lax"})
    with pytest.raises(ConfigError, match="inbound.authorization"):
        config.load(overrides={"inbound.authorization": "x=y"})
    with pytest.raises(ConfigError, match="inbound.tls_terminate"):
        config.load(overrides={"inbound.tls_terminate": "443=not_a_name!"})
    with pytest.raises(ConfigError, match="outbound.tls_originate"):
        config.load(overrides={"outbound.tls_originate": "443=ca:/x"})
    conf = config.load(environ={"APPLIANCE_INBOUND_TLS_MODE": "strict",
                                "APPLIANCE_INBOUND_AUTHORIZATION": "80=meshed"})
    assert conf.inbound.tls_mode == "strict" and conf.inbound.authorization == "80=meshed"


@pytest.mark.parametrize("text,port,expected", [
    ("443=www.example.org,API.example.org", 443,
     Termination(names=("www.example.org", "api.example.org"))),
    ("8443-8444=*.example.org", 8444, Termination(names=("*.example.org",))),
    ("443=@/etc/tls/site.pem", 443, Termination(cert_file="/etc/tls/site.pem")),
    ("443=@/etc/tls/site.crt,@/etc/tls/site.key", 443,
     Termination(cert_file="/etc/tls/site.crt", key_file="/etc/tls/site.key")),
])
def test_termination_table(text: str, port: int, expected: Termination) -> None:
    """Ports map to DNS names (issued certificate) or given files."""
    assert parse_termination(text)[port] == expected


@pytest.mark.parametrize("text,message", [
    ("443=www.example.org,@/x.pem", "not both"),
    ("443=@a,@b,@c", "@CERT_AND_KEY or @CERT,@KEY"),
    ("443=@", "@CERT_AND_KEY or @CERT,@KEY"),
    ("443=under_score.example", "is not a DNS name"),
    ("443=a.example; 443=b.example", "listed twice"),
])
def test_bad_termination_names_the_problem(text: str, message: str) -> None:
    """Termination mistakes name the field and the entry."""
    with pytest.raises(ConfigError, match=f"inbound.tls_terminate: .*{message}"):
        parse_termination(text)


def test_origination_lookup_prefers_address_and_port() -> None:
    """An address:port entry wins over a port entry; other destinations get nothing."""
    table = parse_origination("443=sni:any.example; 198.51.100.7:443=sni:api.example.com,"
                              "ca:/etc/ca.pem,port:8443; [2001:db8::1]:80=sni:v6.example")
    assert table.lookup("198.51.100.7", 443) == Origination("api.example.com", "/etc/ca.pem",
                                                             8443)
    assert table.lookup("::ffff:198.51.100.7", 443).sni == "api.example.com"
    assert table.lookup("203.0.113.1", 443) == Origination("any.example")
    assert table.lookup("2001:db8:0::1", 80).sni == "v6.example"
    assert table.lookup("203.0.113.1", 80) is None
    assert not parse_origination("") and table


@pytest.mark.parametrize("text,message", [
    ("443=ca:/x", "needs sni:NAME"),
    ("443=sni:*.example.org", "needs sni:NAME"),
    ("443=sni:a.example,sni:b.example", "sni is given twice"),
    ("443=verify:none", "is not sni:NAME"),
    ("api.example.com:443=sni:api.example.com", "is not an IP address"),
    ("1.2.3.4=sni:a.example", "is not IP:PORT"),
    ("443=sni:a.example,port:0", "within 1-65535"),
    ("443=sni:a.example; 443=sni:b.example", "listed twice"),
])
def test_bad_origination_names_the_problem(text: str, message: str) -> None:
    """Origination mistakes name the field and the entry."""
    with pytest.raises(ConfigError, match=f"outbound.tls_originate: .*{message}"):
        parse_origination(text)


SEGMENT = st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True)


@given(SEGMENT, SEGMENT, SEGMENT, SEGMENT)
def test_prefix_patterns_match_exactly_their_prefix(ns1: str, sa1: str, ns2: str,
                                                    sa2: str) -> None:
    """``spiffe://d/ns/NS/*`` allows an identity iff it is in namespace NS."""
    clients = parse_authorization(f"1=spiffe://example.org/ns/{ns1}/*").clients(1)
    other = f"spiffe://example.org/ns/{ns2}/sa/{sa2}"
    assert clients.allows(f"spiffe://example.org/ns/{ns1}/sa/{sa1}")
    assert clients.allows(other) is (ns2 == ns1)
    assert not clients.allows(None)
