#!/usr/bin/env python3
"""Ask the proxy's admin server for a path; exit 0 on HTTP 200, 1 otherwise.

Installed in the image as ``/opt/appliance/bin/appliance-probe``. The image's HEALTHCHECK
runs ``appliance-probe /live``; the injected sidecar's postStart hook runs
``appliance-probe /ready --wait 120`` so that Kubernetes starts the app containers only
once the proxy is ready. Standard library only, so it also runs in a bare base image.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request


def probe(url: str, timeout: float) -> tuple[bool, str]:
    """One GET; (True, "200") when the admin server answered 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback)
            return resp.status == 200, str(resp.status)
    except urllib.error.HTTPError as exc:
        return False, str(exc.code)
    except (OSError, ValueError) as exc:
        return False, str(exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance-probe", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="/live", help="admin path (/live)")
    parser.add_argument("--port", type=int, default=4191, help="admin port (4191)")
    parser.add_argument("--host", default="127.0.0.1", help="admin address (127.0.0.1)")
    parser.add_argument("--timeout", type=float, default=2.0, help="per request, seconds (2)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="retry until 200 or this many seconds have passed (0: once)")
    args = parser.parse_args(argv)
    url = f"http://{args.host}:{args.port}{args.path}"
    deadline = time.monotonic() + args.wait
    while True:
        ok, detail = probe(url, args.timeout)
        if ok:
            return 0
        if time.monotonic() >= deadline:
            print(f"appliance-probe: {url}: {detail}", file=sys.stderr)
            return 1
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
