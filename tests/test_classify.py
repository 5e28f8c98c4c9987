"""Response classifiers: linkerd's tables for HTTP and gRPC, connection errors, names."""

from __future__ import annotations

import pytest

from appliance.resilience.classify import (
    CLASSIFIERS,
    DEFAULT_CLASSIFIER,
    GrpcClassifier,
    HttpClassifier,
    ResponseClass,
    make_classifier,
    parse_grpc_status,
)

S = ResponseClass.SUCCESS
F = ResponseClass.FAILURE
R = ResponseClass.RETRYABLE_FAILURE

HTTP_NAMES = ["nonRetryable5XX", "retryableRead5XX", "retryableIdempotent5XX", "allSuccessful"]

# method, status -> verdict per classifier (in HTTP_NAMES order)
HTTP_TABLE = [
    ("GET", 200, (S, S, S, S)),
    ("GET", 302, (S, S, S, S)),
    ("GET", 404, (S, S, S, S)),
    ("POST", 429, (S, S, S, S)),
    ("GET", 500, (F, R, R, S)),
    ("HEAD", 503, (F, R, R, S)),
    ("OPTIONS", 502, (F, R, R, S)),
    ("TRACE", 504, (F, R, R, S)),
    ("PUT", 503, (F, F, R, S)),
    ("DELETE", 500, (F, F, R, S)),
    ("POST", 503, (F, F, F, S)),
    ("PATCH", 500, (F, F, F, S)),
    ("get", 500, (F, F, F, S)),  # methods are case-sensitive
    ("GET", 599, (F, R, R, S)),
]


@pytest.mark.parametrize("prefix", ["io.l5d.http.", "io.l5d.h2."])
@pytest.mark.parametrize("method, status, verdicts", HTTP_TABLE)
def test_http_classifier_table(prefix: str, method: str, status: int,
                               verdicts: tuple[ResponseClass, ...]) -> None:
    """Each HTTP classifier on each (method, status), under both linkerd prefixes."""
    for short, expected in zip(HTTP_NAMES, verdicts, strict=True):
        c = make_classifier(prefix + short)
        assert c.classify(method, status, None, None, True) is expected, (short, method, status)
        assert c.classify(method.encode(), status, None, None, True) is expected  # bytes too


# method, sent, status, error -> verdict per classifier
ERROR_TABLE = [
    ("POST", False, None, "connection refused", (R, R, R, R)),
    ("GET", False, None, "connection refused", (R, R, R, R)),
    ("GET", True, None, "connection reset", (F, R, R, F)),
    ("PUT", True, None, "connection reset", (F, F, R, F)),
    ("POST", True, None, "timeout", (F, F, F, F)),
    ("GET", True, None, None, (F, R, R, F)),  # no response and no error: still a failure
    ("GET", True, 200, "reset mid-body", (F, F, F, F)),  # response began: never retry
    ("GET", True, 503, "reset mid-body", (F, F, F, F)),
]


@pytest.mark.parametrize("method, sent, status, error, verdicts", ERROR_TABLE)
def test_http_connection_errors(method: str, sent: bool, status: int | None, error: str | None,
                                verdicts: tuple[ResponseClass, ...]) -> None:
    """Errors are failures; unsent requests are always retryable; partial responses never."""
    for short, expected in zip(HTTP_NAMES, verdicts, strict=True):
        c = make_classifier("io.l5d.http." + short)
        assert c.classify(method, status, None, error, sent) is expected, (short, method)


def test_http_classifier_ignores_grpc_status() -> None:
    """HTTP classifiers look at the HTTP status only."""
    c = make_classifier("io.l5d.http.retryableRead5XX")
    assert c.classify("POST", 200, 14, None, True) is S


GRPC_NAMES = ["default", "alwaysRetryable", "neverRetryable", "compliant"]

# status, grpc_status, error, sent -> verdict per gRPC classifier
GRPC_TABLE = [
    (200, 0, None, True, (S, S, S, S)),
    (200, 14, None, True, (R, R, F, R)),
    (200, 2, None, True, (F, R, F, F)),
    (200, 4, None, True, (F, R, F, F)),
    (200, 13, None, True, (F, R, F, F)),
    (200, None, None, True, (F, F, F, F)),  # no grpc-status at all
    (503, None, None, True, (F, F, F, R)),
    (429, None, None, True, (F, F, F, R)),
    (502, None, None, True, (F, F, F, R)),
    (504, None, None, True, (F, F, F, R)),
    (500, None, None, True, (F, F, F, F)),
    (404, None, None, True, (F, F, F, F)),
    (None, None, "refused", False, (R, R, R, R)),
    (None, None, "reset", True, (F, F, F, F)),
    (200, None, "reset mid-stream", True, (F, F, F, F)),
]


