#!/usr/bin/env python3
"""Check a built appliance image without ``podman run`` (which needs cgroups).

Usage (root): ``python3 init/image/check.py IMAGE [--json]``. Exit 0 when every check passed.

Theory of operation. The outer process reads the image config (``podman image inspect``)
and mounts the image's root filesystem (``podman image mount``). It then re-runs itself
under ``unshare --mount --net --pid --fork``: the inner process is PID 1 of a new PID
namespace in a new, empty network namespace, so whatever it starts dies with it, the
fixed ports 4140/4143/4191 collide with nothing, and the iptables rules it installs vanish
with the namespace. Inside, the image root is bind-mounted **read-only**, with /proc, /dev,
and a tmpfs on /run only (the emptyDir the injected init container gets for the xtables
lock); every command runs under ``chroot`` with the image's own environment and user.
The checks: ``appliance --version``, ``appliance init --dry-run``, a real ``appliance init``
(legacy and nft backends) and ``--uninstall``, ``pip check``, then the proxy as UID 2102
forwarding a request to a small HTTP server, its readiness seen through the image's own
health-check command. Each check is a line of the report (or one JSON object with --json).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

PROBE = "/opt/appliance/bin/appliance-probe"
BACKEND_BODY = b"hello from the backend behind the image's proxy\n"


@dataclass
class Check:
    """One named check and what it showed."""

    name: str
    ok: bool
    detail: str


def inspect(image: str) -> dict[str, object]:
    """The image's config section (User, Env, Entrypoint, Healthcheck, ...)."""
    out = subprocess.run(["podman", "image", "inspect", image], check=True,
                         capture_output=True, text=True).stdout
    data = json.loads(out)[0]
    config = dict(data.get("Config") or {})
    # Docker-format images keep the health check in ContainerConfig/Config or at top level.
    config.setdefault("Healthcheck", data.get("HealthCheck") or data.get("Healthcheck"))
    return config


def config_checks(config: dict[str, object]) -> list[Check]:
    """Static facts of the image config."""
    health = config.get("Healthcheck") or {}
    test = health.get("Test", []) if isinstance(health, dict) else []
    return [
        Check("user", config.get("User") == "2102:2102", f"User={config.get('User')!r}"),
        Check("entrypoint", config.get("Entrypoint") == ["appliance"],
              f"Entrypoint={config.get('Entrypoint')!r} Cmd={config.get('Cmd')!r}"),
        Check("healthcheck", PROBE in " ".join(map(str, test)), f"Test={test!r}"),
    ]


class Chroot:
    """Runs commands in the read-only image root with the image's environment."""

    def __init__(self, root: str, env: Sequence[str]) -> None:
        self.root = root
        self.env = list(env)

    def argv(self, cmd: Sequence[str], user: str | None = None) -> list[str]:
        spec = [f"--userspec={user}"] if user else []
        return ["env", "-i", *self.env, "chroot", *spec, self.root, *cmd]

    def run(self, cmd: Sequence[str], user: str | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(cmd, user), capture_output=True, text=True,
                              timeout=timeout)


