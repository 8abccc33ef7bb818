"""GuildPlayer on a fake clock: exact frame, speaking and silence sequences, track changes,
failures, seek, volume and clean shutdown.

Sources are ``ScriptedSource``s (frames ``b"A:0"``, ``b"A:1"``, ...) run by an inline executor,
so everything but time is real and time moves only when a test advances the ``FakeClock``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from legato.audio.handoff import inbox
from legato.audio.handoff import settle as settle_future
from legato.audio.pacer import EARLY, MIN_GAP
from legato.audio.player import (
    EndReason,
    GuildPlayer,
    PlayerEvent,
    PlayerState,
    QueueEnded,
    TrackEnded,
    TrackFailed,
    TrackStarted,
)
from legato.audio.queue import LoopMode, TrackQueue
from legato.audio.source import FrameSource, ShutDown, StreamLost
from legato.audio.track import Track
from legato.errors import AudioError, DecodeError, InvalidTransition, QueueEmpty
from tests.fakes import (
    FakeClock,
    InlineExecutor,
    PlayerRig,
    RecordingSink,
    ScriptedOpener,
    ScriptedSource,
    SettlingPool,
    TrickleSource,
    inline_player,
    make_frames,
    settle,
)

F = 0.020
S5 = ["S"] * 5


@dataclass
class Rig(PlayerRig):
    events: list[PlayerEvent] = field(default_factory=list)

    def track(self, name: str, frames: int = 0, **kw: object) -> Track:
        return self.opener.script(name, frames, **kw)  # type: ignore[arg-type]  # test kwargs

    def names(self) -> list[str]:
        out = []
        for e in self.events:
            if isinstance(e, TrackStarted):
                out.append(f"started {e.track.title}")
            elif isinstance(e, TrackEnded):
                out.append(f"ended {e.track.title} {e.reason.value}")
            elif isinstance(e, TrackFailed):
                out.append(f"failed {e.track.title}")
            else:
                out.append("queue ended")
        return out

    def gaps(self) -> list[float]:
        t = self.sink.frame_times
        return [round(b - a, 9) for a, b in itertools.pairwise(t)]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    clock = FakeClock()
    sink = RecordingSink(clock)
    opener = ScriptedOpener()
    events: list[PlayerEvent] = []
    player = inline_player(sink, opener, clock, on_event=events.append, guild_id=42)
    yield Rig(clock, sink, opener, player, events)
    await player.close()


def state_of(player: GuildPlayer) -> PlayerState:
    """The state, read through a call (mypy would otherwise keep an earlier narrowing)."""
    return player.state


def others() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_play_pause_resume_stop_sequence(rig: Rig) -> None:
    a = rig.track("A", 50)
    rig.play(a)
    await settle()
    assert state_of(rig.player) is PlayerState.PLAYING
    assert rig.sink.timeline() == ["on", "A:0"]
    await rig.clock.advance(5 * F)
    assert rig.player.position == pytest.approx(6 * F)
    assert rig.player.pause()
    assert state_of(rig.player) is PlayerState.PAUSED
    await rig.clock.advance(1.0)
    assert rig.player.position == pytest.approx(6 * F)
    assert rig.player.resume()
    await rig.clock.advance(2 * F)
    assert rig.player.stop()
    await rig.clock.advance(1.0)
    assert rig.sink.timeline() == [
        "on",
        *(f"A:{i}" for i in range(6)),
        *S5,
        "off",
        "on",
        "A:6",
        "A:7",
        "A:8",
        *S5,
        "off",
    ]
    assert state_of(rig.player) is PlayerState.IDLE
    assert rig.player.current is None
    assert rig.names() == ["started A", "ended A stopped"]
    assert rig.player.queue.history == (a,)
    assert rig.opener.sources[0].closed
    # Frames of one speaking burst (audio and its trailing silence) are exactly 20 ms apart.
    first_burst = rig.sink.frame_times[:11]
    assert [round(b - a, 9) for a, b in itertools.pairwise(first_burst)] == [F] * 10


async def test_speaking_on_is_awaited_before_the_first_frame(rig: Rig) -> None:
    gate = asyncio.Event()
    rig.sink.speaking_gate = gate
    rig.play(rig.track("A", 20))
    await rig.clock.advance(0.1)
    assert rig.sink.frames == []
    gate.set()
    await settle()
    assert rig.sink.timeline() == ["on", "A:0"]


async def test_gapless_transition_and_queue_end(rig: Rig) -> None:
    rig.play(rig.track("A", 7), rig.track("B", 9))
    await rig.clock.run_until(lambda: rig.sink.speaking_changes == [True, False])
    assert rig.sink.timeline() == [
        "on",
        *(f.decode() for f in make_frames("A", 7)),
        *(f.decode() for f in make_frames("B", 9)),
        *S5,
        "off",
    ]
    assert rig.gaps() == [F] * (7 + 9 + 5 - 1)
    assert rig.names() == [
        "started A",
        "ended A finished",
        "started B",
        "ended B finished",
        "queue ended",
    ]
    assert state_of(rig.player) is PlayerState.IDLE
    # B was opened while A played (preloaded), each source exactly once.
    assert rig.opener.opened == [("A", 0.0), ("B", 0.0)]
    assert all(s.closed for s in rig.opener.sources)


async def test_skip_uses_preloaded_next_without_a_gap(rig: Rig) -> None:
    rig.play(rig.track("A", 50), rig.track("B", 3))
    await rig.clock.advance(2 * F)
    assert rig.player.skip()
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    await rig.clock.advance(1.0)
    assert rig.sink.timeline() == ["on", "A:0", "A:1", "A:2", "B:0", "B:1", "B:2", *S5, "off"]
    assert rig.gaps() == [F] * 10
    assert rig.names()[:3] == ["started A", "ended A skipped", "started B"]


async def test_skip_on_last_track_ends_queue(rig: Rig) -> None:
    rig.play(rig.track("A", 50))
    await rig.clock.advance(F)
    assert rig.player.skip()
    await rig.clock.advance(1.0)
    assert rig.sink.timeline() == ["on", "A:0", "A:1", *S5, "off"]
    assert rig.names() == ["started A", "ended A skipped", "queue ended"]
    assert not rig.player.skip()


async def test_skip_of_a_track_no_longer_current_skips_nothing(rig: Rig) -> None:
    a, b, c = rig.track("A", 50), rig.track("B", 50), rig.track("C", 50)
    rig.play(a, b, c)
    await rig.clock.advance(2 * F)
    assert rig.player.skip(a)
    # A second skip of A (asked for while A played) does not skip B, which replaced it.
    assert not rig.player.skip(a)
    assert rig.player.current is b
    await rig.clock.advance(2 * F)
    assert rig.names() == ["started A", "ended A skipped", "started B"]
    assert rig.player.skip(b)
    assert rig.player.current is c


async def test_failing_open_is_reported_and_next_track_plays(rig: Rig) -> None:
    error = DecodeError("404 from http://x/bad", user_message="That track could not be opened.")
    rig.play(rig.track("A", 3), rig.track("BAD", error=error), rig.track("C", 3))
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    await rig.clock.advance(1.0)
    assert rig.sink.audio == [*make_frames("A", 3), *make_frames("C", 3)]
    failed = [e for e in rig.events if isinstance(e, TrackFailed)]
    assert len(failed) == 1
    assert failed[0].track.title == "BAD"
    assert failed[0].error is error
    assert rig.names() == [
        "started A",
        "ended A finished",
        "failed BAD",
        "started C",
        "ended C finished",
        "queue ended",
    ]
    assert rig.player.stats.source_errors == 1


async def test_read_error_mid_track_plays_what_was_read_then_moves_on(rig: Rig) -> None:
    rig.play(rig.track("A", 20, fail_at=4), rig.track("B", 2))
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    assert rig.sink.audio == [*make_frames("A", 4), *make_frames("B", 2)]
    failed = [e for e in rig.events if isinstance(e, TrackFailed)]
    assert [type(e.error) for e in failed] == [DecodeError]
    assert "frame 4" in str(failed[0].error)
    assert rig.names()[:3] == ["started A", "failed A", "started B"]


async def test_unexpected_opener_exception_becomes_audio_error(rig: Rig) -> None:
    async def broken(track: Track, start: float) -> FrameSource:
        raise RuntimeError("bug in an opener")

    events: list[PlayerEvent] = []
    player = GuildPlayer(
        rig.sink, broken, clock=rig.clock, executor=InlineExecutor(), on_event=events.append
    )
    player.queue.add([Track(url="x", title="x")])
    player.start()
    await rig.clock.run_until(lambda: player.state is PlayerState.IDLE)
    assert isinstance(events[0], TrackFailed)
    assert isinstance(events[0].error, AudioError)
    assert "bug in an opener" in str(events[0].error)
    assert isinstance(events[1], QueueEnded)
    await player.close()


async def test_every_track_failing_in_a_looped_queue_stops(rig: Rig) -> None:
    rig.player.queue.loop = LoopMode.QUEUE
    rig.play(rig.track("X", error=DecodeError("x")), rig.track("Y", error=DecodeError("y")))
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    assert rig.names()[-1] == "queue ended"
    assert rig.names().count("failed X") >= 1
    assert rig.sink.frames == []


async def test_loop_track_repeats_gaplessly(rig: Rig) -> None:
    rig.player.queue.loop = LoopMode.TRACK
    rig.play(rig.track("A", 3), rig.track("B", 2))
    await rig.clock.run_until(lambda: rig.names().count("started A") == 3)
    await rig.clock.advance(2 * F)
    rig.player.skip()  # a skip leaves the looped track; the loop mode stays, so B loops next
    await rig.clock.run_until(lambda: rig.names().count("started B") == 2)
    audio = [f.decode() for f in rig.sink.audio]
    assert audio == ["A:0", "A:1", "A:2"] * 3 + ["B:0", "B:1", "B:0"]
    assert rig.gaps() == [F] * (len(audio) - 1)
    assert [t.title for t in rig.player.queue.history] == ["A"]


async def test_previous_replays_from_history(rig: Rig) -> None:
    a, b = rig.track("A", 40), rig.track("B", 40)
    rig.play(a, b)
    await rig.clock.advance(F)
    rig.player.skip()
    await rig.clock.advance(F)
    assert rig.player.previous() is a
    await rig.clock.advance(F)
    assert rig.player.current is a
    assert rig.player.queue.upcoming == (b,)
    assert [f.decode() for f in rig.sink.audio] == ["A:0", "A:1", "B:0", "A:0"]
    assert "ended B replaced" in rig.names()


async def test_previous_without_history_raises(rig: Rig) -> None:
    rig.play(rig.track("A", 40))
    with pytest.raises(QueueEmpty):
        rig.player.previous()
    assert rig.player.current is not None


async def test_seek_jumps_and_position_counts_sent_audio(rig: Rig) -> None:
    rig.play(rig.track("A", 200))
    await rig.clock.advance(4 * F)
    await rig.player.seek(2.0)
    assert rig.player.position == pytest.approx(2.0)
    await rig.clock.advance(3 * F)
    audio = [f.decode() for f in rig.sink.audio]
    assert audio[:5] == [f"A:{i}" for i in range(5)]
    assert audio[5] == "A:100"
    assert audio[5:] == [f"A:{i}" for i in range(100, 100 + len(audio) - 5)]
    assert rig.player.position == pytest.approx(2.0 + (len(audio) - 5) * F)
    assert rig.opener.sources[0].seeks == [2.0]
    assert rig.player.stats.underruns == 0


async def test_seek_with_nothing_playing_is_queue_empty(rig: Rig) -> None:
    with pytest.raises(QueueEmpty):
        await rig.player.seek(3.0)


async def test_volume_reaches_current_and_next_sources(rig: Rig) -> None:
    rig.play(rig.track("A", 30), rig.track("B", 5))
    await rig.clock.advance(F)
    await rig.player.set_volume(0.5)
    assert rig.player.volume == 0.5
    sources = rig.opener.sources
    assert [s.volume for s in sources] == [0.5, 0.5]
    assert not sources[0].passthrough
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    audio = [f.decode() for f in rig.sink.audio]
    # Frames buffered before the change keep the old volume; every later one carries it.
    first_scaled = next(i for i, f in enumerate(audio) if f.endswith("@0.5"))
    assert all(f.endswith("@0.5") for f in audio[first_scaled:])
    assert first_scaled <= 2 + 5  # two frames sent, then at most one buffer (100 ms) late
    assert audio[-5:] == [f"B:{i}@0.5" for i in range(5)]
    with pytest.raises(AudioError) as info:
        await rig.player.set_volume(3.0)
    assert "Volume" in info.value.user_message


async def test_volume_applies_to_tracks_opened_later(rig: Rig) -> None:
    await rig.player.set_volume(1.5)
    rig.play(rig.track("A", 2))
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    assert [f.decode() for f in rig.sink.audio] == ["A:0@1.5", "A:1@1.5"]


async def test_loading_state_while_open_is_slow_and_pause_during_loading(rig: Rig) -> None:
    gate = asyncio.Event()
    rig.play(rig.track("A", 10, gate=gate))
    await rig.clock.advance(0.5)
    assert rig.player.state is PlayerState.LOADING
    assert rig.sink.events == []
    assert rig.player.pause()
    gate.set()
    await rig.clock.advance(0.5)
    assert state_of(rig.player) is PlayerState.PAUSED
    assert rig.sink.events == []
    assert rig.player.stats.buffer_frames == 5
    assert rig.player.resume()
    assert state_of(rig.player) is PlayerState.PLAYING
    await settle()
    assert rig.sink.timeline() == ["on", "A:0"]


async def test_stall_re_anchors_without_burst(rig: Rig) -> None:
    rig.play(rig.track("A", 100))
    await rig.clock.advance(5 * F)
    await rig.clock.stall(0.2)
    await rig.clock.advance(5 * F)
    gaps = rig.gaps()
    assert min(gaps) >= F - 1e-9
    assert max(gaps) == pytest.approx(0.2)
    assert len(rig.sink.audio) == 6 + 1 + 5
    assert rig.player.stats.reanchors == 1
    assert [f.decode() for f in rig.sink.audio] == [f"A:{i}" for i in range(12)]


class HeldSink(RecordingSink):
    """A sink whose send of one chosen frame is held up (the sender preempted between its clock
    read and the send call): the frame leaves, and is recorded, ``hold`` seconds later."""

    def __init__(self, clock: FakeClock, frame: bytes, hold: float) -> None:
        super().__init__(clock)
        self._clock, self._frame, self._hold = clock, frame, hold

    def send_frame(self, opus: bytes) -> None:
        if opus == self._frame:
            self._clock.hold(self._hold)
        super().send_frame(opus)


async def test_the_last_buffered_frame_held_up_in_its_send_keeps_the_next_min_gap_away() -> None:
    """The buffer's last frame is held up 12 ms in its send, and the refill comes right after:
    the next frame keeps ``MIN_GAP`` from when the held one left, not from when it was due (8 ms
    after it left, on the grid; a frame catching up would have been 3 ms after it)."""
    clock = FakeClock()
    opener = ScriptedOpener()
    track = opener.script("A", 60, trickle=True)
    first_fill = 5  # 100 ms of buffer: the first read's frames
    sink = HeldSink(clock, f"A:{first_fill - 1}".encode(), 0.012)
    player = inline_player(sink, opener, clock, stall_timeout=600.0)
    player.queue.add([track])
    player.start()
    await settle()
    source = opener.sources[0]
    assert isinstance(source, TrickleSource)
    await clock.run_until(lambda: len(sink.audio) == first_fill)
    assert player.stats.underruns == 0
    source.deliver()  # the refill, at once after the held frame left
    await clock.run_until(lambda: len(sink.audio) == first_fill + 3)
    await player.close()
    assert [f.decode() for f in sink.audio] == [f"A:{i}" for i in range(first_fill + 3)]
    gaps = [round(b - a, 9) for a, b in itertools.pairwise(sink.frame_times)]
    assert min(gaps) >= MIN_GAP - EARLY


async def test_without_fill_a_slow_source_underruns_and_re_anchors() -> None:
    """``fill_silence=False``: nothing goes out while the source is late; the grid re-anchors."""
    pool = SettlingPool(1)
    clock = FakeClock(quiesce=pool.quiet)
    sink = RecordingSink(clock)
    gate = threading.Event()
    gate.set()
    holder: list[ScriptedSource] = []
    opener = ScriptedOpener(on_open=holder.append)
    track = opener.script("A", 100)
    with pool:
        player = GuildPlayer(
            sink, opener, clock=clock, executor=pool, buffer_ms=100, fill_silence=False
        )
        player.queue.add([track])
        player.start()
        async with asyncio.timeout(10):
            await sink.wait_frames(1)
            holder[0].on_park = pool.parking
            holder[0].gate = gate
            gate.clear()  # the next read blocks: the source is stuck
            await clock.run_until(lambda: player.stats.underruns == 1)
            sent = len(sink.audio)
            await clock.advance(0.2)
            assert len(sink.audio) == sent
            gate.set()
            await sink.wait_for(lambda s: len(s.audio) > sent)
            await clock.advance(3 * F)
        await player.close()
    gaps = [round(b - a, 9) for a, b in itertools.pairwise(sink.frame_times)]
    assert min(gaps) >= F - 1e-9
    assert player.stats.reanchors == 1
    assert [f.decode() for f in sink.audio] == [f"A:{i}" for i in range(len(sink.audio))]


async def test_close_cancels_everything_and_is_idempotent(rig: Rig) -> None:
    gate = asyncio.Event()
    rig.play(rig.track("A", 40), rig.track("B", 40, gate=gate))
    await rig.clock.advance(3 * F)
    assert others()  # feeders are alive (A's and B's, B stuck opening)
    await rig.player.close()
    assert rig.player.state is PlayerState.CLOSED
    assert others() == set()
    assert rig.clock.pending == 0
    assert all(s.closed for s in rig.opener.sources)
    assert rig.names() == ["started A", "ended A closed"]
    await rig.player.close()
    with pytest.raises(InvalidTransition):
        rig.player.start()
    sent = len(rig.sink.frames)
    await rig.clock.advance(1.0)
    assert len(rig.sink.frames) == sent


async def test_close_while_waiting_for_a_state_fails_the_waiter(rig: Rig) -> None:
    waiter = asyncio.ensure_future(rig.player.wait_for(PlayerState.PLAYING))
    await settle()
    await rig.player.close()
    with pytest.raises(InvalidTransition):
        await waiter


async def test_event_handler_exception_is_logged_and_music_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    sink = RecordingSink(clock)
    opener = ScriptedOpener()

    def handler(event: PlayerEvent) -> None:
        raise ValueError("handler bug")

    player = GuildPlayer(
        sink, opener, clock=clock, executor=InlineExecutor(), on_event=handler, guild_id=77
    )
    player.queue.add([opener.script("A", 3), opener.script("B", 3)])
    with caplog.at_level(logging.ERROR, logger="legato.audio.player"):
        player.start()
        await clock.run_until(lambda: player.state is PlayerState.IDLE)
    assert len(sink.audio) == 6
    assert any("[guild 77]" in r.getMessage() for r in caplog.records)
    await player.close()


async def test_start_returns_false_when_busy_or_empty(rig: Rig) -> None:
    assert not rig.player.start()
    assert not rig.player.pause()
    assert not rig.player.resume()
    assert not rig.player.stop()
    rig.play(rig.track("A", 10))
    assert not rig.player.start()


async def test_wait_for_state(rig: Rig) -> None:
    rig.play(rig.track("A", 3))
    await rig.player.wait_for(PlayerState.PLAYING)
    waiter = asyncio.ensure_future(rig.player.wait_for(PlayerState.IDLE))
    await rig.clock.advance(0.1)
    assert waiter.done()
    await waiter


async def test_stats_count_frames_and_lateness(rig: Rig) -> None:
    rig.play(rig.track("A", 10))
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    await rig.clock.advance(1.0)
    stats = rig.player.stats
    assert stats.frames_sent == 10
    assert stats.silence_sent == 5
    assert stats.late_frames == 0
    assert stats.max_lateness_ms == 0.0
    assert stats.p99_lateness_ms == 0.0
    assert stats.buffer_frames == 0


async def test_queue_edits_after_preload_are_respected(rig: Rig) -> None:
    queue = TrackQueue()
    rig.player.queue.add([rig.track("A", 6), rig.track("B", 6)])
    del queue
    assert rig.player.start()
    await rig.clock.advance(F)
    # B is already preloaded; the user removes it and adds C instead.
    removed = rig.player.queue.remove(0)
    assert removed.title == "B"
    rig.player.queue.add([rig.track("C", 2)])
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    assert [f.decode() for f in rig.sink.audio] == [*(f"A:{i}" for i in range(6)), "C:0", "C:1"]
    assert all(s.closed for s in rig.opener.sources)
    assert [s.tag for s in rig.opener.sources] == ["A", "B", "C"]
    assert EndReason.FINISHED in [e.reason for e in rig.events if isinstance(e, TrackEnded)]


async def test_frames_are_read_in_chunks_not_one_by_one() -> None:
    clock = FakeClock()
    sink = RecordingSink(clock)
    opener = ScriptedOpener()
    player = GuildPlayer(sink, opener, clock=clock, executor=InlineExecutor(), buffer_ms=300)
    player.queue.add([opener.script("A", 100)])
    player.start()
    await clock.run_until(lambda: player.state is PlayerState.IDLE)
    reads = opener.sources[0].reads
    assert reads[0] == 15  # the whole buffer first
    assert min(reads) >= 7  # then a half to two thirds of it at a time
    assert len(reads) <= 2 + 100 // 7
    assert len(sink.audio) == 100
    await player.close()


@pytest.mark.parametrize("volume", [1.0, 0.5])
async def test_a_passthrough_track_reads_up_to_its_own_buffer(volume: float) -> None:
    """``passthrough_buffer_ms``: once a track passing Opus through has started, reads fill up
    to it (from the same low-water mark, so larger and fewer); its first fill, and every read of
    a transcoding one (volume 0.5), are up to ``buffer_ms``."""
    clock = FakeClock()
    sink = RecordingSink(clock)
    opener = ScriptedOpener()
    player = GuildPlayer(
        sink,
        opener,
        clock=clock,
        executor=InlineExecutor(),
        buffer_ms=300,
        passthrough_buffer_ms=600,
        volume=volume,
    )
    player.queue.add([opener.script("A", 200)])
    player.start()
    await clock.run_until(lambda: player.state is PlayerState.IDLE)
    reads = opener.sources[0].reads
    cap = 30 if volume == 1.0 else 15
    assert reads[0] == 15  # the first fill: no later a start than with buffer_ms alone
    assert all(cap - 8 <= r <= cap - 5 for r in reads[1:])  # from the low-water mark (5 to 8)
    assert len(sink.audio) == 200
    await player.close()


async def test_previous_after_queue_end_replays_last_track(rig: Rig) -> None:
    rig.play(rig.track("A", 2))
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    assert rig.player.previous().title == "A"
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    assert [f.decode() for f in rig.sink.audio] == ["A:0", "A:1", "A:0", "A:1"]
    assert rig.names().count("queue ended") == 2


async def test_stop_then_start_plays_the_next_track(rig: Rig) -> None:
    rig.play(rig.track("A", 40), rig.track("B", 2))
    await rig.clock.advance(F)
    assert rig.player.stop()
    await rig.clock.advance(1.0)
    assert rig.player.start()
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    assert [f.decode() for f in rig.sink.audio] == ["A:0", "A:1", "B:0", "B:1"]
    assert [t.title for t in rig.player.queue.history] == ["A", "B"]


@pytest.mark.parametrize("frames_per_step", [1, 8])
async def test_source_calls_never_overlap_with_a_real_thread_pool(frames_per_step: int) -> None:
    """Seek and volume requests race the feeder's reads; the source must see one call at a time
    (``ScriptedSource`` raises AssertionError on overlap, which would surface as TrackFailed).
    Eight frames a step drain the buffer, so refill reads are out when requests arrive."""
    clock = FakeClock()
    sink = RecordingSink(clock)
    opener = ScriptedOpener()
    events: list[PlayerEvent] = []
    with ThreadPoolExecutor(4) as pool:
        player = GuildPlayer(
            sink, opener, clock=clock, executor=pool, buffer_ms=200, on_event=events.append
        )
        player.queue.add([opener.script("A", 3000), opener.script("B", 3000)])
        player.start()
        async with asyncio.timeout(20):
            await sink.wait_frames(1)
            for i in range(40):
                requests = [player.seek(i * 0.5), player.set_volume(0.5 + (i % 3) * 0.25)]
                await asyncio.gather(*requests)
                for _ in range(frames_per_step):
                    await clock.advance(F)
        await player.close()
    assert not [e for e in events if isinstance(e, TrackFailed)]
    assert all(s.closed for s in opener.sources)
    assert len(opener.sources[0].seeks) == 40
    if frames_per_step > 1:
        # The refills raced the requests: far more reads than the 40 seeks alone would need.
        assert len(opener.sources[0].reads) > 50


async def test_tone_source_plays_real_opus_at_its_frequency() -> None:
    from legato.audio.encode import decode_opus_packets
    from legato.sandbox.analysis import dominant_frequency, pcm_to_mono
    from tests.fakes import ToneSource

    clock = FakeClock()
    sink = RecordingSink(clock)

    async def opener(track: Track, start: float) -> FrameSource:
        return ToneSource(freq=float(track.url), seconds=0.5)

    player = GuildPlayer(sink, opener, clock=clock, executor=InlineExecutor())
    player.queue.add([Track(url="523", title="c5")])
    player.start()
    await clock.run_until(lambda: player.state is PlayerState.IDLE)
    assert len(sink.audio) == 25
    mono = pcm_to_mono(decode_opus_packets(sink.audio))
    assert dominant_frequency(mono) == pytest.approx(523.0, abs=2.0)
    await player.close()


async def test_failed_seek_raises_and_the_track_plays_on(rig: Rig) -> None:
    rig.play(rig.track("LIVE", 100, seekable=False))
    await rig.clock.advance(2 * F)
    with pytest.raises(DecodeError) as info:
        await rig.player.seek(1.0)
    assert info.value.user_message == "This stream cannot seek."
    await rig.clock.advance(3 * F)
    # Nothing was dropped: the track goes on frame after frame.
    assert [f.decode() for f in rig.sink.audio] == [f"LIVE:{i}" for i in range(6)]
    assert rig.player.position == pytest.approx(6 * F)
    assert rig.player.state is PlayerState.PLAYING
    assert not [e for e in rig.events if isinstance(e, TrackFailed)]


async def test_volume_change_racing_a_track_change_does_not_fail(rig: Rig) -> None:
    gate = asyncio.Event()
    rig.play(rig.track("A", 40, gate=gate), rig.track("B", 3))
    change = asyncio.ensure_future(rig.player.set_volume(0.5))
    await settle()
    rig.player.skip()  # A (still opening) is dropped with the volume request pending
    await change
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    assert [f.decode() for f in rig.sink.audio] == ["B:0@0.5", "B:1@0.5", "B:2@0.5"]


async def test_a_raising_sink_loses_frames_but_not_the_player(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()

    class FlakySink(RecordingSink):
        def send_frame(self, opus: bytes) -> None:
            if opus in (b"A:2", b"A:3", b"A:4"):
                raise OSError("transport went away")
            super().send_frame(opus)

    sink = FlakySink(clock)
    opener = ScriptedOpener()
    player = GuildPlayer(sink, opener, clock=clock, executor=InlineExecutor(), guild_id=5)
    player.queue.add([opener.script("A", 8)])
    with caplog.at_level(logging.ERROR, logger="legato.audio.player"):
        player.start()
        await clock.run_until(lambda: player.state is PlayerState.IDLE)
        await clock.advance(1.0)
    assert [f.decode() for f in sink.audio] == ["A:0", "A:1", "A:5", "A:6", "A:7"]
    assert sink.speaking_changes == [True, False]
    assert player.stats.sink_errors == 3
    assert len([r for r in caplog.records if "send_frame failed" in r.getMessage()]) == 2
    await player.close()


async def test_a_stalled_source_is_filled_with_silence_on_the_grid() -> None:
    """While the source is stuck, silence goes out every 20 ms with speaking on (the stream's
    clock keeps going); when audio comes back it continues on the same grid.

    The source's refills come back when the test says (``TrickleSource``), in fake time: with a
    real thread pool the reads after the stall raced the fake clock, and a read that came back
    late in fake time underran the buffer a second time.
    """
    clock = FakeClock()
    sink = RecordingSink(clock)
    opener = ScriptedOpener()
    track = opener.script("A", 60, trickle=True)
    player = inline_player(
        sink, opener, clock, stall_timeout=600.0, starve_window=1200.0, starve_limit=600.0
    )
    player.queue.add([track])
    player.start()
    await settle()
    source = opener.sources[0]
    assert isinstance(source, TrickleSource)
    # The first refill is held: the source is stuck.
    await clock.run_until(lambda: player.stats.silence_sent >= 10)
    assert player.stats.underruns == 1
    assert sink.speaking
    # Then every read comes back at the next frame's time.
    for _ in range(1000):
        if player.state is PlayerState.IDLE:
            break
        source.deliver()
        await clock.advance(F)
    await clock.advance(1.0)
    await player.close()
    timeline = sink.timeline()
    first_fill = timeline.index("S")
    last_fill = len(timeline) - 1 - timeline[::-1].index("A:59") - 1
    # One speaking burst: on, audio, silence standing in, audio again, trailing silence, off.
    assert sink.speaking_changes == [True, False]
    assert all(t == "S" for t in timeline[first_fill : last_fill + 1] if not t.startswith("A:"))
    assert [f.decode() for f in sink.audio] == [f"A:{i}" for i in range(60)]
    # Every frame, silence or audio, on the 20 ms grid: only the first fill frame is late
    # (one frame after the missing audio was due), and that moved the grid once.
    gaps = [round(b - a, 9) for a, b in itertools.pairwise(sink.frame_times)]
    assert sorted(set(gaps)) == [F, 2 * F]
    assert gaps.count(2 * F) == 1
    assert player.stats.reanchors == 1
    assert player.stats.silence_sent >= 10 + 5


async def test_a_source_stalled_past_the_timeout_fails_and_the_next_track_plays() -> None:
    pool = SettlingPool(2)
    clock = FakeClock(quiesce=pool.quiet)
    sink = RecordingSink(clock)
    gate = threading.Event()
    holder: list[ScriptedSource] = []
    opener = ScriptedOpener(on_open=holder.append)
    events: list[PlayerEvent] = []
    with pool:
        player = GuildPlayer(
            sink,
            opener,
            clock=clock,
            executor=pool,
            buffer_ms=100,
            stall_timeout=0.5,
            preload_s=0.0,
            on_event=events.append,
        )
        player.queue.add([opener.script("A", 1000), opener.script("B", 3)])
        player.start()
        try:
            async with asyncio.timeout(20):
                await sink.wait_frames(1)
                holder[0].on_park = pool.parking
                holder[0].gate = gate  # A's next read blocks for good
                await clock.run_until(lambda: player.state is PlayerState.IDLE)
                await clock.advance(1.0)
        finally:
            gate.set()  # release the worker so that close() can close A
            await player.close()
    failed = [e for e in events if isinstance(e, TrackFailed)]
    assert [e.track.title for e in failed] == ["A"]
    assert failed[0].error.user_message == "The track's server stopped sending audio."
    assert "stalled" in str(failed[0].error)
    assert [type(e).__name__ for e in events] == [
        "TrackStarted",
        "TrackFailed",
        "TrackStarted",
        "TrackEnded",
        "QueueEnded",
    ]
    audio = [f.decode() for f in sink.audio]
    assert audio[-3:] == ["B:0", "B:1", "B:2"]
    # About 0.5 s of silence stood in before A was given up (one frame of slack at each end).
    timeline = sink.timeline()
    fill = timeline[timeline.index(audio[-4]) + 1 : timeline.index("B:0")]
    assert 0.5 / F <= fill.count("S") <= 0.5 / F + 2 + 5
    assert player.stats.source_errors == 1
    assert all(s.closed for s in holder)


async def test_a_stream_that_breaks_off_is_reopened_where_it_stopped(rig: Rig) -> None:
    rig.play(rig.track("A", 20, lost_at=(6,)), rig.track("B", 2))
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    await rig.clock.advance(1.0)
    assert rig.sink.audio == [*make_frames("A", 20), *make_frames("B", 2)]
    assert [(t, round(p, 6)) for t, p in rig.opener.opened if t == "A"] == [
        ("A", 0.0),
        ("A", round(6 * F, 6)),
    ]
    assert not [e for e in rig.events if isinstance(e, TrackFailed)]
    assert rig.names()[:2] == ["started A", "ended A finished"]
    assert set(rig.gaps()) == {F}  # reopened in time: no gap, no silence
    assert all(s.closed for s in rig.opener.sources)
    assert (rig.player.stats.reopens, rig.player.stats.source_errors) == (1, 0)


async def test_a_stream_that_keeps_breaking_off_fails_after_bounded_reopens(rig: Rig) -> None:
    rig.play(rig.track("A", 20, lost_at=(6, 6, 6, 6)), rig.track("B", 2))
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    await rig.clock.advance(1.0)
    assert rig.sink.audio == [*make_frames("A", 6), *make_frames("B", 2)]
    assert [t for t, _ in rig.opener.opened].count("A") == 3  # the first open and 2 reopens
    failed = [e for e in rig.events if isinstance(e, TrackFailed)]
    assert [e.track.title for e in failed] == ["A"]
    assert isinstance(failed[0].error, StreamLost)
    assert failed[0].error.user_message == "The connection to the track's server was lost."
    assert rig.names()[-3:] == ["started B", "ended B finished", "queue ended"]
    assert (rig.player.stats.reopens, rig.player.stats.source_errors) == (2, 1)


async def test_reopens_are_counted_only_while_no_audio_comes(rig: Rig) -> None:
    """A long stream whose URL expires every few frames plays to its end: each reopen gave
    audio, so the bound (2 reopens without audio in between) is never reached."""
    rig.play(rig.track("A", 30, lost_at=(5, 10, 15, 20, 25)))
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    assert rig.sink.audio == make_frames("A", 30)
    assert [t for t, _ in rig.opener.opened] == ["A"] * 6
    assert not [e for e in rig.events if isinstance(e, TrackFailed)]
    assert rig.player.stats.reopens == 5


async def test_an_executor_shut_down_under_the_player_ends_tracks_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its owner shut the executor down first (an extension unloading): the read it refuses and
    the next track's open (refused deeper down, in the opener) end the tracks as closed ones,
    with no failure, no stall and no traceback; the player still closes cleanly."""
    clock = FakeClock()
    sink = RecordingSink(clock)
    scripted = ScriptedOpener()
    events: list[PlayerEvent] = []
    pool = ThreadPoolExecutor(2, thread_name_prefix="test-gone")

    async def opener(track: Track, start: float) -> FrameSource:
        # As the real opener does: resolve and open in the same executor, and say that it was
        # refused for being shut down (``ShutDown``: submit raises no other RuntimeError).
        try:
            job = asyncio.get_running_loop().run_in_executor(pool, int)
        except RuntimeError as exc:
            raise ShutDown(str(exc)) from exc
        await job
        return await scripted(track, start)

    player = GuildPlayer(
        sink, opener, clock=clock, executor=pool, buffer_ms=100, on_event=events.append
    )
    player.queue.add([scripted.script("A", 3000), scripted.script("B", 3000)])
    closing = "the player is closing"
    with caplog.at_level(logging.INFO, logger="legato.audio.player"):
        player.start()
        async with asyncio.timeout(20):
            await sink.wait_frames(1)
        pool.shutdown(wait=True)
        await clock.run_until(lambda: closing in caplog.text)  # A's next read was refused
        await clock.advance(30.0)  # three stall timeouts: a closed track is not a stalled one
        player.skip()
        await clock.run_until(lambda: caplog.text.count(closing) == 2)  # B's open was refused
        await player.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # A played until skipped; B never started; nothing failed.
    assert [(type(e).__name__, getattr(e, "reason", None)) for e in events] == [
        ("TrackStarted", None),
        ("TrackEnded", EndReason.SKIPPED),
    ]
    assert others() == set()
    assert [s.closed for s in scripted.sources] == [True]


