"""appliance.identity.settings and .local: variables, anchors, CSR, answers, timing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from appliance.identity import local, settings
from appliance.identity.settings import IdentityConfigError
from certs import pki, signing
from certs.tokens import Subject

NOW = datetime(2030, 1, 1, tzinfo=UTC)
T = NOW.timestamp()
ALL = {settings.ADDR: "198.18.0.3:8080", settings.TRUST_ANCHORS: "/etc/anchors.pem",
       settings.TOKEN_FILE: "/var/run/token"}


def test_environ_none_set() -> None:
    """With none of the three variables (or only blanks), identity is off."""
    assert settings.from_environ({}) is None
    assert settings.from_environ({settings.ADDR: "  "}) is None


def test_environ_all_set() -> None:
    """All three set: host, port and paths."""
    s = settings.from_environ(ALL)
    assert s is not None
    assert (s.host, s.port, str(s.trust_anchors), str(s.token_file)) == (
        "198.18.0.3", 8080, "/etc/anchors.pem", "/var/run/token")
    v6 = settings.from_environ({**ALL, settings.ADDR: "[fd00::3]:443"})
    assert v6 is not None and (v6.host, v6.port) == ("fd00::3", 443)


@pytest.mark.parametrize("environ, fragment", [
    ({settings.ADDR: "h:1"}, "APPLIANCE_TRUST_ANCHORS, APPLIANCE_IDENTITY_TOKEN_FILE not set"),
    ({k: v for k, v in ALL.items() if k != settings.TOKEN_FILE},
     "APPLIANCE_IDENTITY_TOKEN_FILE not set"),
    ({**ALL, settings.ADDR: "identity"}, "APPLIANCE_IDENTITY_ADDR: 'identity' is not HOST:PORT"),
    ({**ALL, settings.ADDR: "h:0"}, "is not HOST:PORT"),
    ({**ALL, settings.ADDR: "h:99999"}, "is not HOST:PORT"),
])
def test_environ_errors(environ: dict[str, str], fragment: str) -> None:
    """Partial or malformed settings name the variable."""
    with pytest.raises(IdentityConfigError) as err:
        settings.from_environ(environ)
    assert fragment in str(err.value)


def _ca(now: datetime = NOW, lifetime: timedelta = timedelta(days=365),
        domain: str = "example.org") -> tuple[x509.Certificate, pki.Key, x509.Certificate,
                                               pki.Key]:
    anchor_key, issuer_key = pki.new_key(), pki.new_key()
    anchor = pki.make_anchor(domain, anchor_key, now=now, lifetime=lifetime)
    issuer = pki.make_issuer(issuer_key, anchor, anchor_key, now=now)
    return anchor, anchor_key, issuer, issuer_key


def test_load_anchors_keeps_valid_cas() -> None:
    """From a bundle, only CA certificates valid now are kept."""
    good, _, issuer, issuer_key = _ca()
    old, *_ = _ca(NOW - timedelta(days=400))
    leaf = pki.issue_leaf(pki.new_key().public_key(), issuer, issuer_key, now=NOW,
                          uri="spiffe://example.org/ns/a/sa/b")
    pem = pki.chain_pem([old, leaf, good])
    assert local.load_anchors(pem, "bundle.pem", NOW) == [good]


@pytest.mark.parametrize("which, fragment", [
    ("expired", "bundle.pem holds no CA certificate valid now"),
    ("leaf", "holds no CA certificate valid now"),
    ("junk", "no certificate found"),
])
def test_load_anchors_errors(which: str, fragment: str) -> None:
    """Expired anchors, no CA, or no PEM are configuration errors naming the variable."""
    anchor, _, issuer, issuer_key = _ca(NOW - timedelta(days=400))
    pem = {"expired": pki.cert_pem(anchor),
           "leaf": pki.cert_pem(pki.issue_leaf(
               pki.new_key().public_key(), issuer, issuer_key,
               now=NOW - timedelta(days=300), uri="spiffe://example.org/ns/a/sa/b")),
           "junk": b"junk"}[which]
    with pytest.raises(IdentityConfigError) as err:
        local.load_anchors(pem, "bundle.pem", NOW)
    assert str(err.value).startswith("APPLIANCE_TRUST_ANCHORS: ") and fragment in str(err.value)


def test_read_anchors_missing_file(tmp_path: Path) -> None:
    """An unreadable anchors file is named."""
    with pytest.raises(IdentityConfigError, match="nope.pem: cannot read"):
        local.read_anchors(tmp_path / "nope.pem", NOW)


def test_service_name() -> None:
    """The expected service name comes from the anchor's trust domain, else the host."""
    anchor, *_ = _ca(domain="mesh.test")
    assert local.service_name([anchor], "10.0.0.1") == "identity.mesh.test"
    key = pki.new_key()
    plain = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
             .public_key(key.public_key()).serial_number(1).not_valid_before(NOW)
             .not_valid_after(NOW + timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .sign(key, pki.hashes.SHA256()))
    assert local.service_name([plain], "10.0.0.1") == "10.0.0.1"


