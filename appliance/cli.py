"""The ``appliance`` command: ``proxy``, ``init``, ``demo``, ``await``, ``certs``,
``identity``.

Exit codes are documented in docs/cli.md. Each subcommand's flags are defined beside its
code (``init.cli`` for ``init``) and registered here.
"""

from __future__ import annotations

import argparse
import os
import sys

from appliance import __version__


def _proxy_args(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("proxy", help="run the proxy (outbound 4140, inbound 4143, admin 4191)")
    p.add_argument("--config", metavar="FILE", help="YAML config file (also APPLIANCE_CONFIG)")
    p.add_argument("--outbound-port", type=int, metavar="PORT")
    p.add_argument("--inbound-port", type=int, metavar="PORT")
    p.add_argument("--admin-port", type=int, metavar="PORT")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="set any config field, e.g. --set http.response_timeout=5s (repeatable)",
    )
    p.add_argument("--check", action="store_true", help="validate the config, print it, exit")


def _proxy_overrides(args: argparse.Namespace) -> dict[str, object]:
    from appliance.config import ConfigError

    overrides: dict[str, object] = {}
    for name, path in (("outbound_port", "outbound.port"), ("inbound_port", "inbound.port"),
                       ("admin_port", "admin.port"), ("log_level", "log_level")):
        value = getattr(args, name)
        if value is not None:
            overrides[path] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        overrides[key.strip()] = value
    return overrides


def run_proxy(args: argparse.Namespace) -> int:
    from appliance import config as cfg
    from appliance import env

    path = args.config or os.environ.get(env.CONFIG_FILE)

    def load() -> cfg.Config:
        file_data = cfg.load_file(path) if path else None
        return cfg.load(file_data=file_data, environ=os.environ,
                        overrides=_proxy_overrides(args))

    try:
        conf = load()
    except cfg.ConfigError as exc:
        print(f"appliance: config error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(conf)
        return 0
    from appliance.proxy import serve

    return serve(conf, reload=load, config_file=path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _proxy_args(sub)
    from init import cli as init_cli

    init_cli.add_parser(sub)
    from appliance import demo

    demo.add_parser(sub)
    from appliance.inject import cli as inject_cli

    inject_cli.add_parser(sub)
    from init import vm as vm_cli

    vm_cli.add_parser(sub)
    from appliance import await_cmd

    await_cmd.add_parser(sub)
    from certs import cli as certs_cli

    certs_cli.add_parser(sub)
    certs_cli.add_identity_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "proxy":
        return run_proxy(args)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args))
