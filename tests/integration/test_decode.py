"""Decoding real media fetched over HTTP through yt-dlp: formats, passthrough, volume, seek, errors.

Every file comes from the session's ``media_server``; each test checks what the emitted Opus
decodes to (frequency, length, continuity) or the exact packets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import pytest

from legato.audio.decode import open_source, opus_packet_samples
from legato.audio.encode import OpusSettings, decode_opus_packets
from legato.audio.resolve import Resolver, ResolverSettings
from legato.audio.source import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    FrameReader,
    FrameSource,
    StreamLost,
    ThreadedReader,
)
from legato.audio.track import StreamInfo
from legato.errors import DecodeError
from legato.sandbox.analysis import dominant_frequency, pcm_to_mono, rms
from tests.media import CATALOG, MediaServer, ToneSpec

pytestmark = pytest.mark.integration

FRAME_S = FRAME_SAMPLES / SAMPLE_RATE
TONES = sorted(name for name in CATALOG if not name.startswith("chirp"))
CHIRPS = sorted(name for name in CATALOG if name.startswith("chirp"))


async def stream_of(url: str) -> StreamInfo:
    """Resolve ``url`` with yt-dlp and ask for its stream, as the player does."""
    resolver = Resolver(ResolverSettings(timeout=30.0))
    tracks = await resolver.resolve(url)
    assert len(tracks) == 1
    return await resolver.stream(tracks[0])


async def open_url(url: str, **kwargs: object) -> FrameSource:
    info = await stream_of(url)
    return await asyncio.to_thread(open_source, info, **kwargs)  # type: ignore[arg-type]


def read_all(source: FrameSource, batch: int = 50) -> list[bytes]:
    frames: list[bytes] = []
    while got := source.read(batch):
        frames.extend(got)
    return frames


def mono_of(frames: list[bytes]) -> npt.NDArray[np.float64]:
    return pcm_to_mono(decode_opus_packets(frames))


async def read_reader(reader: FrameReader, batch: int = 50) -> list[bytes]:
    """Every frame left in ``reader``, read through the one read path."""
    frames: list[bytes] = []
    while got := (await reader.read_chunk(batch)).frames:
        frames.extend(got)
    return frames


async def check_seek_lands(
    source: FrameSource | FrameReader, spec: ToneSpec, target: float
) -> None:
    """Seek the chirp ``spec`` in ``source`` to ``target`` (after a first read) and check that
    the position says so and the audio there is within 100 ms of it; closes ``source``.

    A blocking ``FrameSource`` is read as the player reads it, through a ``ThreadedReader``.
    """
    reader = source if isinstance(source, FrameReader) else ThreadedReader(source)
    try:
        await reader.read_chunk(10)
        position = await reader.seek_to(target)
        assert abs(position - target) <= FRAME_S + 1e-6
        frames = (await reader.read_chunk(10)).frames
    finally:
        reader.close()
    mono = mono_of(frames)
    # The chirp's frequency tells the time: measure over 40..140 ms after the landing point.
    window = mono[int(0.04 * SAMPLE_RATE) : int(0.14 * SAMPLE_RATE)]
    landed = spec.time_of(dominant_frequency(window)) - 0.09
    assert landed == pytest.approx(target, abs=0.1)


def demuxed_packets(path: Path) -> list[bytes]:
    """The file's audio packets as PyAV demuxes them, independently of Legato."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return [bytes(p) for p in container.demux(stream) if p.size]


