"""GuildPlayer pacing, start-up and memory, measured like the shared pacer bench.

Sections (each pacing case in a fresh subprocess; "hog" cases run one busy-loop process pinned
to the other core for the case's duration, as ``shared/bench`` does):

1. N = 1, 8, 32, 128 GuildPlayers on one loop, each playing a passthrough source (pre-encoded
   Opus frames of a tone, read in chunks through a thread pool as a real source is) into a sink
   that does a real ``send`` on a connected UDP socket to 127.0.0.1. Players start spread over
   one 20 ms period, as real players start at unrelated times. Columns as in
   ``shared/bench/README.md`` ("What the figures mean"): cpu %/stream, delivered, dev p50/p99/max,
   gap p99, mingap, computed by ``bench_common.pacing_stats``; plus the player's own stats.
2. 32 players started in the same instant (the start-together burst): figures from the very
   first frame (no warm-up), and how many packets went out < 5 ms after the previous one.
3. A 200 ms stall: the event loop blocked for 200 ms (``time.sleep`` in a callback), and a
   source whose ``read`` blocks for 500 ms (beyond the 300 ms buffer). Reported: the smallest
   gap after the stall and the packets sent < 5 ms apart (discord.py sends ~10 back to back).
4. Time to the first frame, for a track on a local HTTP server, from the play request (yt-dlp
   resolves the query) and from ``start()`` (yt-dlp resolves the stream URL again, PyAV opens
   it): Opus in WebM (passthrough) and MP3 (transcode).
5. Memory per player (tracemalloc): idle (made, queue of one track) and playing (buffer full);
   and resident memory (RSS) per player with real PyAV sources and libopus encoders.

    python bench/bench_player.py [--full]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEER_DIR = Path(os.environ.get("LEGATO_PEER_BENCH", HERE.parent.parent / "shared" / "bench"))
MEDIA_DIR = Path.home() / ".cache" / "legato-bench"
sys.path.insert(0, str(PEER_DIR))
import bench_common as bc  # type: ignore[import-not-found]  # noqa: E402  shared stats, 1:1 figures

FIGURES: dict[str, float] = {}

FRAME_S = 0.020


# -- pieces used inside a case -------------------------------------------------------------------


def _tone_frames(count: int = 50, freq: float = 440.0) -> list[bytes]:
    """``count`` Opus frames of a tone, encoded once; the sources replay them."""
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


class _LoopSource:
    """A passthrough FrameSource replaying pre-encoded frames forever (optionally stalling)."""

    def __init__(self, frames: list[bytes], stall_at: int | None = None, stall_s: float = 0.0):
        self._frames = frames
        self._index = 0
        self._stall_at = stall_at
        self._stall_s = stall_s

    passthrough = True
    duration = None

    @property
    def position(self) -> float:
        return self._index * FRAME_S

    def read(self, max_frames: int) -> list[bytes]:
        if self._stall_at is not None and self._index >= self._stall_at:
            self._stall_at = None
            time.sleep(self._stall_s)
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


class _UdpSink:
    """A FrameSink doing a real ``send`` on a connected UDP socket; records send times."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(address)
        self.sock.setblocking(False)
        self.times: list[float] = []
        self._mono = time.monotonic  # the clock of loop.time() on Linux

    async def set_speaking(self, speaking: bool) -> None:
        del speaking

    def send_frame(self, opus: bytes) -> None:
        # A full loopback buffer drops the packet; the send time is what is measured.
        with contextlib.suppress(BlockingIOError, OSError):
            self.sock.send(opus)
        self.times.append(self._mono())


def _after(times: list[float], t0: float) -> tuple[float, int]:
    """Smallest gap (ms) between sends at or after ``t0`` and the number of gaps < 5 ms."""
    ts = [t for t in times if t >= t0]
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    if not gaps:
        return float("nan"), 0
    return min(gaps) * 1e3, sum(1 for g in gaps if g < 0.005)


