"""A ``GuildPlayer`` for the fake-clock tests: source work inline, time only when a test says."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from legato.audio.opener import SourceOpener
from legato.audio.player import GuildPlayer
from legato.audio.sink import FrameSink
from legato.audio.track import Track
from tests.fakes.clock import FakeClock
from tests.fakes.executor import InlineExecutor
from tests.fakes.sink import RecordingSink
from tests.fakes.source import ScriptedOpener


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


@dataclass
class PlayerRig:
    """A fake-clock player and what it was built from; each test file adds its own events and
    helpers."""

    clock: FakeClock
    sink: RecordingSink
    opener: ScriptedOpener
    player: GuildPlayer

    def play(self, *tracks: Track) -> None:
        """Queue ``tracks`` and start the player (it must start)."""
        self.player.queue.add(tracks)
        assert self.player.start()
