"""Per-service request policy, and one request's retry decisions.

Theory of operation: the config has one ``service`` section (the defaults) and a list of
``services`` overrides, each naming a logical-name prefix such as ``/svc/web`` (a ``*``
segment matches any one segment). :class:`Policies` resolves the :class:`Policy` of a
logical name once (the override with the longest matching prefix, fewer ``*`` segments
breaking ties, laid over the defaults)
and caches it; a request that has no logical name (no router, or no identifier gave one)
gets the defaults.

A policy is what the data path needs per request: the classifiers (HTTP and gRPC), the
request timeout, the per-attempt timeout, the retry limit, the retry budget's parameters,
the backoff and how much of a request body may be kept for replay. Budgets are shared: one
per routed service (kept on the router's ``Service``) or, for traffic with no service, one
per original destination (:meth:`Policies.dst_budget`, bounded).

:class:`Attempts` is one request's retry state. The data path feeds it the request bytes it
sends (:meth:`Attempts.keep` holds them for replay until ``retry_buffer_bytes`` is passed)
and asks :meth:`Attempts.next_delay` after a failed attempt: the answer is the backoff delay
before the next attempt, or the reason there is none. The rules, in order:

1. the classifier's verdict must be retryable (an attempt that was never sent always is);
2. at most ``max_retries`` retries per request;
3. a sent request needs its whole body still held (bodies over the buffer are never replayed);
4. the next attempt must start before the request's deadline;
5. a sent request's retry must be granted by the retry budget (withdrawn last, so a refused
   retry costs nothing). Attempts that were never sent (connect refused or timed out) do not
   draw on the budget: nothing reached the upstream, and an endpoint that refuses is
   ejected by failure accrual within a few requests.

Whether response bytes already reached the client is the data path's check, made before it
asks: after that no attempt is ever retried.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from appliance.resilience.backoff import JitteredBackoff
from appliance.resilience.budget import RetryBudget
from appliance.resilience.classify import (
    CLASSIFIERS,
    Classifier,
    ResponseClass,
    _grpc_codes,
    make_classifier,
)
from appliance.routing.path import RoutingSyntaxError, parse_path

if TYPE_CHECKING:
    from appliance.config import ServiceConfig, ServiceOverride

__all__ = [
    "Attempts", "Policies", "Policy", "check_field", "check_prefix", "check_service",
]

Prefix = tuple[str, ...]
_CACHE_MAX = 4096
_DST_BUDGETS_MAX = 4096


# --- checks used by appliance.config -------------------------------------------------------

def check_field(leaf: str, text: str) -> None:
    """Raise ValueError if a classifier field's value is not acceptable."""
    if leaf == "classifier":
        if text not in CLASSIFIERS or text.startswith("io.l5d.h2.grpc."):
            http = [c for c in CLASSIFIERS if not c.startswith("io.l5d.h2.grpc.")]
            raise ValueError(f"{text!r} is not an HTTP response classifier; expected one of "
                             + ", ".join(http))
    elif leaf == "grpc_classifier":
        if not text.startswith("io.l5d.h2.grpc.") or text not in CLASSIFIERS:
            grpc = [c for c in CLASSIFIERS if c.startswith("io.l5d.h2.grpc.")]
            raise ValueError(f"{text!r} is not a gRPC response classifier; expected one of "
                             + ", ".join(grpc))
    elif leaf == "retryable_grpc_codes":
        try:
            _grpc_codes("retryable_grpc_codes", split_codes(text))
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("retryable_grpc_codes: ")) from None


