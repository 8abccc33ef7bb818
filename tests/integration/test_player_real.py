"""GuildPlayer with the real pipeline: yt-dlp resolves tracks on the local media server, PyAV
decodes (or passes Opus through) in a thread pool, the player paces on the real loop clock.

Assertions are on content (what the recorded Opus decodes to, frame counts, event order), never
on timing: the machine is shared and loaded.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from legato.audio.decode import open_source
from legato.audio.encode import OpusSettings, decode_opus_packets
from legato.audio.player import (
    EndReason,
    GuildPlayer,
    PlayerEvent,
    PlayerState,
    QueueEnded,
    TrackEnded,
    TrackFailed,
    TrackStarted,
    make_opener,
)
from legato.audio.resolve import UNSUPPORTED_SCHEME, Resolver, ResolverSettings
from legato.audio.sink import OPUS_SILENCE
from legato.audio.source import FRAME_SAMPLES, SAMPLE_RATE, FrameSource, SourceTooSlow
from legato.audio.track import Track
from legato.errors import AudioError
from legato.sandbox.analysis import dominant_frequency, pcm_to_mono, rms
from tests.fakes import FakeClock, RecordingSink, SettlingPool
from tests.media import (
    Expiring,
    MediaServer,
    Trickle,
    expected_frames,
    expiring_stream,
    html_page,
    write_steps,
    write_tone,
    write_wav_header,
)

pytestmark = pytest.mark.integration

SECONDS = 1.5
F = 0.020


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
        elif isinstance(event, TrackEnded | TrackFailed) and event.track.title in self.spans:
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

    async def track(
        self, name: str, freq: float, container: str, codec: str, seconds: float = SECONDS
    ) -> Track:
        path = write_tone(
            self.tmp / name, container=container, codec=codec, freq=freq, seconds=seconds
        )
        url = self.server.add_file(f"player-real/{name}", path)
        tracks = await self.resolver.resolve(url)
        assert len(tracks) == 1
        return Track(url=tracks[0].url, title=name, duration=tracks[0].duration)

    def player(
        self,
        sink: RecordingSink,
        recorder: Recorder,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> GuildPlayer:
        """A player on the real pipeline; ``timeout`` is the decoder's, ``options`` the player's."""
        opener = make_opener(
            self.resolver, opus=OpusSettings(), executor=self.pool, timeout=timeout
        )
        return GuildPlayer(
            sink, opener, executor=self.pool, on_event=recorder, guild_id=1, **options
        )


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


async def play_queue(player: GuildPlayer, sink: RecordingSink, tracks: list[Track]) -> None:
    """Play ``tracks`` to the end of the queue and its trailing silence, then close."""
    player.queue.add(tracks)
    try:
        async with asyncio.timeout(90):
            assert player.start()
            await player.wait_for(PlayerState.IDLE)
            await sink.wait_for(lambda s: not s.speaking)
    finally:
        await player.close()


STEPS = ((440.0, 1.0), (660.0, 1.0), (880.0, 1.0))


async def steps_track(pipeline: Pipeline, name: str, *, renewed: bool) -> tuple[Track, Expiring]:
    body = write_steps(
        pipeline.tmp / f"{name}.mp3", STEPS, container="mp3", codec="libmp3lame", rate=44100
    )
    urls = expiring_stream(pipeline.server, name, body, renewed=renewed)
    [found] = await pipeline.resolver.resolve(urls.page)
    # What the player resolves again at play time is the page, not the stream URL it named.
    assert found.url == urls.page
    return Track(url=found.url, title=name, duration=found.duration), urls


async def test_an_expired_stream_url_is_resolved_again_and_the_track_goes_on(
    pipeline: Pipeline,
) -> None:
    track, urls = await steps_track(pipeline, "expiring-renewed", renewed=True)
    after = await pipeline.track("after-550.webm", 550.0, "webm", "libopus")
    sink = RecordingSink()
    recorder = Recorder(sink)
    player = pipeline.player(sink, recorder)
    await play_queue(player, sink, [track, after])

    kinds = [type(e).__name__ for e in recorder.events]
    assert kinds == ["TrackStarted", "TrackEnded", "TrackStarted", "TrackEnded", "QueueEnded"]
    ended = recorder.events[1]
    assert isinstance(ended, TrackEnded)
    assert ended.reason is EndReason.FINISHED
    # The first URL broke off and was refused (FFmpeg's reconnect); the track was resolved
    # again and read on from the second one.
    assert pipeline.server.request_count(urls.first) == 2
    assert pipeline.server.request_count(urls.second) >= 1
    # The listener heard the whole track once, in order: every step at its time, 3 s in all.
    audio = [f for f in recorder.frames_of(track.title) if f != OPUS_SILENCE]
    assert abs(len(audio) - expected_frames(3.0)) <= 3
    mono = pcm_to_mono(decode_opus_packets(audio))
    for i, (freq, _) in enumerate(STEPS):
        window = mono[int((i + 0.25) * SAMPLE_RATE) : int((i + 0.75) * SAMPLE_RATE)]
        assert dominant_frequency(window) == pytest.approx(freq, abs=3.0), f"step {i}"
    assert tone_of(recorder.frames_of("after-550.webm")) == pytest.approx(550.0, abs=2.0)


async def test_a_stream_url_that_stays_refused_fails_after_two_reopens(pipeline: Pipeline) -> None:
    track, urls = await steps_track(pipeline, "expiring-dead", renewed=False)
    after = await pipeline.track("after-660.mp3", 660.0, "mp3", "libmp3lame")
    sink = RecordingSink()
    recorder = Recorder(sink)
    player = pipeline.player(sink, recorder)
    await play_queue(player, sink, [track, after])

    kinds = [type(e).__name__ for e in recorder.events]
    assert kinds == ["TrackStarted", "TrackFailed", "TrackStarted", "TrackEnded", "QueueEnded"]
    failed = recorder.events[1]
    assert isinstance(failed, TrackFailed)
    assert failed.error.user_message == "The server refused access to that track."
    assert "403" in str(failed.error)
    assert pipeline.server.request_count(urls.second) == 2  # two reopens, each refused
    # What came before the break was played: about two fifths of the track, 440 Hz first.
    audio = [f for f in recorder.frames_of(track.title) if f != OPUS_SILENCE]
    assert 40 <= len(audio) <= 75
    mono = pcm_to_mono(decode_opus_packets(audio))
    assert dominant_frequency(mono[: int(0.8 * SAMPLE_RATE)]) == pytest.approx(440.0, abs=3.0)
    assert tone_of(recorder.frames_of("after-660.mp3")) == pytest.approx(660.0, abs=2.0)
    assert player.stats.source_errors == 1


async def test_a_stalled_source_is_filled_with_silence_then_skipped(pipeline: Pipeline) -> None:
    # The stall comes after FFmpeg's probing (which reads the first seconds at open): 6 s in.
    body = write_tone(
        pipeline.tmp / "stalls.mp3", container="mp3", codec="libmp3lame", freq=440.0, seconds=8.0
    )
    url = pipeline.server.add_route(
        "player-real/stalls.mp3", body=body, stall_after=body.stat().st_size * 3 // 4
    )
    track = Track(url=url, title="stalls")
    after = await pipeline.track("after-770.webm", 770.0, "webm", "libopus")
    sink = RecordingSink()
    recorder = Recorder(sink)
    # The player gives up after 1 s without audio; the decoder's own read timeout is longer.
    player = pipeline.player(sink, recorder, timeout=3.0, stall_timeout=1.0)
    await play_queue(player, sink, [track, after])

    kinds = [type(e).__name__ for e in recorder.events]
    assert kinds == ["TrackStarted", "TrackFailed", "TrackStarted", "TrackEnded", "QueueEnded"]
    failed = recorder.events[1]
    assert isinstance(failed, TrackFailed)
    assert failed.error.user_message == "The track's server stopped sending audio."
    # Where the audio stopped, silence went on in its place (speaking on) for the stall's
    # length (the 1 s timeout, counted from when the missing frame was due; the first silence
    # frame goes out one frame after that) before the track was given up.
    timeline = sink.timeline()
    start, end = recorder.spans["stalls"]
    frames_at = [i for i, t in enumerate(timeline) if t not in ("on", "off")]
    stalled = timeline[frames_at[start] : frames_at[end - 1] + 1]
    last_audio = max(i for i, t in enumerate(stalled) if t != "S")
    fill = stalled[last_audio + 1 :]
    assert "off" not in fill
    assert fill.count("S") >= 1.0 / 0.020 - 1
    audio = [f for f in recorder.frames_of("stalls") if f != OPUS_SILENCE]
    assert abs(len(audio) - 6.0 / 0.020) <= 15
    assert tone_of(audio) == pytest.approx(440.0, abs=2.0)
    assert tone_of(recorder.frames_of("after-770.webm")) == pytest.approx(770.0, abs=2.0)


async def test_a_source_that_falls_to_1kbs_in_a_thread_is_buffering_then_skipped(
    pipeline: Pipeline,
) -> None:
    """Issue #11 on the thread path (no decode worker): a 128 kbit/s MP3 whose first 40 KB come
    at once, then 1 KB/s with no Content-Length. It starts, falls behind (``BUFFERING``, silence
    standing in), is judged too slow and the next track plays."""
    body = write_tone(
        pipeline.tmp / "trickles.mp3",
        container="mp3",
        codec="libmp3lame",
        freq=440.0,
        seconds=30.0,
        rate=44100,
    )
    trickle = Trickle(body.read_bytes(), rate=1000, burst=40_000)
    url = pipeline.server.add_route("player-real/trickles.mp3", handler=trickle)
    track = Track(url=url, title="trickles")
    after = await pipeline.track("after-slow-770.webm", 770.0, "webm", "libopus")
    sink = RecordingSink()
    recorder = Recorder(sink)
    player = pipeline.player(sink, recorder, starve_window=3.0, starve_limit=1.5)
    player.queue.add([track, after])
    try:
        async with asyncio.timeout(60):
            assert player.start()
            await player.wait_for(PlayerState.BUFFERING)
            assert player.current == track
            await player.wait_for(PlayerState.IDLE)
    finally:
        trickle.stop()
        await player.close()

    kinds = [type(e).__name__ for e in recorder.events]
    assert kinds == ["TrackStarted", "TrackFailed", "TrackStarted", "TrackEnded", "QueueEnded"]
    failed = recorder.events[1]
    assert isinstance(failed, TrackFailed)
    assert isinstance(failed.error, SourceTooSlow)
    assert "x real time" in str(failed.error)
    audio = [f for f in recorder.frames_of("trickles") if f != OPUS_SILENCE]
    assert tone_of(audio) == pytest.approx(440.0, abs=2.0)
    assert tone_of(recorder.frames_of("after-slow-770.webm")) == pytest.approx(770.0, abs=2.0)


@dataclass(frozen=True)
class BadMedia:
    """One hostile or broken input and what must come of it."""

    make: Callable[[Pipeline], str]  # writes/serves it, returns the URL a track names
    error: str | None  # a part of the user_message when it must fail, None when it plays
    plays: float | None = None  # the tone heard when it plays what is decodable


def _serve(pipeline: Pipeline, name: str, data: bytes, content_type: str | None = None) -> str:
    return pipeline.server.add_route(f"bad-media/{name}", body=data, content_type=content_type)


def _tone_bytes(pipeline: Pipeline, name: str, seconds: float = 1.5) -> bytes:
    path = write_tone(
        pipeline.tmp / name, container="mp3", codec="libmp3lame", freq=440.0, seconds=seconds
    )
    return path.read_bytes()


def _corrupt_middle(pipeline: Pipeline) -> str:
    data = bytearray(_tone_bytes(pipeline, "corrupt-src.mp3"))
    middle = len(data) // 2
    noise = np.random.default_rng(7).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    data[middle : middle + len(noise)] = noise
    return _serve(pipeline, "corrupt-middle.mp3", bytes(data))


def _wav(pipeline: Pipeline, name: str, **header: int) -> str:
    path = write_wav_header(pipeline.tmp / name, data=bytes(range(256)) * 64, **header)
    return _serve(pipeline, name, path.read_bytes())


BAD_MEDIA: dict[str, BadMedia] = {
    "zero-length": BadMedia(lambda p: _serve(p, "empty.mp3", b""), error="could not be opened"),
    "wav-1-hz": BadMedia(lambda p: _wav(p, "rate-1.wav", rate=1), error="impossible sample rate"),
    "wav-7-mhz": BadMedia(
        lambda p: _wav(p, "rate-7m.wav", rate=7_000_000), error="impossible sample rate"
    ),
    "wav-255-channels": BadMedia(
        lambda p: _wav(p, "ch-255.wav", channels=255), error="channel count"
    ),
    "mp3-served-as-ogg": BadMedia(
        lambda p: _serve(p, "mislabelled.ogg", _tone_bytes(p, "mislabelled.mp3"), "audio/ogg"),
        error=None,
        plays=440.0,
    ),
    "corrupt-bytes-mid-file": BadMedia(_corrupt_middle, error=None, plays=440.0),
    "html-page": BadMedia(
        lambda p: _serve(p, "page.html", html_page("No audio", "<p>words</p>")),
        error="no playable audio",
    ),
    "truncated-m4a": BadMedia(lambda p: p.server.url("truncated.m4a"), error="damaged"),
    "truncated-mp3": BadMedia(lambda p: p.server.url("truncated.mp3"), error=None, plays=440.0),
    "unsupported-scheme": BadMedia(lambda p: "ftp://127.0.0.1/tone.mp3", error=UNSUPPORTED_SCHEME),
}


@pytest.mark.parametrize("case", sorted(BAD_MEDIA))
async def test_bad_media_gives_a_clear_error_and_the_next_track_plays(
    pipeline: Pipeline, case: str
) -> None:
    bad = BAD_MEDIA[case]
    track = Track(url=bad.make(pipeline), title=case)
    after = await pipeline.track(f"after-{case}.webm", 587.0, "webm", "libopus", seconds=1.0)
    sink = RecordingSink()
    recorder = Recorder(sink)
    player = pipeline.player(sink, recorder)
    await play_queue(player, sink, [track, after])

    kinds = [type(e).__name__ for e in recorder.events]
    if bad.error is not None:
        assert kinds == ["TrackFailed", "TrackStarted", "TrackEnded", "QueueEnded"]
        failed = recorder.events[0]
        assert isinstance(failed, TrackFailed)
        message = failed.error.user_message
        assert bad.error in message
        # A sentence for people: no URL, no exception text.
        assert message.endswith(".")
        assert "://" not in message
        assert "Error" not in message
    else:
        assert kinds == ["TrackStarted", "TrackEnded", "TrackStarted", "TrackEnded", "QueueEnded"]
        ended = recorder.events[1]
        assert isinstance(ended, TrackEnded)
        assert ended.reason is EndReason.FINISHED
        assert bad.plays is not None
        assert tone_of(recorder.frames_of(case)) == pytest.approx(bad.plays, abs=2.0)
    assert tone_of(recorder.frames_of(after.title)) == pytest.approx(587.0, abs=2.0)
    assert abs(len(recorder.frames_of(after.title)) - expected_frames(1.0)) <= 1


@pytest.mark.parametrize("name", ["webm-opus-stereo.webm", "ogg-opus-stereo.ogg"])
async def test_a_volume_change_cuts_a_real_passthrough_buffer_back_to_buffer_ms(
    name: str, pipeline: Pipeline, media_url: Callable[[str], str], media_dir: Path
) -> None:
    """A real Opus file passed through, its buffer well past ``buffer_ms`` (100 ms): a volume
    change is heard ``buffer_ms`` after it, with no packet lost or sent twice across the cut.
    On a fake clock (reads on real threads it waits for), so "after" is in frames."""
    [found] = await pipeline.resolver.resolve(media_url(name))
    info = await pipeline.resolver.stream(found)
    kept = 5
    with SettlingPool(2) as pool:
        clock = FakeClock(quiesce=pool.quiet)
        sink = RecordingSink(clock)

        async def opener(track: Track, start: float) -> FrameSource:
            del track
            opening = functools.partial(open_source, info, start=start)
            return await asyncio.get_running_loop().run_in_executor(pool, opening)

        player = GuildPlayer(sink, opener, clock=clock, executor=pool, buffer_ms=100)
        player.queue.add([Track(url=found.url, title=name)])
        try:
            async with asyncio.timeout(60):
                assert player.start()
                await player.wait_for(PlayerState.PLAYING)
                await clock.advance(20 * F)
                assert player.stats.buffer_frames > 2 * kept
                sent = len(sink.audio)
                await player.set_volume(0.5)  # the fake clock stands still: nothing is sent
                await clock.run_until(lambda: player.state is PlayerState.IDLE)
        finally:
            await player.close()
    frames, original = sink.audio, demuxed_packets(media_dir / name)
    change = sent + kept
    assert len(frames) == len(original)
    assert frames[:change] == original[:change]  # the kept frames: the file's own packets
    assert all(f != o for f, o in zip(frames[change:], original[change:], strict=True))
    # Against the file's audio times the gain (a one-frame ramp at the change): in step with
    # it, so no frame was lost or repeated (one frame off leaves residuals near 0.5 here).
    mono = pcm_to_mono(decode_opus_packets(frames))
    reference = pcm_to_mono(decode_opus_packets(original))
    f = FRAME_SAMPLES
    gain = np.ones_like(reference)
    gain[change * f : (change + 1) * f] = np.linspace(1.0, 0.5, f + 1)[1:]
    gain[(change + 1) * f :] = 0.5
    residual = np.abs(mono - gain * reference)
    assert residual[(change + 5) * f : -5 * f].max() < 0.02


def demuxed_packets(path: Path) -> list[bytes]:
    """The file's audio packets as PyAV demuxes them, independently of Legato."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return [bytes(p) for p in container.demux(stream) if p.size]
