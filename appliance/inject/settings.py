"""What to inject into one pod: command-line options, then the pod's annotations on top.

Theory of operation. ``InjectOptions`` holds the flags of ``appliance inject`` (cluster-wide
defaults). For each pod template, ``pod_settings`` reads the pod's annotations, under
linkerd's names so manifests written for linkerd carry over, and returns a ``PodSettings``:
every value the sidecar and init container need, already validated. Pure: no I/O. A bad
annotation raises ``AnnotationError`` naming the annotation, the value and what is allowed;
the caller adds the document and field path.

The proxy's own settings travel as environment variables (``APPLIANCE_*``, ``OTEL_*``);
``pod_settings`` checks them by loading them with ``appliance.config`` exactly as the proxy
will, so a manifest that injects cleanly also starts cleanly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance import __version__
from appliance import config as cfg
from appliance import env as envnames
from init.plan import PlanError, parse_ports, parse_subnets

LINKERD = "config.linkerd.io/"
OURS = "config.appliance.io/"
INJECT = "linkerd.io/inject"
NATIVE_SIDECAR = ("config.beta.linkerd.io/proxy-enable-native-sidecar",
                  "config.alpha.linkerd.io/proxy-enable-native-sidecar")
WAIT_BEFORE_EXIT = "config.alpha.linkerd.io/proxy-wait-before-exit-seconds"
NATIVE_SIDECAR_SINCE = (1, 29)  # SidecarContainers is beta and on by default from 1.29
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[KMGTPE]i?|[mkMGTPE])?$")
_LOG_LEVEL_ALIASES = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning",
                      "warning": "warning", "error": "error"}
RESOURCE_ANNOTATIONS = {  # annotation suffix -> (requests|limits, resource)
    "proxy-cpu-request": ("requests", "cpu"), "proxy-cpu-limit": ("limits", "cpu"),
    "proxy-memory-request": ("requests", "memory"), "proxy-memory-limit": ("limits", "memory"),
    "proxy-ephemeral-storage-request": ("requests", "ephemeral-storage"),
    "proxy-ephemeral-storage-limit": ("limits", "ephemeral-storage"),
}
# linkerd annotation suffix -> dotted appliance config field, value passed through
CONFIG_ANNOTATIONS = {
    "proxy-outbound-connect-timeout": "outbound.connect_timeout",
    "proxy-inbound-connect-timeout": "inbound.connect_timeout",
    "shutdown-grace-period": "shutdown_grace",
}
KNOWN_LINKERD = {
    "skip-inbound-ports", "skip-outbound-ports", "skip-subnets", "opaque-ports",
    "proxy-log-level", "proxy-image", "proxy-version", "init-image", "init-image-version",
    "image-pull-policy", "proxy-uid", "proxy-gid", "inbound-port", "outbound-port",
    "admin-port", "trace-collector", "disable-identity", "proxy-await",
    *RESOURCE_ANNOTATIONS, *CONFIG_ANNOTATIONS,
}


class AnnotationError(ValueError):
    """A bad annotation or option; the message names it, the value and what is allowed."""


@dataclass(frozen=True, kw_only=True)
class InjectOptions:
    """Flags of ``appliance inject``: the defaults every pod gets unless annotated."""

    image: str = f"localhost/appliance:{__version__}"
    """Image of both the init container and the proxy (the same image plays both roles)."""
    image_pull_policy: str = "IfNotPresent"
    proxy_uid: int = 2102
    inbound_port: int = 4143
    outbound_port: int = 4140
    admin_port: int = 4191
    iptables_mode: str = "auto"
    identity: bool = True
    """Mount a ServiceAccount token and the trust anchors, point the proxy at identity_addr."""
    identity_addr: str = "appliance-identity.appliance-system.svc.cluster.local:8080"
    identity_audience: str = "appliance-identity"
    token_expiration_seconds: int = 86400
    trust_anchors_configmap: str = "appliance-trust-anchors"
    native_sidecar: bool | None = None
    """True/False force; None: on when kubernetes_version >= 1.29, else off."""
    kubernetes_version: tuple[int, int] | None = None
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    memory_limit: str = "256Mi"
    log_level: str | None = None
    trace_collector: str | None = None


@dataclass(frozen=True, kw_only=True)
class PodSettings:
    """Everything the injected containers of one pod need, validated."""

    image: str
    init_image: str
    image_pull_policy: str
    proxy_uid: int
    proxy_gid: int | None
    inbound_port: int
    outbound_port: int
    admin_port: int
    iptables_mode: str
    skip_inbound_ports: str = ""
    skip_outbound_ports: str = ""
    skip_subnets: str = ""
    skip_outbound_subnets: str = ""
    identity: bool
    identity_addr: str
    identity_audience: str
    token_expiration_seconds: int
    trust_anchors_configmap: str
    native_sidecar: bool
    await_ready: bool = True
    wait_before_exit: int = 0
    resources: dict[str, dict[str, str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    """Proxy environment: APPLIANCE_* and OTEL_* variables, in a stable order."""
    tracing: bool = False
    workload: str = ""


def parse_kubernetes_version(text: str) -> tuple[int, int]:
    """``1.29``, ``v1.29.3`` or ``1.29+`` -> (1, 29)."""
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.\d+)?\+?(?:-.*)?", text.strip())
    if not m:
        raise AnnotationError(f"--kubernetes-version: {text!r} is not a version like 1.29")
    return int(m[1]), int(m[2])


def check_quantity(name: str, value: str) -> str:
    if not _QUANTITY.match(value):
        raise AnnotationError(f"{name}: {value!r} is not a Kubernetes quantity "
                              "(e.g. 100m, 0.5, 64Mi, 1G)")
    return value


def _bool(name: str, value: str) -> bool:
    text = value.strip().lower()
    if text in ("true", "enabled"):
        return True
    if text in ("false", "disabled"):
        return False
    raise AnnotationError(f"{name}: {value!r} is not true/false (or enabled/disabled)")


def _int(name: str, value: str, lo: int, hi: int) -> int:
    try:
        number = int(value.strip(), 10)
    except ValueError:
        number = lo - 1
    if not lo <= number <= hi:
        raise AnnotationError(f"{name}: {value!r} is not an integer {lo}-{hi}")
    return number


def _image(repo_ann: str | None, tag_ann: str | None, default: str) -> str:
    """linkerd splits an image into repository (proxy-image) and tag (proxy-version)."""
    repo, tag = default, ""
    slash = default.rfind("/")
    if default.rfind(":") > slash:
        repo, tag = default[: default.rfind(":")], default[default.rfind(":") + 1:]
    repo = repo_ann.strip() if repo_ann else repo
    tag = tag_ann.strip() if tag_ann else tag
    if repo_ann and ":" in repo[repo.rfind("/") + 1:] and not tag_ann:
        return repo  # the annotation gave a full reference
    return f"{repo}:{tag}" if tag else repo


def needs_injection(annotations: Mapping[str, str]) -> bool:
    """False when the pod opts out with ``linkerd.io/inject: disabled``."""
    value = annotations.get(INJECT)
    if value is None:
        return True
    text = str(value).strip()
    if text not in ("enabled", "disabled"):
        raise AnnotationError(f"{INJECT}: {value!r} is not enabled or disabled "
                              "(ingress mode is not supported)")
    return text == "enabled"


def _native(opts: InjectOptions, ann: Mapping[str, str]) -> bool:
    given = [(name, ann[name]) for name in NATIVE_SIDECAR if name in ann]
    if given:
        name, value = given[0]
        native = _bool(name, str(value))
        if native and opts.kubernetes_version and opts.kubernetes_version < NATIVE_SIDECAR_SINCE:
            version = ".".join(map(str, opts.kubernetes_version))
            raise AnnotationError(f"{name}: native sidecars need Kubernetes >= 1.29, "
                                  f"--kubernetes-version is {version}")
        return native
    if opts.native_sidecar is not None:
        return opts.native_sidecar
    return bool(opts.kubernetes_version and opts.kubernetes_version >= NATIVE_SIDECAR_SINCE)


def _ports(name: str, value: str, *, subnets: bool = False) -> str:
    """Validate a linkerd port/subnet list with init's own parser; normalize spacing."""
    try:
        if subnets:
            parse_subnets(value, flag=name)
        else:
            parse_ports(value, flag=name)
    except PlanError as exc:
        raise AnnotationError(str(exc)) from None
    return ",".join(t.strip() for t in value.split(",") if t.strip())


