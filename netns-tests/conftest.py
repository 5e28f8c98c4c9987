"""Fixtures for root-only tests that build hosts in network namespaces.

Every test here is skipped cleanly (not failed) when not run as root or when ``ip``,
``setpriv`` or ``ss`` is missing. ``network`` is a factory: ``network("client", "server")``
returns an ``init.netns.Network`` that is closed after the test, pass or fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from init.netns import Network, reap_stale

PREFIX = "nt"  # namespaces are named nt-<pid>-<random>-<host>
_HERE = Path(__file__).parent


def skip_reason() -> str | None:
    """Why netns-tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "netns-tests need root (network namespaces, iptables)"
    missing = [t for t in ("ip", "setpriv", "ss") if shutil.which(t) is None]
    return f"missing tools: {', '.join(missing)}" if missing else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = skip_reason()
    if reason is None:
        return
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def root_required() -> None:
    """Skip the test unless it can build namespaces."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _no_stale_namespaces() -> Iterator[None]:
    """Remove leftovers of killed runs first; after the run, none of ours may remain."""
    if skip_reason() is None:
        reap_stale(PREFIX)
    yield
    if skip_reason() is None:
        ours = f"{PREFIX}-{os.getpid()}-"
        left = [n for n in _netns_names() if n.startswith(ours)]
        assert not left, f"namespaces left behind: {left}"


def _netns_names() -> list[str]:
    run_dir = Path("/run/netns")
    return sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []


@pytest.fixture
def network(root_required: None) -> Iterator[Callable[..., Network]]:
    """Factory: ``network(*hosts, subnet="198.18.0.0/24")``; all closed at teardown."""
    made: list[Network] = []

    def make(*hosts: str, subnet: str = "198.18.0.0/24") -> Network:
        net = Network(PREFIX, list(hosts), subnet=subnet)
        made.append(net)
        return net

    yield make
    errors: list[Exception] = []
    for net in reversed(made):
        try:
            net.close()
        except Exception as exc:  # close the others first, then report
            errors.append(exc)
    if errors:
        raise errors[0]
