"""`make bench`: Legato's figures beside discord.py 2.7.1's stock player, measured in one run.

Absolute times drift on shared machines, so every goal is a ratio between rows of this run. The
peer's figures come from the shared harness (`../shared/bench`, or `$LEGATO_PEER_BENCH`), whose
README defines every column; Legato's come from `bench_audio`, `bench_player`, `bench_voice` and
`bench_dave`.

    python bench/run.py            # quick windows (a few minutes)
    python bench/run.py --full     # longer windows, more cases
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEER_DIR = Path(os.environ.get("LEGATO_PEER_BENCH", HERE.parent.parent / "shared" / "bench"))
MEDIA_DIR = Path.home() / ".cache" / "legato-bench"
sys.path.insert(0, str(HERE))

# Filled as sections run; the summary at the end reads it.
FIGURES: dict[str, float] = {}


def _peer() -> Any:
    if not (PEER_DIR / "bench_peer.py").exists():
        raise RuntimeError(f"the peer harness is not at {PEER_DIR} (set LEGATO_PEER_BENCH)")
    sys.path.insert(0, str(PEER_DIR))
    return importlib.import_module("bench_peer")


def peer_section(quick: bool) -> str:
    """discord.py's stock AudioPlayer with FFmpeg sources: CPU and pacing, one subprocess a case."""
    bp = _peer()
    bc = importlib.import_module("bench_common")
    seconds, warmup = (3.0, 1.0) if quick else (8.0, 2.0)
    media = str(MEDIA_DIR)
    bc.make_media(media)
    rows: list[list[object]] = []
    cases = [("pcm", 1, 0), ("opusenc", 1, 0), ("copy", 1, 0), ("pcm", 32, 0), ("pcm", 32, 1)]
    for kind, n, hog in cases:
        r = bp.run_case(kind, n, seconds, warmup, media, hog)
        FIGURES[f"peer.{kind}.n{n}.hog{hog}.cpu"] = r["cpu_pct"]
        FIGURES[f"peer.{kind}.n{n}.hog{hog}.gap_p99"] = r["gap_p99"]
        FIGURES[f"peer.{kind}.n{n}.hog{hog}.dev_p99"] = r["dev_p99"]
        FIGURES[f"peer.{kind}.n{n}.hog{hog}.mingap"] = r["mingap"]
        rows.append(
            [
                kind,
                n,
                "yes" if hog else "no",
                r["cpu_pct"],
                r["ffmpeg_pct"],
                r["delivered"],
                r["dev_p99"],
                r["gap_p99"],
                r["mingap"],
            ]
        )
    out: str = bc.table(
        f"Peer: discord.py 2.7.1 AudioPlayer + FFmpeg ({seconds:g} s window)",
        [
            "kind",
            "N",
            "hog",
            "cpu %/stream",
            "ffmpeg %",
            "delivered",
            "dev p99 ms",
            "gap p99 ms",
            "mingap ms",
        ],
        rows,
    )
    r = bp.run_case("pcm", 1, 4.0, 0.5, media, 0, stall=True)
    FIGURES["peer.stall.mingap"] = r["stall_mingap"]
    FIGURES["peer.stall.burst"] = r["stall_burst"]
    out += bc.table(
        "Peer: after a 200 ms stall in source.read()",
        ["min gap after stall ms", "packets sent < 5 ms apart"],
        [[r["stall_mingap"], r["stall_burst"]]],
    )
    return out


def _ours(module: str) -> Callable[[bool], str]:
    def run(quick: bool) -> str:
        mod = importlib.import_module(module)
        text: str = mod.run(quick)
        FIGURES.update(getattr(mod, "FIGURES", {}))
        return text

    return run


def _ratio(num: str, den: str) -> str:
    if num in FIGURES and den in FIGURES and FIGURES[den]:
        return f"{FIGURES[num] / FIGURES[den]:.3f}"
    return "n/a"


