"""Load: one bot process, many guilds playing at once in the sandbox.

Everything runs in this one process and one event loop: the sandbox (gateway, REST, voice
server), a real discord.py bot that loads Legato (`tests.e2e.queue_storm.StormBot`), and a local
HTTP server with generated tones. Each guild gets a scripted listener who joins voice and runs
`/play` with a link; half the guilds (by default) get Opus in WebM (passed through), the other
half MP3 (decoded, resampled and encoded to Opus). Once every guild is heard, a window of
`--seconds` is measured:

- stalled: players with an underrun in the window, an arrival gap over `STALL_GAP_S` in the
  sandbox's recording, or fewer than `MIN_DELIVERED` of the frames the window should hold;
- frames lost: RTP sequence numbers the voice server never received in the window;
- pacing: `bench_common.pacing_stats` over the recorded arrival times (dev = lateness against
  each stream's ideal 20 ms grid, gap = |interval - 20 ms|), and the players' own lateness;
- CPU per stream: process CPU time (psutil) over stream-seconds; it includes the sandbox's
  voice server receiving and decrypting every packet, which a real bot does not pay;
- memory: RSS every `--rss-interval` s; growth is the mean of the last third of the samples
  minus the mean of the first third.

A second section measures the queue path: scripted users run `/remove`, `/move`, `/shuffle`,
`/clear`, `/skip` and `/playnext` (a playlist of cached tracks) through the sandbox and the
cog's handlers at a target rate, and reports the rate sustained and each command's round trip,
for all commands and for the queue path alone (all but /play, which waits for yt-dlp). It runs
twice: yt-dlp in the bot's threads (the default) and in `QUEUE_PROCESSES` worker processes.

    python bench/bench_load.py --guilds 10 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
PEER_DIR = Path(os.environ.get("LEGATO_PEER_BENCH", HERE.parent.parent / "shared" / "bench"))
sys.path.insert(0, str(PEER_DIR))
import bench_common as bc  # type: ignore[import-not-found]  # noqa: E402  shared stats, 1:1 figures

from legato.sandbox.media import MediaServer, write_tone  # noqa: E402
from legato.sandbox.recording import ReceivedPacket, Recording  # noqa: E402
from legato.sandbox.server import GuildHandle, Sandbox  # noqa: E402

sys.path.insert(0, str(HERE.parent))
from tests.e2e.queue_storm import (  # noqa: E402  the storm and its ledger, shared with the test
    StormResult,
    TrackFiles,
    queue_storm,
    running_bot,
    storm_config,
)

FIGURES: dict[str, float] = {}

FRAME_S = 0.020
#: An arrival gap this long in the recording counts as a stall (five frames of silence heard).
STALL_GAP_S = 0.100
#: A player delivering less than this share of the window's frames stalled.
MIN_DELIVERED = 0.95
#: Guilds set up at once (join voice, /play): keeps start-up from queueing 100 yt-dlp probes.
SETUP_PARALLEL = 10
GUARD = 120.0
#: The queue storm runs twice: yt-dlp in the bot's threads (the default), and in this many
#: worker processes (``[playback] resolve_processes``).
QUEUE_PROCESSES = 2


@dataclass(frozen=True)
class _Guild:
    handle: GuildHandle
    kind: str  # "passthrough" or "transcode"
    rec: Recording


async def _setup_guild(
    sb: Sandbox, handle: GuildHandle, n: int, url: str, gate: asyncio.Semaphore
) -> str | None:
    """Join and /play in one guild; None when it plays, else the bot's answer (counted)."""
    async with gate:
        user = sb.add_user(f"listener{n:03}", guilds=[handle])
        await user.join_voice(handle.voice)
        reply = await user.invoke("play", channel=handle.text, query=url, timeout=GUARD)
        if reply.deferred and not reply.text():
            await reply.wait_edit(timeout=GUARD)
        return None if reply.text().startswith("Playing") else reply.text()


def _streams(packets: Sequence[ReceivedPacket]) -> dict[int, list[tuple[int, float]]]:
    """Per SSRC: (extended sequence, arrival) of each distinct packet, in sequence order."""
    out: dict[int, dict[int, float]] = {}
    top: dict[int, int] = {}
    for p in packets:
        high = top.get(p.ssrc)
        if high is None:
            ext = p.sequence
        else:
            delta = (p.sequence - high) % 65536
            ext = high + delta if delta < 32768 else high - (65536 - delta)
        top[p.ssrc] = ext if high is None else max(high, ext)
        out.setdefault(p.ssrc, {}).setdefault(ext, p.arrival)
    return {ssrc: sorted(seqs.items()) for ssrc, seqs in out.items()}


