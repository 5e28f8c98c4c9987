"""Per-service policies and one request's retry decisions (appliance.resilience.policy)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance import config
from appliance.config import ServiceConfig, ServiceOverride
from appliance.resilience.budget import RetryBudget
from appliance.resilience.classify import ResponseClass
from appliance.resilience.policy import Attempts, Policies, Policy, parse_prefix

RETRYABLE = ResponseClass.RETRYABLE_FAILURE
FAILURE = ResponseClass.FAILURE


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def override(prefix: str, **fields: object) -> ServiceOverride:
    return ServiceOverride(prefix=prefix, fields=fields)


@pytest.mark.parametrize(("name", "expect"), [
    (("svc", "web"), "/svc/web"),
    (("svc", "web", "v2"), "/svc/web/v2"),
    (("svc", "web", "admin"), "/svc/web/admin"),
    (("svc", "api", "admin"), "/svc/*/admin"),
    (("svc", "webby"), ""),
    (("svc",), ""),
    (None, ""),
])
def test_longest_matching_prefix_wins(name: tuple[str, ...] | None, expect: str) -> None:
    """Prefixes match whole segments, '*' matches one, the longest prefix wins."""
    policies = Policies(ServiceConfig(), [
        override("/svc/web", timeout=2.0),
        override("/svc/*/admin", timeout=3.0),
        override("/svc/web/v2", timeout=4.0),
        override("/svc/web/admin", timeout=5.0),
    ])
    assert policies.for_path(name).prefix == expect


def test_override_fields_lay_over_the_defaults() -> None:
    """An override changes only the fields it names; the rest come from `service`."""
    default = ServiceConfig(max_retries=5, classifier="io.l5d.http.retryableRead5XX")
    p = Policies(default, [override("/svc/web", timeout=2.0)]).for_path(("svc", "web"))
    assert p.timeout == 2.0 and p.max_retries == 5
    assert p.classifier.name == "io.l5d.http.retryableRead5XX"
    assert p.grpc_classifier.name == "io.l5d.h2.grpc.default"


def test_grpc_codes_reach_the_grpc_classifier() -> None:
    """retryable_grpc_codes sets the codes of the default gRPC classifier."""
    p = Policy(ServiceConfig(retryable_grpc_codes="RESOURCE_EXHAUSTED, 14"))
    assert p.classify(True, b"POST", 200, 8) is RETRYABLE
    assert p.classify(True, b"POST", 200, 13) is FAILURE
    never = Policy(ServiceConfig(grpc_classifier="io.l5d.h2.grpc.neverRetryable"))
    assert never.classify(True, b"POST", 200, 14) is FAILURE


@pytest.mark.parametrize(("text", "error"), [
    ("svc/web", "must start with '/'"),
    ("/svc//web", "empty path segment"),
    ("/svc/we b", "unexpected"),
])
def test_bad_prefixes_are_refused(text: str, error: str) -> None:
    """A prefix that is not a path is a ValueError naming it."""
    with pytest.raises(ValueError, match=error):
        parse_prefix(text)


@pytest.mark.parametrize(("data", "error"), [
    ({"service": {"classifier": "io.l5d.h2.grpc.default"}},
     "service.classifier: 'io.l5d.h2.grpc.default' is not an HTTP response classifier"),
    ({"service": {"grpc_classifier": "io.l5d.http.retryableRead5XX"}},
     "service.grpc_classifier: .* is not a gRPC response classifier"),
    ({"service": {"retryable_grpc_codes": "NOPE"}},
     "service.retryable_grpc_codes: unknown gRPC status name 'NOPE'"),
    ({"service": {"retry_backoff_cap": "1ms"}}, "service.retry_backoff_cap: 0.001 must be >="),
    ({"service": {"retry_budget_percent": 2000}}, "service.retry_budget_percent: 2000.0 must"),
    ({"service": {"max_retries": -1}}, "service.max_retries: -1 must be at least 0"),
    ({"services": [{"timeout": 1}]}, r"services\[0\]: expected a mapping with a 'prefix'"),
    ({"services": [{"prefix": "/a", "colour": 1}]}, r"services\[0\].colour: unknown field"),
    ({"services": [{"prefix": "/a", "timeout": "soon"}]},
     r"services\[0\].timeout: 'soon' is not a duration"),
    ({"services": [{"prefix": "/a", "retry_backoff_base": 1}]},
     r"services\[0\].retry_backoff_cap: 0.25 must be >="),
    ({"services": "{prefix: /a}"}, "services: expected a list"),
    ({"limits": {"max_queue": "x"}}, "limits.max_queue: 'x' is not an integer"),
])
def test_config_errors_name_the_field(data: dict[str, object], error: str) -> None:
    """Bad service, services and limits values are refused at load, naming the field."""
    with pytest.raises(config.ConfigError, match=error):
        config.load(file_data=data)


def test_services_from_an_environment_variable() -> None:
    """APPLIANCE_SERVICES takes the list as YAML or JSON text."""
    conf = config.load(environ={
        "APPLIANCE_SERVICES": '[{"prefix": "/svc/web", "timeout": "250ms", "max_retries": 0}]'})
    assert conf.services[0].prefix == "/svc/web"
    assert dict(conf.services[0].fields) == {"timeout": 0.25, "max_retries": 0}


def test_zero_config_defaults() -> None:
    """With no config: nonRetryable5XX, gRPC UNAVAILABLE retried, 2 retries, 64 KiB."""
    p = Policies(config.load().service).for_path(None)
    assert p.classifier.name == "io.l5d.http.nonRetryable5XX"
    assert p.classify(True, b"POST", 200, 14) is RETRYABLE
    assert (p.max_retries, p.buffer_bytes, p.timeout) == (2, 65536, None)
    assert p.budget_args == (10.0, 10.0, 0.2)


# --- Attempts ----------------------------------------------------------------------------

def attempts(**fields: object) -> Attempts:
    return Attempts(Policy(dataclasses.replace(ServiceConfig(), **fields)), random.Random(7))


@pytest.mark.parametrize(("verdict", "sent", "fields", "expect"), [
    (FAILURE, True, {}, "not_retryable"),
    (ResponseClass.SUCCESS, True, {}, "not_retryable"),
    (RETRYABLE, True, {"max_retries": 0}, "limit"),
    (RETRYABLE, False, {"max_retries": 0}, "limit"),
    (RETRYABLE, True, {}, float),
    (RETRYABLE, False, {}, float),
])
def test_next_delay_table(verdict: ResponseClass, sent: bool, fields: dict[str, object],
                          expect: object) -> None:
    """The first checks: the verdict, then max_retries."""
    got = attempts(**fields).next_delay(verdict, sent=sent, budget=None)
    assert isinstance(got, float) if expect is float else got == expect


def test_retries_stop_at_max_retries_and_back_off() -> None:
    """Delays are jittered and doubling (5-10 ms, 10-20 ms), then the limit."""
    a = attempts(max_retries=2)
    first = a.next_delay(RETRYABLE, sent=True, budget=None)
    second = a.next_delay(RETRYABLE, sent=True, budget=None)
    assert isinstance(first, float) and 0.005 <= first <= 0.01
    assert isinstance(second, float) and 0.01 <= second <= 0.02
    assert a.next_delay(RETRYABLE, sent=True, budget=None) == "limit"
    assert a.retries == 2


def test_a_body_over_the_buffer_is_never_replayed_once_sent() -> None:
    """Past retry_buffer_bytes the body is dropped: a sent request is not retried, an
    unsent one still is (nothing reached the upstream)."""
    a = attempts(retry_buffer_bytes=10)
    a.keep(b"12345")
    a.keep(b"\r\n678910\r\n", 6)
    assert a.replay is None and a.held == 11
    assert a.next_delay(RETRYABLE, sent=True, budget=None) == "body"
    assert isinstance(a.next_delay(RETRYABLE, sent=False, budget=None), float)


def test_the_replay_keeps_the_body_as_sent() -> None:
    """Up to the limit, every part is kept in order, framing included."""
    a = attempts(retry_buffer_bytes=10)
    a.keep(b"5\r\nhello\r\n", 5)
    a.keep(b"0\r\n\r\n", 0)
    assert a.replay == [b"5\r\nhello\r\n", b"0\r\n\r\n"]


def test_no_retry_past_the_deadline() -> None:
    """A backoff that would end after the deadline means no retry."""
    a = attempts()
    assert a.next_delay(RETRYABLE, sent=True, budget=None, remaining=0.001) == "deadline"


def test_only_sent_retries_draw_on_the_budget() -> None:
    """A budget with nothing left refuses sent retries; unsent ones do not ask it."""
    clock = Clock()
    budget = RetryBudget(clock, ttl=10, min_retries_per_sec=0, percent_can_retry=0.5)
    budget.deposit()
    budget.deposit()
    a = attempts(max_retries=5)
    assert isinstance(a.next_delay(RETRYABLE, sent=True, budget=budget), float)
    assert a.next_delay(RETRYABLE, sent=True, budget=budget) == "budget"
    assert isinstance(a.next_delay(RETRYABLE, sent=False, budget=budget), float)
    assert a.retries == 2


@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=60),
       st.integers(min_value=0, max_value=5))
def test_retries_never_exceed_the_limit_or_the_budget(
        outcomes: list[tuple[bool, bool]], max_retries: int) -> None:
    """Whatever the failures: retries <= max_retries, sent retries <= the budget."""
    clock = Clock()
    budget = RetryBudget(clock, ttl=10, min_retries_per_sec=0, percent_can_retry=0.25)
    for _ in range(8):
        budget.deposit()
    a = attempts(max_retries=max_retries)
    sent_retries = 0
    for retryable, sent in outcomes:
        got = a.next_delay(RETRYABLE if retryable else FAILURE, sent=sent, budget=budget)
        if isinstance(got, float) and sent:
            sent_retries += 1
    assert a.retries <= max_retries
    assert sent_retries <= 2


def test_dst_budgets_are_per_destination_and_bounded() -> None:
    """Unrouted traffic: one budget per destination, the oldest forgotten past 4096."""
    policies = Policies(ServiceConfig())
    p = policies.default
    a = policies.dst_budget("10.0.0.1:80", p)
    assert policies.dst_budget("10.0.0.1:80", p) is a
    assert policies.dst_budget("10.0.0.2:80", p) is not a
    for i in range(5000):
        policies.dst_budget(i, p)
    assert len(policies._dst_budgets) == 4096
    assert policies.dst_budget("10.0.0.1:80", p) is not a
