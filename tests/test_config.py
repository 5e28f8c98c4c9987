"""Config: zero-config defaults, file and environment layering, errors that name the field."""

from __future__ import annotations

import pytest

from appliance import config as cfg
from appliance import env


def test_zero_config_defaults() -> None:
    """With nothing given, the fixed ports and safe defaults apply."""
    c = cfg.load()
    assert (c.outbound.port, c.inbound.port, c.admin.port) == (4140, 4143, 4191)
    assert c.outbound.orig_dst_override is None
    assert c.detect.timeout == 10.0
    assert c.detect.opaque_ports == frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})


def test_file_then_env_then_flags() -> None:
    """Environment overrides the file; flags override the environment."""
    c = cfg.load(file_data={"outbound": {"port": 1000, "connect_timeout": "2s"}},
                 environ={"APPLIANCE_OUTBOUND_PORT": "2000", "APPLIANCE_DETECT_TIMEOUT": "250ms"},
                 overrides={"outbound.port": "3000"})
    assert c.outbound.port == 3000
    assert c.outbound.connect_timeout == 2.0
    assert c.detect.timeout == 0.25


def test_every_field_has_an_environment_variable() -> None:
    """Each leaf field maps to APPLIANCE_<SECTION>_<NAME>."""
    names = env.config_vars()
    assert names["APPLIANCE_OUTBOUND_ORIG_DST_OVERRIDE"] == "outbound.orig_dst_override"
    assert names["APPLIANCE_LOG_LEVEL"] == "log_level"
    assert len(names) == len(cfg.field_paths())


@pytest.mark.parametrize("source,message", [
    ({"outbound": {"port": 70000}}, "outbound.port: 70000 is not a port number"),
    ({"detect": {"timeout": "soon"}}, "detect.timeout: 'soon' is not a duration"),
    ({"detect": {"opaque_ports": "25,x"}}, "detect.opaque_ports: 'x' is not a port number"),
    ({"outbound": {"orig_dst_override": "localhost:80"}}, "'localhost' is not an IP address"),
    ({"inbound": {"forward_to_loopback": "maybe"}}, "is not a boolean"),
    ({"outbound": {"prot": 1}}, "outbound.prot: unknown field (allowed here:"),
    ({"log_level": "loud"}, "log_level: 'loud' is not one of debug"),
    ({"http": {"pool_max_idle": 0}}, "http.pool_max_idle: 0 must be at least 1"),
])
def test_invalid_values_name_field_value_and_rule(source: dict, message: str) -> None:
    """A bad value is rejected at load with the field, the value and what is allowed."""
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(file_data=source)
    assert message in str(info.value)


def test_port_ranges_and_ipv6_hostport() -> None:
    """Port lists take ranges; HOST:PORT takes bracketed IPv6."""
    assert cfg.parse_port_set("x", "80, 8000-8002") == {80, 8000, 8001, 8002}
    hp = cfg.parse_hostport("x", "[::1]:8080")
    assert hp is not None and (hp.host, hp.port) == ("::1", 8080)
