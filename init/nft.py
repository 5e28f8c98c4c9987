"""The nft backend: the iptables-nft binaries (xtables over nf_tables).

Rules written here are what ``iptables-nft-save`` (and ``nft list ruleset``) show. Each
install or uninstall reads the nat table with ``iptables-nft-save -t nat`` and applies one
atomic ``iptables-nft-restore --noflush`` transaction built by ``init.restore``.
"""

from __future__ import annotations

import shutil
import subprocess

from init.errors import BackendUnavailable, from_backend_message
from init.plan import Family, FamilyPlan
from init.restore import install_text, parse_save, uninstall_text

TOOLS: dict[Family, tuple[str, str]] = {
    "ipv4": ("iptables-nft-save", "iptables-nft-restore"),
    "ipv6": ("ip6tables-nft-save", "ip6tables-nft-restore"),
}
_TIMEOUT = 30.0  # seconds; restore of a handful of rules takes milliseconds


def available() -> bool:
    """Whether the nft binaries for IPv4 are on PATH."""
    return all(shutil.which(tool) for tool in TOOLS["ipv4"])


def run_tool(argv: list[str], stdin: str | None = None) -> str:
    """Run one iptables binary; map a missing binary and its failures to InitErrors."""
    if shutil.which(argv[0]) is None:
        raise BackendUnavailable(
            f"nft backend: {argv[0]} not found on PATH; install the iptables package "
            "or use --iptables-mode legacy"
        )
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise from_backend_message(f"{argv[0]}: no answer within {_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        detail = done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}"
        raise from_backend_message(f"{argv[0]}: {detail}")
    return done.stdout


class NftBackend:
    """Install and remove our nat rules with iptables-nft-save/-restore."""

    name = "nft"

    def __init__(self) -> None:
        for tool in TOOLS["ipv4"]:
            if shutil.which(tool) is None:
                raise BackendUnavailable(
                    f"nft backend: {tool} not found on PATH; install the iptables package "
                    "or use --iptables-mode legacy"
                )

    def install(self, fp: FamilyPlan) -> None:
        save, restore = TOOLS[fp.family]
        saved = parse_save(run_tool([save, "-t", "nat"]))
        run_tool([restore, "--noflush"], install_text(fp, saved))

    def uninstall(self, family: Family) -> bool:
        save, restore = TOOLS[family]
        text = uninstall_text(parse_save(run_tool([save, "-t", "nat"])))
        if text is None:
            return False
        run_tool([restore, "--noflush"], text)
        return True
