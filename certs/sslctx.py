"""Load an in-memory certificate chain and key into an ``ssl.SSLContext``.

Theory of operation. ``SSLContext.load_cert_chain`` only reads files, and the proxy's key
must never be written to disk. On Linux the chain and the key go into an anonymous
``memfd`` (RAM-backed, no name in any filesystem, closed on exec), which OpenSSL opens
through ``/proc/self/fd/N``; the descriptor is closed as soon as the context has loaded it.
Where ``memfd_create`` does not exist, a file in a fresh 0700 directory (mode 0600) is used
and removed right after loading. Either way the key is first encrypted (PKCS#8, AES-256)
with a random one-time password handed to OpenSSL in memory, so even that short-lived copy
is useless to a reader.

Reloading into the same context is allowed: connections accepted afterwards present the new
certificate, established ones keep the old one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import tempfile
from collections.abc import Iterable

from cryptography import x509

from certs import pki


def load_chain(ctx: ssl.SSLContext, chain: Iterable[x509.Certificate], key: pki.Key) -> None:
    """Make ``ctx`` present ``chain`` (leaf first) with ``key``."""
    password = secrets.token_bytes(32)
    data = pki.chain_pem(chain) + pki.key_pem(key, password)
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("appliance-identity", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            ctx.load_cert_chain(f"/proc/self/fd/{fd}", password=password)
        finally:
            os.close(fd)
        return
    directory = tempfile.mkdtemp(prefix="appliance-identity-")  # mode 0700
    try:
        path = os.path.join(directory, "chain.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        ctx.load_cert_chain(path, password=password)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def anchors_pem(anchors: Iterable[x509.Certificate]) -> str:
    """The trust anchors as ``cadata`` for ``load_verify_locations``."""
    return pki.chain_pem(anchors).decode("ascii")