def _window(packets: Sequence[ReceivedPacket]) -> dict[str, float]:
    """Frames, losses and the largest gap of one guild's packets in the window."""
    frames = lost = 0
    max_gap = 0.0
    for seqs in _streams(packets).values():
        frames += len(seqs)
        lost += seqs[-1][0] - seqs[0][0] + 1 - len(seqs)
        arrivals = sorted(a for _, a in seqs)
        max_gap = max([max_gap, *(b - a for a, b in itertools.pairwise(arrivals))])
    return {"frames": frames, "lost": lost, "max_gap": max_gap}


async def load(
    guilds: int = 100,
    seconds: float = 60.0,
    *,
    passthrough_share: float = 0.5,
    rss_interval: float = 10.0,
    out: Any = None,
) -> dict[str, float]:
    """Run `guilds` guilds playing at once for a window of `seconds`; return the figures.

    Args:
        guilds: Guilds playing (each with one listener and one player).
        seconds: Length of the measured window, after every guild is heard.
        passthrough_share: Share of the guilds playing Opus in WebM; the rest play MP3.
        rss_interval: Seconds between RSS samples.
        out: Where to print progress (default stderr).

    Returns:
        Figures, keyed as in the table (see the module docstring).
    """
    out = out or sys.stderr
    proc = psutil.Process()
    track_s = seconds + 30.0 + guilds * 0.3  # longer than set-up plus the window
    with tempfile.TemporaryDirectory(prefix="legato-load-") as tmp:
        root = Path(tmp)
        await asyncio.gather(
            asyncio.to_thread(
                write_tone,
                root / "load.webm",
                freq=440.0,
                seconds=track_s,
                container="webm",
                codec="libopus",
            ),
            asyncio.to_thread(
                write_tone,
                root / "load.mp3",
                freq=660.0,
                seconds=track_s,
                container="mp3",
                codec="libmp3lame",
            ),
        )
        with MediaServer(root) as media:
            config_path = root / "legato.toml"
            config_path.write_text(storm_config(media), encoding="utf-8")
            async with Sandbox(timeout=GUARD) as sb:
                handles = list(sb.guilds)
                handles += [sb.add_guild(f"Load {i:03}") for i in range(len(handles), guilds)]
                kinds = [
                    "passthrough" if i < round(guilds * passthrough_share) else "transcode"
                    for i in range(guilds)
                ]
                async with running_bot(sb, config_path, GUARD) as bot:
                    t_setup = time.monotonic()
                    gate = asyncio.Semaphore(SETUP_PARALLEL)
                    async with asyncio.timeout(GUARD + guilds):
                        answers = await asyncio.gather(
                            *(
                                _setup_guild(
                                    sb,
                                    h,
                                    i,
                                    media.url("load.webm" if k == "passthrough" else "load.mp3"),
                                    gate,
                                )
                                for i, (h, k) in enumerate(zip(handles, kinds, strict=True))
                            )
                        )
                        failed = [a for a in answers if a is not None]
                        for answer in sorted(set(failed)):
                            print(f"  /play failed: {answer!r}", file=out, flush=True)
                        voice = sb.voice_server
                        await voice.wait_identified(
                            sb.bot.id, count=guilds - len(failed), timeout=GUARD
                        )
                        playing = [
                            _Guild(h, k, voice.recording(sb.bot.id, h.id))
                            for h, k, a in zip(handles, kinds, answers, strict=True)
                            if a is None
                        ]
                        for g in playing:
                            await g.rec.wait_frames(25, timeout=GUARD)
                    setup_s = time.monotonic() - t_setup
                    print(
                        f"  {guilds} guilds playing after {setup_s:.1f} s; measuring {seconds:g} s",
                        file=out,
                        flush=True,
                    )
                    figures = await _measure(bot, playing, seconds, rss_interval, proc)
                    figures["setup_s"] = setup_s
                    figures["setup_failed"] = float(len(failed))
                    return figures


