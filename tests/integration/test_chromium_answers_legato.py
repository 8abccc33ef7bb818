"""Legato's ``webrtc`` transport against libwebrtc: headless Chromium as the answering side.

``test_chromium_fidelity`` proves browser -> sandbox; this is the other direction. Legato's
:class:`~legato.voice.transport.webrtc.WebRtcTransport` makes its offer as it does toward
Discord (op1's fragment). ``chromium/answer.html`` plays the voice server's WebRTC end with SDP
code of its own: it builds a full offer from the fragment, lets Chromium's RTCPeerConnection
answer, and cuts op4's fragment out of the answer in the capture's shape. Legato builds its full
answer from that (``legato.voice.sdp``), connects (ICE to Chromium's host candidate, DTLS with
Chromium as the server, SRTP) and sends a 440 Hz tone, paced on 20 ms deadlines.

What Chromium received is read three ways: every encoded frame its receiver hands on (encoded
insertable streams: RTP timestamp, sequence number, payload type, SSRC, payload), the audio the
track then carries, decoded and jitter-buffered by NetEq (MediaStreamTrackProcessor), and
``getStats()`` (packets received and lost, concealment); WebAudio's AnalyserNode gives its view
of the pitch. Every frame must arrive in order and intact, and the track must carry the tone at
its pitch, as long as it was sent, with no gap.

Why not a WebAudio tap for the audio: WebAudio's bridge from a remote track underruns now and
then in headless Chromium (10 ms of zeros about 150 ms in, more under CPU load), with nothing
late, lost or concealed by NetEq; the track's own audio never shows it.

Chromium must be installed, or the test fails (see ``chromium_support``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
from aiohttp import web

from legato.audio.sink import OPUS_SILENCE, SILENCE_FRAMES
from legato.sandbox.analysis import dominant_frequency, rms
from legato.voice.transport.webrtc import WebRtcTransport
from tests.integration.chromium_support import running_chromium
from tests.integration.voice_support import FRAME_S, tone_frames

PAGE = Path(__file__).parent / "chromium" / "answer.html"
TONE_HZ = 440.0
SECONDS = 3.0
SSRC = 0x4C454741  # what op2 would have handed out
RATE = 48_000
GUARD = 90.0  # seconds; Chromium's first start on a loaded 2-core machine is slow
#: Chromium gathers no loopback candidate and hides host addresses behind mDNS names unless told.
ANSWERER_FLAGS = (
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
)
WINDOW_S = 0.010  # gap detection resolution


@dataclass
class Page:
    """The answering page's signalling websocket: what it sent, and a way to reply."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ws: web.WebSocketResponse | None = None
    log: Path | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=16 << 20)
        await ws.prepare(request)
        self.ws = ws
        self.changed.set()
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.messages.append(json.loads(msg.data))
                self.changed.set()
        return ws

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_str(json.dumps(message))

    async def wait_for(self, what: str, found: Any) -> Any:
        """Wait until ``found()`` returns something; fail at once if the page reports an error."""
        try:
            async with asyncio.timeout(GUARD):
                while True:
                    errors = [m["detail"] for m in self.messages if m.get("kind") == "error"]
                    if errors:
                        pytest.fail(f"the page failed while waiting for {what}: {errors}")
                    result = found()
                    if result is not None:
                        return result
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            tail = self.log.read_bytes()[-2000:].decode(errors="replace") if self.log else ""
            kinds = [m.get("kind", m.get("op")) for m in self.messages]
            pytest.fail(f"timed out waiting for {what}; page sent {kinds}; chromium: {tail}")

    def first(self, key: str, value: Any) -> dict[str, Any] | None:
        return next((m for m in self.messages if m.get(key) == value), None)


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Page]:
    signalling = Page(log=tmp_path / "chromium.log")

    async def serve_page(_: web.Request) -> web.StreamResponse:
        return web.FileResponse(PAGE)

    app = web.Application()
    app.router.add_get("/", serve_page)
    app.router.add_get("/signal", signalling.handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    try:
        async with running_chromium(
            url, tmp_path / "profile", tmp_path / "chromium.log", ANSWERER_FLAGS
        ):
            await signalling.wait_for("the page's websocket", lambda: signalling.ws)
            yield signalling
    finally:
        await runner.cleanup()


async def play_paced(
    transport: WebRtcTransport, frames: list[bytes], then: asyncio.Event | None = None
) -> None:
    """Send ``frames`` on absolute 20 ms deadlines of the loop's clock, as Legato's player does.

    With ``then``, set ``then`` after the last of them and go on sending Opus silence until the
    task is cancelled: the receiver's stream does not end while it is being measured.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    index = 0
    while True:
        if index < len(frames):
            frame = frames[index]
        elif then is None:
            return
        else:
            then.set()
            frame = OPUS_SILENCE
        # Pacing to a deadline, not waiting for an event; a late frame still yields once, so
        # aiortc's sender drains the track between frames as it does behind Legato's player.
        await asyncio.sleep(max(0.0, start + index * FRAME_S - loop.time()))
        transport.send_frame(frame)
        index += 1


def window_levels(mono: npt.NDArray[np.float64], rate: int) -> npt.NDArray[np.float64]:
    """RMS of consecutive ``WINDOW_S`` windows."""
    size = round(rate * WINDOW_S)
    count = mono.size // size
    windows = mono[: count * size].reshape(count, size)
    levels: npt.NDArray[np.float64] = np.sqrt(np.mean(np.square(windows), axis=1))
    return levels


@pytest.mark.integration
async def test_chromium_plays_legatos_tone_at_its_pitch_without_gaps(page: Page) -> None:
    tone = tone_frames(SECONDS, TONE_HZ)
    frames = [*tone, *[OPUS_SILENCE] * SILENCE_FRAMES]
    transport = WebRtcTransport(host_candidates_allow_loopback=True)
    try:
        op1 = await transport.prepare({"ssrc": SSRC})
        assert transport.ssrc == SSRC
        # The page stands in for op1 -> server and op12's audio_ssrc.
        await page.send({"op": 1, "d": op1, "audio_ssrc": transport.ssrc})
        op4 = await page.wait_for("op4", lambda: page.first("op", 4))
        async with asyncio.timeout(GUARD):
            await transport.start(op4["d"])
        listening = await page.wait_for(
            "the page's audio graph", lambda: page.first("kind", "listening")
        )
        assert listening["detail"]["sampleRate"] == 48_000
        all_sent = asyncio.Event()
        player = asyncio.ensure_future(play_paced(transport, frames, then=all_sent))
        try:
            async with asyncio.timeout(GUARD):
                await all_sent.wait()
            # The frames handed over, less any the track dropped (asserted to be none below).
            await page.send({"kind": "sent", "packets": len(frames) - transport.stats.send_errors})
            result = (
                await page.wait_for("the page's result", lambda: page.first("kind", "result"))
            )["detail"]
        finally:
            player.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await player
    finally:
        await transport.close()

    assert transport.stats.frames_sent >= len(frames)
    assert transport.stats.send_errors == 0

    # Chromium's receiver got every frame Legato sent, in order, byte for byte: consecutive
    # sequence numbers, RTP timestamps 960 apart, opus on op1's payload type, op2's SSRC.
    received = result["frames"][: len(frames)]
    assert [base64.b64decode(payload) for *_, payload in received] == frames
    assert {(pt, ssrc) for _, _, pt, ssrc, _ in received} == {
        (op1["codecs"][0]["payload_type"], SSRC)
    }
    timestamps = [ts for ts, *_ in received]
    assert all((b - a) % (1 << 32) == 960 for a, b in itertools.pairwise(timestamps))
    sequences = [seq for _, seq, *_ in received]
    assert all((b - a) % (1 << 16) == 1 for a, b in itertools.pairwise(sequences))

    # getStats() agrees, counted when the last tone packet had arrived (Legato still sending
    # silence, so the stream's end is not yet concealment): none lost, nothing concealed with
    # silence. A few milliseconds of concealment that carries the waveform on may happen (a
    # late packet on a loaded machine): no gap, and the track's audio below is the judge.
    at_last = result["atLastPacket"]
    assert at_last["ssrc"] == SSRC
    assert at_last["packetsReceived"] >= len(frames), at_last
    assert at_last["packetsLost"] == 0, at_last
    assert at_last["silentConcealedSamples"] == 0, at_last
    assert result["inbound"]["packetsLost"] == 0, result["inbound"]

    # The track's audio, as NetEq decoded and played it out: the tone at its pitch, as long
    # as Legato sent it (audio time: NetEq may stretch it a little, but skips nothing), with
    # no gap from its fade-in to its end.
    assert result["rates"] == [RATE]
    pcm = np.frombuffer(base64.b64decode(result["pcm"]), dtype="<i2").astype(np.float64) / 32768
    levels = window_levels(pcm, RATE)
    loud = np.flatnonzero(levels > 0.05)
    assert loud.size, f"Chromium played silence; stats {at_last}"
    first, last = int(loud[0]), int(loud[-1])
    assert (last - first + 1) * WINDOW_S == pytest.approx(SECONDS, rel=0.05), at_last
    start, end = first + 2, last - 1  # the first 20 ms fade in; the last window fades out
    steady = levels[start:end]
    median = float(np.median(steady))
    quiet = np.flatnonzero(steady < 0.5 * median)
    assert quiet.size == 0, (
        f"gaps at {[round((start + int(i)) * WINDOW_S, 2) for i in quiet]} s of the track "
        f"(median level {median:.3f}); stats {at_last}"
    )
    size = round(RATE * WINDOW_S)
    steady_pcm = pcm[start * size : end * size]
    assert dominant_frequency(steady_pcm) == pytest.approx(TONE_HZ, abs=2.0)
    assert rms(steady_pcm) > 0.3  # the tone is at half scale (0.35 RMS)
    # WebAudio hears the same pitch (to its 1.5 Hz bins).
    assert result["analyserPeakHz"] == pytest.approx(TONE_HZ, abs=3.0)
