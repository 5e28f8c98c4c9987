"""The legacy backend: python-iptables (libiptc) on the legacy x_tables nat table.

Rules written here are what ``iptables-legacy-save`` shows; the nft tables are untouched.
Each install or uninstall is one libiptc transaction per family: the table handle is taken
with autocommit off, changed, then committed once, so a failure leaves the table as it was.
python-iptables is imported lazily, because importing it already needs libxtables: a host
without it gets a clean "backend cannot load" error (exit 4), not a traceback.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from init.errors import BackendUnavailable, InitError, from_backend_message
from init.plan import COMMENT_PREFIX, Family, FamilyPlan, Rule
from init.restore import OUR_CHAINS


def load_iptc() -> ModuleType:
    """Import python-iptables, turning a missing libxtables/libiptc into exit code 4."""
    try:
        import iptc
    except Exception as exc:  # XTablesError, OSError from ctypes, ImportError
        raise BackendUnavailable(
            f"legacy backend: python-iptables cannot load ({exc}); "
            "install the iptables package or use --iptables-mode nft"
        ) from None
    return iptc


class LegacyBackend:
    """Install and remove our nat rules through python-iptables."""

    name = "legacy"

    def __init__(self) -> None:
        self._iptc = load_iptc()

    def install(self, fp: FamilyPlan) -> None:
        self._transaction(fp.family, lambda table: self._install(table, fp))

    def uninstall(self, family: Family) -> bool:
        return bool(self._transaction(family, self._uninstall))

    def _transaction(self, family: Family, change: Any) -> Any:
        """Run ``change(table)`` on a fresh nat handle and commit it once."""
        iptc = self._iptc
        try:
            table = (iptc.Table(iptc.Table.NAT) if family == "ipv4"
                     else iptc.Table6(iptc.Table6.NAT))
            table.autocommit = False
            table.refresh()  # the handle is cached per process: read the current state
            result = change(table)
            table.commit()
            table.refresh()
            return result
        except InitError:
            raise
        except (iptc.IPTCError, iptc.XTablesError) as exc:
            raise from_backend_message(f"legacy {family}: {exc}") from None

    def _install(self, table: Any, fp: FamilyPlan) -> None:
        iptc = self._iptc
        for chain in fp.chains:
            if table.is_chain(chain.name):
                iptc.Chain(table, chain.name).flush()
            else:
                table.create_chain(chain.name)
            target = iptc.Chain(table, chain.name)
            for rule in chain.rules:
                target.append_rule(self._rule(rule, fp.family))
        for hook in fp.hooks:
            self._ensure_hook(table, hook, fp.family)

    def _ensure_hook(self, table: Any, hook: Rule, family: Family) -> None:
        """Keep one identical hook where it is; otherwise replace ours with a fresh one."""
        chain = self._iptc.Chain(table, hook.chain)
        wanted = self._rule(hook, family)
        existing = [r for r in chain.rules if _is_ours(r)]
        if len(existing) == 1 and existing[0] == wanted:
            return
        for rule in existing:
            chain.delete_rule(rule)
        chain.append_rule(wanted)

    def _uninstall(self, table: Any) -> bool:
        iptc = self._iptc
        changed = False
        for chain in table.chains:
            if chain.name in OUR_CHAINS:
                continue
            for rule in [r for r in chain.rules if _is_ours(r)]:
                chain.delete_rule(rule)
                changed = True
        for name in OUR_CHAINS:
            if table.is_chain(name):
                iptc.Chain(table, name).flush()
                table.delete_chain(name)
                changed = True
        return changed

    def _rule(self, rule: Rule, family: Family) -> Any:
        """Our plan's rule as a python-iptables Rule (Rule6 for ipv6)."""
        out = self._iptc.Rule() if family == "ipv4" else self._iptc.Rule6()
        if rule.protocol is not None:
            out.protocol = rule.protocol
        if rule.source is not None:
            out.src = str(rule.source)
        if rule.destination is not None:
            out.dst = str(rule.destination)
        if rule.out_interface is not None:
            out.out_interface = rule.out_interface
        for match in rule.matches:
            m = out.create_match(match.module)
            for opt, value in match.options:
                setattr(m, opt.replace("-", "_"), value)
        target = out.create_target(rule.target)
        for opt, value in rule.target_options:
            setattr(target, opt.replace("-", "_"), value)
        return out


def _is_ours(rule: Any) -> bool:
    return any(m.name == "comment" and str(m.comment).startswith(COMMENT_PREFIX)
               for m in rule.matches)
