"""A guild's play queue: what is playing, what comes next, what has played. Pure code, no I/O.

Indices in the API are 0-based positions in :attr:`TrackQueue.upcoming`; the ``user_message`` of
every error counts from 1, as the queue is shown to users.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Final

from legato.audio.track import Track
from legato.errors import QueueEmpty, QueueError, QueueFull

#: How many finished tracks ``previous()`` can go back through by default.
DEFAULT_HISTORY: Final = 50


class LoopMode(enum.Enum):
    """What ``advance()`` does with the track that just finished."""

    OFF = "off"
    TRACK = "track"
    QUEUE = "queue"


class TrackQueue:
    """Current track, upcoming tracks and a bounded history.

    Every track lives in exactly one place (current, upcoming or history) until it is removed or
    falls off the end of the history: no operation duplicates or loses one.

    Args:
        max_length: Most tracks ``upcoming`` may hold, or ``None`` for no limit.
        history_length: Most tracks kept in ``history``; the oldest falls off first.

    Raises:
        ValueError: ``max_length`` or ``history_length`` is negative.
    """

    def __init__(
        self, *, max_length: int | None = None, history_length: int = DEFAULT_HISTORY
    ) -> None:
        if max_length is not None and max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        if history_length < 0:
            raise ValueError(f"history_length must be >= 0, got {history_length}")
        self._max_length = max_length
        self._current: Track | None = None
        self._upcoming: list[Track] = []
        self._history: deque[Track] = deque(maxlen=history_length)
        self._loop = LoopMode.OFF

    # -- views -------------------------------------------------------------------------------

    @property
    def current(self) -> Track | None:
        """The track being played (or about to be), ``None`` when nothing is."""
        return self._current

    @property
    def upcoming(self) -> Sequence[Track]:
        """The tracks after the current one, next first (a read-only snapshot)."""
        return tuple(self._upcoming)

    @property
    def history(self) -> Sequence[Track]:
        """Finished tracks, most recent last (a read-only snapshot)."""
        return tuple(self._history)

    @property
    def max_length(self) -> int | None:
        """Most tracks ``upcoming`` may hold, or ``None``."""
        return self._max_length

    @property
    def history_length(self) -> int:
        """Most tracks ``history`` keeps."""
        return self._history.maxlen or 0

    @property
    def loop(self) -> LoopMode:
        """The loop mode ``advance()`` follows."""
        return self._loop

    @loop.setter
    def loop(self, mode: LoopMode) -> None:
        self._loop = LoopMode(mode)

    def __len__(self) -> int:
        """Number of upcoming tracks."""
        return len(self._upcoming)

    def peek_next(self, *, skip: bool = False) -> Track | None:
        """Return what ``advance(skip=skip)`` would make current now, changing nothing."""
        if self._loop is LoopMode.TRACK and self._current is not None and not skip:
            return self._current
        if self._upcoming:
            return self._upcoming[0]
        if self._loop is LoopMode.QUEUE:
            return self._current
        return None

    # -- editing -----------------------------------------------------------------------------

    def add(self, tracks: Iterable[Track]) -> list[int]:
        """Append tracks to the end of the queue.

        Args:
            tracks: The tracks, in order.

        Returns:
            The 0-based positions in ``upcoming`` the tracks now have.

        Raises:
            QueueFull: The batch does not fit; nothing was added.
        """
        batch = list(tracks)
        self._check_room(len(batch))
        first = len(self._upcoming)
        self._upcoming.extend(batch)
        return list(range(first, first + len(batch)))

    def add_next(self, tracks: Iterable[Track]) -> list[int]:
        """Insert tracks at the front of the queue, keeping their order.

        Args:
            tracks: The tracks, in order.

        Returns:
            The 0-based positions in ``upcoming`` the tracks now have.

        Raises:
            QueueFull: The batch does not fit; nothing was added.
        """
        batch = list(tracks)
        self._check_room(len(batch))
        self._upcoming[0:0] = batch
        return list(range(len(batch)))

    def remove(self, index: int) -> Track:
        """Remove and return the upcoming track at ``index`` (0-based).

        Raises:
            QueueError: ``index`` is out of range.
        """
        self._check_index(index)
        return self._upcoming.pop(index)

    def move(self, src: int, dst: int) -> Track:
        """Move the upcoming track at ``src`` so that it ends up at ``dst`` (both 0-based).

        Returns:
            The moved track.

        Raises:
            QueueError: ``src`` or ``dst`` is out of range.
        """
        self._check_index(src)
        self._check_index(dst)
        track = self._upcoming.pop(src)
        self._upcoming.insert(dst, track)
        return track

    def shuffle(self, rng: random.Random | None = None) -> None:
        """Shuffle the upcoming tracks (the current one stays).

        Args:
            rng: The random source; tests pass a seeded one.
        """
        (rng or random.Random()).shuffle(self._upcoming)

    def clear(self) -> list[Track]:
        """Remove every upcoming track; the current one and the history stay.

        Returns:
            The removed tracks, in queue order.
        """
        removed, self._upcoming = self._upcoming, []
        return removed

    def restore_history(self, tracks: Iterable[Track]) -> None:
        """Put back the history of an earlier session (oldest first), before anything is played.

        Only the most recent ``history_length`` are kept, as if they had been played here.

        Raises:
            ValueError: This queue already has a history.
        """
        if self._history:
            raise ValueError("restore_history on a queue that already has a history")
        self._history.extend(tracks)

    # -- playing -----------------------------------------------------------------------------

    def advance(self, *, skip: bool = False) -> Track | None:
        """Finish the current track and return the new current one (``None`` at the end).

        With ``LoopMode.TRACK`` the current track repeats unless ``skip`` is true; with
        ``LoopMode.QUEUE`` the finished track goes back to the end of the queue (instead of to the
        history); otherwise it goes to the history.

        Args:
            skip: The user skipped: a looped track does not repeat (it is handled as ``OFF``).

        Returns:
            The track to play now, or ``None`` when the queue is exhausted.
        """
        finished = self._current
        if finished is not None and self._loop is LoopMode.TRACK and not skip:
            return finished
        if finished is not None:
            if self._loop is LoopMode.QUEUE:
                self._upcoming.append(finished)
            else:
                self._history.append(finished)
        self._current = self._upcoming.pop(0) if self._upcoming else None
        return self._current

    def previous(self) -> Track:
        """Go back one track: the current one returns to the front of the queue.

        With ``LoopMode.QUEUE`` finished tracks live at the end of the queue, so the last upcoming
        track becomes current; otherwise the most recent history entry does.

        Returns:
            The new current track.

        Raises:
            QueueEmpty: There is nothing to go back to.
            QueueFull: The current track would not fit back into a full queue.
        """
        from_queue = self._loop is LoopMode.QUEUE and bool(self._upcoming)
        if not from_queue and not self._history:
            raise QueueEmpty("no history to go back to", user_message="There is no previous track.")
        if self._current is not None and not from_queue:
            self._check_room(1)
        back = self._upcoming.pop() if from_queue else self._history.pop()
        if self._current is not None:
            self._upcoming.insert(0, self._current)
        self._current = back
        return back

    def finish_current(self) -> Track | None:
        """Move the current track to the history without choosing a new one (a stop).

        Returns:
            The track that was current, if any.
        """
        finished, self._current = self._current, None
        if finished is not None:
            self._history.append(finished)
        return finished

    # -- checks ------------------------------------------------------------------------------

    def _check_room(self, count: int) -> None:
        limit = self._max_length
        if limit is not None and len(self._upcoming) + count > limit:
            free = max(0, limit - len(self._upcoming))
            raise QueueFull(
                f"{count} track(s) do not fit: {len(self._upcoming)}/{limit} queued",
                user_message=(
                    f"The queue is full ({limit} tracks)."
                    if free == 0
                    else f"Only {free} more track(s) fit in the queue (limit {limit})."
                ),
            )

    def _check_index(self, index: int) -> None:
        size = len(self._upcoming)
        if not 0 <= index < size:
            if size == 0:
                raise QueueEmpty(f"index {index} in an empty queue")
            raise QueueError(
                f"index {index} out of range 0..{size - 1}",
                user_message=f"Position {index + 1} is not in the queue (1 to {size}).",
            )
