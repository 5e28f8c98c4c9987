"""Kubernetes list+watch, the pure part shared by the Kubernetes namers.

Theory of operation: a source follows one collection of the API (the EndpointSlices of a
service, the Services of a namespace or of the cluster) the way client-go's informers do:

1. **list** ``GET <collection>``: the full set and the collection's ``resourceVersion``;
2. **watch** the same URL with ``watch=1&resourceVersion=<rv>&allowWatchBookmarks=true``: a
   stream of JSON lines ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}``;
   each event moves ``rv`` forward (a BOOKMARK only moves ``rv``);
3. when the stream ends (the server's ``timeoutSeconds``, a dropped connection), **watch
   again** from the last ``rv``; nothing is missed and nothing re-listed;
4. when the server says the ``rv`` is too old (HTTP 410 Gone, or an ERROR event with code
   410, "Expired"), **list again**. A malformed event also forces a list: after a lost
   event only a list is known to be right.

:class:`ListWatch` holds the items (decoded, by key) and that loop's state: which request
is next (``phase``), when (requests at least ``min_delay`` apart, a jittered backoff after
failures), and what each answer and event means (an :data:`Outcome`: the items changed, a
failure to report, or nothing to do). A failure keeps the items: they are the last good
set. Subclasses say which collection (:meth:`ListWatch.collection`), how an item decodes
and what its key is. Nothing here awaits: the net side (``appliance.net.namer_k8s``) does
the requests and passes in the clock's ``now``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar
from urllib.parse import urlencode

from appliance.discovery.remote import Backoff, DecodeError, Failure

MAX_LINE = 16 * 1024 * 1024
T = TypeVar("T")


def as_object(value: Any, where: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, else a :class:`DecodeError` naming ``where``."""
    if not isinstance(value, dict):
        raise DecodeError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def as_list(value: Any, where: str) -> list[Any]:
    """``value`` if it is a JSON list (null is an empty list), else a DecodeError."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise DecodeError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def resource_version(obj: dict[str, Any], where: str) -> str:
    rv = as_object(obj.get("metadata"), f"{where}.metadata").get("resourceVersion")
    if not isinstance(rv, str) or not rv:
        raise DecodeError(f"{where}.metadata.resourceVersion: missing")
    return rv


def collection_path(base: str, query: list[tuple[str, str]], watch_from: str | None,
                    timeout: float) -> str:
    """``base`` with ``query``, and with ``watch_from`` the watch from that version."""
    if watch_from is not None:
        query = [*query, ("watch", "1"), ("resourceVersion", watch_from),
                 ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(int(timeout)))]
    return f"{base}?{urlencode(query)}" if query else base


def status_error(what: str, status: int, body: bytes, resource: str) -> str:
    """A non-200 answer as a failure message, with a hint for 401 and 403."""
    message = ""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict):
            message = str(obj.get("message", ""))
    except (ValueError, UnicodeDecodeError):
        message = body[:200].decode("utf-8", "replace").strip()
    hint = {401: " (token rejected)",
            403: f" (RBAC: the service account needs list and watch on {resource})"}
    return f"{what} answered {status}{hint.get(status, '')}: {message}"


class LineSplitter:
    """Cuts a watch stream into its JSON lines (at most ``limit`` bytes each)."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        *lines, rest = self._buf.split(b"\n")
        if len(rest) > self.limit:
            raise DecodeError(f"a watch event longer than {self.limit} bytes")
        self._buf = bytearray(rest)
        return [bytes(line) for line in lines if line.strip()]


@dataclass(frozen=True, slots=True)
class Changed:
    """The set of items changed: recompute what depends on them."""


Outcome = Changed | Failure | None
Phase = Literal["list", "watch"]


class Timing(Protocol):
    """The options a list+watch loop needs (``K8sOptions`` has them)."""

    @property
    def watch_timeout(self) -> float: ...

    @property
    def min_delay(self) -> float: ...