async def test_results_from_many_worker_threads_each_reach_their_future_in_batches() -> None:
    """The readers' hand-back: every result and exception lands on its own future, and a burst
    of results costs fewer loop wake-ups than results."""
    loop = asyncio.get_running_loop()
    box = inbox(loop)
    assert inbox(loop) is box
    futures = [loop.create_future() for _ in range(400)]
    wakes = box.wakes
    gate = threading.Barrier(4)

    def worker(part: int) -> None:
        gate.wait()
        for k in range(part, len(futures), 4):
            if k % 7 == 0:
                box.put(settle_future, futures[k], None, ValueError(f"job {k}"))
            else:
                box.put(settle_future, futures[k], k * 2, None)

    with ThreadPoolExecutor(4) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, worker, p) for p in range(4)))
    results = await asyncio.gather(*futures, return_exceptions=True)
    for k, r in enumerate(results):
        if k % 7 == 0:
            assert isinstance(r, ValueError)
            assert str(r) == f"job {k}"
        else:
            assert r == k * 2
    assert 1 <= box.wakes - wakes < len(futures)


async def test_results_put_while_the_loop_drains_are_never_left_undelivered() -> None:
    """Threads put results while the loop is draining earlier ones, interleaved as finely as
    the interpreter allows: every result arrives (a put that saw a drain under way and woke
    nothing still has its drain)."""
    loop = asyncio.get_running_loop()
    box = inbox(loop)
    futures = [loop.create_future() for _ in range(20_000)]
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:

        def worker(part: int) -> None:
            for k in range(part, len(futures), 3):
                box.put(settle_future, futures[k], k, None)

        with ThreadPoolExecutor(3) as pool:
            async with asyncio.timeout(30):  # an undelivered result hangs here
                await asyncio.gather(*(loop.run_in_executor(pool, worker, p) for p in range(3)))
                results = await asyncio.gather(*futures)
    finally:
        sys.setswitchinterval(before)
    assert results == list(range(len(futures)))