@pytest.mark.parametrize("name", TONES)
async def test_every_format_decodes_to_its_tone(name: str, media_url: Callable[[str], str]) -> None:
    spec = CATALOG[name]
    source = await open_url(media_url(name))
    try:
        frames = await asyncio.to_thread(read_all, source)
    finally:
        source.close()
    mono = mono_of(frames)
    # Skip the edges: the codec's start-up and the padded last frame.
    body = mono[SAMPLE_RATE // 10 : -SAMPLE_RATE // 10]
    assert dominant_frequency(body) == pytest.approx(spec.freq, abs=2.0)
    assert abs(len(frames) * FRAME_S - spec.seconds) <= FRAME_S + 1e-9
    # A 0.5 full-scale sine: about 0.35 RMS; mono and 5.1 must not come out quieter or silent.
    assert 0.25 < rms(body) < 0.6


@pytest.mark.parametrize("name", ["webm-opus-stereo.webm", "ogg-opus-stereo.ogg"])
async def test_opus_passthrough_sends_the_source_packets_unchanged(
    name: str, media_url: Callable[[str], str], media_dir: Path
) -> None:
    source = await open_url(media_url(name))
    try:
        assert source.passthrough
        frames = await asyncio.to_thread(read_all, source)
        assert source.passthrough
        assert source.position == pytest.approx(len(frames) * FRAME_S, abs=FRAME_S)
        assert source.duration == pytest.approx(CATALOG[name].seconds, abs=FRAME_S)
    finally:
        source.close()
    assert frames == demuxed_packets(media_dir / name)


async def test_passthrough_can_be_refused(media_url: Callable[[str], str], media_dir: Path) -> None:
    name = "webm-opus-stereo.webm"
    source = await open_url(media_url(name), allow_passthrough=False)
    try:
        assert not source.passthrough
        frames = await asyncio.to_thread(read_all, source)
    finally:
        source.close()
    original = demuxed_packets(media_dir / name)
    assert len(frames) == len(original)
    assert frames != original
    assert dominant_frequency(mono_of(frames)[4800:-4800]) == pytest.approx(
        CATALOG[name].freq, abs=2.0
    )


async def test_volume_switch_is_gapless_and_click_free(
    media_url: Callable[[str], str], media_dir: Path
) -> None:
    name = "webm-opus-stereo.webm"
    spec = CATALOG[name]
    source = await open_url(media_url(name))
    frames: list[bytes] = []
    modes: list[bool] = []

    def play() -> None:
        for count, volume in ((40, None), (40, 0.5), (30, 1.0), (1000, None)):
            if volume is not None:
                source.set_volume(volume)
            got = source.read(count)
            frames.extend(got)
            modes.extend([source.passthrough] * len(got))

    try:
        await asyncio.to_thread(play)
    finally:
        source.close()
    original = demuxed_packets(media_dir / name)
    assert len(frames) == len(original)  # gapless: one frame per source packet, none lost
    assert frames[:40] == original[:40]
    assert all(f != o for f, o in zip(frames[41:80], original[41:80], strict=True))
    assert modes[:40] == [True] * 40
    assert modes[40:80] == [False] * 40
    assert frames[85:] == original[85:]  # back to passthrough after the switch frame
    mono = mono_of(frames)
    # The largest step a 0.5 full-scale sine makes between two samples, with margin for the codec.
    max_step = 0.5 * 2 * np.pi * spec.freq / SAMPLE_RATE
    for switch in (40, 80):
        around = mono[(switch - 3) * FRAME_SAMPLES : (switch + 3) * FRAME_SAMPLES]
        assert np.abs(np.diff(around)).max() < 1.5 * max_step
    assert rms(mono[50 * FRAME_SAMPLES : 78 * FRAME_SAMPLES]) == pytest.approx(
        0.5 * rms(mono[5 * FRAME_SAMPLES : 38 * FRAME_SAMPLES]), rel=0.05
    )
    # Against the untouched stream times the expected gain (a one-frame ramp at each switch):
    # the re-encoded audio is in step with the original, with no shift of the timeline. (A
    # shift by the encoder's 312-sample delay leaves residuals of about 0.5 here.)
    reference = mono_of(original)
    gain = np.ones_like(reference)
    f = FRAME_SAMPLES
    gain[40 * f : 41 * f] = np.linspace(1.0, 0.5, f + 1)[1:]
    gain[41 * f : 80 * f] = 0.5
    gain[80 * f : 81 * f] = np.linspace(0.5, 1.0, f + 1)[1:]
    residual = np.abs(mono - gain * reference)
    assert residual[45 * f : 78 * f].max() < 0.02
    assert residual[38 * f : 44 * f].max() < 0.2
    assert residual[78 * f : 84 * f].max() < 0.2


async def test_volume_on_a_transcoded_stream_scales_without_clicks(
    media_url: Callable[[str], str],
) -> None:
    name = "mp3-44k-stereo.mp3"
    source = await open_url(media_url(name))
    try:
        assert not source.passthrough
        first = await asyncio.to_thread(source.read, 50)
        source.set_volume(0.25)
        rest = await asyncio.to_thread(read_all, source)
    finally:
        source.close()
    frames = first + rest
    assert len(frames) == 150
    mono = mono_of(frames)
    max_step = 0.5 * 2 * np.pi * CATALOG[name].freq / SAMPLE_RATE
    around = mono[47 * FRAME_SAMPLES : 53 * FRAME_SAMPLES]
    assert np.abs(np.diff(around)).max() < 1.5 * max_step
    assert rms(mono[60 * FRAME_SAMPLES : 140 * FRAME_SAMPLES]) == pytest.approx(
        0.25 * rms(mono[5 * FRAME_SAMPLES : 45 * FRAME_SAMPLES]), rel=0.05
    )


async def test_volume_above_one_is_clipped_not_wrapped(media_url: Callable[[str], str]) -> None:
    source = await open_url(media_url("wav-44k-stereo-s16.wav"), volume=4.0)
    try:
        frames = await asyncio.to_thread(read_all, source)
    finally:
        source.close()
    mono = mono_of(frames)[4800:-4800]
    # 0.5 x 4 clips at full scale: a wrapped int16 would swing sign and measure near zero.
    assert rms(mono) > 0.8


@pytest.mark.parametrize("name", CHIRPS)
@pytest.mark.parametrize("target", [1.3, 4.05])
async def test_seek_lands_within_100_ms(
    name: str, target: float, media_url: Callable[[str], str]
) -> None:
    await check_seek_lands(await open_url(media_url(name)), CATALOG[name], target)


async def test_seek_while_decoding_opus(media_url: Callable[[str], str]) -> None:
    name = "chirp-opus.webm"
    spec = CATALOG[name]
    source = await open_url(media_url(name), volume=0.5)
    try:
        await asyncio.to_thread(source.read, 10)
        await asyncio.to_thread(source.seek, 3.3)
        assert not source.passthrough
        frames = await asyncio.to_thread(source.read, 10)
        source.set_volume(1.0)
        frames += await asyncio.to_thread(source.read, 10)
        assert source.passthrough
    finally:
        source.close()
    mono = mono_of(frames)
    window = mono[int(0.04 * SAMPLE_RATE) : int(0.14 * SAMPLE_RATE)]
    assert spec.time_of(dominant_frequency(window)) - 0.09 == pytest.approx(3.3, abs=0.1)
    assert rms(window) == pytest.approx(0.5 * 0.5 / np.sqrt(2), rel=0.15)
    # Back at full level after the switch, with no click on the way.
    assert rms(mono[12 * FRAME_SAMPLES : 20 * FRAME_SAMPLES]) == pytest.approx(
        0.5 / np.sqrt(2), rel=0.15
    )
    max_step = 0.5 * 2 * np.pi * 2000.0 / SAMPLE_RATE
    assert np.abs(np.diff(mono[2 * FRAME_SAMPLES :])).max() < 1.5 * max_step


async def test_start_offset_and_position(media_url: Callable[[str], str]) -> None:
    name = "chirp-flac.flac"
    spec = CATALOG[name]
    source = await open_url(media_url(name), start=2.5)
    try:
        assert source.duration == pytest.approx(spec.seconds, abs=0.05)
        assert source.position == pytest.approx(2.5, abs=FRAME_S)
        frames = await asyncio.to_thread(source.read, 10)
        assert source.position == pytest.approx(2.5 + 10 * FRAME_S, abs=FRAME_S)
    finally:
        source.close()
    window = mono_of(frames)[int(0.04 * SAMPLE_RATE) : int(0.14 * SAMPLE_RATE)]
    assert spec.time_of(dominant_frequency(window)) - 0.09 == pytest.approx(2.5, abs=0.1)


async def test_opus_settings_reach_the_encoder(media_url: Callable[[str], str]) -> None:
    low = await open_url(media_url("mp3-44k-stereo.mp3"), opus=OpusSettings(bitrate=16_000))
    high = await open_url(media_url("mp3-44k-stereo.mp3"), opus=OpusSettings(bitrate=256_000))
    try:
        small = await asyncio.to_thread(read_all, low)
        big = await asyncio.to_thread(read_all, high)
    finally:
        low.close()
        high.close()
    assert sum(map(len, small)) * 4 < sum(map(len, big))
    assert all(opus_packet_samples(p) == FRAME_SAMPLES for p in small + big)


async def test_not_found_raises_decode_error(media_url: Callable[[str], str]) -> None:
    with pytest.raises(DecodeError) as caught:
        await asyncio.to_thread(open_source, StreamInfo(url=media_url("missing.mp3")))
    assert "not found" in caught.value.user_message.lower()
    assert "missing.mp3" in str(caught.value)


async def test_html_page_is_not_media(media_url: Callable[[str], str]) -> None:
    with pytest.raises(DecodeError) as caught:
        await asyncio.to_thread(open_source, StreamInfo(url=media_url("pages/nomedia.html")))
    assert "not a playable audio file" in caught.value.user_message


async def test_video_without_audio_is_refused(media_url: Callable[[str], str]) -> None:
    with pytest.raises(DecodeError) as caught:
        await asyncio.to_thread(open_source, StreamInfo(url=media_url("video-only.mkv")))
    assert "no audio" in caught.value.user_message


async def test_unknown_codec_is_unsupported(media_url: Callable[[str], str]) -> None:
    with pytest.raises(DecodeError) as caught:
        await asyncio.to_thread(open_source, StreamInfo(url=media_url("unknown-codec.wav")))
    assert "not supported" in caught.value.user_message


async def test_truncated_m4a_fails_to_open(media_url: Callable[[str], str]) -> None:
    # An M4A's index (moov) is at its end: half a file has none and cannot be opened.
    with pytest.raises(DecodeError) as caught:
        await asyncio.to_thread(open_source, StreamInfo(url=media_url("truncated.m4a")))
    assert "damaged" in caught.value.user_message


async def test_truncated_mp3_plays_what_it_has(media_url: Callable[[str], str]) -> None:
    info = StreamInfo(url=media_url("truncated.mp3"))
    source = await asyncio.to_thread(open_source, info)
    frames: list[bytes] = []

    def drain(source: FrameSource) -> None:
        while got := source.read(50):
            frames.extend(got)

    try:
        # Its header says 3 s: ending at half of that is a stream that broke off, as far as
        # the decoder can tell (FFmpeg reports a refused reconnect as the end of the file)...
        with pytest.raises(StreamLost) as caught:
            await asyncio.to_thread(drain, source)
        assert "ended at 1.5" in str(caught.value)
        assert await asyncio.to_thread(source.read, 5) == []  # said once
        position = source.position
    finally:
        source.close()
    # ...and opening it again there, as the player does, finds the real end: no more audio.
    again = await asyncio.to_thread(open_source, info, start=position)
    try:
        assert await asyncio.to_thread(again.read, 50) == []
    finally:
        again.close()
    # Half of 3 s: the track ends early, with the tone intact up to there.
    assert 60 <= len(frames) <= 90
    mono = mono_of(frames)
    assert dominant_frequency(mono[4800:-4800]) == pytest.approx(440.0, abs=2.0)


async def test_stalled_server_times_out(media_url: Callable[[str], str]) -> None:
    def play() -> list[bytes]:
        source = open_source(StreamInfo(url=media_url("stall.mp3")), timeout=1.0)
        try:
            return read_all(source)
        finally:
            source.close()

    async with asyncio.timeout(30):
        with pytest.raises(DecodeError) as caught:
            await asyncio.to_thread(play)
    assert "too long" in caught.value.user_message or "stopped" in caught.value.user_message


async def test_local_file_and_close_twice(media_dir: Path) -> None:
    path = media_dir / "flac-44k-mono-s16.flac"
    source = await asyncio.to_thread(open_source, StreamInfo(url=str(path), is_local=True))
    frames = await asyncio.to_thread(source.read, 10)
    assert len(frames) == 10
    source.close()
    source.close()
    assert source.read(10) == []
    with pytest.raises(ValueError, match="volume"):
        source.set_volume(-1.0)


async def test_stream_headers_reach_the_server(media_server: MediaServer) -> None:
    name = "ogg-opus-stereo.ogg"
    info = StreamInfo(
        url=media_server.url(name),
        http_headers={"User-Agent": "LegatoTest/1.0", "Referer": "http://127.0.0.1/page"},
    )
    source = await asyncio.to_thread(open_source, info)
    try:
        assert len(await asyncio.to_thread(source.read, 5)) == 5
    finally:
        source.close()
    seen = [r.headers for r in media_server.request_log if r.path == f"/{name}"]
    assert any(
        h.get("User-Agent") == "LegatoTest/1.0" and h.get("Referer") == "http://127.0.0.1/page"
        for h in seen
    )


async def test_forbidden_stream(media_server: MediaServer, media_dir: Path) -> None:
    url = media_server.add_route(
        "decode-test/forbidden.mp3", body=media_dir / "mp3-44k-stereo.mp3", fail_after=0
    )
    with pytest.raises(DecodeError) as caught:
        await asyncio.to_thread(open_source, StreamInfo(url=url))
    assert "refused" in caught.value.user_message
    assert "403" in str(caught.value)


async def test_dropped_download_gives_its_frames_then_fails(
    media_server: MediaServer, media_dir: Path
) -> None:
    body = media_dir / "mp3-44k-stereo.mp3"
    # The server closes every response at half the file: FFmpeg reconnects with a Range
    # request from there, gets nothing more, and gives up.
    url = media_server.add_route(
        "decode-test/cut.mp3", body=body, truncate_at=body.stat().st_size // 2
    )
    source = await asyncio.to_thread(open_source, StreamInfo(url=url))
    frames: list[bytes] = []

    def drain() -> None:
        while got := source.read(50):
            frames.extend(got)

    try:
        async with asyncio.timeout(60):
            with pytest.raises(DecodeError) as caught:
                await asyncio.to_thread(drain)
    finally:
        source.close()
    assert "connection" in caught.value.user_message
    assert isinstance(caught.value, StreamLost)  # the player reopens such a stream
    assert 60 <= len(frames) <= 90
    ranges = [
        r.headers.get("Range") for r in media_server.request_log if r.path == "/decode-test/cut.mp3"
    ]
    assert len(ranges) >= 2
    assert ranges[1] != "bytes=0-"  # the reconnect resumed where the cut was
