"""Pure text helpers for the restore-based (nft) backend: read a saved nat table, write
the ``iptables-restore --noflush`` transaction that installs or removes our rules.

``--noflush`` keeps every rule we did not name; declaring ``:CHAIN - [0:0]`` creates our
chain or flushes it, so re-running install rewrites our chains in place. Hook rules are
matched by their ``appliance/`` comment: an identical hook is kept where it is (so a
second install changes nothing), a different or duplicated one is deleted and re-added.
The whole transaction is applied atomically by iptables-nft-restore.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from init.plan import COMMENT_PREFIX, INBOUND_CHAIN, OUTBOUND_CHAIN, FamilyPlan

OUR_CHAINS = (INBOUND_CHAIN, OUTBOUND_CHAIN)
_OURS = re.compile(r'--comment "?' + re.escape(COMMENT_PREFIX))


@dataclass(frozen=True, kw_only=True)
class SavedNat:
    """The nat section of ``iptables-save`` output: chain names and ``-A`` lines."""

    chains: tuple[str, ...]
    rules: tuple[str, ...]

    def ours_in(self, chain: str) -> list[str]:
        """Rules in ``chain`` that carry our comment."""
        return [r for r in self.rules if r.split()[1] == chain and _OURS.search(r)]

    def hooks(self) -> list[str]:
        """Our rules outside our own chains: the hooks an uninstall must delete."""
        return [r for r in self.rules if r.split()[1] not in OUR_CHAINS and _OURS.search(r)]


def parse_save(text: str) -> SavedNat:
    """Read the ``*nat`` table from iptables-save text (other tables are ignored)."""
    chains: list[str] = []
    rules: list[str] = []
    in_nat = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            in_nat = line == "*nat"
        elif not in_nat or line.startswith("#"):
            continue
        elif line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            rules.append(line)
    return SavedNat(chains=tuple(chains), rules=tuple(rules))


def count_rules(text: str) -> int:
    """Rules in every table of an iptables-save dump (for backend auto-detection)."""
    return sum(1 for line in text.splitlines() if line.startswith("-A "))


def _delete(line: str) -> str:
    return "-D " + line[len("-A "):]


def install_text(fp: FamilyPlan, saved: SavedNat) -> str:
    """One transaction: (re)write our chains, add missing hooks, fix stale ones."""
    lines = ["*nat", *(f":{c.name} - [0:0]" for c in fp.chains)]
    lines += [r.line() for c in fp.chains for r in c.rules]
    for hook in fp.hooks:
        existing = saved.ours_in(hook.chain)
        if existing == [hook.line()]:
            continue
        lines += [_delete(r) for r in existing]
        lines.append(hook.line())
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def uninstall_text(saved: SavedNat) -> str | None:
    """One transaction deleting our hooks and chains; ``None`` when nothing is ours."""
    lines = [_delete(r) for r in saved.hooks()]
    for chain in OUR_CHAINS:
        if chain in saved.chains:
            lines += [f"-F {chain}", f"-X {chain}"]
    if not lines:
        return None
    return "\n".join(["*nat", *lines, "COMMIT"]) + "\n"
