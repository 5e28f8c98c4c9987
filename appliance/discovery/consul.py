"""Consul discovery, the pure part: options, the health API's JSON, blocking-query state.

Theory of operation: a Consul name is ``/#/io.l5d.consul/<datacenter>/<service>``
(``.local`` is the agent's own datacenter). The source long-polls the health API,
``GET /v1/health/service/<service>?passing=true&index=<X>&wait=<W>``: Consul holds the
request until the service's index passes ``X`` or ``W`` elapses, and answers with the
current list and its index in ``X-Consul-Index``. :class:`ConsulQuery` holds that loop's
state and decides, for each answer, what the watch must show and when to ask again:

* the index follows Consul's rules for blocking queries: it is reset to 0 (one plain read)
  when it goes backwards (a snapshot restore, a new leader), and a non-positive index is
  treated as 1 so a query never returns at once forever;
* consecutive requests are at least ``min_delay`` apart, so a service whose index changes
  constantly cannot make the proxy hammer its agent;
* an empty list means the name does not exist (``neg``, as in linkerd), which lets a dtab
  fall back to another datacenter; an unknown datacenter is ``neg`` too;
* a failure (agent unreachable, bad JSON, a non-200 answer) keeps the last good set (the
  namer marks it stale) and retries after a jittered exponential :class:`Backoff`.

Nothing here awaits or touches a socket: the net side (``appliance.net.namer_consul``) does
the requests and passes in the clock's ``now``, so every decision is tested exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, urlencode

from appliance.discovery.base import NEG, Address, AddrState, Name, bound
from appliance.discovery.remote import (
    Backoff,
    DecodeError,
    Failure,
    OptionReader,
    Update,
    check_backoff,
)

KIND = "io.l5d.consul"
LOCAL_DC = ".local"
CONSISTENCY_MODES = ("default", "stale", "consistent")


# -- Consul ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ConsulOptions:
    host: str = "127.0.0.1"
    """The Consul agent's address."""
    port: int = 8500
    """The agent's HTTP(S) port."""
    scheme: str = "http"
    """``http`` or ``https``."""
    ca_file: str | None = None
    """With https: the CA bundle that signed the agent's certificate (default: system)."""
    token: str | None = None
    """ACL token, sent as ``X-Consul-Token``."""
    tag: str | None = None
    """Only instances carrying this tag."""
    consistency_mode: str = "default"
    """``default``, ``stale`` (any server answers; cheaper) or ``consistent``."""
    wait: float = 60.0
    """How long Consul may hold a blocking query (seconds, at most 600)."""
    min_delay: float = 0.5
    """Least time between two requests for one name (seconds)."""
    backoff_base: float = 0.5
    """First retry delay after a failure (seconds); doubles per failure, jittered."""
    backoff_max: float = 30.0
    """Longest retry delay (seconds); also how often an unknown datacenter is re-checked."""
    timeout: float = 10.0
    """Seconds allowed to connect, on top of ``wait`` for an answer."""

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> ConsulOptions:
        """Validate a ``namers:`` entry's options; ``ValueError`` names the bad one."""
        o = OptionReader(options, cls.__dataclass_fields__)
        opts = cls(
            host=o.text("host", cls.host) or cls.host, port=o.port("port", cls.port),
            scheme=o.choice("scheme", cls.scheme, ("http", "https")),
            ca_file=o.text("ca_file", None), token=o.text("token", None),
            tag=o.text("tag", None),
            consistency_mode=o.choice("consistency_mode", cls.consistency_mode,
                                      CONSISTENCY_MODES),
            wait=o.number("wait", cls.wait, 1, 600), **o.timing(cls))
        check_backoff(opts)
        return opts

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_name(name: Name) -> tuple[str | None, str]:
    """``(datacenter, service)``; the datacenter is None for ``.local``."""
    if len(name) != 2:
        raise ValueError(f"{KIND}: a name is <datacenter>/<service>, got {'/'.join(name)!r}")
    dc, service = name
    if not dc or not service:
        raise ValueError(f"{KIND}: empty datacenter or service in {'/'.join(name)!r}")
    return (None if dc == LOCAL_DC else dc), service


def health_path(service: str, dc: str | None, opts: ConsulOptions, index: int) -> str:
    """The health API path and query for one blocking read."""
    query: list[tuple[str, str]] = [("passing", "true")]
    if dc is not None:
        query.append(("dc", dc))
    if opts.tag is not None:
        query.append(("tag", opts.tag))
    if opts.consistency_mode != "default":
        query.append((opts.consistency_mode, ""))
    if index > 0:
        query += [("index", str(index)), ("wait", f"{int(opts.wait)}s")]
    return f"/v1/health/service/{quote(service, safe='')}?{urlencode(query)}"


