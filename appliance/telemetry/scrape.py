"""Reading a Prometheus text exposition back: for the demo report and the tests."""

from __future__ import annotations

import re
from typing import NamedTuple

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out.append(Sample(m.group(1), dict(_LABEL.findall(m.group(2) or "")),
                              float(m.group(3))))
    return out


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include all of ``labels``."""
    return sum(s.value for s in parse(text)
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