async def _measure(
    bot: Any,
    playing: list[_Guild],
    seconds: float,
    rss_interval: float,
    proc: psutil.Process,
) -> dict[str, float]:
    cog: Any = bot.get_cog("Music")
    players = [cog.session(g.handle.id).player for g in playing]
    before = [p.stats for p in players]
    start_idx = [len(g.rec.packets) for g in playing]
    gc.collect()
    rss: list[float] = [proc.memory_info().rss / 2**20]
    rss_at: list[float] = [0.0]
    cpu0 = sum(proc.cpu_times()[:2])
    t0 = time.monotonic()
    end = t0 + seconds
    while (now := time.monotonic()) < end:
        await asyncio.sleep(min(rss_interval, end - now))  # the window itself: nothing to wait on
        rss.append(proc.memory_info().rss / 2**20)
        rss_at.append(time.monotonic() - t0)
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    wall = time.monotonic() - t0
    after = [p.stats for p in players]
    expected = wall / FRAME_S

    stalled: dict[str, int] = {"passthrough": 0, "transcode": 0}
    arrivals: list[list[float]] = []
    frames = lost = 0
    max_gap = 0.0
    underruns = 0
    for g, idx, b, a in zip(playing, start_idx, before, after, strict=True):
        packets = g.rec.packets[idx:]
        w = _window(packets) if packets else {"frames": 0, "lost": 0, "max_gap": wall}
        frames += int(w["frames"])
        lost += int(w["lost"])
        max_gap = max(max_gap, w["max_gap"])
        under = a.underruns - b.underruns
        underruns += under
        if under or w["max_gap"] > STALL_GAP_S or w["frames"] < MIN_DELIVERED * expected:
            stalled[g.kind] += 1
        arrivals.extend([t for _, t in seqs] for seqs in _streams(packets).values())
    pacing = bc.pacing_stats(arrivals)
    third = max(1, len(rss) // 3)
    first, last = rss[:third], rss[-third:]
    stream_s = wall * len(playing)
    return {
        "guilds": float(len(playing)),
        "seconds": wall,
        "passthrough": float(sum(g.kind == "passthrough" for g in playing)),
        "stalled": float(sum(stalled.values())),
        "stalled_passthrough": float(stalled["passthrough"]),
        "stalled_transcode": float(stalled["transcode"]),
        "underruns": float(underruns),
        "frames": float(frames),
        "frames_expected": expected * len(playing),
        "frames_lost": float(lost),
        "dev_p99": pacing["dev_p99"],
        "dev_max": pacing["dev_max"],
        "gap_p99": pacing["gap_p99"],
        "gap_max_ms": max_gap * 1e3,
        "player_late_p99_max": max(s.p99_lateness_ms for s in after),
        "player_late_max": max(s.max_lateness_ms for s in after),
        "cpu_pct_per_stream": cpu / stream_s * 100,
        "cpu_pct_total": cpu / wall * 100,
        "rss_first_mb": sum(first) / len(first),
        "rss_last_mb": sum(last) / len(last),
        "rss_growth_mb": sum(last) / len(last) - sum(first) / len(first),
        "rss_samples": float(len(rss)),
    } | {f"rss_{t:.0f}s_mb": v for t, v in zip(rss_at, rss, strict=True)}


def load_table(r: dict[str, float], title: str) -> str:
    """The figures of one `load` run as Markdown tables."""
    text: str = bc.table(
        title,
        ["guilds", "failed to start", "passthrough", "window s", "stalled", "underruns",
         "frames lost",
         "delivered %", "dev p99 ms", "dev max ms", "gap p99 ms", "gap max ms",
         "player late p99 ms", "player late max ms", "cpu %/stream", "cpu % total"],
        [[int(r["guilds"]), int(r["setup_failed"]), int(r["passthrough"]), r["seconds"],
          int(r["stalled"]),
          int(r["underruns"]), int(r["frames_lost"]),
          100 * r["frames"] / r["frames_expected"], r["dev_p99"], r["dev_max"], r["gap_p99"],
          r["gap_max_ms"], r["player_late_p99_max"], r["player_late_max"],
          r["cpu_pct_per_stream"], r["cpu_pct_total"]]],
    )  # fmt: skip
    series = sorted(
        (float(k[4:-4]), v) for k, v in r.items() if k.startswith("rss_") and k.endswith("s_mb")
    )
    text += bc.table(
        "RSS over the window (MB)",
        [f"{t:g} s" for t, _ in series] + ["growth, last third - first third"],
        [[*(v for _, v in series), r["rss_growth_mb"]]],
    )
    return text


def run(quick: bool = True) -> str:
    """The load section of `make bench`: 100 guilds, a mix of passthrough and transcode."""
    text = ""
    mixes = [("mixed", 0.5)] if quick else [("mixed", 0.5), ("passthrough", 1.0), ("mp3", 0.0)]
    for name, share in mixes:
        r = asyncio.run(load(100, 60.0, passthrough_share=share))
        for key in (
            "stalled",
            "frames_lost",
            "dev_p99",
            "gap_p99",
            "gap_max_ms",
            "player_late_p99_max",
            "cpu_pct_per_stream",
            "rss_growth_mb",
            "setup_s",
        ):
            FIGURES[f"load.{name}.{key}"] = r[key]  # fmt: skip
        text += load_table(r, f"Load: one process, 100 guilds, {name} ({r['seconds']:.0f} s)")
    ops = asyncio.run(queue_ops())
    FIGURES.update({f"load.queue.{k}": v for k, v in ops.items()})
    isolated = asyncio.run(queue_ops(processes=QUEUE_PROCESSES))
    FIGURES.update({f"load.queue.processes.{k}": v for k, v in isolated.items()})
    text += queue_table(ops, isolated)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--guilds", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument(
        "--passthrough",
        type=float,
        default=0.5,
        help="share of guilds playing Opus in WebM (the rest play MP3)",
    )
    ap.add_argument("--rss-interval", type=float, default=10.0)
    ap.add_argument("--queue-only", action="store_true")
    ap.add_argument("--no-queue", action="store_true")
    args = ap.parse_args()  # fmt: skip
    if not args.queue_only:
        r = asyncio.run(
            load(
                args.guilds,
                args.seconds,
                passthrough_share=args.passthrough,
                rss_interval=args.rss_interval,
            )
        )
        print(load_table(r, f"Load: {args.guilds} guilds ({r['seconds']:.0f} s)"))
    if not args.no_queue:
        runs = [asyncio.run(queue_ops(processes=n)) for n in (0, QUEUE_PROCESSES)]
        print(queue_table(*runs))


