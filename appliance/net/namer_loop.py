"""One loop task per watched name: the part the DNS and files namers share.

The first :meth:`LoopNamer.watch` of a name parses it (:meth:`LoopNamer._parse`): a bad
name is a ``neg`` watch that gives the reason, and a name that needs no loop may answer with
a ready :class:`Watch` (an IP literal, say). Otherwise the namer spawns its
:meth:`LoopNamer._run` coroutine for the name with ``ctx.spawn``, which keeps the watch up
to date until cancelled; later watches of the name share the same Watch. :meth:`close`
cancels the loops (:func:`cancel_all`, which the other namers use too), and a name first
watched after it gets a Watch but no loop.
"""

from __future__ import annotations

from typing import Any

from appliance.discovery.base import Name, Namer, NamerContext, Watch
from appliance.discovery.static import neg


def cancel_all(tasks: list[Any]) -> None:
    """Cancel what ``ctx.spawn`` returned (tasks or futures)."""
    for task in tasks:
        cancel = getattr(task, "cancel", None)
        if cancel is not None:
            cancel()
    tasks.clear()


class LoopNamer(Namer):
    """A namer whose names each have their own loop (a subclass gives :meth:`_parse` and
    :meth:`_run`)."""

    def __init__(self, ctx: NamerContext) -> None:
        self._ctx = ctx
        self._watches: dict[Name, Watch] = {}
        self._tasks: list[Any] = []
        self._closed = False

    def watch(self, name: Name) -> Watch:
        watch = self._watches.get(name)
        if watch is None:
            watch = self._watches[name] = self._start(name)
        return watch

    def close(self) -> None:
        self._closed = True
        cancel_all(self._tasks)

    def _start(self, name: Name) -> Watch:
        try:
            query = self._parse(name)
        except ValueError as exc:
            return Watch(neg(str(exc)))
        if isinstance(query, Watch):
            return query
        watch = Watch()
        if not self._closed:
            self._tasks.append(self._ctx.spawn(self._run(name, query, watch)))
        return watch

    def _parse(self, name: Name) -> Any:
        """What the loop of ``name`` needs (or a ready :class:`Watch`); ``ValueError``
        says why the name is bad."""
        raise NotImplementedError

    async def _run(self, name: Name, query: Any, watch: Watch) -> None:
        """Keep ``watch`` up to date for ``name`` until cancelled."""
        raise NotImplementedError
