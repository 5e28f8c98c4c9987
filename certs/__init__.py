"""Trust anchor and issuer tooling, and the identity service (docs/identity.md).

``cli`` holds ``appliance certs init|inspect|rotate-issuer`` and ``appliance identity``;
``pki``/``store`` make and keep the certificates; ``identity_service`` signs workload CSRs
(rules in ``signing``, authentication in ``auth``/``tokens``/``tokenreview``) and answers
which addresses are meshed (``meshed``). ``http11``, ``sslctx`` and ``spiffe`` are shared with
the proxy's identity client (appliance/identity).
"""
