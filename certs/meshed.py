"""Which addresses are meshed, and with which identity: learned from issued certificates.

Every workload certificate the identity service signs carries the workload's IP addresses
as IP SANs; the service records ``address -> (identity, expiry)`` for each. A record lives
until its certificate expires; a newer certificate for the same address replaces it (the
address moved to another workload, or the workload renewed). The registry is in memory:
a restarted replica relearns an address when that workload next renews (at 70% of the leaf
lifetime) and, meanwhile, asks its peer replicas (see identity_service.py).

Addresses are normalized (``::ffff:10.0.0.1`` is ``10.0.0.1``; IPv6 in compressed form) so
that lookups and records meet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PURGE_EVERY = 1024


def normalize_ip(text: str) -> str:
    """The canonical text of an IP address; ValueError naming the text if it is not one."""
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(frozen=True, slots=True)
class Record:
    """A meshed address: the identity its certificate names and when that expires."""

    identity: str
    expiry: float

    def to_json(self) -> dict[str, object]:
        return {"identity": self.identity, "expiry": int(self.expiry)}

    @classmethod
    def from_json(cls, value: object) -> Record | None:
        if not isinstance(value, dict):
            return None
        identity, expiry = value.get("identity"), value.get("expiry")
        if not isinstance(identity, str) or not isinstance(expiry, int | float) \
                or isinstance(expiry, bool):
            return None
        return cls(identity, float(expiry))


class Registry:
    """Address -> Record, forgetting records whose certificate expired."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._records: dict[str, Record] = {}
        self._inserts = 0

    def __len__(self) -> int:
        return len(self._records)

    def record(self, addresses: Iterable[str], identity: str, expiry: float) -> None:
        """A certificate for ``identity`` covering ``addresses`` was issued."""
        for addr in addresses:
            self.merge(addr, Record(identity, expiry))

    def merge(self, address: str, record: Record) -> None:
        """Keep ``record`` unless a record that expires later is already there."""
        key = normalize_ip(address)
        held = self._records.get(key)
        if held is None or record.expiry >= held.expiry:
            self._records[key] = record
        self._inserts += 1
        if self._inserts % PURGE_EVERY == 0:
            self.purge()

    def get(self, address: str) -> Record | None:
        key = normalize_ip(address)
        record = self._records.get(key)
        if record is not None and record.expiry <= self._clock():
            del self._records[key]
            return None
        return record

    def purge(self) -> None:
        """Drop every expired record."""
        now = self._clock()
        self._records = {a: r for a, r in self._records.items() if r.expiry > now}