async def queue_ops(
    guilds: int = 10, rate: float = 500.0, seconds: float = 2.0, processes: int = 0
) -> dict[str, float]:
    """The queue storm of `tests.e2e.queue_storm` at `rate` commands a second; its figures.

    `processes`: ``[playback] resolve_processes`` (0: yt-dlp in the bot's threads).

    Returns:
        Commands sent, the rate answered (commands / seconds from the first sent to the last
        answered), round-trip percentiles, refusals and inconsistencies (must be 0).
    """
    with tempfile.TemporaryDirectory(prefix="legato-storm-") as tmp:
        root = Path(tmp)
        files = await asyncio.to_thread(TrackFiles, root, 60.0)
        with MediaServer(root) as media:
            config_path = root / "legato.toml"
            config_path.write_text(
                storm_config(media, resolve_processes=processes), encoding="utf-8"
            )
            async with Sandbox(timeout=GUARD) as sb, running_bot(sb, config_path, GUARD) as bot:
                r: StormResult = await queue_storm(
                    sb, bot, media, files, guilds=guilds, rate=rate, seconds=seconds
                )
    for problem in r.problems[:10]:
        print("  queue storm:", problem, file=sys.stderr)
    lat = sorted(r.latencies)
    # /play waits for yt-dlp; the other commands answer without it: the queue path alone.
    # (`answered_at` and `latencies` are appended together, one entry per answer.)
    others = [t for command, t in r.answered_at if command != "play"]
    path_lat = sorted(
        t for (command, _), t in zip(r.answered_at, r.latencies, strict=True) if command != "play"
    )
    return {
        "guilds": float(guilds),
        "processes": float(processes),
        "target_rate": rate,
        "sent": float(r.sent),
        "answered_rate": r.answered / r.elapsed if r.elapsed else 0.0,
        "queue_path_rate": len(others) / max(others) if others else 0.0,
        "rtt_p50_ms": bc.q(lat, 0.50) * 1e3,
        "rtt_p99_ms": bc.q(lat, 0.99) * 1e3,
        "queue_path_rtt_p50_ms": bc.q(path_lat, 0.50) * 1e3 if path_lat else 0.0,
        "queue_path_rtt_p99_ms": bc.q(path_lat, 0.99) * 1e3 if path_lat else 0.0,
        "refused": float(r.refused),
        "inconsistencies": float(len(r.problems)),
        "tracks_added": float(sum(len(g.added) for g in r.ledgers.values())),
    }


def _yt_dlp_in(r: dict[str, float]) -> str:
    n = int(r["processes"])
    return f"{n} process{'es' if n > 1 else ''}" if n else "threads"


def queue_table(*runs: dict[str, float]) -> str:
    """The queue storm's figures as a Markdown table, a row per run."""
    r0 = runs[0]
    text: str = bc.table(
        f"Queue commands across {int(r0['guilds'])} guilds (sandbox -> bot -> cog handlers)",
        ["yt-dlp in", "target /s", "sent", "answered /s (incl. yt-dlp /play)", "rtt p50 ms",
         "rtt p99 ms", "queue path answered /s (no /play)", "queue path rtt p50 ms",
         "queue path rtt p99 ms", "refused (bad position, empty)", "tracks added",
         "inconsistencies"],
        [[_yt_dlp_in(r), r["target_rate"], int(r["sent"]), r["answered_rate"], r["rtt_p50_ms"],
          r["rtt_p99_ms"], r["queue_path_rate"], r["queue_path_rtt_p50_ms"],
          r["queue_path_rtt_p99_ms"], int(r["refused"]), int(r["tracks_added"]),
          int(r["inconsistencies"])] for r in runs],
    )  # fmt: skip
    text += "\n"
    for r in runs:
        text += (
            f"yt-dlp in {_yt_dlp_in(r)}: queue commands answered {r['answered_rate']:.0f}/s "
            f"with /play; the queue path alone {r['queue_path_rate']:.0f}/s "
            f"(target {r['target_rate']:.0f}/s).\n"
        )
    return text


if __name__ == "__main__":
    main()
