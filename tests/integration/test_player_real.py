"""GuildPlayer with the real pipeline: yt-dlp resolves tracks on the local media server, PyAV
decodes (or passes Opus through) in a thread pool, the player paces on the real loop clock.

Assertions are on content (what the recorded Opus decodes to, frame counts, event order), never
on timing: the machine is shared and loaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from legato.audio.analysis import dominant_frequency, pcm_to_mono, rms
from legato.audio.encode import OpusSettings, decode_opus_packets
from legato.audio.player import (
    GuildPlayer,
    PlayerEvent,
    PlayerState,
    QueueEnded,
    TrackEnded,
    TrackFailed,
    TrackStarted,
    make_opener,
)
from legato.audio.resolve import Resolver, ResolverSettings
from legato.audio.sink import OPUS_SILENCE
from legato.audio.track import Track
from legato.errors import AudioError
from tests.fakes import RecordingSink
from tests.media import MediaServer, expected_frames, write_tone

pytestmark = pytest.mark.integration

SECONDS = 1.5


@dataclass
class Recorder:
    """Splits the sink's frames by track, using the frame count at each event."""

    sink: RecordingSink
    events: list[PlayerEvent] = field(default_factory=list)
    spans: dict[str, list[int]] = field(default_factory=dict)

    def __call__(self, event: PlayerEvent) -> None:
        self.events.append(event)
        count = len(self.sink.frames)
        if isinstance(event, TrackStarted):
            self.spans[event.track.title] = [count - 1]  # its first frame was just sent
        elif isinstance(event, TrackEnded):
            self.spans[event.track.title].append(count)

    def frames_of(self, title: str) -> list[bytes]:
        start, end = self.spans[title]
        return self.sink.frames[start:end]


@dataclass
class Pipeline:
    resolver: Resolver
    pool: ThreadPoolExecutor
    server: MediaServer
    tmp: Path

    async def track(self, name: str, freq: float, container: str, codec: str) -> Track:
        path = write_tone(
            self.tmp / name, container=container, codec=codec, freq=freq, seconds=SECONDS
        )
        url = self.server.add_file(f"player-real/{name}", path)
        tracks = await self.resolver.resolve(url)
        assert len(tracks) == 1
        return Track(url=tracks[0].url, title=name, duration=tracks[0].duration)

    def player(self, sink: RecordingSink, recorder: Recorder) -> GuildPlayer:
        opener = make_opener(self.resolver, opus=OpusSettings(), executor=self.pool)
        return GuildPlayer(sink, opener, executor=self.pool, on_event=recorder, guild_id=1)


@pytest.fixture
async def pipeline(media_server: MediaServer, tmp_path: Path) -> AsyncIterator[Pipeline]:
    with ThreadPoolExecutor(4, thread_name_prefix="test-player") as pool:
        resolver = Resolver(ResolverSettings(timeout=20.0), pool)
        yield Pipeline(resolver, pool, media_server, tmp_path)


def tone_of(frames: list[bytes]) -> float:
    mono = pcm_to_mono(decode_opus_packets(frames))
    assert rms(mono) > 0.1, "the track decoded to near silence"
    return dominant_frequency(mono)


async def test_two_tones_with_a_missing_track_between(pipeline: Pipeline) -> None:
    first = await pipeline.track("a440.mp3", 440.0, "mp3", "libmp3lame")
    second = await pipeline.track("b660.webm", 660.0, "webm", "libopus")
    missing = Track(url=pipeline.server.url("player-real/missing.mp3"), title="missing")
    sink = RecordingSink()
    recorder = Recorder(sink)
    player = pipeline.player(sink, recorder)
    player.queue.add([first, missing, second])
    try:
        async with asyncio.timeout(60):
            assert player.start()
            await player.wait_for(PlayerState.PLAYING)
            await player.wait_for(PlayerState.IDLE)
            await sink.wait_for(lambda s: not s.speaking)  # the trailing silence went out
    finally:
        await player.close()

    kinds = [type(e).__name__ for e in recorder.events]
    assert kinds == [
        "TrackStarted",
        "TrackEnded",
        "TrackFailed",
        "TrackStarted",
        "TrackEnded",
        "QueueEnded",
    ]
    failed = recorder.events[2]
    assert isinstance(failed, TrackFailed)
    assert failed.track is missing
    assert isinstance(failed.error, AudioError)
    assert failed.error.user_message  # something safe to show
    assert isinstance(recorder.events[-1], QueueEnded)

    a_frames = recorder.frames_of("a440.mp3")
    b_frames = recorder.frames_of("b660.webm")
    assert OPUS_SILENCE not in a_frames
    assert OPUS_SILENCE not in b_frames
    assert abs(len(a_frames) - expected_frames(SECONDS)) <= 1
    assert abs(len(b_frames) - expected_frames(SECONDS)) <= 1
    assert tone_of(a_frames) == pytest.approx(440.0, abs=2.0)
    assert tone_of(b_frames) == pytest.approx(660.0, abs=2.0)
    assert sink.frames[-5:] == [OPUS_SILENCE] * 5
    assert player.stats.source_errors == 1
    assert player.stats.frames_sent == len(a_frames) + len(b_frames)


async def test_consecutive_tracks_follow_without_silence(pipeline: Pipeline) -> None:
    first = await pipeline.track("c440.webm", 440.0, "webm", "libopus")
    second = await pipeline.track("d660.mp3", 660.0, "mp3", "libmp3lame")
    sink = RecordingSink()
    recorder = Recorder(sink)
    player = pipeline.player(sink, recorder)
    player.queue.add([first, second])
    try:
        async with asyncio.timeout(60):
            assert player.start()
            await player.wait_for(PlayerState.PLAYING)
            await player.wait_for(PlayerState.IDLE)
            await sink.wait_for(lambda s: s.speaking_changes == [True, False])
    finally:
        await player.close()
    a_frames = recorder.frames_of("c440.webm")
    b_frames = recorder.frames_of("d660.mp3")
    # The second track was opened while the first played: its first frame directly follows
    # the first track's last one, with no silence and one speaking burst for both.
    assert recorder.spans["d660.mp3"][0] == recorder.spans["c440.webm"][1]
    audio = sink.frames[:-5]
    assert audio == a_frames + b_frames
    assert sink.speaking_changes == [True, False]
    assert tone_of(a_frames) == pytest.approx(440.0, abs=2.0)
    assert tone_of(b_frames) == pytest.approx(660.0, abs=2.0)


async def test_seek_and_volume_on_a_real_stream(pipeline: Pipeline) -> None:
    track = await pipeline.track("e523.webm", 523.0, "webm", "libopus")
    sink = RecordingSink()
    recorder = Recorder(sink)
    player = pipeline.player(sink, recorder)
    player.queue.add([track])
    try:
        async with asyncio.timeout(60):
            assert player.start()
            await sink.wait_frames(3)
            await player.seek(1.0)
            assert player.position == pytest.approx(1.0, abs=0.03)
            await player.set_volume(0.5)
            await player.wait_for(PlayerState.IDLE)
    finally:
        await player.close()
    frames = recorder.frames_of("e523.webm")
    # About 1 s was skipped: what was sent is the start, then the last 0.5 s.
    assert len(frames) < expected_frames(SECONDS) - 30
    assert tone_of(frames) == pytest.approx(523.0, abs=3.0)
