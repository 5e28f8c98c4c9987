"""What the namers that ask a remote API (Consul, Kubernetes) share, the pure part.

Each such namer reads its options with :class:`OptionReader` (errors name the option), and
its per-name loop turns every answer into an :class:`Update` (the watch shows a new state)
or a :class:`Failure` (keep the last good set, stale, and report the error), retrying
failures after a jittered :class:`Backoff`. An answer that is not the JSON shape expected
is a :class:`DecodeError`. The timing options every such namer has (``min_delay``,
``backoff_base``, ``backoff_max``, ``timeout``) are read by :meth:`OptionReader.timing` and
checked together by :func:`check_backoff`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.discovery.base import AddrState
from appliance.discovery.registry import check_options

_REGISTRY_KEYS = frozenset({"kind", "prefix"})


class DecodeError(ValueError):
    """An API answer is not the JSON shape the namer expects; the message says where."""


@dataclass(frozen=True, slots=True)
class Update:
    """The source answered: the watch should show ``state``."""

    state: AddrState


@dataclass(frozen=True, slots=True)
class Failure:
    """The source failed: keep the last good set (stale) and report ``error``."""

    error: str


class Backoff:
    """Exponential backoff with "equal jitter": after ``n`` consecutive failures wait
    between half and all of ``min(cap, base * 2**(n-1))`` seconds, drawn from ``rng``."""

    def __init__(self, base: float, cap: float, rng: random.Random) -> None:
        self.base = base
        self.cap = cap
        self.rng = rng

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        ceiling = min(self.cap, self.base * 2.0 ** min(failures - 1, 60))
        return ceiling / 2 + self.rng.random() * ceiling / 2


class BackoffRange(Protocol):
    """What :func:`check_backoff` checks (the options of a Consul or Kubernetes namer)."""

    @property
    def backoff_base(self) -> float: ...

    @property
    def backoff_max(self) -> float: ...


class OptionReader:
    """Reads a namer's option mapping (``kind`` and ``prefix`` already taken out by the
    registry). Every error is a ``ValueError`` whose message begins with the option name, so
    the registry's ``namers[i].`` prefix completes it; unknown options are errors (they are
    usually typos)."""

    def __init__(self, options: Mapping[str, Any], known: Iterable[str]) -> None:
        if not isinstance(options, Mapping):
            raise ValueError(f"options: expected a mapping, got {options!r}")
        check_options({k: v for k, v in options.items() if k not in _REGISTRY_KEYS},
                      optional=known)
        self.options = options

    def text(self, key: str, default: str | None) -> str | None:
        value = self.options.get(key, default)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{key}: bad value {value!r} (expected a non-empty string)")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.options.get(key, default)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                low <= value <= high):
            raise ValueError(f"{key}: bad value {self.options.get(key)!r} (expected seconds "
                             f"from {low:g} to {high:g})")
        return float(value)

    def port(self, key: str, default: int) -> int:
        value = self.options.get(key, default)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise ValueError(f"{key}: bad value {self.options.get(key)!r} "
                             f"(expected a port, 1-65535)")
        return value

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.options.get(key, default)
        if value not in allowed:
            raise ValueError(f"{key}: bad value {value!r} (expected one of "
                             f"{', '.join(allowed)})")
        return str(value)

    def timing(self, defaults: Any) -> dict[str, float]:
        """``min_delay``, ``backoff_base``, ``backoff_max`` and ``timeout``, in that order,
        as keyword arguments for the options class ``defaults``, whose class attributes
        are the default values (see :func:`check_backoff`)."""
        return dict(
            min_delay=self.number("min_delay", defaults.min_delay, 0, 60),
            backoff_base=self.number("backoff_base", defaults.backoff_base, 0.001, 60),
            backoff_max=self.number("backoff_max", defaults.backoff_max, 0.001, 3600),
            timeout=self.number("timeout", defaults.timeout, 0.1, 600))


def check_backoff(opts: BackoffRange) -> None:
    """``backoff_max`` must not be below ``backoff_base``."""
    if opts.backoff_max < opts.backoff_base:
        raise ValueError(f"backoff_max: bad value {opts.backoff_max:g} (expected at least "
                         f"backoff_base, {opts.backoff_base:g})")