def _case(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one pacing case in this (fresh) process."""
    from legato.audio.player import GuildPlayer
    from legato.audio.source import FrameSource
    from legato.audio.track import Track

    n: int = spec["n"]
    seconds: float = spec["seconds"]
    warmup: float = spec["warmup"]
    together: bool = spec.get("together", False)
    loop_stall: float = spec.get("loop_stall", 0.0)
    read_stall: float = spec.get("read_stall", 0.0)
    if "switch_interval" in spec:
        sys.setswitchinterval(spec["switch_interval"])

    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    address = receiver.getsockname()
    frames = _tone_frames()

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(spec.get("threads", 4), thread_name_prefix="bench-player")
        sinks = [_UdpSink(address) for _ in range(n)]

        async def opener(track: Track, start: float) -> FrameSource:
            stall_at = 50 if read_stall else None
            return _LoopSource(frames, stall_at, read_stall)

        players = [GuildPlayer(s, opener, executor=pool) for s in sinks]
        for i, p in enumerate(players):
            p.queue.add([Track(url=f"bench:{i}", title=f"bench {i}")])
        t_start = loop.time() + 0.05
        for i, p in enumerate(players):
            loop.call_at(t_start + (0.0 if together else i / n * FRAME_S), p.start)
        marks: dict[str, float] = {}
        await asyncio.sleep(t_start - loop.time() + warmup)
        marks["c0"], marks["t0"] = time.process_time(), time.monotonic()
        stall_t = float("nan")
        if loop_stall:
            await asyncio.sleep(seconds / 2)
            stall_t = time.monotonic()
            loop.call_soon(time.sleep, loop_stall)  # the loop is blocked for loop_stall
            await asyncio.sleep(seconds / 2)
        else:
            await asyncio.sleep(seconds)
        marks["c1"], marks["t1"] = time.process_time(), time.monotonic()
        stats = [p.stats for p in players]
        for p in players:
            await p.close()
        pool.shutdown(wait=True)
        t0, t1 = marks["t0"], marks["t1"]
        window = [[t for t in s.times if t0 <= t <= t1] for s in sinks]
        packets = sum(len(w) for w in window)
        result: dict[str, Any] = {
            "n": n,
            "cpu_pct": (marks["c1"] - marks["c0"]) / (n * (t1 - t0)) * 100,
            "delivered": packets / (n * (t1 - t0) / FRAME_S),
            "late_frames": sum(s.late_frames for s in stats),
            "underruns": sum(s.underruns for s in stats),
            "reanchors": sum(s.reanchors for s in stats),
            "player_p99_ms": max(s.p99_lateness_ms for s in stats),
            **bc.pacing_stats(window, skip=0),
        }
        if together:
            first = [s.times for s in sinks]
            start_stats = bc.pacing_stats([ts[: int(1.0 / FRAME_S)] for ts in first], skip=0)
            result["start_mingap"] = start_stats["mingap"]
            result["start_dev_p99"] = start_stats["dev_p99"]
            result["start_close"] = sum(_after(ts[:50], 0.0)[1] for ts in first)
        if loop_stall:
            pairs = [_after(s.times, stall_t) for s in sinks]
            result["stall_mingap"] = min(p[0] for p in pairs)
            result["stall_close"] = sum(p[1] for p in pairs)
        if read_stall:
            # The stalling read happens at frame 50 of each player: look from frame 40 on.
            pairs = [_after(s.times[40:], 0.0) for s in sinks]
            result["stall_mingap"] = min(p[0] for p in pairs)
            result["stall_close"] = sum(p[1] for p in pairs)
        return result

    return asyncio.run(main())


def run_case(spec: dict[str, Any], hog: int = 0) -> dict[str, Any]:
    """Run one case in a fresh subprocess (with ``hog`` busy-loop processes around it)."""
    hogs = bc.start_hogs(hog) if hog else []
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--_case", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=spec["seconds"] + spec["warmup"] + 120,
            check=False,
        )
    finally:
        bc.stop_hogs(hogs)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"case {spec} failed: {out.stderr[-1500:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["hog"] = hog
    return result


# -- first frame and memory (in this process; no pacing measured) -------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        del format, args

    def copyfile(self, source: Any, outputfile: Any) -> None:
        # The player is closed right after its first frame: the client hangs up mid-file.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            super().copyfile(source, outputfile)


def _serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    handler = lambda *a, **k: _QuietHandler(*a, directory=str(directory), **k)  # noqa: E731
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def first_frame_ms(repeat: int = 3) -> dict[str, float]:
    """Median ms to the first frame, per media kind, over ``repeat`` runs.

    Two clocks: from the play request (the query handed to the resolver, as ``/play`` does) and
    from ``start()`` with the track already resolved (the stream URL is still resolved again at
    play time, as the player always does). Keys ``kind`` and ``kind.start``.
    """
    from legato.audio.encode import OpusSettings
    from legato.audio.player import GuildPlayer, make_opener
    from legato.audio.resolve import Resolver, ResolverSettings

    paths = bc.make_media(MEDIA_DIR)
    server, base = _serve(MEDIA_DIR)

    class FirstFrame:
        def __init__(self) -> None:
            self.at: float | None = None
            self.seen = asyncio.Event()

        async def set_speaking(self, speaking: bool) -> None:
            del speaking

        def send_frame(self, opus: bytes) -> None:
            if self.at is None:
                self.at = time.monotonic()
                self.seen.set()

    async def once(url: str, resolver: Resolver, pool: ThreadPoolExecutor) -> tuple[float, float]:
        requested = time.monotonic()
        track = (await resolver.resolve(url))[0]
        sink = FirstFrame()
        player = GuildPlayer(
            sink, make_opener(resolver, opus=OpusSettings(), executor=pool), executor=pool
        )
        player.queue.add([track])
        started = time.monotonic()
        player.start()
        async with asyncio.timeout(30):
            await sink.seen.wait()
        await player.close()
        assert sink.at is not None
        return (sink.at - requested) * 1e3, (sink.at - started) * 1e3

    async def main() -> dict[str, float]:
        out: dict[str, float] = {}
        with ThreadPoolExecutor(4) as pool:
            resolver = Resolver(ResolverSettings(timeout=20.0), pool)
            for kind in ("webm", "mp3"):
                url = f"{base}/{paths[kind].name}"
                runs = [await once(url, resolver, pool) for _ in range(repeat)]
                out[kind] = statistics.median(r[0] for r in runs)
                out[f"{kind}.start"] = statistics.median(r[1] for r in runs)
        return out

    try:
        return asyncio.run(main())
    finally:
        server.shutdown()
        server.server_close()


def memory_per_player(count: int = 100) -> dict[str, float]:
    """tracemalloc bytes per player: made and idle, then playing with a full buffer."""
    from legato.audio.player import GuildPlayer, PlayerState
    from legato.audio.source import FrameSource
    from legato.audio.track import Track

    frames = _tone_frames()

    class NullSink:
        async def set_speaking(self, speaking: bool) -> None:
            del speaking

        def send_frame(self, opus: bytes) -> None:
            del opus

    async def opener(track: Track, start: float) -> FrameSource:
        return _LoopSource(frames)

    async def main() -> dict[str, float]:
        pool = ThreadPoolExecutor(2)
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        players = []
        for i in range(count):
            p = GuildPlayer(NullSink(), opener, executor=pool)
            p.queue.add([Track(url=f"mem:{i}", title=f"mem {i}")])
            players.append(p)
        gc.collect()
        idle = tracemalloc.get_traced_memory()[0]
        for p in players:
            p.start()
        async with asyncio.timeout(30):
            for p in players:
                await p.wait_for(PlayerState.PLAYING)
            await asyncio.sleep(0.5)  # buffers refilled to their steady state
        gc.collect()
        playing = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        for p in players:
            await p.close()
        pool.shutdown()
        return {
            "idle": (idle - base) / count,
            "playing": (playing - base) / count,
        }

    return asyncio.run(main())


def rss_per_real_player(count: int = 16) -> dict[str, float]:
    """Resident memory per player with real sources: PyAV demuxers, decoders, libopus encoders.

    tracemalloc sees only Python's heap; this counts the native side too. ``count`` players
    each open the 60 s files over local HTTP (half MP3 transcode, half Opus passthrough) and
    play for a second; RSS (psutil, this process) is read before, with the players made and
    idle, and while they play. Frames go to a sink that drops them.
    """
    import psutil

    from legato.audio.encode import OpusSettings
    from legato.audio.player import GuildPlayer, PlayerState, make_opener
    from legato.audio.resolve import Resolver, ResolverSettings

    paths = bc.make_media(MEDIA_DIR)
    server, base = _serve(MEDIA_DIR)
    proc = psutil.Process()

    class NullSink:
        async def set_speaking(self, speaking: bool) -> None:
            del speaking

        def send_frame(self, opus: bytes) -> None:
            del opus

    async def main() -> dict[str, float]:
        with ThreadPoolExecutor(4) as pool:
            resolver = Resolver(ResolverSettings(timeout=20.0), pool)
            tracks = {
                kind: (await resolver.resolve(f"{base}/{paths[kind].name}"))[0]
                for kind in ("mp3", "webm")
            }
            opener = make_opener(resolver, opus=OpusSettings(), executor=pool)
            # One player of each kind first, so that one-off costs (codec tables, threads, the
            # first use of each demuxer) are not counted.
            warm = []
            for kind in ("mp3", "webm"):
                w = GuildPlayer(NullSink(), opener, executor=pool)
                w.queue.add([tracks[kind]])
                w.start()
                await w.wait_for(PlayerState.PLAYING)
                warm.append(w)
            gc.collect()
            before = proc.memory_info().rss
            players = []
            for i in range(count):
                p = GuildPlayer(NullSink(), opener, executor=pool)
                p.queue.add([tracks["mp3" if i % 2 else "webm"]])
                players.append(p)
            gc.collect()
            idle = proc.memory_info().rss
            for p in players:
                p.start()
            async with asyncio.timeout(60):
                for p in players:
                    await p.wait_for(PlayerState.PLAYING)
                await asyncio.sleep(1.0)  # buffers refilled, decoders warm
            playing = proc.memory_info().rss
            for p in [*warm, *players]:
                await p.close()
        return {"idle": (idle - before) / count, "playing": (playing - before) / count}

    try:
        return asyncio.run(main())
    finally:
        server.shutdown()
        server.server_close()


# -- the report ----------------------------------------------------------------------------------


def run(quick: bool = True) -> str:
    """Run every section and return Markdown; fills ``FIGURES``."""
    seconds, warmup = (2.0, 0.5) if quick else (5.0, 1.0)
    ns = (1, 8, 32, 128) if quick else (1, 8, 32, 128, 512)
    parts = [f"\n\n_{bc.machine_line()}_"]

    rows: list[list[object]] = []
    for hog in (0, 1):
        for n in ns:
            r = run_case({"n": n, "seconds": seconds, "warmup": warmup}, hog)
            key = f"ours.pacing.n{n}.hog{hog}"
            for name in ("cpu_pct", "gap_p99", "dev_p99", "mingap", "delivered"):
                FIGURES[f"{key}.{name.replace('_pct', '')}"] = r[name]
            rows.append(
                [
                    n,
                    "yes" if hog else "no",
                    r["cpu_pct"],
                    100 / r["cpu_pct"],
                    r["delivered"],
                    r["dev_p50"],
                    r["dev_p99"],
                    r["dev_max"],
                    r["gap_p99"],
                    r["mingap"],
                    r["late_frames"],
                    r["underruns"],
                    r["reanchors"],
                ]
            )
    # The floor, in the same run: the shared bench's ideal asyncio pacer (one call_at per
    # stream, pre-made packets, nothing else), so a loaded machine shows in both.
    floor_rows: list[list[object]] = []
    try:
        import bench_pacer as bpacer  # type: ignore[import-not-found]  # shared/bench, on sys.path
    except ImportError as exc:
        floor_rows.append([f"n/a ({exc})", *[""] * 12])
    else:
        for hog in (0, 1):
            f = bpacer.run_case("timer", 32, seconds, warmup, hog)
            FIGURES[f"floor.timer.n32.hog{hog}.gap_p99"] = f["gap_p99"]
            FIGURES[f"floor.timer.n32.hog{hog}.dev_p99"] = f["dev_p99"]
            floor_rows.append(
                [
                    "32 (floor: ideal timer pacer)",
                    "yes" if hog else "no",
                    f["cpu_pct"],
                    100 / f["cpu_pct"],
                    f["delivered"],
                    f["dev_p50"],
                    f["dev_p99"],
                    f["dev_max"],
                    f["gap_p99"],
                    f["mingap"],
                    "",
                    "",
                    "",
                ]
            )
    rows.extend(floor_rows)
    parts.append(
        bc.table(
            f"Player pacing: N GuildPlayers, passthrough frames to UDP on 127.0.0.1 "
            f"({seconds:g} s window after {warmup:g} s)",
            [
                "N",
                "hog",
                "cpu %/stream",
                "streams/core",
                "delivered",
                "dev p50 ms",
                "dev p99 ms",
                "dev max ms",
                "gap p99 ms",
                "mingap ms",
                "late > 2 ms",
                "underruns",
                "re-anchors",
            ],
            rows,
        )
    )

    burst_rows: list[list[object]] = []
    for hog in (0, 1):
        r = run_case({"n": 32, "seconds": seconds, "warmup": 0.0, "together": True}, hog)
        FIGURES[f"ours.start_burst.hog{hog}.mingap"] = r["start_mingap"]
        burst_rows.append(
            [
                32,
                "yes" if hog else "no",
                r["start_mingap"],
                r["start_dev_p99"],
                r["start_close"],
                r["gap_p99"],
                r["dev_p99"],
            ]
        )
    parts.append(
        bc.table(
            "Start-together burst: 32 players start() in the same instant (first second)",
            [
                "N",
                "hog",
                "mingap first 1 s ms",
                "dev p99 first 1 s ms",
                "packets < 5 ms apart",
                "gap p99 ms (whole)",
                "dev p99 ms (whole)",
            ],
            burst_rows,
        )
    )

    stall_rows: list[list[object]] = []
    mingaps = []
    for label, spec in (
        ("event loop blocked 200 ms", {"loop_stall": 0.2}),
        ("source read blocks 500 ms (buffer 300 ms)", {"read_stall": 0.5}),
    ):
        for n in (1, 8):
            r = run_case({"n": n, "seconds": max(seconds, 2.0), "warmup": 0.5, **spec})
            mingaps.append(r["stall_mingap"])
            stall_rows.append(
                [label, n, r["stall_mingap"], r["stall_close"], r["reanchors"], r["underruns"]]
            )
    FIGURES["ours.stall.mingap"] = min(mingaps)
    parts.append(
        bc.table(
            "After a stall",
            [
                "stall",
                "N",
                "min gap after stall ms",
                "packets sent < 5 ms apart",
                "re-anchors",
                "underruns",
            ],
            stall_rows,
        )
    )

    try:
        ff = first_frame_ms(3 if quick else 5)
    except ImportError as exc:  # resolve/decode not in this tree yet
        parts.append(f"\n\nFirst frame: n/a ({exc})")
    else:
        FIGURES["ours.first_frame_ms"] = ff["webm"]
        FIGURES["ours.first_frame_mp3_ms"] = ff["mp3"]
        parts.append(
            bc.table(
                "Time to the first frame (local HTTP, yt-dlp + PyAV, median)",
                ["source", "from the play request ms", "from start() ms"],
                [
                    ["Opus in WebM (passthrough)", ff["webm"], ff["webm.start"]],
                    ["MP3 (transcode)", ff["mp3"], ff["mp3.start"]],
                ],
            )
        )

    mem = memory_per_player()
    FIGURES["ours.player.mem_idle_kib"] = mem["idle"] / 1024
    FIGURES["ours.player.mem_playing_kib"] = mem["playing"] / 1024
    parts.append(
        bc.table(
            "Memory per player (tracemalloc, 100 players)",
            ["state", "KiB per player"],
            [
                ["idle (made, one queued track)", mem["idle"] / 1024],
                ["playing (300 ms buffered)", mem["playing"] / 1024],
            ],
        )
    )
    rss = rss_in_fresh_process()
    FIGURES["ours.player.rss_playing_kib"] = rss["playing"] / 1024
    parts.append(
        bc.table(
            "Resident memory per player, real sources (RSS, 16 players: MP3 transcode and Opus "
            "passthrough over local HTTP; PyAV and libopus included)",
            ["state", "KiB per player"],
            [
                ["idle (made, one queued track)", rss["idle"] / 1024],
                ["playing", rss["playing"] / 1024],
            ],
        )
    )
    return "".join(parts)


def rss_in_fresh_process() -> dict[str, float]:
    """:func:`rss_per_real_player` in a fresh subprocess.

    In a process that has already played (this one, after the sections before it, or an
    earlier ``--runs``), the allocator hands the players memory it holds from before, and the
    figure depends on what ran first: 440 and then 150 KiB per player in two runs of one
    process, against 540-560 in fresh ones. A fresh process each time makes runs comparable.
    """
    out = subprocess.run(
        [sys.executable, __file__, "--_rss"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"the RSS probe failed: {out.stderr[-1500:]}")
    result: dict[str, float] = json.loads(lines[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    ap.add_argument("--_rss", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._rss:
        print(json.dumps(rss_per_real_player()), flush=True)
        os._exit(0)
    if args._case:
        print(json.dumps(_case(json.loads(args._case))), flush=True)
        os._exit(0)
    print(run(quick=not args.full))
    for key, value in sorted(FIGURES.items()):
        print(f"{key} = {value:.4g}")


if __name__ == "__main__":
    main()
