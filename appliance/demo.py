"""``appliance demo``: the mesh on hosts in network namespaces (filled in below)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run a demo mesh in network namespaces (root)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("appliance demo: not available yet")
