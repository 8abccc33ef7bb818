"""Voice send path: CPU per stream-second beside discord.py's, and streams one process sustains.

Two sections, both on 127.0.0.1 against a sink socket that answers IP discovery and then is never
read (as the peer harness's sink; sends are loopback syscalls):

1. CPU of one 20 ms frame through the ``udp`` send path: Legato's ``UdpTransport.send_frame``
   (RTP header + AEAD + ``sendto``) in both modes, beside discord.py 2.7.1's own
   ``VoiceClient.send_audio_packet`` (its ``_get_voice_packet`` + PyNaCl XChaCha20 + ``send``,
   borrowed onto a stand-in exactly as ``shared/bench/bench_peer.py`` does) in the same run;
   and through the ``webrtc`` send path: ``WebRtcTransport.send_frame`` feeding aiortc, whose RTP
   sender packs the pre-encoded frame, SRTP-protects it and sends it over its ICE connection, to
   a sandbox voice server in a child process (so its receiving and recording are not counted).
2. Ramps of N passthrough streams (pre-made Opus frames of a tone) on one asyncio loop, each a
   prepared ``UdpTransport``: paced by one shared 20 ms tick at absolute deadlines (the floor of
   the send path), and paced by N real ``GuildPlayer``s (each its own pacer, its source read
   through the executor: the path a bot runs). A case passes when the pooled gap p99
   (|interval - 20 ms|) is under 5 ms and at least 99 % of the frames went out. The largest
   passing N with GuildPlayers is ``ours.udp.max_streams_gap_p99_5ms``.

    python bench/bench_voice.py [--full]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
PEER_DIR = Path(os.environ.get("LEGATO_PEER_BENCH", HERE.parent.parent / "shared" / "bench"))

FIGURES: dict[str, float] = {}

FRAME_S = 0.020
GAP_P99_LIMIT_MS = 5.0
KEY = bytes(range(32))
GCM = "aead_aes256_gcm_rtpsize"
XCHACHA = "aead_xchacha20_poly1305_rtpsize"


# -- helpers -------------------------------------------------------------------------------------


def _tone_frames(count: int = 50, freq: float = 440.0) -> list[bytes]:
    """``count`` Opus frames of a tone, encoded once (the passthrough streams replay them)."""
    import numpy as np

    from legato.audio.encode import OpusEncoder
    from legato.audio.source import FRAME_SAMPLES, SAMPLE_RATE

    encoder = OpusEncoder()
    out = []
    for k in range(count):
        t = (np.arange(FRAME_SAMPLES) + k * FRAME_SAMPLES) / SAMPLE_RATE
        mono = (0.5 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2")
        out.append(encoder.encode(np.repeat(mono, 2).tobytes()))
    return out


class _Sink:
    """A UDP socket on loopback that answers IP discovery while asked to, then is never read."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        from legato.sandbox.rtp import discovery_response, parse_discovery_request

        self._response = discovery_response
        self._parse = parse_discovery_request
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._read)
        self._reading = True

    def _read(self) -> None:
        for _ in range(64):
            try:
                data, addr = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            if len(data) == 74 and data[:2] == b"\x00\x01":
                ssrc = self._parse(data)
                self.sock.sendto(self._response(ssrc, addr[0], addr[1]), addr)

    def stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    def close(self) -> None:
        self.stop_reading()
        self.sock.close()


async def _transport(sink: _Sink, mode: str) -> Any:
    from legato.voice.transport.udp import UdpTransport

    udp = UdpTransport(discovery_timeout=5.0)
    ready = {"ssrc": random.getrandbits(32), "ip": "127.0.0.1", "port": sink.port, "modes": [mode]}
    await udp.prepare(ready)
    await udp.start({"mode": mode, "secret_key": KEY})
    return udp