class ListWatch(Generic[T]):
    """The list+watch loop of one collection: which request next, when, and what answers
    and events mean. ``phase`` is what the next request is; the stream is read while it
    stays ``watch`` (an event that forces a list ends the stream)."""

    kind = "object"
    """The item's API kind, for messages (the list is ``<kind>List``)."""
    resource = "objects"
    """The resource's plural, for the RBAC hint."""

    def __init__(self, opts: Timing, backoff: Backoff) -> None:
        self.opts = opts
        self.backoff = backoff
        self.phase: Phase = "list"
        self.rv: str | None = None
        self.items: dict[str, T] = {}
        self.failures = 0
        self.lists = 0
        self._not_before = 0.0

    # -- what subclasses say ------------------------------------------------------------

    def collection(self) -> tuple[str, list[tuple[str, str]]]:
        """The collection's path and its query (a label selector, say)."""
        raise NotImplementedError

    def decode(self, raw: Any) -> T:
        """One item; :class:`DecodeError` names the first thing wrong."""
        raise NotImplementedError

    def key(self, item: T) -> str:
        raise NotImplementedError

    def wanted(self, item: T) -> bool:
        """Whether a watched item belongs to this source (the server filters already)."""
        return True

    # -- the loop -------------------------------------------------------------------------

    @property
    def path(self) -> str:
        base, query = self.collection()
        rv = self.rv if self.phase == "watch" else None
        return collection_path(base, query, rv, self.opts.watch_timeout)

    @property
    def failing(self) -> bool:
        """The last request failed (the items are the last good set)."""
        return self.failures > 0

    def delay(self, now: float) -> float:
        return max(0.0, self._not_before - now)

    def sent(self, now: float) -> None:
        self._not_before = now + self.opts.min_delay
        if self.phase == "list":
            self.lists += 1

    def decode_list(self, body: bytes) -> tuple[str, dict[str, T]]:
        """A ``<kind>List``: its resourceVersion and its items by key."""
        where = f"{self.kind}List"
        try:
            obj = as_object(json.loads(body), where)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"not JSON: {exc}") from None
        rv = resource_version(obj, where)
        items = [self.decode(item) for item in as_list(obj.get("items"), "items")]
        return rv, {self.key(item): item for item in items}

    def on_list(self, now: float, status: int, body: bytes) -> Outcome:
        if status != 200:
            return self.on_error(now, status_error("list", status, body, self.resource))
        try:
            self.rv, self.items = self.decode_list(body)
        except DecodeError as exc:
            return self.on_error(now, f"bad {self.kind}List: {exc}")
        self.phase = "watch"
        self.failures = 0
        return Changed()

    def on_watch_status(self, now: float, status: int, body: bytes) -> Outcome:
        """The watch's response head (and, unless 200, its body)."""
        if status == 410:
            self.phase = "list"
            return None
        if status != 200:
            return self.on_error(now, status_error("watch", status, body, self.resource))
        self.failures = 0
        return Changed()  # the source answers again: a stale set is fresh once more

    def on_event(self, now: float, line: bytes) -> Outcome:
        try:
            event = as_object(json.loads(line), "watch event")
            kind = event.get("type")
            obj = as_object(event.get("object"), f"{kind} event object")
            if kind == "ERROR":
                return self._error_event(now, obj)
            rv = resource_version(obj, f"{kind} event object")
            if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
                raise DecodeError(f"unknown watch event type {kind!r}")
            change = None if kind == "BOOKMARK" else self.decode(obj)
        except (ValueError, UnicodeDecodeError) as exc:
            self.phase = "list"
            return self.on_error(now, f"bad watch event: {exc}")
        self.rv = rv
        if change is None or not self.wanted(change):
            return None
        key = self.key(change)
        if kind == "DELETED":
            return Changed() if self.items.pop(key, None) is not None else None
        self.items[key] = change
        return Changed()

    def _error_event(self, now: float, status: dict[str, Any]) -> Outcome:
        self.phase = "list"
        if status.get("code") == 410:
            return None
        return self.on_error(now, f"watch ERROR event: {status.get('code')} "
                                  f"{status.get('message', '')}")

    def on_bad_stream(self, now: float, error: str) -> Failure:
        """The stream cannot be cut into events: list again after a backoff."""
        self.phase = "list"
        return self.on_error(now, f"bad watch stream: {error}")

    def on_error(self, now: float, error: str) -> Failure:
        self.failures += 1
        self._not_before = now + self.backoff.delay(self.failures)
        return Failure(error)