def test_csr_passes_the_service_rules() -> None:
    """Our CSR (addresses, optional identity) is what the service's rules accept."""
    key = pki.new_key()
    pem = local.build_csr(key, ["198.18.0.5"], "spiffe://example.org/ns/default/sa/web")
    csr = signing.load_csr(pem)
    assert pki.uris(csr) == ["spiffe://example.org/ns/default/sa/web"]
    anchor, _, issuer, issuer_key = _ca(NOW - timedelta(hours=1))
    signed = signing.sign(csr, Subject("default", "web"), issuer_key, issuer,
                          trust_domain="example.org", peer="198.18.0.5", policy="peer",
                          now=NOW, lifetime=timedelta(hours=24), backdate=timedelta(0))
    creds = local.parse_answer(signing.answer(signed, issuer), key, [anchor], T)
    assert creds.identity == "spiffe://example.org/ns/default/sa/web"
    assert creds.addresses == ("198.18.0.5",) and creds.not_after == T + 86400
    assert "key" not in repr(creds).lower().replace("not_after", "")
    assert pki.uris(signing.load_csr(local.build_csr(key, []))) == []


def _answer(leaf: x509.Certificate, issuer: x509.Certificate) -> dict[str, object]:
    return {"chain": pki.chain_pem([leaf, issuer]).decode()}


def test_parse_answer_refusals() -> None:
    """Answers without a chain, for another key, from another CA, naming no SPIFFE ID, or
    already expired are refused with the reason."""
    anchor, _, issuer, issuer_key = _ca(NOW - timedelta(hours=1))
    other_anchor, *_ = _ca(NOW - timedelta(hours=1))
    key = pki.new_key()

    def leaf(**kw: object) -> x509.Certificate:
        args: dict[str, object] = {"now": NOW, "uri": "spiffe://example.org/ns/a/sa/b"}
        args.update(kw)
        return pki.issue_leaf(key.public_key(), issuer, issuer_key, **args)  # type: ignore

    cases: list[tuple[object, list[x509.Certificate], float, str]] = [
        ({}, [anchor], T, "no certificate chain"),
        ({"chain": "junk"}, [anchor], T, "no certificate found"),
        (_answer(pki.issue_leaf(pki.new_key().public_key(), issuer, issuer_key, now=NOW,
                                uri="spiffe://example.org/ns/a/sa/b"), issuer),
         [anchor], T, "not for our key"),
        (_answer(leaf(), issuer), [other_anchor], T, "not issued by any trust anchor"),
        (_answer(leaf(uri=None, dns=["x.example.org"]), issuer), [anchor], T,
         "names 0 SPIFFE IDs"),
        (_answer(leaf(uri="spiffe://example.org/web"), issuer), [anchor], T,
         "the path must be /ns/NAMESPACE/sa/ACCOUNT"),
        (_answer(leaf(lifetime=timedelta(seconds=30)), issuer), [anchor], T + 31, "expired"),
    ]
    for payload, anchors, now, fragment in cases:
        with pytest.raises(local.AnswerError) as err:
            local.parse_answer(payload, key, anchors, now)
        assert fragment in str(err.value), (fragment, str(err.value))


def _creds(received: float, not_after: float) -> local.Credentials:
    return local.Credentials("spiffe://d/ns/a/sa/b", (), pki.new_key(), received, not_after, ())


@pytest.mark.parametrize("received, not_after, now, delay", [
    (1000.0, 1100.0, 1000.0, 70.0),
    (1000.0, 1100.0, 1050.0, 20.0),
    (1000.0, 1100.0, 1080.0, 0.0),
    (1000.0, 1000.0 + 86400, 1000.0, 0.7 * 86400),
])
def test_renewal_delay(received: float, not_after: float, now: float, delay: float) -> None:
    """Renewal is due at 70% of the life the certificate had when it arrived."""
    assert local.renewal_delay(_creds(received, not_after), now) == pytest.approx(delay)


@pytest.mark.parametrize("backoff, held, now, delay", [
    (8.0, None, 0.0, 8.0),
    (8.0, (0.0, 100.0), 50.0, 8.0),
    (8.0, (0.0, 100.0), 96.0, 2.0),
    (8.0, (0.0, 100.0), 99.9, 0.5),
    (8.0, (0.0, 100.0), 150.0, 0.5),
])
def test_retry_delay(backoff: float, held: tuple[float, float] | None, now: float,
                     delay: float) -> None:
    """Retries wait the backoff, but at most half the remaining life (floor 0.5 s)."""
    creds = _creds(*held) if held else None
    assert local.retry_delay(backoff, 0.5, now, creds) == pytest.approx(delay)


@given(st.floats(0, 1e6), st.floats(1, 1e6), st.floats(0, 2e6))
def test_renewal_before_expiry(received: float, life: float, now: float) -> None:
    """Whenever renewal is scheduled, it is due no later than 70% of the way to expiry and
    never in the past."""
    creds = _creds(received, received + life)
    delay = local.renewal_delay(creds, now)
    assert delay >= 0
    assert now + delay <= max(now, received + 0.7 * life) + 1e-6


@given(st.floats(0.01, 60), st.floats(0, 1e5), st.floats(1, 1e5), st.floats(0.001, 1))
def test_retry_never_sleeps_past_half_life(backoff: float, now: float, left: float,
                                           floor: float) -> None:
    """A retry never waits longer than the backoff, nor than half the remaining life when
    that is above the floor."""
    creds = _creds(now - 1, now + left)
    delay = local.retry_delay(backoff, floor, now, creds)
    assert delay <= backoff
    assert delay <= max(floor, left / 2) + 1e-9 * (now + left)  # float rounding only
