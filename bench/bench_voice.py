"""Voice send path: CPU per stream-second beside discord.py's, and streams one process sustains.

Two sections, both on 127.0.0.1 against a sink socket that answers IP discovery and then is never
read (as the peer harness's sink; sends are loopback syscalls):

1. CPU of one 20 ms frame through the ``udp`` send path: Legato's ``UdpTransport.send_frame``
   (RTP header + AEAD + ``sendto``) in both modes, beside discord.py 2.7.1's own
   ``VoiceClient.send_audio_packet`` (its ``_get_voice_packet`` + PyNaCl XChaCha20 + ``send``,
   borrowed onto a stand-in exactly as ``shared/bench/bench_peer.py`` does) in the same run.
2. A ramp of N passthrough streams (pre-made Opus frames of a tone) on one asyncio loop, each a
   prepared ``UdpTransport``, paced by one shared 20 ms tick at absolute deadlines; a case
   passes when every stream's gap p99 (|interval - 20 ms|, pooled) is under 5 ms and at least
   99 % of the frames went out. The largest passing N is ``ours.udp.max_streams_gap_p99_5ms``.

    python bench/bench_voice.py [--full]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import random
import socket
import sys
import time
from collections.abc import Callable
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
        from legato.voice.rtp import discovery_response, parse_discovery_request

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


# -- 2. streams one process sustains -------------------------------------------------------------


async def _ramp_case(n: int, seconds: float, warmup: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    sink = _Sink(loop)
    frames = _tone_frames()
    transports: list[Any] = []
    try:
        for start in range(0, n, 100):
            transports += await asyncio.gather(
                *(_transport(sink, GCM) for _ in range(start, min(n, start + 100)))
            )
        sink.stop_reading()
        times: list[list[float]] = [[] for _ in range(n)]
        sends = [t.send_frame for t in transports]
        done = loop.create_future()
        perf = time.perf_counter
        t_start = loop.time() + 0.05
        window_start = t_start + warmup
        t_end = window_start + seconds
        state = {"k": 0, "c0": 0.0, "p0": 0.0, "p1": 0.0, "c1": 0.0, "in_window": False}

        def tick() -> None:
            k = state["k"]
            now = loop.time()
            if not state["in_window"] and now >= window_start:
                state["in_window"] = True
                state["c0"] = time.process_time()
                state["p0"] = perf()
            if now >= t_end:
                state["c1"] = time.process_time()
                state["p1"] = perf()
                done.set_result(None)
                return
            frame = frames[int(k) % 50]
            record = state["in_window"]
            for i, send in enumerate(sends):
                send(frame)
                if record:
                    times[i].append(perf())
            state["k"] = k + 1
            loop.call_at(t_start + (k + 1) * FRAME_S, tick)

        gc.collect()
        gc.freeze()
        loop.call_at(t_start, tick)
        await done
        gc.unfreeze()
        wall = state["p1"] - state["p0"]
        sent = sum(len(t) for t in times)
        pacing = _pacing(times)
        errors = sum(t.stats.send_errors for t in transports)
        return {
            "n": n,
            "cpu_pct": (state["c1"] - state["c0"]) / max(sent * FRAME_S, 1e-9) * 100,
            "delivered": sent / max(n * wall / FRAME_S, 1e-9),
            "send_errors": errors,
            **pacing,
        }
    finally:
        for t in transports:
            await t.close()
        sink.close()


def _ramp(quick: bool) -> tuple[list[list[object]], int]:
    seconds, warmup = (3.0, 1.0) if quick else (8.0, 2.0)
    ns = [100, 300, 660, 1000, 1500] if quick else [100, 300, 660, 1000, 1500, 2000, 3000]
    rows: list[list[object]] = []
    best = 0
    for n in ns:
        r = asyncio.run(_ramp_case(n, seconds, warmup))
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
        FIGURES[f"voice.udp.n{n}.gap_p99"] = r["gap_p99"]
        FIGURES[f"voice.udp.n{n}.cpu"] = r["cpu_pct"]
        if not ok:
            break
        best = n
    return rows, best


def run(quick: bool) -> str:
    """Run both sections and return them as Markdown (figures land in ``FIGURES``)."""
    count, repeat = (5_000, 3) if quick else (20_000, 5)
    rows = asyncio.run(_send_path(count, repeat))
    out = _table(
        f"Voice: udp send path, CPU per 20 ms frame ({count} frames, best of {repeat})",
        ["path", "mode", "us/frame", "cpu %/stream", "streams/core", "x discord.py"],
        rows,
    )
    ramp_rows, best = _ramp(quick)
    FIGURES["ours.udp.max_streams_gap_p99_5ms"] = float(best)
    out += _table(
        "Voice: passthrough streams on one loop, udp, shared 20 ms tick "
        f"(pass: gap p99 < {GAP_P99_LIMIT_MS:g} ms and delivered >= 0.99)",
        [
            "N",
            "cpu %/stream",
            "cpu % total",
            "delivered",
            "gap p50 ms",
            "gap p99 ms",
            "gap max ms",
            "send errors",
            "pass",
        ],
        ramp_rows,
    )
    out += f"\n\nLargest N passing: **{best}** (target >= 660)\n"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    print(run(quick=not args.full))
    print(FIGURES, file=sys.stderr)


if __name__ == "__main__":
    main()
