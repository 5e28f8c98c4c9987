"""``python -m init``: the init step alone, same flags as ``appliance init``.

Useful in a minimal init container that does not need the proxy's imports.
"""

from __future__ import annotations

import argparse

from init import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["init", *(argv if argv is not None else _argv())])
    return int(args.func(args))


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    raise SystemExit(main())