def next_index(previous: int, header: str | None) -> int:
    """The index for the next blocking read, from the last one and ``X-Consul-Index``."""
    try:
        index = int(header)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0  # no index: plain reads (still min_delay apart)
    if index <= 0:
        return 1  # Consul should never say so; 0 would make every read return at once
    if index < previous:
        return 0  # went backwards (snapshot restore): one plain read, then block again
    return index


def _entry_address(entry: Any, dc: str | None, where: str) -> Address | None:
    if not isinstance(entry, dict):
        raise DecodeError(f"{where}: not an object")
    node, service = entry.get("Node"), entry.get("Service")
    if not isinstance(node, dict) or not isinstance(service, dict):
        raise DecodeError(f"{where}: no Node or Service object")
    host = service.get("Address") or node.get("Address")
    port = service.get("Port")
    if not isinstance(host, str) or not host:
        raise DecodeError(f"{where}: no Service.Address or Node.Address")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        return None  # registered without a port: nothing to connect to
    weights = service.get("Weights") or {}
    passing = weights.get("Passing") if isinstance(weights, dict) else None
    weight = float(passing) if isinstance(passing, int | float) and passing > 0 else 1.0
    raw_meta = service.get("Meta") or {}
    if not isinstance(raw_meta, dict):
        raise DecodeError(f"{where}: Service.Meta is not an object")
    meta = {str(k): str(v) for k, v in raw_meta.items()}
    meta["datacenter"] = dc or str(node.get("Datacenter") or "")
    if node.get("Node"):
        meta["node"] = str(node["Node"])
    return Address(host, port, weight, MappingProxyType(meta))


def decode_health(body: bytes, dc: str | None) -> AddrState:
    """The watch state for a health API answer; an empty list is ``neg``."""
    try:
        entries = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"not JSON: {exc}") from None
    if not isinstance(entries, list):
        raise DecodeError(f"expected a JSON list, got {type(entries).__name__}")
    if not entries:
        return NEG
    addrs = [_entry_address(entry, dc, f"entry {i}") for i, entry in enumerate(entries)]
    return bound([a for a in addrs if a is not None])


def _is_unknown_dc(status: int, body: bytes) -> bool:
    return status == 500 and b"no path to datacenter" in body.lower()


class ConsulQuery:
    """The blocking-query loop of one name: what to ask next, when, and what answers mean.

    Call :meth:`delay` for how long to wait, :meth:`sent` when the request goes out, then
    :meth:`on_response` or :meth:`on_error` with what came back."""

    def __init__(self, name: Name, opts: ConsulOptions, backoff: Backoff) -> None:
        self.dc, self.service = parse_name(name)
        self.opts = opts
        self.backoff = backoff
        self.index = 0
        self.failures = 0
        self._sent_at: float | None = None
        self._not_before = 0.0

    @property
    def path(self) -> str:
        return health_path(self.service, self.dc, self.opts, self.index)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self.opts.token} if self.opts.token else {}

    @property
    def timeout(self) -> float:
        """How long to await an answer: the wait, Consul's jitter (wait/16) and slack."""
        return (self.opts.wait + self.opts.wait / 16 if self.index else 0) + self.opts.timeout

    def delay(self, now: float) -> float:
        return max(0.0, self._not_before - now)

    def sent(self, now: float) -> None:
        self._sent_at = now

    def on_response(self, now: float, status: int, headers: Mapping[str, str],
                    body: bytes) -> Update | Failure:
        if _is_unknown_dc(status, body):
            self._succeeded(now)
            self.index = 0
            self._not_before = now + self.opts.backoff_max
            return Update(AddrState("neg", error=f"consul: no datacenter {self.dc!r}"))
        if status != 200:
            text = body[:200].decode("utf-8", "replace").strip()
            return self.on_error(now, f"consul answered {status}: {text}")
        try:
            state = decode_health(body, self.dc)
        except DecodeError as exc:
            return self.on_error(now, f"consul sent a bad health list: {exc}")
        self.index = next_index(self.index, headers.get("x-consul-index"))
        self._succeeded(now)
        return Update(state)

    def on_error(self, now: float, error: str) -> Failure:
        self.failures += 1
        self._not_before = now + self.backoff.delay(self.failures)
        return Failure(error)

    def _succeeded(self, now: float) -> None:
        self.failures = 0
        start = self._sent_at if self._sent_at is not None else now
        self._not_before = start + self.opts.min_delay
