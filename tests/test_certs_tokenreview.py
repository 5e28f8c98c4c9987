"""certs.tokenreview and certs.auth, against a local TokenReview stand-in (not Kubernetes)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fake_k8s_tokenreview import Account, FakeTokenReview

from certs import tokenreview
from certs.auth import Authenticator, AuthError
from certs.tokens import Subject, TokenFile

SA_TOKEN = "eyJhbGciOiJSUzI1NiJ9.projected-web-token.sig"


def _ok(username: str, audiences: list[str] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"authenticated": True, "user": {"username": username}}
    if audiences is not None:
        status["audiences"] = audiences
    return {"kind": "TokenReview", "status": status}


@pytest.mark.parametrize("status, payload, audiences, outcome", [
    (201, _ok("system:serviceaccount:default:web"), (), Subject("default", "web")),
    (200, _ok("system:serviceaccount:prod:api.v2", ["a"]), ("a",), Subject("prod", "api.v2")),
    (201, _ok("system:serviceaccount:prod:api", ["b"]), ("a",), "Rejected:audience"),
    (201, _ok("system:serviceaccount:prod:api"), ("a",), "Rejected:audience"),
    (201, _ok("jane@example.org"), (), "Rejected:not a ServiceAccount"),
    (201, _ok("system:serviceaccount:Bad:api"), (), "Rejected:namespace 'Bad'"),
    (201, {"status": {"authenticated": False, "error": "token expired"}}, (),
     "Rejected:token expired"),
    (201, {"status": {"authenticated": False}}, (), "Rejected:not authenticated"),
    (401, {"kind": "Status"}, (), "Unavailable:our own credentials"),
    (500, {}, (), "Unavailable:HTTP 500"),
    (201, {"kind": "TokenReview"}, (), "Unavailable:no status"),
    (201, {"status": {"authenticated": True}}, (), "Unavailable:username"),
])
def test_interpret(status: int, payload: dict[str, Any], audiences: tuple[str, ...],
                   outcome: Subject | str) -> None:
    """The API server's answers map to a subject, a rejection (401) or unavailability."""
    if isinstance(outcome, Subject):
        assert tokenreview.interpret(status, payload, audiences) == outcome
        return
    kind, fragment = outcome.split(":", 1)
    error = tokenreview.Rejected if kind == "Rejected" else tokenreview.Unavailable
    with pytest.raises(error, match=None) as err:
        tokenreview.interpret(status, payload, audiences)
    assert fragment in str(err.value)


def test_in_cluster_settings() -> None:
    """in-cluster reads KUBERNETES_SERVICE_HOST/PORT and the mounted ServiceAccount files."""
    s = tokenreview.KubeSettings.in_cluster(
        {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}, ["x"])
    assert s.url == "https://[fd00::1]:6443"
    assert s.token_file == tokenreview.SA_DIR / "token"
    assert s.ca_file == tokenreview.SA_DIR / "ca.crt"
    with pytest.raises(ValueError, match="KUBERNETES_SERVICE_HOST is not set"):
        tokenreview.KubeSettings.in_cluster({})


def _reviewer(fake: FakeTokenReview, tmp: Path, audiences: tuple[str, ...] = (),
              caller: str | None = None) -> tokenreview.TokenReviewer:
    (tmp / "ca.crt").write_bytes(fake.ca_pem)
    (tmp / "sa-token").write_text((caller or fake.caller_token) + "\n")
    return tokenreview.TokenReviewer(tokenreview.KubeSettings(
        fake.url, tmp / "sa-token", tmp / "ca.crt", audiences, timeout=3.0))


def test_review_against_stand_in(tmp_path: Path) -> None:
    """Over HTTPS: a known token yields its ServiceAccount, the request carries the token,
    audiences and our bearer; unknown tokens and wrong audiences are rejected."""
    async def main() -> None:
        fake = FakeTokenReview()
        fake.accounts[SA_TOKEN] = Account("default", "web", ("appliance-identity",))
        await fake.start()
        try:
            reviewer = _reviewer(fake, tmp_path, ("appliance-identity",))
            assert await reviewer.review(SA_TOKEN) == Subject("default", "web")
            assert fake.reviews[-1]["spec"] == {"token": SA_TOKEN,
                                                "audiences": ["appliance-identity"]}
            with pytest.raises(tokenreview.Rejected, match="token lookup failed"):
                await reviewer.review("unknown-token")
            other = _reviewer(fake, tmp_path, ("someone-else",))
            with pytest.raises(tokenreview.Rejected, match="audiences are invalid"):
                await other.review(SA_TOKEN)
        finally:
            await fake.stop()

    asyncio.run(main())


def test_review_unavailable(tmp_path: Path) -> None:
    """Our own bearer refused, the CA not trusted, the server down: all Unavailable."""
    async def main() -> None:
        fake = FakeTokenReview()
        fake.accounts[SA_TOKEN] = Account("default", "web")
        await fake.start()
        try:
            with pytest.raises(tokenreview.Unavailable, match="RBAC"):
                await _reviewer(fake, tmp_path, caller="wrong").review(SA_TOKEN)
            reviewer = _reviewer(fake, tmp_path)
            (tmp_path / "ca.crt").write_bytes(FakeTokenReview().ca_pem)
            untrusting = tokenreview.TokenReviewer(reviewer.settings)
            with pytest.raises(tokenreview.Unavailable, match="TLS handshake failed"):
                await untrusting.review(SA_TOKEN)
        finally:
            await fake.stop()
        with pytest.raises(tokenreview.Unavailable, match="connect failed"):
            await _reviewer(fake, tmp_path).review(SA_TOKEN)

    asyncio.run(main())


def test_authenticator_order(tmp_path: Path) -> None:
    """The tokens file is asked first; other tokens go to TokenReview; its refusal is 401
    and its absence 503; without TokenReview an unknown token is 401."""
    async def main() -> None:
        fake = FakeTokenReview()
        fake.accounts[SA_TOKEN] = Account("prod", "api")
        await fake.start()
        (tmp_path / "tokens").write_text("file-token-0123456789 default web\n")
        tokens = TokenFile(tmp_path / "tokens")
        try:
            auth = Authenticator(tokens, _reviewer(fake, tmp_path))
            assert await auth.authenticate("file-token-0123456789") == Subject("default", "web")
            assert fake.reviews == []
            assert await auth.authenticate(SA_TOKEN) == Subject("prod", "api")
            with pytest.raises(AuthError) as err:
                await auth.authenticate("nobody-knows-this")
            assert err.value.status == 401 and "nobody-knows-this" not in str(err.value)
        finally:
            await fake.stop()
        with pytest.raises(AuthError) as err:
            await auth.authenticate(SA_TOKEN)
        assert err.value.status == 503
        with pytest.raises(AuthError) as err:
            await Authenticator(tokens).authenticate(SA_TOKEN)
        assert (err.value.status, str(err.value)) == (401, "unknown token")
        with pytest.raises(ValueError, match="--tokens"):
            Authenticator()

    asyncio.run(main())
