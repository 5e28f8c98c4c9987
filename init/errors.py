"""One error vocabulary for ``appliance init``; each error carries its exit code.

Exit codes (also in docs/init.md): 0 success, 1 the rules could not be applied for another
reason, 2 bad arguments, 3 missing privileges (CAP_NET_ADMIN / CAP_NET_RAW, permission
denied), 4 the chosen backend cannot load (python-iptables without libxtables, a missing
iptables-nft binary, a kernel without the nat table).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PERMISSION = 3
EXIT_BACKEND = 4

# Substrings that libiptc, libnftnl and the iptables binaries use for EPERM/EACCES.
_PERMISSION_WORDS = ("Permission denied", "Operation not permitted", "you must be root")


class InitError(Exception):
    """Base class: ``str(exc)`` is the one-line message, ``exit_code`` the process status."""

    exit_code = EXIT_FAILED


class ApplyError(InitError):
    """The backend loaded but refused the rules."""


class NoPermission(InitError):
    exit_code = EXIT_PERMISSION


class BackendUnavailable(InitError):
    exit_code = EXIT_BACKEND


def from_backend_message(message: str) -> InitError:
    """Classify a backend's error text: permission problems get their own exit code."""
    line = " ".join(message.split())  # one line, whatever the backend printed
    if any(word in line for word in _PERMISSION_WORDS):
        return NoPermission(f"permission denied: {line} (needs CAP_NET_ADMIN and "
                                "CAP_NET_RAW in this network namespace)")
    if "Table does not exist" in line or "do you need to insmod" in line:
        return BackendUnavailable(f"nat table not available: {line}")
    if "can't find match" in line or "can't find target" in line:
        return BackendUnavailable(f"xtables extension not loadable: {line} (is the "
                                  "iptables package installed? is XTABLES_LIBDIR right?)")
    return ApplyError(line)
