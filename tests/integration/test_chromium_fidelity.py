"""A real browser's WebRTC stack against the sandbox voice server's ``webrtc`` transport.

Headless Chromium opens ``chromium/voice.html`` (served here), which runs the seed capture's
browser handshake over the sandbox's voice websocket (op0 with streams, op16, op12, op1
``webrtc`` with a fragment of ``createOffer()``, the full answer built from op4) and sends its
fake microphone. The fake microphone plays a 440 Hz WAV written by the test, so the recording
can be checked for content, not just for being non-silent.

It runs twice: with the page's own op1 (one fingerprint, opus only in ``codecs``) and with op1
shaped as the capture's (``?shape=capture``: no fingerprint, the video rtpmaps, H264/VP8/VP9
beside opus in ``codecs``), which Discord accepted and the sandbox must too.

Chromium must be installed, or the test fails (see ``chromium_support``).
"""

from __future__ import annotations

import asyncio
import math
import struct
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web

from legato.sandbox.analysis import dominant_frequency, pcm_to_mono, rms
from legato.sandbox.voice import SandboxVoiceServer
from tests.integration.chromium_support import running_chromium

PAGE = Path(__file__).parent / "chromium" / "voice.html"
RATE = 48_000
TONE_HZ = 440.0
SERVER_ID, USER_ID, SESSION_ID = 4100, 4200, "chromium-session"
FRAMES = 150  # 3 s of 20 ms frames
GUARD = 90.0  # seconds; Chromium's first start on a loaded 2-core machine is slow


def write_tone_wav(path: Path, seconds: int = 2) -> None:
    """A 440 Hz stereo WAV that loops seamlessly (a whole number of cycles)."""
    frames = bytearray()
    for n in range(RATE * seconds):
        value = int(12_000 * math.sin(2 * math.pi * TONE_HZ * n / RATE))
        frames += struct.pack("<hh", value, value)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(bytes(frames))


@dataclass
class PageReports:
    """What the page POSTed to ``/report``, in order."""

    items: list[tuple[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def of(self, kind: str) -> list[Any]:
        return [detail for k, detail in self.items if k == kind]

    async def wait(self, kind: str, detail: Any = None) -> None:
        """Return once a report of ``kind`` (with ``detail``, if given) has arrived."""
        while not any(k == kind and detail in (None, d) for k, d in self.items):
            self.changed.clear()
            await self.changed.wait()

    def summary(self) -> str:
        return "; ".join(f"{k}={d!r}" for k, d in self.items if k != "op")[-3000:]


@dataclass
class Browser:
    """The served page, the sandbox and the running Chromium."""

    shape: str
    voice: SandboxVoiceServer
    reports: PageReports
    log: Path


@pytest.fixture(params=["fragment", "capture"])
async def browser(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Browser]:
    wav = tmp_path / "tone.wav"
    await asyncio.to_thread(write_tone_wav, wav)
    reports = PageReports()

    async def page(_: web.Request) -> web.StreamResponse:
        return web.FileResponse(PAGE)

    async def report(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        reports.items.append((str(body.get("kind")), body.get("detail")))
        reports.changed.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/report", report)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    http_port = runner.addresses[0][1]

    # The capture's browser handshake has no DAVE and the page trusts no local CA: the lenient
    # v6-era path (plain ws://, no DAVE), asked for explicitly; Discord itself would close 4017.
    voice = SandboxVoiceServer("127.0.0.1", tls=False, dave_protocol_version=0)
    await voice.start()
    token = voice.register_session(server_id=SERVER_ID, user_id=USER_ID, session_id=SESSION_ID)
    query = urlencode(
        {
            "ws": voice.url,
            "server_id": str(SERVER_ID),
            "user_id": str(USER_ID),
            "session_id": SESSION_ID,
            "token": token,
            "shape": request.param,
        }
    )
    log = tmp_path / "chromium.log"
    try:
        async with running_chromium(
            f"http://127.0.0.1:{http_port}/?{query}",
            tmp_path / "profile",
            log,
            [f"--use-file-for-fake-audio-capture={wav}"],
        ):
            yield Browser(request.param, voice, reports, log)
    finally:
        await voice.close()
        await runner.cleanup()


async def wait_for_page_or_fail(browser: Browser, awaitable: Any, what: str) -> None:
    """Await ``awaitable``; fail at once with the page's reports if the page reports an error."""
    task = asyncio.ensure_future(awaitable)
    try:
        while not task.done():
            browser.reports.changed.clear()
            # A close from the sandbox (1011 for an op1 it refuses) ends the page's run too.
            errors = browser.reports.of("error") + [
                f"voice websocket closed with {code}" for code in browser.reports.of("ws-closed")
            ]
            if errors:
                pytest.fail(f"the page failed while waiting for {what}: {errors}")
            changed = asyncio.ensure_future(browser.reports.changed.wait())
            await asyncio.wait({task, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
        task.result()
    except TimeoutError:
        tail = browser.log.read_bytes()[-2000:].decode(errors="replace")
        pytest.fail(
            f"timed out waiting for {what}; page: {browser.reports.summary()}; chromium: {tail}"
        )
    finally:
        task.cancel()


@pytest.mark.integration
async def test_chromium_sends_its_microphone_through_the_sandbox(browser: Browser) -> None:
    voice, reports = browser.voice, browser.reports
    await wait_for_page_or_fail(
        browser, voice.wait_identified(USER_ID, timeout=GUARD), "the page's identify"
    )
    recording = voice.recording(USER_ID, SERVER_ID)
    await wait_for_page_or_fail(
        browser, recording.wait_frames(FRAMES, timeout=GUARD), f"{FRAMES} frames from Chromium"
    )
    await wait_for_page_or_fail(
        browser, recording.wait_speaking(True, timeout=GUARD), "op5 after DTLS"
    )

    # The page reports over HTTP, asynchronously: wait for the reports rather than assume them.
    await wait_for_page_or_fail(
        browser, asyncio.wait_for(reports.wait("connection", "connected"), GUARD), "'connected'"
    )
    await wait_for_page_or_fail(
        browser, asyncio.wait_for(reports.wait("offer"), GUARD), "the offer report"
    )
    (offer,) = reports.of("offer")
    assert offer["pt"] != 96
    fragment_lines = offer["fragment"].split("\n")
    assert not any(line.startswith(("m=", "c=", "a=candidate")) for line in fragment_lines)
    fingerprints = sum(line.startswith("a=fingerprint:") for line in fragment_lines)
    names = [codec["name"] for codec in offer["codecs"]]
    if browser.shape == "capture":
        # Discord accepted this: no fingerprint, and video codecs listed beside opus.
        assert fingerprints == 0
        assert names == ["opus", "H264", "VP8", "VP9"]
        assert fragment_lines[0] == "a=ice-options:trickle"
        assert any(line.endswith(" VP8/90000") for line in fragment_lines)
    else:
        assert fingerprints == 1
        assert names == ["opus"]

    ssrcs = {packet.ssrc for packet in recording.packets}
    assert ssrcs == {offer["ssrc"]}
    assert offer["ssrc"] in recording.ssrcs  # announced in op12 and op5
    stats = recording.stats()
    assert stats.frames >= FRAMES
    assert stats.sequence_errors == 0

    mono = pcm_to_mono(await asyncio.to_thread(recording.pcm))
    steady = mono[RATE // 2 :]  # past the encoder's start-up
    assert rms(steady) > 0.05, "Chromium's microphone arrived silent"
    assert dominant_frequency(steady) == pytest.approx(TONE_HZ, abs=2.0)