def split_codes(text: str) -> list[int | str]:
    """``"UNAVAILABLE, 8"`` -> ``["UNAVAILABLE", 8]``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    return [int(t) if t.isdigit() else t for t in items]


def check_prefix(text: str) -> str:
    """A ``services`` prefix: a path whose segments may be ``*``; returns it normalised."""
    parse_prefix(text)
    return text.strip()


def parse_prefix(text: str) -> Prefix:
    stripped = text.strip()
    if not stripped.startswith("/"):
        raise ValueError(f"{text!r} is not a path (it must start with '/', e.g. /svc/web)")
    segments = [s for s in stripped.split("/")[1:]]
    if segments == [""]:
        return ()
    out = []
    for segment in segments:
        if segment == "*":
            out.append("*")
            continue
        try:
            parsed = parse_path("/" + segment)
        except RoutingSyntaxError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        if len(parsed) != 1:
            raise ValueError(f"{text!r}: empty path segment")
        out.append(parsed[0])
    return tuple(out)


def check_service(conf: ServiceConfig) -> None:
    """Cross-field checks of a ServiceConfig; ValueError names the field."""
    if conf.retry_backoff_cap < conf.retry_backoff_base:
        raise ValueError(f"service.retry_backoff_cap: {conf.retry_backoff_cap!r} must be >= "
                         f"retry_backoff_base ({conf.retry_backoff_base!r})")
    if conf.retry_backoff_base <= 0:
        raise ValueError(f"service.retry_backoff_base: {conf.retry_backoff_base!r} must be "
                         "> 0 seconds")
    if conf.retry_budget_ttl <= 0:
        raise ValueError(f"service.retry_budget_ttl: {conf.retry_budget_ttl!r} must be > 0 "
                         "seconds")
    if not conf.retry_budget_percent <= 1000:
        raise ValueError(f"service.retry_budget_percent: {conf.retry_budget_percent!r} must "
                         "be between 0 and 1000")


# --- policies ------------------------------------------------------------------------------

class Policy:
    """The resolved request policy of one logical name (or of traffic without one)."""

    __slots__ = ("prefix", "classifier", "grpc_classifier", "timeout", "attempt_timeout",
                 "max_retries", "budget_args", "backoff_args", "buffer_bytes")

    def __init__(self, conf: ServiceConfig, prefix: str = "") -> None:
        self.prefix = prefix
        """The ``services`` prefix that matched ("" for the defaults)."""
        self.classifier: Classifier = make_classifier(conf.classifier)
        codes = split_codes(conf.retryable_grpc_codes)
        takes_codes = conf.grpc_classifier.rsplit(".", 1)[1] in ("default",
                                                                 "retryableStatusCodes")
        self.grpc_classifier: Classifier = make_classifier(
            conf.grpc_classifier, retryable_grpc_codes=codes if takes_codes else None)
        self.timeout = conf.timeout or None
        self.attempt_timeout = conf.attempt_timeout or None
        self.max_retries = conf.max_retries
        self.budget_args = (conf.retry_budget_ttl, conf.retry_budget_min_per_sec,
                            conf.retry_budget_percent)
        self.backoff_args = (conf.retry_backoff_base, conf.retry_backoff_cap)
        self.buffer_bytes = conf.retry_buffer_bytes

    def new_budget(self, clock: Callable[[], float]) -> RetryBudget:
        ttl, per_sec, percent = self.budget_args
        return RetryBudget(clock, ttl=ttl, min_retries_per_sec=per_sec,
                           percent_can_retry=percent)

    def classify(self, grpc: bool, method: bytes, status: int | None,
                 grpc_status: int | None = None, error: str | None = None,
                 sent: bool = True) -> ResponseClass:
        classifier = self.grpc_classifier if grpc else self.classifier
        return classifier.classify(method, status, grpc_status, error, sent)

    def __repr__(self) -> str:
        return f"<Policy {self.prefix or '(defaults)'} {self.classifier.name}>"


class Policies:
    """The policies of one proxy direction: defaults, overrides, per-destination budgets."""

    def __init__(self, default: ServiceConfig, overrides: Iterable[ServiceOverride] = (),
                 clock: Callable[[], float] | None = None) -> None:
        import dataclasses
        import time

        self.default = Policy(default)
        self.clock = clock or time.monotonic
        rules: list[tuple[Prefix, Policy]] = []
        for o in overrides:
            conf = dataclasses.replace(default, **dict(o.fields))
            rules.append((parse_prefix(o.prefix), Policy(conf, o.prefix)))
        # Longest prefix first, then fewer '*'; among equals the first listed (stable sort).
        rules.sort(key=lambda r: (-len(r[0]), r[0].count("*")))
        self.rules = rules
        self._cache: dict[Prefix, Policy] = {}
        self._dst_budgets: dict[Any, dict[tuple[float, float, float], RetryBudget]] = {}

    def for_path(self, path: Prefix | None) -> Policy:
        """The policy of a logical name (a path tuple); the defaults for None."""
        if path is None or not self.rules:
            return self.default
        policy = self._cache.get(path)
        if policy is None:
            policy = self.default
            for prefix, candidate in self.rules:
                if _matches(prefix, path):
                    policy = candidate
                    break
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[path] = policy
        return policy

    def dst_budget(self, dst: Any, policy: Policy) -> RetryBudget:
        """The budget of traffic with no service: one per original destination (and
        budget parameters); the oldest is forgotten past 4096 destinations."""
        budgets = self._dst_budgets.get(dst)
        if budgets is None:
            if len(self._dst_budgets) >= _DST_BUDGETS_MAX:
                del self._dst_budgets[next(iter(self._dst_budgets))]
            budgets = self._dst_budgets[dst] = {}
        budget = budgets.get(policy.budget_args)
        if budget is None:
            budget = budgets[policy.budget_args] = policy.new_budget(self.clock)
        return budget


def _matches(prefix: Prefix, path: Prefix) -> bool:
    if len(prefix) > len(path):
        return False
    for want, have in zip(prefix, path, strict=False):
        if want != "*" and want != have:
            return False
    return True


# --- one request's retries -------------------------------------------------------------------

NOT_RETRYABLE = "not_retryable"
LIMIT = "limit"
BODY = "body"
DEADLINE = "deadline"
BUDGET = "budget"


class Attempts:
    """The retry state of one request (see the module docstring for the rules)."""

    __slots__ = ("policy", "retries", "replay", "held", "_backoff", "_rng")

    def __init__(self, policy: Policy, rng: random.Random) -> None:
        self.policy = policy
        self.retries = 0
        self.replay: list[bytes] | None = [] if policy.max_retries else None
        """The request bytes sent so far, for a replay; None once over the buffer."""
        self.held = 0
        self._backoff: JitteredBackoff | None = None
        self._rng = rng

    def keep(self, data: Any, size: int | None = None) -> None:
        """``data`` (the body bytes, as framed on the wire) was sent or is about to be;
        ``size`` is the body's own length in it when framing was added."""
        replay = self.replay
        if replay is not None:
            self.held += len(data) if size is None else size
            if self.held > self.policy.buffer_bytes:
                self.replay = None
            else:
                replay.append(data)

    def next_delay(self, verdict: ResponseClass, *, sent: bool,
                   budget: RetryBudget | None, remaining: float = math.inf) -> float | str:
        """Seconds to wait before the next attempt, or why there is none (one of
        ``not_retryable``, ``limit``, ``body``, ``deadline``, ``budget``)."""
        if not verdict.retryable:
            return NOT_RETRYABLE
        if self.retries >= self.policy.max_retries:
            return LIMIT
        if sent and self.replay is None:
            return BODY
        backoff = self._backoff
        if backoff is None:
            base, cap = self.policy.backoff_args
            backoff = self._backoff = JitteredBackoff(base, cap, self._rng)
        delay = backoff.next()
        if delay >= remaining:
            return DEADLINE
        if sent and budget is not None and not budget.try_withdraw():
            return BUDGET
        self.retries += 1
        return delay
