"""Response classifiers: was a request a success, a failure, or a failure worth retrying?

Theory of operation: the proxy calls ``classify(method, status, grpc_status, error, sent)``
once per attempt. The verdict feeds three things: success-rate metrics, failure accrual
(``SUCCESS`` is ok, both failures are not) and retries (only ``RETRYABLE_FAILURE`` may be
retried, and only within the retry budget).

The classifiers and their names are linkerd's (1.x); ``io.l5d.h2.*`` names are accepted as
aliases of the ``io.l5d.http.*`` ones because the rules do not depend on the HTTP version.

- ``io.l5d.http.nonRetryable5XX`` (default): 5XX is a failure, never retried.
- ``io.l5d.http.retryableRead5XX``: 5XX to GET, HEAD, OPTIONS or TRACE is retryable.
- ``io.l5d.http.retryableIdempotent5XX``: the same, plus PUT and DELETE.
- ``io.l5d.http.allSuccessful``: every response is a success, whatever its status.
- ``io.l5d.h2.grpc.default``, ``.alwaysRetryable``, ``.neverRetryable``,
  ``.retryableStatusCodes``, ``.compliant``: by ``grpc-status`` (from the trailers, or from
  the headers of a trailers-only response); 0 is a success, anything else a failure,
  retryable when its code is in the classifier's set (UNAVAILABLE, 14, by default).

Rules shared by all of them, where linkerd is silent or differs:

- 1XX-4XX responses are successes for the HTTP classifiers (4XX is the caller's fault).
- No response at all (``status is None``, with or without ``error``) is a failure. When the
  request was never sent (``sent=False``: connect refused, no endpoint, REFUSED_STREAM) it
  is always retryable, because the upstream cannot have acted on it. When it was sent, it
  is retryable only if the classifier would retry a 5XX for that method (never for gRPC).
- An ``error`` after response headers arrived (a reset mid-body) is a failure that is never
  retryable: part of the response may already have gone to the client.
- For gRPC, an HTTP response without ``grpc-status`` is a failure (the gRPC spec maps it to
  a non-OK code); ``compliant`` retries it when the status is 429, 502, 503 or 504.
- Whether the request body can be replayed (linkerd never retries chunked bodies) is the
  proxy's call: a retryable verdict says retrying is safe for the upstream, not that the
  proxy still holds the body.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

__all__ = [
    "CLASSIFIERS", "DEFAULT_CLASSIFIER", "GRPC_CODES", "GrpcClassifier", "HttpClassifier",
    "ResponseClass", "make_classifier", "parse_grpc_status",
]


class ResponseClass(enum.Enum):
    """The verdict on one attempt; the value is the metric label."""

    SUCCESS = "success"
    FAILURE = "failure"
    RETRYABLE_FAILURE = "retryable_failure"

    @property
    def ok(self) -> bool:
        return self is ResponseClass.SUCCESS

    @property
    def retryable(self) -> bool:
        return self is ResponseClass.RETRYABLE_FAILURE


SUCCESS = ResponseClass.SUCCESS
FAILURE = ResponseClass.FAILURE
RETRYABLE = ResponseClass.RETRYABLE_FAILURE

GRPC_CODES: dict[str, int] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
_UNAVAILABLE = frozenset({14})


def _methods(*names: str) -> frozenset[str | bytes]:
    return frozenset([*names, *(n.encode("ascii") for n in names)])


READ_METHODS = _methods("GET", "HEAD", "OPTIONS", "TRACE")
IDEMPOTENT_METHODS = _methods("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE")
NO_METHODS: frozenset[str | bytes] = frozenset()


def parse_grpc_status(value: str | bytes | None) -> int | None:
    """The ``grpc-status`` header as an int; None when absent; UNKNOWN (2) when malformed."""
    if value is None:
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        return 2
    return int(text)


class HttpClassifier:
    """Classify by HTTP status and method."""

    __slots__ = ("name", "retry_methods", "all_successful")

    def __init__(self, name: str, retry_methods: frozenset[str | bytes],
                 all_successful: bool = False) -> None:
        self.name = name
        self.retry_methods = retry_methods
        self.all_successful = all_successful

    def classify(self, method: str | bytes, status: int | None, grpc_status: int | None = None,
                 error: str | None = None, sent: bool = True) -> ResponseClass:
        """The verdict on one attempt (``grpc_status`` is ignored by HTTP classifiers)."""
        if status is None:
            if not sent or method in self.retry_methods:
                return RETRYABLE
            return FAILURE
        if error is not None:
            return FAILURE
        if status >= 500 and not self.all_successful:
            return RETRYABLE if method in self.retry_methods else FAILURE
        return SUCCESS

    def __repr__(self) -> str:
        return f"<HttpClassifier {self.name}>"


class GrpcClassifier:
    """Classify by ``grpc-status``; HTTP status only when it is missing."""

    __slots__ = ("name", "retryable_codes", "always", "success_codes", "retryable_statuses")

    def __init__(self, name: str, retryable_codes: frozenset[int], *, always: bool = False,
                 success_codes: frozenset[int] = frozenset(),
                 retryable_statuses: frozenset[int] = frozenset()) -> None:
        self.name = name
        self.retryable_codes = retryable_codes
        self.always = always
        self.success_codes = success_codes
        """Non-zero codes counted as successes (linkerd's ``nonAccruableStatusCodes``)."""
        self.retryable_statuses = retryable_statuses

    def classify(self, method: str | bytes, status: int | None, grpc_status: int | None = None,
                 error: str | None = None, sent: bool = True) -> ResponseClass:
        """The verdict on one gRPC attempt (``method`` is ignored: gRPC is always POST)."""
        if status is None:
            return FAILURE if sent else RETRYABLE
        if error is not None:
            return FAILURE
        if grpc_status is not None:
            if grpc_status == 0 or grpc_status in self.success_codes:
                return SUCCESS
            if self.always or grpc_status in self.retryable_codes:
                return RETRYABLE
            return FAILURE
        return RETRYABLE if status in self.retryable_statuses else FAILURE

    def __repr__(self) -> str:
        return f"<GrpcClassifier {self.name}>"


Classifier = HttpClassifier | GrpcClassifier
DEFAULT_CLASSIFIER = "io.l5d.http.nonRetryable5XX"

_HTTP = {
    "nonRetryable5XX": (NO_METHODS, False),
    "retryableRead5XX": (READ_METHODS, False),
    "retryableIdempotent5XX": (IDEMPOTENT_METHODS, False),
    "allSuccessful": (NO_METHODS, True),
}
_GRPC = ("default", "alwaysRetryable", "neverRetryable", "retryableStatusCodes", "compliant")
_GRPC_TAKES_CODES = ("default", "retryableStatusCodes")

CLASSIFIERS: tuple[str, ...] = (
    *(f"io.l5d.http.{n}" for n in _HTTP),
    *(f"io.l5d.h2.{n}" for n in _HTTP),
    *(f"io.l5d.h2.grpc.{n}" for n in _GRPC),
)


def make_classifier(name: str = DEFAULT_CLASSIFIER, *,
                    retryable_grpc_codes: Iterable[int | str] | None = None,
                    success_grpc_codes: Iterable[int | str] | None = None) -> Classifier:
    """A classifier by its linkerd name (see :data:`CLASSIFIERS`).

    ``retryable_grpc_codes`` (numbers or names such as ``"UNAVAILABLE"``) sets the retryable
    codes of ``io.l5d.h2.grpc.default`` (default {14}) and is required by
    ``io.l5d.h2.grpc.retryableStatusCodes``. ``success_grpc_codes`` (any gRPC classifier)
    lists non-zero codes to count as successes. Errors name the classifier and the option.
    """
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown response classifier {name!r}; expected one of "
                         + ", ".join(CLASSIFIERS))
    short = name.rsplit(".", 1)[1]
    if not name.startswith("io.l5d.h2.grpc."):
        for opt, val in (("retryable_grpc_codes", retryable_grpc_codes),
                         ("success_grpc_codes", success_grpc_codes)):
            if val is not None:
                raise ValueError(f"response classifier {name!r} does not take {opt} "
                                 "(only the io.l5d.h2.grpc.* classifiers do)")
        methods, all_ok = _HTTP[short]
        return HttpClassifier(name, methods, all_ok)
    if retryable_grpc_codes is not None and short not in _GRPC_TAKES_CODES:
        raise ValueError(f"response classifier {name!r} does not take retryable_grpc_codes")
    if retryable_grpc_codes is None and short == "retryableStatusCodes":
        raise ValueError(f"response classifier {name!r} requires retryable_grpc_codes")
    codes = (_UNAVAILABLE if retryable_grpc_codes is None
             else _grpc_codes("retryable_grpc_codes", retryable_grpc_codes))
    success = (frozenset() if success_grpc_codes is None
               else _grpc_codes("success_grpc_codes", success_grpc_codes))
    if short == "neverRetryable":
        codes = frozenset()
    return GrpcClassifier(name, codes, always=short == "alwaysRetryable", success_codes=success,
                          retryable_statuses=(frozenset({429, 502, 503, 504})
                                              if short == "compliant" else frozenset()))


def _grpc_codes(option: str, values: Iterable[int | str]) -> frozenset[int]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ValueError(f"{option} must be a list of gRPC status codes, got {values!r}")
    out = set()
    for v in values:
        if isinstance(v, str):
            code = GRPC_CODES.get(v.strip().upper())
            if code is None:
                raise ValueError(f"{option}: unknown gRPC status name {v!r}; expected one of "
                                 + ", ".join(GRPC_CODES))
        elif isinstance(v, int) and not isinstance(v, bool):
            code = v
        else:
            raise ValueError(f"{option}: {v!r} is not a gRPC status code (a number or a name)")
        if not 1 <= code <= 0x7FFFFFFF:
            raise ValueError(f"{option}: {v!r} is not a failure code (0 is OK; codes are "
                             "1 to 2147483647)")
        out.add(code)
    return frozenset(out)
