"""``appliance demo``: a small mesh on hosts in network namespaces (needs root).

Three hosts on a private bridge in 198.18.0.0/24: ``client``, ``web1`` and ``web2``. In each,
``appliance init`` installs the redirect rules and ``appliance proxy`` runs as UID 2102, as a
sidecar would. Unmodified programs then talk: ``curl`` to ``python3 -m http.server`` on both
web hosts, ``curl --http2-prior-knowledge`` to nghttpd on web2 (when nghttpd is installed),
and a plain TCP client to an echo server on web2. A fourth host runs the identity service
(``appliance certs init`` made its trust anchor); every proxy gets a certificate from it with
nothing but a token, and proxy-to-proxy traffic is mutual TLS. The client's proxy also has a
dtab that
makes ``198.18.0.100:8080`` (an address no host has) a logical service balanced per request
over web1 and web2, and it serves as an explicit proxy for ``http_proxy``. The report shows
what each proxy saw, read from its own /metrics. Everything is removed at the end (or on
Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from typing import Any

HOSTS = ("client", "web1", "web2", "identity")
MESHED = ("client", "web1", "web2")
IDENTITY_PORT = 8090
TRUST_DOMAIN = "demo.mesh"
HTTP_PORT = 8080
ECHO_PORT = 7000
H2_PORT = 8443
SERVICE = "198.18.0.100"  # a logical service: no host has this address


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run a demo mesh in network namespaces (root)",
                       description=__doc__)
    p.add_argument("--requests", type=int, default=20, metavar="N",
                   help="HTTP requests from the client to each web host (default 20)")
    p.add_argument("--iptables-mode", choices=["auto", "legacy", "nft"], default="auto")
    p.add_argument("--keep", action="store_true",
                   help="keep the mesh running until Enter or Ctrl-C, to explore it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("appliance demo: needs root (network namespaces and iptables)", file=sys.stderr)
        return 3
    missing = [t for t in ("ip", "curl", "setpriv", "ss") if shutil.which(t) is None]
    if missing:
        print(f"appliance demo: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 4
    from init.netns import Network

    with Network("apdemo", list(HOSTS)) as net, tempfile.TemporaryDirectory() as tmp:
        return _run(net, args, tmp)


def _run(net: Any, args: argparse.Namespace, tmp: str) -> int:
    from init.mesh import ECHO_SERVER, MeshNode, start_app

    say(f"appliance demo: {len(HOSTS)} hosts in network namespaces on {net.subnet}")
    os.chmod(tmp, 0o755)
    identity_env = _start_identity(net["identity"], tmp)
    nodes = {}
    web = f'["{net["web1"].addr}:{HTTP_PORT}", "{net["web2"].addr}:{HTTP_PORT}"]'
    routing = (f"routing.dtab=/svc/{SERVICE}:{HTTP_PORT} => /#/static/web",
               f"namers=[{{kind: static, services: {{web: {web}}}}}]",
               "balancer.kind=round_robin")
    for name in MESHED:
        node = MeshNode(net[name], iptables_mode=args.iptables_mode)
        node.install_rules()
        node.start_proxy(*(routing if name == "client" else ()), timeout=30,
                         env=identity_env(name))
        nodes[name] = node
    for name in ("web1", "web2"):
        root = os.path.join(tmp, name)
        os.makedirs(root)
        with open(os.path.join(root, "index.html"), "w") as fh:
            fh.write(f"hello from {name}\n")
        start_app(net[name], ["python3", "-m", "http.server", str(HTTP_PORT), "--bind",
                              "0.0.0.0", "--directory", root], HTTP_PORT,
                  stderr=subprocess.DEVNULL)
    start_app(net["web2"], ["python3", "-c", ECHO_SERVER, str(ECHO_PORT)], ECHO_PORT,
              stderr=subprocess.DEVNULL)
    h2 = shutil.which("nghttpd")
    if h2:
        start_app(net["web2"], [h2, "--no-tls", "-d", os.path.join(tmp, "web2"), str(H2_PORT)],
                  H2_PORT, stderr=subprocess.DEVNULL)
    for host in net:
        app = {"client": "curl, a TCP client",
               "web1": f"python3 -m http.server {HTTP_PORT}",
               "web2": f"python3 -m http.server {HTTP_PORT}, TCP echo on {ECHO_PORT}"
                       + (f", nghttpd (h2c) on {H2_PORT}" if h2 else ""),
               "identity": f"appliance identity on {IDENTITY_PORT} (trust domain "
                           f"{TRUST_DOMAIN}), not meshed"}
        say(f"  {host.name:<8} {host.addr:<12} {app[host.name]}")
    say("  client, web1, web2: rules by `appliance init`, `appliance proxy` as UID 2102 with a "
        "token only, apps unchanged")
    say(f"  client proxy: dtab /svc/{SERVICE}:{HTTP_PORT} => /#/static/web "
        "(web1 and web2, round robin)\n")

    ok = _traffic(net, args.requests)
    say("")
    _report(nodes)
    if args.keep:
        _explore(net)
    for node in nodes.values():
        node.stop_proxy()
    return 0 if ok else 1


def _start_identity(host: Any, tmp: str) -> Any:
    """`appliance certs init`, a token per workload, `appliance identity` on its host;
    returns the environment each proxy needs (the three variables, nothing else)."""
    from init.mesh import PROXY_UID

    ca = os.path.join(tmp, "ca")
    subprocess.run([sys.executable, "-m", "appliance", "certs", "init", "--trust-domain",
                    TRUST_DOMAIN, "--dir", ca], check=True, capture_output=True, timeout=60)
    os.chmod(ca, 0o755)
    tokens = {name: f"demo-token-{name}-{os.urandom(8).hex()}" for name in MESHED}
    with open(os.path.join(tmp, "tokens"), "w") as fh:
        fh.writelines(f"{token} default {name}\n" for name, token in tokens.items())
    for name, token in tokens.items():
        path = os.path.join(tmp, f"token-{name}")
        with open(path, "w") as fh:
            fh.write(token + "\n")
        os.chmod(path, 0o600)
        os.chown(path, PROXY_UID, PROXY_UID)
    host.popen([sys.executable, "-m", "appliance", "identity", "--dir", ca, "--tokens",
                os.path.join(tmp, "tokens"), "--listen", f"0.0.0.0:{IDENTITY_PORT}"],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host.wait_for_port(IDENTITY_PORT)

    def env(name: str) -> dict[str, str]:
        return {"APPLIANCE_IDENTITY_ADDR": f"{host.addr}:{IDENTITY_PORT}",
                "APPLIANCE_TRUST_ANCHORS": os.path.join(ca, "trust-anchor.pem"),
                "APPLIANCE_IDENTITY_TOKEN_FILE": os.path.join(tmp, f"token-{name}")}
    return env


def _traffic(net: Any, count: int) -> bool:
    client = net["client"]
    ok = True
    say("traffic from the client (unmodified programs):")
    for name in ("web1", "web2"):
        url = f"http://{net[name].addr}:{HTTP_PORT}/"
        codes: dict[str, int] = {}
        body = via = ""
        for _ in range(count):
            done = client.run(["curl", "-s", "-D", "-", "--max-time", "5", url], check=False)
            head, _, body = done.stdout.partition("\n\n")  # text mode: CRLF read as LF
            status = head.split(" ", 2)[1] if head.startswith("HTTP/") else "error"
            codes[status] = codes.get(status, 0) + 1
            via = ", ".join(ln.split(":", 1)[1].strip() for ln in head.split("\n")
                            if ln.lower().startswith("via:")) or via
        ok = ok and codes.get("200") == count and body.strip() == f"hello from {name}"
        summary = ", ".join(f"{n}x {s}" for s, n in sorted(codes.items()))
        say(f"  curl {url} x{count}: {summary}, body {body.strip()!r}")
        say(f"    via: {via}")
    ok = _balanced(client, count) and ok
    ok = _explicit(client, net["web1"].addr) and ok
    if shutil.which("nghttpd"):
        ok = _h2(client, net["web2"].addr, count) and ok
    echo = _echo(client, net["web2"].addr)
    ok = ok and echo
    say(f"  tcp {net['web2'].addr}:{ECHO_PORT}: 64 KiB of binary bytes echoed "
        f"{'byte for byte' if echo else 'WRONG'}")
    return ok


def _balanced(client: Any, count: int) -> bool:
    """The logical service: one curl, keep-alive, requests spread per request."""
    url = f"http://{SERVICE}:{HTTP_PORT}/"
    done = client.run(["curl", "-s", "--max-time", "10", *([url] * count)], check=False)
    seen: dict[str, int] = {}
    for line in done.stdout.splitlines():
        seen[line.strip()] = seen.get(line.strip(), 0) + 1
    summary = ", ".join(f"{n}x {body!r}" for body, n in sorted(seen.items()))
    say(f"  curl {url} x{count} on one connection (logical service): {summary}")
    return sum(seen.values()) == count and len(seen) == 2


def _explicit(client: Any, addr: str) -> bool:
    """An app that uses the local proxy on purpose (http_proxy), no redirect needed."""
    url = f"http://{addr}:{HTTP_PORT}/"
    done = client.run(["curl", "-s", "--max-time", "5", "--noproxy", "", "-x",
                       "http://127.0.0.1:4140", url], check=False)
    say(f"  curl -x http://127.0.0.1:4140 {url} (explicit proxy): {done.stdout.strip()!r}")
    return done.stdout.strip() == "hello from web1"


def _h2(client: Any, addr: str, count: int) -> bool:
    """HTTP/2 with prior knowledge (what gRPC clients speak) to nghttpd on web2."""
    url = f"http://{addr}:{H2_PORT}/"
    codes: dict[str, int] = {}
    for _ in range(count):
        done = client.run(["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w",
                           "HTTP/%{http_version} %{http_code}", "--max-time", "5", url],
                          check=False)
        codes[done.stdout] = codes.get(done.stdout, 0) + 1
    summary = ", ".join(f"{n}x {s}" for s, n in sorted(codes.items()))
    say(f"  curl --http2-prior-knowledge {url} x{count}: {summary}")
    return codes.get("HTTP/2 200") == count


ECHO_CLIENT = """
import socket, sys
payload = bytes(range(256)) * 256
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while data := s.recv(65536):
        got += data
