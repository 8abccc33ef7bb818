"""A ``GuildPlayer`` for the fake-clock tests: source work inline, time only when a test says."""

from __future__ import annotations

from typing import Any

from legato.audio.player import GuildPlayer, SourceOpener
from legato.audio.sink import FrameSink
from tests.fakes.clock import FakeClock
from tests.fakes.executor import InlineExecutor


def inline_player(
    sink: FrameSink, opener: SourceOpener, clock: FakeClock, **options: Any
) -> GuildPlayer:
    """A player on ``clock`` whose reads run inline (``InlineExecutor``), with a 100 ms buffer.

    Args:
        sink: where frames go.
        opener: what opens each track.
        clock: the fake clock the player paces on.
        **options: any other ``GuildPlayer`` keyword (``on_event``, ``stall_timeout``, ...).

    Returns:
        The player, not started.
    """
    return GuildPlayer(
        sink, opener, clock=clock, executor=InlineExecutor(), buffer_ms=100, **options
    )