def prepare_root(image_root: str) -> str:
    """Read-only bind of the image root, with /proc, /dev and a tmpfs /run (inner half)."""
    ro = tempfile.mkdtemp(prefix="appliance-ro-")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "--bind", image_root, ro], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", ro], check=True)
    subprocess.run(["mount", "-t", "proc", "proc", f"{ro}/proc"], check=True)
    subprocess.run(["mount", "--rbind", "/dev", f"{ro}/dev"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", f"{ro}/run"],
                   check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    return ro


def expect(name: str, done: subprocess.CompletedProcess[str], *needles: str) -> Check:
    """Exit 0 and every needle in stdout+stderr."""
    text = done.stdout + done.stderr
    missing = [n for n in needles if n not in text]
    ok = done.returncode == 0 and not missing
    detail = text.strip()[-600:] if not ok else text.strip().splitlines()[0] if text.strip() \
        else "ok"
    if missing:
        detail = f"missing {missing!r}; exit {done.returncode}: {detail}"
    return Check(name, ok, detail)


def init_checks(box: Chroot) -> list[Check]:
    checks = [
        expect("version", box.run(["appliance", "--version"]), "appliance "),
        expect("init-dry-run", box.run(["appliance", "init", "--dry-run"]),
               "APPLIANCE_OUTBOUND", "--uid-owner 2102", "--to-ports 4140"),
        expect("pip-check", box.run(["python3", "-m", "pip", "check"]), "No broken"),
    ]
    for mode, lister in (("legacy", "iptables-legacy"), ("nft", "iptables-nft")):
        installed = box.run(["appliance", "init", "--iptables-mode", mode, "--no-ipv6"])
        listed = box.run([lister, "-t", "nat", "-S"])
        removed = box.run(["appliance", "init", "--iptables-mode", mode, "--uninstall"])
        after = box.run([lister, "-t", "nat", "-S"])
        ok = (installed.returncode == 0 and "APPLIANCE_OUTBOUND" in listed.stdout
              and removed.returncode == 0 and "APPLIANCE" not in after.stdout)
        checks.append(Check(f"init-{mode}", ok, (installed.stderr + removed.stderr).strip()
                            if ok else f"{installed.stderr}{listed.stdout}{removed.stderr}"
                                       f"{after.stdout}"[-800:]))
    return checks


def backend() -> tuple[http.server.ThreadingHTTPServer, int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(BACKEND_BODY)))
            self.end_headers()
            self.wfile.write(BACKEND_BODY)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def proxy_checks(box: Chroot) -> list[Check]:
    """The proxy as 2102, read-only root, forwarding to a backend in this namespace."""
    server, port = backend()
    proc = subprocess.Popen(box.argv(["appliance", "proxy", "--set",
                                      f"outbound.orig_dst_override=127.0.0.1:{port}"],
                                     user="2102:2102"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = box.run([PROBE, "/ready", "--wait", "20"], user="2102:2102", timeout=30)
        checks = [expect("proxy-ready", ready)]
        live = box.run([PROBE, "/live"], user="2102:2102")
        checks.append(expect("healthcheck-live", live))
        body = b""
        if ready.returncode == 0:
            body = subprocess.run(["curl", "-sS", "--max-time", "10",
                                   "http://127.0.0.1:4140/smoke"],
                                  capture_output=True, timeout=15).stdout
        checks.append(Check("proxy-forward", body == BACKEND_BODY, repr(body[:200])))
        checks.append(uid_check(Path(box.root, "proc"), proc.pid))
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        server.shutdown()
    checks.append(Check("proxy-exit", proc.returncode == 0,
                        f"exit {proc.returncode}: {out.strip()[-600:]}"))
    return checks


def uid_check(proc_dir: Path, pid: int) -> Check:
    """The proxy (chroot execs it, so same pid) runs as 2102 with no capabilities.

    ``proc_dir`` is the /proc of our PID namespace (mounted inside the image root)."""
    deadline = time.monotonic() + 5
    status = ""
    while time.monotonic() < deadline:
        try:
            status = (proc_dir / str(pid) / "status").read_text()
        except OSError as exc:
            return Check("proxy-uid", False, str(exc))
        if "\nUid:\t2102\t" in status:  # env and chroot have exec'd the proxy
            break
        time.sleep(0.05)
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uid = fields.get("Uid", "").split()
    eff = fields.get("CapEff", "").strip()
    ok = uid[:2] == ["2102", "2102"] and int(eff or "1", 16) == 0
    return Check("proxy-uid", ok, f"Uid={uid} CapEff={eff}")


def inner(root: str, env: Sequence[str]) -> list[Check]:
    box = Chroot(prepare_root(root), env)
    writable = box.run(["touch", "/opt/appliance/x"])
    checks = [Check("read-only-root", writable.returncode != 0 and "Read-only" in
                    writable.stderr, writable.stderr.strip())]
    return checks + init_checks(box) + proxy_checks(box)


def report(checks: Sequence[Check], as_json: bool) -> int:
    ok = all(c.ok for c in checks)
    if as_json:
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}))
    else:
        for c in checks:
            print(f"{'PASS' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--inside", metavar="ROOT", help=argparse.SUPPRESS)
    parser.add_argument("--env", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        return report(inner(args.inside, args.env), as_json=True)
    if not args.image:
        parser.error("IMAGE is required")
    for tool in ("podman", "unshare", "chroot", "curl", "ip"):
        if shutil.which(tool) is None:
            print(f"check: {tool} not found", file=sys.stderr)
            return 4
    config = inspect(args.image)
    env = [str(e) for e in config.get("Env") or []]  # type: ignore[union-attr, attr-defined]
    root = subprocess.run(["podman", "image", "mount", args.image], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        inner_argv = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child",
                      sys.executable, os.path.abspath(__file__), "--inside", root]
        for item in env:
            inner_argv += ["--env", item]
        done = subprocess.run(inner_argv, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["podman", "image", "unmount", args.image], capture_output=True)
    try:
        inside = [Check(**c) for c in json.loads(done.stdout)["checks"]]
    except (ValueError, KeyError):
        inside = [Check("inside", False, f"exit {done.returncode}: "
                                         f"{(done.stdout + done.stderr)[-1500:]}")]
    return report(config_checks(config) + inside, args.json)


if __name__ == "__main__":
    sys.exit(main())
