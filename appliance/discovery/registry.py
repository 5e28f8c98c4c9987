"""The namer registry: config ``namers:`` list to namers, keyed by their path prefix.

Theory of operation: each namer module calls :func:`register` at import with its config
``kind`` and its class (anything with ``from_options(options, ctx)``) or a plain factory
``(options, ctx) -> Namer``. :func:`build_namers` looks each entry's ``kind`` up in
:data:`KINDS`; a kind not registered yet whose module is known (:data:`MODULES`) is imported
by name on first use, so this module imports no namer (and no I/O code) itself, and a
namer added later (Consul, Kubernetes) only has to call :func:`register`.

Each entry is ``{"kind": ..., "prefix": ..., <namer options>}``. The prefix defaults to
``/#/<kind>``; a prefix that does not begin with ``/#`` gets it prepended, as linkerd does
(``prefix: /web-files`` serves ``/#/web-files``). ``kind`` and ``prefix`` are taken out
before the rest goes to the namer. Every error names the list index and the option:
``namers[1].root_dir: ...``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from appliance.discovery.base import Name, Namer, NamerContext

NamerFactory = Callable[[Mapping[str, Any], NamerContext], Namer]

KINDS: dict[str, type[Namer] | NamerFactory] = {}
"""Config ``kind`` to the namer class (with ``from_options``) or factory."""

MODULES: dict[str, str] = {
    "static": "appliance.discovery.static",
    "io.l5d.fs": "appliance.net.namer_files",
    "files": "appliance.net.namer_files",
    "dns": "appliance.net.namer_dns",
    "dns-srv": "appliance.net.namer_dns",
    "io.l5d.consul": "appliance.net.namer_consul",
    "io.l5d.k8s": "appliance.net.namer_k8s",
    "io.l5d.k8s.clusterip": "appliance.net.namer_k8s_clusterip",
}
"""Config ``kind`` to the module that registers it when imported."""


def register(kind: str, factory: type[Namer] | NamerFactory) -> None:
    """Make ``kind`` buildable; a class is built with its ``from_options`` classmethod."""
    if not kind or not isinstance(kind, str):
        raise ValueError(f"bad namer kind {kind!r}")
    KINDS[kind] = factory


def build_namers(config: object, ctx: NamerContext) -> dict[Name, Namer]:
    """Build the ``namers:`` config list; ``ValueError`` names the index and the option."""
    if not isinstance(config, list | tuple):
        raise ValueError(f"namers: expected a list, not {type(config).__name__}")
    namers: dict[Name, Namer] = {}
    where: dict[Name, int] = {}
    try:
        for index, entry in enumerate(config):
            prefix, namer = _build_one(index, entry, ctx)
            if prefix in where:
                raise ValueError(f"namers[{index}].prefix: {_show(prefix)} is already used "
                                 f"by namers[{where[prefix]}]")
            namers[prefix] = namer
            where[prefix] = index
    except BaseException:
        for namer in namers.values():
            namer.close()
        raise
    return namers


def _build_one(index: int, entry: object, ctx: NamerContext) -> tuple[Name, Namer]:
    if not isinstance(entry, Mapping):
        raise ValueError(f"namers[{index}]: expected a mapping with a kind")
    kind = entry.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"namers[{index}].kind: missing (known kinds: {_known()})")
    try:
        prefix = parse_prefix(entry.get("prefix", f"/#/{kind}"))
    except ValueError as exc:
        raise ValueError(f"namers[{index}].prefix: {exc}") from None
    factory = _factory(index, kind)
    options = {k: v for k, v in entry.items() if k not in ("kind", "prefix")}
    try:
        if isinstance(factory, type):
            namer = factory.from_options(options, ctx)  # type: ignore[attr-defined]
        else:
            namer = factory(options, ctx)
    except ValueError as exc:
        raise ValueError(f"namers[{index}].{exc}") from None
    return prefix, namer


def _factory(index: int, kind: str) -> type[Namer] | NamerFactory:
    if kind not in KINDS and kind in MODULES:
        module = MODULES[kind]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing = getattr(exc, "name", None)
            if missing and (module == missing or module.startswith(missing + ".")):
                raise ValueError(f"namers[{index}].kind: {kind!r} needs the module {module}, "
                                 f"which is not installed") from None
            raise ValueError(f"namers[{index}].kind: {kind!r}: importing {module} failed: "
                             f"{exc}") from None
        if kind not in KINDS:
            raise ValueError(f"namers[{index}].kind: module {module} did not register "
                             f"{kind!r}")
    if kind not in KINDS:
        raise ValueError(f"namers[{index}].kind: unknown kind {kind!r} "
                         f"(known kinds: {_known()})")
    return KINDS[kind]


def parse_prefix(value: object) -> Name:
    """A prefix path such as ``/#/io.l5d.fs``; ``/#`` is prepended when missing."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"bad prefix {value!r} (expected a path such as /#/files)")
    segments = tuple(value.strip("/").split("/"))
    if segments[:1] != ("#",):
        segments = ("#", *segments)
    if len(segments) < 2 or any(not s or s.isspace() or " " in s for s in segments):
        raise ValueError(f"bad prefix {value!r} (expected a path such as /#/files)")
    return segments


def _show(prefix: Name) -> str:
    return "/" + "/".join(prefix)


def _known() -> str:
    return ", ".join(sorted(set(KINDS) | set(MODULES)))


# Option helpers for namers' from_options: messages begin with the option name, so the
# registry's "namers[i]." prefix completes them.

def check_options(options: Mapping[str, Any], *, required: Iterable[str] = (),
                  optional: Iterable[str] = ()) -> None:
    """Every required option is present and no unknown option is given."""
    required, optional = tuple(required), tuple(optional)
    for key in required:
        if key not in options:
            raise ValueError(f"{key}: missing (required)")
    allowed = set(required) | set(optional)
    for key in options:
        if key not in allowed:
            raise ValueError(f"{key}: unknown option (allowed: kind, prefix, "
                             f"{', '.join(sorted(allowed))})")


def float_option(options: Mapping[str, Any], key: str, default: float) -> float:
    """A finite number of seconds above zero (int, float or decimal string)."""
    value = options.get(key, default)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}: bad value {options.get(key)!r} (expected a number above 0)")
    return float(value)
