"""`make bench`: Legato's figures beside discord.py 2.7.1's stock player, measured in one run.

Absolute times drift on shared machines, so every goal is a ratio between rows of this run. The
peer's figures come from the shared harness (`../shared/bench`, or `$LEGATO_PEER_BENCH`), whose
README defines every column; Legato's come from `bench_audio`, `bench_player`, `bench_voice` and
`bench_dave`.

    python bench/run.py            # quick windows (a few minutes)
    python bench/run.py --full     # longer windows, more cases
    python bench/run.py --only load --runs 3   # the load goals, 3 runs, "k of 3" verdicts
    python bench/run.py --only load --runs 3 --load-cases mixed,hog50,hog100 --no-queue

Issue #14's goals must hold in 3 of 3 runs: ``--runs N`` runs the chosen sections N times
and ends with each goal's figure per run and how many runs met it (`ISSUE_GOALS`).
"""

from __future__ import annotations

import argparse
import importlib
import operator
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


def _ours(module: str, **kwargs: Any) -> Callable[[bool], str]:
    def run(quick: bool) -> str:
        mod = importlib.import_module(module)
        getattr(mod, "FIGURES", {}).clear()  # a figure left from an earlier run is no figure
        text: str = mod.run(quick, **kwargs)
        FIGURES.update(getattr(mod, "FIGURES", {}))
        return text

    return run


#: Issue #14's goals, each to hold in 3 of 3 runs: (figure, what it is, comparison, target).
ISSUE_GOALS: list[tuple[str, str, str, float]] = [
    ("load.mixed.stalled_reanchor", "100 guilds mixed: players re-anchored in the window", "<=", 0),
    (
        "load.mixed.reanchors_before_max",
        "100 guilds mixed: most re-anchors of one player during the 100 /play start-up",
        "<=",
        1,
    ),
    (
        "load.mixed.cpu_pct_per_stream",
        "100 guilds mixed: bot cpu % of a core per stream, workers included",
        "<=",
        0.9,
    ),
    (
        "load.hog50.stalled_reanchor",
        "50 guilds mixed beside a CPU-bound process: players re-anchored",
        "<=",
        0,
    ),
    (
        "load.hog100.passthrough_reanchored",
        "100 guilds mixed beside a CPU-bound process: passthrough players re-anchored",
        "<=",
        0,
    ),
    (
        "load.hog100.bursts",
        "100 guilds mixed beside a CPU-bound process: packets heard < 5 ms apart",
        "<=",
        0,
    ),
    (
        "ours.udp.max_streams_gap_p99_5ms",
        "GuildPlayers passing Opus through on one loop at gap p99 < 5 ms",
        ">=",
        1000,
    ),
    ("ours.player.rss_playing_kib", "resident memory per playing player, KiB", "<=", 350),
]
#: Reported beside the goals (no target): how overload degrades.
ISSUE_REPORTED = [
    # The machine's own pauses (bench/pause_probe.py), and the re-anchors they explain.
    *(
        row
        for case in ("mixed", "hog50", "hog100")
        for row in (
            (
                f"load.{case}.reanchored_in_pause",
                f"{case}: of the players re-anchored, those in a report period with a machine"
                " pause >= 50 ms (nan: not measured)",
            ),
            (
                f"load.{case}.machine_pause_max_ms",
                f"{case}: the machine's longest pause in the window, ms",
            ),
        )
    ),
    ("load.mixed.reanchors_before", "100 guilds mixed: re-anchors during start-up, all players"),
    ("load.mixed.loop_wait_pct", "100 guilds mixed: % of the window the loop waited for a CPU"),
    (
        "load.mixed.codec_floor_pct_per_stream",
        "100 guilds mixed: the codec's own CPU for this mix, this run (% of a core per stream)",
    ),
    (
        "load.mixed.cpu_over_codec_floor",
        "100 guilds mixed: bot cpu per stream / the codec's own for this mix",
    ),
    ("load.hog100.transcode_underruns", "100 guilds beside it: transcode underruns"),
    ("load.hog100.transcode_reanchored", "100 guilds beside it: transcode players re-anchored"),
    ("load.hog100.min_gap_ms", "100 guilds beside it: smallest gap heard, ms"),
    # The instrument: must be 0, else the listener lost what the bot sent (bench_load).
    *(
        (f"load.{case}.listener_socket_drops", f"{case}: datagrams the listener's socket dropped")
        for case in ("mixed", "hog50", "hog100")
    ),
]
_OPS = {"<=": operator.le, ">=": operator.ge}


def derive(figures: dict[str, float]) -> None:
    """Add the figures made of other sections' rows of the same run.

    The codec's own CPU for the 100-guild mix: what ``bench_audio`` measured for one stream,
    read back to back in one thread (an MP3 transcode at Legato's defaults, an Opus
    passthrough), weighted by the mix (`bench_load.LOAD_CASES`). The same work costs more or
    less from one machine (and one hour) to the next; the bot's CPU over it is the part that
    is Legato's own: sends, hand-offs, threads, scheduling.
    """
    mp3, passthrough = figures.get("ours.mp3.defaults.cpu"), figures.get("ours.passthrough.cpu")
    if mp3 is None or passthrough is None:
        return
    share = importlib.import_module("bench_load").LOAD_CASES["mixed"][1]
    floor = (1 - share) * mp3 + share * passthrough
    figures["load.mixed.codec_floor_pct_per_stream"] = floor
    bot = figures.get("load.mixed.cpu_pct_per_stream")
    if bot is not None and floor > 0:
        figures["load.mixed.cpu_over_codec_floor"] = bot / floor


