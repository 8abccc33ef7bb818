"""`make demo` end to end: it passes, writes a WAV of the tones, and says why when it fails."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import re
import signal
import sys
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from legato.audio.encode import OpusEncoder
from legato.config import load_config
from legato.sandbox.analysis import dominant_frequency, pcm_to_mono
from legato.sandbox.demo import EXAMPLES, DemoOptions, demo_config, run_demo
from legato.sandbox.demo_report import (
    FREQ_TOLERANCE_HZ,
    MAX_LOSS,
    DemoReport,
    analyse,
    format_report,
)
from legato.sandbox.media import MediaServer
from legato.sandbox.recording import Recording

pytestmark = pytest.mark.e2e

GUARD = 120.0


def wav_mono(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (48_000, 2, 2)
        return pcm_to_mono(wav.readframes(wav.getnframes()))


async def test_demo_passes_and_the_wav_holds_both_tones(tmp_path: Path) -> None:
    out = io.StringIO()
    options = DemoOptions(out_dir=tmp_path, seconds=4.0, progress=True)
    async with asyncio.timeout(GUARD):
        report = await run_demo(options, out=out)
    text = out.getvalue()
    assert report.failure is None, text
    assert report.passed, text
    first, second = options.tracks()
    assert [t.track for t in report.tracks] == [first, second]
    for track in report.tracks:
        assert track.frequency == pytest.approx(track.track.freq, abs=FREQ_TOLERANCE_HZ)
        assert track.pacing is not None
    assert report.tracks[0].skipped
    # The second track is heard to its end (its 4 s of tone, give or take a frame).
    assert report.tracks[1].tone_seconds == pytest.approx(4.0, abs=0.1)
    assert report.span > 0
    assert report.loss < MAX_LOSS

    # The transcript: each command, the bot's answers, the report's verdict.
    for command in ("/join", "/play", "/queue", "/nowplaying", "/skip", "/leave"):
        assert f"alice ▸ {command}" in text
    assert "Legato (only you): Joined #General." in text
    assert "Skipped tone-440hz." in text
    assert "Left #General." in text
    assert "▶ tone-660hz" in text  # the progress line
    assert text.rstrip().splitlines()[-1].startswith("PASS:")

    # The WAV: the first tone, then the second, each at its frequency.
    wav = tmp_path / "demo.wav"
    assert report.wav == wav
    mono = wav_mono(wav)
    assert mono.size / 48_000 == pytest.approx(report.wav_seconds, abs=0.05)
    skip = round(report.tracks[0].seconds_heard * 48_000)
    head = mono[4800 : skip - 4800]
    tail = mono[skip + 4800 : skip + 4 * 48_000 - 4800]
    assert dominant_frequency(head) == pytest.approx(440.0, abs=FREQ_TOLERANCE_HZ)
    assert dominant_frequency(tail) == pytest.approx(660.0, abs=FREQ_TOLERANCE_HZ)
    assert (tmp_path / "demo-legato.toml").read_text().startswith("# Written by `make demo`")


async def test_demo_command_exits_0_after_a_pass(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "legato.sandbox",
        "demo",
        "--out",
        str(tmp_path),
        "--seconds",
        "3",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "LEGATO_CONFIG": ""},
    )
    async with asyncio.timeout(GUARD):
        stdout, _ = await proc.communicate()
    text = stdout.decode()
    assert proc.returncode == 0, text
    assert "PASS:" in text
    assert "Traceback" not in text
    assert (tmp_path / "demo.wav").stat().st_size > 48_000 * 4 * 3
    # The path Legato takes on Discord, chosen by itself from the endpoint, and DAVE's code as
    # Discord shows it: six groups of five digits, the bot's own (/nowplaying shows it too).
    assert "voice path   v8 wss:// udp aead_aes256_gcm_rtpsize, DAVE 1" in text
    codes = re.findall(r"privacy code +((?:\d{5} ?){6})$", text, re.MULTILINE)
    assert codes
    assert f"Voice privacy code: {codes[-1].strip()}" in text
    header = text.splitlines()[2]
    assert re.fullmatch(r"  voice   wss://c-sbx01-[0-9a-f]{8}\.discord\.media:\d+ .*", header)
    assert "(DAVE required)" in header


def tone_packets(freq: float, frames: int, encoder: OpusEncoder, start: int) -> list[bytes]:
    t = (np.arange(start * 960, (start + frames) * 960) / 48_000.0)[:, np.newaxis]
    pcm = (0.5 * 32767 * np.sin(2 * np.pi * freq * t)).repeat(2, axis=1).astype("<i2")
    return [encoder.encode(pcm[i * 960 : (i + 1) * 960].tobytes()) for i in range(frames)]


def test_analysis_finds_the_switch_and_counts_lost_frames(tmp_path: Path) -> None:
    first, second = DemoOptions(seconds=3.0).tracks()
    encoder = OpusEncoder()
    packets = tone_packets(first.freq, 100, encoder, 0) + tone_packets(
        second.freq, 150, encoder, 100
    )
    rec = Recording(server_id=1, user_id=2)
    lost = {*range(120, 126), 200}
    arrival = 0.0
    for seq, opus in enumerate(packets):
        arrival += 0.02
        if seq in lost:
            continue
        # Sequence numbers wrap past 65535 halfway through; the analysis must not care.
        rec.add_packet(
            arrival=arrival,
            ssrc=7,
            sequence=(65_500 + seq) % 65_536,
            timestamp=(seq * 960) % (1 << 32),
            opus=opus,
        )
    rec.add_packet(
        arrival=arrival, ssrc=7, sequence=(65_500 + 5) % 65_536, timestamp=5 * 960, opus=packets[5]
    )  # a duplicate
    # The /skip reply "arrived" 3 frames after the real switch: the analysis finds the switch.
    analysed = analyse(rec, [(first, 0, True), (second, 103, False)], tmp_path / "a.wav")
    a, b = analysed.tracks
    assert a.frames == 100
    assert b.frames == 150 - len(lost)
    assert (a.lost, b.lost) == (0, len(lost))
    assert (analysed.span, analysed.lost, analysed.duplicates) == (250, 7, 1)
    assert a.frequency == pytest.approx(first.freq, abs=FREQ_TOLERANCE_HZ)
    assert b.frequency == pytest.approx(second.freq, abs=FREQ_TOLERANCE_HZ)
    assert b.pacing is not None
    assert b.pacing.p50 == pytest.approx(0.02)
    assert b.tone_seconds == pytest.approx(2.86)
    assert a.problems == b.problems == ()
    assert (tmp_path / "a.wav").exists()

    report = DemoReport(
        tracks=analysed.tracks, frames=analysed.frames, span=analysed.span, lost=analysed.lost
    )
    assert not report.passed
    assert report.loss == pytest.approx(7 / 250)
    text = format_report(report)
    assert "FAIL:" in text
    assert "  - 2.8% of the frames were lost (limit 2%)" in text.splitlines()


def test_a_failed_step_is_the_verdict() -> None:
    report = DemoReport(failure="the demo failed while /join: TimeoutError: ")
    assert not report.passed
    assert format_report(report).splitlines()[-1] == (
        "  - the demo failed while /join: TimeoutError: "
    )
    assert "nothing reached the voice channel" in DemoReport().problems


async def test_discord_command_prints_where_a_bot_connects() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "legato.sandbox",
        "discord",
        "--user",
        "alice",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(GUARD):
            while not (line := (await proc.stdout.readline()).decode()).startswith("and pass"):
                assert line, "\n".join(lines)
                lines.append(line.rstrip())
        fields = {line[:19].strip(): line[19:].strip() for line in lines if line.startswith("  ")}
        api_base = fields["API base"]
        token = fields["bot token"]
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{api_base}/gateway/bot", headers={"Authorization": f"Bot {token}"}) as r,
        ):
            assert r.status == 200
            body = await r.json()
        assert body["url"].rstrip("/") == fields["gateway"].rstrip("/")
        assert fields["member"].endswith("(alice)")
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(GUARD):
            await proc.communicate()
    assert proc.returncode == 0


def test_demo_config_is_the_example_with_the_sandbox_keys(tmp_path: Path) -> None:
    with MediaServer(tmp_path) as media:
        text = demo_config(media, "webrtc")
        port = media.port
    assert text.startswith("# Written by `make demo`")
    example_text = (EXAMPLES / "legato.toml").read_text(encoding="utf-8")
    # The example's comments are all there: the file an owner edits is the one demonstrated.
    comments = [line for line in example_text.splitlines() if line.startswith("#")]
    assert all(line in text.splitlines() for line in comments)
    path = tmp_path / "demo-legato.toml"
    path.write_text(text, encoding="utf-8")
    demo, example = load_config(path, env={}), load_config(EXAMPLES / "legato.toml", env={})
    assert demo.voice == dataclasses.replace(example.voice, transport="webrtc")
    assert demo.playback == dataclasses.replace(
        example.playback,
        announce_now_playing=True,
        idle_timeout=0,
        leave_when_alone_after=0,
        search_provider="none",
        allowed_hosts=(f"127.0.0.1:{port}",),
    )
    assert dataclasses.replace(demo, voice=example.voice, playback=example.playback) == (
        dataclasses.replace(example, source=str(path))
    )


def test_demo_config_adds_what_the_example_leaves_out(tmp_path: Path) -> None:
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "legato.toml").write_text(
        "[playback]\n# volume\ndefault_volume = 90\n\n[permissions]\nskip = 'dj'\n",
        encoding="utf-8",
    )
    with MediaServer(tmp_path) as media:
        text = demo_config(media, "udp", examples)
        port = media.port
    path = tmp_path / "demo.toml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path, env={})
    assert config.voice.transport == "udp"
    assert config.playback.default_volume == 90
    assert config.playback.allowed_hosts == (f"127.0.0.1:{port}",)
    assert config.playback.idle_timeout == 0
    assert config.permissions.skip == "dj"
