"""Trust anchor and issuer tooling, and the identity service (see docs/architecture.md).

Empty until the mutual-TLS work lands; the package exists because the layout is fixed.
"""
