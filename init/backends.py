"""Choosing and loading a backend, and checking privileges before touching anything.

Backend choice for ``--iptables-mode auto`` (the same rule as Kubernetes' iptables-wrapper):
count the rules each backend already holds in this network namespace, over every table and
both families (``iptables-legacy-save``/``ip6tables-legacy-save`` against
``iptables-nft-save``/``ip6tables-nft-save``), and use the backend with more rules, because
mixing the two on one host makes rule order unpredictable. On a tie (typically a fresh
namespace with no rules at all) prefer nft when ``iptables-nft-restore`` is on PATH, else
legacy. Native nftables tables that iptables-nft does not manage are not counted.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Literal, Protocol

from init import nft
from init.errors import BackendUnavailable, NoPermission
from init.plan import Family, FamilyPlan
from init.restore import count_rules

Mode = Literal["legacy", "nft", "auto"]
Choice = Literal["legacy", "nft"]
MODES: tuple[Mode, ...] = ("legacy", "nft", "auto")

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
_LEGACY_SAVE = ("iptables-legacy-save", "ip6tables-legacy-save")
_LEGACY_TABLE_LISTS = ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names")


class Backend(Protocol):
    name: str

    def install(self, fp: FamilyPlan) -> None: ...

    def uninstall(self, family: Family) -> bool: ...


def effective_caps(status_text: str) -> int:
    """The CapEff bitmask from the text of /proc/self/status (0 when absent)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges(choice: Mode, status_text: str | None = None) -> None:
    """Fail early (exit 3) without CAP_NET_ADMIN, or CAP_NET_RAW for legacy/auto.

    libiptc opens a raw socket, hence NET_RAW; nf_tables needs only NET_ADMIN.
    """
    if status_text is None:
        status_text = Path("/proc/self/status").read_text()
    caps = effective_caps(status_text)
    needed = [("CAP_NET_ADMIN", CAP_NET_ADMIN)]
    if choice != "nft":
        needed.append(("CAP_NET_RAW", CAP_NET_RAW))
    missing = [name for name, bit in needed if not caps & (1 << bit)]
    if missing:
        raise NoPermission(f"missing {' and '.join(missing)}: run as root, or grant "
                           "NET_ADMIN and NET_RAW (Kubernetes: securityContext.capabilities)")


def choose(legacy_rules: int, nft_rules: int, nft_available: bool) -> Choice:
    """The auto rule: the backend already in use wins; on a tie nft if installed."""
    if legacy_rules != nft_rules:
        return "legacy" if legacy_rules > nft_rules else "nft"
    return "nft" if nft_available else "legacy"


def _saved_rules(tool: str) -> int:
    """Rules shown by one *-save tool, 0 when it is missing or fails."""
    if shutil.which(tool) is None:
        return 0
    done = subprocess.run([tool], capture_output=True, text=True, timeout=30, check=False)
    return count_rules(done.stdout) if done.returncode == 0 else 0


def legacy_rule_count() -> int:
    """Legacy rules in this namespace; no loaded legacy table means none (and we do not
    load one just by looking: *-legacy-save only reads tables the kernel already has)."""
    loaded = any(Path(p).exists() and Path(p).read_text().strip() for p in _LEGACY_TABLE_LISTS)
    return sum(_saved_rules(tool) for tool in _LEGACY_SAVE) if loaded else 0


def nft_rule_count() -> int:
    return sum(_saved_rules(save) for save, _ in nft.TOOLS.values())


def resolve(mode: Mode) -> tuple[Choice, str]:
    """The concrete backend for ``mode`` and a short reason for the log line."""
    if mode != "auto":
        return mode, "requested"
    legacy_n, nft_n = legacy_rule_count(), nft_rule_count()
    choice = choose(legacy_n, nft_n, nft.available())
    return choice, f"auto: {legacy_n} legacy rules, {nft_n} nft rules"


def load(choice: Choice) -> Backend:
    """Instantiate a backend; raises BackendUnavailable (exit 4) when it cannot load."""
    if choice == "nft":
        return nft.NftBackend()
    if choice == "legacy":
        from init.legacy import LegacyBackend

        return LegacyBackend()
    raise BackendUnavailable(f"unknown backend {choice!r}")