def opaque_ports(name: str, value: str, named: Mapping[str, int]) -> str:
    """linkerd allows container port names among numbers and ranges; resolve the names."""
    out: list[str] = []
    for token in (t.strip() for t in value.split(",")):
        if not token:
            continue
        if re.fullmatch(r"[0-9]+(-[0-9]+)?", token):
            _ports(name, token)
            out.append(token)
        elif token in named:
            out.append(str(named[token]))
        else:
            raise AnnotationError(f"{name}: {token!r} is neither a port, a range nor the "
                                  f"name of a container port (names here: "
                                  f"{', '.join(sorted(named)) or 'none'})")
    return ",".join(out)


def _log_level(name: str, value: str) -> str:
    """Take the default level of a linkerd filter like ``warn,linkerd=info``."""
    bare = [t.strip().lower() for t in value.split(",") if t.strip() and "=" not in t]
    if len(bare) != 1 or bare[0] not in _LOG_LEVEL_ALIASES:
        raise AnnotationError(f"{name}: {value!r} has no level we know (one of "
                              f"{', '.join(_LOG_LEVEL_ALIASES)}; per-module filters "
                              "are ignored)")
    return _LOG_LEVEL_ALIASES[bare[0]]


def _collector(name: str, value: str) -> str:
    """linkerd gives HOST:PORT; OTLP wants a URL."""
    text = value.strip()
    if not re.fullmatch(r"(https?://)?[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}/?", text):
        raise AnnotationError(f"{name}: {value!r} is not HOST:PORT (or http://HOST:PORT)")
    return text if "://" in text else f"http://{text}"


