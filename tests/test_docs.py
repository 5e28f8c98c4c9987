"""The docs stay true: every config field and environment variable is documented."""

from __future__ import annotations

import os

from appliance import config, env

DOCS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs")


def test_config_reference_lists_every_field_and_variable() -> None:
    """docs/config.md names each field and its APPLIANCE_* variable."""
    with open(os.path.join(DOCS, "config.md")) as fh:
        text = fh.read()
    missing = [p for p in config.field_paths()
               if f"`{p}`" not in text or f"`{env.var_name(p)}`" not in text]
    assert missing == []
