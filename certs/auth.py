"""Who is asking: a bootstrap token from the tokens file, or a Kubernetes token.

The tokens file is consulted first (a local, cheap lookup); a token it does not list goes to
the TokenReview API when one is configured. Failures carry the HTTP status to answer: 401
when the token is not accepted, 503 when the API server could not be asked (the workload
retries). Messages never contain the token.
"""

from __future__ import annotations

from certs import tokenreview
from certs.tokens import Subject, TokenFile


class AuthError(Exception):
    """Not authenticated; answer ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Authenticator:
    """Tokens file first, then TokenReview."""

    def __init__(self, tokens: TokenFile | None = None,
                 reviewer: tokenreview.TokenReviewer | None = None) -> None:
        if tokens is None and reviewer is None:
            raise ValueError("give a tokens file (--tokens) or a Kubernetes API (--kube-api)")
        self.tokens = tokens
        self.reviewer = reviewer

    async def authenticate(self, token: str) -> Subject:
        if self.tokens is not None:
            subject = self.tokens.lookup(token)
            if subject is not None:
                return subject
        if self.reviewer is None:
            raise AuthError(401, "unknown token")
        try:
            return await self.reviewer.review(token)
        except tokenreview.Rejected as exc:
            raise AuthError(401, f"TokenReview: {exc}") from None
        except tokenreview.Unavailable as exc:
            raise AuthError(503, f"TokenReview unavailable: {exc}") from None
