"""The files namer (linkerd's ``io.l5d.fs``): one file per service in a directory, polled.

Theory of operation: the first :meth:`FilesNamer.watch` of a name spawns one poll loop for
it (``ctx.spawn``, by :class:`~appliance.net.namer_loop.LoopNamer`); later watches of the
name share its :class:`Watch`. Every
``poll_interval`` seconds the loop stats ``<root_dir>/<name>`` and hands the result to the
pure :class:`~appliance.discovery.files.FileTracker`, which says whether to read it and
what the read means. Polling (not inotify) is portable and works on the symlink swaps that
Kubernetes ConfigMap volumes make; a change is seen within one interval.

File present and parsed -> ``bound``; file absent -> ``neg``; unreadable or unparsable ->
:meth:`Watch.fail` (the last good set stays, ``stale=True``), and ``root_dir`` itself
missing is a failure too, not ``neg``. Each read and each failure is reported with
``ctx.report``; an unchanged file costs one ``stat`` per interval and reports nothing.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from appliance.discovery.base import NEG, Name, NamerContext, Watch, bound
from appliance.discovery.files import MAX_BYTES, FileTracker, Stamp, Update, check_service_name
from appliance.discovery.registry import check_options, float_option, register
from appliance.net.namer_loop import LoopNamer


class FilesNamer(LoopNamer):
    """Service name -> the addresses listed in ``<root_dir>/<name>``."""

    kind = "io.l5d.fs"
    segments = 1

    def __init__(self, root_dir: str, ctx: NamerContext, *, poll_interval: float = 1.0,
                 wall_clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.root_dir = root_dir
        self.poll_interval = poll_interval
        self._wall_clock_ns = wall_clock_ns
        super().__init__(ctx)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], ctx: NamerContext) -> FilesNamer:
        check_options(options, optional=("root_dir", "rootDir", "poll_interval"))
        if ("root_dir" in options) == ("rootDir" in options):
            raise ValueError("root_dir: give exactly one of root_dir or rootDir (linkerd's "
                             "spelling)")
        key = "root_dir" if "root_dir" in options else "rootDir"
        root = options[key]
        if not isinstance(root, str) or not root:
            raise ValueError(f"{key}: expected a directory path, not {root!r}")
        if not os.path.isdir(root):
            raise ValueError(f"{key}: {root!r} is not a directory")
        return cls(os.path.abspath(root), ctx,
                   poll_interval=float_option(options, "poll_interval", 1.0))

    def _parse(self, name: Name) -> FileTracker:
        if len(name) != 1:
            raise ValueError(f"a file name has 1 segment, not {len(name)}")
        return FileTracker(os.path.join(self.root_dir, check_service_name(name[0])))

    async def _run(self, name: Name, tracker: FileTracker, watch: Watch) -> None:
        while not self._closed:
            update = self.poll_once(tracker)
            if update is not None:
                self._apply(name, watch, update)
            await asyncio.sleep(self.poll_interval)

    def poll_once(self, tracker: FileTracker) -> Update | None:
        """Stat (and if needed read) the file once; ``None`` when nothing changed."""
        try:
            stamp: Stamp | None = Stamp.of(os.stat(tracker.path))
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            return tracker.stat_failed(exc.strerror or str(exc))
        if not tracker.needs_read(stamp):
            return None
        if stamp is None:
            if not os.path.isdir(self.root_dir):
                return tracker.stat_failed(f"directory {self.root_dir} is missing")
            return tracker.missing()
        return self._read(tracker, stamp)

    def _read(self, tracker: FileTracker, stamp: Stamp) -> Update:
        if not stamp.regular:
            return tracker.read_failed(stamp, "not a regular file")
        try:
            with open(tracker.path, "rb") as fh:
                stamp = Stamp.of(os.fstat(fh.fileno()))
                data = fh.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return tracker.missing()
        except OSError as exc:
            return tracker.read_failed(stamp, exc.strerror or str(exc))
        return tracker.read(stamp, data, self._wall_clock_ns())

    def _apply(self, name: Name, watch: Watch, update: Update) -> None:
        if update.kind == "fail":
            watch.fail(update.error)
            self._ctx.report(self.kind, name, False, update.error)
            return
        watch.set(bound(update.addrs) if update.kind == "bound" else NEG)
        self._ctx.report(self.kind, name, True, "")


register("io.l5d.fs", FilesNamer)
register("files", FilesNamer)