def _dpy_stand_in(port: int) -> Any:
    """discord.py's send path on a stand-in, borrowed as shared/bench/bench_peer.py does."""
    import discord

    vc_cls = discord.VoiceClient

    class Conn:
        dave_session = None
        can_encrypt = False

        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def send_packet(self, packet: bytes) -> None:
            self.sock.send(packet)

    class StandIn:
        send_audio_packet = vc_cls.send_audio_packet
        checked_add = vc_cls.checked_add
        _get_voice_packet = vc_cls._get_voice_packet
        _encrypt_aead_xchacha20_poly1305_rtpsize = vc_cls._encrypt_aead_xchacha20_poly1305_rtpsize

        def __init__(self) -> None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(("127.0.0.1", port))
            self._connection = Conn(sock)
            self.sequence = self.timestamp = self._incr_nonce = 0
            self.ssrc = random.getrandbits(32)
            self.mode = XCHACHA
            self.secret_key = list(KEY)
            self.client = SimpleNamespace(loop=None)

    return StandIn()


def _table(title: str, headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = [f"\n### {title}\n", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _pacing(streams: list[list[float]], skip: int = 5) -> dict[str, float]:
    import numpy as np

    gaps = [np.abs(np.diff(np.asarray(ts[skip:])) - FRAME_S) * 1e3 for ts in streams]
    pooled = np.concatenate([g for g in gaps if g.size]) if any(g.size for g in gaps) else None
    if pooled is None:
        return {"gap_p50": math.nan, "gap_p99": math.nan, "gap_max": math.nan}
    return {
        "gap_p50": float(np.percentile(pooled, 50)),
        "gap_p99": float(np.percentile(pooled, 99)),
        "gap_max": float(pooled.max()),
    }


# -- 1. CPU of the send path ---------------------------------------------------------------------


async def _send_path(count: int, repeat: int) -> list[list[object]]:
    loop = asyncio.get_running_loop()
    sink = _Sink(loop)
    frames = _tone_frames()
    try:
        ours = {mode: await _transport(sink, mode) for mode in (GCM, XCHACHA)}
        sink.stop_reading()
        dpy = _dpy_stand_in(sink.port)

        def ours_run(mode: str) -> None:
            send = ours[mode].send_frame
            for i in range(count):
                send(frames[i % 50])

        def dpy_run() -> None:
            send = dpy.send_audio_packet
            for i in range(count):
                send(frames[i % 50], encode=False)

        cases: list[tuple[str, str, Callable[[], None]]] = [
            ("Legato UdpTransport.send_frame", GCM, lambda: ours_run(GCM)),
            ("Legato UdpTransport.send_frame", XCHACHA, lambda: ours_run(XCHACHA)),
            ("discord.py send_audio_packet(encode=False)", XCHACHA, dpy_run),
        ]
        rows: list[list[object]] = []
        results: dict[str, float] = {}
        for label, mode, run in cases:
            best = math.inf
            for _ in range(repeat):
                c0 = time.process_time()
                run()
                best = min(best, (time.process_time() - c0) / count * 1e6)
            cpu_pct = best * 50 / 1e6 * 100  # % of a core per stream-second (50 frames a second)
            key = "dpy" if label.startswith("discord") else f"ours.{mode.split('_')[1]}"
            results[key] = best
            FIGURES[f"voice.send_path.{key}.us"] = best
            rows.append([label, mode, best, cpu_pct, 20_000 / best])
        best = await _webrtc_send_path(count, repeat)
        results["webrtc"] = best
        FIGURES["voice.send_path.webrtc.us"] = best
        label = "Legato WebRtcTransport.send_frame + aiortc RTP/SRTP"
        rows.append([label, "dtls-srtp", best, best * 50 / 1e6 * 100, 20_000 / best])
        for mode in (GCM, XCHACHA):
            stats = ours[mode].stats
            assert stats.send_errors == 0, f"{mode}: {stats.send_errors} send errors"
            await ours[mode].close()
        dpy._connection.sock.close()
        ratio_key = "ours.xchacha20"
        if ratio_key in results:
            FIGURES["voice.send_path.ratio_xchacha_vs_dpy"] = results[ratio_key] / results["dpy"]
        for row in rows:
            row.append(row[2] / results["dpy"])  # type: ignore[operator]
        return rows
    finally:
        sink.close()


# The peer of the webrtc rows: a sandbox voice server in a child process; prints how to reach it,
# then serves until its stdin closes. The rows time the webrtc send path without DAVE, so it is
# asked for the self-hosted path (ws://, host:port, no DAVE): the default, Discord's, requires DAVE
# and names itself in a way only its own process resolves.
_WEBRTC_PEER = """
import asyncio, json, sys
from legato.sandbox.voice import SandboxVoiceServer

async def main():
    async with SandboxVoiceServer(
        heartbeat_interval=5.0, tls=False, dave_protocol_version=0
    ) as server:
        token = server.register_session(server_id=1, user_id=2, session_id="bench")
        print(json.dumps({"endpoint": server.endpoint, "token": token}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def _webrtc_connection() -> AsyncIterator[Any]:
    """A ``VoiceConnection`` on ``webrtc`` to a sandbox voice server in a child process."""
    from legato.voice.gateway import VoiceConnection, VoiceOptions

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WEBRTC_PEER,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(60):
            line = await child.stdout.readline()
        if not line:
            raise RuntimeError("the sandbox voice server child did not start")
        peer = json.loads(line)
        options = VoiceOptions(transport="webrtc", dave=False, connect_timeout=30.0)
        conn = VoiceConnection(
            endpoint=peer["endpoint"],
            token=peer["token"],
            session_id="bench",
            user_id=2,
            server_id=1,
            options=options,
        )
        await conn.connect()
        try:
            yield conn
        finally:
            await conn.close()
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            async with asyncio.timeout(10):
                await child.wait()
        except TimeoutError:
            child.kill()
            await child.wait()


async def _webrtc_send_path(count: int, repeat: int) -> float:
    """Best CPU in microseconds per frame of the webrtc send path, aiortc's work included.

    aiortc sends from its own task, so frames go in bursts below the track's queue bound (no
    drops) and the loop runs until aiortc has taken every one; ``process_time`` spans it all.
    """
    frames = _tone_frames()
    burst = 8
    best = math.inf
    async with _webrtc_connection() as conn:
        transport = conn.transport
        stats = transport.stats

        async def drained(target: int) -> None:
            for _ in range(10_000):  # aiortc's sender takes a burst in a step or two
                if stats.frames_sent >= target:
                    return
                await asyncio.sleep(0)
            raise RuntimeError("aiortc's sender stopped taking frames")

        for _ in range(repeat):
            start = stats.frames_sent
            c0 = time.process_time()
            for i in range(0, count, burst):
                for k in range(i, min(i + burst, count)):
                    transport.send_frame(frames[k % 50])
                await drained(start + min(i + burst, count))
            await asyncio.sleep(0)  # the last packet leaves in the sender's next step
            best = min(best, (time.process_time() - c0) / count * 1e6)
        assert stats.send_errors == 0, f"webrtc: {stats.send_errors} frames dropped"
        assert conn.is_connected()
    return best


# -- 2. streams one process sustains -------------------------------------------------------------


class _LoopSource:
    """A passthrough FrameSource replaying pre-encoded frames forever."""

    passthrough = True
    duration = None

    def __init__(self, frames: list[bytes]) -> None:
        self._frames = frames
        self._index = 0

    @property
    def position(self) -> float:
        return self._index * FRAME_S

    def read(self, max_frames: int) -> list[bytes]:
        n = len(self._frames)
        out = [self._frames[(self._index + i) % n] for i in range(max_frames)]
        self._index += max_frames
        return out

    def seek(self, seconds: float) -> None:
        self._index = round(seconds / FRAME_S)

    def set_volume(self, volume: float) -> None:
        del volume

    def close(self) -> None:
        pass


class _TimedSink:
    """FrameSink over a UdpTransport that notes when each frame went out (loop clock)."""

    def __init__(self, transport: Any) -> None:
        self._send = transport.send_frame
        self.times: list[float] = []
        self._mono = time.monotonic  # the clock of loop.time() on Linux

    async def set_speaking(self, speaking: bool) -> None:
        del speaking

    def send_frame(self, opus: bytes) -> None:
        self._send(opus)
        self.times.append(self._mono())


async def _ramp_case(
    n: int, seconds: float, warmup: float, paced_by: str, passthrough_buffer_ms: int | None = None
) -> dict[str, float]:
    """N prepared UdpTransports fed pre-made frames, paced by one tick or by N GuildPlayers
    (``passthrough_buffer_ms``: theirs; ``None``: the player's default)."""
    loop = asyncio.get_running_loop()
    sink = _Sink(loop)
    frames = _tone_frames()
    transports: list[Any] = []
    players: list[Any] = []
    pool: ThreadPoolExecutor | None = None
    try:
        for start in range(0, n, 100):
            transports += await asyncio.gather(
                *(_transport(sink, GCM) for _ in range(start, min(n, start + 100)))
            )
        sink.stop_reading()
        sinks = [_TimedSink(t) for t in transports]
        stop = asyncio.Event()
        if paced_by != "tick":
            from legato.audio.player import GuildPlayer
            from legato.audio.source import FrameSource
            from legato.audio.track import Track

            pool = ThreadPoolExecutor(4, thread_name_prefix="bench-voice")

            async def opener(track: Track, start: float) -> FrameSource:
                return _LoopSource(frames)

            players = [
                GuildPlayer(s, opener, executor=pool, passthrough_buffer_ms=passthrough_buffer_ms)
                for s in sinks
            ]
            for i, p in enumerate(players):
                p.queue.add([Track(url=f"bench:{i}", title=f"bench {i}")])
        # Collect (and freeze what is made) before the clock starts: in a process that ran other
        # sections first (``run.py --only load,voice``), a full collection takes seconds, and a
        # tick or players started before it would begin that far behind their deadlines.
        gc.collect()
        gc.freeze()
        t_start = loop.time() + 0.05
        if paced_by == "tick":

            def tick(k: int) -> None:
                if stop.is_set():
                    return
                frame = frames[k % 50]
                for s in sinks:
                    s.send_frame(frame)
                loop.call_at(t_start + (k + 1) * FRAME_S, tick, k + 1)

            loop.call_at(t_start, tick, 0)
        else:
            for i, p in enumerate(players):
                loop.call_at(t_start + i / n * FRAME_S, p.start)
        await asyncio.sleep(t_start - loop.time() + warmup)
        c0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        c1, t1 = time.process_time(), time.monotonic()
        stop.set()
        gc.unfreeze()
        window = [[t for t in s.times if t0 <= t <= t1] for s in sinks]
        sent = sum(len(w) for w in window)
        return {
            "n": n,
            "cpu_pct": (c1 - c0) / max(sent * FRAME_S, 1e-9) * 100,
            "delivered": sent / max(n * (t1 - t0) / FRAME_S, 1e-9),
            "send_errors": sum(t.stats.send_errors for t in transports),
            **_pacing(window),
        }
    finally:
        for p in players:
            await p.close()
        if pool is not None:
            pool.shutdown(wait=True)
        for t in transports:
            await t.close()
        sink.close()


def _ramp(quick: bool, paced_by: str) -> tuple[list[list[object]], int]:
    seconds, warmup = (3.0, 1.0) if quick else (8.0, 2.0)
    ns = [100, 300, 660, 1000, 1500] if quick else [100, 300, 660, 1000, 1500, 2000, 3000]
    rows: list[list[object]] = []
    best = 0
    for n in ns:
        r = asyncio.run(_ramp_case(n, seconds, warmup, paced_by))
        ok = r["gap_p99"] < GAP_P99_LIMIT_MS and r["delivered"] >= 0.99
        if not ok:
            # The machine is shared: a neighbour's burst can sink one window. One retry; the
            # better of the two is reported (and both must fail for the ramp to stop).
            again = asyncio.run(_ramp_case(n, seconds, warmup, paced_by))
            if again["gap_p99"] < r["gap_p99"]:
                r = again
            ok = r["gap_p99"] < GAP_P99_LIMIT_MS and r["delivered"] >= 0.99
        rows.append(
            [
                n,
                r["cpu_pct"],
                r["cpu_pct"] * n,
                r["delivered"],
                r["gap_p50"],
                r["gap_p99"],
                r["gap_max"],
                int(r["send_errors"]),
                "yes" if ok else "no",
            ]
        )
        FIGURES[f"voice.udp.{paced_by}.n{n}.gap_p99"] = r["gap_p99"]
        FIGURES[f"voice.udp.{paced_by}.n{n}.cpu"] = r["cpu_pct"]
        if not ok:
            break
        best = n
    return rows, best


def run(quick: bool) -> str:
    """Run both sections and return them as Markdown (figures land in ``FIGURES``)."""
    count, repeat = (5_000, 3) if quick else (20_000, 5)
    rows = asyncio.run(_send_path(count, repeat))
    out = _table(
        f"Voice: udp and webrtc send paths, CPU per 20 ms frame ({count} frames, best of {repeat})",
        ["path", "mode", "us/frame", "cpu %/stream", "streams/core", "x discord.py"],
        rows,
    )
    headers = [
        "N",
        "cpu %/stream",
        "cpu % total",
        "delivered",
        "gap p50 ms",
        "gap p99 ms",
        "gap max ms",
        "send errors",
        "pass",
    ]
    results = {}
    for paced_by, label in (
        ("tick", "one shared 20 ms tick"),
        ("player", "N GuildPlayers (each its own pacer), passthrough"),
    ):
        ramp_rows, best = _ramp(quick, paced_by)
        results[paced_by] = best
        FIGURES[f"voice.udp.{paced_by}.max_streams"] = float(best)
        out += _table(
            f"Voice: N udp streams on one loop, paced by {label} "
            f"(pass: gap p99 < {GAP_P99_LIMIT_MS:g} ms and delivered >= 0.99; a failing N is "
            "run twice and the better run shown)",
            headers,
            ramp_rows,
        )
    # The goal is about the player's path when it exists; the tick is the floor beside it.
    FIGURES["ours.udp.max_streams_gap_p99_5ms"] = float(results["player"])
    out += (
        f"\n\nLargest N passing: **{results['player']}** with GuildPlayers, "
        f"{results['tick']} with one shared tick (target >= 660)\n"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--full", action="store_true")
    ap.add_argument(
        "--players",
        type=int,
        default=0,
        help="only N GuildPlayers (8 s windows, 3 runs), not the whole section",
    )
    ap.add_argument(
        "--passthrough-buffer-ms",
        type=int,
        default=None,
        help="with --players: GuildPlayer(passthrough_buffer_ms=) (default: the player's)",
    )
    ap.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="with --players: sys.setswitchinterval (the bot's [playback] "
        "thread_switch_interval_ms; default: the interpreter's)",
    )
    args = ap.parse_args()
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    if args.players:
        for _ in range(3):
            r = asyncio.run(
                _ramp_case(args.players, 8.0, 2.0, "player", args.passthrough_buffer_ms)
            )
            print(
                f"{args.players} GuildPlayers, switch {sys.getswitchinterval() * 1e3:g} ms, "
                f"load {os.getloadavg()[0]:.2f}: gap p99 "
                f"{r['gap_p99']:.2f} ms, p50 {r['gap_p50']:.2f} ms, cpu {r['cpu_pct']:.4f} "
                f"%/stream, delivered {r['delivered']:.3f}"
            )
        return
    print(run(quick=not args.full))
    print(FIGURES, file=sys.stderr)


if __name__ == "__main__":
    main()
