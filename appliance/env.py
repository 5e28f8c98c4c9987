"""Every environment variable the proxy reads, in one place.

Each config field ``section.name`` is read from ``APPLIANCE_SECTION_NAME`` (upper case, dots
as underscores): ``outbound.port`` from ``APPLIANCE_OUTBOUND_PORT``, ``log_level`` from
``APPLIANCE_LOG_LEVEL``. Injected sidecars are configured this way.
"""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "APPLIANCE_"

CONFIG_FILE = "APPLIANCE_CONFIG"
"""Path of a YAML config file, as ``--config``."""


def var_name(path: str) -> str:
    return PREFIX + path.replace(".", "_").upper()


def config_vars() -> dict[str, str]:
    """Environment variable name -> dotted config field."""
    from appliance.config import field_paths

    return {var_name(p): p for p in field_paths()}


def from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """Dotted config field -> raw value, for each APPLIANCE_* variable that is set."""
    return {path: environ[name] for name, path in config_vars().items() if name in environ}