def goals_over_runs(runs: list[dict[str, float]]) -> str:
    """Each of `ISSUE_GOALS` whose figure some run has: its figure in every run, and in how
    many runs it was met ("3 of 3" is the bar); then `ISSUE_REPORTED`."""
    n = len(runs)
    head = "| goal | target | " + " | ".join(f"run {i + 1}" for i in range(n)) + " | met |"
    lines = ["", f"### Issue #14 goals over {n} run{'s' if n > 1 else ''}", "", head]
    lines.append("|---|---|" + "---|" * (n + 1))
    for key, label, op, target in ISSUE_GOALS:
        if not any(key in r for r in runs):
            continue
        values = [r.get(key) for r in runs]
        met = sum(v is not None and _OPS[op](v, target) for v in values)
        cells = " | ".join("n/a" if v is None else f"{v:.3g}" for v in values)
        verdict = f"{met} of {n}" + (" (ok)" if met == n else " (NOT MET)")
        lines.append(f"| {label} (`{key}`) | {op} {target:g} | {cells} | {verdict} |")
    for key, label in ISSUE_REPORTED:
        if not any(key in r for r in runs):
            continue
        cells = " | ".join(f"{r[key]:.3g}" if key in r else "n/a" for r in runs)
        lines.append(f"| {label} (`{key}`) | reported | {cells} | |")
    return "\n".join(lines)


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
        ("ours.udp.max_streams_gap_p99_5ms", ">= 1000 (GuildPlayers on one loop)"),
        ("ours.player.rss_playing_kib", "<= 350 (KiB per playing player, real sources)"),
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
        ("load.mixed.stalled_reanchor", "0 (players re-anchored in the window)"),
        ("load.mixed.reanchored_in_pause", "reported (of those, in a machine pause >= 50 ms)"),
        ("load.mixed.machine_pause_max_ms", "reported (ms, the machine's longest pause)"),
        ("load.mixed.reanchors_before", "reported (100 /play at once, before the window)"),
        ("load.mixed.reanchors_before_max", "<= 1 (one player's re-anchors in that start-up)"),
        ("load.mixed.stalled_gap", "0 (streams with a gap > 100 ms heard, in stalled too)"),
        ("load.mixed.frames_lost", "0"),
        ("load.mixed.dev_p99", "reported (ms, the listener's view)"),
        ("load.mixed.player_late_p99_max", "reported (ms)"),
        ("load.mixed.cpu_pct_per_stream", "<= 0.9 (%, with the workers)"),
        ("load.mixed.loop_wait_pct", "reported (% of the window the bot's loop waited for a CPU)"),
        ("load.mixed.sandbox_cpu_pct", "reported (%, the bench's own process)"),
        ("load.mixed.rss_growth_mb", "~0 (MB, the bot process, last third - first third)"),
        ("load.mixed_threads_first.stalled", "reported (8 decodes and the Opus in threads)"),
        ("load.mixed_threads_first.rss_growth_mb", "reported (MB; FFmpeg's seek index)"),
        ("load.mixed_threads.stalled", "reported (everything in threads)"),
        ("load.mixed_threads.reanchors", "reported"),
        ("load.mixed_threads.rss_growth_mb", "reported (MB; FFmpeg's seek index, see above)"),
        ("load.hog50.stalled_reanchor", "0 (50 guilds beside a CPU-bound process)"),
        ("load.hog50.underruns", "reported"),
        ("load.hog100.passthrough_reanchored", "0 (100 guilds beside it: overload)"),
        ("load.hog100.bursts", "0 (packets heard < 5 ms apart)"),
        ("load.hog100.min_gap_ms", "reported (ms, the smallest gap heard)"),
        ("load.hog100.transcode_underruns", "reported (they fall behind as silence)"),
        ("load.hog100.transcode_reanchored", "reported"),
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
    ap.add_argument(
        "--runs", type=int, default=1, help="run the sections this many times (goals: 3 of 3)"
    )
    ap.add_argument(
        "--load-cases",
        default=None,
        help="load cases to run, comma-separated (bench_load.LOAD_CASES; default: the quick set)",
    )
    ap.add_argument("--no-queue", action="store_true", help="skip the load section's queue storm")
    args = ap.parse_args()
    quick = not args.full
    parts = args.only.split(",")
    load_kwargs: dict[str, Any] = {"queue": not args.no_queue}
    if args.load_cases:
        load_kwargs["cases"] = args.load_cases.split(",")
    sections: dict[str, Callable[[bool], str]] = {
        "peer": peer_section,
        "audio": _ours("bench_audio"),
        "player": _ours("bench_player"),
        "voice": _ours("bench_voice"),
        "load": _ours("bench_load", **load_kwargs),
        "dave": _ours("bench_dave"),
    }
    started = time.perf_counter()
    report = [f"# Legato benchmarks ({'quick' if quick else 'full'})"]
    runs: list[dict[str, float]] = []
    for run in range(args.runs):
        FIGURES.clear()
        if args.runs > 1:
            heading = f"\n## Run {run + 1} of {args.runs} ({_uptime()})"
            report.append(heading)
            print(heading, flush=True)
        for name in parts:
            t0 = time.perf_counter()
            try:
                text = sections[name](quick)
            except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
                text = f"\n### {name}: FAILED: {exc!r}"
            report.append(text)
            print(text, flush=True)
            print(f"\n({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
        derive(FIGURES)
        runs.append(dict(FIGURES))
    tail = summary() if args.runs == 1 else ""
    tail += goals_over_runs(runs)
    tail += f"\n\ntotal {time.perf_counter() - started:.0f} s"
    print(tail)
    out = HERE.parent / "out"
    out.mkdir(exist_ok=True)
    (out / "bench.md").write_text("\n".join([*report, tail]) + "\n")


def _uptime() -> str:
    """The load averages now (the machine is shared: each run says how busy it was)."""
    try:
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"


if __name__ == "__main__":
    main()
