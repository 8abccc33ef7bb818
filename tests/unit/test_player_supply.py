"""GuildPlayer and slow sources (issue #11), on a fake clock.

A ``TrickleSource``'s refills come back only when the test says, so a server that sends a little
now and then is played out in fake time, exactly: the player goes ``BUFFERING`` while its buffer
is dry, and a source that stays far below real time is skipped with ``SourceTooSlow`` and the
next track plays; a short hiccup is not. A track that gives no audio at all in time is skipped too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from legato.audio.player import (
    PlayerEvent,
    PlayerState,
    TrackFailed,
    TrackStarted,
)
from legato.audio.source import SourceTooSlow
from tests.fakes import (
    FakeClock,
    PlayerRig,
    RecordingSink,
    ScriptedOpener,
    TrickleSource,
    inline_player,
)

F = 0.020
WINDOW = 4.0
LIMIT = 2.0


@dataclass
class Rig(PlayerRig):
    #: Each event with the fake time it came at.
    events: list[tuple[float, PlayerEvent]] = field(default_factory=list)

    def source(self, tag: str) -> TrickleSource:
        found = [s for s in self.opener.sources if s.tag == tag]
        assert len(found) == 1
        assert isinstance(found[0], TrickleSource)
        return found[0]

    def failed(self) -> list[tuple[float, TrackFailed]]:
        return [(t, e) for t, e in self.events if isinstance(e, TrackFailed)]

    def started(self) -> list[str]:
        return [e.track.title for _, e in self.events if isinstance(e, TrackStarted)]

    async def trickle(
        self, source: TrickleSource, *, every: float, frames: int | None, until: Callable[[], bool]
    ) -> list[PlayerState]:
        """Answer ``source``'s waiting read every ``every`` fake seconds (with at most
        ``frames``) until ``until()``; returns the player's state just before each answer."""
        seen: list[PlayerState] = []
        for _ in range(round(60.0 / every)):
            if until():
                return seen
            await self.clock.advance(every)
            seen.append(self.player.state)
            source.deliver(frames)
        raise AssertionError("still trickling after 60 fake seconds")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    clock = FakeClock()
    opener = ScriptedOpener()
    sink = RecordingSink(clock)
    holder: list[Rig] = []

    def on_event(event: PlayerEvent) -> None:
        holder[0].events.append((clock.now(), event))

    player = inline_player(
        sink,
        opener,
        clock,
        on_event=on_event,
        preload_s=0.0,
        stall_timeout=60.0,  # the stall rule is not what these tests are about
        starve_window=WINDOW,
        starve_limit=LIMIT,
    )
    holder.append(Rig(clock, sink, opener, player))
    yield holder[0]
    opener.release()
    await player.close()


async def test_a_source_far_below_real_time_is_buffering_then_skipped_for_the_next_track(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.play(rig.opener.script("A", 1000, trickle=True), rig.opener.script("B", 3))
    await rig.clock.advance(F)
    a = rig.source("A")
    # The first fill is quick, then each read comes back 0.5 s later with 2 frames (40 ms of
    # audio): less than a tenth of real time.
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.BUFFERING)
    dry = rig.clock.now()
    with caplog.at_level(logging.WARNING, logger="legato.audio.player"):
        seen = await rig.trickle(a, every=0.5, frames=2, until=lambda: bool(rig.failed()))
        await rig.clock.advance(1.0)

    # Starved between reads, the player said so (silence stood in, speaking stayed on).
    assert PlayerState.BUFFERING in seen
    assert rig.sink.speaking_changes[:1] == [True]
    # Judged after the limit of starved time, within the window: not at the first gap.
    ((when, failed),) = rig.failed()
    assert failed.track.title == "A"
    assert LIMIT <= when - dry <= WINDOW
    assert isinstance(failed.error, SourceTooSlow)
    assert failed.error.user_message == "The track's server is sending audio slower than real time."
    # Operators see the measured rate.
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("too slow" in m and "x real time" in m for m in warning), warning
    # The queue moved on: B is heard in full.
    assert rig.started() == ["A", "B"]
    assert [f.decode() for f in rig.sink.audio][-3:] == ["B:0", "B:1", "B:2"]
    assert rig.player.state is PlayerState.IDLE
    assert rig.player.stats.source_errors == 1