def pod_settings(opts: InjectOptions, annotations: Mapping[str, str], *,
                 named_ports: Mapping[str, int], workload: str = "") -> PodSettings:
    """Merge flags and annotations into the settings of one pod; AnnotationError on bad
    input. ``named_ports``: the pod's container port names (for opaque-ports)."""
    ann = {str(k): str(v) for k, v in annotations.items()}
    _check_known(ann)

    def get(suffix: str) -> str | None:
        return ann.get(LINKERD + suffix)

    def key(suffix: str) -> str:
        return LINKERD + suffix

    env: dict[str, str] = {}
    uid = _int(key("proxy-uid"), get("proxy-uid") or str(opts.proxy_uid), 1, 2**31 - 1)
    gid_text = get("proxy-gid")
    ports = {p: _int(key(f"{p}-port"), get(f"{p}-port") or str(getattr(opts, f"{p}_port")),
                     1, 65535) for p in ("inbound", "outbound", "admin")}
    for p, number in ports.items():
        if number != getattr(InjectOptions, f"{p}_port"):
            env[envnames.var_name(f"{p}.port")] = str(number)
    if len(set(ports.values())) != 3:
        raise AnnotationError(f"{key('inbound-port')}, {key('outbound-port')}, "
                              f"{key('admin-port')}: must be three different ports, got "
                              f"{sorted(ports.values())}")
    level = get("proxy-log-level")
    if level is not None or opts.log_level:
        env[envnames.var_name("log_level")] = (_log_level(key("proxy-log-level"), level)
                                               if level is not None else str(opts.log_level))
    if (opaque := get("opaque-ports")) is not None:
        env[envnames.var_name("detect.opaque_ports")] = opaque_ports(
            key("opaque-ports"), opaque, named_ports)
    for suffix, path in CONFIG_ANNOTATIONS.items():
        if (value := get(suffix)) is not None:
            env[envnames.var_name(path)] = value.strip()
    env.update(_overrides(ann))
    collector = get("trace-collector") or opts.trace_collector
    if collector:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = _collector(key("trace-collector"), collector)
        env["OTEL_SERVICE_NAME"] = workload or "appliance-proxy"
    _check_config(env)
    identity = opts.identity and not _bool(key("disable-identity"),
                                           get("disable-identity") or "false")
    return PodSettings(
        image=_image(get("proxy-image"), get("proxy-version"), opts.image),
        init_image=_image(get("init-image"), get("init-image-version"), opts.image),
        image_pull_policy=_pull_policy(get("image-pull-policy") or opts.image_pull_policy),
        proxy_uid=uid,
        proxy_gid=None if gid_text is None else _int(key("proxy-gid"), gid_text, 0, 2**31 - 1),
        inbound_port=ports["inbound"], outbound_port=ports["outbound"],
        admin_port=ports["admin"], iptables_mode=opts.iptables_mode,
        skip_inbound_ports=_ports(key("skip-inbound-ports"), get("skip-inbound-ports") or ""),
        skip_outbound_ports=_ports(key("skip-outbound-ports"),
                                   get("skip-outbound-ports") or ""),
        skip_subnets=_ports(key("skip-subnets"), get("skip-subnets") or "", subnets=True),
        skip_outbound_subnets=_ports(OURS + "skip-outbound-subnets",
                                     ann.get(OURS + "skip-outbound-subnets", ""),
                                     subnets=True),
        identity=identity, identity_addr=opts.identity_addr,
        identity_audience=opts.identity_audience,
        token_expiration_seconds=opts.token_expiration_seconds,
        trust_anchors_configmap=opts.trust_anchors_configmap,
        native_sidecar=_native(opts, ann),
        await_ready=_bool(key("proxy-await"), get("proxy-await") or "enabled"),
        wait_before_exit=_int(WAIT_BEFORE_EXIT, ann.get(WAIT_BEFORE_EXIT, "0"), 0, 3600),
        resources=_resources(opts, ann), env=env, tracing=bool(collector), workload=workload)


