"""Request-level reliability policies: classifiers, retry budgets, backoffs, deadlines.

Pure code: clocks and random generators are parameters; nothing here does I/O. See
docs/reliability.md.
"""

from __future__ import annotations

from appliance.resilience.backoff import ConstantBackoff, JitteredBackoff
from appliance.resilience.budget import RetryBudget
from appliance.resilience.classify import (
    CLASSIFIERS,
    DEFAULT_CLASSIFIER,
    GrpcClassifier,
    HttpClassifier,
    ResponseClass,
    make_classifier,
    parse_grpc_status,
)
from appliance.resilience.deadline import (
    Deadline,
    DeadlineError,
    format_ctx_deadline,
    format_grpc_timeout,
    parse_ctx_deadline,
    parse_grpc_timeout,
)

__all__ = [
    "CLASSIFIERS", "DEFAULT_CLASSIFIER", "ConstantBackoff", "Deadline", "DeadlineError",
    "GrpcClassifier", "HttpClassifier", "JitteredBackoff", "ResponseClass", "RetryBudget",
    "format_ctx_deadline", "format_grpc_timeout", "make_classifier", "parse_ctx_deadline",
    "parse_grpc_status", "parse_grpc_timeout",
]