async def test_a_short_hiccup_is_buffering_and_then_plays_on(rig: Rig) -> None:
    rig.play(rig.opener.script("A", 300, trickle=True), rig.opener.script("B", 3))
    await rig.clock.advance(F)
    a = rig.source("A")
    # Reads answered every 20 ms keep up; then one stall of 1.5 s (under the 2 s limit).
    await rig.trickle(a, every=F, frames=None, until=lambda: rig.player.position >= 1.0)
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.BUFFERING)
    await rig.clock.advance(1.5)
    assert rig.player.state is PlayerState.BUFFERING
    await rig.trickle(a, every=F, frames=None, until=lambda: rig.player.state is PlayerState.IDLE)
    assert rig.failed() == []
    assert [f.decode() for f in rig.sink.audio] == [
        *(f"A:{i}" for i in range(300)),
        "B:0",
        "B:1",
        "B:2",
    ]


async def test_a_track_with_no_audio_when_the_limit_is_reached_is_skipped(rig: Rig) -> None:
    gate = asyncio.Event()  # the open never returns: a server that answers nothing
    rig.play(rig.opener.script("A", 10, gate=gate), rig.opener.script("B", 3))
    await rig.clock.advance(LIMIT - 0.1)
    assert rig.player.state is PlayerState.LOADING
    assert rig.failed() == []
    await rig.clock.run_until(lambda: bool(rig.failed()))
    ((when, failed),) = rig.failed()
    assert when == pytest.approx(1000.0 + LIMIT)
    assert isinstance(failed.error, SourceTooSlow)
    assert failed.error.user_message == "The track's server sent no audio within 2 seconds."
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    assert rig.started() == ["B"]


async def test_time_paused_is_not_held_against_the_source(rig: Rig) -> None:
    gate = asyncio.Event()
    rig.play(rig.opener.script("A", 10, gate=gate))
    await rig.clock.advance(LIMIT / 2)
    assert rig.player.pause()
    await rig.clock.advance(10 * WINDOW)
    gate.set()
    assert rig.player.resume()
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    assert rig.failed() == []
    assert rig.started() == ["A"]


async def test_without_fill_a_stalled_source_still_fails_after_the_stall_timeout() -> None:
    """``fill_silence=False`` sends nothing while the source is late, so no silence frame is
    there to count the stall by: the judge's timer still ends it."""
    clock = FakeClock()
    opener = ScriptedOpener()
    sink = RecordingSink(clock)
    events: list[PlayerEvent] = []
    player = inline_player(
        sink,
        opener,
        clock,
        on_event=events.append,
        preload_s=0.0,
        fill_silence=False,
        stall_timeout=1.0,
        starve_window=WINDOW,
        starve_limit=LIMIT,
    )
    player.queue.add([opener.script("A", 1000, trickle=True), opener.script("B", 3)])
    assert player.start()
    try:
        await clock.run_until(lambda: player.state is PlayerState.BUFFERING)
        sent = len(sink.frames)
        await clock.advance(1.0 - F)
        assert player.state is PlayerState.BUFFERING
        assert len(sink.frames) == sent  # nothing stands in
        await clock.run_until(lambda: player.state is PlayerState.IDLE)
    finally:
        opener.release()
        await player.close()
    failed = [e for e in events if isinstance(e, TrackFailed)]
    assert [e.track.title for e in failed] == ["A"]
    assert failed[0].error.user_message == "The track's server stopped sending audio."
    assert [f.decode() for f in sink.audio][-3:] == ["B:0", "B:1", "B:2"]
