"""GuildPlayer holds a track while its sink cannot send it (a voice link whose DAVE group is not
in force yet): nothing goes out, no frame is consumed, and the track starts from its first frame
once the sink can send (issue #12, section 3)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from legato.audio.player import PlayerEvent, PlayerState, TrackStarted
from tests.fakes import FakeClock, GatedSink, PlayerRig, ScriptedOpener, inline_player, settle

F = 0.020


@dataclass
class Rig(PlayerRig):
    sink: GatedSink
    events: list[PlayerEvent]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    clock = FakeClock()
    sink = GatedSink(clock, open=False)
    opener = ScriptedOpener()
    events: list[PlayerEvent] = []
    player = inline_player(sink, opener, clock, on_event=events.append)
    yield Rig(clock, sink, opener, player, events)
    await player.close()


async def test_a_track_is_held_until_the_sink_can_send_then_starts_at_its_first_frame(
    rig: Rig,
) -> None:
    rig.player.queue.add([rig.opener.script("A", 30)])
    assert rig.player.start()
    await settle()
    assert rig.player.state is PlayerState.PLAYING
    await rig.clock.advance(50 * F)
    # A second of due audio: nothing sent, not even speaking, and nothing consumed or dropped.
    assert rig.sink.events == []
    assert rig.sink.refused == []
    stats = rig.player.stats
    assert stats.frames_sent == 0
    assert stats.holds == 1
    assert stats.held_ms == pytest.approx(50 * F * 1e3)
    assert rig.player.position == 0.0
    assert not any(isinstance(e, TrackStarted) for e in rig.events)

    rig.sink.open()
    await settle()
    await rig.clock.advance(40 * F)
    assert rig.sink.timeline() == ["on", *(f"A:{i}" for i in range(30)), *["S"] * 5, "off"]
    assert rig.sink.refused == []
    stats = rig.player.stats
    assert stats.frames_sent == 30
    assert stats.holds == 1
    assert stats.held_ms == pytest.approx(50 * F * 1e3)


async def test_a_track_is_held_mid_track_and_goes_on_where_it_stopped(rig: Rig) -> None:
    rig.sink.open()
    rig.player.queue.add([rig.opener.script("A", 40)])
    assert rig.player.start()
    await settle()
    await rig.clock.advance(9 * F)
    assert rig.sink.audio == [f"A:{i}".encode() for i in range(10)]
    # The group is re-forming (op24 or op31): the link cannot send for a while.
    rig.sink.close()
    await rig.clock.advance(25 * F)
    assert rig.sink.refused == []
    assert len(rig.sink.audio) == 10
    rig.sink.open()
    await settle()
    await rig.clock.advance(40 * F)
    assert rig.sink.audio == [f"A:{i}".encode() for i in range(40)]
    assert rig.sink.refused == []
    assert rig.player.stats.holds == 1
    assert rig.player.stats.frames_sent == 40


async def test_close_while_held_ends_the_wait(rig: Rig) -> None:
    rig.player.queue.add([rig.opener.script("A", 10)])
    assert rig.player.start()
    await settle()
    await rig.clock.advance(5 * F)
    assert rig.player.stats.holds == 1
    await rig.player.close()
    assert rig.sink.events == []
