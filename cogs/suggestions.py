"""Autocomplete for /play and /playnext: search suggestions within Discord's 3 s.

:class:`Suggestions` answers a query from its cache, shares a search already running for the
same query, caps the searches running at once, and, when the budget runs out, answers with the
results of the longest cached prefix (what is ready while the user types).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, Final

from discord import app_commands

from legato.audio.track import Track
from legato.cogs.checks import is_search
from legato.cogs.format import format_time, is_blank, safe_text
from legato.config import PlaybackConfig
from legato.errors import LegatoError

__all__ = ["AUTOCOMPLETE_BUDGET", "Suggestions"]

_log = logging.getLogger(__name__)

#: Discord drops an autocomplete answer after 3 s; answer with what is ready by then.
AUTOCOMPLETE_BUDGET: Final = 2.5
_SUGGESTION_TTL: Final = 600.0
_SUGGESTION_CACHE: Final = 256
_MAX_SEARCHES: Final = 3  # autocomplete searches running at once


class Suggestions:
    """Autocomplete results by query: answered from cache, shared while a search runs."""

    def __init__(self, search: Callable[[str], Coroutine[Any, Any, list[Track]]]) -> None:
        self._search = search
        self._done: OrderedDict[str, tuple[float, list[Track]]] = OrderedDict()
        self._running: dict[str, asyncio.Task[list[Track]]] = {}

    def cached(self, query: str) -> list[Track] | None:
        hit = self._done.get(query)
        if hit is None or time.monotonic() - hit[0] > _SUGGESTION_TTL:
            return None
        self._done.move_to_end(query)
        return hit[1]

    def nearest(self, query: str) -> list[Track]:
        """Results of the longest cached prefix of ``query`` (what is ready while typing)."""
        best: list[Track] = []
        best_len = 0
        for key, (_, tracks) in self._done.items():
            if query.startswith(key) and len(key) > best_len:
                best, best_len = tracks, len(key)
        return best

    async def get(self, query: str, budget: float) -> list[Track]:
        hit = self.cached(query)
        if hit is not None:
            return hit
        task = self._running.get(query)
        if task is None:
            if len(self._running) >= _MAX_SEARCHES:
                # Typing fast: earlier keystrokes' searches still run; answer from the cache.
                return self.nearest(query)
            task = asyncio.get_running_loop().create_task(
                self._search(query), name="legato-autocomplete"
            )
            self._running[query] = task
            task.add_done_callback(lambda t: self._store(query, t))
        done, _ = await asyncio.wait({task}, timeout=max(0.0, budget))
        if task in done and not task.cancelled() and task.exception() is None:
            return task.result()
        return self.nearest(query)

    def _store(self, query: str, task: asyncio.Task[list[Track]]) -> None:
        self._running.pop(query, None)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            if not isinstance(error, LegatoError):
                _log.warning("autocomplete search failed", exc_info=error)
            return
        self._done[query] = (time.monotonic(), task.result())
        while len(self._done) > _SUGGESTION_CACHE:
            self._done.popitem(last=False)

    async def close(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def choices(
        self, current: str, playback: PlaybackConfig, *, started: float
    ) -> list[app_commands.Choice[str]]:
        """Search suggestions for what the user typed, answered within the 3 s budget."""
        query = current.strip()
        if (
            len(query) < 2
            or is_blank(query)
            or not is_search(query)
            or playback.search_provider == "none"
        ):
            return []
        budget = AUTOCOMPLETE_BUDGET - (time.monotonic() - started)
        tracks = await self.get(query, budget)
        choices: list[app_commands.Choice[str]] = []
        for track in tracks[: playback.search_results]:
            # The value is what /play resolves again; Discord caps it at 100 characters.
            value = next(
                (v for v in (track.url, track.page_url) if v and len(v) <= 100), query[:100]
            )
            length = "live" if track.live else format_time(track.duration)
            name = safe_text(f"{track.title} · {length}", 100, markdown=False)
            choices.append(app_commands.Choice(name=name or value[:100], value=value))
        return choices
