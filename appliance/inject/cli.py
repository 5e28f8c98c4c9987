"""``appliance inject``: add the mesh to Kubernetes manifests (or take it out).

Reads files (or ``-`` for stdin), writes the result to stdout (or ``--output``), and one
note per pod template to stderr. Exit codes: 0 done, 1 a manifest could not be injected
(every problem is listed, naming the file, document and field; nothing is written),
2 bad flags. See docs/kubernetes.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from appliance.inject.manifest import InjectError, inject_text
from appliance.inject.settings import (
    AnnotationError,
    InjectOptions,
    check_quantity,
    parse_kubernetes_version,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_D = InjectOptions()


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``inject`` on the ``appliance`` subcommand parser."""
    p = sub.add_parser("inject", help="add the init container and proxy sidecar to "
                                      "Kubernetes manifests (or --uninject)")
    p.add_argument("files", nargs="*", default=["-"], metavar="FILE",
                   help="YAML manifests; - or nothing reads stdin")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--uninject", action="store_true", help="remove what inject added")
    p.add_argument("--image", default=_D.image, help=f"proxy and init image ({_D.image})")
    p.add_argument("--image-pull-policy", default=_D.image_pull_policy,
                   choices=["Always", "IfNotPresent", "Never"])
    p.add_argument("--kubernetes-version", metavar="X.Y",
                   help="the cluster's version; >= 1.29 turns native sidecars on")
    p.add_argument("--native-sidecar", action=argparse.BooleanOptionalAction, default=None,
                   help="run the proxy as a native sidecar (init container with "
                        "restartPolicy: Always); default: on for --kubernetes-version >= 1.29")
    p.add_argument("--identity-addr", default=_D.identity_addr, metavar="HOST:PORT",
                   help="the identity service, as the proxies reach it")
    p.add_argument("--identity-audience", default=_D.identity_audience,
                   help="audience of the projected ServiceAccount token")
    p.add_argument("--trust-anchors-configmap", default=_D.trust_anchors_configmap,
                   metavar="NAME", help="ConfigMap (in the pod's namespace) with "
                                        "trust-anchor.pem")
    p.add_argument("--no-identity", action="store_true",
                   help="no token, no trust anchors: the proxies run without mTLS")
    p.add_argument("--proxy-uid", type=int, default=_D.proxy_uid, metavar="UID")
    p.add_argument("--iptables-mode", default=_D.iptables_mode,
                   choices=["auto", "legacy", "nft"])
    p.add_argument("--proxy-cpu-request", default=_D.cpu_request, metavar="QUANTITY")
    p.add_argument("--proxy-memory-request", default=_D.memory_request, metavar="QUANTITY")
    p.add_argument("--proxy-memory-limit", default=_D.memory_limit, metavar="QUANTITY")
    p.add_argument("--proxy-log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--trace-collector", metavar="HOST:PORT",
                   help="OTLP/gRPC collector for every proxy (annotation overrides)")
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> InjectOptions:
    """Flags to options; AnnotationError names the bad flag."""
    if not 1 <= args.proxy_uid <= 2**31 - 1:
        raise AnnotationError(f"--proxy-uid: {args.proxy_uid} is not a UID 1-{2**31 - 1}")
    for flag in ("proxy_cpu_request", "proxy_memory_request", "proxy_memory_limit"):
        check_quantity("--" + flag.replace("_", "-"), getattr(args, flag))
    opts = replace(
        _D, image=args.image, image_pull_policy=args.image_pull_policy,
        identity=not args.no_identity, identity_addr=args.identity_addr,
        identity_audience=args.identity_audience,
        trust_anchors_configmap=args.trust_anchors_configmap, proxy_uid=args.proxy_uid,
        iptables_mode=args.iptables_mode, native_sidecar=args.native_sidecar,
        cpu_request=args.proxy_cpu_request, memory_request=args.proxy_memory_request,
        memory_limit=args.proxy_memory_limit, log_level=args.proxy_log_level,
        trace_collector=args.trace_collector)
    if args.kubernetes_version:
        opts = replace(opts, kubernetes_version=parse_kubernetes_version(
            args.kubernetes_version))
    return opts


def run(args: argparse.Namespace) -> int:
    """Entry point of ``appliance inject``; returns the exit code."""
    try:
        opts = options_from_args(args)
    except AnnotationError as exc:
        return _fail(str(exc), EXIT_USAGE)
    outputs: list[str] = []
    problems: list[str] = []
    for name in args.files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{name}: cannot read: {exc}")
            continue
        try:
            result = inject_text(text, opts, source="stdin" if name == "-" else name,
                                 uninject=args.uninject)
        except InjectError as exc:
            problems.extend(exc.problems)
            continue
        outputs.append(result.text)
        for note in result.notes:
            print(f"appliance inject: {note}", file=sys.stderr)
    if problems:
        for problem in problems:
            _fail(problem, EXIT_FAILED)
        return EXIT_FAILED
    text = outputs[0] if len(outputs) == 1 else "".join(
        o if o.startswith("---") else "---\n" + o for o in outputs)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _fail(message: str, code: int) -> int:
    print(f"appliance inject: error: {message}", file=sys.stderr)
    return code