print("ok" if got == payload else "mismatch")
"""


def _echo(client: Any, addr: str) -> bool:
    done = client.run(["python3", "-c", ECHO_CLIENT, addr, str(ECHO_PORT)], check=False)
    return done.stdout.strip() == "ok"


def _report(nodes: dict[str, Any]) -> None:
    from appliance.telemetry import scrape

    say("what each proxy saw (from its own /metrics on :4191):")
    say(f"  {'host':<7} {'direction':<9} {'requests':>8} {'success':>8} {'mean ms':>8}  "
        f"{'connections by protocol':<28}")
    for name, node in nodes.items():
        text = node.metrics()
        for direction in ("outbound", "inbound"):
            reqs = scrape.total(text, "request_total", direction=direction)
            good = scrape.total(text, "response_total", direction=direction,
                                classification="success")
            lat_sum = scrape.total(text, "response_latency_ms_sum", direction=direction)
            lat_n = scrape.total(text, "response_latency_ms_count", direction=direction)
            conns = {s.labels["protocol"]: int(s.value) for s in scrape.parse(text)
                     if s.name == "tcp_open_total" and s.labels.get("direction") == direction
                     and s.labels.get("peer") == "src" and s.value}
            if not reqs and not conns:
                continue
            rate = f"{100 * good / reqs:.0f}%" if reqs else "-"
            mean = f"{lat_sum / lat_n:.1f}" if lat_n else "-"
            protos = ", ".join(f"{p} {n}" for p, n in sorted(conns.items()))
            say(f"  {name:<7} {direction:<9} {int(reqs):>8} {rate:>8} {mean:>8}  {protos}")
    say("mutual TLS between the proxies (inbound connections by verified client identity):")
    for name, node in nodes.items():
        peers: dict[str, int] = {}
        for sample in scrape.parse(node.metrics()):
            labels = sample.labels
            if sample.name == "tcp_open_total" and labels.get("direction") == "inbound" \
                    and labels.get("peer") == "src" and sample.value:
                who = labels.get("client_id") if labels.get("tls") == "true" else "plaintext"
                peers[who or "plaintext"] = peers.get(who or "plaintext", 0) + int(sample.value)
        if peers:
            say(f"  {name:<7} " + ", ".join(f"{n}x {who}" for who, n in sorted(peers.items())))


def _explore(net: Any) -> None:
    client = net["client"]
    say(textwrap.dedent(f"""
        The mesh is running. In another shell, for example:
          ip netns exec {client.netns} curl -v http://{net['web1'].addr}:{HTTP_PORT}/
          ip netns exec {client.netns} curl -s http://127.0.0.1:4191/metrics
          ip netns exec {net['web1'].netns} iptables -t nat -S
        Press Enter (or Ctrl-C) to tear it all down."""))
    try:
        input()
    except (EOFError, KeyboardInterrupt):
        pass


def say(text: str) -> None:
    print(text, flush=True)
