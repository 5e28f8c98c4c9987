"""The proxy's workload identity: in-memory key, CSR, renewal, mesh SSL contexts.

Use :class:`IdentityManager` (``from_environ`` reads the three fixed variables), its
``server_context``/``client_context`` and ``ready``; ``meshed.lookup(ip)`` says which
identity to expect at a destination. docs/identity.md describes the whole flow.
"""

from __future__ import annotations

from appliance.identity.client import IdentityServiceError, MeshedPeer
from appliance.identity.manager import Contexts, IdentityManager, TokenError
from appliance.identity.meshed import MISSING, MeshedLookup, MeshedLookupError
from appliance.identity.settings import IdentityConfigError, IdentitySettings
from appliance.identity.tls import (
    MESH_ALPN,
    PeerIdentityError,
    check_peer_identity,
    peer_identity,
)

__all__ = [
    "MESH_ALPN",
    "MISSING",
    "Contexts",
    "IdentityConfigError",
    "IdentityManager",
    "IdentityServiceError",
    "IdentitySettings",
    "MeshedLookup",
    "MeshedLookupError",
    "MeshedPeer",
    "PeerIdentityError",
    "TokenError",
    "check_peer_identity",
    "peer_identity",
]
