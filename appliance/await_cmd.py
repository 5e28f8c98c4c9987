"""``appliance await [--timeout S] [--shutdown] -- CMD ...``: run an app once its proxy is
ready, and optionally stop the proxy when the app exits.

For containers whose app must not start before the sidecar can carry its traffic, and for
Jobs whose pod only completes when the sidecar exits too. It polls ``/ready`` on the admin
port (``--admin`` HOST:PORT, default ``127.0.0.1:4191``); after the app exits, ``--shutdown``
sends ``POST /shutdown`` there. The exit code is the app's (or 1 if the proxy never became
ready within ``--timeout``, 127 if the command cannot be run).
"""

from __future__ import annotations

import argparse
import http.client
import subprocess
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("await", help="run a command once the proxy is ready")
    p.add_argument("--admin", default="127.0.0.1:4191", metavar="HOST:PORT",
                   help="the proxy's admin address (default 127.0.0.1:4191)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="how long to wait for /ready (default 120)")
    p.add_argument("--shutdown", action="store_true",
                   help="POST /shutdown to the proxy when the command exits")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    p.set_defaults(func=run)


def _request(admin: str, method: str, path: str) -> int:
    host, _, port = admin.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=2)
    try:
        conn.request(method, path)
        return conn.getresponse().status
    finally:
        conn.close()


def wait_ready(admin: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _request(admin, "GET", "/ready") == 200:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("appliance await: no command given (appliance await -- CMD ...)",
              file=sys.stderr)
        return 2
    if not wait_ready(args.admin, args.timeout):
        print(f"appliance await: the proxy at {args.admin} was not ready within "
              f"{args.timeout:g}s", file=sys.stderr)
        return 1
    try:
        code = subprocess.call(command)
    except OSError as exc:
        print(f"appliance await: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        code = 127
    if args.shutdown:
        try:
            _request(args.admin, "POST", "/shutdown")
        except OSError as exc:
            print(f"appliance await: could not stop the proxy: {exc}", file=sys.stderr)
    return code
