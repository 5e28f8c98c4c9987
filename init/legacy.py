"""The legacy backend: python-iptables (libiptc) on the legacy x_tables nat table.

Rules written here are what ``iptables-legacy-save`` shows; the nft tables are untouched.
Each install or uninstall is one libiptc transaction per family: the table handle is taken
with autocommit off, changed, then committed once, so a failure leaves that table as it was.

Each transaction runs in a forked child that imports python-iptables itself. Two reasons:
libxtables registers an extension only for the family active when its shared object is
first loaded, so a process that used REDIRECT for IPv4 cannot find it for IPv6 ("can't find
target REDIRECT"); and importing python-iptables already needs libxtables, so a host
without it gets a clean "backend cannot load" error (exit 4) instead of a traceback.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from init.errors import ApplyError, BackendUnavailable, InitError, from_backend_message
from init.plan import COMMENT_PREFIX, Family, FamilyPlan, Rule
from init.restore import OUR_CHAINS

T = TypeVar("T")
_TABLE_LISTS: dict[Family, str] = {"ipv4": "/proc/net/ip_tables_names",
                                   "ipv6": "/proc/net/ip6_tables_names"}


class LegacyBackend:
    """Install and remove our nat rules through python-iptables."""

    name = "legacy"

    def __init__(self) -> None:
        in_child(_probe)

    def install(self, fp: FamilyPlan) -> None:
        in_child(_install, fp)

    def uninstall(self, family: Family) -> bool:
        if not nat_loaded(family):
            return False  # no legacy nat table here, so nothing of ours; do not create one
        return in_child(_uninstall, family)


def nat_loaded(family: Family) -> bool:
    """Whether the kernel already has the legacy nat table in this namespace."""
    try:
        return "nat" in Path(_TABLE_LISTS[family]).read_text().split()
    except OSError:
        return False


def in_child(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a forked child; return its result or re-raise its InitError."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack
        os.close(read_fd)
        code = 0
        try:
            try:
                payload: tuple[bool, Any] = (True, fn(*args))
            except InitError as exc:
                payload = (False, exc)
            except Exception as exc:  # anything else still becomes one line
                payload = (False, ApplyError(f"legacy backend: {exc!r}"))
            with os.fdopen(write_fd, "wb") as out:
                pickle.dump(payload, out)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise ApplyError(f"legacy backend: worker died (wait status {status})")
    ok, value = pickle.loads(data)
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


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


def _probe() -> None:
    load_iptc()


def _transaction(family: Family, change: Callable[[ModuleType, Any], T]) -> T:
    """Run ``change(iptc, table)`` on a fresh nat handle and commit it once."""
    iptc = load_iptc()
    try:
        table = (iptc.Table(iptc.Table.NAT) if family == "ipv4"
                 else iptc.Table6(iptc.Table6.NAT))
        table.autocommit = False
        table.refresh()
        result = change(iptc, table)
        table.commit()
        return result
    except (iptc.IPTCError, iptc.XTablesError) as exc:
        raise from_backend_message(f"legacy {family}: {exc}") from None


def _install(fp: FamilyPlan) -> None:
    def change(iptc: ModuleType, table: Any) -> None:
        for chain in fp.chains:
            if table.is_chain(chain.name):
                iptc.Chain(table, chain.name).flush()
            else:
                table.create_chain(chain.name)
            ours = iptc.Chain(table, chain.name)
            for rule in chain.rules:
                ours.append_rule(_to_iptc(iptc, rule, fp.family))
        for hook in fp.hooks:
            _ensure_hook(iptc, table, hook, fp.family)

    _transaction(fp.family, change)


def _ensure_hook(iptc: ModuleType, table: Any, hook: Rule, family: Family) -> None:
    """Keep one identical hook where it is; otherwise replace ours with a fresh one."""
    chain = iptc.Chain(table, hook.chain)
    wanted = _to_iptc(iptc, hook, family)
    existing = [r for r in chain.rules if _is_ours(r)]
    if len(existing) == 1 and existing[0] == wanted:
        return
    for rule in existing:
        chain.delete_rule(rule)
    chain.append_rule(wanted)


def _uninstall(family: Family) -> bool:
    def change(iptc: ModuleType, table: Any) -> bool:
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

    return _transaction(family, change)


def _to_iptc(iptc: ModuleType, rule: Rule, family: Family) -> Any:
    """Our plan's rule as a python-iptables Rule (Rule6 for ipv6)."""
    out = iptc.Rule() if family == "ipv4" else iptc.Rule6()
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