def _pull_policy(value: str) -> str:
    if value not in PULL_POLICIES:
        raise AnnotationError(f"{LINKERD}image-pull-policy: {value!r} is not one of "
                              f"{', '.join(PULL_POLICIES)}")
    return value


def _resources(opts: InjectOptions, ann: Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {"requests": {}, "limits": {}}
    defaults = {("requests", "cpu"): opts.cpu_request,
                ("requests", "memory"): opts.memory_request,
                ("limits", "memory"): opts.memory_limit}
    for (kind, res), value in defaults.items():
        if value:
            out[kind][res] = check_quantity(f"--{res}-{kind[:-1]}", value)
    for suffix, (kind, res) in RESOURCE_ANNOTATIONS.items():
        if (given := ann.get(LINKERD + suffix)) is not None:
            out[kind][res] = check_quantity(LINKERD + suffix, given.strip())
    return {k: v for k, v in out.items() if v}


def _overrides(ann: Mapping[str, str]) -> dict[str, str]:
    """``config.appliance.io/<config field>: value`` sets any proxy config field."""
    fields = set(cfg.field_paths())
    env: dict[str, str] = {}
    for name in sorted(ann):
        if not name.startswith(OURS) or name == OURS + "skip-outbound-subnets":
            continue
        path = name[len(OURS):]
        if path not in fields:
            raise AnnotationError(f"{name}: {path!r} is not a config field (see "
                                  "docs/config.md; e.g. config.appliance.io/"
                                  "http.response_timeout)")
        env[envnames.var_name(path)] = ann[name]
    return env


def _check_known(ann: Mapping[str, str]) -> None:
    """A typo in a linkerd annotation we honour would silently do nothing: refuse it.
    linkerd annotations we do not implement are left alone (listed in the docs)."""
    for name in ann:
        if not name.startswith(LINKERD):
            continue
        suffix = name[len(LINKERD):]
        close = [k for k in KNOWN_LINKERD if _one_edit(k, suffix)]
        if suffix not in KNOWN_LINKERD and close:
            raise AnnotationError(f"{name}: unknown annotation; did you mean "
                                  f"{LINKERD}{close[0]}?")


def _one_edit(a: str, b: str) -> bool:
    """True when a and b differ by exactly one inserted, deleted or changed character."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) == 1
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def _check_config(env: Mapping[str, str]) -> None:
    """Load the proxy's APPLIANCE_* variables as the proxy will; name the source on error."""
    sources = {envnames.var_name(p): p for p in cfg.field_paths()}
    try:
        cfg.load(environ=dict(env))
    except cfg.ConfigError as exc:
        field_name = str(exc).split(":", 1)[0]
        var = next((v for v, p in sources.items() if p == field_name), field_name)
        raise AnnotationError(f"proxy setting {var}: {exc}") from None


def container_port_names(containers: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Port name -> number over the pod's containers (malformed entries are ignored here;
    the schema of the pod is not ours to police)."""
    names: dict[str, int] = {}
    for c in containers:
        for p in c.get("ports") or [] if isinstance(c, Mapping) else []:
            if isinstance(p, Mapping) and isinstance(p.get("name"), str) \
                    and isinstance(p.get("containerPort"), int):
                names[p["name"]] = p["containerPort"]
    return names
