"""The namer registry: kinds, prefixes, lazy imports and errors that name the entry."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from appliance.discovery import registry
from appliance.discovery.base import Namer, NamerContext
from appliance.discovery.registry import build_namers, parse_prefix, register
from appliance.discovery.static import StaticNamer
from appliance.net.namer_dns import DnsNamer, DnsSrvNamer
from appliance.net.namer_files import FilesNamer

CTX = NamerContext(spawn=lambda coro: None)


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registrations made by a test are undone after it."""
    monkeypatch.setattr(registry, "KINDS", dict(registry.KINDS))
    monkeypatch.setattr(registry, "MODULES", dict(registry.MODULES))
    yield


def test_builds_each_kind_under_its_default_prefix(tmp_path: Path) -> None:
    """Each kind is served under /#/<kind> as written, the files alias included."""
    namers = build_namers([
        {"kind": "static", "services": {"web": ["127.0.0.1:80"]}},
        {"kind": "io.l5d.fs", "rootDir": str(tmp_path)},
        {"kind": "files", "root_dir": str(tmp_path)},
        {"kind": "dns", "nameservers": ["127.0.0.1"]},
        {"kind": "dns-srv", "nameservers": ["127.0.0.1:5353"]},
    ], CTX)
    assert {k: type(v) for k, v in namers.items()} == {
        ("#", "static"): StaticNamer, ("#", "io.l5d.fs"): FilesNamer,
        ("#", "files"): FilesNamer, ("#", "dns"): DnsNamer, ("#", "dns-srv"): DnsSrvNamer}


@pytest.mark.parametrize(("text", "prefix"), [
    ("/#/web-files", ("#", "web-files")),
    ("/web-files", ("#", "web-files")),
    ("/#/disco/east/", ("#", "disco", "east")),
])
def test_parse_prefix(text: str, prefix: tuple[str, ...]) -> None:
    """A prefix is a path under /#; /# is prepended when missing, as linkerd does."""
    assert parse_prefix(text) == prefix


@pytest.mark.parametrize("text", ["web", "/#", "/#/", "/#/a//b", "/#/a b", 7])
def test_parse_prefix_rejects(text: Any) -> None:
    """Prefixes that are not paths with at least one segment after /# are refused."""
    with pytest.raises(ValueError, match="bad prefix"):
        parse_prefix(text)


def test_custom_prefixes_let_one_kind_serve_twice(tmp_path: Path) -> None:
    """Two files namers with their own prefixes over two directories."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    namers = build_namers([
        {"kind": "io.l5d.fs", "prefix": "/#/web-files", "root_dir": str(tmp_path / "a")},
        {"kind": "io.l5d.fs", "prefix": "/api-files", "root_dir": str(tmp_path / "b")},
    ], CTX)
    assert sorted(namers) == [("#", "api-files"), ("#", "web-files")]
    assert namers[("#", "web-files")].root_dir == str(tmp_path / "a")  # type: ignore[attr-defined]


@pytest.mark.parametrize(("config", "message"), [
    ({"kind": "static"}, "namers: expected a list, not dict"),
    (["static"], r"namers\[0\]: expected a mapping with a kind"),
    ([{"services": {}}], r"namers\[0\]\.kind: missing \(known kinds: .*dns-srv.*static"),
    ([{"kind": "zookeeper"}], r"namers\[0\]\.kind: unknown kind 'zookeeper'"),
    ([{"kind": "static", "services": {}}, {"kind": "static", "services": {}}],
     r"namers\[1\]\.prefix: /#/static is already used by namers\[0\]"),
    ([{"kind": "static", "services": {}}, {"kind": "static", "prefix": "x", "services": {}}],
     r"namers\[1\]\.prefix: bad prefix 'x'"),
    ([{"kind": "static", "services": {"web": ["nohost"]}}],
     r"namers\[0\]\.services\.web\[0\]: bad address 'nohost'"),
    ([{"kind": "static", "services": {}}, {"kind": "io.l5d.fs", "root_dir": "/nonexistent"}],
     r"namers\[1\]\.root_dir: '/nonexistent' is not a directory"),
    ([{"kind": "dns", "min_ttl": 0}], r"namers\[0\]\.min_ttl: bad value 0"),
])
def test_errors_name_the_index_and_option(config: Any, message: str) -> None:
    """Every config error names namers[i] and the option at fault."""
    with pytest.raises(ValueError, match=message):
        build_namers(config, CTX)


def test_missing_module_is_a_clear_error(clean_registry: None) -> None:
    """A known kind whose module is not installed says which module is missing."""
    registry.MODULES["io.l5d.example"] = "appliance.net.namer_does_not_exist"
    with pytest.raises(ValueError, match=r"namers\[0\]\.kind: 'io.l5d.example' needs the "
                                         r"module appliance.net.namer_does_not_exist, which "
                                         r"is not installed"):
        build_namers([{"kind": "io.l5d.example"}], CTX)


def test_module_that_does_not_register_is_a_clear_error(clean_registry: None) -> None:
    """A module that imports but registers nothing is reported, not a KeyError."""
    registry.MODULES["io.l5d.example"] = "appliance.discovery.base"
    with pytest.raises(ValueError, match="module appliance.discovery.base did not register"):
        build_namers([{"kind": "io.l5d.example"}], CTX)


def test_part_b_kinds_load_lazily_by_module_name() -> None:
    """Consul and Kubernetes are looked up in their own modules, imported on first use."""
    assert registry.MODULES["io.l5d.consul"] == "appliance.net.namer_consul"
    assert registry.MODULES["io.l5d.k8s"] == "appliance.net.namer_k8s"


class Recorder(Namer):
    kind = "recorder"

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_register_a_factory_and_a_class(clean_registry: None) -> None:
    """register() takes a plain factory or a class with from_options; kind and prefix are
    not passed on as options."""
    built: list[Recorder] = []

    def factory(options: Mapping[str, Any], ctx: NamerContext) -> Namer:
        built.append(Recorder(options))
        return built[-1]

    class WithFromOptions(Recorder):
        @classmethod
        def from_options(cls, options: Mapping[str, Any], ctx: NamerContext) -> Recorder:
            return cls(options)

    register("io.l5d.recorder", factory)
    register("io.l5d.classy", WithFromOptions)
    namers = build_namers([{"kind": "io.l5d.recorder", "prefix": "/#/r", "x": 1},
                           {"kind": "io.l5d.classy", "y": 2}], CTX)
    assert built[0].options == {"x": 1}
    assert namers[("#", "io.l5d.classy")].options == {"y": 2}  # type: ignore[attr-defined]


def test_a_failed_build_closes_what_it_built(clean_registry: None) -> None:
    """When a later entry is bad, the namers already built are closed."""
    built: list[Recorder] = []

    def factory(options: Mapping[str, Any], ctx: NamerContext) -> Namer:
        built.append(Recorder(options))
        return built[-1]

    register("io.l5d.recorder", factory)
    with pytest.raises(ValueError, match=r"namers\[1\]"):
        build_namers([{"kind": "io.l5d.recorder"}, {"kind": "nope"}], CTX)
    assert built[0].closed


@pytest.mark.parametrize("kind", ["", None, 5])
def test_register_rejects_bad_kinds(kind: Any) -> None:
    """A kind must be a non-empty string."""
    with pytest.raises(ValueError, match="bad namer kind"):
        register(kind, StaticNamer)
