"""What yt-dlp costs a bot: its installed size, and the first resolve in a fresh process.

Sizes: the bytes on disk of yt-dlp and of every distribution it pulls in (its ``Requires-Dist``
for the extras Legato asks for, followed recursively), from each distribution's ``RECORD``.

First resolve: each run is a new Python process that imports ``legato.audio.resolve``, then
resolves and streams one local WebM track (``Resolver.resolve`` then ``Resolver.stream``, as
``/play`` does) from the sandbox's media server on loopback, then does the same again (warm).
Times are ``time.perf_counter`` in the child, with its own CPU time (``time.process_time``: steadier
than wall time on a shared machine; a worker process's is not counted); the median of the runs is
printed. Both in the bot's
threads and with one resolver worker process. And what the JavaScript runtime adds to a YouTube
resolve: an n-challenge solved by yt-dlp's Deno provider on the tests' synthetic player, the first
(a Deno process started, the EJS scripts parsed) and a second.

    python bench/bench_resolve.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _requirement_names(dist: importlib.metadata.Distribution, extras: set[str]) -> set[str]:
    names: set[str] = set()
    for req in dist.requires or []:
        name, _, marker = req.partition(";")
        wanted = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if wanted and not set(wanted) & extras:
            continue
        if "sys_platform == 'ios'" in marker.replace('"', "'") and "!=" not in marker:
            continue
        base = re.split(r"[\s\[<>=!~;(]", name.strip(), maxsplit=1)[0]
        names.add(base.lower().replace("_", "-"))
    return names


def _size(dist: importlib.metadata.Distribution) -> int:
    total = 0
    for file in dist.files or []:
        path = Path(str(dist.locate_file(file)))
        if path.is_file():
            total += path.stat().st_size
    return total


def installed_sizes() -> dict[str, int]:
    """Bytes on disk of yt-dlp and what it pulls in, by distribution (installed ones only)."""
    legato = importlib.metadata.distribution("legato")
    spec = next(r for r in legato.requires or [] if r.lower().startswith("yt-dlp"))
    extras = set(re.findall(r"\[([^\]]+)\]", spec)[0].split(",")) if "[" in spec else set()
    sizes: dict[str, int] = {}
    todo = [("yt-dlp", {e.strip() for e in extras})]
    while todo:
        name, wanted = todo.pop()
        if name in sizes:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        sizes[name] = _size(dist)
        todo.extend((n, set()) for n in _requirement_names(dist, wanted))
    return sizes


_CHILD = """
import asyncio, json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from legato.audio.resolve import Resolver, ResolverSettings
t1, c1 = time.perf_counter(), time.process_time()

async def main(url, processes):
    resolver = Resolver(ResolverSettings(timeout=60.0), processes=processes)
    try:
        a, ca = time.perf_counter(), time.process_time()
        [track] = await resolver.resolve(url)
        await resolver.stream(track)
        b, cb = time.perf_counter(), time.process_time()
        [track] = await resolver.resolve(url)
        await resolver.stream(track)
        c = time.perf_counter()
    finally:
        resolver.close()
    return b - a, c - b, cb - ca

first, warm, first_cpu = asyncio.run(main(sys.argv[1], int(sys.argv[2])))
print(json.dumps({"import": t1 - t0, "first": first, "warm": warm,
                  "import_cpu": c1 - c0, "first_cpu": first_cpu}))
"""


_SOLVE = """
import json, sys, time
t0 = time.perf_counter()
import yt_dlp
from yt_dlp.extractor.youtube.jsc.provider import (
    JsChallengeRequest, JsChallengeType, NChallengeInput)
from legato.audio.sources import SourceSettings, ydl_params
url = "https://www.youtube.com/s/player/0123abcd/player_ias.vflset/en_US/base.js"
with yt_dlp.YoutubeDL({"quiet": True, "cachedir": False, **ydl_params(SourceSettings())}) as ydl:
    ie = ydl.get_info_extractor("Youtube")
    ie.initialize()
    ie._code_cache[ie._player_js_cache_key(url)] = open(sys.argv[1]).read()
    times = []
    for n in ("abcdef", "ghijkl"):
        a = time.perf_counter()
        [(_, response)] = ie._jsc_director.bulk_solve(
            [JsChallengeRequest(JsChallengeType.N, NChallengeInput(url, [n]), "x")])
        times.append(time.perf_counter() - a)
print(json.dumps({"first": times[0], "second": times[1]}))
"""


def solve_times(runs: int) -> dict[str, float] | None:
    """Median seconds of a first and a second n-challenge solve under the runtime, in a fresh
    process, on the synthetic player of the tests (None without the EJS scripts)."""
    try:
        import yt_dlp_ejs  # noqa: F401 - only whether it is there
    except ImportError:
        return None
    player = ROOT / "tests" / "js" / "challenge_player.js"
    samples = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", _SOLVE, str(player)],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(s[key] for s in samples) for key in ("first", "second")}


def _one_run(url: str, processes: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, url, str(processes)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def first_resolve(runs: int) -> dict[str, dict[str, float]]:
    """Median seconds (import, first resolve+stream, warm resolve+stream) per mode."""
    from legato.sandbox.media import MediaServer, write_tone

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tone(root / "tone.webm", freq=440.0, seconds=2, container="webm", codec="libopus")
        with MediaServer(root) as media:
            url = media.url("tone.webm")
            figures: dict[str, dict[str, float]] = {}
            for label, processes in (("threads", 0), ("1 worker process", 1)):
                samples = [_one_run(url, processes) for _ in range(runs)]
                figures[label] = {
                    key: statistics.median(s[key] for s in samples)
                    for key in ("import", "first", "warm", "import_cpu", "first_cpu")
                }
            return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    sizes = installed_sizes()
    print("installed (yt-dlp and what it pulls in):")
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24s} {size / 1e6:8.1f} MB")
    print(f"  {'total':24s} {sum(sizes.values()) / 1e6:8.1f} MB")
    started = time.perf_counter()
    figures = asyncio.run(asyncio.to_thread(first_resolve, args.runs))
    print(f"first resolve, median of {args.runs} fresh processes (seconds):")
    for label, row in figures.items():
        print(
            f"  {label:18s} import {row['import']:.3f}  first resolve+stream {row['first']:.3f}"
            f"  warm {row['warm']:.3f}  (CPU of this process: import {row['import_cpu']:.3f},"
            f" first {row['first_cpu']:.3f})"
        )
    solve = solve_times(args.runs)
    if solve is not None:
        print(
            f"YouTube n-challenge under the JS runtime: first {solve['first']:.3f} s, "
            f"second {solve['second']:.3f} s (median of {args.runs} fresh processes)"
        )
    print(f"(measured in {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