def summary() -> str:
    """The issue's goals as ratios of this run's rows."""
    lines = [
        "",
        "### Goals, as ratios within this run",
        "",
        "| goal | figure | target |",
        "|---|---|---|",
    ]
    goals = [
        (
            "MP3 transcode CPU, peer's encoder settings / peer pcm",
            "ours.mp3.peer_settings.cpu",
            "peer.pcm.n1.hog0.cpu",
            "<= 0.8",
        ),
        (
            "AAC transcode CPU, peer's encoder settings / peer pcm",
            "ours.aac.peer_settings.cpu",
            "peer.pcm.n1.hog0.cpu",
            "<= 0.8",
        ),
        (
            "MP3 transcode CPU, Legato defaults / peer pcm",
            "ours.mp3.defaults.cpu",
            "peer.pcm.n1.hog0.cpu",
            "<= 0.5",
        ),
        (
            "AAC transcode CPU, Legato defaults / peer pcm",
            "ours.aac.defaults.cpu",
            "peer.pcm.n1.hog0.cpu",
            "<= 0.5",
        ),
        (
            "Opus passthrough CPU / peer pcm transcode",
            "ours.passthrough.cpu",
            "peer.pcm.n1.hog0.cpu",
            "<= 0.05",
        ),
        (
            "Opus passthrough CPU / peer Opus copy",
            "ours.passthrough.cpu",
            "peer.copy.n1.hog0.cpu",
            "<= 0.3",
        ),
    ]
    goals += [
        (
            "Opus passthrough CPU, guarded HTTP reader / from the file",
            "ours.guarded.passthrough.cpu",
            "ours.guarded.passthrough.file_cpu",
            "<= 1.10",
        ),
        (
            "MP3 transcode CPU, guarded HTTP reader / from the file",
            "ours.guarded.mp3.defaults.cpu",
            "ours.guarded.mp3.defaults.file_cpu",
            "<= 1.10",
        ),
    ]
    for label, num, den, target in goals:
        lines.append(f"| {label} | {_ratio(num, den)} | {target} |")
    # Send path CPU beside discord.py's send_audio_packet (no target: reported as measured).
    for label, num, den in [
        (
            "udp send path CPU (xchacha) / discord.py send_audio_packet",
            "voice.send_path.ours.xchacha20.us",
            "voice.send_path.dpy.us",
        ),
        (
            "webrtc send path CPU (aiortc, SRTP) / discord.py send_audio_packet",
            "voice.send_path.webrtc.us",
            "voice.send_path.dpy.us",
        ),
        (
            "udp send path CPU with DAVE / discord.py's with DAVE",
            "dave.send_path.ours.xchacha.on.us",
            "dave.send_path.dpy.on.us",
        ),
        (
            "DAVE's added CPU per frame, Legato / discord.py",
            "dave.send_path.ours.xchacha.overhead_us",
            "dave.send_path.dpy.overhead_us",
        ),
    ]:
        lines.append(f"| {label} | {_ratio(num, den)} | reported |")
    for key in (
        "voice.send_path.webrtc.us",
        "dave.send_path.ours.xchacha.overhead_us",
        "dave.send_path.dpy.overhead_us",
    ):
        value = f"{FIGURES[key]:.3g} us/frame" if key in FIGURES else "n/a"
        lines.append(f"| {key} | {value} | reported |")
    for key, target in [
        ("ours.pacing.n32.hog1.gap_p99", "<= 2 ms"),
        ("ours.pacing.n32.hog1.dev_p99", "<= 2 ms"),
        ("ours.pacing.n32.hog1.mingap", ">= 10 ms"),
        ("ours.stall.mingap", ">= 10 ms"),
        ("ours.first_frame_ms", "< 300 ms"),
        ("ours.udp.max_streams_gap_p99_5ms", ">= 660"),
    ]:
        value = f"{FIGURES[key]:.3g}" if key in FIGURES else "n/a"
        peer_key = key.replace("ours.pacing", "peer.pcm").replace("ours.stall", "peer.stall")
        peer = f" (peer {FIGURES[peer_key]:.3g})" if peer_key != key and peer_key in FIGURES else ""
        lines.append(f"| {key} | {value}{peer} | {target} |")
    # Load (bench_load): 100 guilds playing in one bot process; 500 queue commands a second.
    for key, target in [
        ("load.mixed.stalled", "0"),
        ("load.mixed.underruns", "0"),
        ("load.mixed.reanchors", "reported"),
        ("load.mixed.reanchors_before", "reported (100 /play at once, before the window)"),
        ("load.mixed.stalled_gap", "0 (streams with a gap > 100 ms heard, in stalled too)"),
        ("load.mixed.frames_lost", "0"),
        ("load.mixed.dev_p99", "reported (ms, the listener's view)"),
        ("load.mixed.player_late_p99_max", "reported (ms)"),
        ("load.mixed.cpu_pct_per_stream", "reported (%, with the workers)"),
        ("load.mixed.loop_wait_pct", "reported (% of the window the bot's loop waited for a CPU)"),
        ("load.mixed.sandbox_cpu_pct", "reported (%, the bench's own process)"),
        ("load.mixed.rss_growth_mb", "~0 (MB, the bot process, last third - first third)"),
        ("load.mixed_threads_first.stalled", "reported (8 decodes and the Opus in threads)"),
        ("load.mixed_threads_first.rss_growth_mb", "reported (MB; FFmpeg's seek index)"),
        ("load.mixed_threads.stalled", "reported (everything in threads)"),
        ("load.mixed_threads.reanchors", "reported"),
        ("load.mixed_threads.rss_growth_mb", "reported (MB; FFmpeg's seek index, see above)"),
        ("load.queue.answered_rate", "reported (/s, target 500)"),
        ("load.queue.inconsistencies", "0"),
    ]:
        value = f"{FIGURES[key]:.3g}" if key in FIGURES else "n/a"
        lines.append(f"| {key} | {value} | {target} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--only", default="peer,audio,player,voice,dave,load")
    args = ap.parse_args()
    quick = not args.full
    parts = args.only.split(",")
    sections: dict[str, Callable[[bool], str]] = {
        "peer": peer_section,
        "audio": _ours("bench_audio"),
        "player": _ours("bench_player"),
        "voice": _ours("bench_voice"),
        "load": _ours("bench_load"),
        "dave": _ours("bench_dave"),
    }
    started = time.perf_counter()
    report = [f"# Legato benchmarks ({'quick' if quick else 'full'})"]
    for name in parts:
        t0 = time.perf_counter()
        try:
            text = sections[name](quick)
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
            text = f"\n### {name}: FAILED: {exc!r}"
        report.append(text)
        print(text, flush=True)
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    tail = summary() + f"\n\ntotal {time.perf_counter() - started:.0f} s"
    print(tail)
    out = HERE.parent / "out"
    out.mkdir(exist_ok=True)
    (out / "bench.md").write_text("\n".join([*report, tail]) + "\n")


if __name__ == "__main__":
    main()