@pytest.mark.parametrize("status, grpc_status, error, sent, verdicts", GRPC_TABLE)
def test_grpc_classifier_table(status: int | None, grpc_status: int | None, error: str | None,
                               sent: bool, verdicts: tuple[ResponseClass, ...]) -> None:
    """Each gRPC classifier on grpc-status, HTTP status and errors."""
    for short, expected in zip(GRPC_NAMES, verdicts, strict=True):
        c = make_classifier("io.l5d.h2.grpc." + short)
        got = c.classify(b"POST", status, grpc_status, error, sent)
        assert got is expected, (short, status, grpc_status, error)


def test_grpc_retryable_status_codes() -> None:
    """User-defined codes (numbers or names) are retryable, others not."""
    c = make_classifier("io.l5d.h2.grpc.retryableStatusCodes",
                        retryable_grpc_codes=[2, "resource_exhausted", 100])
    assert c.classify("POST", 200, 2) is R
    assert c.classify("POST", 200, 8) is R
    assert c.classify("POST", 200, 100) is R
    assert c.classify("POST", 200, 14) is F


def test_grpc_default_codes_can_be_overridden() -> None:
    """io.l5d.h2.grpc.default retries UNAVAILABLE unless told otherwise."""
    assert make_classifier("io.l5d.h2.grpc.default").retryable_codes == {14}  # type: ignore
    c = make_classifier("io.l5d.h2.grpc.default", retryable_grpc_codes=["UNAVAILABLE", 10])
    assert c.classify("POST", 200, 10) is R


def test_grpc_success_codes() -> None:
    """Codes listed as successes (linkerd's nonAccruable) count as success."""
    c = make_classifier("io.l5d.h2.grpc.neverRetryable", success_grpc_codes=["NOT_FOUND"])
    assert c.classify("POST", 200, 5) is S
    assert c.classify("POST", 200, 3) is F


def test_default_classifier() -> None:
    """With no name the default is linkerd's nonRetryable5XX."""
    c = make_classifier()
    assert isinstance(c, HttpClassifier) and c.name == DEFAULT_CLASSIFIER
    assert c.classify("GET", 503) is F


def test_every_listed_name_builds() -> None:
    """Each name in CLASSIFIERS makes a classifier of the right family."""
    for name in CLASSIFIERS:
        kwargs = ({"retryable_grpc_codes": [14]} if name.endswith("retryableStatusCodes")
                  else {})
        c = make_classifier(name, **kwargs)  # type: ignore[arg-type]
        assert isinstance(c, GrpcClassifier if ".grpc." in name else HttpClassifier)
        assert c.name == name


@pytest.mark.parametrize("name, kwargs, match", [
    ("io.l5d.http.retryableAll5XX", {}, "unknown response classifier"),
    ("nonRetryable5XX", {}, "unknown response classifier"),
    ("io.l5d.http.nonRetryable5XX", {"retryable_grpc_codes": [14]}, "does not take"),
    ("io.l5d.h2.allSuccessful", {"success_grpc_codes": [5]}, "does not take"),
    ("io.l5d.h2.grpc.alwaysRetryable", {"retryable_grpc_codes": [14]}, "does not take"),
    ("io.l5d.h2.grpc.retryableStatusCodes", {}, "requires retryable_grpc_codes"),
    ("io.l5d.h2.grpc.default", {"retryable_grpc_codes": [0]}, "not a failure code"),
    ("io.l5d.h2.grpc.default", {"retryable_grpc_codes": ["UNAVAIL"]}, "unknown gRPC status"),
    ("io.l5d.h2.grpc.default", {"retryable_grpc_codes": [True]}, "not a gRPC status"),
    ("io.l5d.h2.grpc.default", {"retryable_grpc_codes": "14"}, "must be a list"),
])
def test_make_classifier_errors(name: str, kwargs: dict[str, object], match: str) -> None:
    """Bad names and options are rejected with a message that names them."""
    with pytest.raises(ValueError, match=match):
        make_classifier(name, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("value, expected", [
    (None, None), (b"0", 0), ("14", 14), (b" 2 ", 2), (b"", 2), (b"x", 2), (b"-1", 2),
    ("\u0661", 2), (b"12345678901", 2),
])
def test_parse_grpc_status(value: str | bytes | None, expected: int | None) -> None:
    """Absent is None; malformed is UNKNOWN (2), as gRPC clients treat it."""
    assert parse_grpc_status(value) == expected


def test_response_class_properties() -> None:
    """ok and retryable flags, and metric-friendly values."""
    assert S.ok and not S.retryable
    assert not F.ok and not F.retryable
    assert not R.ok and R.retryable
    assert [c.value for c in ResponseClass] == ["success", "failure", "retryable_failure"]
